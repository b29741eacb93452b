/* Tests of common/model: fp16/bf16 conversions, presets and config.json, the safetensors loader's
 * handling of every malformed case (status + distinctive message), synthetic write + load round
 * trips (single file and sharded, bit-exact in F32, BF16 and F16), and leak-free failure paths
 * under allocation-failure injection.
 *
 * Test scratch files live in $PDS_TEST_TMP (set by ctest) or /tmp, in a fresh mkdtemp directory
 * per test that the test removes at the end. Test-side memory uses plain malloc so that it does not
 * disturb the pds_alloc_stats the leak checks compare. */
#include <criterion/criterion.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"

/* ---- helpers ----------------------------------------------------------------------------------
 */
static char *path_of(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    cr_assert_not_null(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static char *make_tmpdir(void)
{
    const char *base = getenv("PDS_TEST_TMP");
    if (!base || !*base) base = "/tmp";
    mkdir(base, 0755);
    char *t = path_of(base, "model-XXXXXX");
    cr_assert_not_null(mkdtemp(t), "mkdtemp in %s: %s", base, strerror(errno));
    return t;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void rm_rf(char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    cr_assert_eq(fwrite(p, 1, n, f), n);
    cr_assert_eq(fclose(f), 0);
}

static void write_text(const char *dir, const char *name, const char *text)
{
    char *p = path_of(dir, name);
    write_bytes(p, text, strlen(text));
    free(p);
}

static unsigned char *read_bytes(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 1);
    cr_assert_eq(fread(b, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return b;
}

/* A safetensors file with an explicit header-length field (which may lie), header and data. */
static void write_st_raw(const char *path, uint64_t header_len_field, const char *header,
                         size_t header_n, const void *data, size_t data_n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(header_len_field >> (8 * i));
    cr_assert_eq(fwrite(len8, 1, 8, f), 8);
    if (header_n) cr_assert_eq(fwrite(header, 1, header_n, f), header_n);
    if (data_n) cr_assert_eq(fwrite(data, 1, data_n, f), data_n);
    cr_assert_eq(fclose(f), 0);
}

/* Writes dir/name with header (padded with spaces to `align` bytes, 0 = none) and data. */
static void write_st(const char *dir, const char *name, const char *header, size_t align,
                     const void *data, size_t data_n)
{
    size_t n = strlen(header), padded = align ? (n + align - 1) / align * align : n;
    char *h = malloc(padded + 1);
    memcpy(h, header, n);
    memset(h + n, ' ', padded - n);
    char *p = path_of(dir, name);
    write_st_raw(p, padded, h, padded, data, data_n);
    free(p);
    free(h);
}

/* A directory holding the tiny preset's config.json and nothing else. */
static char *tiny_config_dir(pds_model_config_t *cfg_out)
{
    char *dir = make_tmpdir();
    pds_model_config_t cfg;
    cr_assert_eq(pds_model_preset("tiny", &cfg), PDS_OK);
    char *p = path_of(dir, "config.json");
    cr_assert_eq(pds_model_config_save(&cfg, p), PDS_OK, "%s", pds_err_detail());
    free(p);
    if (cfg_out) *cfg_out = cfg;
    return dir;
}

/* Loading dir must fail with `status` and a detail containing every given substring. */
static void expect_load_error(const char *dir, pds_status_t status, const char *sub1,
                              const char *sub2)
{
    pds_model_t *m = (pds_model_t *)0x1;
    pds_err_clear();
    pds_status_t s = pds_model_load(dir, &m);
    cr_expect_eq(s, status, "want %s got %s: %s", pds_status_name(status), pds_status_name(s),
                 pds_err_detail());
    cr_expect_eq(m, (pds_model_t *)0x1, "out-pointer written on failure");
    cr_expect(strstr(pds_err_detail(), sub1) != NULL, "detail \"%s\" lacks \"%s\"",
              pds_err_detail(), sub1);
    if (sub2)
        cr_expect(strstr(pds_err_detail(), sub2) != NULL, "detail \"%s\" lacks \"%s\"",
                  pds_err_detail(), sub2);
}

/* Rewrites dir/model.safetensors after `edit` changed its parsed header; data kept as is. */
typedef void (*header_edit_fn)(json_t *hdr);
static void mutate_st(const char *dir, header_edit_fn edit, size_t align)
{
    char *p = path_of(dir, "model.safetensors");
    size_t n;
    unsigned char *b = read_bytes(p, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | b[i];
    json_error_t e;
    json_t *h = json_loadb((const char *)b + 8, hl, 0, &e);
    cr_assert_not_null(h, "%s", e.text);
    edit(h);
    char *text = json_dumps(h, JSON_COMPACT);
    json_decref(h);
    write_st(dir, "model.safetensors", text, align, b + 8 + hl, n - 8 - hl);
    free(text);
    free(b);
    free(p);
}

/* ---- dtypes -----------------------------------------------------------------------------------
 */
static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bitsf(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

Test(model, dtype_sizes_and_safetensors_names)
{
    cr_expect_eq(pds_dtype_size(PDS_DTYPE_F32), 4);
    cr_expect_eq(pds_dtype_size(PDS_DTYPE_F16), 2);
    cr_expect_eq(pds_dtype_size(PDS_DTYPE_BF16), 2);
    cr_expect_str_eq(pds_dtype_name(PDS_DTYPE_F32), "F32");
    cr_expect_str_eq(pds_dtype_name(PDS_DTYPE_F16), "F16");
    cr_expect_str_eq(pds_dtype_name(PDS_DTYPE_BF16), "BF16");
}

Test(model, bf16_rounds_to_nearest_even_and_keeps_nan_and_inf)
{
    cr_expect_eq(pds_f32_to_bf16(1.0f), 0x3f80);
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x3f808000)), 0x3f80); /* tie, kept bit even: down */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x3f818000)), 0x3f82); /* tie, kept bit odd: up */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x3f808001)), 0x3f81); /* above the tie: up */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x3f807fff)), 0x3f80); /* below the tie: down */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0xbf818000)), 0xbf82); /* sign symmetric */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x7f7fffff)), 0x7f80); /* FLT_MAX rounds to inf */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x7f7f7fff)), 0x7f7f);
    cr_expect_eq(pds_f32_to_bf16(INFINITY), 0x7f80);
    cr_expect_eq(pds_f32_to_bf16(-INFINITY), 0xff80);
    cr_expect_eq(pds_f32_to_bf16(-0.0f), 0x8000);
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x00008000)), 0x0000); /* subnormal tie to even */
    cr_expect_eq(pds_f32_to_bf16(bitsf(0x00018000)), 0x0002);
    /* a NaN whose payload lives only in the dropped bits must stay NaN, sign kept */
    uint16_t n1 = pds_f32_to_bf16(bitsf(0x7f800001)), n2 = pds_f32_to_bf16(bitsf(0xff800001));
    cr_expect((n1 & 0x7f80) == 0x7f80 && (n1 & 0x7f) != 0 && !(n1 & 0x8000), "%04x", n1);
    cr_expect((n2 & 0x7f80) == 0x7f80 && (n2 & 0x7f) != 0 && (n2 & 0x8000), "%04x", n2);
    cr_expect(isnan(pds_bf16_to_f32(0x7fc0)));
    cr_expect_eq(fbits(pds_bf16_to_f32(0xbf80)), 0xbf800000);

    /* every non-NaN bf16 survives widen + narrow exactly; NaNs stay NaN */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = pds_bf16_to_f32((uint16_t)h);
        cr_assert_eq(fbits(f), h << 16);
        if (isnan(f))
            cr_assert(isnan(pds_bf16_to_f32(pds_f32_to_bf16(f))));
        else
            cr_assert_eq(pds_f32_to_bf16(f), h, "%04x", h);
    }
    /* random floats against an independent reference: nearest of the two neighbours in double,
     * ties to the even one */
    uint64_t x = 42;
    for (int i = 0; i < 200000; i++) {
        x = pds_mix64(x);
        uint32_t u = (uint32_t)x;
        float f = bitsf(u);
        if (isnan(f) || isinf(f) || (u & 0x7fffffff) >= 0x7f7f8000) continue;
        uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
        double dl = fabs((double)bitsf(lo) - f), dh = fabs((double)bitsf(hi) - f);
        uint16_t want =
            (uint16_t)((dl < dh || (dl == dh && !((lo >> 16) & 1))) ? lo >> 16 : hi >> 16);
        cr_assert_eq(pds_f32_to_bf16(f), want, "f32 %08x", u);
    }
}

Test(model, f16_handles_subnormals_overflow_nan_and_ties)
{
    cr_expect_eq(pds_f32_to_f16(1.0f), 0x3c00);
    cr_expect_eq(pds_f32_to_f16(-2.0f), 0xc000);
    cr_expect_eq(pds_f32_to_f16(65504.0f), 0x7bff);  /* largest finite */
    cr_expect_eq(pds_f32_to_f16(65519.99f), 0x7bff); /* just below the tie */
    cr_expect_eq(pds_f32_to_f16(65520.0f), 0x7c00);  /* tie to even: inf */
    cr_expect_eq(pds_f32_to_f16(1e10f), 0x7c00);
    cr_expect_eq(pds_f32_to_f16(-INFINITY), 0xfc00);
    cr_expect_eq(pds_f32_to_f16(0x1p-14f), 0x0400);        /* smallest normal */
    cr_expect_eq(pds_f32_to_f16(0x1p-24f), 0x0001);        /* smallest subnormal */
    cr_expect_eq(pds_f32_to_f16(0x1p-25f), 0x0000);        /* tie between 0 and 1: even */
    cr_expect_eq(pds_f32_to_f16(0x1.8p-25f), 0x0001);      /* above the tie */
    cr_expect_eq(pds_f32_to_f16(0x1.8p-24f), 0x0002);      /* tie between 1 and 2: even */
    cr_expect_eq(pds_f32_to_f16(-0x1p-30f), 0x8000);       /* underflow keeps the sign */
    cr_expect_eq(pds_f32_to_f16(0x1.ff8p-15f), 0x03ff);    /* largest subnormal */
    cr_expect_eq(pds_f32_to_f16(0x1.ffcp-15f), 0x0400);    /* tie above it rounds to the normal */
    cr_expect_eq(pds_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie, even: down */
    cr_expect_eq(pds_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02); /* tie, odd: up */
    uint16_t n = pds_f32_to_f16(bitsf(0x7f800001));
    cr_expect((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0, "%04x", n);
    cr_expect_eq(fbits(pds_f16_to_f32(0x0001)), fbits(0x1p-24f));
    cr_expect_eq(fbits(pds_f16_to_f32(0x83ff)), fbits(-0x1.ff8p-15f));
    cr_expect_eq(fbits(pds_f16_to_f32(0x7c00)), 0x7f800000);
    cr_expect_eq(fbits(pds_f16_to_f32(0x7e01)), 0x7fc02000); /* NaN payload kept */

    for (uint32_t h = 0; h < 65536; h++) {
        float f = pds_f16_to_f32((uint16_t)h);
        if (isnan(f)) {
            cr_assert(((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff));
            cr_assert(isnan(pds_f16_to_f32(pds_f32_to_f16(f))));
        } else {
            cr_assert_eq(pds_f32_to_f16(f), h, "%04x", h);
        }
    }
#ifdef __FLT16_MANT_DIG__
    /* random floats against the compiler's own (IEEE, round-to-nearest-even) conversion */
    uint64_t x = 7;
    for (int i = 0; i < 300000; i++) {
        x = pds_mix64(x);
        uint32_t u = (uint32_t)x;
        if (i & 1) u = (u & 0x80ffffffu) | ((uint32_t)(96 + (x >> 40) % 48) << 23); /* f16 range */
        float f = bitsf(u);
        if (isnan(f)) continue;
        _Float16 r = (_Float16)f;
        uint16_t want;
        memcpy(&want, &r, 2);
        cr_assert_eq(pds_f32_to_f16(f), want, "f32 %08x", u);
    }
#endif
}

/* ---- presets and config -----------------------------------------------------------------------
 */
Test(model, presets_validate_and_have_the_published_sizes)
{
    int n = 0;
    for (const char *const *p = pds_model_preset_names(); *p; p++, n++) {
        pds_model_config_t c;
        cr_assert_eq(pds_model_preset(*p, &c), PDS_OK, "%s", *p);
        cr_expect_str_eq(c.name, *p);
        cr_expect_eq(pds_model_config_validate(&c), PDS_OK, "%s: %s", *p, pds_err_detail());
    }
    cr_expect_eq(n, 5);
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("llama3-8b", &c), PDS_OK);
    cr_expect_eq(pds_model_config_param_count(&c), 8030261248LL); /* Meta-Llama-3-8B */
    cr_expect_eq(c.n_kv_heads, 8);
    cr_expect_eq(c.rope_scaling, PDS_ROPE_SCALING_LLAMA3);
    cr_expect_eq(c.rope_original_max_pos, 8192);
    cr_assert_eq(pds_model_preset("llama2-7b", &c), PDS_OK);
    cr_expect_eq(pds_model_config_param_count(&c), 6738415616LL); /* Llama-2-7b */
    cr_assert_eq(pds_model_preset("llama3-70b", &c), PDS_OK);
    cr_expect_eq(pds_model_config_param_count(&c), 70553706496LL); /* Meta-Llama-3-70B */
    cr_assert_eq(pds_model_preset("small", &c), PDS_OK);
    cr_expect_eq(pds_model_config_param_count(&c), 25436672LL);
    cr_expect(c.tied_embeddings);
    cr_expect_eq(c.rope_original_max_pos, 2048);
    cr_expect_eq(c.dtype, PDS_DTYPE_BF16);
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    /* embed + lm_head + final norm + 2 * (norms + q,k,v,o + mlp) */
    cr_expect_eq(pds_model_config_param_count(&c),
                 2 * 272 * 64 + 64 +
                     2 * (2 * 64 + (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64) + 3 * 64 * 160));
    cr_expect_eq(c.dtype, PDS_DTYPE_F32);
    cr_expect_eq(c.bos_id, 256);
    cr_expect_eq(c.eos_id, 257);

    cr_expect_eq(pds_model_preset("llama4", &c), PDS_ERR_NOT_FOUND);
    cr_expect(strstr(pds_err_detail(), "unknown model preset 'llama4'"));
}

Test(model, config_validate_names_the_inconsistency)
{
    pds_model_config_t base, c;
    cr_assert_eq(pds_model_preset("tiny", &base), PDS_OK);
    c = base, c.n_layers = 0;
    cr_expect_eq(pds_model_config_validate(&c), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "num_hidden_layers must be positive"));
    c = base, c.n_kv_heads = 3;
    cr_expect_eq(pds_model_config_validate(&c), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "not a multiple of num_key_value_heads"));
    c = base, c.head_dim = 15;
    cr_expect_eq(pds_model_config_validate(&c), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "must be even"));
    c = base, c.eos_id = 272;
    cr_expect_eq(pds_model_config_validate(&c), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "eos_token_id 272 outside the vocabulary"));
    c = base, c.norm_eps = 0;
    cr_expect_eq(pds_model_config_validate(&c), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "rms_norm_eps"));
    c = base, c.rope_scaling = PDS_ROPE_SCALING_LLAMA3, c.rope_factor = 8,
    c.rope_low_freq_factor = 4, c.rope_high_freq_factor = 1, c.rope_original_max_pos = 8192;
    cr_expect_eq(pds_model_config_validate(&c), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "low_freq_factor < high_freq_factor"));
}

static void expect_same_config(const pds_model_config_t *a, const pds_model_config_t *b)
{
    cr_expect_eq(a->n_layers, b->n_layers);
    cr_expect_eq(a->hidden, b->hidden);
    cr_expect_eq(a->n_heads, b->n_heads);
    cr_expect_eq(a->n_kv_heads, b->n_kv_heads);
    cr_expect_eq(a->head_dim, b->head_dim);
    cr_expect_eq(a->ffn, b->ffn);
    cr_expect_eq(a->vocab, b->vocab);
    cr_expect_eq(a->max_context, b->max_context);
    cr_expect_eq(fbits(a->rope_theta), fbits(b->rope_theta));
    cr_expect_eq(a->rope_scaling, b->rope_scaling);
    if (a->rope_scaling == PDS_ROPE_SCALING_LLAMA3) {
        cr_expect_eq(fbits(a->rope_factor), fbits(b->rope_factor));
        cr_expect_eq(fbits(a->rope_low_freq_factor), fbits(b->rope_low_freq_factor));
        cr_expect_eq(fbits(a->rope_high_freq_factor), fbits(b->rope_high_freq_factor));
        cr_expect_eq(a->rope_original_max_pos, b->rope_original_max_pos);
    }
    cr_expect_eq(fbits(a->norm_eps), fbits(b->norm_eps));
    cr_expect_eq(a->tied_embeddings, b->tied_embeddings);
    cr_expect_eq(a->bos_id, b->bos_id);
    cr_expect_eq(a->eos_id, b->eos_id);
    cr_expect_eq(a->dtype, b->dtype);
}

Test(model, config_save_then_load_gives_back_every_preset)
{
    char *dir = make_tmpdir();
    char *p = path_of(dir, "config.json");
    for (const char *const *n = pds_model_preset_names(); *n; n++) {
        pds_model_config_t a, b;
        cr_assert_eq(pds_model_preset(*n, &a), PDS_OK);
        cr_assert_eq(pds_model_config_save(&a, p), PDS_OK, "%s", pds_err_detail());
        cr_assert_eq(pds_model_config_load(p, &b), PDS_OK, "%s: %s", *n, pds_err_detail());
        expect_same_config(&a, &b);
        cr_expect_str_eq(b.name, strrchr(dir, '/') + 1); /* the directory's name */
    }
    /* floats are written in their shortest form, not as 9.9999997e-06 */
    size_t len;
    char *text = (char *)read_bytes(p, &len);
    text[len] = '\0';
    cr_expect(strstr(text, "\"rms_norm_eps\": 1e-5,"), "%s", text);
    cr_expect(strstr(text, "\"rope_theta\": 500000.0"), "%s", text);
    free(text);
    free(p);
    rm_rf(dir);
}

/* Llama-3.1-8B's config.json as published (minus a few irrelevant keys). */
static const char *llama31_config = "{\n"
                                    "  \"architectures\": [\"LlamaForCausalLM\"],\n"
                                    "  \"attention_bias\": false,\n"
                                    "  \"attention_dropout\": 0.0,\n"
                                    "  \"bos_token_id\": 128000,\n"
                                    "  \"eos_token_id\": [128001, 128008, 128009],\n"
                                    "  \"hidden_act\": \"silu\",\n"
                                    "  \"hidden_size\": 4096,\n"
                                    "  \"initializer_range\": 0.02,\n"
                                    "  \"intermediate_size\": 14336,\n"
                                    "  \"max_position_embeddings\": 131072,\n"
                                    "  \"mlp_bias\": false,\n"
                                    "  \"model_type\": \"llama\",\n"
                                    "  \"num_attention_heads\": 32,\n"
                                    "  \"num_hidden_layers\": 32,\n"
                                    "  \"num_key_value_heads\": 8,\n"
                                    "  \"pretraining_tp\": 1,\n"
                                    "  \"rms_norm_eps\": 1e-05,\n"
                                    "  \"rope_scaling\": {\n"
                                    "    \"factor\": 8.0,\n"
                                    "    \"low_freq_factor\": 1.0,\n"
                                    "    \"high_freq_factor\": 4.0,\n"
                                    "    \"original_max_position_embeddings\": 8192,\n"
                                    "    \"rope_type\": \"llama3\"\n"
                                    "  },\n"
                                    "  \"rope_theta\": 500000.0,\n"
                                    "  \"tie_word_embeddings\": false,\n"
                                    "  \"torch_dtype\": \"bfloat16\",\n"
                                    "  \"transformers_version\": \"4.43.0.dev0\",\n"
                                    "  \"use_cache\": true,\n"
                                    "  \"vocab_size\": 128256\n"
                                    "}\n";

Test(model, config_load_reads_a_hugging_face_llama31_config)
{
    char *dir = make_tmpdir();
    write_text(dir, "config.json", llama31_config);
    char *p = path_of(dir, "config.json");
    pds_model_config_t want, got;
    cr_assert_eq(pds_model_preset("llama3-8b", &want), PDS_OK);
    cr_assert_eq(pds_model_config_load(p, &got), PDS_OK, "%s", pds_err_detail());
    expect_same_config(&want, &got); /* head_dim defaulted to 4096/32, eos the first of the list */
    free(p);
    rm_rf(dir);
}

/* config.json text with `from` replaced by `to` must fail to load with status and substring. */
static void expect_config_error(const char *from, const char *to, pds_status_t status,
                                const char *sub)
{
    const char *at = strstr(llama31_config, from);
    cr_assert_not_null(at, "%s", from);
    size_t n = strlen(llama31_config) + strlen(to) + 1;
    char *text = malloc(n);
    snprintf(text, n, "%.*s%s%s", (int)(at - llama31_config), llama31_config, to,
             at + strlen(from));
    char *dir = make_tmpdir();
    write_text(dir, "config.json", text);
    char *p = path_of(dir, "config.json");
    pds_model_config_t c;
    memset(&c, 0x5a, sizeof c);
    pds_status_t s = pds_model_config_load(p, &c);
    cr_expect_eq(s, status, "%s -> %s: want %s got %s (%s)", from, to, pds_status_name(status),
                 pds_status_name(s), pds_err_detail());
    cr_expect(strstr(pds_err_detail(), sub), "detail \"%s\" lacks \"%s\"", pds_err_detail(), sub);
    cr_expect(strstr(pds_err_detail(), p), "detail \"%s\" does not name the file",
              pds_err_detail());
    cr_expect_eq(c.n_layers, 0x5a5a5a5a, "output written on failure");
    free(p);
    free(text);
    rm_rf(dir);
}

Test(model, config_errors_name_file_and_key)
{
    expect_config_error("{\n", "{\n  ,", PDS_ERR_PARSE, "not valid JSON");
    expect_config_error("  \"hidden_size\": 4096,\n", "", PDS_ERR_PARSE,
                        "missing key \"hidden_size\"");
    expect_config_error("\"num_hidden_layers\": 32", "\"num_hidden_layers\": \"32\"", PDS_ERR_PARSE,
                        "key \"num_hidden_layers\" must be an integer, got a string");
    expect_config_error("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": [1]", PDS_ERR_PARSE,
                        "key \"rms_norm_eps\" must be a number, got an array");
    expect_config_error("\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\"", PDS_ERR_UNSUPPORTED,
                        "\"rope_scaling.rope_type\": \"yarn\" is not supported");
    expect_config_error("\"factor\": 8.0,", "", PDS_ERR_PARSE,
                        "missing key \"rope_scaling.factor\"");
    expect_config_error("\"bfloat16\"", "\"int8\"", PDS_ERR_UNSUPPORTED,
                        "key \"torch_dtype\": \"int8\" is not supported");
    expect_config_error("[128001, 128008, 128009]", "[]", PDS_ERR_PARSE,
                        "key \"eos_token_id\" is an empty array");
    expect_config_error("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5",
                        PDS_ERR_INVALID_ARG, "is not a multiple of num_key_value_heads");
    expect_config_error("\"silu\"", "\"gelu\"", PDS_ERR_UNSUPPORTED,
                        "key \"hidden_act\": only \"silu\"");
    expect_config_error("\"mlp_bias\": false", "\"mlp_bias\": true", PDS_ERR_UNSUPPORTED,
                        "key \"mlp_bias\": biases are not supported");
    expect_config_error("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": 0",
                        PDS_ERR_PARSE, "key \"tie_word_embeddings\" must be a boolean");

    pds_model_config_t c;
    cr_expect_eq(pds_model_config_load("/nonexistent/pdserve/config.json", &c), PDS_ERR_NOT_FOUND);
    cr_expect(strstr(pds_err_detail(), "/nonexistent/pdserve/config.json: cannot open"));
}

/* ---- synthetic weights ------------------------------------------------------------------------
 */
Test(model, synth_tensor_list_has_stable_indices)
{
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    cr_expect_eq(pds_model_synth_tensor_count(&c), 3 + 9 * 2);
    char name[128];
    int64_t shape[2];
    int ndim, is_norm;
    float scale;
    cr_assert_eq(
        pds_model_synth_tensor_info(&c, 0, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_OK);
    cr_expect_str_eq(name, "model.embed_tokens.weight");
    cr_expect(ndim == 2 && shape[0] == 272 && shape[1] == 64 && scale == 1.0f && !is_norm);
    cr_assert_eq(
        pds_model_synth_tensor_info(&c, 1, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_OK);
    cr_expect_str_eq(name, "model.norm.weight");
    cr_expect(ndim == 1 && shape[0] == 64 && is_norm);
    cr_assert_eq(
        pds_model_synth_tensor_info(&c, 2, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_OK);
    cr_expect_str_eq(name, "lm_head.weight");
    cr_expect_eq(scale, 1.0f / 8.0f);
    /* layer 1, k = 2: k_proj [kv_heads*head_dim, hidden] */
    cr_assert_eq(pds_model_synth_tensor_info(&c, 3 + 9 + 2, name, sizeof name, shape, &ndim, &scale,
                                             &is_norm),
                 PDS_OK);
    cr_expect_str_eq(name, "model.layers.1.self_attn.k_proj.weight");
    cr_expect(ndim == 2 && shape[0] == 32 && shape[1] == 64 && scale == 0.125f);
    /* layer 0, k = 8: down_proj [hidden, ffn], fan_in = ffn */
    cr_assert_eq(
        pds_model_synth_tensor_info(&c, 3 + 8, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_OK);
    cr_expect_str_eq(name, "model.layers.0.mlp.down_proj.weight");
    cr_expect(shape[0] == 64 && shape[1] == 160 && scale == 1.0f / sqrtf(160.0f));
    cr_assert_eq(
        pds_model_synth_tensor_info(&c, 3 + 5, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_OK);
    cr_expect_str_eq(name, "model.layers.0.post_attention_layernorm.weight");
    cr_expect(ndim == 1 && is_norm);

    cr_expect_eq(
        pds_model_synth_tensor_info(&c, 21, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_ERR_OUT_OF_RANGE);
    cr_expect_eq(pds_model_synth_tensor_info(&c, 0, name, 8, shape, &ndim, &scale, &is_norm),
                 PDS_ERR_INVALID_ARG);
    c.tied_embeddings = true;
    cr_expect_eq(pds_model_synth_tensor_count(&c), 21);
    cr_expect_eq(
        pds_model_synth_tensor_info(&c, 2, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_ERR_NOT_FOUND);
    float v = pds_model_synth_value(1, 3, 0, 1.0f, 1);
    cr_expect(v >= 0.9f && v <= 1.1f);
}

/* The view a loaded model hands out for synthetic tensor index t, through the typed accessors. */
static const pds_tensor_view_t *view_of(const pds_model_t *m, int t)
{
    static const size_t field[9] = {
        offsetof(pds_layer_weights_t, attn_norm), offsetof(pds_layer_weights_t, wq),
        offsetof(pds_layer_weights_t, wk),        offsetof(pds_layer_weights_t, wv),
        offsetof(pds_layer_weights_t, wo),        offsetof(pds_layer_weights_t, ffn_norm),
        offsetof(pds_layer_weights_t, w_gate),    offsetof(pds_layer_weights_t, w_up),
        offsetof(pds_layer_weights_t, w_down),
    };
    if (t == 0) return pds_model_embed(m);
    if (t == 1) return pds_model_final_norm(m);
    if (t == 2) return pds_model_lm_head(m);
    const pds_layer_weights_t *l = pds_model_layer(m, (t - 3) / 9);
    return (const pds_tensor_view_t *)((const char *)l + field[(t - 3) % 9]);
}

/* Every bound tensor equals pds_model_synth_value(seed, ...) rounded to dtype, bit for bit. */
static void expect_synth_weights(const pds_model_t *m, uint64_t seed, pds_dtype_t dtype)
{
    const pds_model_config_t *c = pds_model_config(m);
    float *buf = malloc(sizeof(float) * 272 * 64);
    for (int t = 0; t < pds_model_synth_tensor_count(c); t++) {
        char name[128];
        int64_t shape[2];
        int ndim, is_norm;
        float scale;
        pds_status_t s =
            pds_model_synth_tensor_info(c, t, name, sizeof name, shape, &ndim, &scale, &is_norm);
        if (s == PDS_ERR_NOT_FOUND) {
            /* tied: the lm_head is the embedding */
            cr_expect_eq(pds_model_lm_head(m)->data, pds_model_embed(m)->data);
            pds_tensor_view_t none;
            cr_expect_eq(pds_model_tensor(m, "lm_head.weight", &none), PDS_ERR_NOT_FOUND);
            continue;
        }
        cr_assert_eq(s, PDS_OK);
        const pds_tensor_view_t *v = view_of(m, t);
        pds_tensor_view_t byname;
        cr_assert_eq(pds_model_tensor(m, name, &byname), PDS_OK, "%s", name);
        cr_expect_eq(byname.data, v->data, "%s", name);
        cr_assert_eq(v->dtype, dtype, "%s", name);
        cr_assert_eq(v->ndim, ndim);
        cr_assert_eq(v->shape[0], shape[0]);
        if (ndim == 2) cr_assert_eq(v->shape[1], shape[1]);
        int64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
        cr_assert_eq(v->numel, numel);
        cr_assert_eq((uintptr_t)v->data % pds_dtype_size(dtype), 0);
        cr_assert(numel <= 272 * 64);
        pds_tensor_to_f32(v, 0, numel, buf);
        for (int64_t i = 0; i < numel; i++) {
            float x = pds_model_synth_value(seed, t, i, scale, is_norm);
            uint32_t want, got;
            if (dtype == PDS_DTYPE_F32) {
                want = fbits(x);
                got = ((const uint32_t *)v->data)[i];
            } else if (dtype == PDS_DTYPE_BF16) {
                want = pds_f32_to_bf16(x);
                got = ((const uint16_t *)v->data)[i];
                cr_assert_eq(fbits(buf[i]), fbits(pds_bf16_to_f32((uint16_t)want)));
            } else {
                want = pds_f32_to_f16(x);
                got = ((const uint16_t *)v->data)[i];
                cr_assert_eq(fbits(buf[i]), fbits(pds_f16_to_f32((uint16_t)want)));
            }
            cr_assert_eq(got, want, "%s[%ld]: %x vs %x", name, (long)i, got, want);
        }
    }
    free(buf);
}

Test(model, synth_write_then_load_is_bit_exact_in_every_dtype)
{
    const pds_dtype_t dts[] = {PDS_DTYPE_F32, PDS_DTYPE_BF16, PDS_DTYPE_F16};
    for (int tied = 0; tied < 2; tied++) {
        for (size_t d = 0; d < 3; d++) {
            pds_model_config_t c;
            cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
            c.dtype = dts[d];
            c.tied_embeddings = tied;
            char *dir = make_tmpdir();
            char *sub = path_of(dir, "a/b"); /* also creates missing parents */
            uint64_t seed = 1234 + d;
            cr_assert_eq(pds_model_synth_write(&c, seed, sub), PDS_OK, "%s", pds_err_detail());
            pds_model_t *m = NULL;
            cr_assert_eq(pds_model_load(sub, &m), PDS_OK, "%s", pds_err_detail());
            expect_same_config(&c, pds_model_config(m));
            cr_expect_str_eq(pds_model_config(m)->name, "b");
            expect_synth_weights(m, seed, dts[d]);
            /* file size: 8 + header + every parameter once */
            char *p = path_of(sub, "model.safetensors");
            struct stat st;
            cr_assert_eq(stat(p, &st), 0);
            size_t hl;
            unsigned char *b = read_bytes(p, &hl);
            uint64_t h = 0;
            for (int i = 7; i >= 0; i--) h = (h << 8) | b[i];
            cr_expect_eq(h % 8, 0);
            cr_expect_eq((uint64_t)st.st_size,
                         8 + h +
                             (uint64_t)pds_model_config_param_count(&c) * pds_dtype_size(dts[d]));
            free(b);
            free(p);
            pds_model_destroy(m);
            free(sub);
            rm_rf(dir);
        }
    }
    pds_model_destroy(NULL);
}

Test(model, different_seeds_give_different_weights)
{
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    char *dir = make_tmpdir();
    char *a = path_of(dir, "a"), *b = path_of(dir, "b");
    cr_assert_eq(pds_model_synth_write(&c, 1, a), PDS_OK);
    cr_assert_eq(pds_model_synth_write(&c, 2, b), PDS_OK);
    pds_model_t *ma, *mb;
    cr_assert_eq(pds_model_load(a, &ma), PDS_OK);
    cr_assert_eq(pds_model_load(b, &mb), PDS_OK);
    const pds_tensor_view_t *wa = &pds_model_layer(ma, 1)->wq, *wb = &pds_model_layer(mb, 1)->wq;
    cr_expect_neq(memcmp(wa->data, wb->data, (size_t)wa->numel * 4), 0);
    pds_model_destroy(ma);
    pds_model_destroy(mb);
    free(a);
    free(b);
    rm_rf(dir);
}

/* ---- sharded checkpoints ----------------------------------------------------------------------
 */
/* Writes m's tensors into n_shards files (tensor t goes to shard t % n_shards) plus
 * model.safetensors.index.json and config.json in dst. If misplace is set, the index maps that
 * tensor to the next shard over, where it is not. */
static void write_sharded(const pds_model_t *m, const char *dst, int n_shards, const char *misplace)
{
    const pds_model_config_t *c = pds_model_config(m);
    mkdir(dst, 0755);
    char *cp = path_of(dst, "config.json");
    cr_assert_eq(pds_model_config_save(c, cp), PDS_OK);
    free(cp);
    json_t *wm = json_object();
    for (int s = 0; s < n_shards; s++) {
        char fname[64];
        snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        json_t *hdr = json_object();
        json_object_set_new(hdr, "__metadata__", json_pack("{s:s}", "format", "pt"));
        size_t cap = 1 << 20, used = 0;
        unsigned char *data = malloc(cap);
        for (int t = 0; t < pds_model_synth_tensor_count(c); t++) {
            if (t % n_shards != s) continue;
            char name[128];
            int64_t shape[2];
            int ndim, is_norm;
            float scale;
            if (pds_model_synth_tensor_info(c, t, name, sizeof name, shape, &ndim, &scale,
                                            &is_norm) != PDS_OK)
                continue;
            pds_tensor_view_t v;
            cr_assert_eq(pds_model_tensor(m, name, &v), PDS_OK);
            size_t nb = (size_t)v.numel * pds_dtype_size(v.dtype);
            cr_assert(used + nb <= cap);
            memcpy(data + used, v.data, nb);
            json_t *sh = json_array();
            for (int d = 0; d < v.ndim; d++) json_array_append_new(sh, json_integer(v.shape[d]));
            json_object_set_new(hdr, name,
                                json_pack("{s:s,s:o,s:[I,I]}", "dtype", pds_dtype_name(v.dtype),
                                          "shape", sh, "data_offsets", (json_int_t)used,
                                          (json_int_t)(used + nb)));
            used += nb;
            char mapped[64];
            snprintf(mapped, sizeof mapped, "model-%05d-of-%05d.safetensors",
                     (misplace && strcmp(misplace, name) == 0 ? (s + 1) % n_shards : s) + 1,
                     n_shards);
            json_object_set_new(wm, name, json_string(mapped));
        }
        char *text = json_dumps(hdr, JSON_COMPACT);
        write_st(dst, fname, text, 8, data, used);
        free(text);
        free(data);
        json_decref(hdr);
    }
    json_t *idx =
        json_pack("{s:{s:I},s:o}", "metadata", "total_size", (json_int_t)0, "weight_map", wm);
    char *p = path_of(dst, "model.safetensors.index.json");
    cr_assert_eq(json_dump_file(idx, p, JSON_INDENT(2)), 0);
    free(p);
    json_decref(idx);
}

Test(model, sharded_checkpoint_loads_bit_exact)
{
    const pds_dtype_t dts[] = {PDS_DTYPE_F32, PDS_DTYPE_BF16, PDS_DTYPE_F16};
    for (size_t d = 0; d < 3; d++) {
        pds_model_config_t c;
        cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
        c.dtype = dts[d];
        c.tied_embeddings = d == 1;
        char *dir = make_tmpdir();
        char *one = path_of(dir, "one"), *sharded = path_of(dir, "sharded");
        cr_assert_eq(pds_model_synth_write(&c, 99, one), PDS_OK, "%s", pds_err_detail());
        pds_model_t *m1, *m3;
        cr_assert_eq(pds_model_load(one, &m1), PDS_OK, "%s", pds_err_detail());
        write_sharded(m1, sharded, 3, NULL);
        pds_model_destroy(m1);
        cr_assert_eq(pds_model_load(sharded, &m3), PDS_OK, "%s", pds_err_detail());
        expect_synth_weights(m3, 99, dts[d]);
        pds_model_destroy(m3);
        free(one);
        free(sharded);
        rm_rf(dir);
    }
}

Test(model, sharded_checkpoint_errors_name_index_shard_and_tensor)
{
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    char *dir = make_tmpdir();
    char *one = path_of(dir, "one"), *bad = path_of(dir, "bad");
    cr_assert_eq(pds_model_synth_write(&c, 5, one), PDS_OK);
    pds_model_t *m;
    cr_assert_eq(pds_model_load(one, &m), PDS_OK);

    /* the index maps a tensor to a shard that does not hold it */
    write_sharded(m, bad, 2, "model.layers.1.self_attn.o_proj.weight");
    expect_load_error(bad, PDS_ERR_NOT_FOUND,
                      "tensor 'model.layers.1.self_attn.o_proj.weight' is mapped to shard", NULL);
    cr_expect(strstr(pds_err_detail(), "model-00001-of-00002.safetensors") ||
              strstr(pds_err_detail(), "model-00002-of-00002.safetensors"));

    /* a shard file is gone */
    write_sharded(m, bad, 2, NULL);
    char *shard2 = path_of(bad, "model-00002-of-00002.safetensors");
    cr_assert_eq(unlink(shard2), 0);
    expect_load_error(bad, PDS_ERR_NOT_FOUND, "shard listed in", "model-00002-of-00002");

    /* a shard is malformed: its own error, naming it */
    write_bytes(shard2, "abc", 3);
    expect_load_error(bad, PDS_ERR_PARSE, "shorter than the 8-byte header length",
                      "model-00002-of-00002.safetensors");
    free(shard2);

    /* the index itself */
    write_text(bad, "model.safetensors.index.json", "{\"weight_map\": ");
    expect_load_error(bad, PDS_ERR_PARSE, "model.safetensors.index.json: not valid JSON", NULL);
    write_text(bad, "model.safetensors.index.json", "{\"metadata\": {}}");
    expect_load_error(bad, PDS_ERR_PARSE, "missing object \"weight_map\"", NULL);
    write_text(bad, "model.safetensors.index.json",
               "{\"weight_map\": {\"model.norm.weight\": \"../../etc/passwd\"}}");
    expect_load_error(bad, PDS_ERR_PARSE, "tensor 'model.norm.weight': weight_map value", NULL);
    /* an index that leaves a needed tensor out */
    write_text(bad, "model.safetensors.index.json",
               "{\"weight_map\": {\"model.embed_tokens.weight\": "
               "\"model-00001-of-00002.safetensors\"}}");
    expect_load_error(bad, PDS_ERR_NOT_FOUND, "tensor 'model.norm.weight' is missing",
                      "model.safetensors.index.json");

    pds_model_destroy(m);
    free(one);
    free(bad);
    rm_rf(dir);
}

/* ---- malformed safetensors --------------------------------------------------------------------
 */
/* Each case writes dir/model.safetensors by hand next to the tiny config and expects its own
 * status and message; every message names the file. */
Test(model, malformed_safetensors_headers_each_get_their_own_error)
{
    char *dir = tiny_config_dir(NULL);
    char *st = path_of(dir, "model.safetensors");
    float data[4] = {1, 2, 3, 4};

    expect_load_error(dir, PDS_ERR_NOT_FOUND,
                      "neither model.safetensors nor model.safetensors.index.json", NULL);

    write_bytes(st, "\x05\0\0\0\0", 5);
    expect_load_error(dir, PDS_ERR_PARSE, "file is 5 bytes, shorter than the 8-byte header length",
                      st);

    write_st_raw(st, 1ull << 40, "{}", 2, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "header length 1099511627776 is absurd", st);

    write_st_raw(st, 1000, "{}", 2, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "header length 1000 runs past the end of the file (26",
                      st);

    write_st(dir, "model.safetensors", "{\"a\": {\"dtype\": ", 8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "header is not valid JSON", st);

    write_st(dir, "model.safetensors", "{\"a\": 1, \"a\": 2}", 8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "header is not valid JSON", "duplicate");

    write_st(dir, "model.safetensors", "[1, 2]", 8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "header JSON is not an object", st);

    write_st(dir, "model.safetensors", "{\"w\": 5}", 8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': header entry is not an object", st);

    write_st(dir, "model.safetensors", "{\"w\": {\"shape\": [4], \"data_offsets\": [0, 16]}}", 8,
             data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': missing field \"dtype\"", st);

    write_st(dir, "model.safetensors", "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 16]}}",
             8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': missing field \"shape\"", st);

    write_st(dir, "model.safetensors", "{\"w\": {\"dtype\": \"F32\", \"shape\": [4]}}", 8, data,
             sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': missing field \"data_offsets\"", st);

    write_st(dir, "model.safetensors",
             "{\"w\": {\"dtype\": 4, \"shape\": [4], \"data_offsets\": [0, 16]}}", 8, data,
             sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': field \"dtype\" is not a string", st);

    write_st(dir, "model.safetensors",
             "{\"w\": {\"dtype\": \"F33\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8, data,
             sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': unknown dtype \"F33\"", st);

    write_st(dir, "model.safetensors",
             "{\"w\": {\"dtype\": \"F32\", \"shape\": [4, -1], \"data_offsets\": [0, 16]}}", 8,
             data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': shape[1] is not a non-negative integer", st);

    write_st(dir, "model.safetensors",
             "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [16, 0]}}", 8, data,
             sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensor 'w': field \"data_offsets\" is not [begin, end]",
                      st);

    write_st(dir, "model.safetensors",
             "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 12]}}", 8, data,
             sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE,
                      "tensor 'w': shape [2, 2] of dtype F32 needs 16 bytes but data_offsets "
                      "[0, 12] span 12",
                      st);

    write_st(dir, "model.safetensors",
             "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}", 8, data,
             sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE,
                      "tensor 'w': data_offsets [8, 24] run past the end of the data section (16 "
                      "bytes)",
                      st);

    write_st(dir, "model.safetensors",
             "{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 12]},"
             " \"b\": {\"dtype\": \"BF16\", \"shape\": [2], \"data_offsets\": [8, 12]}}",
             8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "tensors 'a' [0, 12) and 'b' [8, 12) overlap", st);

    write_st(dir, "model.safetensors", "{\"__metadata__\": [1]}", 8, data, sizeof data);
    expect_load_error(dir, PDS_ERR_PARSE, "\"__metadata__\" is not an object", st);

    /* well-formed but empty: the first required tensor is reported missing */
    write_st(dir, "model.safetensors", "{\"__metadata__\": {\"format\": \"pt\"}}", 8, NULL, 0);
    expect_load_error(dir, PDS_ERR_NOT_FOUND, "tensor 'model.embed_tokens.weight' is missing", st);

    free(st);
    rm_rf(dir);
}

/* Header edits applied to a valid synthetic tiny model. */
static void drop_up_proj(json_t *h)
{
    json_t *e = json_object_get(h, "model.layers.1.mlp.up_proj.weight");
    json_object_set(h, "model.layers.1.mlp.up_proj.weight.renamed", e);
    json_object_del(h, "model.layers.1.mlp.up_proj.weight");
}

static void transpose_k_proj(json_t *h)
{
    json_t *sh =
        json_object_get(json_object_get(h, "model.layers.0.self_attn.k_proj.weight"), "shape");
    json_array_set_new(sh, 0, json_integer(64));
    json_array_set_new(sh, 1, json_integer(32));
}

static void norm_as_int32(json_t *h)
{
    json_object_set_new(json_object_get(h, "model.layers.0.input_layernorm.weight"), "dtype",
                        json_string("I32"));
}

static void extra_int_tensor(json_t *h)
{
    /* a tensor nobody binds may have any valid dtype (an empty one, so no bytes overlap) */
    json_object_set_new(
        h, "model.rotary_emb.inv_freq",
        json_pack("{s:s,s:[i],s:[i,i]}", "dtype", "I32", "shape", 0, "data_offsets", 0, 0));
}

static void same_header(json_t *h)
{
    (void)h;
}

Test(model, weights_that_disagree_with_the_config_are_named)
{
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    char *dir = make_tmpdir();
    char *st = path_of(dir, "model.safetensors");

    cr_assert_eq(pds_model_synth_write(&c, 3, dir), PDS_OK);
    mutate_st(dir, drop_up_proj, 8);
    expect_load_error(dir, PDS_ERR_NOT_FOUND,
                      "tensor 'model.layers.1.mlp.up_proj.weight' is missing", st);

    cr_assert_eq(pds_model_synth_write(&c, 3, dir), PDS_OK);
    mutate_st(dir, transpose_k_proj, 8);
    expect_load_error(dir, PDS_ERR_INVALID_ARG,
                      "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [64, 32] but the "
                      "config needs [32, 64]",
                      st);

    cr_assert_eq(pds_model_synth_write(&c, 3, dir), PDS_OK);
    mutate_st(dir, norm_as_int32, 8);
    expect_load_error(dir, PDS_ERR_UNSUPPORTED,
                      "tensor 'model.layers.0.input_layernorm.weight': dtype I32 is not supported",
                      st);

    /* a header of odd length leaves every F32 tensor misaligned in the mapping */
    cr_assert_eq(pds_model_synth_write(&c, 3, dir), PDS_OK);
    mutate_st(dir, same_header, 0);
    size_t n;
    unsigned char *b = read_bytes(st, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | b[i];
    if (hl % 4 == 0) { /* the compact JSON happened to keep alignment: one more space */
        char *h = malloc(hl + 1);
        memcpy(h, b + 8, hl);
        h[hl] = ' ';
        write_st_raw(st, hl + 1, h, hl + 1, b + 8 + hl, n - 8 - hl);
        free(h);
    }
    free(b);
    expect_load_error(dir, PDS_ERR_UNSUPPORTED, "is not aligned to its 4-byte elements", st);

    /* an unused tensor of another dtype is fine, and reachable by name with a clear status */
    cr_assert_eq(pds_model_synth_write(&c, 3, dir), PDS_OK);
    mutate_st(dir, extra_int_tensor, 8);
    pds_model_t *m;
    cr_assert_eq(pds_model_load(dir, &m), PDS_OK, "%s", pds_err_detail());
    pds_tensor_view_t v;
    cr_expect_eq(pds_model_tensor(m, "model.rotary_emb.inv_freq", &v), PDS_ERR_UNSUPPORTED);
    cr_expect_eq(pds_model_tensor(m, "no.such.tensor", &v), PDS_ERR_NOT_FOUND);
    expect_synth_weights(m, 3, PDS_DTYPE_F32);
    pds_model_destroy(m);

    free(st);
    rm_rf(dir);
}

/* ---- failure injection ------------------------------------------------------------------------
 */
/* Fails each pds allocation of fn in turn; every failure must be PDS_ERR_NO_MEMORY and leave the
 * live byte count where it was. Returns the number of allocations a successful run makes. */
static int sweep(pds_status_t (*fn)(const char *dir, void **obj), void (*undo)(void *),
                 const char *dir)
{
    pds_alloc_stats_t before, after;
    for (int n = 1; n < 100000; n++) {
        pds_alloc_stats(&before);
        void *obj = NULL;
        pds_alloc_fail_nth(n);
        pds_status_t s = fn(dir, &obj);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        if (!hit) {
            cr_assert_eq(s, PDS_OK, "n=%d: %s", n, pds_err_detail());
            undo(obj);
            pds_alloc_stats(&after);
            cr_assert_eq(after.live_bytes, before.live_bytes);
            return n - 1;
        }
        cr_assert_eq(s, PDS_ERR_NO_MEMORY, "n=%d: %s (%s)", n, pds_status_name(s),
                     pds_err_detail());
        cr_assert_null(obj);
        pds_alloc_stats(&after);
        cr_assert_eq(after.live_bytes, before.live_bytes, "leak at n=%d", n);
        cr_assert_eq(after.live_blocks, before.live_blocks, "leak at n=%d", n);
    }
    cr_assert_fail("never succeeded");
    return -1;
}

static pds_status_t load_fn(const char *dir, void **obj)
{
    return pds_model_load(dir, (pds_model_t **)obj);
}

static void load_undo(void *obj)
{
    pds_model_destroy(obj);
}

static pds_status_t write_fn(const char *dir, void **obj)
{
    pds_model_config_t c;
    pds_model_preset("tiny", &c);
    *obj = NULL;
    return pds_model_synth_write(&c, 11, dir);
}

static void write_undo(void *obj)
{
    (void)obj;
}

Test(model, allocation_failures_leak_nothing)
{
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    char *dir = make_tmpdir();
    char *one = path_of(dir, "one"), *sharded = path_of(dir, "sharded");
    int n_write = sweep(write_fn, write_undo, one);
    cr_expect_gt(n_write, 3);
    int n_load = sweep(load_fn, load_undo, one);
    cr_expect_gt(n_load, 20); /* paths, model, files, a name per tensor, layers */
    pds_model_t *m;
    cr_assert_eq(pds_model_load(one, &m), PDS_OK);
    write_sharded(m, sharded, 4, NULL);
    pds_model_destroy(m);
    int n_sharded = sweep(load_fn, load_undo, sharded);
    cr_expect_gt(n_sharded, n_load);
    /* and the model still loads right after all that */
    cr_assert_eq(pds_model_load(sharded, &m), PDS_OK);
    expect_synth_weights(m, 11, PDS_DTYPE_F32);
    pds_model_destroy(m);
    free(one);
    free(sharded);
    rm_rf(dir);
}

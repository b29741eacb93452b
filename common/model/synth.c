/* synth.c: seeded synthetic weights — the tensor list of a config, and a writer that turns it into
 * config.json + model.safetensors.
 *
 * The tensor list (names, shapes, scales) is the single place that says which tensors a Llama
 * config implies; the loader binds against the same list, so a written model always loads. Values
 * come from pds_model_synth_value (in model.h, shared with the GPU filler), rounded to the file's
 * dtype. The writer streams: it computes the header from shapes alone, then generates and writes
 * each tensor in fixed-size chunks, so memory stays at one chunk whatever the model size (an 8B
 * file is 16 GB on disk and 256 KiB in RAM). It writes to a temporary name and renames at the end,
 * so a crash never leaves a truncated model.safetensors behind.
 */
#include "model/model_internal.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SYNTH_CHUNK 65536 /* elements generated per write */

int pds_model_synth_tensor_count(const pds_model_config_t *cfg)
{
    return 3 + 9 * cfg->n_layers;
}

pds_status_t pds_model_synth_tensor_info(const pds_model_config_t *cfg, int t, char *name,
                                         size_t name_cap, int64_t shape[2], int *ndim, float *scale,
                                         int *is_norm)
{
    if (t < 0 || t >= pds_model_synth_tensor_count(cfg))
        return PDS_ERR(PDS_ERR_OUT_OF_RANGE, "synthetic tensor index %d outside [0, %d)", t,
                       pds_model_synth_tensor_count(cfg));
    if (t == 2 && cfg->tied_embeddings)
        return PDS_ERR(PDS_ERR_NOT_FOUND, "tied embeddings: no lm_head tensor (index 2)");
    int64_t h = cfg->hidden, q = (int64_t)cfg->n_heads * cfg->head_dim;
    int64_t kv = (int64_t)cfg->n_kv_heads * cfg->head_dim, f = cfg->ffn;
    char buf[128];
    int64_t s0 = 0, s1 = 0;
    int norm = 0;
    if (t == 0) {
        snprintf(buf, sizeof buf, "model.embed_tokens.weight");
        s0 = cfg->vocab, s1 = h;
    } else if (t == 1) {
        snprintf(buf, sizeof buf, "model.norm.weight");
        s0 = h, norm = 1;
    } else if (t == 2) {
        snprintf(buf, sizeof buf, "lm_head.weight");
        s0 = cfg->vocab, s1 = h;
    } else {
        static const char *const names[9] = {
            "input_layernorm",  "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
            "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj",
        };
        const int64_t dims[9][2] = {{h, 0}, {q, h}, {kv, h}, {kv, h}, {h, q},
                                    {h, 0}, {f, h}, {f, h},  {h, f}};
        int layer = (t - 3) / 9, k = (t - 3) % 9;
        snprintf(buf, sizeof buf, "model.layers.%d.%s.weight", layer, names[k]);
        s0 = dims[k][0], s1 = dims[k][1];
        norm = s1 == 0;
    }
    if (strlen(buf) >= name_cap)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "name buffer of %zu bytes too small for '%s'", name_cap,
                       buf);
    memcpy(name, buf, strlen(buf) + 1);
    shape[0] = s0;
    shape[1] = s1;
    *ndim = norm ? 1 : 2;
    /* Matrices 1/sqrt(fan_in). An untied embedding is only looked up: O(1). A tied one is also
     * the lm_head, where O(1) entries give logits with a std of ~sqrt(hidden/3) — so peaked that
     * every sampler degenerates to greedy (the `small` preset produced one repeated byte): scale
     * it like the matrix it also is. The first RMSNorm undoes the scale on the input side. */
    if (norm)
        *scale = 1.0f;
    else if (t == 0)
        *scale = cfg->tied_embeddings ? 1.0f / sqrtf((float)s1) : 1.0f;
    else
        *scale = 1.0f / sqrtf((float)s1);
    *is_norm = norm;
    return PDS_OK;
}

/* mkdir -p */
static pds_status_t make_dirs(const char *dir)
{
    char *p = pds_strdup(dir);
    if (!p) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory");
    pds_status_t s = PDS_OK;
    for (char *c = p + 1;; c++) {
        if (*c != '/' && *c != '\0') continue;
        char saved = *c;
        *c = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            s = PDS_ERR(PDS_ERR_IO, "%s: cannot create directory: %s", p, strerror(errno));
            break;
        }
        *c = saved;
        if (saved == '\0') break;
    }
    pds_free(p);
    if (s != PDS_OK) return s;
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return PDS_ERR(PDS_ERR_IO, "%s: not a directory", dir);
    return PDS_OK;
}

/* The safetensors header for cfg, padded with spaces to a multiple of 8 so that the data section
 * (and every tensor in it, all sizes being multiples of the element size) stays aligned. */
static pds_status_t build_header(const pds_model_config_t *cfg, char **out, size_t *len)
{
    json_t *root = json_object(), *meta = json_object();
    int bad = json_object_set_new(root, "__metadata__", meta);
    bad |= json_object_set_new(meta, "format", json_string("pt"));
    bad |= json_object_set_new(meta, "generator", json_string("pdserve synthetic"));
    size_t esz = pds_dtype_size(cfg->dtype);
    uint64_t off = 0;
    for (int t = 0; t < pds_model_synth_tensor_count(cfg) && !bad; t++) {
        char name[128];
        int64_t shape[2];
        int ndim, is_norm;
        float scale;
        if (pds_model_synth_tensor_info(cfg, t, name, sizeof name, shape, &ndim, &scale,
                                        &is_norm) != PDS_OK)
            continue; /* tied lm_head */
        json_t *e = json_object(), *sh = json_array(), *offs = json_array();
        bad |= json_object_set_new(root, name, e);
        bad |= json_object_set_new(e, "dtype", json_string(pds_dtype_name(cfg->dtype)));
        bad |= json_object_set_new(e, "shape", sh);
        bad |= json_object_set_new(e, "data_offsets", offs);
        uint64_t n = 1;
        for (int d = 0; d < ndim; d++) {
            bad |= json_array_append_new(sh, json_integer(shape[d]));
            n *= (uint64_t)shape[d];
        }
        bad |= json_array_append_new(offs, json_integer((json_int_t)off));
        off += n * esz;
        bad |= json_array_append_new(offs, json_integer((json_int_t)off));
    }
    /* json_dumpb into our own buffer: size first, then the text, then the space padding */
    size_t n = bad ? 0 : json_dumpb(root, NULL, 0, JSON_COMPACT);
    size_t padded = (n + 7) & ~(size_t)7;
    char *h = n ? pds_malloc(padded) : NULL;
    if (h && json_dumpb(root, h, n, JSON_COMPACT) != n) {
        pds_free(h);
        h = NULL;
    }
    json_decref(root);
    if (!h) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for the safetensors header");
    memset(h + n, ' ', padded - n);
    *out = h;
    *len = padded;
    return PDS_OK;
}

static pds_status_t write_all(FILE *f, const void *p, size_t n, const char *path)
{
    if (fwrite(p, 1, n, f) != n)
        return PDS_ERR(PDS_ERR_IO, "%s: write failed: %s", path, strerror(errno));
    return PDS_OK;
}

/* Streams every tensor's values after the header. */
static pds_status_t write_data(const pds_model_config_t *cfg, uint64_t seed, FILE *f,
                               const char *path)
{
    float *vals = pds_malloc(SYNTH_CHUNK * sizeof *vals);    /* (SYNTH_CHUNK) fp32 */
    uint16_t *half = pds_malloc(SYNTH_CHUNK * sizeof *half); /* (SYNTH_CHUNK) bf16 or fp16 */
    pds_status_t s = PDS_OK;
    if (!vals || !half) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for a write buffer");
        goto out;
    }
    for (int t = 0; t < pds_model_synth_tensor_count(cfg) && s == PDS_OK; t++) {
        char name[128];
        int64_t shape[2];
        int ndim, is_norm;
        float scale;
        if (pds_model_synth_tensor_info(cfg, t, name, sizeof name, shape, &ndim, &scale,
                                        &is_norm) != PDS_OK)
            continue;
        int64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
        for (int64_t i0 = 0; i0 < numel && s == PDS_OK; i0 += SYNTH_CHUNK) {
            int64_t n = PDS_MIN((int64_t)SYNTH_CHUNK, numel - i0);
            for (int64_t i = 0; i < n; i++)
                vals[i] = pds_model_synth_value(seed, t, i0 + i, scale, is_norm);
            switch (cfg->dtype) {
            case PDS_DTYPE_F32:
                s = write_all(f, vals, (size_t)n * 4, path);
                break;
            case PDS_DTYPE_BF16:
                for (int64_t i = 0; i < n; i++) half[i] = pds_f32_to_bf16(vals[i]);
                s = write_all(f, half, (size_t)n * 2, path);
                break;
            case PDS_DTYPE_F16:
                for (int64_t i = 0; i < n; i++) half[i] = pds_f32_to_f16(vals[i]);
                s = write_all(f, half, (size_t)n * 2, path);
                break;
            }
        }
    }
out:
    pds_free(vals);
    pds_free(half);
    return s;
}

pds_status_t pds_model_synth_write(const pds_model_config_t *cfg, uint64_t seed, const char *dir)
{
    PDS_TRY(pds_model_config_validate(cfg));
    PDS_TRY(make_dirs(dir));
    pds_status_t s;
    char *cfg_path = pds_model_path_join(dir, "config.json");
    char *st_path = pds_model_path_join(dir, "model.safetensors");
    char *tmp_path = pds_model_path_join(dir, "model.safetensors.tmp");
    char *header = NULL;
    size_t header_len = 0;
    FILE *f = NULL;
    if (!cfg_path || !st_path || !tmp_path) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for paths");
        goto out;
    }
    s = build_header(cfg, &header, &header_len);
    if (s != PDS_OK) goto out;
    f = fopen(tmp_path, "wb");
    if (!f) {
        s = PDS_ERR(PDS_ERR_IO, "%s: cannot create: %s", tmp_path, strerror(errno));
        goto out;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)header_len >> (8 * i));
    s = write_all(f, len8, 8, tmp_path);
    if (s == PDS_OK) s = write_all(f, header, header_len, tmp_path);
    if (s == PDS_OK) s = write_data(cfg, seed, f, tmp_path);
    int rc = fclose(f);
    if (s == PDS_OK && rc != 0)
        s = PDS_ERR(PDS_ERR_IO, "%s: close failed: %s", tmp_path, strerror(errno));
    if (s == PDS_OK && rename(tmp_path, st_path) != 0)
        s = PDS_ERR(PDS_ERR_IO, "%s: cannot rename to %s: %s", tmp_path, st_path, strerror(errno));
    if (s != PDS_OK) {
        unlink(tmp_path);
        goto out;
    }
    s = pds_model_config_save(cfg, cfg_path);
out:
    pds_free(header);
    pds_free(cfg_path);
    pds_free(st_path);
    pds_free(tmp_path);
    return s;
}

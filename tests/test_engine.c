/* Tests of common/engine on the CPU reference backend, tiny preset: incremental decode against
 * full prefill, batching against running alone, KV export/import between instances, seeded
 * sampling and recompute, the generator's limits, input validation, file-loaded against synthetic
 * weights, the BLAS path against the naive loops, and an allocation-failure sweep. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"

#define SEED 7

static pds_model_config_t tiny(void)
{
    pds_model_config_t c;
    cr_assert_eq(pds_model_preset("tiny", &c), PDS_OK);
    return c;
}

static pds_engine_t *make_engine_cfg(const pds_model_config_t *c, const pds_engine_params_t *p)
{
    pds_engine_params_t d = pds_engine_default_params();
    d.n_threads = 1;
    pds_engine_t *e = NULL;
    pds_status_t s = pds_engine_create_synth(c, SEED, p ? p : &d, &e);
    cr_assert_eq(s, PDS_OK, "create_synth: %s (%s)", pds_status_name(s), pds_err_detail());
    return e;
}

static pds_engine_t *make_engine(void)
{
    pds_model_config_t c = tiny();
    return make_engine_cfg(&c, NULL);
}

/* Deterministic pseudo-random token ids in [0, 256) (bytes). */
static void fill_tokens(int32_t *t, int n, uint64_t salt)
{
    for (int i = 0; i < n; i++) t[i] = (int32_t)(pds_mix64(salt * 1000003u + (uint64_t)i) % 256);
}

static float max_abs_diff(const float *a, const float *b, int n)
{
    float m = 0.0f;
    for (int i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

/* Appends n tokens to seq (growing it) and runs them as one forward; logits optional. */
static void feed(pds_engine_t *e, pds_kv_seq_t *kv, const int32_t *toks, int n, float *logits)
{
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    cr_assert_eq(pds_kv_seq_grow(kv, pds_engine_kv_pool(e), info.kv.block_size, n, NULL), PDS_OK);
    pds_engine_seq_t s = {.tokens = toks, .n_tokens = n, .kv = kv, .logits = logits};
    pds_status_t st = pds_engine_forward(e, &s, 1, NULL, NULL);
    cr_assert_eq(st, PDS_OK, "forward: %s", pds_err_detail());
}

static void drop(pds_engine_t *e, pds_kv_seq_t *kv)
{
    pds_kv_seq_release(kv, pds_engine_kv_pool(e));
    pds_kv_seq_fini(kv);
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

Test(engine, incremental_decode_matches_full_prefill_across_block_boundaries)
{
    pds_engine_t *e = make_engine();
    pds_model_config_t c = tiny();
    int32_t toks[50];
    fill_tokens(toks, 50, 1);
    static const int lens[] = {1, 15, 16, 17, 33, 50};
    float *inc = malloc(sizeof(float) * c.vocab * 51), *full = malloc(sizeof(float) * c.vocab);

    /* One token at a time: logits after each length L. */
    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    for (int i = 0; i < 50; i++) feed(e, &kv, &toks[i], 1, inc + (size_t)(i + 1) * c.vocab);
    drop(e, &kv);

    for (size_t k = 0; k < PDS_ARRAY_LEN(lens); k++) {
        int L = lens[k];
        pds_kv_seq_init(&kv);
        feed(e, &kv, toks, L, full);
        float d = max_abs_diff(full, inc + (size_t)L * c.vocab, c.vocab);
        cr_expect_lt(d, 1e-4f, "length %d: max abs diff %g", L, (double)d);
        drop(e, &kv);
    }
    /* Chunked prefill (7 + 10 + 16 + 17 tokens) lands on the same logits too. */
    pds_kv_seq_init(&kv);
    feed(e, &kv, toks, 7, NULL);
    feed(e, &kv, toks + 7, 10, NULL);
    feed(e, &kv, toks + 17, 16, NULL);
    feed(e, &kv, toks + 33, 17, full);
    cr_expect_lt(max_abs_diff(full, inc + (size_t)50 * c.vocab, c.vocab), 1e-4f);
    drop(e, &kv);
    /* The logits are not degenerate: different prefixes give clearly different outputs. */
    cr_expect_gt(max_abs_diff(inc + (size_t)16 * c.vocab, inc + (size_t)17 * c.vocab, c.vocab),
                 1e-2f);
    cr_expect_eq(pds_kv_pool_free_count(pds_engine_kv_pool(e)),
                 pds_kv_pool_total(pds_engine_kv_pool(e)));
    free(inc);
    free(full);
    pds_engine_destroy(e);
}

#define NB    4
#define STEPS 20
static const int batch_lens[NB] = {5, 16, 23, 40};

/* Greedy: prefill then STEPS-1 decode steps; out[STEPS]. Logits of the last step into last. */
static void run_alone(pds_engine_t *e, const int32_t *prompt, int n, int32_t *out, float *last)
{
    pds_sample_params_t g = pds_sample_default_params();
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    cr_assert_eq(pds_kv_seq_grow(&kv, pds_engine_kv_pool(e), info.kv.block_size, n, NULL), PDS_OK);
    pds_engine_seq_t s = {
        .tokens = prompt, .n_tokens = n, .kv = &kv, .sample = &g, .token_out = &out[0]};
    cr_assert_eq(pds_engine_forward(e, &s, 1, NULL, NULL), PDS_OK);
    for (int k = 1; k < STEPS; k++) {
        cr_assert_eq(pds_kv_seq_grow(&kv, pds_engine_kv_pool(e), info.kv.block_size, 1, NULL),
                     PDS_OK);
        s = (pds_engine_seq_t){.tokens = &out[k - 1],
                               .n_tokens = 1,
                               .kv = &kv,
                               .sample = &g,
                               .token_out = &out[k],
                               .logits = k == STEPS - 1 ? last : NULL};
        cr_assert_eq(pds_engine_forward(e, &s, 1, NULL, NULL), PDS_OK);
    }
    drop(e, &kv);
}

Test(engine, batch_of_different_lengths_gives_the_same_tokens_as_each_alone)
{
    pds_engine_t *e = make_engine();
    pds_model_config_t c = tiny();
    int32_t prompts[NB][40], alone[NB][STEPS], batched[NB][STEPS];
    float last_alone[NB][272], last_batch[NB][272];
    cr_assert_eq(c.vocab, 272);
    for (int i = 0; i < NB; i++) {
        fill_tokens(prompts[i], batch_lens[i], 100 + i);
        run_alone(e, prompts[i], batch_lens[i], alone[i], last_alone[i]);
    }

    pds_sample_params_t g = pds_sample_default_params();
    pds_kv_seq_t kv[NB];
    pds_engine_seq_t s[NB];
    for (int i = 0; i < NB; i++) {
        pds_kv_seq_init(&kv[i]);
        cr_assert_eq(pds_kv_seq_grow(&kv[i], pds_engine_kv_pool(e), 16, batch_lens[i], NULL),
                     PDS_OK);
        s[i] = (pds_engine_seq_t){.tokens = prompts[i],
                                  .n_tokens = batch_lens[i],
                                  .kv = &kv[i],
                                  .sample = &g,
                                  .token_out = &batched[i][0]};
    }
    cr_assert_eq(pds_engine_forward(e, s, NB, NULL, NULL), PDS_OK); /* mixed-length prefill */
    for (int k = 1; k < STEPS; k++) {
        for (int i = 0; i < NB; i++) {
            cr_assert_eq(pds_kv_seq_grow(&kv[i], pds_engine_kv_pool(e), 16, 1, NULL), PDS_OK);
            s[i] = (pds_engine_seq_t){.tokens = &batched[i][k - 1],
                                      .n_tokens = 1,
                                      .kv = &kv[i],
                                      .sample = &g,
                                      .token_out = &batched[i][k],
                                      .logits = k == STEPS - 1 ? last_batch[i] : NULL};
        }
        cr_assert_eq(pds_engine_forward(e, s, NB, NULL, NULL), PDS_OK);
    }
    for (int i = 0; i < NB; i++) {
        cr_expect_arr_eq(batched[i], alone[i], sizeof alone[i], "sequence %d (length %d)", i,
                         batch_lens[i]);
        cr_expect_lt(max_abs_diff(last_batch[i], last_alone[i], c.vocab), 1e-4f);
        drop(e, &kv[i]);
    }
    /* The sequences really differ (so equality above is not a constant output). */
    cr_expect(memcmp(alone[0], alone[3], sizeof alone[0]) != 0);
    pds_engine_destroy(e);
}

/* Continues kv (after its prompt, whose sampled token is `first`) greedily for n steps. */
static void continue_greedy(pds_engine_t *e, pds_kv_seq_t *kv, int32_t first, int n, int32_t *out,
                            float *logits_all)
{
    pds_sample_params_t g = pds_sample_default_params();
    int32_t in = first;
    for (int k = 0; k < n; k++) {
        cr_assert_eq(pds_kv_seq_grow(kv, pds_engine_kv_pool(e), 16, 1, NULL), PDS_OK);
        pds_engine_seq_t s = {.tokens = &in,
                              .n_tokens = 1,
                              .kv = kv,
                              .sample = &g,
                              .token_out = &out[k],
                              .logits = logits_all ? logits_all + (size_t)k * 272 : NULL};
        cr_assert_eq(pds_engine_forward(e, &s, 1, NULL, NULL), PDS_OK);
        in = out[k];
    }
}

/* Prefills `prompt` into a fresh sequence; returns the greedy first token. */
static int32_t prefill(pds_engine_t *e, pds_kv_seq_t *kv, const int32_t *prompt, int n)
{
    pds_kv_seq_init(kv);
    float lg[272];
    feed(e, kv, prompt, n, lg);
    return argmax(lg, 272);
}

Test(engine, kv_exported_in_f32_and_imported_elsewhere_continues_identically)
{
    pds_engine_t *a = make_engine(), *b = make_engine();
    int32_t prompt[37], ta[12], tb[12];
    float la[12 * 272], lb[12 * 272];
    fill_tokens(prompt, 37, 5);
    pds_kv_seq_t ka, kb, pb;
    int32_t first = prefill(a, &ka, prompt, 37);

    size_t bytes = pds_engine_kv_export_bytes(a, 3, PDS_DTYPE_F32);
    cr_expect_eq(bytes, (size_t)2 /*layers*/ * 3 * (2 * 16 * 2 * 16) * 4);
    void *buf = malloc(bytes);
    cr_assert_eq(pds_engine_kv_export(a, &ka, PDS_DTYPE_F32, buf, bytes), PDS_OK);

    /* b: the same tokens in different block ids (5 blocks taken first). */
    pds_kv_seq_init(&pb);
    cr_assert_eq(pds_kv_seq_grow(&pb, pds_engine_kv_pool(b), 16, 16 * 5, NULL), PDS_OK);
    pds_kv_seq_init(&kb);
    cr_assert_eq(pds_kv_seq_grow(&kb, pds_engine_kv_pool(b), 16, 37, NULL), PDS_OK);
    cr_assert_neq(kb.blocks[0], ka.blocks[0]);
    cr_assert_eq(pds_engine_kv_import(b, &kb, PDS_DTYPE_F32, buf, bytes), PDS_OK);

    continue_greedy(a, &ka, first, 12, ta, la);
    continue_greedy(b, &kb, first, 12, tb, lb);
    cr_expect_arr_eq(ta, tb, sizeof ta);
    cr_expect_arr_eq(la, lb, sizeof la, "logits after import are bit-identical");

    /* Size and dtype errors. */
    cr_expect_eq(pds_engine_kv_export(a, &ka, PDS_DTYPE_F32, buf, 10), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "need") != NULL, "%s", pds_err_detail());
    cr_expect_eq(pds_engine_kv_import(b, &kb, PDS_DTYPE_F32, buf, bytes - 4), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_engine_kv_export(a, &ka, PDS_DTYPE_F16, buf, bytes), PDS_ERR_INVALID_ARG);
    free(buf);
    drop(a, &ka);
    drop(b, &kb);
    drop(b, &pb);
    pds_engine_destroy(a);
    pds_engine_destroy(b);
}

Test(engine, kv_exported_in_bf16_equals_feeding_bf16_rounded_kv)
{
    pds_engine_t *a = make_engine(), *b = make_engine(), *c = make_engine();
    int32_t prompt[37], ta[12], tb[12], tc[12];
    float lb[12 * 272], lc[12 * 272];
    fill_tokens(prompt, 37, 6);
    pds_kv_seq_t ka, kb, kc;
    int32_t first = prefill(a, &ka, prompt, 37);

    size_t n16 = pds_engine_kv_export_bytes(a, 3, PDS_DTYPE_BF16);
    size_t n32 = pds_engine_kv_export_bytes(a, 3, PDS_DTYPE_F32);
    cr_assert_eq(n32, 2 * n16);
    uint16_t *h = malloc(n16);
    float *f = malloc(n32);
    cr_assert_eq(pds_engine_kv_export(a, &ka, PDS_DTYPE_BF16, h, n16), PDS_OK);
    cr_assert_eq(pds_engine_kv_export(a, &ka, PDS_DTYPE_F32, f, n32), PDS_OK);
    /* The bf16 export is the f32 export rounded to nearest even. */
    int nonzero = 0;
    for (size_t i = 0; i < n16 / 2; i++) {
        cr_assert_eq(h[i], pds_f32_to_bf16(f[i]), "element %zu", i);
        nonzero += f[i] != 0.0f;
        f[i] = pds_bf16_to_f32(pds_f32_to_bf16(f[i]));
    }
    cr_expect_gt(nonzero, (int)(n16 / 2) / 2, "KV really written");

    pds_kv_seq_init(&kb);
    pds_kv_seq_init(&kc);
    cr_assert_eq(pds_kv_seq_grow(&kb, pds_engine_kv_pool(b), 16, 37, NULL), PDS_OK);
    cr_assert_eq(pds_kv_seq_grow(&kc, pds_engine_kv_pool(c), 16, 37, NULL), PDS_OK);
    cr_assert_eq(pds_engine_kv_import(b, &kb, PDS_DTYPE_BF16, h, n16), PDS_OK);
    cr_assert_eq(pds_engine_kv_import(c, &kc, PDS_DTYPE_F32, f, n32), PDS_OK);
    continue_greedy(a, &ka, first, 12, ta, NULL);
    continue_greedy(b, &kb, first, 12, tb, lb);
    continue_greedy(c, &kc, first, 12, tc, lc);
    /* Exact: the bf16 import equals an engine fed the same bf16-rounded KV in fp32. */
    cr_expect_arr_eq(tb, tc, sizeof tb);
    cr_expect_arr_eq(lb, lc, sizeof lb);
    /* Approximate: against the unrounded original, the first tokens still agree. */
    cr_expect_arr_eq(tb, ta, 4 * sizeof(int32_t));
    free(h);
    free(f);
    drop(a, &ka);
    drop(b, &kb);
    drop(c, &kc);
    pds_engine_destroy(a);
    pds_engine_destroy(b);
    pds_engine_destroy(c);
}

static pds_gen_request_t request(const int32_t *prompt, int n, int max_new)
{
    return (pds_gen_request_t){.prompt = prompt,
                               .n_prompt = n,
                               .max_new_tokens = max_new,
                               .sample = pds_sample_default_params()};
}

static int gen(pds_engine_t *e, const pds_gen_request_t *r, int32_t *out, pds_finish_reason_t *why)
{
    int n = -1;
    pds_status_t s = pds_engine_generate(e, r, out, &n, why, NULL, NULL);
    cr_assert_eq(s, PDS_OK, "generate: %s (%s)", pds_status_name(s), pds_err_detail());
    cr_assert_eq(pds_kv_pool_free_count(pds_engine_kv_pool(e)),
                 pds_kv_pool_total(pds_engine_kv_pool(e)), "generate freed its blocks");
    return n;
}

Test(engine, seeded_sampling_is_reproducible_and_recompute_from_prefix_continues_it)
{
    pds_engine_t *e = make_engine();
    int32_t prompt[64], x[24], y[24], z[24];
    fill_tokens(prompt, 20, 9);
    pds_finish_reason_t why;
    pds_gen_request_t r = request(prompt, 20, 24);
    r.sample.temperature = 1.0f;
    r.sample.top_p = 0.95f;
    r.sample.seed = 1234;
    r.ignore_eos = true; /* at temperature 1 EOS is a likely draw; keep full lengths */
    cr_assert_eq(gen(e, &r, x, &why), 24);
    cr_expect_eq(why, PDS_FINISH_LENGTH);
    cr_assert_eq(gen(e, &r, y, &why), 24);
    cr_expect_arr_eq(x, y, sizeof x, "same seed, same tokens");

    /* Recompute: prompt + the first k outputs as a new prompt continues with outputs k.. since
     * output j is drawn at position n_prompt + j either way. */
    static const int ks[] = {1, 7, 16};
    for (size_t i = 0; i < PDS_ARRAY_LEN(ks); i++) {
        int k = ks[i];
        memcpy(prompt + 20, x, sizeof(int32_t) * k);
        pds_gen_request_t r2 = r;
        r2.n_prompt = 20 + k;
        r2.max_new_tokens = 24 - k;
        cr_assert_eq(gen(e, &r2, z, &why), 24 - k);
        cr_expect_arr_eq(z, x + k, sizeof(int32_t) * (24 - k), "recompute after %d tokens", k);
    }

    /* Output 0 is drawn at position n_prompt, output 1 at n_prompt + 1, from the model's logits. */
    float lg[272];
    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    feed(e, &kv, prompt, 20, lg);
    cr_expect_eq(pds_sample_token(&r.sample, lg, 272, 20, NULL), x[0]);
    feed(e, &kv, &x[0], 1, lg);
    cr_expect_eq(pds_sample_token(&r.sample, lg, 272, 21, NULL), x[1]);
    drop(e, &kv);

    r.sample.seed = 1235;
    cr_assert_eq(gen(e, &r, y, &why), 24);
    cr_expect(memcmp(x, y, sizeof x) != 0, "different seed, different tokens");
    /* Sampling is not greedy in disguise. */
    pds_gen_request_t g = request(prompt, 20, 24);
    g.ignore_eos = true;
    cr_assert_eq(gen(e, &g, z, &why), 24);
    cr_expect(memcmp(x, z, sizeof x) != 0);
    pds_engine_destroy(e);
}

typedef struct {
    int32_t seen[64];
    int n;
} tok_log_t;
static void on_tok(void *ctx, int32_t t, int idx)
{
    tok_log_t *l = ctx;
    cr_assert_eq(idx, l->n);
    l->seen[l->n++] = t;
}

static int first_index(const int32_t *x, int n, int32_t v)
{
    for (int i = 0; i < n; i++)
        if (x[i] == v) return i;
    return -1;
}

Test(engine, generate_honours_max_tokens_stop_eos_and_context)
{
    pds_model_config_t c = tiny();
    pds_engine_t *e = make_engine_cfg(&c, NULL);
    int32_t prompt[16], x[32], y[32];
    fill_tokens(prompt, 16, 11);
    pds_finish_reason_t why;
    tok_log_t log = {0};
    pds_gen_request_t r = request(prompt, 16, 30);
    int n = -1;
    cr_assert_eq(pds_engine_generate(e, &r, x, &n, &why, on_tok, &log), PDS_OK);
    cr_assert_eq(n, 30);
    cr_expect_eq(why, PDS_FINISH_LENGTH);
    cr_expect_str_eq(pds_finish_reason_name(why), "length");
    cr_expect_eq(log.n, 30);
    cr_expect_arr_eq(log.seen, x, sizeof(int32_t) * 30);

    r.max_new_tokens = 5;
    cr_assert_eq(gen(e, &r, y, &why), 5);
    cr_expect_arr_eq(y, x, 5 * sizeof(int32_t));
    r.max_new_tokens = 0;
    cr_expect_eq(gen(e, &r, y, &why), 0);
    cr_expect_eq(why, PDS_FINISH_LENGTH);

    /* A stop id ends the output at its first occurrence, included. */
    int32_t stop[2] = {-5, x[6]};
    int at = first_index(x, 30, x[6]);
    r.max_new_tokens = 30;
    r.stop = stop;
    r.n_stop = 2;
    cr_assert_eq(gen(e, &r, y, &why), at + 1);
    cr_expect_eq(why, PDS_FINISH_STOP);
    cr_expect_str_eq(pds_finish_reason_name(why), "stop");
    cr_expect_arr_eq(y, x, sizeof(int32_t) * (at + 1));
    r.stop = NULL;
    r.n_stop = 0;
    pds_engine_destroy(e);

    /* EOS: the config's eos id does not change the weights, so make one of the outputs EOS. */
    pds_model_config_t ce = c;
    ce.eos_id = x[9];
    e = make_engine_cfg(&ce, NULL);
    at = first_index(x, 30, x[9]);
    cr_assert_eq(gen(e, &r, y, &why), at + 1);
    cr_expect_eq(why, PDS_FINISH_STOP);
    cr_expect_eq(y[at], ce.eos_id);
    r.ignore_eos = true;
    cr_assert_eq(gen(e, &r, y, &why), 30);
    cr_expect_eq(why, PDS_FINISH_LENGTH);
    cr_expect_arr_eq(y, x, sizeof(int32_t) * 30);
    r.ignore_eos = false;
    pds_engine_destroy(e);

    /* Context: prompt + output never exceed max_context. */
    pds_model_config_t cc = c;
    cc.max_context = 16 + 7;
    e = make_engine_cfg(&cc, NULL);
    cr_assert_eq(gen(e, &r, y, &why), 7);
    cr_expect_eq(why, PDS_FINISH_CONTEXT);
    cr_expect_str_eq(pds_finish_reason_name(why), "context");
    cr_expect_arr_eq(y, x, sizeof(int32_t) * 7);
    cc.max_context = 16;
    pds_engine_destroy(e);
    e = make_engine_cfg(&cc, NULL);
    cr_expect_eq(gen(e, &r, y, &why), 0);
    cr_expect_eq(why, PDS_FINISH_CONTEXT);
    r.n_prompt = 17;
    n = -1;
    int32_t full[17];
    memcpy(full, prompt, sizeof(int32_t) * 16);
    full[16] = 1;
    r.prompt = full;
    cr_expect_eq(pds_engine_generate(e, &r, y, &n, &why, NULL, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "exceeds context") != NULL, "%s", pds_err_detail());
    pds_engine_destroy(e);
}

Test(engine, generate_prefills_long_prompts_in_chunks)
{
    pds_model_config_t c = tiny();
    pds_engine_params_t p = pds_engine_default_params();
    p.n_threads = 1;
    p.max_batch_tokens = 8;
    pds_engine_t *small = make_engine_cfg(&c, &p), *big = make_engine();
    int32_t prompt[29], x[10], y[10];
    fill_tokens(prompt, 29, 12);
    pds_finish_reason_t why;
    pds_gen_request_t r = request(prompt, 29, 10);
    cr_assert_eq(gen(small, &r, x, &why), 10);
    cr_assert_eq(gen(big, &r, y, &why), 10);
    cr_expect_arr_eq(x, y, sizeof x);
    pds_engine_destroy(small);
    pds_engine_destroy(big);
}

static void count_layers(void *ctx, int layer)
{
    int *n = ctx;
    (*n)++;
}

static void expect_invalid(pds_engine_t *e, pds_engine_seq_t *s, int n, const char *needle)
{
    int calls = 0;
    pds_err_clear();
    pds_status_t st = pds_engine_forward(e, s, n, count_layers, &calls);
    cr_expect_eq(st, PDS_ERR_INVALID_ARG, "%s: got %s", needle, pds_status_name(st));
    cr_expect(strstr(pds_err_detail(), needle) != NULL, "detail '%s' lacks '%s'", pds_err_detail(),
              needle);
    cr_expect_eq(calls, 0, "nothing computed");
}

Test(engine, bad_inputs_are_rejected_with_details_and_nothing_computed)
{
    pds_model_config_t c = tiny();
    pds_engine_params_t p = pds_engine_default_params();
    p.n_threads = 1;
    p.max_batch_tokens = 24;
    p.max_batch_seqs = 2;
    pds_engine_t *e = make_engine_cfg(&c, &p);
    pds_kv_pool_t *pool = pds_engine_kv_pool(e);
    int32_t toks[32];
    fill_tokens(toks, 32, 3);
    pds_kv_seq_t kv, kv2, kv3;
    pds_kv_seq_init(&kv);
    pds_kv_seq_init(&kv2);
    pds_kv_seq_init(&kv3);
    cr_assert_eq(pds_kv_seq_grow(&kv, pool, 16, 4, NULL), PDS_OK);
    cr_assert_eq(pds_kv_seq_grow(&kv2, pool, 16, 4, NULL), PDS_OK);
    cr_assert_eq(pds_kv_seq_grow(&kv3, pool, 16, 4, NULL), PDS_OK);

    int32_t bad[4] = {1, 2, 272, 3};
    pds_engine_seq_t s = {.tokens = bad, .n_tokens = 4, .kv = &kv};
    expect_invalid(e, &s, 1, "token 2 (id 272) outside vocabulary of 272");
    bad[2] = -1;
    expect_invalid(e, &s, 1, "token 2 (id -1)");
    s = (pds_engine_seq_t){.tokens = toks, .n_tokens = 0, .kv = &kv};
    expect_invalid(e, &s, 1, "n_tokens 0");
    s = (pds_engine_seq_t){.tokens = toks, .n_tokens = 5, .kv = &kv};
    expect_invalid(e, &s, 1, "fewer than the 5 new");
    /* Table too small: claims 20 tokens but holds one block. */
    kv.n_tokens = 20;
    s = (pds_engine_seq_t){.tokens = toks, .n_tokens = 4, .kv = &kv};
    expect_invalid(e, &s, 1, "KV table has 1 blocks, 20 tokens need 2");
    kv.n_tokens = 4;
    /* Beyond the context. */
    int saved = kv.n_tokens;
    kv.n_tokens = 513;
    expect_invalid(e, &s, 1, "exceed the model's context of 512");
    kv.n_tokens = saved;
    /* Too many tokens / sequences. */
    pds_engine_seq_t two[3] = {{.tokens = toks, .n_tokens = 4, .kv = &kv},
                               {.tokens = toks, .n_tokens = 4, .kv = &kv2},
                               {.tokens = toks, .n_tokens = 4, .kv = &kv3}};
    expect_invalid(e, two, 3, "3 sequences exceed max_batch_seqs 2");
    pds_kv_seq_t big;
    pds_kv_seq_init(&big);
    cr_assert_eq(pds_kv_seq_grow(&big, pool, 16, 25, NULL), PDS_OK);
    s = (pds_engine_seq_t){.tokens = toks, .n_tokens = 25, .kv = &big};
    expect_invalid(e, &s, 1, "25 tokens exceed max_batch_tokens 24");
    two[1].kv = &kv;
    expect_invalid(e, two, 2, "seq 1: same KV table as seq 0");
    /* Sampling parameters. */
    pds_sample_params_t sp = pds_sample_default_params();
    sp.temperature = -1.0f;
    int32_t out;
    s = (pds_engine_seq_t){
        .tokens = toks, .n_tokens = 4, .kv = &kv, .sample = &sp, .token_out = &out};
    int calls = 0;
    cr_expect_eq(pds_engine_forward(e, &s, 1, count_layers, &calls), PDS_ERR_INVALID_ARG);
    cr_expect_eq(calls, 0);
    sp.temperature = 0.0f;
    s.token_out = NULL;
    expect_invalid(e, &s, 1, "without token_out");
    expect_invalid(e, &s, 0, "empty batch");
    /* A good call still works and sees every layer once. */
    s.token_out = &out;
    calls = 0;
    cr_expect_eq(pds_engine_forward(e, &s, 1, count_layers, &calls), PDS_OK);
    cr_expect_eq(calls, c.n_layers);

    /* Generator inputs. */
    pds_finish_reason_t why;
    int n;
    int32_t o[4];
    pds_gen_request_t r = request(toks, 0, 4);
    cr_expect_eq(pds_engine_generate(e, &r, o, &n, &why, NULL, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "empty prompt") != NULL);
    r = request(bad, 4, 4);
    cr_expect_eq(pds_engine_generate(e, &r, o, &n, &why, NULL, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "prompt token 2 (id -1)") != NULL, "%s", pds_err_detail());
    r = request(toks, 4, -1);
    cr_expect_eq(pds_engine_generate(e, &r, o, &n, &why, NULL, NULL), PDS_ERR_INVALID_ARG);
    r = request(toks, 4, 4);
    r.sample.top_p = 0.0f;
    cr_expect_eq(pds_engine_generate(e, &r, o, &n, &why, NULL, NULL), PDS_ERR_INVALID_ARG);
    r = request(toks, 4, 4);
    r.n_stop = 2;
    cr_expect_eq(pds_engine_generate(e, &r, o, &n, &why, NULL, NULL), PDS_ERR_INVALID_ARG);

    drop(e, &kv);
    drop(e, &kv2);
    drop(e, &kv3);
    drop(e, &big);
    pds_engine_destroy(e);
}

Test(engine, bad_params_and_unavailable_backend_are_rejected)
{
    pds_model_config_t c = tiny();
    pds_engine_params_t p = pds_engine_default_params();
    pds_engine_t *e = NULL;
    p.block_size = 0;
    cr_expect_eq(pds_engine_create_synth(&c, 1, &p, &e), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "block_size") != NULL);
    p = pds_engine_default_params();
    p.max_batch_seqs = 0;
    cr_expect_eq(pds_engine_create_synth(&c, 1, &p, &e), PDS_ERR_INVALID_ARG);
    pds_model_config_t bad = c;
    bad.n_heads = 3; /* not divisible by n_kv_heads */
    cr_expect_eq(pds_engine_create_synth(&bad, 1, NULL, &e), PDS_ERR_INVALID_ARG);
    cr_expect_null(e);

    char why[128] = "";
    if (!pds_engine_cuda_available(why, sizeof why) && strcmp(why, "built without CUDA") == 0) {
        p = pds_engine_default_params();
        p.backend = PDS_ENGINE_CUDA;
        cr_expect_eq(pds_engine_create_synth(&c, 1, &p, &e), PDS_ERR_UNSUPPORTED);
        cr_expect(strstr(pds_err_detail(), "without CUDA") != NULL, "%s", pds_err_detail());
    }
    pds_engine_destroy(NULL);
}

Test(engine, info_and_layer_memory_describe_the_pool)
{
    pds_engine_t *e = make_engine();
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    cr_expect_eq(info.backend, PDS_ENGINE_CPU);
    cr_expect_eq(info.kv.elem_size, 4);
    cr_expect_eq(info.kv_dtype, PDS_DTYPE_F32);
    cr_expect_eq(info.kv.block_size, 16);
    /* Default CPU pool: 4 sequences of min(max_context, 8192) tokens. */
    cr_expect_eq(info.kv.n_blocks, 512 * 4 / 16);
    cr_expect_eq(info.kv_tokens, 512 * 4);
    cr_expect_eq(info.kv_bytes, (int64_t)2 * 128 * 2 * 16 * 2 * 16 * 4);
    cr_expect_eq(info.model.vocab, 272);
    cr_expect_eq(pds_kv_pool_total(pds_engine_kv_pool(e)), 128);
    void *b0, *b1;
    size_t n0, n1;
    bool dev;
    cr_assert_eq(pds_engine_kv_layer_memory(e, 0, &b0, &n0, &dev), PDS_OK);
    cr_assert_eq(pds_engine_kv_layer_memory(e, 1, &b1, &n1, &dev), PDS_OK);
    cr_expect_not(dev);
    cr_expect_eq(n0, (size_t)128 * 2 * 16 * 2 * 16 * 4);
    cr_expect_eq((char *)b1 - (char *)b0, (ptrdiff_t)n0);
    cr_expect_eq(pds_engine_kv_layer_memory(e, 2, &b0, &n0, &dev), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_engine_layer_wait(e, 1), PDS_OK);
    pds_engine_destroy(e);

    pds_model_config_t c = tiny();
    pds_engine_params_t p = pds_engine_default_params();
    p.kv_tokens = 100;
    e = make_engine_cfg(&c, &p);
    pds_engine_info(e, &info);
    cr_expect_eq(info.kv.n_blocks, 7);
    pds_engine_destroy(e);
    p.n_kv_blocks = 3;
    e = make_engine_cfg(&c, &p);
    pds_engine_info(e, &info);
    cr_expect_eq(info.kv.n_blocks, 3);
    pds_engine_destroy(e);
}

/* on_layer: when layer l is reported, its K/V for the new token are in the pool and layer l+1's
 * are not yet. */
typedef struct {
    pds_engine_t *e;
    int32_t block;
    int slot, calls, ok;
} layer_probe_t;

static bool slot_written(pds_engine_t *e, int layer, int32_t block, int slot)
{
    void *base;
    size_t bytes;
    bool dev;
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    cr_assert_eq(pds_engine_kv_layer_memory(e, layer, &base, &bytes, &dev), PDS_OK);
    const float *k = (const float *)base + pds_kv_layout_offset(&info.kv, block, 0, slot, 0, 0);
    const float *v = (const float *)base + pds_kv_layout_offset(&info.kv, block, 1, slot, 0, 0);
    for (int i = 0; i < info.kv.n_kv_heads * info.kv.head_dim; i++)
        if (k[i] == 0.0f || v[i] == 0.0f) return false;
    return true;
}

static void probe_layer(void *ctx, int layer)
{
    layer_probe_t *p = ctx;
    cr_expect_eq(layer, p->calls, "layers in order");
    p->calls++;
    bool here = slot_written(p->e, layer, p->block, p->slot);
    bool next = layer + 1 < 2 && slot_written(p->e, layer + 1, p->block, p->slot);
    if (here && !next) p->ok++;
}

Test(engine, on_layer_reports_each_layer_after_its_kv_is_written)
{
    pds_engine_t *e = make_engine();
    int32_t toks[20];
    fill_tokens(toks, 20, 4);
    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    cr_assert_eq(pds_kv_seq_grow(&kv, pds_engine_kv_pool(e), 16, 20, NULL), PDS_OK);
    layer_probe_t p = {.e = e, .block = kv.blocks[1], .slot = 3};
    pds_engine_seq_t s = {.tokens = toks, .n_tokens = 20, .kv = &kv};
    cr_assert_eq(pds_engine_forward(e, &s, 1, probe_layer, &p), PDS_OK);
    cr_expect_eq(p.calls, 2);
    cr_expect_eq(p.ok, 2);
    drop(e, &kv);
    pds_engine_destroy(e);
}

static void prompt_logits(pds_engine_t *e, const int32_t *t, int n, float *logits)
{
    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    feed(e, &kv, t, n, logits);
    drop(e, &kv);
}

/* ---- an independent reference: the Llama forward written out in double precision -------------
 * Straight from the Hugging Face modeling code, reading the synthetic weights through
 * pds_model_synth_value by tensor index (so it also checks the backend's weight mapping: q/k/v and
 * gate/up stacking, tied lm_head), full causal attention over a plain K/V array, RoPE angles in
 * double. Shares no code with the engine. */
static double *ref_tensor(const pds_model_config_t *c, int t)
{
    char name[128];
    int64_t shape[2];
    int ndim, is_norm;
    float scale;
    cr_assert_eq(
        pds_model_synth_tensor_info(c, t, name, sizeof name, shape, &ndim, &scale, &is_norm),
        PDS_OK);
    int64_t n = ndim == 1 ? shape[0] : shape[0] * shape[1];
    double *w = malloc(sizeof(double) * n);
    for (int64_t i = 0; i < n; i++) w[i] = pds_model_synth_value(SEED, t, i, scale, is_norm);
    return w;
}

static void ref_rmsnorm(const double *x, const double *w, int n, double eps, double *y)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = w[i] * x[i] * inv;
}

/* y[rows] = W[rows, cols] . x[cols] */
static void ref_matvec(const double *w, const double *x, int rows, int cols, double *y)
{
    for (int r = 0; r < rows; r++) {
        double a = 0;
        for (int k = 0; k < cols; k++) a += w[(int64_t)r * cols + k] * x[k];
        y[r] = a;
    }
}

static void ref_inv_freq(const pds_model_config_t *c, double *f)
{
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        f[i] = 1.0 / pow(c->rope_theta, 2.0 * i / c->head_dim);
        if (c->rope_scaling != PDS_ROPE_SCALING_LLAMA3) continue;
        double old = c->rope_original_max_pos, wl = 2 * M_PI / f[i];
        double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
        if (wl > old / lo) {
            f[i] /= c->rope_factor;
        } else if (wl >= old / hi) {
            double sm = (old / wl - lo) / (hi - lo);
            f[i] = (1 - sm) * f[i] / c->rope_factor + sm * f[i];
        }
    }
}

static void ref_rope(double *v, int hd, int pos, const double *f)
{
    for (int i = 0; i < hd / 2; i++) {
        double a = pos * f[i], x0 = v[i], x1 = v[i + hd / 2];
        v[i] = x0 * cos(a) - x1 * sin(a);
        v[i + hd / 2] = x1 * cos(a) + x0 * sin(a);
    }
}

/* Logits [vocab] after the last of toks[0..n). */
static void ref_forward(const pds_model_config_t *c, const int32_t *toks, int n, double *logits)
{
    int H = c->hidden, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads, F = c->ffn;
    double *x = calloc((size_t)n * H, sizeof(double)), *xn = malloc(sizeof(double) * H);
    double *q = malloc(sizeof(double) * nh * hd), *att = malloc(sizeof(double) * nh * hd);
    double *K = malloc(sizeof(double) * n * nkv * hd), *V = malloc(sizeof(double) * n * nkv * hd);
    double *g = malloc(sizeof(double) * F), *u = malloc(sizeof(double) * F);
    double *tmp = malloc(sizeof(double) * H), *sc = malloc(sizeof(double) * n);
    double *f = malloc(sizeof(double) * hd);
    ref_inv_freq(c, f);
    double *emb = ref_tensor(c, 0);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < H; i++) x[(int64_t)t * H + i] = emb[(int64_t)toks[t] * H + i];
    for (int l = 0; l < c->n_layers; l++) {
        double *w[9];
        for (int k = 0; k < 9; k++) w[k] = ref_tensor(c, 3 + 9 * l + k);
        /* K/V of every token first (causal attention below only looks backwards). */
        for (int t = 0; t < n; t++) {
            ref_rmsnorm(x + (int64_t)t * H, w[0], H, c->norm_eps, xn);
            ref_matvec(w[2], xn, nkv * hd, H, K + (int64_t)t * nkv * hd);
            ref_matvec(w[3], xn, nkv * hd, H, V + (int64_t)t * nkv * hd);
            for (int j = 0; j < nkv; j++) ref_rope(K + ((int64_t)t * nkv + j) * hd, hd, t, f);
        }
        for (int t = 0; t < n; t++) {
            double *xt = x + (int64_t)t * H;
            ref_rmsnorm(xt, w[0], H, c->norm_eps, xn);
            ref_matvec(w[1], xn, nh * hd, H, q);
            for (int h = 0; h < nh; h++) {
                double *qh = q + h * hd;
                int kvh = h / (nh / nkv);
                ref_rope(qh, hd, t, f);
                double mx = -1e300, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double d = 0;
                    for (int e = 0; e < hd; e++) d += qh[e] * K[((int64_t)j * nkv + kvh) * hd + e];
                    sc[j] = d / sqrt((double)hd);
                    mx = fmax(mx, sc[j]);
                }
                for (int j = 0; j <= t; j++) sum += sc[j] = exp(sc[j] - mx);
                for (int e = 0; e < hd; e++) {
                    double a = 0;
                    for (int j = 0; j <= t; j++) a += sc[j] * V[((int64_t)j * nkv + kvh) * hd + e];
                    att[h * hd + e] = a / sum;
                }
            }
            ref_matvec(w[4], att, H, nh * hd, tmp);
            for (int i = 0; i < H; i++) xt[i] += tmp[i];
            ref_rmsnorm(xt, w[5], H, c->norm_eps, xn);
            ref_matvec(w[6], xn, F, H, g);
            ref_matvec(w[7], xn, F, H, u);
            for (int i = 0; i < F; i++) g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_matvec(w[8], g, H, F, tmp);
            for (int i = 0; i < H; i++) xt[i] += tmp[i];
        }
        for (int k = 0; k < 9; k++) free(w[k]);
    }
    double *nw = ref_tensor(c, 1), *head = c->tied_embeddings ? emb : ref_tensor(c, 2);
    ref_rmsnorm(x + (int64_t)(n - 1) * H, nw, H, c->norm_eps, xn);
    ref_matvec(head, xn, c->vocab, H, logits);
    if (head != emb) free(head);
    free(nw);
    free(emb);
    free(f);
    free(sc);
    free(tmp);
    free(u);
    free(g);
    free(V);
    free(K);
    free(att);
    free(q);
    free(xn);
    free(x);
}

Test(engine, logits_match_an_independent_double_precision_llama_forward)
{
    pds_model_config_t cfgs[3];
    cfgs[0] = tiny();
    cfgs[1] = tiny(); /* llama3 RoPE scaling with a short original context, so it bites */
    cfgs[1].rope_scaling = PDS_ROPE_SCALING_LLAMA3;
    cfgs[1].rope_factor = 8.0f;
    cfgs[1].rope_low_freq_factor = 1.0f;
    cfgs[1].rope_high_freq_factor = 4.0f;
    cfgs[1].rope_original_max_pos = 32;
    cfgs[2] = tiny(); /* tied embeddings, no GQA sharing, other theta */
    cfgs[2].tied_embeddings = true;
    cfgs[2].n_kv_heads = 4;
    cfgs[2].rope_theta = 500000.0f;
    int32_t toks[45];
    fill_tokens(toks, 45, 40);
    for (int k = 0; k < 3; k++) {
        pds_engine_t *e = make_engine_cfg(&cfgs[k], NULL);
        static const int lens[] = {1, 17, 45};
        for (size_t i = 0; i < PDS_ARRAY_LEN(lens); i++) {
            float got[272];
            double want[272];
            prompt_logits(e, toks, lens[i], got);
            ref_forward(&cfgs[k], toks, lens[i], want);
            double d = 0;
            for (int v = 0; v < 272; v++) d = fmax(d, fabs(got[v] - want[v]));
            cr_expect_lt(d, 1e-4, "config %d, %d tokens: max abs diff %g", k, lens[i], d);
        }
        pds_engine_destroy(e);
    }
}

static char *temp_dir(void)
{
    const char *root = getenv("PDS_TEST_TMP");
    if (!root || !*root) root = "/tmp";
    char cmd[512];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", root);
    cr_assert_eq(system(cmd), 0);
    char *dir = malloc(strlen(root) + 32);
    sprintf(dir, "%s/engine-XXXXXX", root);
    cr_assert_not_null(mkdtemp(dir));
    return dir;
}

static void remove_dir(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_expect_eq(system(cmd), 0);
}

Test(engine, loading_a_synthesized_file_gives_exactly_the_synthetic_logits)
{
    static const pds_dtype_t dts[] = {PDS_DTYPE_F32, PDS_DTYPE_BF16, PDS_DTYPE_F16};
    int32_t toks[21];
    fill_tokens(toks, 21, 8);
    for (size_t i = 0; i < PDS_ARRAY_LEN(dts); i++) {
        pds_model_config_t c = tiny();
        c.dtype = dts[i];
        char *dir = temp_dir();
        cr_assert_eq(pds_model_synth_write(&c, SEED, dir), PDS_OK, "%s", pds_err_detail());
        pds_model_t *m = NULL;
        cr_assert_eq(pds_model_load(dir, &m), PDS_OK, "%s", pds_err_detail());
        pds_engine_params_t p = pds_engine_default_params();
        p.n_threads = 1;
        pds_engine_t *ef = NULL;
        cr_assert_eq(pds_engine_create(m, &p, &ef), PDS_OK, "%s", pds_err_detail());
        pds_model_destroy(m); /* the engine keeps its own copy */
        pds_engine_t *es = make_engine_cfg(&c, NULL);
        float lf[272], ls[272];
        prompt_logits(ef, toks, 21, lf);
        prompt_logits(es, toks, 21, ls);
        cr_expect_arr_eq(lf, ls, sizeof lf, "dtype %s", pds_dtype_name(dts[i]));
        pds_engine_destroy(ef);
        pds_engine_destroy(es);
        remove_dir(dir);
        free(dir);
    }
    /* The dtype rounding matters: bf16 weights give different logits than f32 ones. */
    pds_model_config_t c32 = tiny(), c16 = tiny();
    c16.dtype = PDS_DTYPE_BF16;
    pds_engine_t *a = make_engine_cfg(&c32, NULL), *b = make_engine_cfg(&c16, NULL);
    float la[272], lb[272];
    prompt_logits(a, toks, 21, la);
    prompt_logits(b, toks, 21, lb);
    cr_expect_gt(max_abs_diff(la, lb, 272), 1e-5f);
    pds_engine_destroy(a);
    pds_engine_destroy(b);
}

Test(engine, blas_path_equals_naive_reference_loops)
{
    setenv("PDS_ENGINE_CPU_NAIVE", "1", 1);
    pds_engine_t *n = make_engine();
    unsetenv("PDS_ENGINE_CPU_NAIVE");
    pds_engine_t *f = make_engine();
    pds_engine_info_t in, inf;
    pds_engine_info(n, &in);
    pds_engine_info(f, &inf);
    cr_expect(strstr(in.device_name, "naive") != NULL, "%s", in.device_name);
    cr_expect(strstr(inf.device_name, "OpenBLAS") != NULL, "%s", inf.device_name);
    /* A mixed batch (prefill 70 + prefill 9) then a batched decode step. */
    int32_t a[70], b[9];
    fill_tokens(a, 70, 21);
    fill_tokens(b, 9, 22);
    float ln[2][272], lf[2][272];
    pds_engine_t *es[2] = {n, f};
    float(*outs[2])[272] = {ln, lf};
    for (int k = 0; k < 2; k++) {
        pds_kv_seq_t ka, kb;
        pds_kv_seq_init(&ka);
        pds_kv_seq_init(&kb);
        cr_assert_eq(pds_kv_seq_grow(&ka, pds_engine_kv_pool(es[k]), 16, 70, NULL), PDS_OK);
        cr_assert_eq(pds_kv_seq_grow(&kb, pds_engine_kv_pool(es[k]), 16, 9, NULL), PDS_OK);
        pds_engine_seq_t s[2] = {{.tokens = a, .n_tokens = 70, .kv = &ka},
                                 {.tokens = b, .n_tokens = 9, .kv = &kb}};
        cr_assert_eq(pds_engine_forward(es[k], s, 2, NULL, NULL), PDS_OK);
        cr_assert_eq(pds_kv_seq_grow(&ka, pds_engine_kv_pool(es[k]), 16, 1, NULL), PDS_OK);
        cr_assert_eq(pds_kv_seq_grow(&kb, pds_engine_kv_pool(es[k]), 16, 1, NULL), PDS_OK);
        s[0] = (pds_engine_seq_t){.tokens = &a[3], .n_tokens = 1, .kv = &ka, .logits = outs[k][0]};
        s[1] = (pds_engine_seq_t){.tokens = &b[3], .n_tokens = 1, .kv = &kb, .logits = outs[k][1]};
        cr_assert_eq(pds_engine_forward(es[k], s, 2, NULL, NULL), PDS_OK);
        drop(es[k], &ka);
        drop(es[k], &kb);
    }
    for (int i = 0; i < 2; i++) {
        float d = max_abs_diff(ln[i], lf[i], 272);
        cr_expect_lt(d, 1e-4f, "sequence %d: %g", i, (double)d);
    }
    pds_engine_destroy(n);
    pds_engine_destroy(f);
}

Test(engine, worker_threads_compute_the_same_as_one_thread)
{
    pds_model_config_t c = tiny();
    pds_engine_params_t p = pds_engine_default_params();
    p.n_threads = 3;
    pds_engine_t *one = make_engine(), *three = make_engine_cfg(&c, &p);
    pds_engine_info_t info;
    pds_engine_info(three, &info);
    cr_expect(strstr(info.device_name, "3 threads") != NULL, "%s", info.device_name);
    int32_t prompts[NB][40], a[NB][STEPS], b[NB][STEPS];
    float la[NB][272], lb[NB][272];
    for (int i = 0; i < NB; i++) {
        fill_tokens(prompts[i], batch_lens[i], 200 + i);
        run_alone(one, prompts[i], batch_lens[i], a[i], la[i]);
    }
    /* The threaded engine runs all four as one batch (prefill and decode). */
    pds_sample_params_t g = pds_sample_default_params();
    pds_kv_seq_t kv[NB];
    pds_engine_seq_t s[NB];
    for (int k = 0; k < STEPS; k++) {
        for (int i = 0; i < NB; i++) {
            if (k == 0) pds_kv_seq_init(&kv[i]);
            int n = k == 0 ? batch_lens[i] : 1;
            cr_assert_eq(pds_kv_seq_grow(&kv[i], pds_engine_kv_pool(three), 16, n, NULL), PDS_OK);
            s[i] = (pds_engine_seq_t){.tokens = k == 0 ? prompts[i] : &b[i][k - 1],
                                      .n_tokens = n,
                                      .kv = &kv[i],
                                      .sample = &g,
                                      .token_out = &b[i][k],
                                      .logits = k == STEPS - 1 ? lb[i] : NULL};
        }
        cr_assert_eq(pds_engine_forward(three, s, NB, NULL, NULL), PDS_OK);
    }
    for (int i = 0; i < NB; i++) {
        cr_expect_arr_eq(a[i], b[i], sizeof a[i], "sequence %d", i);
        cr_expect_lt(max_abs_diff(la[i], lb[i], 272), 1e-5f);
        drop(three, &kv[i]);
    }
    pds_engine_destroy(one);
    pds_engine_destroy(three);
}

Test(engine, llama3_rope_scaling_changes_long_range_logits_only_through_rope)
{
    /* Same weights; the small preset's llama3 scaling on the tiny shape. The first position has
     * angle 0 for every frequency, so one token gives identical logits; longer prompts differ. */
    pds_model_config_t c = tiny(), s = tiny();
    s.rope_scaling = PDS_ROPE_SCALING_LLAMA3;
    s.rope_factor = 8.0f;
    s.rope_low_freq_factor = 1.0f;
    s.rope_high_freq_factor = 4.0f;
    s.rope_original_max_pos = 64;
    pds_engine_t *a = make_engine_cfg(&c, NULL), *b = make_engine_cfg(&s, NULL);
    int32_t t[40];
    fill_tokens(t, 40, 30);
    float la[272], lb[272];
    prompt_logits(a, t, 1, la);
    prompt_logits(b, t, 1, lb);
    cr_expect_arr_eq(la, lb, sizeof la);
    prompt_logits(a, t, 40, la);
    prompt_logits(b, t, 40, lb);
    cr_expect_gt(max_abs_diff(la, lb, 272), 1e-4f);
    pds_engine_destroy(a);
    pds_engine_destroy(b);
}

Test(engine, allocation_failure_sweep_over_create_and_generate_leaks_nothing)
{
    pds_model_config_t c = tiny();
    pds_engine_params_t p = pds_engine_default_params();
    p.n_threads = 1;
    int32_t prompt[20], out[6];
    fill_tokens(prompt, 20, 2);
    bool done = false;
    int failures = 0;
    for (int64_t nth = 1; nth < 10000 && !done; nth++) {
        pds_alloc_stats_t before, after;
        pds_alloc_stats(&before);
        pds_alloc_fail_nth(nth);
        pds_engine_t *e = NULL;
        pds_status_t s = pds_engine_create_synth(&c, SEED, &p, &e);
        int n = 0;
        pds_finish_reason_t why;
        if (s == PDS_OK) {
            pds_gen_request_t r = request(prompt, 20, 6);
            s = pds_engine_generate(e, &r, out, &n, &why, NULL, NULL);
            if (s == PDS_OK)
                cr_expect_eq(n, 6);
            else
                cr_expect_eq(pds_kv_pool_free_count(pds_engine_kv_pool(e)),
                             pds_kv_pool_total(pds_engine_kv_pool(e)), "blocks freed on error");
        }
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        pds_engine_destroy(e);
        pds_alloc_stats(&after);
        cr_expect_eq(after.live_bytes, before.live_bytes, "leak at nth %lld", (long long)nth);
        cr_expect_eq(after.live_blocks, before.live_blocks);
        if (!hit) {
            cr_expect_eq(s, PDS_OK);
            done = true;
        } else {
            cr_expect_eq(s, PDS_ERR_NO_MEMORY, "nth %lld: %s", (long long)nth, pds_status_name(s));
            failures++;
        }
    }
    cr_expect(done);
    cr_expect_gt(failures, 5, "the sweep covered the constructor and the generator");
}

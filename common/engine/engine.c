/* engine.c: the backend-neutral half of the engine — parameter defaults, backend dispatch, the KV
 * block manager, input validation, KV export/import and the single-process reference generator.
 *
 * Everything a backend could get wrong on untrusted input is checked here, once, before any
 * backend runs: a forward either computes everything or rejects the batch with
 * PDS_ERR_INVALID_ARG and a detail naming the offending sequence and token, having touched
 * nothing. Backends can then assume ids in range, grown tables and respected limits.
 *
 * CPU pool sizing: params.n_kv_blocks if set, else params.kv_tokens / block_size (rounded up),
 * else room for 4 sequences of min(max_context, 8192) tokens — enough for tests and the demo
 * without asking a laptop for gigabytes. The CUDA backend sizes its pool from free GPU memory when
 * neither is given.
 */
#include "engine/engine_internal.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#define CPU_DEFAULT_SEQS    4
#define CPU_DEFAULT_CTX_CAP 8192

pds_engine_params_t pds_engine_default_params(void)
{
    return (pds_engine_params_t){
        .backend = PDS_ENGINE_CPU,
        .block_size = PDS_KV_DEFAULT_BLOCK_SIZE,
        .n_kv_blocks = 0,
        .kv_tokens = 0,
        .kv_mem_fraction = 0.9f,
        .max_batch_tokens = 8192,
        .max_batch_seqs = 256,
        .n_threads = 0,
        .device = 0,
    };
}

bool pds_engine_cuda_available(char *why, size_t why_cap)
{
#ifdef PDS_HAVE_CUDA
    return pds_engine_cuda_probe(why, why_cap);
#else
    if (why && why_cap) snprintf(why, why_cap, "built without CUDA");
    return false;
#endif
}

const char *pds_finish_reason_name(pds_finish_reason_t r)
{
    switch (r) {
    case PDS_FINISH_LENGTH:
        return "length";
    case PDS_FINISH_STOP:
        return "stop";
    case PDS_FINISH_CONTEXT:
        return "context";
    default:
        return "none";
    }
}

/* ---- create / destroy ---------------------------------------------------------------------------
 */

static pds_status_t validate_params(const pds_engine_params_t *p)
{
    if (p->backend != PDS_ENGINE_CPU && p->backend != PDS_ENGINE_CUDA)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: unknown backend %d", (int)p->backend);
    if (p->block_size < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: block_size %d must be >= 1", p->block_size);
    if (p->n_kv_blocks < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: n_kv_blocks %d must be >= 0", p->n_kv_blocks);
    if (p->kv_tokens < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: kv_tokens %lld must be >= 0",
                       (long long)p->kv_tokens);
    if (!(p->kv_mem_fraction > 0.0f && p->kv_mem_fraction <= 1.0f))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: kv_mem_fraction %g must be in (0, 1]",
                       (double)p->kv_mem_fraction);
    if (p->max_batch_tokens < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: max_batch_tokens %d must be >= 1",
                       p->max_batch_tokens);
    if (p->max_batch_seqs < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: max_batch_seqs %d must be >= 1",
                       p->max_batch_seqs);
    if (p->n_threads < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: n_threads %d must be >= 0", p->n_threads);
    return PDS_OK;
}

/* Pool size in blocks from the params; 0 = let the backend size it from memory (CUDA only). */
static pds_status_t pool_blocks(const pds_engine_params_t *p, const pds_model_config_t *c, int *out)
{
    int64_t blocks = 0;
    if (p->n_kv_blocks > 0)
        blocks = p->n_kv_blocks;
    else if (p->kv_tokens > 0)
        blocks = PDS_DIV_UP(p->kv_tokens, (int64_t)p->block_size);
    else if (p->backend == PDS_ENGINE_CPU)
        blocks =
            PDS_DIV_UP((int64_t)PDS_MIN(c->max_context, CPU_DEFAULT_CTX_CAP) * CPU_DEFAULT_SEQS,
                       (int64_t)p->block_size);
    if (blocks > INT_MAX)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: KV pool of %lld blocks is too large",
                       (long long)blocks);
    *out = (int)blocks;
    return PDS_OK;
}

static pds_status_t engine_create(const pds_model_config_t *cfg, const pds_model_t *model,
                                  uint64_t seed, const pds_engine_params_t *params,
                                  pds_engine_t **out)
{
    if (!out) return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: out is NULL");
    pds_engine_params_t p = params ? *params : pds_engine_default_params();
    PDS_TRY(validate_params(&p));
    PDS_TRY(pds_model_config_validate(cfg));
#ifndef PDS_HAVE_CUDA
    if (p.backend == PDS_ENGINE_CUDA)
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "engine: CUDA backend requested but pdserve was built without CUDA "
                       "(configure with -DPDS_CUDA=ON on a machine with nvcc)");
#endif
    int n_blocks = 0;
    PDS_TRY(pool_blocks(&p, cfg, &n_blocks));

    pds_engine_t *e = pds_calloc(1, sizeof *e);
    if (!e) return PDS_ERR(PDS_ERR_NO_MEMORY, "engine: state");
    e->params = p;
    e->cfg = *cfg;
    e->kv = (pds_kv_layout_t){
        .n_layers = cfg->n_layers,
        .n_blocks = n_blocks,
        .block_size = p.block_size,
        .n_kv_heads = cfg->n_kv_heads,
        .head_dim = cfg->head_dim,
        .elem_size = 0, /* set by the backend */
    };
    e->info.backend = p.backend;

    pds_status_t s;
#ifdef PDS_HAVE_CUDA
    if (p.backend == PDS_ENGINE_CUDA)
        s = pds_engine_cuda_init(e, model, seed);
    else
#endif
        s = pds_engine_cpu_init(e, model, seed);
    if (s != PDS_OK) goto fail_state;
    if (e->kv.n_blocks <= 0 || e->kv.elem_size <= 0) {
        s = PDS_ERR(PDS_ERR_INTERNAL, "engine: backend %s left pool %d blocks, elem size %d",
                    e->ops->name, e->kv.n_blocks, e->kv.elem_size);
        goto fail_backend;
    }
    s = pds_kv_pool_create(e->kv.n_blocks, &e->pool);
    if (s != PDS_OK) goto fail_backend;

    e->info.model = e->cfg;
    e->info.kv = e->kv;
    e->info.kv_tokens = (int64_t)e->kv.n_blocks * e->kv.block_size;
    e->info.max_batch_tokens = p.max_batch_tokens;
    e->info.max_batch_seqs = p.max_batch_seqs;
    *out = e;
    return PDS_OK;

fail_backend:
    e->ops->destroy(e);
fail_state:
    pds_free(e);
    return s;
}

pds_status_t pds_engine_create(const pds_model_t *model, const pds_engine_params_t *p,
                               pds_engine_t **out)
{
    if (!model) return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: model is NULL");
    return engine_create(pds_model_config(model), model, 0, p, out);
}

pds_status_t pds_engine_create_synth(const pds_model_config_t *cfg, uint64_t seed,
                                     const pds_engine_params_t *p, pds_engine_t **out)
{
    if (!cfg) return PDS_ERR(PDS_ERR_INVALID_ARG, "engine: config is NULL");
    return engine_create(cfg, NULL, seed, p, out);
}

void pds_engine_destroy(pds_engine_t *e)
{
    if (!e) return;
    pds_kv_pool_destroy(e->pool);
    if (e->ops) e->ops->destroy(e);
    pds_free(e);
}

void pds_engine_info(const pds_engine_t *e, pds_engine_info_t *out)
{
    *out = e->info;
}

pds_kv_pool_t *pds_engine_kv_pool(pds_engine_t *e)
{
    return e->pool;
}

/* ---- forward
 * -------------------------------------------------------------------------------------- */

/* Checks that seq's table covers its n_tokens with valid block ids. */
static pds_status_t check_table(const pds_engine_t *e, const pds_kv_seq_t *kv, int idx)
{
    int need = PDS_DIV_UP(kv->n_tokens, e->kv.block_size);
    if (kv->n_blocks < need || (need > 0 && !kv->blocks))
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "seq %d: KV table has %d blocks, %d tokens need %d (grow it with "
                       "pds_kv_seq_grow first)",
                       idx, kv->n_blocks, kv->n_tokens, need);
    for (int b = 0; b < need; b++)
        if (kv->blocks[b] < 0 || kv->blocks[b] >= e->kv.n_blocks)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "seq %d: KV block %d has id %d outside pool of %d",
                           idx, b, kv->blocks[b], e->kv.n_blocks);
    return PDS_OK;
}

static pds_status_t validate_batch(const pds_engine_t *e, const pds_engine_seq_t *seqs, int n)
{
    if (!seqs || n < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "forward: empty batch (%d sequences)", n);
    if (n > e->params.max_batch_seqs)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "forward: %d sequences exceed max_batch_seqs %d", n,
                       e->params.max_batch_seqs);
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        const pds_engine_seq_t *s = &seqs[i];
        if (s->n_tokens < 1 || !s->tokens)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "seq %d: n_tokens %d (must be >= 1 with tokens)", i,
                           s->n_tokens);
        if (!s->kv) return PDS_ERR(PDS_ERR_INVALID_ARG, "seq %d: no KV table", i);
        if (s->kv->n_tokens < s->n_tokens)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "seq %d: KV table counts %d tokens, fewer than the %d new ones (grow "
                           "it by n_tokens before the forward)",
                           i, s->kv->n_tokens, s->n_tokens);
        if (s->kv->n_tokens > e->cfg.max_context)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "seq %d: %d tokens exceed the model's context of %d", i, s->kv->n_tokens,
                           e->cfg.max_context);
        PDS_TRY(check_table(e, s->kv, i));
        for (int t = 0; t < s->n_tokens; t++)
            if (s->tokens[t] < 0 || s->tokens[t] >= e->cfg.vocab)
                return PDS_ERR(PDS_ERR_INVALID_ARG,
                               "seq %d: token %d (id %d) outside vocabulary of %d", i, t,
                               s->tokens[t], e->cfg.vocab);
        if (s->sample) {
            if (!s->token_out)
                return PDS_ERR(PDS_ERR_INVALID_ARG, "seq %d: sample params without token_out", i);
            PDS_TRY(pds_sample_params_validate(s->sample));
        }
        for (int j = 0; j < i; j++)
            if (seqs[j].kv == s->kv)
                return PDS_ERR(PDS_ERR_INVALID_ARG, "seq %d: same KV table as seq %d", i, j);
        total += s->n_tokens;
    }
    if (total > e->params.max_batch_tokens)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "forward: %lld tokens exceed max_batch_tokens %d",
                       (long long)total, e->params.max_batch_tokens);
    return PDS_OK;
}

pds_status_t pds_engine_forward(pds_engine_t *e, pds_engine_seq_t *seqs, int n_seqs,
                                pds_engine_layer_fn on_layer, void *ctx)
{
    if (!e) return PDS_ERR(PDS_ERR_INVALID_ARG, "forward: engine is NULL");
    PDS_TRY(validate_batch(e, seqs, n_seqs));
    return e->ops->forward(e, seqs, n_seqs, on_layer, ctx);
}

pds_status_t pds_engine_layer_wait(pds_engine_t *e, int layer)
{
    if (!e || layer < 0 || layer >= e->cfg.n_layers)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "layer_wait: layer %d outside 0..%d", layer,
                       e ? e->cfg.n_layers - 1 : -1);
    return e->ops->layer_wait(e, layer);
}

/* ---- KV export / import ------------------------------------------------------------------------
 */

size_t pds_engine_kv_export_bytes(const pds_engine_t *e, int n_blocks, pds_dtype_t dtype)
{
    if (n_blocks <= 0) return 0;
    return (size_t)e->kv.n_layers * (size_t)n_blocks * (size_t)pds_kv_block_elems(&e->kv) *
           pds_dtype_size(dtype);
}

/* Shared checks; *n_blocks gets the blocks covering seq->n_tokens, *bytes their export size. */
static pds_status_t kv_io_check(const pds_engine_t *e, const pds_kv_seq_t *seq, pds_dtype_t dtype,
                                const void *buf, const char *what, int *n_blocks, size_t *bytes)
{
    if (!e || !seq || !buf) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv %s: NULL argument", what);
    if (dtype != PDS_DTYPE_F32 && dtype != PDS_DTYPE_BF16)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv %s: dtype %d is not F32 or BF16", what, (int)dtype);
    if (seq->n_tokens < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv %s: sequence has no tokens", what);
    PDS_TRY(check_table(e, seq, 0));
    *n_blocks = PDS_DIV_UP(seq->n_tokens, e->kv.block_size);
    *bytes = pds_engine_kv_export_bytes(e, *n_blocks, dtype);
    return PDS_OK;
}

pds_status_t pds_engine_kv_export(pds_engine_t *e, const pds_kv_seq_t *seq, pds_dtype_t dtype,
                                  void *dst, size_t cap)
{
    int nb;
    size_t need;
    PDS_TRY(kv_io_check(e, seq, dtype, dst, "export", &nb, &need));
    if (cap < need)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv export: buffer of %zu bytes, %d blocks need %zu",
                       cap, nb, need);
    size_t per_layer = need / (size_t)e->kv.n_layers;
    for (int l = 0; l < e->kv.n_layers; l++)
        PDS_TRY(e->ops->kv_copy_out(e, l, nb, seq->blocks, dtype, (char *)dst + l * per_layer));
    return PDS_OK;
}

pds_status_t pds_engine_kv_import(pds_engine_t *e, const pds_kv_seq_t *seq, pds_dtype_t dtype,
                                  const void *src, size_t size)
{
    int nb;
    size_t need;
    PDS_TRY(kv_io_check(e, seq, dtype, src, "import", &nb, &need));
    if (size != need)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "kv import: %zu bytes given, %d blocks of this model in %s are %zu", size,
                       nb, pds_dtype_name(dtype), need);
    size_t per_layer = need / (size_t)e->kv.n_layers;
    for (int l = 0; l < e->kv.n_layers; l++)
        PDS_TRY(
            e->ops->kv_copy_in(e, l, nb, seq->blocks, dtype, (const char *)src + l * per_layer));
    return PDS_OK;
}

pds_status_t pds_engine_kv_layer_memory(pds_engine_t *e, int layer, void **base, size_t *bytes,
                                        bool *on_device)
{
    if (!e || !base || !bytes || !on_device)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv_layer_memory: NULL argument");
    if (layer < 0 || layer >= e->kv.n_layers)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv_layer_memory: layer %d outside 0..%d", layer,
                       e->kv.n_layers - 1);
    return e->ops->kv_layer_memory(e, layer, base, bytes, on_device);
}

/* ---- reference generator
 * ------------------------------------------------------------------------- */

static pds_status_t validate_request(const pds_engine_t *e, const pds_gen_request_t *r,
                                     const int32_t *out, const int *n_out,
                                     const pds_finish_reason_t *why)
{
    if (!r || !n_out || !why) return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: NULL argument");
    if (!r->prompt || r->n_prompt < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: empty prompt (%d tokens)", r->n_prompt);
    if (r->n_prompt > e->cfg.max_context)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: prompt of %d tokens exceeds context of %d",
                       r->n_prompt, e->cfg.max_context);
    if (r->max_new_tokens < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: max_new_tokens %d < 0", r->max_new_tokens);
    if (r->max_new_tokens > 0 && !out)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: no output buffer");
    if (r->n_stop < 0 || (r->n_stop > 0 && !r->stop))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: %d stop ids without an array", r->n_stop);
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= e->cfg.vocab)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "generate: prompt token %d (id %d) outside vocabulary of %d", i,
                           r->prompt[i], e->cfg.vocab);
    return pds_sample_params_validate(&r->sample);
}

/* Prefills the prompt in chunks of at most max_batch_tokens; the last chunk samples *tok. */
static pds_status_t gen_prefill(pds_engine_t *e, const pds_gen_request_t *r, pds_kv_seq_t *kv,
                                int32_t *tok)
{
    int done = 0;
    while (done < r->n_prompt) {
        int n = PDS_MIN(r->n_prompt - done, e->params.max_batch_tokens);
        bool last = done + n == r->n_prompt;
        PDS_TRY(pds_kv_seq_grow(kv, e->pool, e->kv.block_size, n, NULL));
        pds_engine_seq_t s = {
            .tokens = r->prompt + done,
            .n_tokens = n,
            .kv = kv,
            .sample = last ? &r->sample : NULL,
            .token_out = last ? tok : NULL,
        };
        PDS_TRY(pds_engine_forward(e, &s, 1, NULL, NULL));
        done += n;
    }
    return PDS_OK;
}

pds_status_t pds_engine_generate(pds_engine_t *e, const pds_gen_request_t *req, int32_t *out,
                                 int *n_out, pds_finish_reason_t *why, pds_engine_token_fn on_token,
                                 void *ctx)
{
    if (!e) return PDS_ERR(PDS_ERR_INVALID_ARG, "generate: engine is NULL");
    PDS_TRY(validate_request(e, req, out, n_out, why));
    int n = 0;
    pds_finish_reason_t fin = PDS_FINISH_NONE;
    if (req->max_new_tokens == 0) fin = PDS_FINISH_LENGTH;
    /* The sequence (prompt + output) never exceeds the context: a prompt that fills it leaves no
     * room for output k at position n_prompt + k. */
    else if (req->n_prompt >= e->cfg.max_context)
        fin = PDS_FINISH_CONTEXT;
    if (fin != PDS_FINISH_NONE) {
        *n_out = 0;
        *why = fin;
        return PDS_OK;
    }

    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    int32_t tok = -1;
    pds_status_t s = gen_prefill(e, req, &kv, &tok);
    while (s == PDS_OK) {
        out[n] = tok;
        if (on_token) on_token(ctx, tok, n);
        n++;
        if (pds_sample_is_stop(tok, req->stop, req->n_stop) ||
            (!req->ignore_eos && tok == e->cfg.eos_id)) {
            fin = PDS_FINISH_STOP;
            break;
        }
        if (n == req->max_new_tokens) {
            fin = PDS_FINISH_LENGTH;
            break;
        }
        if (req->n_prompt + n >= e->cfg.max_context) {
            fin = PDS_FINISH_CONTEXT;
            break;
        }
        /* Feed output n-1 (position n_prompt + n - 1); sample output n at n_prompt + n. */
        s = pds_kv_seq_grow(&kv, e->pool, e->kv.block_size, 1, NULL);
        if (s != PDS_OK) break;
        int32_t in = tok;
        pds_engine_seq_t sq = {
            .tokens = &in, .n_tokens = 1, .kv = &kv, .sample = &req->sample, .token_out = &tok};
        s = pds_engine_forward(e, &sq, 1, NULL, NULL);
    }
    pds_kv_seq_release(&kv, e->pool);
    pds_kv_seq_fini(&kv);
    if (s != PDS_OK) return s;
    *n_out = n;
    *why = fin;
    return PDS_OK;
}

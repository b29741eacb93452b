/* cpu_backend.c: the CPU reference backend — fp32 weights, an fp32 KV pool in the layout of
 * kv/kv.h, and a batched Llama forward pass that every other backend is tested against.
 *
 * A forward gathers all new tokens of the batch, whatever sequence they belong to, into one
 * [T, hidden] activation matrix, so each linear layer is a single GEMM over the whole batch (the
 * property that makes batching pay); only attention works per sequence, because each sequence
 * attends to its own cached tokens through its own block table. lm_head runs only on each
 * sequence's last new token. Weights are widened to fp32 once at creation (from the file's dtype,
 * or from pds_model_synth_value rounded to cfg.dtype exactly as pds_model_synth_write stores it),
 * so a synthesized engine and one loaded from a synthesized file compute bit-identical logits.
 * q/k/v and gate/up are stored stacked so each pair is one GEMM.
 *
 * Threads: the engine's own pool (cpu_pool.c) splits each GEMM by output columns (each thread
 * streams its share of the weights, which is what bandwidth-bound decode needs), attention by
 * (sequence, KV head), and norms by rows; every item writes disjoint memory, so the result does not
 * depend on the thread count beyond BLAS blocking. OpenBLAS is set to one thread (process-wide).
 */
#include "engine/cpu/cpu_internal.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- weights -----------------------------------------------------------------------------------
 */

/* Destination of synthetic tensor t (index order of model.h) and its expected element count. */
static float *synth_dst(const pds_model_config_t *c, cpu_impl_t *im, int t, int64_t *numel)
{
    int64_t H = c->hidden, q = (int64_t)c->n_heads * c->head_dim;
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim, F = c->ffn;
    if (t == 0) return *numel = (int64_t)c->vocab * H, im->embed;
    if (t == 1) return *numel = H, im->final_norm;
    if (t == 2) return *numel = (int64_t)c->vocab * H, im->lm_head;
    int l = (t - 3) / 9, k = (t - 3) % 9;
    cpu_layer_t *L = &im->layers[l];
    switch (k) {
    case 0:
        return *numel = H, L->attn_norm;
    case 1:
        return *numel = q * H, L->wqkv;
    case 2:
        return *numel = kvd * H, L->wqkv + q * H;
    case 3:
        return *numel = kvd * H, L->wqkv + (q + kvd) * H;
    case 4:
        return *numel = H * q, L->wo;
    case 5:
        return *numel = H, L->ffn_norm;
    case 6:
        return *numel = F * H, L->w_gu;
    case 7:
        return *numel = F * H, L->w_gu + F * H;
    default:
        return *numel = H * F, L->w_down;
    }
}

static float round_to_dtype(float v, pds_dtype_t dt)
{
    if (dt == PDS_DTYPE_BF16) return pds_bf16_to_f32(pds_f32_to_bf16(v));
    if (dt == PDS_DTYPE_F16) return pds_f16_to_f32(pds_f32_to_f16(v));
    return v;
}

static pds_status_t fill_synth(const pds_model_config_t *c, cpu_impl_t *im, uint64_t seed)
{
    int n = 3 + 9 * c->n_layers;
    for (int t = 0; t < n; t++) {
        if (t == 2 && c->tied_embeddings) continue; /* lm_head is the embedding */
        char name[128];
        int64_t shape[2] = {0, 0}, want;
        int ndim = 0, is_norm = 0;
        float scale = 0.0f;
        PDS_TRY(
            pds_model_synth_tensor_info(c, t, name, sizeof name, shape, &ndim, &scale, &is_norm));
        float *dst = synth_dst(c, im, t, &want);
        int64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
        if (numel != want)
            return PDS_ERR(PDS_ERR_INTERNAL, "synthetic tensor %s has %lld elements, expected %lld",
                           name, (long long)numel, (long long)want);
        for (int64_t i = 0; i < numel; i++)
            dst[i] = round_to_dtype(pds_model_synth_value(seed, t, i, scale, is_norm), c->dtype);
    }
    return PDS_OK;
}

static pds_status_t copy_tensor(const pds_tensor_view_t *v, const char *what, int layer,
                                int64_t want, float *dst)
{
    if (!v || !v->data || v->numel != want)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "model tensor %s (layer %d) has %lld elements, expected %lld", what, layer,
                       v ? (long long)v->numel : -1LL, (long long)want);
    pds_tensor_to_f32(v, 0, want, dst);
    return PDS_OK;
}

static pds_status_t fill_model(const pds_model_config_t *c, cpu_impl_t *im, const pds_model_t *m)
{
    int64_t H = c->hidden, q = (int64_t)c->n_heads * c->head_dim;
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim, F = c->ffn, V = c->vocab;
    PDS_TRY(copy_tensor(pds_model_embed(m), "embed", -1, V * H, im->embed));
    PDS_TRY(copy_tensor(pds_model_final_norm(m), "final_norm", -1, H, im->final_norm));
    if (!c->tied_embeddings)
        PDS_TRY(copy_tensor(pds_model_lm_head(m), "lm_head", -1, V * H, im->lm_head));
    for (int l = 0; l < c->n_layers; l++) {
        const pds_layer_weights_t *w = pds_model_layer(m, l);
        cpu_layer_t *L = &im->layers[l];
        if (!w) return PDS_ERR(PDS_ERR_INVALID_ARG, "model has no layer %d", l);
        PDS_TRY(copy_tensor(&w->attn_norm, "attn_norm", l, H, L->attn_norm));
        PDS_TRY(copy_tensor(&w->wq, "wq", l, q * H, L->wqkv));
        PDS_TRY(copy_tensor(&w->wk, "wk", l, kvd * H, L->wqkv + q * H));
        PDS_TRY(copy_tensor(&w->wv, "wv", l, kvd * H, L->wqkv + (q + kvd) * H));
        PDS_TRY(copy_tensor(&w->wo, "wo", l, H * q, L->wo));
        PDS_TRY(copy_tensor(&w->ffn_norm, "ffn_norm", l, H, L->ffn_norm));
        PDS_TRY(copy_tensor(&w->w_gate, "w_gate", l, F * H, L->w_gu));
        PDS_TRY(copy_tensor(&w->w_up, "w_up", l, F * H, L->w_gu + F * H));
        PDS_TRY(copy_tensor(&w->w_down, "w_down", l, H * F, L->w_down));
    }
    return PDS_OK;
}

/* Floats in the single weight allocation. */
static int64_t weights_count(const pds_model_config_t *c)
{
    int64_t H = c->hidden, q = (int64_t)c->n_heads * c->head_dim;
    int64_t qkv = q + 2LL * c->n_kv_heads * c->head_dim, F = c->ffn, V = c->vocab;
    int64_t per_layer = H + qkv * H + H * q + H + 2 * F * H + H * F;
    return V * H + H + (c->tied_embeddings ? 0 : V * H) + c->n_layers * per_layer;
}

/* Carves the single weight allocation into tensors (same order as weights_count). */
static void layout_weights(const pds_model_config_t *c, cpu_impl_t *im)
{
    int64_t H = c->hidden, q = (int64_t)c->n_heads * c->head_dim;
    int64_t qkv = q + 2LL * c->n_kv_heads * c->head_dim, F = c->ffn, V = c->vocab;
    float *p = im->weights;
    im->embed = p, p += V * H;
    im->final_norm = p, p += H;
    if (c->tied_embeddings) {
        im->lm_head = im->embed;
    } else {
        im->lm_head = p, p += V * H;
    }
    for (int l = 0; l < c->n_layers; l++) {
        cpu_layer_t *L = &im->layers[l];
        L->attn_norm = p, p += H;
        L->wqkv = p, p += qkv * H;
        L->wo = p, p += H * q;
        L->ffn_norm = p, p += H;
        L->w_gu = p, p += 2 * F * H;
        L->w_down = p, p += H * F;
    }
    PDS_ASSERT(p - im->weights == weights_count(c));
}

/* ---- backend ops -------------------------------------------------------------------------------
 */

static void cpu_destroy(pds_engine_t *e)
{
    cpu_impl_t *im = e->impl;
    if (!im) return;
    pds_engine_cpu_pool_destroy(im->pool);
    pds_free(im->sample_scratch);
    pds_free(im->ws);
    pds_free(im->kv);
    pds_free(im->inv_freq);
    pds_free(im->layers);
    pds_free(im->weights);
    pds_free(im);
    e->impl = NULL;
}

/* Workspace for a forward of T tokens in n sequences, the longest having ctx tokens. */
typedef struct {
    float *x;       /* [T, hidden] residual stream */
    float *xn;      /* [T, hidden] normed input of a sublayer; first n rows reused for the head */
    float *qkv;     /* [T, (n_heads + 2*n_kv_heads) * head_dim] */
    float *att;     /* [T, n_heads * head_dim] attention output */
    float *gu;      /* [T, 2*ffn] gate | up, then silu(gate)*up over the gate half */
    float *rope;    /* [T, head_dim] cos (first half) and sin (second half) per token */
    float *scratch; /* [n_threads, attention scratch for ctx] */
    float *last;    /* [n, hidden] last new token of each sequence */
    float *logits;  /* [n, vocab] */
    int *first;     /* [n] index of each sequence's first new token in the T rows */
    size_t scratch_stride; /* floats per thread in scratch */
} cpu_ws_t;

static size_t ws_layout(const pds_model_config_t *c, int n_threads, int T, int n, int ctx,
                        char *base, cpu_ws_t *w)
{
    size_t qkv = (size_t)(c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    w->scratch_stride = PDS_DIV_UP(pds_engine_cpu_attention_scratch(ctx, c->head_dim), 16) * 16;
    size_t sizes[10] = {
        (size_t)T * c->hidden * sizeof(float),
        (size_t)T * c->hidden * sizeof(float),
        (size_t)T * qkv * sizeof(float),
        (size_t)T * c->n_heads * c->head_dim * sizeof(float),
        (size_t)T * 2 * c->ffn * sizeof(float),
        (size_t)T * c->head_dim * sizeof(float),
        (size_t)n_threads * w->scratch_stride * sizeof(float),
        (size_t)n * c->hidden * sizeof(float),
        (size_t)n * c->vocab * sizeof(float),
        (size_t)n * sizeof(int),
    };
    void **slots[10] = {(void **)&w->x,       (void **)&w->xn,   (void **)&w->qkv,
                        (void **)&w->att,     (void **)&w->gu,   (void **)&w->rope,
                        (void **)&w->scratch, (void **)&w->last, (void **)&w->logits,
                        (void **)&w->first};
    size_t off = 0;
    for (int i = 0; i < 10; i++) {
        if (base) *slots[i] = base + off;
        off += PDS_DIV_UP(sizes[i], 64) * 64; /* keep every buffer 64-byte aligned */
    }
    return off;
}

/* ---- parallel pieces: each is one pds_engine_cpu_pool_run over independent items ------------- */

typedef struct {
    int m, n, k, ldx, ldy, chunk;
    const float *x, *w;
    float *y;
    bool acc;
} mm_job_t;

static void mm_item(void *arg, int item, int thread)
{
    const mm_job_t *j = arg;
    int n0 = item * j->chunk, n1 = PDS_MIN(j->n, n0 + j->chunk);
    pds_engine_cpu_matmul(false, j->m, n1 - n0, j->k, j->x, j->ldx, j->w + (size_t)n0 * j->k,
                          j->y + n0, j->ldy, j->acc);
}

/* y[m, n] (+)= x[m, k] . w[n, k]^T, split by output columns: each thread streams its own rows of
 * w, which is what decode (small m, weight-bandwidth bound) needs. */
static void matmul(cpu_impl_t *im, int m, int n, int k, const float *x, int ldx, const float *w,
                   float *y, int ldy, bool acc)
{
    if (im->naive) {
        pds_engine_cpu_matmul(true, m, n, k, x, ldx, w, y, ldy, acc);
        return;
    }
    int parts = PDS_MIN(im->n_threads * 4, PDS_DIV_UP(n, 64));
    int chunk = PDS_DIV_UP(PDS_DIV_UP(n, parts), 16) * 16;
    mm_job_t j = {m, n, k, ldx, ldy, chunk, x, w, y, acc};
    pds_engine_cpu_pool_run(im->pool, PDS_DIV_UP(n, chunk), mm_item, &j);
}

typedef struct {
    int rows_per, m, n;
    const float *x, *w;
    float *y;
    float eps;
} rows_job_t;

static void rmsnorm_item(void *arg, int item, int thread)
{
    const rows_job_t *j = arg;
    int r0 = item * j->rows_per, r1 = PDS_MIN(j->m, r0 + j->rows_per);
    pds_engine_cpu_rmsnorm(r1 - r0, j->n, j->x + (size_t)r0 * j->n, j->w, j->eps,
                           j->y + (size_t)r0 * j->n);
}

static void swiglu_item(void *arg, int item, int thread)
{
    const rows_job_t *j = arg;
    int r0 = item * j->rows_per, r1 = PDS_MIN(j->m, r0 + j->rows_per);
    pds_engine_cpu_swiglu(r1 - r0, j->n, j->y + (size_t)r0 * 2 * j->n, 2 * j->n);
}

static void rows_run(cpu_impl_t *im, cpu_pool_fn fn, rows_job_t *j)
{
    int parts = PDS_MIN(j->m, im->n_threads * 2);
    j->rows_per = PDS_DIV_UP(j->m, parts);
    pds_engine_cpu_pool_run(im->pool, PDS_DIV_UP(j->m, j->rows_per), fn, j);
}

typedef struct {
    cpu_impl_t *im;
    const pds_engine_t *e;
    const pds_engine_seq_t *seqs;
    const cpu_ws_t *w;
    const float *pool;
} attn_job_t;

static void attn_item(void *arg, int item, int thread)
{
    const attn_job_t *j = arg;
    const pds_model_config_t *c = &j->e->cfg;
    int s = item / c->n_kv_heads, g = item % c->n_kv_heads;
    int QKV = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim, QD = c->n_heads * c->head_dim;
    int t = j->w->first[s];
    pds_engine_cpu_attn_t a = {
        .kv = &j->e->kv,
        .pool_layer = j->pool,
        .blocks = j->seqs[s].kv->blocks,
        .ctx = j->seqs[s].kv->n_tokens,
        .n_new = j->seqs[s].n_tokens,
        .n_heads = c->n_heads,
        .q = j->w->qkv + (size_t)t * QKV,
        .q_stride = QKV,
        .out = j->w->att + (size_t)t * QD,
        .out_stride = QD,
    };
    pds_engine_cpu_attention(j->im->naive, &a, g,
                             j->w->scratch + (size_t)thread * j->w->scratch_stride);
}

static pds_status_t cpu_forward(pds_engine_t *e, pds_engine_seq_t *seqs, int n_seqs,
                                pds_engine_layer_fn on_layer, void *ctx)
{
    cpu_impl_t *im = e->impl;
    const pds_model_config_t *c = &e->cfg;
    const pds_kv_layout_t *kvl = &e->kv;
    int T = 0, max_ctx = 0;
    for (int s = 0; s < n_seqs; s++) {
        T += seqs[s].n_tokens;
        max_ctx = PDS_MAX(max_ctx, seqs[s].kv->n_tokens);
    }
    cpu_ws_t w;
    size_t need = ws_layout(c, im->n_threads, T, n_seqs, max_ctx, NULL, &w);
    if (need > im->ws_bytes) {
        pds_free(im->ws);
        im->ws_bytes = 0;
        im->ws = pds_malloc(need);
        if (!im->ws)
            return PDS_ERR(PDS_ERR_NO_MEMORY, "cpu engine: %zu bytes of workspace for %d tokens",
                           need, T);
        im->ws_bytes = need;
        e->info.workspace_bytes = (int64_t)need;
    }
    ws_layout(c, im->n_threads, T, n_seqs, max_ctx, im->ws, &w);

    const int H = c->hidden, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    const int QKV = (nh + 2 * nkv) * hd, QD = nh * hd, F = c->ffn, V = c->vocab;
    const int bs = kvl->block_size;

    /* Embedding and the per-token RoPE angles (the same for every layer). */
    for (int s = 0, t = 0; s < n_seqs; s++) {
        int n_past = seqs[s].kv->n_tokens - seqs[s].n_tokens;
        w.first[s] = t;
        for (int i = 0; i < seqs[s].n_tokens; i++, t++) {
            memcpy(w.x + (size_t)t * H, im->embed + (size_t)seqs[s].tokens[i] * H,
                   (size_t)H * sizeof(float));
            float *r = w.rope + (size_t)t * hd;
            pds_engine_cpu_rope_table(n_past + i, hd, im->inv_freq, r, r + hd / 2);
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        const cpu_layer_t *L = &im->layers[l];
        float *pool = im->kv + (size_t)l * im->kv_layer_elems;
        rows_job_t rj = {
            .m = T, .n = H, .x = w.x, .w = L->attn_norm, .y = w.xn, .eps = c->norm_eps};

        rows_run(im, rmsnorm_item, &rj);
        matmul(im, T, QKV, H, w.xn, H, L->wqkv, w.qkv, QKV, false);

        /* RoPE on q and k heads, then K/V of every new token into its block slot. */
        for (int s = 0, t = 0; s < n_seqs; s++) {
            const pds_kv_seq_t *kv = seqs[s].kv;
            int n_past = kv->n_tokens - seqs[s].n_tokens;
            for (int i = 0; i < seqs[s].n_tokens; i++, t++) {
                float *row = w.qkv + (size_t)t * QKV;
                const float *r = w.rope + (size_t)t * hd;
                for (int h = 0; h < nh + nkv; h++)
                    pds_engine_cpu_rope(row + (size_t)h * hd, hd, r, r + hd / 2);
                int pos = n_past + i, blk = kv->blocks[pos / bs], slot = pos % bs;
                for (int g = 0; g < nkv; g++) {
                    memcpy(pool + pds_kv_layout_offset(kvl, blk, 0, slot, g, 0),
                           row + (size_t)(nh + g) * hd, (size_t)hd * sizeof(float));
                    memcpy(pool + pds_kv_layout_offset(kvl, blk, 1, slot, g, 0),
                           row + (size_t)(nh + nkv + g) * hd, (size_t)hd * sizeof(float));
                }
            }
        }
        if (on_layer) on_layer(ctx, l);

        attn_job_t aj = {im, e, seqs, &w, pool};
        pds_engine_cpu_pool_run(im->pool, n_seqs * nkv, attn_item, &aj);

        /* x += att . wo^T;  x += down(silu(gate) * up) */
        matmul(im, T, H, QD, w.att, QD, L->wo, w.x, H, true);
        rj.w = L->ffn_norm;
        rows_run(im, rmsnorm_item, &rj);
        matmul(im, T, 2 * F, H, w.xn, H, L->w_gu, w.gu, 2 * F, false);
        rows_job_t sj = {.m = T, .n = F, .y = w.gu};
        rows_run(im, swiglu_item, &sj);
        matmul(im, T, H, F, w.gu, 2 * F, L->w_down, w.x, H, true);
    }

    /* Head: final norm and lm_head for each sequence's last new token only. */
    for (int s = 0; s < n_seqs; s++)
        memcpy(w.last + (size_t)s * H, w.x + (size_t)(w.first[s] + seqs[s].n_tokens - 1) * H,
               (size_t)H * sizeof(float));
    pds_engine_cpu_rmsnorm(n_seqs, H, w.last, im->final_norm, c->norm_eps, w.xn);
    matmul(im, n_seqs, V, H, w.xn, H, im->lm_head, w.logits, V, false);
    for (int s = 0; s < n_seqs; s++) {
        const float *lg = w.logits + (size_t)s * V;
        if (seqs[s].logits) memcpy(seqs[s].logits, lg, (size_t)V * sizeof(float));
        if (seqs[s].sample && seqs[s].token_out) {
            int32_t tok =
                pds_sample_token(seqs[s].sample, lg, V, seqs[s].kv->n_tokens, im->sample_scratch);
            if (tok < 0)
                return PDS_ERR(PDS_ERR_INTERNAL, "cpu engine: sampler failed for sequence %d", s);
            *seqs[s].token_out = tok;
        }
    }
    return PDS_OK;
}

static pds_status_t cpu_layer_wait(pds_engine_t *e, int layer)
{
    return PDS_OK; /* the CPU forward is synchronous */
}

static pds_status_t cpu_kv_copy_out(pds_engine_t *e, int layer, int n, const int32_t *ids,
                                    pds_dtype_t dtype, void *dst)
{
    cpu_impl_t *im = e->impl;
    int64_t be = pds_kv_block_elems(&e->kv);
    const float *pool = im->kv + (size_t)layer * im->kv_layer_elems;
    for (int i = 0; i < n; i++) {
        const float *src = pool + (size_t)ids[i] * be;
        if (dtype == PDS_DTYPE_F32) {
            memcpy((float *)dst + (size_t)i * be, src, (size_t)be * sizeof(float));
        } else {
            uint16_t *d = (uint16_t *)dst + (size_t)i * be;
            for (int64_t j = 0; j < be; j++)
                d[j] = dtype == PDS_DTYPE_BF16 ? pds_f32_to_bf16(src[j]) : pds_f32_to_f16(src[j]);
        }
    }
    return PDS_OK;
}

static pds_status_t cpu_kv_copy_in(pds_engine_t *e, int layer, int n, const int32_t *ids,
                                   pds_dtype_t dtype, const void *src)
{
    cpu_impl_t *im = e->impl;
    int64_t be = pds_kv_block_elems(&e->kv);
    float *pool = im->kv + (size_t)layer * im->kv_layer_elems;
    for (int i = 0; i < n; i++) {
        float *d = pool + (size_t)ids[i] * be;
        if (dtype == PDS_DTYPE_F32) {
            memcpy(d, (const float *)src + (size_t)i * be, (size_t)be * sizeof(float));
        } else {
            const uint16_t *s = (const uint16_t *)src + (size_t)i * be;
            for (int64_t j = 0; j < be; j++)
                d[j] = dtype == PDS_DTYPE_BF16 ? pds_bf16_to_f32(s[j]) : pds_f16_to_f32(s[j]);
        }
    }
    return PDS_OK;
}

static pds_status_t cpu_kv_layer_memory(pds_engine_t *e, int layer, void **base, size_t *bytes,
                                        bool *on_device)
{
    cpu_impl_t *im = e->impl;
    *base = im->kv + (size_t)layer * im->kv_layer_elems;
    *bytes = im->kv_layer_elems * sizeof(float);
    *on_device = false;
    return PDS_OK;
}

static const pds_engine_ops_t cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .forward = cpu_forward,
    .layer_wait = cpu_layer_wait,
    .kv_copy_out = cpu_kv_copy_out,
    .kv_copy_in = cpu_kv_copy_in,
    .kv_layer_memory = cpu_kv_layer_memory,
};

pds_status_t pds_engine_cpu_init(pds_engine_t *e, const pds_model_t *model, uint64_t seed)
{
    const pds_model_config_t *c = &e->cfg;
    if (e->kv.n_blocks <= 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "cpu engine: KV pool of %d blocks", e->kv.n_blocks);
    cpu_impl_t *im = pds_calloc(1, sizeof *im);
    if (!im) return PDS_ERR(PDS_ERR_NO_MEMORY, "cpu engine: state");
    e->impl = im;
    e->ops = &cpu_ops;

    const char *naive = getenv("PDS_ENGINE_CPU_NAIVE");
    im->naive = naive && *naive && strcmp(naive, "0") != 0;
    im->n_threads =
        e->params.n_threads > 0 ? e->params.n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (im->n_threads < 1 || im->naive) im->n_threads = 1;
    /* Parallelism is ours (cpu_pool.c); OpenBLAS runs single-threaded inside each item. Its
     * thread count is process-wide, so this holds for every engine in the process. */
    openblas_set_num_threads(1);

    pds_status_t s = PDS_OK;
    e->kv.elem_size = (int)sizeof(float);
    int64_t n_weights = weights_count(c);
    im->kv_layer_elems = (size_t)pds_kv_layer_bytes(&e->kv) / sizeof(float);
    size_t kv_elems = im->kv_layer_elems * (size_t)c->n_layers;
    im->weights = pds_malloc((size_t)n_weights * sizeof(float));
    im->layers = pds_calloc((size_t)c->n_layers, sizeof(cpu_layer_t));
    im->inv_freq = pds_malloc((size_t)(c->head_dim / 2 + 1) * sizeof(float));
    /* Zeroed so that exported slots past a sequence's last token are deterministic. */
    im->kv = pds_calloc(kv_elems, sizeof(float));
    im->sample_scratch = pds_malloc(pds_sample_scratch_bytes(c->vocab));
    if (!im->weights || !im->layers || !im->inv_freq || !im->kv || !im->sample_scratch) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "cpu engine: %lld weight floats, %zu KV floats",
                    (long long)n_weights, kv_elems);
        goto fail;
    }
    s = pds_engine_cpu_pool_create(im->n_threads, &im->pool);
    if (s != PDS_OK) goto fail;
    layout_weights(c, im);
    s = model ? fill_model(c, im, model) : fill_synth(c, im, seed);
    if (s != PDS_OK) goto fail;
    pds_model_rope_inv_freq(c, im->inv_freq);

    snprintf(e->info.device_name, sizeof e->info.device_name, "cpu (%s, %d threads)",
             im->naive ? "naive loops" : "OpenBLAS", im->n_threads);
    e->info.kv_dtype = PDS_DTYPE_F32;
    e->info.weight_bytes = n_weights * (int64_t)sizeof(float);
    e->info.kv_bytes = (int64_t)(kv_elems * sizeof(float));
    e->info.workspace_bytes = 0;
    return PDS_OK;
fail:
    cpu_destroy(e);
    e->ops = NULL;
    return s;
}

/* cpu_internal.h: the CPU reference backend's state and kernels, shared by cpu_backend.c (setup,
 * weights, KV pool, the forward pass) and cpu_kernels.c (the numeric building blocks).
 *
 * Two paths compute the same maths: the fast one (OpenBLAS sgemm for every linear layer, K/V of a
 * sequence gathered into contiguous panels so attention is two sgemms per head) and the naive one
 * (plain triple-loop matmul, attention reading each K/V row straight from the paged pool). The
 * naive path is the one to trust when the fast one is in doubt; PDS_ENGINE_CPU_NAIVE=1 in the
 * environment at engine creation selects it, and a test checks that both agree within 1e-4.
 */
#ifndef PDS_ENGINE_CPU_INTERNAL_H
#define PDS_ENGINE_CPU_INTERNAL_H

#include "engine/engine_internal.h"

typedef struct {
    float *attn_norm; /* [hidden] */
    float *wqkv;      /* [(n_heads + 2*n_kv_heads) * head_dim, hidden]: q rows, then k, then v */
    float *wo;        /* [hidden, n_heads*head_dim] */
    float *ffn_norm;  /* [hidden] */
    float *w_gu;      /* [2*ffn, hidden]: gate rows, then up rows */
    float *w_down;    /* [hidden, ffn] */
} cpu_layer_t;

/* Fork/join worker pool (cpu_pool.c): run(fn, n_items) calls fn(arg, item, thread) for every
 * item across n_threads threads (thread 0 is the caller) and returns when all are done. */
typedef struct cpu_pool cpu_pool_t;
typedef void (*cpu_pool_fn)(void *arg, int item, int thread);
pds_status_t pds_engine_cpu_pool_create(int n_threads, cpu_pool_t **out);
void pds_engine_cpu_pool_destroy(cpu_pool_t *p); /* accepts NULL; joins the workers */
void pds_engine_cpu_pool_run(cpu_pool_t *p, int n_items, cpu_pool_fn fn, void *arg);

typedef struct {
    bool naive;    /* reference loops instead of BLAS (PDS_ENGINE_CPU_NAIVE=1) */
    int n_threads; /* worker threads; OpenBLAS runs single-threaded inside them */
    cpu_pool_t *pool;
    float *weights;      /* one allocation holding every tensor below */
    float *embed;        /* [vocab, hidden] */
    float *final_norm;   /* [hidden] */
    float *lm_head;      /* [vocab, hidden]; == embed when tied */
    cpu_layer_t *layers; /* [n_layers] */
    float *inv_freq;     /* [head_dim/2] RoPE inverse frequencies (llama3-scaled if configured) */
    float *kv;           /* [n_layers] x (n_blocks, 2, block_size, n_kv_heads, head_dim) fp32 */
    size_t kv_layer_elems;
    void *ws; /* forward workspace, grown on demand */
    size_t ws_bytes;
    void *sample_scratch; /* pds_sample_scratch_bytes(vocab) */
} cpu_impl_t;

/* ---- kernels (cpu_kernels.c) ------------------------------------------------------------- */
/* y[m, n] (+)= x[m, k] . w[n, k]^T, rows of x, w and y at strides ldx, k and ldy; accumulate adds
 * into y (the residual connection) instead of overwriting it. */
void pds_engine_cpu_matmul(bool naive, int m, int n, int k, const float *x, int ldx, const float *w,
                           float *y, int ldy, bool accumulate);
/* y[i] = x[i] / sqrt(mean(x^2) + eps) * w[i] for each of the m rows of length n. */
void pds_engine_cpu_rmsnorm(int m, int n, const float *x, const float *w, float eps, float *y);
/* cos/sin[head_dim/2] for position pos: angle = (float)pos * inv_freq[i] in fp32, as transformers
 * computes it (a GPU kernel doing the same fp32 product gets the same angle). */
void pds_engine_cpu_rope_table(int pos, int head_dim, const float *inv_freq, float *cos_out,
                               float *sin_out);
/* Rotates one head vector in place, HF Llama "rotate half": element i pairs with i + head_dim/2. */
void pds_engine_cpu_rope(float *v, int head_dim, const float *cos_t, const float *sin_t);
/* Fills inv_freq[head_dim/2] from the config (theta, llama3 scaling). */
/* h[i] = silu(g[i]) * u[i] over m rows: row r holds g at gu + r*ld and u at gu + r*ld + n; h is
 * written over g. */
void pds_engine_cpu_swiglu(int m, int n, float *gu, int ld);

/* Causal attention of one sequence's n_new query tokens (positions ctx-n_new .. ctx-1) over all
 * its ctx cached tokens, for the query heads sharing KV head `kv_head`, K/V read from one layer's
 * pool array through the block table.
 * q: [n_new, q_stride] with head h at column h*head_dim; out: [n_new, out_stride] likewise.
 * scratch: pds_engine_cpu_attention_scratch(ctx, head_dim) floats (fast path only). */
typedef struct {
    const pds_kv_layout_t *kv;
    const float *pool_layer; /* (n_blocks, 2, block_size, n_kv_heads, head_dim) */
    const int32_t *blocks;
    int ctx, n_new;
    int n_heads;
    const float *q;
    int q_stride;
    float *out;
    int out_stride;
} pds_engine_cpu_attn_t;
size_t pds_engine_cpu_attention_scratch(int ctx, int head_dim);
void pds_engine_cpu_attention(bool naive, const pds_engine_cpu_attn_t *a, int kv_head,
                              float *scratch);

#endif /* PDS_ENGINE_CPU_INTERNAL_H */

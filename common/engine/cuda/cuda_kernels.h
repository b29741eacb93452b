/* cuda_kernels.h: the CUDA engine's kernels behind a C interface — what engine_cuda.c strings
 * together into a forward pass, and what tests/test_engine_cuda.c checks one by one against CPU
 * references.
 *
 * Conventions: bf16 tensors are passed as uint16_t pointers (bit patterns), so plain C can hold
 * them; every launcher takes an explicit stream, checks the launch and returns a pds_status_t
 * (PDS_ERR_DEVICE with the kernel's name on a failed launch). Nothing here synchronises. Shapes
 * are given as comments, row-major, outermost first. Device pointers unless said otherwise.
 */
#ifndef PDS_ENGINE_CUDA_KERNELS_H
#define PDS_ENGINE_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
#ifndef _Noreturn
#define _Noreturn [[noreturn]] /* base.h is C11; .cu files are C++ */
#endif
extern "C" {
#endif

#include "base/base.h"
#include "model/model.h"

/* Turn a CUDA runtime result into a status, naming the call (PDS_ERR adds file:line). */
#define PDS_CUDA_TRY(call)                                                                  \
    do {                                                                                    \
        cudaError_t pds_cu_e_ = (call);                                                     \
        if (pds_cu_e_ != cudaSuccess)                                                       \
            return PDS_ERR(PDS_ERR_DEVICE, "%s: %s", #call, cudaGetErrorString(pds_cu_e_)); \
    } while (0)

/* One sequence of a forward batch as the attention kernels see it. */
typedef struct {
    int32_t q_start; /* first row of this sequence's new tokens in the flat [T, ...] arrays */
    int32_t n_new;   /* new tokens (rows) */
    int32_t n_ctx;   /* tokens in the KV after this forward (past + new) */
    int32_t bt_off;  /* offset of its block table in the flat block-table array */
} pds_cuda_seq_t;

/* Per-sequence sampling inputs (u = pds_sample_uniform(seed, position), computed on the host). */
typedef struct {
    float temperature;
    int32_t top_k;
    float top_p;
    float pad_;
    double u;
} pds_cuda_sample_t;

/* dst[n] = pds_model_synth_value(seed, tensor, i, scale, is_norm) rounded to `round_to` (the
 * model's stored dtype), then stored as bf16 (dst_bf16) or fp32 (dst_f32); exactly one non-NULL. */
pds_status_t pds_cuda_synth_fill(uint16_t *dst_bf16, float *dst_f32, int64_t n, uint64_t seed,
                                 int tensor, float scale, int is_norm, pds_dtype_t round_to,
                                 cudaStream_t s);

/* x[n, hidden] fp32 = table[tokens[i], :] (table [vocab, hidden] bf16). */
pds_status_t pds_cuda_embed(const int32_t *tokens, int n, const uint16_t *table, int hidden,
                            float *x, cudaStream_t s);

/* out[r, :] bf16 = w * (x[row(r), :] * rsqrt(mean(x^2) + eps)) for r < rows, where row(r) =
 * rows_idx[r] if rows_idx != NULL (gathering the last token of each sequence) else r.
 * x [*, hidden] fp32, w [hidden] fp32, out [rows, hidden] bf16. */
pds_status_t pds_cuda_rmsnorm(const float *x, const int32_t *rows_idx, int rows, int hidden,
                              const float *w, float eps, uint16_t *out, cudaStream_t s);

/* In place on qkv [T, (n_heads + 2*n_kv_heads) * head_dim] bf16 (q heads, then k, then v): RoPE
 * ("rotate half", angle = (float)pos[t] * inv_freq[i] in fp32) on q and k; then k and v of token t
 * are written to the pool layer (n_blocks, 2, block_size, n_kv_heads, head_dim) bf16 at slot
 * slots[t] = block_id * block_size + index in block. inv_freq [head_dim/2] fp32. */
pds_status_t pds_cuda_rope_kv_write(uint16_t *qkv, const int32_t *pos, const int32_t *slots, int T,
                                    int n_heads, int n_kv_heads, int head_dim,
                                    const float *inv_freq, uint16_t *kv_layer, int block_size,
                                    cudaStream_t s);

/* out[T, ffn] bf16 = silu(gu[:, :ffn]) * gu[:, ffn:] with gu [T, 2*ffn] bf16. */
pds_status_t pds_cuda_silu_mul(const uint16_t *gu, int T, int ffn, uint16_t *out, cudaStream_t s);

/* Causal attention for any mix of sequences (prefill, chunked prefill, decode). q: [T, q_stride]
 * bf16 with head h at column h*head_dim (rope applied); K/V read through each sequence's block
 * table from the pool layer; out [T, n_heads*head_dim] bf16. Tensor-core flash attention for
 * head_dim 64 and 128, a plain kernel otherwise. tiles [n_tiles] (seq index, first new row) come
 * from pds_cuda_attn_prefill_tiles(). On an sm_90 device with head_dim 128 this runs
 * pds_cuda_attn_prefill_sm90 (wgmma) unless PDS_ENGINE_CUDA_ATTN_SM90=0; the mma.sync kernel
 * otherwise. */
pds_status_t pds_cuda_attn_prefill(const uint16_t *q, int q_stride, const uint16_t *kv_layer,
                                   const pds_cuda_seq_t *seqs, const int32_t *block_tables,
                                   const int32_t *tiles, int n_tiles, int n_heads, int n_kv_heads,
                                   int head_dim, int block_size, uint16_t *out, cudaStream_t s);
/* The plain kernel (one warp per row and head, any head_dim <= 256): the path for other head
 * sizes and a second opinion in tests. seqs ordered by q_start; T rows in all. */
pds_status_t pds_cuda_attn_plain(const uint16_t *q, int q_stride, const uint16_t *kv_layer,
                                 const pds_cuda_seq_t *seqs, int n_seqs,
                                 const int32_t *block_tables, int T, int n_heads, int n_kv_heads,
                                 int head_dim, int block_size, uint16_t *out, cudaStream_t s);
/* Rows of queries per prefill tile, and the host-side tile list: tiles[2*i] = seq, [2*i+1] =
 * first row within the sequence. Returns the tile count (<= cap). */
int pds_cuda_attn_prefill_tile_rows(int head_dim);
int pds_cuda_attn_prefill_tiles(const int *n_new, int n_seqs, int head_dim, int32_t *tiles,
                                int cap);
/* The Hopper prefill kernel itself (attn_prefill_sm90.cu: wgmma, sm_90a), same arguments and
 * tiles as pds_cuda_attn_prefill; PDS_ERR_UNSUPPORTED unless
 * pds_cuda_attn_prefill_sm90_supported(head_dim) (an sm_90 device and head_dim 128). */
int pds_cuda_attn_prefill_sm90_supported(int head_dim);
pds_status_t pds_cuda_attn_prefill_sm90(const uint16_t *q, int q_stride, const uint16_t *kv_layer,
                                        const pds_cuda_seq_t *seqs, const int32_t *block_tables,
                                        const int32_t *tiles, int n_tiles, int n_heads,
                                        int n_kv_heads, int head_dim, int block_size, uint16_t *out,
                                        cudaStream_t s);

/* Decode attention (every sequence has n_new == 1; row s of q belongs to seqs[s]): flash-decoding
 * with the context split into chunks of split_tokens, grid sized for max_splits chunks per
 * sequence (chunks past a sequence's end exit at once, so one launch shape serves a CUDA graph),
 * then a combine pass. part: pds_cuda_attn_decode_part_floats(...) floats of scratch. */
size_t pds_cuda_attn_decode_part_floats(int n_seqs, int n_heads, int head_dim, int max_splits);
/* The longest split_tokens for which pds_cuda_attn_decode stages a chunk's whole K and V in shared
 * memory (cp.async, all in flight at once); longer splits use the register-staged kernel. 0 when
 * PDS_ENGINE_CUDA_DEC_STAGED=0. */
int pds_cuda_attn_decode_max_staged_split(int head_dim);
/* l2_hints: PDS_CUDA_L2_KV_EVICT_FIRST marks the K/V lines (each read once per step) first to go
 * from L2, so that they do not push out lines that are read again (activations, partials). */
#define PDS_CUDA_L2_KV_EVICT_FIRST 1
pds_status_t pds_cuda_attn_decode(const uint16_t *q, int q_stride, const uint16_t *kv_layer,
                                  const pds_cuda_seq_t *seqs, const int32_t *block_tables,
                                  int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                                  int block_size, int split_tokens, int max_splits, float *part,
                                  uint16_t *out, int l2_hints, cudaStream_t s);

/* Decode-step matrix-vector products for 1..pds_cuda_gemv_max_rows() activation rows (n), each
 * with the step that follows it fused (gemv.cu). Weights w [M, K] bf16 row-major, activations x
 * [n, K] bf16, K a multiple of 8; other shapes return PDS_ERR_UNSUPPORTED.
 * _f32: y [n, M] fp32 = x . w^T, or += when accumulate (the residual add).
 * _silu: act [n, ffn] bf16 = silu(g) * u with g = x . w_gu[:ffn]^T and u = x . w_gu[ffn:]^T,
 * each rounded to bf16 first (= GEMM into [n, 2*ffn] bf16, then pds_cuda_silu_mul).
 * _qkv_rope: qkv [n, (H + 2*KV) * head_dim] bf16 = x . wqkv^T, then RoPE and the K/V write of
 * pds_cuda_rope_kv_write (pos [n], slots [n]). */
int pds_cuda_gemv_max_rows(void);
pds_status_t pds_cuda_gemv_f32(const uint16_t *w, int M, int K, const uint16_t *x, int n, float *y,
                               int accumulate, cudaStream_t s);
pds_status_t pds_cuda_gemv_silu(const uint16_t *w_gu, int ffn, int K, const uint16_t *x, int n,
                                uint16_t *act, cudaStream_t s);
pds_status_t pds_cuda_gemv_qkv_rope(const uint16_t *wqkv, int K, const uint16_t *x, int n,
                                    const int32_t *pos, const int32_t *slots, int n_heads,
                                    int n_kv_heads, int head_dim, const float *inv_freq,
                                    uint16_t *qkv, uint16_t *kv_layer, int block_size,
                                    cudaStream_t s);

/* y[n, M] = x[n, K] . w[M, K]^T as bf16 (out_f32 == 0), or y fp32 += x . w^T (out_f32 == 1: the
 * residual add), for 1..64 activation rows on tensor cores with K split over a thread-block
 * cluster (splitk.cu): a replacement for the cuBLASLt call alone (the fused RMSNorm and SiLU
 * variant follows). Deterministic
 * (two runs give the same bits). _fits: whether it takes the shape (M and K multiples of 64,
 * 1 <= n <= 64); _gemm returns PDS_ERR_UNSUPPORTED for shapes it does not take. */
int pds_cuda_splitk_fits(int M, int K, int n);
pds_status_t pds_cuda_splitk_gemm(const uint16_t *w, int M, int K, const uint16_t *x, int n,
                                  void *y, int out_f32, cudaStream_t s);
/* The same with the kernel variant given rather than read from the environment (the test runs
 * several): warps 4 or 8 (8: 128-row tiles, 4 where M is not a multiple of 128), bk 64, 128 or 256
 * (k per stage; halved until it divides K), stages 2..8 (capped at what fits); 0 for any of them:
 * its default (all three 0: the per-shape defaults of splitk.cu). PDS_ERR_INVALID_ARG for other
 * values. pds_cuda_splitk_gemm passes PDS_ENGINE_CUDA_SPLITK_WARPS, _BK and _STAGES (0 where
 * unset). */
pds_status_t pds_cuda_splitk_gemm_cfg(const uint16_t *w, int M, int K, const uint16_t *x, int n,
                                      void *y, int out_f32, int warps, int bk, int stages,
                                      cudaStream_t s);

/* The same product with the RMSNorm before it fused in (one kernel instead of rmsnorm + GEMM, and
 * with silu also the SiLU*mul after it): x [n, K] fp32 (the residual stream), norm_w [K], and
 *   silu 0: y [n, M] = bf16(r * (bf16(x * norm_w) . w^T)),
 *   silu 1: w = [gate; up] (M/2 rows each), y [n, M/2] = bf16(silu(r * xg . gate^T) * (r * xg .
 *           up^T)) with xg = bf16(x * norm_w),
 * r = 1 / sqrt(mean(x^2) + eps) per row, computed inside from the cluster's partial sums of
 * squares (rmsnorm_kernel applies r before rounding to bf16; this applies it after the product, so
 * the two agree to bf16 rounding, not bit for bit). Shapes as pds_cuda_splitk_gemm but 1..32 rows
 * (PDS_ERR_UNSUPPORTED above), deterministic; PDS_ERR_INVALID_ARG without norm_w. _cfg: the variant
 * as pds_cuda_splitk_gemm_cfg (bk 256 runs as 128). */
#define PDS_CUDA_SPLITK_NORM_MAX_ROWS 32 /* the fused variants' limit (their registers) */
pds_status_t pds_cuda_splitk_norm_gemm(const uint16_t *w, int M, int K, const float *x,
                                       const float *norm_w, float eps, int n, uint16_t *y, int silu,
                                       cudaStream_t s);
pds_status_t pds_cuda_splitk_norm_gemm_cfg(const uint16_t *w, int M, int K, const float *x,
                                           const float *norm_w, float eps, int n, uint16_t *y,
                                           int silu, int warps, int bk, int stages, cudaStream_t s);

/* q|k|v for a decode step with both neighbours fused in: RMSNorm(x) as above, the product with
 * wqkv [(n_heads + 2 n_kv_heads) * 128, K], then RoPE and the K/V write of
 * pds_cuda_rope_kv_write (q and k heads rotated, k and v also written into kv_layer at slots[t])
 * — one kernel for the three. head_dim 128 only (a tile is a head), 1..32 rows; otherwise
 * PDS_ERR_UNSUPPORTED. The product is rounded to bf16 before the rotation, as the unfused path. */
pds_status_t pds_cuda_splitk_norm_qkv_rope(const uint16_t *wqkv, int K, const float *x,
                                           const float *norm_w, float eps, int n,
                                           const int32_t *pos, const int32_t *slots, int n_heads,
                                           int n_kv_heads, int head_dim, const float *inv_freq,
                                           uint16_t *qkv, uint16_t *kv_layer, int block_size,
                                           cudaStream_t s);

/* tokens[S]: the token drawn for each row of logits [S, vocab] fp32 with the algorithm of
 * sample/sample.h (greedy when temperature == 0). */
pds_status_t pds_cuda_sample(const float *logits, int S, int vocab, const pds_cuda_sample_t *p,
                             int32_t *tokens, cudaStream_t s);

/* KV block moves between a pool layer and a staging buffer of n consecutive blocks, converting
 * bf16 <-> `dtype` (F32 or BF16). block_elems = pds_kv_block_elems(). ids [n] device. */
pds_status_t pds_cuda_kv_gather(const uint16_t *kv_layer, int64_t block_elems, const int32_t *ids,
                                int n, pds_dtype_t dtype, void *dst, cudaStream_t s);
pds_status_t pds_cuda_kv_scatter(uint16_t *kv_layer, int64_t block_elems, const int32_t *ids, int n,
                                 pds_dtype_t dtype, const void *src, cudaStream_t s);

/* dst[bytes] = src[bytes] with 16-byte loads (bytes a multiple of 16): the bandwidth probe. */
pds_status_t pds_cuda_copy(void *dst, const void *src, size_t bytes, cudaStream_t s);

/* fp32 -> bf16 (round to nearest even), n elements. */
pds_status_t pds_cuda_f32_to_bf16(const float *src, int64_t n, uint16_t *dst, cudaStream_t s);

#ifdef __cplusplus
}
#endif

#endif /* PDS_ENGINE_CUDA_KERNELS_H */

/* gemv.cu: matrix-vector products for decode steps of 1 to 4 sequences, with the work that
 * follows each linear layer fused into the same kernel.
 *
 * At batch 1 a decode step is a stream of 15 GB of weights; what costs beyond that stream is the
 * launches and the small kernels between the GEMMs. Here one warp computes two output rows (two
 * dot products over K for each activation row), with 16-byte weight loads that skip L1, several
 * in flight per lane, and the activations read through L1 (every warp of the grid reads the same
 * few KB). The pair of rows is chosen so that the step after the GEMM can happen in the warp:
 *   - q/k/v: rows i and i + head_dim/2 of one head, so RoPE ("rotate half") is applied to the
 *     pair and k/v are written into the paged pool (replaces GEMM + pds_cuda_rope_kv_write);
 *   - gate/up: row j of gate and row j of up, so SiLU(gate) * up is written directly (replaces
 *     GEMM + pds_cuda_silu_mul, and the [n, 2*ffn] intermediate);
 *   - o/down: rows 2p and 2p + 1, added into the fp32 residual; LM head: stored as fp32.
 * Rounding follows the unfused path: the q/k/v and gate/up products are rounded to bf16 before
 * RoPE or SiLU, as they would be on their way through memory.
 */
#include <cuda_bf16.h>
#include <math.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/kv_slot.cuh"
#include "engine/cuda/launch.cuh"

typedef __nv_bfloat16 bf16;

#define LAUNCH_CHECK(name)                                                                    \
    do {                                                                                      \
        cudaError_t e_ = cudaGetLastError();                                                  \
        if (e_ != cudaSuccess)                                                                \
            return PDS_ERR(PDS_ERR_DEVICE, "launch of %s: %s", name, cudaGetErrorString(e_)); \
    } while (0)

#define GEMV_WARPS 8
#define GEMV_MAX_N 4

enum { EPI_STORE = 0, EPI_ADD = 1, EPI_SILU = 2, EPI_QKV = 3 };

struct gemv_epi {
    void *out; /* EPI_STORE/ADD: [n, M] fp32; EPI_SILU: [n, ffn] bf16; EPI_QKV: [n, M] bf16 */
    int M;     /* output rows of the weight */
    int ffn;   /* EPI_SILU */
    /* EPI_QKV */
    const int32_t *pos, *slots;
    const float *inv_freq;
    bf16 *kv;
    int n_heads, n_kv_heads, head_dim, block_size;
};

/* 16 bytes of weights: read once, so not kept in L1 */
__device__ __forceinline__ uint4 ld_stream(const uint4 *p)
{
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float bf_lo(uint32_t v)
{
    return __uint_as_float(v << 16);
}
__device__ __forceinline__ float bf_hi(uint32_t v)
{
    return __uint_as_float(v & 0xffff0000u);
}

__device__ __forceinline__ float dot8(float acc, uint4 w, uint4 x)
{
    acc = fmaf(bf_lo(w.x), bf_lo(x.x), acc);
    acc = fmaf(bf_hi(w.x), bf_hi(x.x), acc);
    acc = fmaf(bf_lo(w.y), bf_lo(x.y), acc);
    acc = fmaf(bf_hi(w.y), bf_hi(x.y), acc);
    acc = fmaf(bf_lo(w.z), bf_lo(x.z), acc);
    acc = fmaf(bf_hi(w.z), bf_hi(x.z), acc);
    acc = fmaf(bf_lo(w.w), bf_lo(x.w), acc);
    acc = fmaf(bf_hi(w.w), bf_hi(x.w), acc);
    return acc;
}

__device__ __forceinline__ float round_bf(float v)
{
    return __bfloat162float(__float2bfloat16_rn(v));
}

template <int N, int EPI>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const bf16 *__restrict__ w, const bf16 *__restrict__ x, int K, int n_pairs,
                gemv_epi ep)
{
    const int p = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const bool live = p < n_pairs;
    int ra = 0, rb = 0;
    int head = 0, i = 0, half = 0;
    if (!live) {
    } else if (EPI == EPI_SILU) {
        ra = p, rb = p + ep.ffn;
    } else if (EPI == EPI_QKV) {
        half = ep.head_dim / 2;
        head = p / half, i = p % half;
        ra = head * ep.head_dim + i, rb = ra + half;
    } else {
        ra = 2 * p, rb = min(2 * p + 1, ep.M - 1); /* odd M: the last row twice, stored once */
    }
    const int K8 = K >> 3;
    const uint4 *wa = (const uint4 *)(w + (int64_t)ra * K),
                *wb = (const uint4 *)(w + (int64_t)rb * K);
    const uint4 *xv = (const uint4 *)x;
    constexpr int U = N <= 2 ? 4 : 2;
    float acc[2][N];
#pragma unroll
    for (int n = 0; n < N; n++) acc[0][n] = acc[1][n] = 0.0f;
    /* the first weights do not depend on the previous kernel: load them before waiting for it */
    uint4 va[U], vb[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = lane + u * 32;
        if (live && c < K8) {
            va[u] = ld_stream(wa + c);
            vb[u] = ld_stream(wb + c);
        }
    }
    pdl_wait();
    pdl_trigger();
    if (!live) return;
    for (int c0 = lane; c0 < K8; c0 += 32 * U) {
        if (c0 != lane) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * 32;
                if (c < K8) {
                    va[u] = ld_stream(wa + c);
                    vb[u] = ld_stream(wb + c);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + u * 32;
            if (c < K8) {
#pragma unroll
                for (int n = 0; n < N; n++) {
                    const uint4 xn = __ldg(xv + (int64_t)n * K8 + c);
                    acc[0][n] = dot8(acc[0][n], va[u], xn);
                    acc[1][n] = dot8(acc[1][n], vb[u], xn);
                }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            acc[0][n] += __shfl_xor_sync(0xffffffffu, acc[0][n], o);
            acc[1][n] += __shfl_xor_sync(0xffffffffu, acc[1][n], o);
        }
    if (lane != 0) return;
#pragma unroll
    for (int n = 0; n < N; n++) {
        const float a = acc[0][n], b = acc[1][n];
        if (EPI == EPI_STORE || EPI == EPI_ADD) {
            float *y = (float *)ep.out + (int64_t)n * ep.M;
            if (EPI == EPI_ADD) {
                y[ra] += a;
                if (rb != ra) y[rb] += b;
            } else {
                y[ra] = a;
                if (rb != ra) y[rb] = b;
            }
        } else if (EPI == EPI_SILU) {
            const float g = round_bf(a), u = round_bf(b);
            ((bf16 *)ep.out)[(int64_t)n * ep.ffn + p] =
                __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
        } else {
            const float x0 = round_bf(a), x1 = round_bf(b);
            bf16 y0 = __float2bfloat16_rn(x0), y1 = __float2bfloat16_rn(x1);
            const int H = ep.n_heads, KVH = ep.n_kv_heads, hd = ep.head_dim;
            if (head < H + KVH) { /* q or k head: RoPE on the pair, as rope_kv_kernel */
                float ang = (float)ep.pos[n] * ep.inv_freq[i];
                float sn, cs;
                sincosf(ang, &sn, &cs);
                y0 = __float2bfloat16_rn(x0 * cs - x1 * sn);
                y1 = __float2bfloat16_rn(x1 * cs + x0 * sn);
            }
            bf16 *row = (bf16 *)ep.out + (int64_t)n * ep.M;
            row[ra] = y0;
            row[rb] = y1;
            if (head >= H) {
                const int sel = head < H + KVH ? 0 : 1, kh = head - H - sel * KVH;
                bf16 *dst = pds_kv_slot_row(ep.kv, ep.slots[n], ep.block_size, KVH, hd, sel) +
                            (int64_t)kh * hd;
                dst[i] = y0;
                dst[i + half] = y1;
            }
        }
    }
}

template <int EPI>
static pds_status_t gemv_launch(const uint16_t *w, int K, const uint16_t *x, int n, int n_pairs,
                                const gemv_epi &ep, cudaStream_t s)
{
    if (n < 1 || n > GEMV_MAX_N || K % 8 != 0 || n_pairs < 1)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "gemv: %d rows, K %d", n, K);
    const dim3 grid((unsigned)((n_pairs + GEMV_WARPS - 1) / GEMV_WARPS));
    const bf16 *W = (const bf16 *)w, *X = (const bf16 *)x;
    switch (n) {
    case 1:
        pds_launch(gemv_kernel<1, EPI>, grid, GEMV_WARPS * 32, 0, s, W, X, K, n_pairs, ep);
        break;
    case 2:
        pds_launch(gemv_kernel<2, EPI>, grid, GEMV_WARPS * 32, 0, s, W, X, K, n_pairs, ep);
        break;
    case 3:
        pds_launch(gemv_kernel<3, EPI>, grid, GEMV_WARPS * 32, 0, s, W, X, K, n_pairs, ep);
        break;
    default:
        pds_launch(gemv_kernel<4, EPI>, grid, GEMV_WARPS * 32, 0, s, W, X, K, n_pairs, ep);
        break;
    }
    LAUNCH_CHECK("gemv_kernel");
    return PDS_OK;
}

extern "C" int pds_cuda_gemv_max_rows(void)
{
    return GEMV_MAX_N;
}

extern "C" pds_status_t pds_cuda_gemv_f32(const uint16_t *w, int M, int K, const uint16_t *x, int n,
                                          float *y, int accumulate, cudaStream_t s)
{
    gemv_epi ep = {};
    ep.out = y;
    ep.M = M;
    if (accumulate) return gemv_launch<EPI_ADD>(w, K, x, n, (M + 1) / 2, ep, s);
    return gemv_launch<EPI_STORE>(w, K, x, n, (M + 1) / 2, ep, s);
}

extern "C" pds_status_t pds_cuda_gemv_silu(const uint16_t *w_gu, int ffn, int K, const uint16_t *x,
                                           int n, uint16_t *act, cudaStream_t s)
{
    gemv_epi ep = {};
    ep.out = act;
    ep.M = 2 * ffn;
    ep.ffn = ffn;
    return gemv_launch<EPI_SILU>(w_gu, K, x, n, ffn, ep, s);
}

extern "C" pds_status_t pds_cuda_gemv_qkv_rope(const uint16_t *wqkv, int K, const uint16_t *x,
                                               int n, const int32_t *pos, const int32_t *slots,
                                               int n_heads, int n_kv_heads, int head_dim,
                                               const float *inv_freq, uint16_t *qkv,
                                               uint16_t *kv_layer, int block_size, cudaStream_t s)
{
    if (head_dim % 2) return PDS_ERR(PDS_ERR_UNSUPPORTED, "gemv qkv: head_dim %d", head_dim);
    gemv_epi ep = {};
    ep.out = qkv;
    ep.M = (n_heads + 2 * n_kv_heads) * head_dim;
    ep.pos = pos;
    ep.slots = slots;
    ep.inv_freq = inv_freq;
    ep.kv = (bf16 *)kv_layer;
    ep.n_heads = n_heads;
    ep.n_kv_heads = n_kv_heads;
    ep.head_dim = head_dim;
    ep.block_size = block_size;
    return gemv_launch<EPI_QKV>(wqkv, K, x, n, ep.M / 2, ep, s);
}

/* kernels.cu: the CUDA engine's small kernels — embedding, RMSNorm, RoPE + K/V write into the
 * paged pool, SiLU*mul, sampling, KV block gather/scatter, and the copy used as bandwidth probe.
 *
 * All of them are memory-bound and simple; the choices that matter: the residual stream stays in
 * fp32 (the GEMMs accumulate into it, so the residual add is fused into cuBLASLt's epilogue and
 * RMSNorm only reads it), and sampling runs wholly on the GPU with integer (fixed-point) mass so
 * that the same logits give the same token on every run, whatever the order of atomics.
 * Sampling follows sample/sample.c: top-k and top-p cut over the rank order (logit descending, id
 * ascending), then a walk in ascending id order to the first cumulative weight above u * total.
 * Instead of sorting 128k entries, one CTA per row finds each cut point with 8-bit radix
 * selections over a 64-bit key (monotonic logit bits, ~id), weighted by count or by mass.
 */
#include <cuda_bf16.h>
#include <math.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/kv_slot.cuh"
#include "engine/cuda/launch.cuh"

#define LAUNCH_CHECK(name)                                                                    \
    do {                                                                                      \
        cudaError_t e_ = cudaGetLastError();                                                  \
        if (e_ != cudaSuccess)                                                                \
            return PDS_ERR(PDS_ERR_DEVICE, "launch of %s: %s", name, cudaGetErrorString(e_)); \
    } while (0)

typedef __nv_bfloat16 bf16;

/* ---- block reductions --------------------------------------------------------------------------
 */
__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim a multiple of 32, <= 1024); every thread gets the result. */
__device__ float block_sum(float v, float *red /* [32] */)
{
    v = warp_sum(v);
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

/* ---- embedding ---------------------------------------------------------------------------------
 */
__global__ void embed_kernel(const int32_t *tokens, const bf16 *table, int hidden, float *x)
{
    pdl_wait();
    pdl_trigger();
    int t = blockIdx.x;
    const bf16 *row = table + (int64_t)tokens[t] * hidden;
    float *xr = x + (int64_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) xr[i] = __bfloat162float(row[i]);
}

extern "C" pds_status_t pds_cuda_embed(const int32_t *tokens, int n, const uint16_t *table,
                                       int hidden, float *x, cudaStream_t s)
{
    if (n <= 0) return PDS_OK;
    pds_launch(embed_kernel, n, 256, 0, s, tokens, (const bf16 *)table, hidden, x);
    LAUNCH_CHECK("embed_kernel");
    return PDS_OK;
}

/* ---- RMSNorm ------------------------------------------------------------------------------------
 */
__global__ void rmsnorm_kernel(const float *x, const int32_t *rows_idx, int hidden, const float *w,
                               float eps, bf16 *out)
{
    __shared__ float red[32];
    pdl_wait();
    pdl_trigger();
    int r = blockIdx.x;
    int src = rows_idx ? rows_idx[r] : r;
    const float *xr = x + (int64_t)src * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
    bf16 *o = out + (int64_t)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = __float2bfloat16_rn(w[i] * (xr[i] * inv));
}

/* hidden % 4 == 0: float4 loads, the row held in registers between the two passes (NV float4 per
 * thread at most). */
#define RMS_NV 4
__global__ void rmsnorm4_kernel(const float4 *x, const int32_t *rows_idx, int h4, const float4 *w,
                                float eps, uint2 *out)
{
    __shared__ float red[32];
    pdl_wait();
    pdl_trigger();
    const int r = blockIdx.x;
    const int src = rows_idx ? rows_idx[r] : r;
    const float4 *xr = x + (int64_t)src * h4;
    float4 v[RMS_NV];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < RMS_NV; i++) {
        const int j = threadIdx.x + i * blockDim.x;
        v[i] = j < h4 ? xr[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
    }
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)(4 * h4) + eps);
    uint2 *o = out + (int64_t)r * h4;
#pragma unroll
    for (int i = 0; i < RMS_NV; i++) {
        const int j = threadIdx.x + i * blockDim.x;
        if (j >= h4) break;
        const float4 ww = w[j];
        __nv_bfloat162 a = __floats2bfloat162_rn(ww.x * (v[i].x * inv), ww.y * (v[i].y * inv));
        __nv_bfloat162 b = __floats2bfloat162_rn(ww.z * (v[i].z * inv), ww.w * (v[i].w * inv));
        o[j] = make_uint2(*(uint32_t *)&a, *(uint32_t *)&b);
    }
}

extern "C" pds_status_t pds_cuda_rmsnorm(const float *x, const int32_t *rows_idx, int rows,
                                         int hidden, const float *w, float eps, uint16_t *out,
                                         cudaStream_t s)
{
    if (rows <= 0) return PDS_OK;
    const int h4 = hidden / 4;
    const int threads = PDS_MIN(1024, PDS_MAX(32, PDS_DIV_UP(PDS_DIV_UP(h4, RMS_NV), 32) * 32));
    if (hidden % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 &&
        (uintptr_t)out % 8 == 0 && threads * RMS_NV >= h4) {
        pds_launch(rmsnorm4_kernel, rows, threads, 0, s, (const float4 *)x, rows_idx, h4,
                   (const float4 *)w, eps, (uint2 *)out);
        LAUNCH_CHECK("rmsnorm4_kernel");
        return PDS_OK;
    }
    pds_launch(rmsnorm_kernel, rows, hidden >= 2048 ? 512 : 128, 0, s, x, rows_idx, hidden, w, eps,
               (bf16 *)out);
    LAUNCH_CHECK("rmsnorm_kernel");
    return PDS_OK;
}

/* ---- RoPE + K/V write
 * ---------------------------------------------------------------------------- */
/* One block per token: the cos/sin of its position are computed once per frequency (not once per
 * head) into shared memory, then every q/k head pair is rotated and k/v copied into the pool. */
__global__ void rope_kv_kernel(bf16 *qkv, const int32_t *pos, const int32_t *slots, int n_heads,
                               int n_kv_heads, int head_dim, const float *inv_freq, bf16 *kv,
                               int block_size)
{
    extern __shared__ float cs_sm[]; /* [half] cos, then [half] sin */
    pdl_wait();
    pdl_trigger();
    int t = blockIdx.x, half = head_dim / 2;
    int width = (n_heads + 2 * n_kv_heads) * head_dim;
    bf16 *row = qkv + (int64_t)t * width;
    float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float sn, cs;
        sincosf(p * inv_freq[i], &sn, &cs);
        cs_sm[i] = cs;
        cs_sm[half + i] = sn;
    }
    __syncthreads();
    const int64_t kvw = (int64_t)n_kv_heads * head_dim;
    bf16 *kdst = pds_kv_slot_row(kv, slots[t], block_size, n_kv_heads, head_dim, 0);
    bf16 *vdst = pds_kv_slot_row(kv, slots[t], block_size, n_kv_heads, head_dim, 1);
    /* rotate q and k heads: pair (i, i + half); four pairs per thread (8-byte accesses) when the
     * halves allow */
    if (half % 4 == 0 && width % 4 == 0 && n_kv_heads * head_dim % 4 == 0) {
        const int q4 = half / 4;
        for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * q4; j += blockDim.x) {
            int h = j / q4, i = (j - h * q4) * 4;
            bf16 *v = row + h * head_dim;
            uint2 a = *(const uint2 *)(v + i), b = *(const uint2 *)(v + i + half);
            const bf16 *xa = (const bf16 *)&a, *xb = (const bf16 *)&b;
            uint2 ya, yb;
            bf16 *oa = (bf16 *)&ya, *ob = (bf16 *)&yb;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float cs = cs_sm[i + e], sn = cs_sm[half + i + e];
                float x0 = __bfloat162float(xa[e]), x1 = __bfloat162float(xb[e]);
                oa[e] = __float2bfloat16_rn(x0 * cs - x1 * sn);
                ob[e] = __float2bfloat16_rn(x1 * cs + x0 * sn);
            }
            *(uint2 *)(v + i) = ya;
            *(uint2 *)(v + i + half) = yb;
            if (h >= n_heads) {
                bf16 *k = kdst + (h - n_heads) * head_dim;
                *(uint2 *)(k + i) = ya;
                *(uint2 *)(k + i + half) = yb;
            }
        }
    } else
        for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * half; j += blockDim.x) {
            int h = j / half, i = j - h * half;
            float cs = cs_sm[i], sn = cs_sm[half + i];
            bf16 *v = row + h * head_dim;
            float x0 = __bfloat162float(v[i]), x1 = __bfloat162float(v[i + half]);
            bf16 y0 = __float2bfloat16_rn(x0 * cs - x1 * sn);
            bf16 y1 = __float2bfloat16_rn(x1 * cs + x0 * sn);
            v[i] = y0;
            v[i + half] = y1;
            if (h >= n_heads) {
                int kh = h - n_heads;
                kdst[kh * head_dim + i] = y0;
                kdst[kh * head_dim + i + half] = y1;
            }
        }
    const bf16 *vsrc = row + (n_heads + n_kv_heads) * head_dim;
    if (kvw % 8 == 0 && (uintptr_t)vsrc % 16 == 0 && (uintptr_t)vdst % 16 == 0) {
        for (int j = threadIdx.x; j < kvw / 8; j += blockDim.x)
            ((uint4 *)vdst)[j] = ((const uint4 *)vsrc)[j];
    } else {
        for (int j = threadIdx.x; j < kvw; j += blockDim.x) vdst[j] = vsrc[j];
    }
}

extern "C" pds_status_t pds_cuda_rope_kv_write(uint16_t *qkv, const int32_t *pos,
                                               const int32_t *slots, int T, int n_heads,
                                               int n_kv_heads, int head_dim, const float *inv_freq,
                                               uint16_t *kv_layer, int block_size, cudaStream_t s)
{
    if (T <= 0) return PDS_OK;
    pds_launch(rope_kv_kernel, T, 256, sizeof(float) * (size_t)head_dim, s, (bf16 *)qkv, pos, slots,
               n_heads, n_kv_heads, head_dim, inv_freq, (bf16 *)kv_layer, block_size);
    LAUNCH_CHECK("rope_kv_kernel");
    return PDS_OK;
}

/* ---- SiLU * mul
 * ------------------------------------------------------------------------------------ */
__global__ void silu_mul_kernel(const bf16 *gu, int64_t T, int ffn, bf16 *out)
{
    pdl_wait();
    pdl_trigger();
    int64_t n = T * ffn;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / ffn, c = i % ffn;
        float g = __bfloat162float(gu[r * 2 * ffn + c]);
        float u = __bfloat162float(gu[r * 2 * ffn + ffn + c]);
        out[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
    }
}

/* 8 elements per thread with 16-byte loads, when ffn % 8 == 0. */
__global__ void silu_mul8_kernel(const uint4 *gu, int64_t T, int ffn8, uint4 *out)
{
    pdl_wait();
    pdl_trigger();
    int64_t n = T * ffn8;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / ffn8, c = i % ffn8;
        uint4 g4 = gu[r * 2 * ffn8 + c], u4 = gu[r * 2 * ffn8 + ffn8 + c], o4;
        const bf16 *g = (const bf16 *)&g4, *u = (const bf16 *)&u4;
        bf16 *o = (bf16 *)&o4;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float gf = __bfloat162float(g[k]);
            o[k] = __float2bfloat16_rn(gf / (1.0f + expf(-gf)) * __bfloat162float(u[k]));
        }
        out[i] = o4;
    }
}

extern "C" pds_status_t pds_cuda_silu_mul(const uint16_t *gu, int T, int ffn, uint16_t *out,
                                          cudaStream_t s)
{
    if (T <= 0) return PDS_OK;
    if (ffn % 8 == 0) {
        int64_t n = (int64_t)T * (ffn / 8);
        int blocks = (int)PDS_MIN((n + 255) / 256, (int64_t)8192);
        pds_launch(silu_mul8_kernel, blocks, 256, 0, s, (const uint4 *)gu, (int64_t)T, ffn / 8,
                   (uint4 *)out);
        LAUNCH_CHECK("silu_mul8_kernel");
    } else {
        int64_t n = (int64_t)T * ffn;
        int blocks = (int)PDS_MIN((n + 255) / 256, (int64_t)8192);
        pds_launch(silu_mul_kernel, blocks, 256, 0, s, (const bf16 *)gu, (int64_t)T, ffn,
                   (bf16 *)out);
        LAUNCH_CHECK("silu_mul_kernel");
    }
    return PDS_OK;
}

/* ---- sampling
 * ------------------------------------------------------------------------------------- */
#define SAMPLE_THREADS 1024
#define MASS_ONE       17592186044416.0f /* 2^44: exp((l - max) / T) in (0, 1] as fixed point */

__device__ __forceinline__ float clean_logit(float v)
{
    return isnan(v) ? -INFINITY : v;
}

/* Rank order of sample.c (larger logit first, then lower id) as one unsigned 64-bit key: the
 * logit's bits made monotonic, then ~id. */
__device__ __forceinline__ uint64_t rank_key(float v, int id)
{
    uint32_t b = __float_as_uint(v);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((uint64_t)b << 32) | (uint64_t)(0xffffffffu - (uint32_t)id);
}

struct sample_smem {
    unsigned long long hist[256];
    unsigned long long total;
    uint64_t prefix, base;
    float fmax;
    int arg;
};

/* Largest key K, over the kept tokens (rank key >= lo), such that W(K) = the summed weight of kept
 * tokens whose key is >= K satisfies W(K) >= target (strict = false) or > target (strict). Keys
 * are the rank key, or with by_id the key ~id (so "larger" = lower id: a walk in ascending id
 * order). Weights are 1 (count) or the fixed-point mass. The caller guarantees that the whole kept
 * set satisfies the condition. Block-wide; every thread gets the result. 8-bit radix steps. */
__device__ uint64_t radix_select(const float *l, int V, float mx, float T, uint64_t lo, bool count,
                                 uint64_t target, bool strict, bool by_id, sample_smem *sm)
{
    uint64_t prefix = 0, base = 0;
    for (int shift = by_id ? 24 : 56; shift >= 0; shift -= 8) {
        int top = by_id ? 24 : 56;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) sm->hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float v = clean_logit(l[i]);
            uint64_t rk = rank_key(v, i);
            if (rk < lo) continue;
            uint64_t k = by_id ? (uint64_t)(0xffffffffu - (uint32_t)i) : rk;
            if (shift < top && (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;
            uint64_t w = count ? 1ull : (uint64_t)__float2ull_rn(expf((v - mx) / T) * MASS_ONE);
            atomicAdd(&sm->hist[(k >> shift) & 255], (unsigned long long)w);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int d;
            for (d = 255; d > 0; d--) {
                uint64_t w = base + sm->hist[d];
                if (strict ? w > target : w >= target) break;
                base = w;
            }
            prefix |= (uint64_t)d << shift;
            sm->prefix = prefix;
            sm->base = base;
        }
        __syncthreads();
        prefix = sm->prefix;
        base = sm->base;
        __syncthreads();
    }
    return prefix;
}

/* Summed fixed-point mass of tokens with rank key >= lo. */
__device__ uint64_t kept_mass(const float *l, int V, float mx, float T, uint64_t lo,
                              sample_smem *sm)
{
    if (threadIdx.x == 0) sm->total = 0;
    __syncthreads();
    unsigned long long acc = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = clean_logit(l[i]);
        if (rank_key(v, i) >= lo) acc += __float2ull_rn(expf((v - mx) / T) * MASS_ONE);
    }
    atomicAdd(&sm->total, acc);
    __syncthreads();
    uint64_t t = sm->total;
    __syncthreads();
    return t;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(const float *logits, int V, const pds_cuda_sample_t *params, int32_t *tokens)
{
    __shared__ sample_smem sm;
    __shared__ float wb[32];
    __shared__ int wa[32];
    pdl_wait();
    pdl_trigger();
    int r = blockIdx.x;
    const float *l = logits + (int64_t)r * V;
    pds_cuda_sample_t p = params[r];
    /* argmax, lowest id on ties, NaN as -inf (a total order: any traversal gives the same) */
    float best = -INFINITY;
    int arg = 0x7fffffff;
    auto take = [&](float v, int i) {
        v = clean_logit(v);
        if (v > best || (v == best && i < arg)) best = v, arg = i;
    };
    if (V % 4 == 0 && (uintptr_t)l % 16 == 0) {
        /* 16-byte loads, four in flight per thread: one block reads its row at several times
         * the scalar loop's rate (llama3-8b's 128k logits: ~60 us per step at batch 32 before) */
        const float4 *l4 = (const float4 *)l;
#pragma unroll 4
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            const float4 q = l4[i];
            take(q.x, 4 * i), take(q.y, 4 * i + 1), take(q.z, 4 * i + 2), take(q.w, 4 * i + 3);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) take(l[i], i);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        int oa = __shfl_xor_sync(0xffffffffu, arg, o);
        if (ob > best || (ob == best && oa < arg)) best = ob, arg = oa;
    }
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) wb[w] = best, wa[w] = arg;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < (int)(blockDim.x >> 5); k++)
            if (wb[k] > best || (wb[k] == best && wa[k] < arg)) best = wb[k], arg = wa[k];
        sm.fmax = best;
        sm.arg = arg == 0x7fffffff ? 0 : arg;
    }
    __syncthreads();
    float mx = sm.fmax;
    if (p.temperature == 0.0f || !isfinite(mx) || p.top_k == 1) {
        if (threadIdx.x == 0) tokens[r] = sm.arg;
        return;
    }
    float T = p.temperature;
    uint64_t lo = 0;
    if (p.top_k > 0 && p.top_k < V)
        lo = radix_select(l, V, mx, T, 0, true, (uint64_t)p.top_k, false, false, &sm);
    uint64_t total = kept_mass(l, V, mx, T, lo, &sm);
    if (p.top_p < 1.0f) {
        uint64_t all = lo ? kept_mass(l, V, mx, T, 0, &sm) : total;
        uint64_t thr = (uint64_t)((double)p.top_p * (double)all);
        if (thr > total) thr = total;
        if (thr < 1) thr = 1;
        lo = radix_select(l, V, mx, T, lo, false, thr, false, false, &sm);
        total = kept_mass(l, V, mx, T, lo, &sm);
    }
    /* the walk in ascending id order: first id whose cumulative weight exceeds u * total */
    uint64_t tgt = (uint64_t)(p.u * (double)total);
    if (tgt >= total) tgt = total ? total - 1 : 0;
    uint64_t k = radix_select(l, V, mx, T, lo, false, tgt, true, true, &sm);
    if (threadIdx.x == 0) tokens[r] = (int32_t)(0xffffffffu - (uint32_t)(k & 0xffffffffu));
}

extern "C" pds_status_t pds_cuda_sample(const float *logits, int S, int vocab,
                                        const pds_cuda_sample_t *p, int32_t *tokens, cudaStream_t s)
{
    if (S <= 0) return PDS_OK;
    pds_launch(sample_kernel, S, SAMPLE_THREADS, 0, s, logits, vocab, p, tokens);
    LAUNCH_CHECK("sample_kernel");
    return PDS_OK;
}

/* ---- KV block gather / scatter
 * -------------------------------------------------------------------- */
__global__ void kv_gather_kernel(const bf16 *kv, int64_t be, const int32_t *ids, int n, int f32,
                                 void *dst)
{
    int64_t total = be * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = i / be, e = i % be;
        bf16 v = kv[(int64_t)ids[b] * be + e];
        if (f32)
            ((float *)dst)[i] = __bfloat162float(v);
        else
            ((bf16 *)dst)[i] = v;
    }
}

__global__ void kv_scatter_kernel(bf16 *kv, int64_t be, const int32_t *ids, int n, int f32,
                                  const void *src)
{
    int64_t total = be * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = i / be, e = i % be;
        kv[(int64_t)ids[b] * be + e] =
            f32 ? __float2bfloat16_rn(((const float *)src)[i]) : ((const bf16 *)src)[i];
    }
}

extern "C" pds_status_t pds_cuda_kv_gather(const uint16_t *kv_layer, int64_t block_elems,
                                           const int32_t *ids, int n, pds_dtype_t dtype, void *dst,
                                           cudaStream_t s)
{
    if (n <= 0) return PDS_OK;
    int64_t total = block_elems * n;
    int blocks = (int)PDS_MIN((total + 255) / 256, (int64_t)16384);
    kv_gather_kernel<<<blocks, 256, 0, s>>>((const bf16 *)kv_layer, block_elems, ids, n,
                                            dtype == PDS_DTYPE_F32, dst);
    LAUNCH_CHECK("kv_gather_kernel");
    return PDS_OK;
}

extern "C" pds_status_t pds_cuda_kv_scatter(uint16_t *kv_layer, int64_t block_elems,
                                            const int32_t *ids, int n, pds_dtype_t dtype,
                                            const void *src, cudaStream_t s)
{
    if (n <= 0) return PDS_OK;
    int64_t total = block_elems * n;
    int blocks = (int)PDS_MIN((total + 255) / 256, (int64_t)16384);
    kv_scatter_kernel<<<blocks, 256, 0, s>>>((bf16 *)kv_layer, block_elems, ids, n,
                                             dtype == PDS_DTYPE_F32, src);
    LAUNCH_CHECK("kv_scatter_kernel");
    return PDS_OK;
}

/* ---- copy and conversion
 * -------------------------------------------------------------------------- */
__global__ void copy_kernel(uint4 *dst, const uint4 *src, int64_t n)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < n; i += stride) dst[i] = src[i];
}

extern "C" pds_status_t pds_cuda_copy(void *dst, const void *src, size_t bytes, cudaStream_t s)
{
    if (bytes % 16)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "copy of %zu bytes: not a multiple of 16", bytes);
    int dev = 0, sms = 132;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    copy_kernel<<<sms * 8, 512, 0, s>>>((uint4 *)dst, (const uint4 *)src, (int64_t)(bytes / 16));
    LAUNCH_CHECK("copy_kernel");
    return PDS_OK;
}

__global__ void f32_to_bf16_kernel(const float *src, int64_t n, bf16 *dst)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

extern "C" pds_status_t pds_cuda_f32_to_bf16(const float *src, int64_t n, uint16_t *dst,
                                             cudaStream_t s)
{
    if (n <= 0) return PDS_OK;
    int blocks = (int)PDS_MIN((n + 255) / 256, (int64_t)16384);
    f32_to_bf16_kernel<<<blocks, 256, 0, s>>>(src, n, (bf16 *)dst);
    LAUNCH_CHECK("f32_to_bf16_kernel");
    return PDS_OK;
}

/* skinny.cu: tensor-core products of a weight matrix with 5 to 64 activation rows — the linear
 * layers of decode steps of 8 to 64 sequences — with the same fused epilogues as gemv.cu.
 *
 * At these batches a decode step is still a stream of the weights (n rows of activations are a
 * few hundred KB against 218 MB of weights per layer), but a CUDA-core dot product per row no
 * longer keeps up, and cuBLASLt's tiles stream the weights at 1.8-2.7 TB/s, with SiLU*mul and
 * RoPE + the K/V write as separate passes. Here one warp owns 16 weight rows and computes them
 * against all n rows with mma.sync m16n8k16 (bf16 in, fp32 accumulate). Each warp runs its own
 * cp.async pipeline (no block barriers): a step is 128 k of its 16 rows (256 contiguous bytes of
 * each row, 4 KB), `stages` steps deep in shared memory. A lane then reads k 8t..8t+7 of rows g
 * and g+8 for each 32-wide block as one 16-byte load and uses the registers as A fragments
 * directly: the K order inside a block is permuted the same way for the weights and for the
 * activations (lane t holds k 8t..8t+7 of both), which a dot product does not notice. The
 * activations (B fragments) come through L1 (prefetched a step ahead), shared by the 4 warps of a
 * CTA. A CTA is 64 rows; where that gives too few CTAs to fill the GPU (the 4096-row o and down
 * projections), a cluster of 2-8 CTAs splits K and rank 0 adds the others' partial sums from their
 * shared memory in rank order (deterministic, no global scratch), then runs the epilogue.
 * The 16 rows of a warp are chosen, as in gemv.cu, so that the epilogue is local to a lane:
 *   - q/k/v: rows i..i+7 and i+hd/2..i+hd/2+7 of a head (RoPE pairs in c0/c2 of the fragment);
 *   - gate/up: gate rows j..j+7 and up rows j..j+7 (SiLU(g) * u written as bf16);
 *   - o/down/LM head: 16 consecutive rows, stored or added into the fp32 residual.
 * Rounding follows the unfused path, as in gemv.cu.
 *
 * Status: correct (tests), but slower than cuBLASLt + the separate kernels, so the engine uses it
 * only with PDS_ENGINE_CUDA_SKINNY=1. H100, llama3-8b, context 1024, decode step: 27.1 ms at
 * batch 32 against 8.36 with cuBLASLt (g|u+silu 382 us against 88 + 6; stages 2: 20.0 ms, 8:
 * 48.8 ms; no L1 prefetch: 32.6 ms). More stages and fewer CTAs per SM make it slower, so the
 * weight stream is not what limits it: each warp waits on its activation loads (L1, which the
 * shared-memory carve-out shrinks, else L2) before every 32-wide block. A first version without
 * shared memory (weights straight into registers, 16 rows x 64 bytes per instruction) ran at
 * 11.7 ms. What it needs: the activations staged in shared memory per K chunk and shared by the
 * CTA's warps, in the same cp.async pipeline as the weights (block barriers per stage), as a
 * conventional GEMM does.
 */
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdlib.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/launch.cuh"

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

#define SK_WARPS       4
#define SK_MAX_N       64
#define SK_MAX_CLUSTER 8
#define SK_STAGE_BYTES 4096 /* one warp's step: 16 rows x 128 k bf16 */

enum { EPI_STORE = 0, EPI_ADD = 1, EPI_SILU = 2, EPI_QKV = 3 };

struct sk_epi {
    void *out; /* EPI_STORE/ADD: [n, M] fp32; EPI_SILU: [n, ffn] bf16; EPI_QKV: [n, M] bf16 */
    int M;     /* output rows of the weight */
    int ffn;   /* EPI_SILU */
    /* EPI_QKV */
    const int32_t *pos, *slots;
    const float *inv_freq;
    bf16 *kv;
    int n_heads, n_kv_heads, head_dim, block_size;
    int prefetch; /* prefetch the next step's activations into L1 */
    int stages;   /* weight stages per warp in shared memory (2..8) */
};

__device__ __forceinline__ void mma_bf16(float *c, uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* cp.async.wait_group with a run-time count (the stage count is a launch parameter) */
__device__ __forceinline__ void sk_wait_group(int n)
{
    switch (n) {
    case 0:
        asm volatile("cp.async.wait_group 0;\n" ::);
        break;
    case 1:
        asm volatile("cp.async.wait_group 1;\n" ::);
        break;
    case 2:
        asm volatile("cp.async.wait_group 2;\n" ::);
        break;
    case 3:
        asm volatile("cp.async.wait_group 3;\n" ::);
        break;
    case 4:
        asm volatile("cp.async.wait_group 4;\n" ::);
        break;
    case 5:
        asm volatile("cp.async.wait_group 5;\n" ::);
        break;
    default:
        asm volatile("cp.async.wait_group 6;\n" ::);
        break;
    }
}

__device__ __forceinline__ float sk_round_bf(float v)
{
    return __bfloat162float(__float2bfloat16_rn(v));
}

/* grid (cluster size, ceil(n_units / SK_WARPS)); warp w of CTA y owns unit y * SK_WARPS + w
 * (16 weight rows, see the file comment); cluster rank r takes K blocks [r*nb/cs, (r+1)*nb/cs).
 * x [n, K] bf16, NT * 8 >= n. */
template <int NT, int EPI>
__global__ void __launch_bounds__(SK_WARPS * 32)
    skinny_kernel(const bf16 *__restrict__ w, const bf16 *__restrict__ x, int K, int n, int n_units,
                  sk_epi ep)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int rank = blockIdx.x, cs = gridDim.x;
    const int unit_raw = blockIdx.y * SK_WARPS + warp;
    const bool live = unit_raw < n_units;
    const int unit = min(unit_raw, n_units - 1);
    int ra, rb, head = 0, hi = 0;
    const bool sk_prefetch_on = ep.prefetch;
    if (EPI == EPI_SILU) {
        ra = min(unit * 8 + g, ep.ffn - 1);
        rb = ra + ep.ffn;
    } else if (EPI == EPI_QKV) {
        const int half = ep.head_dim / 2, p = unit * 8 + g;
        head = p / half, hi = p % half;
        ra = head * ep.head_dim + hi;
        rb = ra + half;
    } else {
        ra = min(unit * 16 + g, ep.M - 1);
        rb = min(unit * 16 + g + 8, ep.M - 1);
    }
    const int nb = K >> 5, K8 = K >> 3;
    const int kb0 = (int)((int64_t)rank * nb / cs), b1 = (int)((int64_t)(rank + 1) * nb / cs);
    const uint4 *xv = (const uint4 *)x + t;
    const int stages = ep.stages, nsteps = (b1 - kb0 + 3) / 4;

    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    /* this warp's stages: [stages][16 rows][128 k] bf16, 16-byte chunk c of row R stored at chunk
     * c ^ ((R & 1) << 2), so that the LDS.128 of rows g and g+1 below hit different banks */
    extern __shared__ __align__(16) unsigned char sk_smem[];
    unsigned char *wst = sk_smem + (size_t)warp * stages * SK_STAGE_BYTES;
    const uint32_t wst_s = (uint32_t)__cvta_generic_to_shared(wst);
    /* copy plan: chunk lane + 32 i of a step is row R = (lane >> 4) + 2 i, chunk col = lane & 15
     * (so one instruction copies 256 contiguous bytes of each of two rows) */
    const int col = lane & 15;
    const bf16 *src[8];
    uint32_t dst[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int R = (lane >> 4) + 2 * i, gg = R & 7, second = R >> 3;
        int row;
        if (EPI == EPI_SILU) {
            row = min(unit * 8 + gg, ep.ffn - 1) + second * ep.ffn;
        } else if (EPI == EPI_QKV) {
            const int half = ep.head_dim / 2, p = unit * 8 + gg;
            row = (p / half) * ep.head_dim + p % half + second * half;
        } else {
            row = min(unit * 16 + R, ep.M - 1);
        }
        src[i] = w + (int64_t)row * K + col * 8;
        dst[i] = (uint32_t)(R * 256 + ((col ^ ((R & 1) << 2)) * 16));
    }
    auto issue = [&](int step) {
        if (step < nsteps) {
            const int bs = kb0 + 4 * step, slot = step % stages;
            const bool ok = bs + (col >> 2) < b1;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const uint32_t d = wst_s + slot * SK_STAGE_BYTES + dst[i];
                const bf16 *sp = ok ? src[i] + bs * 32 : src[i];
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(sp),
                             "r"(ok ? 16 : 0));
            }
        }
        asm volatile("cp.async.commit_group;\n" ::); /* empty groups keep the count uniform */
    };
    /* the step's activations into L1 a step ahead (2 lines of 128 bytes per row), so that the
     * B fragment loads below hit L1 instead of waiting on L2 */
    auto prefetch_x = [&](int step) {
        const int bs = kb0 + 4 * step;
        if (step >= nsteps || !sk_prefetch_on) return;
        for (int q = lane; q < 2 * n; q += 32) {
            const char *p = (const char *)(x + (int64_t)(q >> 1) * K + bs * 32) + (q & 1) * 128;
            asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p));
        }
    };
    /* the first stages' weights do not depend on the previous kernel; x and the outputs do */
    for (int st = 0; st < stages - 1; st++) issue(st);
    pdl_wait();
    pdl_trigger();
    prefetch_x(0);
    for (int step = 0; step < nsteps; step++) {
        sk_wait_group(stages - 2); /* this lane's copies of `step` have landed */
        __syncwarp();              /* and every lane's; the slot read last step is free */
        issue(step + stages - 1);
        prefetch_x(step + 1);
        const unsigned char *sl = wst + (step % stages) * SK_STAGE_BYTES;
        const int bs = kb0 + 4 * step;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (bs + j < b1) { /* warp-uniform */
                /* lane (g, t): k 8t..8t+7 of block j for rows g and g + 8 (the permuted K order
                 * of the file comment); chunk 4j + t, swizzled as stored */
                const int ch = (4 * j + t) ^ ((g & 1) << 2);
                const uint4 A = *(const uint4 *)(sl + g * 256 + ch * 16);
                const uint4 B = *(const uint4 *)(sl + (g + 8) * 256 + ch * 16);
                uint4 xb[NT];
#pragma unroll
                for (int i = 0; i < NT; i++) {
                    const int r = i * 8 + g;
                    xb[i] =
                        r < n ? __ldg(xv + (int64_t)r * K8 + (bs + j) * 4) : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
                for (int i = 0; i < NT; i++) {
                    mma_bf16(acc[i], A.x, B.x, A.y, B.y, xb[i].x, xb[i].y);
                    mma_bf16(acc[i], A.z, B.z, A.w, B.w, xb[i].z, xb[i].w);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncwarp();              /* the stages are free: the partial sums below reuse them */
    float *red = (float *)wst; /* [NT*4][lane] this warp's partial sums */

    if (cs > 1) { /* rank 0 adds the other ranks' partial sums, in rank order */
        cg::cluster_group cl = cg::this_cluster();
#pragma unroll
        for (int i = 0; i < NT; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) red[(i * 4 + e) * 32 + lane] = acc[i][e];
        cl.sync();
        if (rank == 0) {
            for (int r = 1; r < cs; r++) {
                const float *rem = cl.map_shared_rank(red, r); /* same warp, rank r */
#pragma unroll
                for (int i = 0; i < NT; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[i][e] += rem[(i * 4 + e) * 32 + lane];
            }
        }
        cl.sync(); /* no CTA leaves while rank 0 reads its shared memory */
        if (rank != 0) return;
    }
    if (!live) return;

        /* fragment: acc[i][h] = (row ra, column i*8 + 2t + h), acc[i][2 + h] = (row rb, same) */
#pragma unroll
    for (int i = 0; i < NT; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int col = i * 8 + 2 * t + h;
            if (col >= n) continue;
            const float a = acc[i][h], b = acc[i][2 + h];
            if (EPI == EPI_STORE || EPI == EPI_ADD) {
                float *y = (float *)ep.out + (int64_t)col * ep.M;
                const int r0 = unit * 16 + g, r1 = r0 + 8;
                if (EPI == EPI_ADD) {
                    if (r0 < ep.M) y[r0] += a;
                    if (r1 < ep.M) y[r1] += b;
                } else {
                    if (r0 < ep.M) y[r0] = a;
                    if (r1 < ep.M) y[r1] = b;
                }
            } else if (EPI == EPI_SILU) {
                const int j = unit * 8 + g;
                if (j < ep.ffn) {
                    const float gt = sk_round_bf(a), u = sk_round_bf(b);
                    ((bf16 *)ep.out)[(int64_t)col * ep.ffn + j] =
                        __float2bfloat16_rn(gt / (1.0f + expf(-gt)) * u);
                }
            } else {
                const float x0 = sk_round_bf(a), x1 = sk_round_bf(b);
                bf16 y0 = __float2bfloat16_rn(x0), y1 = __float2bfloat16_rn(x1);
                const int H = ep.n_heads, KVH = ep.n_kv_heads, hd = ep.head_dim;
                if (head < H + KVH) { /* q or k head: RoPE on the pair, as rope_kv_kernel */
                    float ang = (float)ep.pos[col] * ep.inv_freq[hi];
                    float sn, cn;
                    sincosf(ang, &sn, &cn);
                    y0 = __float2bfloat16_rn(x0 * cn - x1 * sn);
                    y1 = __float2bfloat16_rn(x1 * cn + x0 * sn);
                }
                bf16 *row = (bf16 *)ep.out + (int64_t)col * ep.M;
                row[ra] = y0;
                row[rb] = y1;
                if (head >= H) {
                    const int slot = ep.slots[col], bs = ep.block_size;
                    const int blk = slot / bs, off = slot % bs;
                    const int64_t kvw = (int64_t)KVH * hd;
                    const int sel = head < H + KVH ? 0 : 1, kh = head - H - sel * KVH;
                    bf16 *dst =
                        ep.kv + ((int64_t)(blk * 2 + sel) * bs + off) * kvw + (int64_t)kh * hd;
                    dst[hi] = y0;
                    dst[hi + hd / 2] = y1;
                }
            }
        }
}

/* PDS_ENGINE_CUDA_SKINNY_CTAS: CTAs per SM the K split fills up to (default 3, what fits at
 * once with 4 stages); PDS_ENGINE_CUDA_SKINNY_PF=0: no L1 prefetch of the activations;
 * PDS_ENGINE_CUDA_SKINNY_STAGES: weight stages per warp (2..8, default 4; 16 KB per stage and
 * CTA). */
static int sk_env(const char *name, int dflt)
{
    const char *e = getenv(name);
    return e && *e ? atoi(e) : dflt;
}

template <int NT, int EPI>
static cudaError_t sk_launch_nt(const bf16 *w, const bf16 *x, int K, int n, int n_units,
                                const sk_epi &ep, int cs, cudaStream_t s)
{
    const size_t smem = (size_t)SK_WARPS * ep.stages * SK_STAGE_BYTES;
    static size_t raised = 48 * 1024; /* per instance: the dynamic shared memory allowed so far */
    if (smem > raised) {
        cudaError_t e = cudaFuncSetAttribute(
            skinny_kernel<NT, EPI>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        raised = smem;
    }
    return pds_launch_cluster(skinny_kernel<NT, EPI>,
                              dim3((unsigned)cs, (unsigned)((n_units + SK_WARPS - 1) / SK_WARPS)),
                              dim3(SK_WARPS * 32), smem, s, (unsigned)cs, w, x, K, n, n_units, ep);
}

template <int EPI>
static pds_status_t skinny_launch(const uint16_t *w, int K, const uint16_t *x, int n, int n_units,
                                  const sk_epi &ep, cudaStream_t s)
{
    if (n < 1 || n > SK_MAX_N || K % 32 != 0 || n_units < 1)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "skinny gemm: %d rows, K %d", n, K);
    int dev = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return PDS_ERR(PDS_ERR_DEVICE, "skinny gemm: %s", cudaGetErrorString(e));
    /* split K over a cluster while the grid still fits on the GPU at once (per_sm CTAs per SM),
     * keeping >= 8 blocks of 32 (two steps) per rank */
    const int ctas = (n_units + SK_WARPS - 1) / SK_WARPS, nb = K / 32;
    static int per_sm = -1, pf = -1, stages = -1;
    if (per_sm < 0) per_sm = PDS_MAX(1, sk_env("PDS_ENGINE_CUDA_SKINNY_CTAS", 3));
    if (pf < 0) pf = sk_env("PDS_ENGINE_CUDA_SKINNY_PF", 1) != 0;
    if (stages < 0) stages = PDS_MIN(8, PDS_MAX(2, sk_env("PDS_ENGINE_CUDA_SKINNY_STAGES", 4)));
    int cs = 1;
    while (cs < SK_MAX_CLUSTER && 2 * cs * ctas <= per_sm * sms && nb / (2 * cs) >= 8) cs *= 2;
    sk_epi epp = ep;
    epp.prefetch = pf;
    epp.stages = stages;
    const bf16 *W = (const bf16 *)w, *X = (const bf16 *)x;
    const int nt = (n + 7) / 8;
    switch (nt) {
    case 1:
        e = sk_launch_nt<1, EPI>(W, X, K, n, n_units, epp, cs, s);
        break;
    case 2:
        e = sk_launch_nt<2, EPI>(W, X, K, n, n_units, epp, cs, s);
        break;
    case 3:
        e = sk_launch_nt<3, EPI>(W, X, K, n, n_units, epp, cs, s);
        break;
    case 4:
        e = sk_launch_nt<4, EPI>(W, X, K, n, n_units, epp, cs, s);
        break;
    case 5:
    case 6:
        e = sk_launch_nt<6, EPI>(W, X, K, n, n_units, epp, cs, s);
        break;
    default:
        e = sk_launch_nt<8, EPI>(W, X, K, n, n_units, epp, cs, s);
        break;
    }
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess)
        return PDS_ERR(PDS_ERR_DEVICE, "launch of skinny_kernel: %s", cudaGetErrorString(e));
    return PDS_OK;
}

extern "C" int pds_cuda_skinny_max_rows(void)
{
    return SK_MAX_N;
}

extern "C" pds_status_t pds_cuda_skinny_f32(const uint16_t *w, int M, int K, const uint16_t *x,
                                            int n, float *y, int accumulate, cudaStream_t s)
{
    if (M < 1) return PDS_ERR(PDS_ERR_UNSUPPORTED, "skinny gemm: M %d", M);
    sk_epi ep = {};
    ep.out = y;
    ep.M = M;
    const int units = (M + 15) / 16;
    if (accumulate) return skinny_launch<EPI_ADD>(w, K, x, n, units, ep, s);
    return skinny_launch<EPI_STORE>(w, K, x, n, units, ep, s);
}

extern "C" pds_status_t pds_cuda_skinny_silu(const uint16_t *w_gu, int ffn, int K,
                                             const uint16_t *x, int n, uint16_t *act,
                                             cudaStream_t s)
{
    if (ffn < 1) return PDS_ERR(PDS_ERR_UNSUPPORTED, "skinny silu: ffn %d", ffn);
    sk_epi ep = {};
    ep.out = act;
    ep.M = 2 * ffn;
    ep.ffn = ffn;
    return skinny_launch<EPI_SILU>(w_gu, K, x, n, (ffn + 7) / 8, ep, s);
}

extern "C" pds_status_t pds_cuda_skinny_qkv_rope(const uint16_t *wqkv, int K, const uint16_t *x,
                                                 int n, const int32_t *pos, const int32_t *slots,
                                                 int n_heads, int n_kv_heads, int head_dim,
                                                 const float *inv_freq, uint16_t *qkv,
                                                 uint16_t *kv_layer, int block_size, cudaStream_t s)
{
    if (head_dim % 16)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "skinny qkv: head_dim %d (a multiple of 16)", head_dim);
    sk_epi ep = {};
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
    return skinny_launch<EPI_QKV>(wqkv, K, x, n, ep.M / 16, ep, s);
}

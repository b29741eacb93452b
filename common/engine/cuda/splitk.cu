/* splitk.cu: y = x . w^T for a weight matrix and 1 to 64 activation rows — the plain linear layers
 * of decode steps of 8 to 64 sequences — on tensor cores, with K split over a thread-block cluster.
 *
 * Why: at these batches a linear layer is a stream of its weights, and cuBLASLt's kernels for it
 * are latency-bound rather than bandwidth-bound (the o projection still takes 15 us with its 32 MB
 * of weights already in L2): M/64 tiles are too few CTAs for 132 SMs, and each runs a long serial
 * K loop. Here a CTA (4 warps) owns a tile of 64 weight rows x NT activation rows (NT = n rounded
 * up to 8, 16, 32 or 64; warp w owns rows 16w..16w+15 and all NT columns) over a K range, and a
 * cluster of CS CTAs splits K: rank r takes [r*K/CS, (r+1)*K/CS). The host picks CS so that the
 * grid holds about two CTAs per SM while each CTA's K range stays between 512 and 2048 (llama3-8b
 * on 132 SMs: q|k|v 6144x4096 and o 4096x4096 CS 4, gate|up 28672x4096 CS 2, down 4096x14336 CS 8).
 *
 * Main loop, a conventional multistage GEMM: a stage is 64 k — the weight tile (64 rows x 128
 * bytes, 8 KB) and the activation tile (NT rows x 128 bytes) — copied by cp.async.cg into a ring
 * of `stages` slots in dynamic shared memory (PDS_ENGINE_CUDA_SPLITK_STAGES, 2..8, default 4; the
 * weights with an L2 evict-first hint, as they are read once), one __syncthreads per stage. Each
 * 16-byte chunk c of a 128-byte row R is stored at chunk c ^ (R & 7), so the eight row addresses
 * of an ldmatrix phase fall in eight different bank groups. Both operands are K-contiguous, which
 * is what non-transposed ldmatrix gives for mma.sync m16n8k16's A ("row", the weights) and B
 * ("col", the activations). Activation rows n..8*ceil(n/8)-1 are zero-filled (cp.async with source
 * size 0, never a read past x) and 8-row blocks past n are neither copied nor multiplied. The
 * first stages' weight copies are issued before pdl_wait() (they do not depend on the previous
 * kernel), the activations after it.
 *
 * Reduction, deterministic and without global scratch: each CTA leaves its fp32 partial tile in
 * its own shared memory (the ring, reused), cluster barrier, then rank r finishes rows
 * [r*64/CS, (r+1)*64/CS) of the tile for all n columns, adding the CS partials in rank order
 * through distributed shared memory, and writes them: bf16 (round to nearest even) or fp32 added
 * into y (the residual add; each element has one writer, no atomics). A second cluster barrier
 * keeps every CTA's shared memory alive until the others have read it. The summation order is
 * fixed by the shape alone, so two runs give bit-identical outputs.
 *
 * Trade-offs: no fused epilogues (RoPE, SiLU) — it replaces the cuBLASLt call only, next to the
 * separate kernels. Each of the M/64 row tiles reads the activations of its K range again, from L2:
 * tiles x n x K x 2 bytes, which is n/64 of the weight bytes (half at n = 32, as much at n = 64) —
 * L2 serves it faster than DRAM serves the weights, but a 128-row tile (8 warps) would halve it.
 * Padding n up to NT costs tensor-core work only where n is not a multiple of 8.
 *
 * Status: correct (its CPU-reference test and the whole GPU suite with it on pass on an H100) but
 * slower than cuBLASLt at every shape, so the engine uses it only with PDS_ENGINE_CUDA_SPLITK=1.
 * Measured 2026-11-25, llama3-8b, batch 32, per layer: q|k|v 28.5 us (cuBLASLt 25.9), o 23.4 (21),
 * gate|up 99 (88), down 69 (49.5); decode step 9.16-9.18 ms vs 8.05-8.07 (3 stages 9.15, 6 stages
 * 9.90). Even gate|up, with 896 CTAs, streams at only 2.4 TB/s, so the main loop itself falls
 * short, not the split: a stage reads 128 bytes of each of 64 rows 8 KB apart; longer runs per
 * row (BK 128-256) and fewer barriers per byte are the next thing to try.
 */
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <stdlib.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/launch.cuh"

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

#define SPK_THREADS     128                   /* 4 warps */
#define SPK_BM          64                    /* weight rows per CTA */
#define SPK_BK          64                    /* k per stage */
#define SPK_MAX_N       64                    /* activation rows */
#define SPK_MAX_CLUSTER 8                     /* CTAs splitting K (the portable cluster limit) */
#define SPK_MIN_KSPAN   512                   /* k per CTA, at least ... */
#define SPK_MAX_KSPAN   2048                  /* ... and, where the cluster allows, at most */
#define SPK_W_BYTES     (SPK_BM * SPK_BK * 2) /* a stage's weight tile, 8 KB */
#define SPK_RED_LD      68 /* floats between columns of the partial tile: 64 + 4 against conflicts */

__device__ __forceinline__ void spk_mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void spk_ldsm_x4(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* cp.async.wait_group with a run-time count (the stage count is a launch parameter) */
__device__ __forceinline__ void spk_wait_group(int n)
{
    switch (n) {
    case 0:
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        break;
    case 1:
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        break;
    case 2:
        asm volatile("cp.async.wait_group 2;\n" ::: "memory");
        break;
    case 3:
        asm volatile("cp.async.wait_group 3;\n" ::: "memory");
        break;
    case 4:
        asm volatile("cp.async.wait_group 4;\n" ::: "memory");
        break;
    case 5:
        asm volatile("cp.async.wait_group 5;\n" ::: "memory");
        break;
    default:
        asm volatile("cp.async.wait_group 6;\n" ::: "memory");
        break;
    }
}

/* grid (M/64 * cs): CTA b is rank b % cs of the cluster for weight rows [64 (b / cs), +64).
 * w [M, K], x [n, K] bf16; y [n, M] bf16 (out_f32 0) or fp32 added into (out_f32 1).
 * K a multiple of 64 * cs; n <= NT. Dynamic shared memory: stages * (8 KB + NT * 128) (64 KB at
 * NT 64, 4 stages: 3 CTAs per SM, hence the register bound; without one, ptxas spilled at NT 64).
 */
template <int NT>
__global__ void __launch_bounds__(SPK_THREADS, 3)
    splitk_kernel(const bf16 *__restrict__ w, const bf16 *__restrict__ x, void *y, int M, int K,
                  int n, int out_f32, int cs, int stages)
{
    constexpr int XB = NT * SPK_BK * 2; /* a stage's activation tile */
    constexpr int SB = SPK_W_BYTES + XB;
    static_assert(2 * SB >= NT * SPK_RED_LD * 4, "the partial tile fits in the ring");
    extern __shared__ __align__(128) unsigned char spk_smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rank = (int)(blockIdx.x % (unsigned)cs),
              m0 = (int)(blockIdx.x / (unsigned)cs) * SPK_BM;
    const int kspan = K / cs, k0 = rank * kspan, nst = kspan / SPK_BK;
    const int nblk = (n + 7) >> 3; /* 8-row blocks of x that hold rows */
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(spk_smem);

    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));

    /* copy plan: 16-byte chunk c = tid & 7 of weight rows tid/8 + 16q (q = 0..3): eight threads
     * copy one row's 128 contiguous bytes */
    const int cc = tid & 7;
    const bf16 *wsrc = w + (int64_t)(m0 + (tid >> 3)) * K + k0 + cc * 8;
    const uint32_t wdst = (uint32_t)((tid >> 3) * 128 + ((cc ^ ((tid >> 3) & 7)) * 16));
    auto issue_w = [&](int st) {
        if (st >= nst) return;
        const uint32_t d = ring + (uint32_t)((st % stages) * SB) + wdst;
        const bf16 *sp = wsrc + st * SPK_BK;
#pragma unroll
        for (int q = 0; q < 4; q++)
            asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, 16, %2;\n" ::"r"(
                             d + q * 16 * 128),
                         "l"(sp + (int64_t)q * 16 * K), "l"(pol)
                         : "memory");
    };
    auto issue_x = [&](int st) {
        if (st >= nst) return;
        const uint32_t d = ring + (uint32_t)((st % stages) * SB + SPK_W_BYTES);
        for (int i = tid; i < nblk * 64; i += SPK_THREADS) {
            const int r = i >> 3, c = i & 7;
            const bool ok = r < n;
            const bf16 *sp = ok ? x + (int64_t)r * K + k0 + st * SPK_BK + c * 8 : x;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                             d + (uint32_t)(r * 128 + ((c ^ (r & 7)) * 16))),
                         "l"(sp), "r"(ok ? 16 : 0)
                         : "memory");
        }
    };

    /* prologue: the weights of stages 0..stages-2 (independent of the previous kernel), then,
     * once its writes are visible, the activations; group s holds stage s's activations (and
     * group 0 all the prologue's weights) */
    for (int st = 0; st < stages - 1; st++) issue_w(st);
    pdl_wait();
    pdl_trigger();
    for (int st = 0; st < stages - 1; st++) {
        issue_x(st);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }

    float acc[NT / 8][4];
#pragma unroll
    for (int j = 0; j < NT / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    /* ldmatrix addresses (byte offsets in a slot). A, k step kk: lanes 0-7 / 8-15 / 16-23 / 24-31
     * give rows 0-7 / 8-15 / 0-7 / 8-15 of the warp's 16 at k 0-7 / 0-7 / 8-15 / 8-15 of the
     * step = a0..a3. B, block j, half h: lanes 8i..8i+7 give rows 8j..8j+7 at k chunk 4h + i =
     * b0, b1 of k step 2h, then b0, b1 of k step 2h + 1. (R & 7 == lane & 7 in both.) */
    const int ar = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, sw = lane & 7;
    const uint32_t a_off = (uint32_t)(ar * 128);
    const uint32_t b_off = (uint32_t)(SPK_W_BYTES + (lane & 7) * 128);

    for (int st = 0; st < nst; st++) {
        spk_wait_group(stages - 2); /* this thread's copies of stage st have landed */
        __syncthreads();            /* everyone's, and slot (st - 1) % stages is read */
        issue_w(st + stages - 1);
        issue_x(st + stages - 1);
        asm volatile("cp.async.commit_group;\n" ::: "memory"); /* empty groups keep the count */
        const uint32_t slot = ring + (uint32_t)((st % stages) * SB);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            uint32_t a[2][4];
#pragma unroll
            for (int s2 = 0; s2 < 2; s2++) {
                const int ch = 2 * (2 * h + s2) + (lane >> 4);
                spk_ldsm_x4(a[s2], slot + a_off + (uint32_t)((ch ^ sw) * 16));
            }
            const int bch = 4 * h + (lane >> 3);
#pragma unroll
            for (int j = 0; j < NT / 8; j++) {
                if (j < nblk) { /* CTA-uniform */
                    uint32_t b[4];
                    spk_ldsm_x4(b, slot + b_off + (uint32_t)(j * 8 * 128 + ((bch ^ sw) * 16)));
                    spk_mma(acc[j], a[0], b[0], b[1]);
                    spk_mma(acc[j], a[1], b[2], b[3]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads(); /* the ring is free: the partial tile reuses it */

    /* partial tile red[col][row] (col < 8 nblk, row < 64, SPK_RED_LD apart); fragment: acc[j][h]
     * = (row g, column 8j + 2t + h), acc[j][2 + h] = (row g + 8, same) */
    float *red = (float *)spk_smem;
    {
        const int g = lane >> 2, t = lane & 3, r0 = warp * 16 + g;
#pragma unroll
        for (int j = 0; j < NT / 8; j++) {
            if (j < nblk) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int col = 8 * j + 2 * t + h;
                    red[col * SPK_RED_LD + r0] = acc[j][h];
                    red[col * SPK_RED_LD + r0 + 8] = acc[j][2 + h];
                }
            }
        }
    }
    cg::cluster_group cl = cg::this_cluster();
    if (cs > 1)
        cl.sync();
    else
        __syncthreads();

    /* rank r: rows [r*64/cs, (r+1)*64/cs) of the tile, every column; consecutive threads take
     * consecutive rows (coalesced stores); partials added in rank order */
    const int rb = rank * SPK_BM / cs, re = (rank + 1) * SPK_BM / cs, nr = re - rb;
    for (int e = tid; e < nr * n; e += SPK_THREADS) {
        const int col = e / nr, row = rb + e % nr, idx = col * SPK_RED_LD + row;
        float sum = red[idx];
        if (cs > 1) {
            sum = cl.map_shared_rank(red, 0)[idx];
            for (int q = 1; q < cs; q++) sum += cl.map_shared_rank(red, q)[idx];
        }
        const int64_t o = (int64_t)col * M + m0 + row;
        if (out_f32)
            ((float *)y)[o] += sum;
        else
            ((bf16 *)y)[o] = __float2bfloat16_rn(sum);
    }
    if (cs > 1) cl.sync(); /* no CTA leaves while another reads its shared memory */
}

static int spk_env(const char *name, int dflt)
{
    const char *e = getenv(name);
    return e && *e ? atoi(e) : dflt;
}

template <int NT>
static cudaError_t spk_launch_nt(const bf16 *w, int M, int K, const bf16 *x, int n, void *y,
                                 int out_f32, int cs, int stages, cudaStream_t s)
{
    const size_t smem = (size_t)stages * (SPK_W_BYTES + NT * SPK_BK * 2);
    static size_t raised = 48 * 1024; /* per instance: the dynamic shared memory allowed so far */
    if (smem > raised) {
        cudaError_t e = cudaFuncSetAttribute(
            splitk_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        raised = smem;
    }
    return pds_launch_cluster(splitk_kernel<NT>, dim3((unsigned)(M / SPK_BM * cs)),
                              dim3(SPK_THREADS), smem, s, (unsigned)cs, w, x, y, M, K, n, out_f32,
                              cs, stages);
}

/* The cluster size for M x K: the smallest power of two that gives the grid about two CTAs per
 * SM (7/4 x SMs, so that 64 tiles x 4 on 132 SMs qualifies) and at most SPK_MAX_KSPAN k per CTA;
 * never below SPK_MIN_KSPAN k per CTA, and K must split into whole 64-k stages.
 * PDS_ENGINE_CUDA_SPLITK_CLUSTER forces a size where the shape allows it. */
static int spk_cluster(int M, int K, int sms, int forced)
{
    const int64_t tiles = M / SPK_BM;
    auto ok = [&](int c) { return K % (SPK_BK * c) == 0 && (c == 1 || K / c >= SPK_MIN_KSPAN); };
    if (forced >= 1 && forced <= SPK_MAX_CLUSTER && ok(forced)) return forced;
    int cs = 1;
    while (cs < SPK_MAX_CLUSTER && ok(2 * cs) &&
           (4 * tiles * cs < 7 * (int64_t)sms || K / cs > SPK_MAX_KSPAN))
        cs *= 2;
    return cs;
}

extern "C" int pds_cuda_splitk_fits(int M, int K, int n)
{
    return M >= SPK_BM && M % SPK_BM == 0 && K >= SPK_BK && K % SPK_BK == 0 && n >= 1 &&
           n <= SPK_MAX_N;
}

extern "C" pds_status_t pds_cuda_splitk_gemm(const uint16_t *w, int M, int K, const uint16_t *x,
                                             int n, void *y, int out_f32, cudaStream_t s)
{
    if (!pds_cuda_splitk_fits(M, K, n))
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "splitk gemm: M %d, K %d, %d rows", M, K, n);
    static int sms = 0, stages = 0, forced = 0;
    if (sms == 0) {
        int dev = 0;
        cudaError_t e = cudaGetDevice(&dev);
        if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (e != cudaSuccess) {
            sms = 0;
            return PDS_ERR(PDS_ERR_DEVICE, "splitk gemm: %s", cudaGetErrorString(e));
        }
        stages = PDS_MIN(8, PDS_MAX(2, spk_env("PDS_ENGINE_CUDA_SPLITK_STAGES", 4)));
        forced = spk_env("PDS_ENGINE_CUDA_SPLITK_CLUSTER", 0);
    }
    const int cs = spk_cluster(M, K, sms, forced);
    const bf16 *W = (const bf16 *)w, *X = (const bf16 *)x;
    const int of = out_f32 ? 1 : 0;
    cudaError_t e;
    if (n <= 8)
        e = spk_launch_nt<8>(W, M, K, X, n, y, of, cs, stages, s);
    else if (n <= 16)
        e = spk_launch_nt<16>(W, M, K, X, n, y, of, cs, stages, s);
    else if (n <= 32)
        e = spk_launch_nt<32>(W, M, K, X, n, y, of, cs, stages, s);
    else
        e = spk_launch_nt<64>(W, M, K, X, n, y, of, cs, stages, s);
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess)
        return PDS_ERR(PDS_ERR_DEVICE, "launch of splitk_kernel: %s", cudaGetErrorString(e));
    return PDS_OK;
}

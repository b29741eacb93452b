/* splitk.cu: y = x . w^T for a weight matrix and 1 to 64 activation rows — the plain linear layers
 * of decode steps of 8 to 64 sequences — on tensor cores, with K split over a thread-block cluster.
 *
 * Why: at these batches a linear layer is a stream of its weights, and cuBLASLt's kernels for it
 * are latency-bound rather than bandwidth-bound (the o projection still takes 15 us with its 32 MB
 * of weights already in L2): M/64 tiles are too few CTAs for 132 SMs, and each runs a long serial
 * K loop. Here a CTA of WARPS warps (4 or 8) owns a tile of BM = 16 MT WARPS weight rows (64 or
 * 128) x NT activation rows (NT = n rounded up to 8, 16, 32 or 64; warp w owns rows 16 MT w ..
 * 16 MT (w + 1) - 1 and all NT columns, so the warps of a tile share one copy of the activations;
 * MT, the 16-row tiles per warp, is 2 for 4 warps at NT 64 where M allows, else 1) over a K range,
 * and a cluster of CS CTAs splits K: rank r takes [r*K/CS, (r+1)*K/CS). The host picks the largest
 * CS (a power of two up to 8, at least 512 k per CTA) whose grid still fits on the GPU in one wave
 * (cudaOccupancyMaxActiveClusters for the variant and its shared memory), so that every CTA
 * streams at once and no partial second wave trails. On an H100 (132 SMs) with the default
 * variants below that is, for llama3-8b, q|k|v 6144x4096 CS 4 (192 CTAs), o 4096x4096 CS 4 (256),
 * down 4096x14336 CS 4 (256), gate|up 28672x4096 CS 1 (224). Measured there, clusters of 8 were
 * slower than of 4 even where they fitted (o: CS 2 20.9 us, 4 19.0, 8 24.7).
 * PDS_ENGINE_CUDA_SPLITK_GRID=1 restores the first version's rule (the smallest CS giving about
 * 7/4 CTAs per SM and at most 2048 k per CTA), which with fewer resident CTAs per SM than that
 * version had runs in 1.5 to 2 waves.
 *
 * Main loop, a conventional multistage GEMM: a stage is BK k (64, 128 or 256) — the weight tile
 * (BM rows x 2 BK bytes: 8 to 64 KB) and the activation tile (NT rows x 2 BK bytes) — copied by
 * cp.async.cg into a ring of `stages` slots in dynamic shared memory (the weights with an L2
 * evict-first hint, as they are read once), one __syncthreads per stage. Each warp-wide copy
 * instruction takes 512 contiguous bytes of weights: 4 rows x 128 (BK 64), 2 x 256 (BK 128) or one
 * row's 512 (BK 256), so a longer BK reads each row in longer runs per stage. Each 16-byte chunk c
 * of a row R is stored at chunk c ^ (R & 7) (only the low three bits of c change, so a row keeps
 * its 2 BK bytes), so the eight row addresses of an ldmatrix phase fall in eight different bank
 * groups. Both operands are K-contiguous, which is what non-transposed ldmatrix gives for
 * mma.sync m16n8k16's A ("row", the weights) and B ("col", the activations); per k16 step a warp
 * loads MT A fragments and one B fragment per pair of 8-row activation blocks. Activation rows
 * n..8*ceil(n/8)-1 are zero-filled (cp.async with source size 0, never a read past x) and 8-row
 * blocks past n are neither copied nor multiplied. The first stages' weight copies are issued
 * before pdl_wait() (they do not depend on the previous kernel), the activations after it.
 *
 * Variants, chosen on the host without a rebuild (the environment is read once):
 * PDS_ENGINE_CUDA_SPLITK_WARPS 4|8, PDS_ENGINE_CUDA_SPLITK_BK 64|128|256 and
 * PDS_ENGINE_CUDA_SPLITK_STAGES 2..8. Where none is set, the default: for M <= 4096 (o, down) 4
 * warps, BK 128 and 3 stages (72 KB at NT 32: three CTAs per SM; at NT 64 two 16-row tiles per
 * warp and the stage rule below), else 8 warps, BK 128 and the most stages, up to 4, with which
 * two CTAs fit on an SM (2 x 80 KB at NT 32). Where some are set, the others are 8 warps, BK 128
 * and that stage rule. Whatever is asked, 4 warps where M is not a multiple of 128, BK halved
 * until it divides K, and stages capped at what one CTA may have. PDS_ENGINE_CUDA_SPLITK_CLUSTER
 * forces CS where the shape allows it, and PDS_ENGINE_CUDA_SPLITK_GRID picks the CS rule (above).
 * pds_cuda_splitk_gemm_cfg() takes warps, BK and stages as arguments (the test runs several).
 * Registers are bounded for 24 warps per SM up to NT 32 (54-80 used) and 16 at NT 64 (104-128);
 * of the 39 instantiations only a variant no default picks (NT 64, 4 warps, BK 256, two tiles)
 * spills (44 bytes, since the SPK_SILU addressing came in).
 *
 * Reduction, deterministic and without global scratch: each CTA leaves its fp32 partial tile in
 * its own shared memory (the ring, reused), cluster barrier, then rank r finishes rows
 * [r*BM/CS, (r+1)*BM/CS) of the tile for all n columns, adding the CS partials in rank order
 * through distributed shared memory, and writes them: bf16 (round to nearest even) or fp32 added
 * into y (the residual add; each element has one writer, no atomics). A second cluster barrier
 * keeps every CTA's shared memory alive until the others have read it. The summation order is
 * fixed by the shape and the variant alone, so two runs give bit-identical outputs.
 *
 * The RMSNorm and SiLU*mul fused in (NORM, SPK_SILU; pds_cuda_splitk_norm_gemm): a decode step
 * at batch 32 spends ~0.2 ms in its 65 RMSNorm launches and ~0.13 ms in the 32 SiLU*mul ones
 * (measured by leaving them out, H100, 2026-11-25), mostly launch and drain, not bytes. Here the
 * activations arrive as the fp32 residual stream (up to 32 rows): each thread loads its 16-byte
 * chunks of the next stage's rows, and the norm weights' chunk, into registers while the current
 * stage is multiplied, then converts them (x times the norm weight, rounded to bf16) into that
 * stage's activation tile, laid out as the bf16 copies would be, so the product itself is the
 * plain kernel's; it also adds up x^2 of its chunks. (A first version built the B fragments from
 * an fp32 tile in every warp: 8 warps repeating the same conversion made q|k|v 35 us and gate|up
 * 105 us per layer at batch 32, slower than the unfused pair.) After the K loop each row's sum
 * goes to shared memory beside the partial tile (a row's threads are lanes of one warp), the
 * cluster barrier before the reduction makes it visible, and the finishing rank sums the CTAs'
 * in rank order: r = 1 / sqrt(sum / K + eps) per activation row scales the reduced product
 * (linear, so applying r after the product is exact up to where bf16 rounding happens).
 * SPK_SILU takes each tile's weight rows half from gate and half from up (the same output
 * columns), so the finishing rank has both and writes silu(g) * u.
 *
 * Trade-offs: no RoPE epilogue (q|k|v still goes through rope_kv_kernel). Each of the M/BM row
 * tiles reads the activations of its K range again, from L2: n/BM of the weight bytes (a quarter at
 * n = 32 with 128-row tiles), and every warp reads the whole activation tile from shared memory (at
 * NT 64 and 8 warps four times the weight bytes; halving that with two tiles per warp helped down
 * but not o or q|k|v, so n = 64 loses mostly elsewhere). Padding n up to NT costs tensor-core work
 * only where n is not a multiple of 8. The ring is the only thing in flight: a CTA has stages - 1
 * of them outstanding, so deeper rings cost resident CTAs, and longer runs per row (BK 128)
 * measured better than more, shorter stages.
 *
 * Status: the engine uses it for decode steps of up to 16 rows (engine_cuda.c; measured,
 * alternating with cuBLASLt in one call: batch 3/4/8/16 1-5% faster, 24-32 even, larger slower).
 * The first version (4 warps, BM 64, BK 64, 4 stages, 119 registers at NT 32) was slower than
 * cuBLASLt at every shape (llama3-8b batch 32 per layer, Nsight Compute: q|k|v 27.7 us vs 25.9,
 * o 22.4 vs 19-21, gate|up 100.6 vs 88, down 69 vs 49.5; DRAM at 48-71%). This version's defaults,
 * timed 2026-11-25 on an H100 by a scratch harness (20 calls back to back over 4 copies of the
 * weights, so from DRAM; median of 9; PDL off; cuBLASLt the best of its 8 heuristic candidates
 * timed the same way), us per call, ours (cuBLASLt): batch  8: q|k|v 22.8 (21.8), o 16.8 (17.4),
 * gate|up 84.8 (83.9), down 45.4 (46.7) batch 16: q|k|v 23.6 (22.3), o 17.7 (15.7), gate|up 87.0
 * (84.8), down 46.7 (46.5) batch 32: q|k|v 24.7 (22.2), o 19.2 (16.0), gate|up 85.0 (85.5),
 * down 48.3 (47.2) batch 64: q|k|v 28.3 (22.1), o 27.8 (16.1), gate|up 89.7 (87.3), down 62.0
 * (45.4) so about even for gate|up and down up to batch 32, behind on q|k|v and o, far behind
 * at 64. With PDL on (consecutive calls overlap), batch 32, q|k|v / o / gate|up / down: this code
 * with the first version's parameters (4 warps, BK 64, 4 stages, its CS rule) 22.9 / 21.2 / 94.8
 * / 63.2 us, with the defaults 22.7 / 17.6 / 85.2 / 48.5. Decode step (pdserve-bench-cuda,
 * llama3-8b, context 1024, two calls), cuBLASLt -> PDS_ENGINE_CUDA_SPLITK=1 with the defaults:
 * batch 8 6.861
 * -> 6.634 ms, 16 7.17-7.21 -> 7.130, 24 7.54-7.56 -> 7.634, 32 8.036-8.055 -> 8.121 (the first
 * version: 9.16 vs 8.05), 48 8.85-8.89 -> 9.692, 64 9.638 -> 10.934; every other variant tried
 * there (8 warps throughout, BK 256, 4 warps with the two-CTA stage rule) was slower.
 */
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <stdlib.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/kv_slot.cuh"
#include "engine/cuda/launch.cuh"

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

#define SPK_MAX_N       64     /* activation rows */
#define SPK_MAX_CLUSTER 8      /* CTAs splitting K (the portable cluster limit) */
#define SPK_MIN_KSPAN   512    /* k per CTA, at least ... */
#define SPK_MAX_KSPAN   2048   /* ... and, where the cluster allows, at most */
#define SPK_SMEM_CTA    232448 /* dynamic shared memory one CTA may have (227 KB on sm_90) */
#define SPK_SMEM_HALF   115712 /* ... and each of two CTAs on one SM (228 KB - 2 x 1 KB reserved) */

/* Minimum CTAs per SM for the register bound: 24 warps per SM (80 registers a thread) up to NT 32,
 * 16 (128 registers) at NT 64, whose 32 accumulators need more. Shared memory often allows fewer
 * CTAs than this; the bound then only keeps ptxas from spending registers it does not need. */
__host__ __device__ constexpr int spk_min_blocks(int nt, int warps)
{
    return (nt <= 32 ? 24 : 16) / warps;
}

/* a stage's bytes: BM weight rows and NT activation rows of BK k each (bf16) */
__host__ __device__ constexpr int spk_stage_bytes(int nt, int bm, int bk)
{
    return (bm + nt) * bk * 2;
}

__device__ __forceinline__ uint32_t spk_pack(float lo, float hi)
{
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* lo in the low half */
    return *(const uint32_t *)&v;
}

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

__device__ __forceinline__ void spk_ldsm_x2(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
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

/* grid (M/BM * cs), BM = 16 MT WARPS: CTA b is rank b % cs of the cluster for row tile tl = b /
 * cs. w [M, K] bf16. x: [n, K] bf16, or with NORM fp32, the product then taken of RMSNorm(x)
 * with weights nw [K] and eps (see pds_cuda_splitk_norm_gemm). epi SPK_STORE: y [n, M] bf16,
 * tile rows = weight rows [BM tl, +BM); SPK_ADD_F32: y [n, M] fp32 += the product; SPK_SILU:
 * y [n, M/2] bf16 = silu(columns [0, M/2)) * (columns [M/2, M)), tile rows = weight rows
 * [BM/2 tl, +BM/2) then the same + M/2; SPK_ROPE (BM = head_dim = 128): y [n, M] bf16 as
 * SPK_STORE with each q and k head rotated (pairs i, i + 64, as rope_kv_kernel) and the k and v
 * heads also written into the pool. K a multiple of BK * cs; n <= NT. Dynamic shared memory:
 * stages * spk_stage_bytes(NT, BM, BK).
 */
enum { SPK_STORE = 0, SPK_ADD_F32 = 1, SPK_SILU = 2, SPK_ROPE = 3 };
/* SPK_ROPE's operands: w = [q heads; k heads; v heads] of 128 rows each (= BM, so tile tl is head
 * tl); per activation row its position and pool slot; the layer's pool (shared layout) */
struct spk_rope {
    const int32_t *pos, *slots;
    const float *inv_freq; /* [64] */
    bf16 *kv;
    int block_size, n_heads, n_kv_heads;
};
template <int NT, int WARPS, int BK, int MT, bool NORM>
__global__ void __launch_bounds__(WARPS * 32, spk_min_blocks(NT, WARPS))
    splitk_kernel(const bf16 *__restrict__ w, const void *__restrict__ x,
                  const float *__restrict__ nw, float eps, void *y, int M, int K, int n, int epi,
                  int cs, int stages, spk_rope rope)
{
    constexpr int THREADS = WARPS * 32, BM = 16 * MT * WARPS;
    constexpr int RB = BK * 2;  /* bytes of a weight row (and a bf16 activation row) in a stage */
    constexpr int CPR = BK / 8; /* its 16-byte chunks: 8, 16 or 32 */
    constexpr int WB = BM * RB; /* a stage's weight tile */
    constexpr int SB = spk_stage_bytes(NT, BM, BK);
    constexpr int RPP = THREADS / CPR; /* weight rows one copy pass covers */
    constexpr int PASSES = BM / RPP;   /* copies per thread per stage: BK / 16 */
    constexpr int RED_LD = BM + 4;     /* floats between columns of the partial tile */
    static_assert(BK == 64 || BK == 128 || BK == 256, "a stage is 64, 128 or 256 k");
    static_assert(RPP % 4 == 0 && PASSES * RPP == BM, "copy passes keep the swizzle linear");
    static_assert((BM / 2) % RPP == 0, "SPK_SILU: a copy pass lies in one half of the tile");
    static_assert(!NORM || (NT <= PDS_CUDA_SPLITK_NORM_MAX_ROWS && BK <= 128),
                  "NORM: up to 32 activation rows (registers); a row's chunks in one warp");
    static_assert(2 * SB >= (NT * RED_LD + 2 * NT) * 4,
                  "the partial tile (and NORM's sums of squares) fit in the ring (>= 2 stages)");
    extern __shared__ __align__(128) unsigned char spk_smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rank = (int)(blockIdx.x % (unsigned)cs), tl = (int)(blockIdx.x / (unsigned)cs);
    /* tile rows [0, half) are weight rows m0.., [half, BM) (SPK_SILU) m0 + M/2.. */
    const int half = epi == SPK_SILU ? BM / 2 : BM, m0 = tl * half;
    const int kspan = K / cs, k0 = rank * kspan, nst = kspan / BK;
    const int nblk = (n + 7) >> 3; /* 8-row blocks of x that hold rows */
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(spk_smem);

    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));

    /* copy plan: 16-byte chunk c = tid % CPR of weight rows tid / CPR + RPP q (q < PASSES), so a
     * warp instruction copies 512 contiguous bytes: 4 rows x 128 (BK 64), 2 x 256 (BK 128) or
     * 1 x 512 (BK 256). Chunk c of row R lands at chunk c ^ (R & 7); RPP q is a multiple of 4, so
     * (R + RPP q) & 7 = (R & 7) ^ (RPP q & 7) and the swizzle of pass q is a constant XOR. */
    const int cc = tid % CPR, wr = tid / CPR, wsw = cc ^ (wr & 7);
    const bf16 *wsrc = w + (int64_t)(m0 + wr) * K + k0 + cc * 8;
    const int64_t wpass = (int64_t)RPP * K;            /* elements between passes */
    const int64_t whalf = (int64_t)(M / 2 - half) * K; /* SPK_SILU: passes in the second half */
    auto issue_w = [&](int st) {
        if (st >= nst) return;
        const uint32_t d = ring + (uint32_t)((st % stages) * SB + wr * RB);
        const bf16 *sp = wsrc + st * BK;
#pragma unroll
        for (int q = 0; q < PASSES; q++)
            asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, 16, %2;\n" ::"r"(
                             d + (uint32_t)(q * RPP * RB + ((wsw ^ ((q * RPP) & 7)) * 16))),
                         "l"(sp + q * wpass + (q * RPP >= half ? whalf : 0)), "l"(pol)
                         : "memory");
    };
    auto issue_x = [&](int st) {
        if (st >= nst) return;
        const uint32_t d = ring + (uint32_t)((st % stages) * SB + WB);
        if constexpr (!NORM) { /* NORM: ldx / cvt_x below */
            const bf16 *xb = (const bf16 *)x;
            for (int i = tid; i < nblk * 8 * CPR; i += THREADS) {
                const int r = i / CPR, c = i % CPR;
                const bool ok = r < n;
                const bf16 *sp = ok ? xb + (int64_t)r * K + k0 + st * BK + c * 8 : xb;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                 d + (uint32_t)(r * RB + ((c ^ (r & 7)) * 16))),
                             "l"(sp), "r"(ok ? 16 : 0)
                             : "memory");
            }
        }
    };

    /* NORM: thread t converts the 4 floats at column chunk xc = t % C4 of activation rows
     * xr0 + j XRS (xr0 = t / C4, j < XRPT) of every stage: loaded into registers (xv, with the
     * norm weights' chunk in gv) one stage before they are converted and stored as bf16 into the
     * stage's activation tile (swizzled as issue_x stores it), squares summed into ss[j]. The C4
     * threads of a row are consecutive lanes of one warp. */
    constexpr int C4 = BK / 4, XRS = THREADS / C4;
    constexpr int XRPT = NORM ? (NT * C4 + THREADS - 1) / THREADS : 1;
    const int xc = tid % C4, xr0 = tid / C4;
    float4 xv[XRPT], gv = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float ss[XRPT];
#pragma unroll
    for (int j = 0; j < XRPT; j++) ss[j] = 0.0f, xv[j] = gv;
    auto ldx = [&](int st) {
        if (st >= nst) return;
        const int k = k0 + st * BK + xc * 4;
        gv = __ldg((const float4 *)(nw + k));
#pragma unroll
        for (int j = 0; j < XRPT; j++) {
            const int r = xr0 + j * XRS;
            xv[j] = r < n ? __ldg((const float4 *)((const float *)x + (int64_t)r * K + k))
                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    };
    auto cvt_x = [&](int st) {
        if (st >= nst) return;
        const uint32_t d = ring + (uint32_t)((st % stages) * SB + WB);
#pragma unroll
        for (int j = 0; j < XRPT; j++) {
            const int r = xr0 + j * XRS;
            if (r >= nblk * 8) break;
            const float4 v = xv[j];
            ss[j] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            const uint32_t lo = spk_pack(v.x * gv.x, v.y * gv.y),
                           hi = spk_pack(v.z * gv.z, v.w * gv.w);
            asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(
                             d + (uint32_t)(r * RB + (((xc >> 1) ^ (r & 7)) * 16) + (xc & 1) * 8)),
                         "r"(lo), "r"(hi)
                         : "memory");
        }
    };

    /* prologue: the weights of stages 0..stages-2 (independent of the previous kernel), then,
     * once its writes are visible, the activations; group s holds stage s's activations (and
     * group 0 all the prologue's weights). NORM: stages 0..stages-2 converted here, stage
     * stages-1 loaded */
    for (int st = 0; st < stages - 1; st++) issue_w(st);
    pdl_wait();
    pdl_trigger();
    for (int st = 0; st < stages - 1; st++) {
        if constexpr (NORM) {
            ldx(st);
            cvt_x(st);
        } else {
            issue_x(st);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    if constexpr (NORM) ldx(stages - 1);

    float acc[MT][NT / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NT / 8; j++)
            acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;

    /* ldmatrix addresses (byte offsets in a slot), per k16 step s. A: lanes 0-7 / 8-15 / 16-23 /
     * 24-31 give rows 0-7 / 8-15 / 0-7 / 8-15 of the warp's 16 at chunk 2s / 2s / 2s+1 / 2s+1 =
     * a0..a3. B, blocks 2p and 2p+1: lanes 0-7 / 8-15 / 16-23 / 24-31 give rows 0-7 of block 2p
     * at chunk 2s / 2s+1, then of block 2p+1 = b0, b1 of block 2p, b0, b1 of block 2p+1 (NT 8:
     * ldmatrix .x2, lanes 0-15). R & 7 == lane & 7 in both, and 2s + h ^ (R & 7) = 2s ^ (h ^ (R &
     * 7)) for h < 2: one XOR with a constant per step. */
    const int sw = lane & 7;
    const uint32_t a_off = (uint32_t)((warp * 16 * MT + sw + ((lane >> 3) & 1) * 8) * RB);
    const int a_sw = (lane >> 4) ^ sw;
    [[maybe_unused]] const uint32_t b_off =
        (uint32_t)(WB + ((NT == 8 ? 0 : (lane >> 4)) * 8 + sw) * RB);
    [[maybe_unused]] const int b_sw = ((lane >> 3) & 1) ^ sw;

    for (int st = 0; st < nst; st++) {
        spk_wait_group(stages - 2); /* this thread's copies of stage st have landed */
        __syncthreads();            /* everyone's, and slot (st - 1) % stages is read */
        issue_w(st + stages - 1);
        if constexpr (NORM) {
            /* slot (st - 1) % stages is free (the barrier above); its activations are read at
             * iteration st + stages - 1 > st, after that iteration's barrier */
            cvt_x(st + stages - 1);
            ldx(st + stages);
        } else {
            issue_x(st + stages - 1);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory"); /* empty groups keep the count */
        const uint32_t slot = ring + (uint32_t)((st % stages) * SB);
#pragma unroll
        for (int s = 0; s < BK / 16; s++) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
                spk_ldsm_x4(a[mt], slot + a_off + (uint32_t)(mt * 16 * RB + ((2 * s) ^ a_sw) * 16));
            constexpr int NP = (NT + 15) / 16; /* pairs of 8-row blocks */
            uint32_t b[NP][4];                 /* the step's B fragments, loaded before the mmas */
            {
                const uint32_t bch = slot + b_off + (uint32_t)(((2 * s) ^ b_sw) * 16);
#pragma unroll
                for (int p = 0; p < NP; p++) {
                    if (2 * p < nblk) { /* CTA-uniform */
                        if (NT == 8)
                            spk_ldsm_x2(b[p], bch);
                        else
                            spk_ldsm_x4(b[p], bch + (uint32_t)(p * 16 * RB));
                    }
                }
            }
#pragma unroll
            for (int p = 0; p < NP; p++) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    if (2 * p < nblk) spk_mma(acc[mt][2 * p], a[mt], b[p][0], b[p][1]);
                    if (2 * p + 1 < NT / 8 && 2 * p + 1 < nblk)
                        spk_mma(acc[mt][(2 * p + 1) % (NT / 8)], a[mt], b[p][2], b[p][3]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads(); /* the ring is free: the partial tile reuses it */

    /* partial tile red[col][row] (col < 8 nblk, row < BM, RED_LD apart); fragment: acc[j][h]
     * = (row g, column 8j + 2t + h), acc[j][2 + h] = (row g + 8, same) */
    float *red = (float *)spk_smem;
    {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int r0 = (warp * MT + mt) * 16 + g;
#pragma unroll
            for (int j = 0; j < NT / 8; j++) {
                if (j < nblk) {
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const int col = 8 * j + 2 * t + h;
                        red[col * RED_LD + r0] = acc[mt][j][h];
                        red[col * RED_LD + r0 + 8] = acc[mt][j][2 + h];
                    }
                }
            }
        }
    }
    /* NORM: this CTA's sums of squares per activation row after the tile (the row's C4 lanes
     * summed in a fixed order), then 1 / rms */
    float *ssq = red + NT * RED_LD, *rinv = ssq + NT;
    if constexpr (NORM) {
#pragma unroll
        for (int j = 0; j < XRPT; j++) {
            float v = ss[j];
#pragma unroll
            for (int o = 1; o < C4; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            const int r = xr0 + j * XRS;
            if (xc == 0 && r < n) ssq[r] = v;
        }
    }
    cg::cluster_group cl = cg::this_cluster();
    if (cs > 1)
        cl.sync();
    else
        __syncthreads();
    /* the sum over the cluster's CTAs, in rank order */
    auto gather = [&](float *a, int idx) {
        if (cs == 1) return a[idx];
        float v = cl.map_shared_rank(a, 0)[idx];
        for (int q = 1; q < cs; q++) v += cl.map_shared_rank(a, q)[idx];
        return v;
    };
    if constexpr (NORM) {
        for (int c = tid; c < n; c += THREADS)
            rinv[c] = 1.0f / sqrtf(gather(ssq, c) / (float)K + eps); /* as rmsnorm_kernel */
        __syncthreads();
    }

    /* rank r: rows [r*R/cs, (r+1)*R/cs) of the tile's R output rows (BM; pairs of rows, BM/2,
     * for SPK_SILU and SPK_ROPE), every column; consecutive threads take consecutive rows
     * (coalesced stores) */
    const int R = epi == SPK_SILU || epi == SPK_ROPE ? BM / 2 : BM;
    const int rb = rank * R / cs, re = (rank + 1) * R / cs, nr = re - rb;
    for (int e = tid; e < nr * n; e += THREADS) {
        const int col = e / nr, row = rb + e % nr, idx = col * RED_LD + row;
        const float scale = NORM ? rinv[col] : 1.0f;
        const float sum = gather(red, idx) * scale;
        if (epi == SPK_SILU) {
            const float u = gather(red, idx + half) * scale;
            ((bf16 *)y)[(int64_t)col * (M / 2) + m0 + row] =
                __float2bfloat16_rn(sum / (1.0f + expf(-sum)) * u); /* as silu_mul_kernel */
        } else if (epi == SPK_ROPE) {
            /* rounded to bf16 first, as the GEMM output rope_kv_kernel reads */
            const float x0 = __bfloat162float(__float2bfloat16_rn(sum)),
                        x1 = __bfloat162float(__float2bfloat16_rn(gather(red, idx + R) * scale));
            float o0 = x0, o1 = x1;
            if (tl < rope.n_heads + rope.n_kv_heads) { /* q and k heads; v as it is */
                float sn, cn;
                sincosf((float)rope.pos[col] * rope.inv_freq[row], &sn, &cn);
                o0 = x0 * cn - x1 * sn, o1 = x1 * cn + x0 * sn;
            }
            const bf16 b0 = __float2bfloat16_rn(o0), b1 = __float2bfloat16_rn(o1);
            bf16 *q = (bf16 *)y + (int64_t)col * M + m0 + row;
            q[0] = b0, q[R] = b1;
            if (tl >= rope.n_heads) { /* k and v heads: also into the pool */
                const int v = tl >= rope.n_heads + rope.n_kv_heads;
                const int kvh = tl - rope.n_heads - v * rope.n_kv_heads;
                bf16 *d = pds_kv_slot_row(rope.kv, rope.slots[col], rope.block_size,
                                          rope.n_kv_heads, BM, v) +
                          kvh * BM + row;
                d[0] = b0, d[R] = b1;
            }
        } else if (epi == SPK_ADD_F32) {
            ((float *)y)[(int64_t)col * M + m0 + row] += sum;
        } else {
            ((bf16 *)y)[(int64_t)col * M + m0 + row] = __float2bfloat16_rn(sum);
        }
    }
    if (cs > 1) cl.sync(); /* no CTA leaves while another reads its shared memory */
}

static int spk_env(const char *name, int dflt)
{
    const char *e = getenv(name);
    return e && *e ? atoi(e) : dflt;
}

/* The cluster size for M x K in tiles of bm rows and stages of bk; resident(c): how many CTAs fit
 * on the GPU at once in clusters of c (0 on error). K must split into whole stages and, for a
 * split, into at least SPK_MIN_KSPAN k per CTA. policy 0 (default): the largest power of two whose
 * grid still fits in one wave (the streams of all CTAs overlap and no partial second wave trails;
 * 1 where even the tiles alone are more than a wave). policy 1 (the first version's rule): the
 * smallest that gives the grid about two CTAs per SM (7/4 x SMs) and at most SPK_MAX_KSPAN k per
 * CTA. forced (PDS_ENGINE_CUDA_SPLITK_CLUSTER) wins where the shape allows it. */
template <typename Resident>
static int spk_cluster(int M, int bm, int K, int bk, int sms, Resident resident, int forced,
                       int policy)
{
    const int64_t tiles = M / bm;
    auto ok = [&](int c) { return K % (bk * c) == 0 && (c == 1 || K / c >= SPK_MIN_KSPAN); };
    if (forced >= 1 && forced <= SPK_MAX_CLUSTER && ok(forced)) return forced;
    int cs = 1;
    if (policy == 1) {
        while (cs < SPK_MAX_CLUSTER && ok(2 * cs) &&
               (4 * tiles * cs < 7 * (int64_t)sms || K / cs > SPK_MAX_KSPAN))
            cs *= 2;
    } else {
        while (cs < SPK_MAX_CLUSTER && ok(2 * cs) && tiles * 2 * cs <= resident(2 * cs)) cs *= 2;
    }
    return cs;
}

/* One call's operands and choices, from the public entries to the launch. */
struct spk_call {
    const bf16 *w;
    int M, K;
    const void *x;   /* bf16, or fp32 with nw (the RMSNorm fused) */
    const float *nw; /* NULL: plain */
    float eps;
    int n;
    void *y;
    int epi; /* SPK_STORE, SPK_ADD_F32, SPK_SILU, SPK_ROPE */
    int stages, sms, forced, policy;
    spk_rope rope;
};

template <int NT, int WARPS, int BK, int MT, bool NORM>
static cudaError_t spk_launch(const spk_call &a, cudaStream_t s)
{
    void (*kernel)(const bf16 *, const void *, const float *, float, void *, int, int, int, int,
                   int, int, spk_rope) = splitk_kernel<NT, WARPS, BK, MT, NORM>;
    constexpr int BM = 16 * MT * WARPS;
    const int M = a.M, K = a.K, stages = a.stages;
    const int smem = stages * spk_stage_bytes(NT, BM, BK);
    static int raised = 48 * 1024; /* per instance: the dynamic shared memory allowed so far */
    static int occ_smem = -1;      /* ... and resident CTAs in clusters of 1, 2, 4, 8 at it */
    static int64_t occ[4];
    if (smem > raised) {
        cudaError_t e =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return e;
        raised = smem;
    }
    if (smem != occ_smem) {
        occ[0] = occ[1] = occ[2] = occ[3] = -1;
        occ_smem = smem;
    }
    auto resident = [&](int c) -> int64_t {
        const int i = c == 1 ? 0 : c == 2 ? 1 : c == 4 ? 2 : 3;
        if (occ[i] < 0) {
            cudaLaunchConfig_t cfg = {};
            cudaLaunchAttribute attr;
            attr.id = cudaLaunchAttributeClusterDimension;
            attr.val.clusterDim.x = (unsigned)c;
            attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
            cfg.gridDim = dim3((unsigned)c);
            cfg.blockDim = dim3(WARPS * 32);
            cfg.dynamicSmemBytes = (size_t)smem;
            cfg.attrs = &attr;
            cfg.numAttrs = 1;
            int nc = 0;
            if (cudaOccupancyMaxActiveClusters(&nc, kernel, &cfg) != cudaSuccess) {
                (void)cudaGetLastError(); /* not sticky: count it as no room */
                nc = 0;
            }
            occ[i] = (int64_t)nc * c;
        }
        return occ[i];
    };
    const int cs = spk_cluster(M, BM, K, BK, a.sms, resident, a.forced, a.policy);
    return pds_launch_cluster(kernel, dim3((unsigned)(M / BM * cs)), dim3(WARPS * 32), (size_t)smem,
                              s, (unsigned)cs, a.w, a.x, a.nw, a.eps, a.y, M, K, a.n, a.epi, cs,
                              stages, a.rope);
}

/* NT 64 with 4 warps: two 16-row tiles per warp (BM 128) where M allows, so that every B fragment
 * read from shared memory feeds two mmas */
static bool spk_two_tiles(int M, int n, int warps)
{
    return n > 32 && warps == 4 && M % 128 == 0;
}

template <int WARPS, int BK, bool NORM>
static cudaError_t spk_launch_nt(const spk_call &a, cudaStream_t s)
{
    if (a.n <= 8) return spk_launch<8, WARPS, BK, 1, NORM>(a, s);
    if (a.n <= 16) return spk_launch<16, WARPS, BK, 1, NORM>(a, s);
    if (a.n <= 32) return spk_launch<32, WARPS, BK, 1, NORM>(a, s);
    if constexpr (NORM) {
        return cudaErrorInvalidValue; /* the caller keeps NORM to 32 rows */
    } else {
        if constexpr (WARPS == 4) {
            if (spk_two_tiles(a.M, a.n, WARPS)) return spk_launch<64, 4, BK, 2, false>(a, s);
        }
        return spk_launch<64, WARPS, BK, 1, false>(a, s);
    }
}

/* the variant's instantiation: NORM only with BK 64 or 128 (the caller halves 256) */
template <bool NORM>
static cudaError_t spk_launch_cfg(int warps, int bk, const spk_call &a, cudaStream_t s)
{
    constexpr int BK_MAX = NORM ? 128 : 256;
    if (warps == 4)
        return bk == 64    ? spk_launch_nt<4, 64, NORM>(a, s)
               : bk == 128 ? spk_launch_nt<4, 128, NORM>(a, s)
                           : spk_launch_nt<4, BK_MAX, NORM>(a, s);
    return bk == 64    ? spk_launch_nt<8, 64, NORM>(a, s)
           : bk == 128 ? spk_launch_nt<8, 128, NORM>(a, s)
                       : spk_launch_nt<8, BK_MAX, NORM>(a, s);
}

extern "C" int pds_cuda_splitk_fits(int M, int K, int n)
{
    return M >= 64 && M % 64 == 0 && K >= 64 && K % 64 == 0 && n >= 1 && n <= SPK_MAX_N;
}

/* Checks, the variant's defaults and the launch for every public entry. x bf16, or fp32 with nw
 * (the RMSNorm fused); epi SPK_*. */
static void spk_env_variant(int *warps, int *bk, int *stages);

static pds_status_t spk_run(const uint16_t *w, int M, int K, const void *x, const float *nw,
                            float eps, int n, void *y, int epi, int warps, int bk, int stages,
                            const spk_rope &rope, cudaStream_t s)
{
    if (!pds_cuda_splitk_fits(M, K, n))
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "splitk gemm: M %d, K %d, %d rows", M, K, n);
    if ((warps != 0 && warps != 4 && warps != 8) ||
        (bk != 0 && bk != 64 && bk != 128 && bk != 256) || stages < 0 || stages > 8 || stages == 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "splitk gemm: %d warps, BK %d, %d stages", warps, bk,
                       stages);
    static int sms = 0, forced = 0, policy = 0;
    if (sms == 0) {
        int dev = 0;
        cudaError_t e = cudaGetDevice(&dev);
        if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (e != cudaSuccess) {
            sms = 0;
            return PDS_ERR(PDS_ERR_DEVICE, "splitk gemm: %s", cudaGetErrorString(e));
        }
        forced = spk_env("PDS_ENGINE_CUDA_SPLITK_CLUSTER", 0);
        policy = spk_env("PDS_ENGINE_CUDA_SPLITK_GRID", 0) == 1;
    }
    const bool norm = nw != NULL;
    if (warps == 0 && bk == 0 && stages == 0 && M <= 4096) {
        /* the default for the few-tile shapes (o, down; H100 batch 32, against 8 warps: o 19.0 vs
         * 20.5 us, down 48.5 vs 52.4; batch 64: down 63.6 vs 73.3): 4 warps, BK 128, and 3 stages
         * (three CTAs per SM) up to NT 32 */
        warps = 4, bk = 128, stages = n <= 32 ? 3 : 0;
    }
    if (warps == 0 || epi == SPK_ROPE) warps = 8; /* SPK_ROPE: a tile is a 128-row head */
    if (bk == 0 || (norm && bk == 256)) bk = 128;
    /* what the shape allows: 128-row tiles need M % 128, a stage of bk needs K % bk */
    if (M % (16 * warps) != 0) warps = 4;
    while (K % bk != 0) bk /= 2;
    const int nt = n <= 8 ? 8 : n <= 16 ? 16 : n <= 32 ? 32 : 64;
    const int sb = spk_stage_bytes(nt, 16 * warps * (spk_two_tiles(M, n, warps) ? 2 : 1), bk);
    if (stages == 0) /* the most, up to 4, with which two CTAs fit on an SM */
        stages = PDS_MIN(4, SPK_SMEM_HALF / sb);
    stages = PDS_MAX(2, PDS_MIN(stages, SPK_SMEM_CTA / sb)); /* sb < 114 KB: 2 always fit */
    const spk_call a = {(const bf16 *)w, M,   K,      x,      nw,  eps, n, y, epi,
                        stages,          sms, forced, policy, rope};
    cudaError_t e =
        norm ? spk_launch_cfg<true>(warps, bk, a, s) : spk_launch_cfg<false>(warps, bk, a, s);
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess)
        return PDS_ERR(PDS_ERR_DEVICE, "launch of splitk_kernel: %s", cudaGetErrorString(e));
    return PDS_OK;
}

extern "C" pds_status_t pds_cuda_splitk_gemm_cfg(const uint16_t *w, int M, int K, const uint16_t *x,
                                                 int n, void *y, int out_f32, int warps, int bk,
                                                 int stages, cudaStream_t s)
{
    return spk_run(w, M, K, x, NULL, 0.0f, n, y, out_f32 ? SPK_ADD_F32 : SPK_STORE, warps, bk,
                   stages, spk_rope{}, s);
}

extern "C" pds_status_t pds_cuda_splitk_norm_gemm_cfg(const uint16_t *w, int M, int K,
                                                      const float *x, const float *norm_w,
                                                      float eps, int n, uint16_t *y, int silu,
                                                      int warps, int bk, int stages, cudaStream_t s)
{
    if (norm_w == NULL) return PDS_ERR(PDS_ERR_INVALID_ARG, "splitk norm gemm: no norm weights");
    if (n > PDS_CUDA_SPLITK_NORM_MAX_ROWS)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "splitk norm gemm: %d rows (at most %d)", n,
                       PDS_CUDA_SPLITK_NORM_MAX_ROWS);
    return spk_run(w, M, K, x, norm_w, eps, n, y, silu ? SPK_SILU : SPK_STORE, warps, bk, stages,
                   spk_rope{}, s);
}

extern "C" pds_status_t
pds_cuda_splitk_norm_qkv_rope(const uint16_t *wqkv, int K, const float *x, const float *norm_w,
                              float eps, int n, const int32_t *pos, const int32_t *slots,
                              int n_heads, int n_kv_heads, int head_dim, const float *inv_freq,
                              uint16_t *qkv, uint16_t *kv_layer, int block_size, cudaStream_t s)
{
    if (norm_w == NULL) return PDS_ERR(PDS_ERR_INVALID_ARG, "splitk qkv rope: no norm weights");
    if (head_dim != 128 || n < 1 || n > PDS_CUDA_SPLITK_NORM_MAX_ROWS || n_heads < 1 ||
        n_kv_heads < 1 || block_size < 1)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "splitk qkv rope: head_dim %d, %d rows", head_dim, n);
    int warps, bk, stages;
    spk_env_variant(&warps, &bk, &stages);
    const spk_rope rope = {pos, slots, inv_freq, (bf16 *)kv_layer, block_size, n_heads, n_kv_heads};
    return spk_run(wqkv, (n_heads + 2 * n_kv_heads) * head_dim, K, x, norm_w, eps, n, qkv, SPK_ROPE,
                   warps, bk, stages, rope, s);
}

/* PDS_ENGINE_CUDA_SPLITK_WARPS, _BK and _STAGES, read once; unset or values it does not take: 0
 * (the default) */
static void spk_env_variant(int *warps, int *bk, int *stages)
{
    static int ew = -1, eb = 0, es = 0;
    if (ew < 0) {
        const int w = spk_env("PDS_ENGINE_CUDA_SPLITK_WARPS", 0),
                  b = spk_env("PDS_ENGINE_CUDA_SPLITK_BK", 0),
                  st = spk_env("PDS_ENGINE_CUDA_SPLITK_STAGES", 0);
        eb = b == 64 || b == 128 || b == 256 ? b : 0;
        es = st <= 0 ? 0 : PDS_MIN(8, PDS_MAX(2, st));
        ew = w == 4 || w == 8 ? w : 0;
    }
    *warps = ew, *bk = eb, *stages = es;
}

extern "C" pds_status_t pds_cuda_splitk_norm_gemm(const uint16_t *w, int M, int K, const float *x,
                                                  const float *norm_w, float eps, int n,
                                                  uint16_t *y, int silu, cudaStream_t s)
{
    int warps, bk, stages;
    spk_env_variant(&warps, &bk, &stages);
    return pds_cuda_splitk_norm_gemm_cfg(w, M, K, x, norm_w, eps, n, y, silu, warps, bk, stages, s);
}

extern "C" pds_status_t pds_cuda_splitk_gemm(const uint16_t *w, int M, int K, const uint16_t *x,
                                             int n, void *y, int out_f32, cudaStream_t s)
{
    int warps, bk, stages;
    spk_env_variant(&warps, &bk, &stages);
    return pds_cuda_splitk_gemm_cfg(w, M, K, x, n, y, out_f32, warps, bk, stages, s);
}

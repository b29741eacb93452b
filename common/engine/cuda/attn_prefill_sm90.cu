/* attn_prefill_sm90.cu: causal prefill attention on Hopper's warpgroup tensor-core instructions
 * (wgmma, sm_90a), for head_dim 128 — the path behind pds_cuda_attn_prefill on an H100; the
 * mma.sync kernel of attention.cu stays the path for other devices, head_dim 64, and
 * PDS_ENGINE_CUDA_ATTN_SM90=0.
 *
 * One CTA = 128 query rows of one head (the tile list of pds_cuda_attn_prefill_tiles), two
 * consumer warpgroups of 64 rows. Q and three stages of 128-key K/V tiles live in shared memory in
 * the 128-byte-swizzled layout wgmma reads (rows of 128 bytes, 16-byte chunk c of row r stored at
 * chunk c ^ (r % 8); head_dim 128 = two 64-column halves). Per tile and warpgroup: S = Q K^T (8
 * wgmma m64n128k16, both operands in shared memory, K-major), causal mask and online softmax on
 * the accumulator registers, then O += P V with P taken straight from those registers (the fp32
 * accumulator layout is the bf16 A-fragment layout once pairs are packed) and V as an MN-major
 * ("transposed") operand. The P V of tile t is issued behind the S of tile t + 1, so the tensor
 * cores run it while the softmax of t + 1 runs (FlashAttention-3's intra-warpgroup overlap); hence
 * three stages: at tile t + 1 the V of t is still being read. Every wgmma sits in code all threads
 * of the warpgroup reach (ptxas serialises wgmma in divergent paths), so a warpgroup past its last
 * row computes masked tiles instead of branching around them. Shared memory 225 KB: one CTA per
 * SM. The longest (last) tiles of the list start first.
 *
 * Three ways to fill the stages (PDS_ENGINE_CUDA_ATTN_SM90=1|2|3, all tested against the CPU):
 *  3 (default): a producer warpgroup (setmaxnreg: 40 registers, consumers 232) issues TMA copies
 *    through a tensor map over the pool layer, one box per (pool block, 64-column half), signalled
 *    on "full" mbarriers by byte count; consumers release K and V stages on "empty" mbarriers.
 *    Named barriers make the two consumer warpgroups take turns issuing wgmma (ping-pong).
 *  2: the same with the producer gathering by cp.async (cp.async.mbarrier.arrive.noinc).
 *  1: no producer: all 256 threads gather by cp.async, one CTA barrier per tile.
 * Measured on an H100, llama3-8b shapes (bench/results/cuda-llama3-8b.md, PDS_ENGINE_CUDA_PROFILE
 * per forward): 3: 13.5 ms at 4096 tokens (325 TFLOP/s), 3.9 ms at 2048; 2: 17.0 / 4.8; 1: 18.3 /
 * 5.1; the mma.sync kernel 19.6-19.8 / 5.3-5.5. With (almost) no K/V traffic (a measurement-only
 * build that read every K/V row from the pool's first 16 tokens, since removed) variant 3 took
 * 13.1 ms: the limit is inside the SM (softmax and wgmma scheduling), not memory. Measurement
 * switches: _HINTS=0 (no L2 eviction hints; 3-6% slower), _PINGPONG=0, _ORDER=1 (CTAs kv group by
 * kv group; no gain).
 */
#include <cuda.h> /* CUtensorMap; the encoder is fetched through the runtime */
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/launch.cuh"

typedef __nv_bfloat16 bf16;

#define S9_HD          128         /* head_dim */
#define S9_BM          128         /* query rows per CTA (two warpgroups of 64) */
#define S9_BN          128         /* keys per tile */
#define S9_ST          3           /* K/V stages */
#define S9_THREADS     256         /* two warpgroups */
#define S9_DEFAULT     3           /* variant when PDS_ENGINE_CUDA_ATTN_SM90 is unset */
#define S9_F_HINTS     1           /* flags: L2 eviction hints */
#define S9_F_PINGPONG  2           /* flags: warpgroups take turns issuing (2, 3) */
#define S9_F_ORDER     4           /* flags: CTAs kv group by kv group */
#define S9_HALF        (128 * 128) /* bytes of one 64-column half of a 128-row operand */
#define S9_Q_BYTES     (2 * S9_HALF)
#define S9_KV_BYTES    (2 * S9_HALF)                                /* K or V of one stage */
#define S9_STAGE_BYTES (2 * S9_KV_BYTES)                            /* K then V */
#define S9_SMEM        (1024 + S9_Q_BYTES + S9_ST * S9_STAGE_BYTES) /* + 1 KB to align to 1024 */

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define S9_HAVE_WGMMA 1
#else
#define S9_HAVE_WGMMA 0
#endif

#if S9_HAVE_WGMMA
/* ---- device helpers ------------------------------------------------------------------------- */
__device__ __forceinline__ uint32_t s9_pack(float a, float b)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b); /* .x = a (low half) */
    return *(uint32_t *)&v;
}

__device__ __forceinline__ float s9_ex2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void s9_cp16(uint32_t saddr, const void *g, bool pred)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g),
                 "r"(pred ? 16 : 0));
}

/* The same with an L2 eviction policy (createpolicy) for the source lines. */
__device__ __forceinline__ void s9_cp16h(uint32_t saddr, const void *g, bool pred, uint64_t pol)
{
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(saddr),
                 "l"(g), "r"(pred ? 16 : 0), "l"(pol));
}
/* L2 policies: K/V lines are read again by the other heads of the group and the CTAs of later
 * rows (evict_last when `hints`), Q and the output pass through once (evict_first) */
__device__ __forceinline__ uint64_t s9_policy_kv(int hints)
{
    uint64_t p;
    if (hints)
        asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(p));
    else
        asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ uint64_t s9_policy_once(int hints)
{
    uint64_t p;
    if (hints)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
    else
        asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ void s9_st32(void *g, uint32_t v, uint64_t pol)
{
    asm volatile("st.global.L2::cache_hint.b32 [%0], %1, %2;\n" ::"l"(g), "r"(v), "l"(pol)
                 : "memory");
}
/* (head, tile) of this CTA. The grid is (n_heads, n_tiles), dispatched x fastest. Order 0: tiles
 * from the last (longest) down, all heads of a tile side by side; order 1: kv group by kv group
 * (all tiles of one group, longest first, before the next group), so the K/V lines in use at
 * once are those of fewer kv heads. */
__device__ __forceinline__ void s9_cta(int order, int n_heads, int n_kv_heads, int &h, int &tile)
{
    const int n_tiles = gridDim.y;
    if (!order) {
        h = blockIdx.x;
        tile = n_tiles - 1 - blockIdx.y;
        return;
    }
    const int G = n_heads / n_kv_heads, lin = blockIdx.y * gridDim.x + blockIdx.x;
    const int grp = lin / (n_tiles * G), rem = lin % (n_tiles * G);
    h = grp * G + rem % G;
    tile = n_tiles - 1 - rem / G;
}

/* Shared-memory matrix descriptor: start address, leading / stride byte offsets (16-byte units),
 * 128-byte swizzle. K-major operands ignore lbo; sbo = 1024 (one 8-row swizzle atom). */
__device__ __forceinline__ uint64_t s9_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo)
{
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
           ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void s9_wg_fence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void s9_wg_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void s9_wg_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Keep the compiler from moving uses of a register across an asynchronous wgmma (it sees the
 * operands only at the issuing instruction). */
__device__ __forceinline__ void s9_keep(float &r)
{
    asm volatile("" : "+f"(r)::"memory");
}
__device__ __forceinline__ void s9_keep(uint32_t &r)
{
    asm volatile("" : "+r"(r)::"memory");
}

#define S9_D64                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
    "%56, %57, %58, %59, %60, %61, %62, %63}"
#define S9_OUT64(d)                                                                                \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),            \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
        "+f"(d[63])

/* d[64x128] (+)= A[64x16] B[16x128], A and B K-major in shared memory; accumulate unless zero. */
__device__ __forceinline__ void s9_mma_ss(float *d, uint64_t da, uint64_t db, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " S9_D64
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : S9_OUT64(d)
                 : "l"(da), "l"(db), "r"(accumulate));
}

/* d[64x128] += A[64x16] B[16x128], A from registers (bf16 pairs), B MN-major in shared memory. */
__device__ __forceinline__ void s9_mma_rs(float *d, uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint64_t db)
{
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " S9_D64
                 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
                 : S9_OUT64(d)
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db));
}

/* The causal mask and the online softmax over one 64-key-wide S tile of a thread's rows qp0 and
 * qp1 (lim0 = the last key offset row qp0 sees when `mask`; qp1 sees 8 more). Maxima stay
 * unscaled, the scale is folded into exp2's argument; P goes to pn as packed bf16 pairs, the
 * rescale factors of O to al0/al1, and the running (m, l) are updated. Shared by both kernels. */
__device__ __forceinline__ void s9_softmax(float (&s)[64], uint32_t *pn, float &m0, float &m1,
                                           float &l0, float &l1, float &al0, float &al1, bool mask,
                                           int lim0, float scale_log2)
{
#pragma unroll
    for (int i = 0; i < 64; i++) s9_keep(s[i]);
    if (mask) {
        const int lim1 = lim0 + 8;
#pragma unroll
        for (int i = 0; i < 64; i++) {
            const int ko = (i >> 2) * 8 + (i & 1);
            s[i] = ko > ((i & 2) ? lim1 : lim0) ? -INFINITY : s[i];
        }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int i = 0; i < 64; i += 4) {
        mx0 = fmaxf(mx0, fmaxf(s[i], s[i + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[i + 2], s[i + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
    al0 = s9_ex2((m0 - mu0) * scale_log2);
    al1 = s9_ex2((m1 - mu1) * scale_log2);
    m0 = mn0;
    m1 = mn1;
    const float b0 = -mu0 * scale_log2, b1 = -mu1 * scale_log2;
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; i += 4) {
        s[i] = s9_ex2(fmaf(s[i], scale_log2, b0));
        s[i + 1] = s9_ex2(fmaf(s[i + 1], scale_log2, b0));
        s[i + 2] = s9_ex2(fmaf(s[i + 2], scale_log2, b1));
        s[i + 3] = s9_ex2(fmaf(s[i + 3], scale_log2, b1));
        rs0 += s[i] + s[i + 1];
        rs1 += s[i + 2] + s[i + 3];
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
#pragma unroll
    for (int i = 0; i < 32; i++) pn[i] = s9_pack(s[2 * i], s[2 * i + 1]);
}
#endif /* S9_HAVE_WGMMA */

__global__ void __launch_bounds__(S9_THREADS, 1)
    attn_prefill_sm90(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                      const int32_t *bts, const int32_t *tiles, int n_heads, int n_kv_heads, int bs,
                      int bs_shift /* log2(bs) for a power of two, else -1 */, float scale_log2,
                      int flags /* S9_F_* */, bf16 *out)
{
#if S9_HAVE_WGMMA
    extern __shared__ __align__(1024) unsigned char s9_smem[];
    /* Q [2 halves][128 rows][128 B] then ST x (K, V) each [2 halves][128 keys][128 B], swizzled */
    const uint32_t sbase = ((uint32_t)__cvta_generic_to_shared(s9_smem) + 1023u) & ~1023u;
    const uint32_t sq = sbase, skv = sbase + S9_Q_BYTES;
    pdl_wait();
    pdl_trigger();
    int h, tile;
    s9_cta(flags & S9_F_ORDER, n_heads, n_kv_heads, h, tile);
    const uint64_t pol_kv = s9_policy_kv(flags & S9_F_HINTS);
    const uint64_t pol_once = s9_policy_once(flags & S9_F_HINTS);
    const int si = tiles[2 * tile], row0 = tiles[2 * tile + 1];
    const pds_cuda_seq_t S = seqs[si];
    const int n_past = S.n_ctx - S.n_new;
    const int kvh = h / (n_heads / n_kv_heads);
    const int32_t *bt = bts + S.bt_off;
    const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127;
    const int warp = wtid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int nrows = min(S9_BM, S.n_new - row0);
    const int kv_end = n_past + row0 + nrows; /* keys any row of the CTA sees */
    const int n_kt = (kv_end + S9_BN - 1) / S9_BN;
    const int64_t kvw = (int64_t)n_kv_heads * S9_HD;

    /* every thread copies one 16-byte chunk column (cc) of 8 rows (r0 + 16 i) per operand */
    const int cc = tid & 15, r0 = tid >> 4;
    const uint32_t chunk_off = (uint32_t)(cc >> 3) * S9_HALF; /* which 64-column half */
    const int c8 = cc & 7;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int r = r0 + 16 * i;
        const bool ok = r < nrows;
        const bf16 *src =
            ok ? q + (int64_t)(S.q_start + row0 + r) * q_stride + h * S9_HD + cc * 8 : q;
        s9_cp16h(sq + chunk_off + r * 128 + ((c8 ^ (r & 7)) << 4), src, ok, pol_once);
    }
    static_assert(S9_ST == 3, "the slot arithmetic of load_next assumes three stages");
    /* K (kvsel 0) or V (1) of tile t into stage slot `stage` */
    auto load_kv = [&](int t, int stage, int kvsel) {
        const uint32_t d = skv + stage * S9_STAGE_BYTES + kvsel * S9_KV_BYTES;
        int blk[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int tok = t * S9_BN + r0 + 16 * i;
            const int tk = tok;
            const int bi = bs_shift >= 0 ? tk >> bs_shift : tk / bs;
            blk[i] = tok < kv_end ? bt[bi] : 0;
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int r = r0 + 16 * i, tok = t * S9_BN + r;
            const int off = bs_shift >= 0 ? tok & (bs - 1) : tok % bs;
            const bf16 *kp =
                kv + ((int64_t)(blk[i] * 2 + kvsel) * bs + off) * kvw + kvh * S9_HD + cc * 8;
            s9_cp16h(d + chunk_off + r * 128 + ((c8 ^ (r & 7)) << 4), kp, tok < kv_end, pol_kv);
        }
    };
    /* K runs two tiles ahead, V one: groups {Q, K0, V0}, {K1}, then one {K t+2, V t+1} per tile */
    load_kv(0, 0, 0);
    load_kv(0, 0, 1);
    asm volatile("cp.async.commit_group;\n" ::);
    if (n_kt > 1) load_kv(1, 1, 0);
    asm volatile("cp.async.commit_group;\n" ::);

    /* this warpgroup's rows: 64 from row0 + 64 wg; this thread's two rows: warp * 16 + g (+ 8).
     * Every wgmma below runs in code all threads reach (no branch around it: ptxas serialises
     * wgmma in divergent paths), so a warpgroup past its last row or the sequence's end computes
     * fully masked tiles rather than skipping them */
    const int wrow = row0 + wg * 64;
    const int qp0 = n_past + wrow + warp * 16 + g;

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.0f;
    uint32_t p[32]; /* P of the previous tile, bf16 pairs in the A-fragment layout */
    float s[64];
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const uint64_t dq0 = s9_desc(sq + wg * 64 * 128, 16, 1024);

    /* K of tile t and V of t - 1 (and Q) landed (the group issued at t - 2; the one of t - 1 may
     * be in flight); make the copies visible to wgmma (async proxy), then one barrier */
    auto wait_tile = [&]() {
        asm volatile("cp.async.wait_group 1;\n" ::);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
    };
    /* at tile t (in `stage`): K of t + 2 into the slot of K t - 1 (its S finished before this
     * barrier), V of t + 1 into that of V t - 2 (its P V too). Issued behind the tile's wgmmas, so
     * the block-table reads overlap the tensor cores. */
    auto load_next = [&](int t, int stage) {
        if (t + 2 < n_kt) load_kv(t + 2, stage == 0 ? 2 : stage - 1, 0);
        if (t + 1 < n_kt) load_kv(t + 1, stage == 2 ? 0 : stage + 1, 1);
        asm volatile("cp.async.commit_group;\n" ::);
    };
    /* S = Q K^T of the tile in `stage` (issued, not waited for) */
    auto issue_s = [&](int stage) {
        const uint32_t sk = skv + stage * S9_STAGE_BYTES;
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(s[i]);
        s9_wg_fence();
#pragma unroll
        for (int k = 0; k < S9_HD / 16; k++) {
            const uint32_t off = (uint32_t)(k >> 2) * S9_HALF + (k & 3) * 32;
            s9_mma_ss(s, dq0 + (off >> 4), s9_desc(sk + off, 16, 1024), k > 0);
        }
        s9_wg_commit();
    };
    /* O += P V of the tile in `stage` (issued, not waited for) */
    auto issue_pv = [&](int stage) {
        const uint32_t sv = skv + stage * S9_STAGE_BYTES + S9_KV_BYTES;
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(o[i]);
#pragma unroll
        for (int kc = 0; kc < S9_BN / 16; kc++)
            s9_mma_rs(o, p[4 * kc], p[4 * kc + 1], p[4 * kc + 2], p[4 * kc + 3],
                      s9_desc(sv + kc * 2048, S9_HALF, 1024));
        s9_wg_commit();
    };
    /* causal mask, then the online softmax over this thread's rows qp0 and qp1 (maxima unscaled,
     * the scale folded into exp2's argument); P into pn, the rescale factors of O into al */
    auto softmax = [&](int t, uint32_t *pn, float &al0, float &al1) {
        s9_softmax(s, pn, m0, m1, l0, l1, al0, al1, t * S9_BN + S9_BN - 1 > n_past + row0,
                   qp0 - t * S9_BN - t4 * 2, scale_log2);
    };

    /* tile 0: S, softmax, nothing to add to O yet */
    wait_tile();
    issue_s(0);
    load_next(0, 0);
    s9_wg_wait<0>();
    {
        float al0, al1;
        softmax(0, p, al0, al1);
    }
    int stage = 0;
    for (int t = 1; t < n_kt; t++) {
        const int prev = stage;
        stage = stage == S9_ST - 1 ? 0 : stage + 1;
        wait_tile();
        issue_s(stage); /* S of t ... */
        issue_pv(prev); /* ... and the P V of t - 1 behind it, */
        load_next(t, stage);
        s9_wg_wait<1>(); /* S done: its softmax runs while the tensor cores do P V */
        uint32_t pn[32];
        float al0, al1;
        softmax(t, pn, al0, al1);
        s9_wg_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(o[i]);
#pragma unroll
        for (int i = 0; i < 32; i++) s9_keep(p[i]);
        if (__any_sync(0xffffffffu, al0 != 1.0f || al1 != 1.0f)) {
#pragma unroll
            for (int i = 0; i < 64; i += 4) {
                o[i] *= al0;
                o[i + 1] *= al0;
                o[i + 2] *= al1;
                o[i + 3] *= al1;
            }
        }
#pragma unroll
        for (int i = 0; i < 32; i++) p[i] = pn[i];
    }
    s9_wg_fence();
    issue_pv(stage); /* P V of the last tile */
    s9_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; i++) s9_keep(o[i]);
#pragma unroll
    for (int i = 0; i < 32; i++) s9_keep(p[i]);
    if (wrow >= S.n_new) return;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float il0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, il1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int ra = wrow + warp * 16 + g, rb = ra + 8;
    const int ostride = n_heads * S9_HD;
    bf16 *oa = out + (int64_t)(S.q_start + ra) * ostride + h * S9_HD + t4 * 2;
    bf16 *ob = out + (int64_t)(S.q_start + rb) * ostride + h * S9_HD + t4 * 2;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        if (ra < S.n_new)
            s9_st32(oa + j * 8, s9_pack(o[4 * j] * il0, o[4 * j + 1] * il0), pol_once);
        if (rb < S.n_new)
            s9_st32(ob + j * 8, s9_pack(o[4 * j + 2] * il1, o[4 * j + 3] * il1), pol_once);
    }
#endif /* S9_HAVE_WGMMA */
}

#if S9_HAVE_WGMMA
__device__ __forceinline__ void s9_mbar_init(uint32_t bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void s9_mbar_wait(uint32_t bar, int parity)
{
    asm volatile("{\n.reg .pred p;\nS9_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra S9_WAIT;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
__device__ __forceinline__ void s9_mbar_arrive(uint32_t bar)
{
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
/* arrive on bar once every cp.async this thread issued so far has landed */
__device__ __forceinline__ void s9_mbar_arrive_cp(uint32_t bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
template <int ID, int N> __device__ __forceinline__ void s9_bar_sync()
{
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(N) : "memory");
}
template <int ID, int N> __device__ __forceinline__ void s9_bar_arrive()
{
    asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(N) : "memory");
}
#endif

/* The warp-specialised variants (PDS_ENGINE_CUDA_ATTN_SM90=2: cp.async, TMA = false; 3, the
 * default: TMA): warps 0-7 are the two consumer warpgroups, warps 8-11 the producer warpgroup
 * (setmaxnreg: 40 registers a thread, the consumers get 232), which alone fills the stages and
 * signals each landed K or V tile on an mbarrier (TMA byte count, or
 * cp.async.mbarrier.arrive.noinc); consumers free a K stage once its S is done and a V stage once
 * its P V is, on "empty" mbarriers the producer waits on before refilling (so K runs up to three
 * tiles ahead). No CTA-wide barrier in the loop, so the two warpgroups can drift apart; a pair of
 * named barriers makes them take turns issuing their wgmmas (ping-pong), so one's softmax runs
 * while the other's products keep the tensor cores busy.
 */
#define S9_WS_THREADS 384
template <bool TMA>
__global__ void __launch_bounds__(S9_WS_THREADS, 1)
    attn_prefill_sm90_ws(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                         const int32_t *bts, const int32_t *tiles, int n_heads, int n_kv_heads,
                         int bs, int bs_shift, float scale_log2, int flags, bf16 *out,
                         const __grid_constant__ CUtensorMap tmap /* TMA: the pool layer */)
{
#if S9_HAVE_WGMMA
    extern __shared__ __align__(1024) unsigned char s9_smem[];
    const uint32_t sbase = ((uint32_t)__cvta_generic_to_shared(s9_smem) + 1023u) & ~1023u;
    const uint32_t sq = sbase, skv = sbase + S9_Q_BYTES;
    /* mbarriers after the stages: kfull[ST], vfull[ST], kempty[ST], vempty[ST] */
    const uint32_t sbar = skv + S9_ST * S9_STAGE_BYTES;
    auto kfull = [&](int st) { return sbar + 8 * st; };
    auto vfull = [&](int st) { return sbar + 8 * (S9_ST + st); };
    auto kempty = [&](int st) { return sbar + 8 * (2 * S9_ST + st); };
    auto vempty = [&](int st) { return sbar + 8 * (3 * S9_ST + st); };
    const int tid = threadIdx.x, warp_all = tid >> 5, lane = tid & 31;
    if (tid == 0) {
        for (int st = 0; st < S9_ST; st++) {
            s9_mbar_init(kfull(st), TMA ? 1 : 128);
            s9_mbar_init(vfull(st), TMA ? 1 : 128);
            s9_mbar_init(kempty(st), 256);
            s9_mbar_init(vempty(st), 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    pdl_wait();
    pdl_trigger();
    int h, tile;
    s9_cta(flags & S9_F_ORDER, n_heads, n_kv_heads, h, tile);
    const uint64_t pol_kv = s9_policy_kv(flags & S9_F_HINTS);
    const uint64_t pol_once = s9_policy_once(flags & S9_F_HINTS);
    const int si = tiles[2 * tile], row0 = tiles[2 * tile + 1];
    const pds_cuda_seq_t S = seqs[si];
    const int n_past = S.n_ctx - S.n_new;
    const int kvh = h / (n_heads / n_kv_heads);
    const int nrows = min(S9_BM, S.n_new - row0);
    const int kv_end = n_past + row0 + nrows;
    const int n_kt = (kv_end + S9_BN - 1) / S9_BN;

    if (TMA && warp_all >= 8) {
        /* ---- TMA producer: warp 8 alone; lane L < 2 * 128 / bs copies one pool block's half
         * (64 columns, bs rows) per tile and operand, through the tensor map; blocks past the
         * sequence's end load its first block again (finite, and masked like any key past the
         * rows) ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (warp_all != 8) return;
        const int32_t *bt = bts + S.bt_off;
        const int nbox = 2 * (S9_BN / bs); /* (block, half) boxes per operand and tile */
        const int j = lane >> 1, hf = lane & 1;
        const uint64_t tm = reinterpret_cast<uint64_t>(&tmap);
        for (int t = 0; t < n_kt; t++) {
            const int st = t % S9_ST, use = t / S9_ST;
            const int tok0 = t * S9_BN + j * bs;
            const int c3 = 2 * bt[lane < nbox && tok0 < kv_end ? tok0 / bs : 0];
            for (int kvsel = 0; kvsel < 2; kvsel++) {
                const uint32_t full = kvsel ? vfull(st) : kfull(st);
                if (t >= S9_ST) s9_mbar_wait(kvsel ? vempty(st) : kempty(st), (use - 1) & 1);
                if (lane == 0)
                    asm volatile(
                        "{\n.reg .b64 st;\n"
                        "mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(full),
                        "r"(S9_KV_BYTES)
                        : "memory");
                __syncwarp();
                if (lane < nbox) {
                    const uint32_t dst = skv + st * S9_STAGE_BYTES + kvsel * S9_KV_BYTES +
                                         hf * S9_HALF + j * bs * 128;
                    const int c3k = c3 + kvsel;
                    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::"
                                 "complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, %4, %5}], "
                                 "[%6], %7;\n" ::"r"(dst),
                                 "l"(tm), "r"(hf * 64), "r"(kvh), "r"(0), "r"(c3k), "r"(full),
                                 "l"(pol_kv)
                                 : "memory");
                }
            }
        }
        return;
    }
    if (!TMA && warp_all >= 8) {
        /* ---- producer warpgroup (few registers): warp pw copies rows 32 pw .. 32 pw + 31 of each
         * tile; a lane copies 16-byte column cc of rows 32 pw + rsub + 2 i, i < 16, and holds the
         * pool block of row 32 pw + lane for the others ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        const int32_t *bt = bts + S.bt_off;
        const int64_t kvw = (int64_t)n_kv_heads * S9_HD;
        const int pw = warp_all - 8, cc = lane & 15, rsub = lane >> 4, c8 = cc & 7;
        const uint32_t half = (uint32_t)(cc >> 3) * S9_HALF;
        const bf16 *kbase = kv + (int64_t)kvh * S9_HD + cc * 8;
        for (int t = 0; t < n_kt; t++) {
            const int st = t % S9_ST, use = t / S9_ST;
            const int tl = t * S9_BN + pw * 32 + lane, tk = tl;
            const int myblk = tl < kv_end ? bt[bs_shift >= 0 ? tk >> bs_shift : tk / bs] : 0;
            for (int kvsel = 0; kvsel < 2; kvsel++) {
                if (t >= S9_ST) s9_mbar_wait(kvsel ? vempty(st) : kempty(st), (use - 1) & 1);
                const uint32_t dst = skv + st * S9_STAGE_BYTES + kvsel * S9_KV_BYTES + half;
                const bf16 *src0 = kbase + (kvsel ? (int64_t)bs * kvw : 0);
#pragma unroll 4 /* more and the producer spills at 40 registers */
                for (int i = 0; i < 16; i++) {
                    const int r = pw * 32 + rsub + 2 * i, tok = t * S9_BN + r;
                    const bool ok = tok < kv_end;
                    const int blk = __shfl_sync(0xffffffffu, myblk, rsub + 2 * i);
                    const int off = bs_shift >= 0 ? tok & (bs - 1) : tok % bs;
                    const bf16 *src = src0 + ((int64_t)blk * 2 * bs + off) * kvw;
                    s9_cp16h(dst + r * 128 + ((c8 ^ (r & 7)) << 4), ok ? src : kv, ok, pol_kv);
                }
                s9_mbar_arrive_cp(kvsel ? vfull(st) : kfull(st));
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

    /* ---- consumers: warpgroup wg, rows row0 + 64 wg ... ---- */
    const int wg = warp_all >> 2, warp = warp_all & 3, g = lane >> 2, t4 = lane & 3;
    const int wtid = tid & 127;
    {
        /* this warpgroup's 64 Q rows: 64 x 16 chunks, 8 per thread */
        const int cc = wtid & 15, c8 = cc & 7;
        const uint32_t half = (uint32_t)(cc >> 3) * S9_HALF;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int r = wg * 64 + (wtid >> 4) + 8 * i;
            const bool ok = r < nrows;
            const bf16 *src =
                ok ? q + (int64_t)(S.q_start + row0 + r) * q_stride + h * S9_HD + cc * 8 : q;
            s9_cp16h(sq + half + r * 128 + ((c8 ^ (r & 7)) << 4), src, ok, pol_once);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 0;\n" ::);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if (wg == 0)
            s9_bar_sync<3, 128>();
        else
            s9_bar_sync<4, 128>();
    }
    const int wrow = row0 + wg * 64;
    const int qp0 = n_past + wrow + warp * 16 + g;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.0f;
    uint32_t p[32];
    float s[64];
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const uint64_t dq0 = s9_desc(sq + wg * 64 * 128, 16, 1024);
    /* ping-pong: warpgroup wg issues its wgmmas after a sync on barrier 1 + wg, then lets the
     * other go (arrive on 2 - wg); warpgroup 1 opens by letting 0 go first */
    const bool pp = flags & S9_F_PINGPONG;
    auto turn_begin = [&]() {
        if (!pp) return;
        if (wg == 0)
            s9_bar_sync<1, 256>();
        else
            s9_bar_sync<2, 256>();
    };
    auto turn_end = [&]() {
        if (!pp) return;
        if (wg == 0)
            s9_bar_arrive<2, 256>();
        else
            s9_bar_arrive<1, 256>();
    };
    if (pp && wg == 1) s9_bar_arrive<1, 256>();

    auto issue_s = [&](int stage) {
        const uint32_t sk = skv + stage * S9_STAGE_BYTES;
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(s[i]);
        s9_wg_fence();
#pragma unroll
        for (int k = 0; k < S9_HD / 16; k++) {
            const uint32_t off = (uint32_t)(k >> 2) * S9_HALF + (k & 3) * 32;
            s9_mma_ss(s, dq0 + (off >> 4), s9_desc(sk + off, 16, 1024), k > 0);
        }
        s9_wg_commit();
    };
    auto issue_pv = [&](int stage) {
        const uint32_t sv = skv + stage * S9_STAGE_BYTES + S9_KV_BYTES;
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(o[i]);
#pragma unroll
        for (int kc = 0; kc < S9_BN / 16; kc++)
            s9_mma_rs(o, p[4 * kc], p[4 * kc + 1], p[4 * kc + 2], p[4 * kc + 3],
                      s9_desc(sv + kc * 2048, S9_HALF, 1024));
        s9_wg_commit();
    };
    auto softmax = [&](int t, uint32_t *pn, float &al0, float &al1) {
        s9_softmax(s, pn, m0, m1, l0, l1, al0, al1, t * S9_BN + S9_BN - 1 > n_past + row0,
                   qp0 - t * S9_BN - t4 * 2, scale_log2);
    };

    /* tile 0 */
    s9_mbar_wait(kfull(0), 0);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    turn_begin();
    issue_s(0);
    turn_end();
    s9_wg_wait<0>();
    s9_mbar_arrive(kempty(0));
    {
        float al0, al1;
        softmax(0, p, al0, al1);
    }
    for (int t = 1; t < n_kt; t++) {
        const int st = t % S9_ST, pst = (t - 1) % S9_ST;
        s9_mbar_wait(kfull(st), (t / S9_ST) & 1);
        s9_mbar_wait(vfull(pst), ((t - 1) / S9_ST) & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        turn_begin();
        issue_s(st);
        issue_pv(pst);
        turn_end();
        s9_wg_wait<1>();
        s9_mbar_arrive(kempty(st));
        uint32_t pn[32];
        float al0, al1;
        softmax(t, pn, al0, al1);
        s9_wg_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(o[i]);
#pragma unroll
        for (int i = 0; i < 32; i++) s9_keep(p[i]);
        s9_mbar_arrive(vempty(pst));
        if (__any_sync(0xffffffffu, al0 != 1.0f || al1 != 1.0f)) {
#pragma unroll
            for (int i = 0; i < 64; i += 4) {
                o[i] *= al0;
                o[i + 1] *= al0;
                o[i + 2] *= al1;
                o[i + 3] *= al1;
            }
        }
#pragma unroll
        for (int i = 0; i < 32; i++) p[i] = pn[i];
    }
    {
        const int pst = (n_kt - 1) % S9_ST;
        s9_mbar_wait(vfull(pst), ((n_kt - 1) / S9_ST) & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        turn_begin();
        s9_wg_fence();
        issue_pv(pst);
        if (wg == 0) turn_end(); /* warpgroup 1's last turn-passing would have no taker */
        s9_wg_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; i++) s9_keep(o[i]);
#pragma unroll
        for (int i = 0; i < 32; i++) s9_keep(p[i]);
    }
    if (wrow >= S.n_new) return;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float il0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, il1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int ra = wrow + warp * 16 + g, rb = ra + 8;
    const int ostride = n_heads * S9_HD;
    bf16 *oa = out + (int64_t)(S.q_start + ra) * ostride + h * S9_HD + t4 * 2;
    bf16 *ob = out + (int64_t)(S.q_start + rb) * ostride + h * S9_HD + t4 * 2;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        if (ra < S.n_new)
            s9_st32(oa + j * 8, s9_pack(o[4 * j] * il0, o[4 * j + 1] * il0), pol_once);
        if (rb < S.n_new)
            s9_st32(ob + j * 8, s9_pack(o[4 * j + 2] * il1, o[4 * j + 3] * il1), pol_once);
    }
#endif /* S9_HAVE_WGMMA */
}

extern "C" int pds_cuda_attn_prefill_sm90_supported(int head_dim)
{
    static int cc = -1; /* compute capability of the current device, 10 * major + minor */
    if (cc < 0) {
        int dev = 0, major = 0, minor = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
            major = minor = 0;
        cc = 10 * major + minor;
    }
    return cc == 90 && head_dim == S9_HD;
}

extern "C" pds_status_t
pds_cuda_attn_prefill_sm90(const uint16_t *q, int q_stride, const uint16_t *kv_layer,
                           const pds_cuda_seq_t *seqs, const int32_t *block_tables,
                           const int32_t *tiles, int n_tiles, int n_heads, int n_kv_heads,
                           int head_dim, int block_size, uint16_t *out, cudaStream_t s)
{
    if (n_tiles <= 0) return PDS_OK;
    if (!pds_cuda_attn_prefill_sm90_supported(head_dim))
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "sm90 prefill attention: needs an sm_90 device and head_dim 128 (got %d)",
                       head_dim);
    if (n_tiles > 65535)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "sm90 prefill attention: %d tiles", n_tiles);
    /* PDS_ENGINE_CUDA_ATTN_SM90=1: the kernel with one CTA barrier per tile; 2: the
     * warp-specialised one, K/V by cp.async; 3: the same with K/V by TMA (block sizes 8..128 that
     * divide 128, else 1); 0 is handled by the caller */
    static int variant = -1, flags = 0;
    static PFN_cuTensorMapEncodeTiled_v12000 encode = NULL;
    if (variant < 0) {
        const char *e = getenv("PDS_ENGINE_CUDA_ATTN_SM90");
        variant = e && e[0] >= '1' && e[0] <= '3' && !e[1] ? e[0] - '0' : S9_DEFAULT;
        /* measurement switches, each 0 or 1 (measured in the file's opening comment) */
        e = getenv("PDS_ENGINE_CUDA_ATTN_SM90_HINTS");
        flags |= !(e && strcmp(e, "0") == 0) ? S9_F_HINTS : 0;
        e = getenv("PDS_ENGINE_CUDA_ATTN_SM90_PINGPONG");
        flags |= !(e && strcmp(e, "0") == 0) ? S9_F_PINGPONG : 0;
        e = getenv("PDS_ENGINE_CUDA_ATTN_SM90_ORDER");
        flags |= e && strcmp(e, "1") == 0 ? S9_F_ORDER : 0;
        PDS_CUDA_TRY(cudaFuncSetAttribute(attn_prefill_sm90,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, S9_SMEM));
        PDS_CUDA_TRY(cudaFuncSetAttribute(attn_prefill_sm90_ws<false>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          S9_SMEM + 128));
        PDS_CUDA_TRY(cudaFuncSetAttribute(attn_prefill_sm90_ws<true>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          S9_SMEM + 128));
        if (variant == 3) {
            void *fn = NULL;
            cudaDriverEntryPointQueryResult qr;
            if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                 cudaEnableDefault, &qr) == cudaSuccess &&
                qr == cudaDriverEntryPointSuccess)
                encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
            else
                variant = 1;
        }
    }
    int shift = -1;
    for (int b = 0; b < 30; b++)
        if (block_size == (1 << b)) shift = b;
    const float sl = 1.4426950408889634f / sqrtf((float)head_dim);
    const int v = variant == 3 && (shift < 3 || shift > 7) ? 1 : variant;
    CUtensorMap tmap;
    memset(&tmap, 0, sizeof tmap);
    if (v == 3) {
        /* the pool layer [blocks * 2 (K, V)][block_size][kv_heads][head_dim] bf16; boxes of one
         * block's rows of one head and 64 columns (128 bytes: the swizzle span). The outer extent
         * is not known here: any block id the tables hold is below it. */
        const cuuint64_t dims[4] = {(cuuint64_t)head_dim, (cuuint64_t)n_kv_heads,
                                    (cuuint64_t)block_size, (cuuint64_t)1 << 31};
        const cuuint64_t strides[3] = {(cuuint64_t)head_dim * 2,
                                       (cuuint64_t)n_kv_heads * head_dim * 2,
                                       (cuuint64_t)block_size * n_kv_heads * head_dim * 2};
        const cuuint32_t box[4] = {64, 1, (cuuint32_t)block_size, 1}, estr[4] = {1, 1, 1, 1};
        CUresult r =
            encode(&tmap, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void *)kv_layer, dims, strides, box,
                   estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
        if (r != CUDA_SUCCESS)
            return PDS_ERR(PDS_ERR_DEVICE, "cuTensorMapEncodeTiled for prefill attention: %d",
                           (int)r);
    }
    const bf16 *qb = (const bf16 *)q, *kvb = (const bf16 *)kv_layer;
    const dim3 grid(n_heads, n_tiles);
    cudaError_t e =
        v == 1 ? pds_launch(attn_prefill_sm90, grid, dim3(S9_THREADS), (size_t)S9_SMEM, s, qb,
                            q_stride, kvb, seqs, block_tables, tiles, n_heads, n_kv_heads,
                            block_size, shift, sl, flags, (bf16 *)out)
               : pds_launch(v == 3 ? attn_prefill_sm90_ws<true> : attn_prefill_sm90_ws<false>, grid,
                            dim3(S9_WS_THREADS), (size_t)S9_SMEM + 128, s, qb, q_stride, kvb, seqs,
                            block_tables, tiles, n_heads, n_kv_heads, block_size, shift, sl, flags,
                            (bf16 *)out, tmap);
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess)
        return PDS_ERR(PDS_ERR_DEVICE, "launch of attn_prefill_sm90: %s", cudaGetErrorString(e));
    return PDS_OK;
}

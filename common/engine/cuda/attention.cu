/* attention.cu: causal attention over the paged KV pool — a tensor-core flash-attention kernel for
 * prefill (any mix of prompt lengths and already-cached prefixes, i.e. chunked prefill too), a
 * flash-decoding kernel for decode steps, and a plain kernel for head sizes the fast ones do not
 * cover.
 *
 * Prefill: one CTA = 128 query rows of one head; Q is staged in shared memory, K/V tiles are
 * gathered from the pool through the block table by cp.async into three padded shared-memory
 * stages (two tiles ahead, one barrier per tile); S = Q K^T and O += P V run on mma.sync
 * m16n8k16 (bf16 in, fp32 accumulate) with an online softmax in registers (exp2, log2e and the
 * scale folded into one FFMA; the output rescale skipped when no row maximum moved). Tiles past
 * the causal diagonal are never loaded, and the longest (last) tiles are scheduled first.
 *
 * Decode: one CTA = one (sequence, KV head, context chunk); it serves all query heads of the GQA
 * group, so each K/V byte is read once per step. Chunks of up to 64 KiB of K+V (128 tokens at
 * head_dim 128) are fetched whole into shared memory by cp.async at the CTA's start, K and V as
 * two groups, so all of a chunk's bytes are in flight at once and V arrives while the scores are
 * computed; Q K^T and P V then run on mma.sync with the GQA group's query heads as the rows of a
 * 16-row tile (attn_decode_mma; PDS_ENGINE_CUDA_DEC_MMA=0: the same staging with scalar FMAs,
 * attn_decode_staged, which ncu showed issue-bound; PDS_ENGINE_CUDA_DEC_STAGED=0: neither).
 * The K/V copies carry an L2 evict-first hint (each line is read once per step; measured on an
 * H100 at llama3-8b, 1k context: batch 64 9.59-9.65 vs 9.79-9.84 ms without, batch 32 8.07-8.16
 * vs 8.16; PDS_ENGINE_CUDA_L2_HINTS=0 drops it). Pulling the o projection's weights into L2 by
 * bulk prefetches spread over the attention's CTAs was tried too: the GEMM got 6 us faster and
 * the attention 5 us slower, no net gain, so it is not here.
 * Longer chunks use the register-staged kernel (several keys' loads per thread in flight before
 * the first is used). Partial (max, sum, unnormalised output) per chunk are merged by a combine
 * kernel. The grid is sized for the longest context a
 * CUDA graph bucket allows; chunks past a sequence's end exit.
 *
 * Measured on an H100 (llama3-8b shapes, bench/results/cuda-llama3-8b.md): decode attention at
 * batch 32 and context 1k takes 56.6 us per layer on tensor cores (DRAM 74% busy) against 67.6 us
 * (62%) with scalar FMAs; the prefill kernel runs
 * causal attention at ~225 TFLOP/s at 4k tokens (19.5 ms per 4k forward; the two-stage,
 * two-barrier kernel, PDS_ENGINE_CUDA_ATTN_PIPE=0, 20.7-21.1 ms; the first version's ~110 TFLOP/s).
 * ncu on the two-stage kernel showed issue slots 42% and the tensor pipe ~40% busy, mostly
 * fixed-latency dependency stalls; 8 warps of 16 rows (MT = 1), 64-key tiles, 4 stages were no
 * faster. On an sm_90 device with head_dim 128, pds_cuda_attn_prefill runs the wgmma kernel of
 * attn_prefill_sm90.cu instead (same tiles; 13.5 ms per 4k forward, ~325 TFLOP/s);
 * PDS_ENGINE_CUDA_ATTN_SM90=0 keeps the kernel below.
 */
#include <cuda_bf16.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/cuda_kernels.h"
#include "engine/cuda/launch.cuh"

typedef __nv_bfloat16 bf16;

#define LAUNCH_CHECK(name)                                                                    \
    do {                                                                                      \
        cudaError_t e_ = cudaGetLastError();                                                  \
        if (e_ != cudaSuccess)                                                                \
            return PDS_ERR(PDS_ERR_DEVICE, "launch of %s: %s", name, cudaGetErrorString(e_)); \
    } while (0)

#define LOG2E 1.4426950408889634f

/* ---- small helpers ----------------------------------------------------------------------------
 */
__device__ __forceinline__ uint32_t pack_bf16(float a, float b)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b); /* .x = a (low half) */
    return *(uint32_t *)&v;
}

__device__ __forceinline__ void mma_bf16(float *c, const uint32_t *a, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, const void *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* 16-byte global -> shared copy that bypasses registers; pred false writes 16 zero bytes. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool pred)
{
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

/* The same with an L2 eviction policy (createpolicy) for the source lines. */
__device__ __forceinline__ void cp_async16_hint(void *smem, const void *gmem, bool pred,
                                                uint64_t pol)
{
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(s),
                 "l"(gmem), "r"(n), "l"(pol));
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ const bf16 *kv_row(const bf16 *kv, const int32_t *bt, int tok,
                                              int kv_sel, int head, int n_kv_heads, int head_dim,
                                              int bs)
{
    int blk = bt[tok / bs];
    return kv + (((int64_t)blk * 2 + kv_sel) * bs + tok % bs) * ((int64_t)n_kv_heads * head_dim) +
           (int64_t)head * head_dim;
}

/* ---- prefill: tensor-core flash attention, K/V multi-buffered with cp.async --------------------
 * One CTA = FA_ROWS query rows of one head: 4 warps x 32 rows (MT = 2 m16 tiles per warp, so every
 * K and V fragment read from shared memory feeds two MMAs) or 8 warps x 16 rows (MT = 1: half the
 * registers per thread, twice the warps to hide latency, twice the fragment reads). Q is staged in
 * shared memory once; K/V tiles of FA_KEYS tokens are gathered through the block table by cp.async
 * into one of ST stages while another is computed on (PIPE below). The grid is (head, tile) with
 * tiles taken in reverse order, so the longest (last, causal) tiles start first and the heads of
 * one GQA group run side by side on the same K/V (L2 reuse). FA_KEYS (keys per tile) is 32 or 64:
 * 64 halves the barriers and the Q fragment reloads per key, 32 keeps head_dim 128 within the
 * register file. */
#define FA_ROWS 128

template <int HD, int FA_KEYS, int ST> constexpr size_t fa_smem_bytes()
{
    return sizeof(bf16) * (size_t)(FA_ROWS + 2 * ST * FA_KEYS) * (HD + 8);
}

/* 2^x with denormal results flushed to zero (one MUFU.EX2, no denormal fix-up around it) */
__device__ __forceinline__ float ex2_ftz(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* PIPE = 0: two stages; the next tile loads while this one is computed on, two barriers per tile.
 * PIPE = 1: ST stages, ST - 1 tiles ahead, one barrier per tile (the stage refilled at tile t was
 * last read at t - 1, which every warp has finished once it passes tile t's barrier); a tile is
 * computed in steps of 32 keys (so 64-key tiles keep the registers of 32), the K fragments of a
 * 32-wide slice of head_dim are loaded before its MMAs, which are issued so that no MMA waits on
 * the one just before it (same accumulator), and exp2 flushes denormals (one MUFU op). */
template <int HD, int FA_KEYS, int MT, int ST, int PIPE>
__global__ void __launch_bounds__(FA_ROWS / MT * 2, 2)
    attn_prefill_fa(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                    const int32_t *bts, const int32_t *tiles, int n_heads, int n_kv_heads, int bs,
                    int bs_shift /* log2(bs) for a power of two, else -1 */, float scale_log2,
                    bf16 *out)
{
    constexpr int LD = HD + 8, CH = HD / 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *sq = (bf16 *)fa_smem;        /* [FA_ROWS][LD] */
    bf16 *sk = sq + FA_ROWS * LD;      /* [ST][FA_KEYS][LD] */
    bf16 *sv = sk + ST * FA_KEYS * LD; /* [ST][FA_KEYS][LD] */
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x, tile = gridDim.y - 1 - blockIdx.y;
    const int si = tiles[2 * tile], row0 = tiles[2 * tile + 1];
    const pds_cuda_seq_t S = seqs[si];
    const int n_past = S.n_ctx - S.n_new;
    const int kvh = h / (n_heads / n_kv_heads);
    const int32_t *bt = bts + S.bt_off;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int nrows = min(FA_ROWS, S.n_new - row0);
    const int kv_end = n_past + row0 + nrows; /* keys any row of the CTA sees */
    const int n_kt = (kv_end + FA_KEYS - 1) / FA_KEYS;
    const int64_t kvw = (int64_t)n_kv_heads * HD;

    constexpr int NT = FA_ROWS / MT * 2; /* threads: FA_ROWS / (16 * MT) warps */
    for (int c = tid; c < FA_ROWS * CH; c += NT) {
        int r = c / CH, col = (c % CH) * 8;
        bool ok = r < nrows;
        const bf16 *src = ok ? q + (int64_t)(S.q_start + row0 + r) * q_stride + h * HD + col : q;
        cp_async16(&sq[r * LD + col], src, ok);
    }
    /* each thread copies NI (row, 16-byte column) pieces of K and of V per tile; the block-table
     * reads are issued together, then the copies */
    constexpr int NI = FA_KEYS * CH / NT;
    auto load_kv = [&](int t, int stage) {
        bf16 *dk = sk + stage * FA_KEYS * LD, *dv = sv + stage * FA_KEYS * LD;
        int blk[NI];
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int tok = t * FA_KEYS + (tid + i * NT) / CH;
            const int bi = bs_shift >= 0 ? tok >> bs_shift : tok / bs;
            blk[i] = tok < kv_end ? bt[bi] : 0;
        }
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int c = tid + i * NT, r = c / CH, col = (c % CH) * 8;
            const int tok = t * FA_KEYS + r;
            const int off = bs_shift >= 0 ? tok & (bs - 1) : tok % bs;
            const bf16 *kp = kv + ((int64_t)blk[i] * 2 * bs + off) * kvw + kvh * HD + col;
            const bool ok = tok < kv_end;
            cp_async16(&dk[r * LD + col], kp, ok);
            cp_async16(&dv[r * LD + col], kp + (int64_t)bs * kvw, ok);
        }
    };
    load_kv(0, 0);
    cp_async_commit();
    if (PIPE) /* always a group, empty past the end, so that wait<ST - 2> counts right */
#pragma unroll
        for (int i = 1; i < ST - 1; i++) {
            if (i < n_kt) load_kv(i, i);
            cp_async_commit();
        }

    const int wrow = row0 + warp * 16 * MT; /* first row (within the new tokens) of this warp */
    const bool live = wrow < S.n_new;
    const int wpos0 = n_past + wrow;
    const int wpos_last = n_past + min(wrow + 16 * MT - 1, S.n_new - 1);
    float o[MT][HD / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < HD / 8; i++)
            o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;

    constexpr int CK = PIPE ? 32 : FA_KEYS; /* keys per compute step */
    int cur = 0;                            /* stage of tile t */
    for (int t = 0; t < n_kt; t++) {
        if (!PIPE) {
            if (t + 1 < n_kt) {
                load_kv(t + 1, (t + 1) & 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
        } else {
            cp_async_wait<ST - 2>(); /* tile t (and Q) landed; later ones may be in flight */
            __syncthreads();
            const int nxt = cur == 0 ? ST - 1 : cur - 1; /* (t + ST - 1) % ST */
            if (t + ST - 1 < n_kt) load_kv(t + ST - 1, nxt);
            cp_async_commit();
        }
#pragma unroll 1
        for (int sub = 0; sub < FA_KEYS / CK; sub++) {
            const int kb = t * FA_KEYS + sub * CK;
            if (live && kb <= wpos_last) { /* warp-uniform: mma.sync needs all lanes */
                const bf16 *ck = sk + (cur * FA_KEYS + sub * CK) * LD,
                           *cv = sv + (cur * FA_KEYS + sub * CK) * LD;
                float s[MT][CK / 8][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nt = 0; nt < CK / 8; nt++)
                        s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk += 2) {
                    uint32_t qa[MT][2][4];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        const bf16 *qr =
                            &sq[(warp * 16 * MT + mt * 16 + (lane & 15)) * LD + (lane >> 4) * 8];
                        ldsm_x4(qa[mt][0], qr + kk * 16);
                        ldsm_x4(qa[mt][1], qr + (kk + 1) * 16);
                    }
                    if (!PIPE) {
#pragma unroll
                        for (int nt = 0; nt < CK / 8; nt++) {
                            uint32_t b[4];
                            ldsm_x4(b, &ck[(nt * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8]);
#pragma unroll
                            for (int mt = 0; mt < MT; mt++) {
                                mma_bf16(s[mt][nt], qa[mt][0], b[0], b[1]);
                                mma_bf16(s[mt][nt], qa[mt][1], b[2], b[3]);
                            }
                        }
                    } else {
                        uint32_t b[CK / 8][4];
#pragma unroll
                        for (int nt = 0; nt < CK / 8; nt++)
                            ldsm_x4(b[nt],
                                    &ck[(nt * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8]);
#pragma unroll
                        for (int hf = 0; hf < 2; hf++)
#pragma unroll
                            for (int nt = 0; nt < CK / 8; nt++)
#pragma unroll
                                for (int mt = 0; mt < MT; mt++)
                                    mma_bf16(s[mt][nt], qa[mt][hf], b[nt][2 * hf],
                                             b[nt][2 * hf + 1]);
                    }
                }
                /* causal mask (only on tiles that reach past the warp's first row), online softmax
                 * over the thread's four rows (mt, g) and (mt, g + 8); maxima are kept unscaled and
                 * the scale is folded into exp2's argument (one FFMA) */
                const bool need_mask = kb + CK - 1 > wpos0;
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const int qp0 = wpos0 + mt * 16 + g, qp1 = qp0 + 8;
                    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
                    for (int nt = 0; nt < CK / 8; nt++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int key = kb + nt * 8 + t4 * 2 + (e & 1);
                            if (need_mask && key > ((e < 2) ? qp0 : qp1)) s[mt][nt][e] = -INFINITY;
                            if (e < 2)
                                mx0 = fmaxf(mx0, s[mt][nt][e]);
                            else
                                mx1 = fmaxf(mx1, s[mt][nt][e]);
                        }
                    }
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                    float mn0 = fmaxf(m[mt][0], mx0), mn1 = fmaxf(m[mt][1], mx1);
                    float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
                    float al0 = !PIPE ? exp2f((m[mt][0] - mu0) * scale_log2)
                                      : ex2_ftz((m[mt][0] - mu0) * scale_log2);
                    float al1 = !PIPE ? exp2f((m[mt][1] - mu1) * scale_log2)
                                      : ex2_ftz((m[mt][1] - mu1) * scale_log2);
                    m[mt][0] = mn0;
                    m[mt][1] = mn1;
                    const float b0 = -mu0 * scale_log2, b1 = -mu1 * scale_log2;
                    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < CK / 8; nt++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const float x = fmaf(s[mt][nt][e], scale_log2, e < 2 ? b0 : b1);
                            s[mt][nt][e] = !PIPE ? exp2f(x) : ex2_ftz(x);
                        }
                        rs0 += s[mt][nt][0] + s[mt][nt][1];
                        rs1 += s[mt][nt][2] + s[mt][nt][3];
                    }
                    l[mt][0] = l[mt][0] * al0 + rs0;
                    l[mt][1] = l[mt][1] * al1 + rs1;
                    if (__any_sync(0xffffffffu, al0 != 1.0f || al1 != 1.0f)) {
#pragma unroll
                        for (int i = 0; i < HD / 8; i++) {
                            o[mt][i][0] *= al0;
                            o[mt][i][1] *= al0;
                            o[mt][i][2] *= al1;
                            o[mt][i][3] *= al1;
                        }
                    }
                }
                /* O += P V */
#pragma unroll
                for (int k2 = 0; k2 < CK / 16; k2++) {
                    uint32_t a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        a[mt][0] = pack_bf16(s[mt][2 * k2][0], s[mt][2 * k2][1]);
                        a[mt][1] = pack_bf16(s[mt][2 * k2][2], s[mt][2 * k2][3]);
                        a[mt][2] = pack_bf16(s[mt][2 * k2 + 1][0], s[mt][2 * k2 + 1][1]);
                        a[mt][3] = pack_bf16(s[mt][2 * k2 + 1][2], s[mt][2 * k2 + 1][3]);
                    }
#pragma unroll
                    for (int nd = 0; nd < HD / 8; nd += 2) {
                        uint32_t b[4];
                        ldsm_x4_t(b, &cv[(k2 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                         nd * 8 + (lane >> 4) * 8]);
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            mma_bf16(o[mt][nd], a[mt], b[0], b[1]);
                            mma_bf16(o[mt][nd + 1], a[mt], b[2], b[3]);
                        }
                    }
                }
            }
        }
        if (!PIPE) __syncthreads(); /* the stage just read is refilled next iteration */
        cur = cur == ST - 1 ? 0 : cur + 1;
    }
    if (!live) return;
    const int ostride = n_heads * HD;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        float l0 = l[mt][0], l1 = l[mt][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        float il0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, il1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
        int r0 = wrow + mt * 16 + g, r1 = r0 + 8;
#pragma unroll
        for (int nd = 0; nd < HD / 8; nd++) {
            int col = h * HD + nd * 8 + t4 * 2;
            if (r0 < S.n_new)
                *(uint32_t *)(out + (int64_t)(S.q_start + r0) * ostride + col) =
                    pack_bf16(o[mt][nd][0] * il0, o[mt][nd][1] * il0);
            if (r1 < S.n_new)
                *(uint32_t *)(out + (int64_t)(S.q_start + r1) * ostride + col) =
                    pack_bf16(o[mt][nd][2] * il1, o[mt][nd][3] * il1);
        }
    }
}

/* ---- plain kernel: one warp per (row, head); any head_dim <= 256 ------------------------------
 */
__global__ void attn_plain(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                           int n_seqs, const int32_t *bts, int T, int n_heads, int n_kv_heads,
                           int hd, int bs, float scale, bf16 *out)
{
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= T * n_heads) return;
    int row = warp / n_heads, h = warp % n_heads;
    int si = 0;
    while (si + 1 < n_seqs && seqs[si + 1].q_start <= row) si++;
    pds_cuda_seq_t S = seqs[si];
    int pos = S.n_ctx - S.n_new + (row - S.q_start);
    int kvh = h / (n_heads / n_kv_heads);
    const int32_t *bt = bts + S.bt_off;
    float qv[8], acc[8];
    int nd = (hd + 31) / 32;
    for (int i = 0; i < 8; i++) {
        int d = lane + 32 * i;
        qv[i] =
            (i < nd && d < hd) ? __bfloat162float(q[(int64_t)row * q_stride + h * hd + d]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= pos; j++) {
        const bf16 *k = kv_row(kv, bt, j, 0, kvh, n_kv_heads, hd, bs);
        const bf16 *v = kv_row(kv, bt, j, 1, kvh, n_kv_heads, hd, bs);
        float dot = 0.0f;
        for (int i = 0; i < nd; i++) {
            int d = lane + 32 * i;
            if (d < hd) dot += qv[i] * __bfloat162float(k[d]);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float sc = dot * scale;
        float mn = fmaxf(m, sc);
        float al = expf(m - mn), p = expf(sc - mn);
        l = l * al + p;
        for (int i = 0; i < nd; i++) {
            int d = lane + 32 * i;
            acc[i] = acc[i] * al + (d < hd ? p * __bfloat162float(v[d]) : 0.0f);
        }
        m = mn;
    }
    for (int i = 0; i < nd; i++) {
        int d = lane + 32 * i;
        if (d < hd) out[(int64_t)row * n_heads * hd + h * hd + d] = __float2bfloat16_rn(acc[i] / l);
    }
}

extern "C" int pds_cuda_attn_prefill_tile_rows(int head_dim)
{
    return FA_ROWS;
}

extern "C" int pds_cuda_attn_prefill_tiles(const int *n_new, int n_seqs, int head_dim,
                                           int32_t *tiles, int cap)
{
    int n = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int r = 0; r < n_new[s]; r += FA_ROWS) {
            if (n >= cap) return n;
            tiles[2 * n] = s;
            tiles[2 * n + 1] = r;
            n++;
        }
    return n;
}

template <int HD, int BN, int MT, int ST, int PIPE>
static pds_status_t launch_fa(const uint16_t *q, int q_stride, const uint16_t *kv,
                              const pds_cuda_seq_t *seqs, const int32_t *bts, const int32_t *tiles,
                              int n_tiles, int n_heads, int n_kv_heads, int bs, float scale_log2,
                              uint16_t *out, cudaStream_t s)
{
    constexpr size_t smem = fa_smem_bytes<HD, BN, ST>();
    static bool raised = false; /* per instance: the dynamic shared-memory limit, set once */
    if (!raised) {
        PDS_CUDA_TRY(cudaFuncSetAttribute(attn_prefill_fa<HD, BN, MT, ST, PIPE>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        raised = true;
    }
    if (n_tiles > 65535)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "prefill attention: %d tiles", n_tiles);
    int shift = -1;
    for (int b = 0; b < 30; b++)
        if (bs == (1 << b)) shift = b;
    pds_launch(attn_prefill_fa<HD, BN, MT, ST, PIPE>, dim3(n_heads, n_tiles), FA_ROWS / MT * 2,
               smem, s, (const bf16 *)q, q_stride, (const bf16 *)kv, seqs, bts, tiles, n_heads,
               n_kv_heads, bs, shift, scale_log2, (bf16 *)out);
    LAUNCH_CHECK("attn_prefill_fa");
    return PDS_OK;
}

extern "C" pds_status_t pds_cuda_attn_prefill(const uint16_t *q, int q_stride,
                                              const uint16_t *kv_layer, const pds_cuda_seq_t *seqs,
                                              const int32_t *block_tables, const int32_t *tiles,
                                              int n_tiles, int n_heads, int n_kv_heads,
                                              int head_dim, int block_size, uint16_t *out,
                                              cudaStream_t s)
{
    if (n_tiles <= 0) return PDS_OK;
    float scale = 1.0f / sqrtf((float)head_dim);
    if (head_dim != 128 && head_dim != 64)
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "prefill attention: head_dim %d needs pds_cuda_attn_plain", head_dim);
    /* the wgmma kernel (attn_prefill_sm90.cu) where it applies; PDS_ENGINE_CUDA_ATTN_SM90=0: off */
    static int sm90 = -1;
    if (sm90 < 0) {
        const char *e = getenv("PDS_ENGINE_CUDA_ATTN_SM90");
        sm90 = !(e && strcmp(e, "0") == 0);
    }
    if (sm90 && pds_cuda_attn_prefill_sm90_supported(head_dim))
        return pds_cuda_attn_prefill_sm90(q, q_stride, kv_layer, seqs, block_tables, tiles, n_tiles,
                                          n_heads, n_kv_heads, head_dim, block_size, out, s);
    /* PDS_ENGINE_CUDA_ATTN_PIPE: 1 (default) 32-key tiles in 3 stages, one barrier per tile;
     * 4: 32-key tiles in 4 stages; 64: 64-key tiles in 2 stages, one barrier per tile; 0: the
     * two-barrier kernel, whose shape PDS_ENGINE_CUDA_ATTN_KEYS=32|64 (keys per tile) and
     * PDS_ENGINE_CUDA_ATTN_MT=1|2 (m16 tiles per warp) choose. Measured side by side on the H100
     * (bench/results/cuda-llama3-8b.md). */
    static int pipe = -1, keys = 0, mt = 0;
    if (pipe < 0) {
        const char *e = getenv("PDS_ENGINE_CUDA_ATTN_PIPE");
        pipe = !e                     ? 1
               : strcmp(e, "0") == 0  ? 0
               : strcmp(e, "64") == 0 ? 64
               : strcmp(e, "4") == 0  ? 4
                                      : 1;
        e = getenv("PDS_ENGINE_CUDA_ATTN_KEYS");
        keys = e && atoi(e) == 64 ? 64 : 32;
        e = getenv("PDS_ENGINE_CUDA_ATTN_MT");
        mt = e && atoi(e) == 1 ? 1 : 2;
    }
    const float sl = scale * LOG2E;
#define FA_ARGS                                                                                 \
    q, q_stride, kv_layer, seqs, block_tables, tiles, n_tiles, n_heads, n_kv_heads, block_size, \
        sl, out, s
    if (pipe == 1)
        return head_dim == 128 ? launch_fa<128, 32, 2, 3, 1>(FA_ARGS)
                               : launch_fa<64, 32, 2, 3, 1>(FA_ARGS);
    if (pipe == 4)
        return head_dim == 128 ? launch_fa<128, 32, 2, 4, 1>(FA_ARGS)
                               : launch_fa<64, 32, 2, 4, 1>(FA_ARGS);
    if (pipe == 64)
        return head_dim == 128 ? launch_fa<128, 64, 2, 2, 1>(FA_ARGS)
                               : launch_fa<64, 64, 2, 2, 1>(FA_ARGS);
    if (head_dim == 128) {
        if (mt == 1)
            return keys == 32 ? launch_fa<128, 32, 1, 2, 0>(FA_ARGS)
                              : launch_fa<128, 64, 1, 2, 0>(FA_ARGS);
        return keys == 32 ? launch_fa<128, 32, 2, 2, 0>(FA_ARGS)
                          : launch_fa<128, 64, 2, 2, 0>(FA_ARGS);
    }
    if (mt == 1)
        return keys == 32 ? launch_fa<64, 32, 1, 2, 0>(FA_ARGS)
                          : launch_fa<64, 64, 1, 2, 0>(FA_ARGS);
    return keys == 32 ? launch_fa<64, 32, 2, 2, 0>(FA_ARGS) : launch_fa<64, 64, 2, 2, 0>(FA_ARGS);
#undef FA_ARGS
}

/* Plain path: needs the sequence list and T instead of tiles. Declared here, used by the engine
 * for head sizes other than 64/128 and by tests as a second opinion. */
extern "C" pds_status_t pds_cuda_attn_plain(const uint16_t *q, int q_stride,
                                            const uint16_t *kv_layer, const pds_cuda_seq_t *seqs,
                                            int n_seqs, const int32_t *block_tables, int T,
                                            int n_heads, int n_kv_heads, int head_dim,
                                            int block_size, uint16_t *out, cudaStream_t s)
{
    if (T <= 0) return PDS_OK;
    if (head_dim > 256)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "attention: head_dim %d > 256", head_dim);
    int64_t warps = (int64_t)T * n_heads;
    int blocks = (int)((warps * 32 + 255) / 256);
    attn_plain<<<blocks, 256, 0, s>>>((const bf16 *)q, q_stride, (const bf16 *)kv_layer, seqs,
                                      n_seqs, block_tables, T, n_heads, n_kv_heads, head_dim,
                                      block_size, 1.0f / sqrtf((float)head_dim), (bf16 *)out);
    LAUNCH_CHECK("attn_plain");
    return PDS_OK;
}

/* ---- decode: flash-decoding, GQA-aware
 * ----------------------------------------------------------- */
#define DEC_THREADS 128

/* Softmax statistics of a decode chunk, per query head of the group: warp w takes heads w, w + 4,
 * ...; ss [n_pad][G] holds scores (log2-scaled) for rows < n, and leaves with their exp2(s - max),
 * 0 for the padding rows n..n_pad; sm_m / sm_l get each head's max and sum. */
template <int G>
__device__ __forceinline__ void dec_softmax_stats(float *ss, int n, int n_pad, int warp, int lane,
                                                  float *sm_m, float *sm_l)
{
    for (int gh = warp; gh < G; gh += DEC_THREADS / 32) {
        float mx = -INFINITY;
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, ss[j * G + gh]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.0f;
        for (int j = lane; j < n_pad; j += 32) {
            float p = j < n ? exp2f(ss[j * G + gh] - mx) : 0.0f;
            ss[j * G + gh] = p;
            sum += p;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) sm_m[gh] = mx, sm_l[gh] = sum;
    }
}

/* Stages a decode chunk's K and V rows (tokens start..start+n of KV head kvh) in shared memory
 * rows of ld elements by cp.async, K then V as two commit groups; rows n..n_pad are zero-filled.
 * srow [n]: the rows' element offsets into the pool (computed here, with one barrier). */
template <int HD>
__device__ __forceinline__ void dec_stage_chunk(const bf16 *kv, const int32_t *bt, int start, int n,
                                                int n_pad, int kvh, int n_kv_heads, int bs,
                                                int64_t *srow, bf16 *sk, bf16 *sv, int ld, int l2)
{
    constexpr int CH = HD / 8;
    const int64_t kvw = (int64_t)n_kv_heads * HD, vofs = (int64_t)bs * kvw;
    for (int r = threadIdx.x; r < n; r += DEC_THREADS) {
        const int j = start + r;
        srow[r] = ((int64_t)bt[j / bs] * 2 * bs + j % bs) * kvw + kvh * HD;
    }
    __syncthreads();
    uint64_t pol = 0;
    if (l2 & PDS_CUDA_L2_KV_EVICT_FIRST)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
    for (int half = 0; half < 2; half++) {
        bf16 *dst = half ? sv : sk;
        const int64_t ofs = half ? vofs : 0;
        for (int i = threadIdx.x; i < n_pad * CH; i += DEC_THREADS) {
            const int r = i / CH, c = i % CH;
            const bf16 *src = r < n ? kv + srow[r] + ofs + c * 8 : kv;
            if (l2 & PDS_CUDA_L2_KV_EVICT_FIRST)
                cp_async16_hint(dst + r * ld + c * 8, src, r < n, pol);
            else
                cp_async16(dst + r * ld + c * 8, src, r < n);
        }
        cp_async_commit();
    }
}

/* smem: q [G][HD] fp32 (pre-scaled), scores [split][G] fp32, reduce [RG][G][HD] fp32 with
 * RG = DEC_THREADS / (HD / 8) rows of V in flight */
template <int HD, int G>
__global__ void __launch_bounds__(DEC_THREADS, G *HD >= 1024 ? 2 : 4)
    attn_decode_split(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                      const int32_t *bts, int n_heads, int n_kv_heads, int bs, int split,
                      int max_splits, float scale_log2, float *part_o, float *part_ml, int l2)
{
    extern __shared__ float dsm[];
    float *sq = dsm;              /* [G][HD] */
    float *ss = sq + G * HD;      /* [split][G] */
    float *sred = ss + G * split; /* [8][G][HD] */
    pdl_wait();
    pdl_trigger();
    const int sp = blockIdx.x, kvh = blockIdx.y, si = blockIdx.z;
    const pds_cuda_seq_t S = seqs[si];
    const int start = sp * split;
    if (start >= S.n_ctx) return;
    const int end = min(S.n_ctx, start + split), n = end - start;
    const int32_t *bt = bts + S.bt_off;
    const int64_t kvw = (int64_t)n_kv_heads * HD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    /* scores: 8 lanes per key, DL dims per lane; DU keys per lane group in flight. The first
     * keys' loads are issued before q is staged, so the two latencies overlap. */
    constexpr int DL = HD / 8, DU = 4;
    const int sub = lane & 7;
    uint4 kx[DU][DL / 8];
    auto load_k = [&](int j0) {
#pragma unroll
        for (int u = 0; u < DU; u++) {
            const int j = j0 + u * 16 + (lane >> 3);
            if (j < end) {
                const uint4 *k =
                    (const uint4 *)(kv + ((int64_t)bt[j / bs] * 2 * bs + j % bs) * kvw + kvh * HD +
                                    sub * DL);
#pragma unroll
                for (int c = 0; c < DL / 8; c++) kx[u][c] = __ldcs(k + c);
            } else {
#pragma unroll
                for (int c = 0; c < DL / 8; c++) kx[u][c] = make_uint4(0, 0, 0, 0);
            }
        }
    };
    int j0 = start + warp * 4;
    if (j0 < end) load_k(j0);

    for (int i = tid; i < G * HD; i += DEC_THREADS) {
        int gh = i / HD, d = i % HD;
        sq[i] = __bfloat162float(q[(int64_t)S.q_start * q_stride + (kvh * G + gh) * HD + d]) *
                scale_log2;
    }
    __syncthreads();
    float qr[G][DL];
#pragma unroll
    for (int gh = 0; gh < G; gh++)
#pragma unroll
        for (int d = 0; d < DL; d++) qr[gh][d] = sq[gh * HD + sub * DL + d];
    /* warp-uniform trip count: the shuffles below need all 32 lanes */
    while (j0 < end) {
#pragma unroll
        for (int u = 0; u < DU; u++) {
            const int j = j0 + u * 16 + (lane >> 3);
            float kf[DL];
#pragma unroll
            for (int c = 0; c < DL / 8; c++) {
                const bf16 *xb = (const bf16 *)&kx[u][c];
#pragma unroll
                for (int e = 0; e < 8; e++) kf[c * 8 + e] = __bfloat162float(xb[e]);
            }
#pragma unroll
            for (int gh = 0; gh < G; gh++) {
                float dot = 0.0f;
#pragma unroll
                for (int d = 0; d < DL; d++) dot += qr[gh][d] * kf[d];
                dot += __shfl_xor_sync(0xffffffffu, dot, 1);
                dot += __shfl_xor_sync(0xffffffffu, dot, 2);
                dot += __shfl_xor_sync(0xffffffffu, dot, 4);
                if (j < end && sub == 0) ss[(j - start) * G + gh] = dot;
            }
        }
        j0 += 16 * DU;
        if (j0 < end) load_k(j0);
    }
    __syncthreads();

    /* softmax statistics per head: warp w handles heads w, w+4, ... */
    __shared__ float sm_m[G], sm_l[G];
    dec_softmax_stats<G>(ss, n, n, warp, lane, sm_m, sm_l);
    __syncthreads();

    /* P V: CH threads cover one V row with 8 dims each; RG rows in parallel */
    constexpr int CH = HD / 8, RG = DEC_THREADS / CH;
    const int c = tid % CH, rg = tid / CH;
    float acc[G][8];
#pragma unroll
    for (int gh = 0; gh < G; gh++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[gh][e] = 0.0f;
    constexpr int VU = 8; /* V rows in flight per thread */
    for (int j0 = start + rg; j0 < end; j0 += RG * VU) {
        uint4 vx[VU];
#pragma unroll
        for (int u = 0; u < VU; u++) {
            const int j = j0 + u * RG;
            vx[u] =
                j < end
                    ? __ldcs((const uint4 *)(kv +
                                             ((int64_t)(bt[j / bs] * 2 + 1) * bs + j % bs) * kvw +
                                             kvh * HD + c * 8))
                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < VU; u++) {
            const int j = j0 + u * RG;
            if (j >= end) break;
            const bf16 *xb = (const bf16 *)&vx[u];
            float vf[8];
#pragma unroll
            for (int e = 0; e < 8; e++) vf[e] = __bfloat162float(xb[e]);
            float pr[G]; /* the row's G probabilities: one 16-byte shared load per 4 heads */
            if (G % 4 == 0) {
#pragma unroll
                for (int g4 = 0; g4 < G; g4 += 4)
                    *(float4 *)&pr[g4] = *(const float4 *)&ss[(j - start) * G + g4];
            } else {
#pragma unroll
                for (int gh = 0; gh < G; gh++) pr[gh] = ss[(j - start) * G + gh];
            }
#pragma unroll
            for (int gh = 0; gh < G; gh++) {
                float p = pr[gh];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[gh][e] += p * vf[e];
            }
        }
    }
#pragma unroll
    for (int gh = 0; gh < G; gh++)
#pragma unroll
        for (int e = 0; e < 8; e++) sred[(rg * G + gh) * HD + c * 8 + e] = acc[gh][e];
    __syncthreads();
    for (int i = tid; i < G * HD; i += DEC_THREADS) {
        float t = 0.0f;
#pragma unroll
        for (int r = 0; r < RG; r++) t += sred[r * G * HD + i];
        int gh = i / HD, d = i % HD;
        int h = kvh * G + gh;
        int64_t pidx = ((int64_t)si * n_heads + h) * max_splits + sp;
        part_o[pidx * HD + d] = t;
        if (d == 0) {
            part_ml[pidx * 2] = sm_m[gh];
            part_ml[pidx * 2 + 1] = sm_l[gh];
        }
    }
}

/* The same work with the whole chunk staged: every K and V row of the chunk is fetched into shared
 * memory by cp.async at the start (K and V as two commit groups), so a CTA has its whole chunk in
 * flight at once and the V bytes arrive while the scores are computed. smem: K/V [2][split][HD]
 * bf16 (reused as the reduce rows once P V is done), q [G][HD] fp32, scores [split][G] fp32, K row
 * offsets [split] int64 (elements into the pool). Used for splits up to DEC_STAGED_BYTES of K+V. */
#define DEC_STAGED_BYTES (64 * 1024)
template <int HD, int G>
__global__ void __launch_bounds__(DEC_THREADS, 3)
    attn_decode_staged(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                       const int32_t *bts, int n_heads, int n_kv_heads, int bs, int split,
                       int max_splits, float scale_log2, float *part_o, float *part_ml, int l2)
{
    constexpr int CH = HD / 8, RG = DEC_THREADS / CH; /* 16-byte chunks per row; P V row groups */
    extern __shared__ __align__(16) unsigned char dsm_b[];
    const int kvbytes = max(split * HD * 4, RG * G * HD * 4);
    bf16 *sk = (bf16 *)dsm_b;               /* [split][HD] */
    bf16 *sv = sk + (size_t)split * HD;     /* [split][HD] */
    float *sred = (float *)dsm_b;           /* [RG][G][HD], after P V */
    float *sq = (float *)(dsm_b + kvbytes); /* [G][HD] */
    float *ss = sq + G * HD;                /* [split][G] */
    int64_t *srow = (int64_t *)(((uintptr_t)(ss + G * split) + 7) & ~(uintptr_t)7); /* [split] */
    pdl_wait();
    pdl_trigger();
    const int sp = blockIdx.x, kvh = blockIdx.y, si = blockIdx.z;
    const pds_cuda_seq_t S = seqs[si];
    const int start = sp * split;
    if (start >= S.n_ctx) return;
    const int end = min(S.n_ctx, start + split), n = end - start;
    const int32_t *bt = bts + S.bt_off;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    dec_stage_chunk<HD>(kv, bt, start, n, n, kvh, n_kv_heads, bs, srow, sk, sv, HD, l2);

    for (int i = tid; i < G * HD; i += DEC_THREADS) {
        int gh = i / HD, d = i % HD;
        sq[i] = __bfloat162float(q[(int64_t)S.q_start * q_stride + (kvh * G + gh) * HD + d]) *
                scale_log2;
    }
    cp_async_wait<1>(); /* this thread's K chunks have landed */
    __syncthreads();

    /* scores: 8 lanes per key; lane sub holds the 16-byte chunks sub, sub + 8, ... of the row
     * (8 lanes read 128 contiguous bytes: no bank conflicts) */
    constexpr int NC = CH / 8;
    const int sub = lane & 7;
    float qr[G][NC * 8];
#pragma unroll
    for (int gh = 0; gh < G; gh++)
#pragma unroll
        for (int c = 0; c < NC; c++)
#pragma unroll
            for (int e = 0; e < 8; e++) qr[gh][c * 8 + e] = sq[gh * HD + (sub + 8 * c) * 8 + e];
    /* warp-uniform trip count: the shuffles below need all 32 lanes */
    for (int r0 = warp * 4; r0 < n; r0 += 16) {
        const int r = r0 + (lane >> 3);
        const bool ok = r < n;
        float dot[G];
#pragma unroll
        for (int gh = 0; gh < G; gh++) dot[gh] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            uint4 kx =
                ok ? *(const uint4 *)(sk + r * HD + (sub + 8 * c) * 8) : make_uint4(0, 0, 0, 0);
            const bf16 *xb = (const bf16 *)&kx;
            float kf[8];
#pragma unroll
            for (int e = 0; e < 8; e++) kf[e] = __bfloat162float(xb[e]);
#pragma unroll
            for (int gh = 0; gh < G; gh++)
#pragma unroll
                for (int e = 0; e < 8; e++) dot[gh] += qr[gh][c * 8 + e] * kf[e];
        }
#pragma unroll
        for (int gh = 0; gh < G; gh++) {
            float d = dot[gh];
            d += __shfl_xor_sync(0xffffffffu, d, 1);
            d += __shfl_xor_sync(0xffffffffu, d, 2);
            d += __shfl_xor_sync(0xffffffffu, d, 4);
            if (ok && sub == 0) ss[r * G + gh] = d;
        }
    }
    __syncthreads();

    /* softmax statistics per head: warp w handles heads w, w+4, ... */
    __shared__ float sm_m[G], sm_l[G];
    dec_softmax_stats<G>(ss, n, n, warp, lane, sm_m, sm_l);
    cp_async_wait<0>(); /* V */
    __syncthreads();

    /* P V: CH threads cover one V row with 8 dims each; RG rows in parallel */
    const int c = tid % CH, rg = tid / CH;
    float acc[G][8];
#pragma unroll
    for (int gh = 0; gh < G; gh++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[gh][e] = 0.0f;
#pragma unroll 4
    for (int r = rg; r < n; r += RG) {
        const uint4 vx = *(const uint4 *)(sv + r * HD + c * 8);
        const bf16 *xb = (const bf16 *)&vx;
        float vf[8];
#pragma unroll
        for (int e = 0; e < 8; e++) vf[e] = __bfloat162float(xb[e]);
        float pr[G];
        if (G % 4 == 0) {
#pragma unroll
            for (int g4 = 0; g4 < G; g4 += 4) *(float4 *)&pr[g4] = *(const float4 *)&ss[r * G + g4];
        } else {
#pragma unroll
            for (int gh = 0; gh < G; gh++) pr[gh] = ss[r * G + gh];
        }
#pragma unroll
        for (int gh = 0; gh < G; gh++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[gh][e] += pr[gh] * vf[e];
    }
    __syncthreads(); /* every V read is done before the reduce rows overwrite K/V */
#pragma unroll
    for (int gh = 0; gh < G; gh++)
#pragma unroll
        for (int e = 0; e < 8; e++) sred[(rg * G + gh) * HD + c * 8 + e] = acc[gh][e];
    __syncthreads();
    for (int i = tid; i < G * HD; i += DEC_THREADS) {
        float t = 0.0f;
#pragma unroll
        for (int r = 0; r < RG; r++) t += sred[r * G * HD + i];
        int gh = i / HD, d = i % HD;
        int h = kvh * G + gh;
        int64_t pidx = ((int64_t)si * n_heads + h) * max_splits + sp;
        part_o[pidx * HD + d] = t;
        if (d == 0) {
            part_ml[pidx * 2] = sm_m[gh];
            part_ml[pidx * 2 + 1] = sm_l[gh];
        }
    }
}

/* The staged kernel's chunk on tensor cores. ncu on attn_decode_staged (batch 32, context 1025,
 * llama3-8b) showed it issue-bound, not memory-bound: ~31M warp instructions per layer, a warp
 * eligible in 44% of cycles, DRAM at 62%, whatever the occupancy — the scalar FMAs of Q K^T and
 * P V, their bf16 conversions and the shuffles. Here both products are m16n8k16 MMAs with the G
 * query heads of the KV head as the rows (G <= 8: rows G..15 are zero), the way the prefill
 * kernel computes a 16-row tile: S = Q K^T with warp w on 8-token tiles w, w + 4, ... (Q
 * fragments built once from global memory, K by ldmatrix from shared memory), the softmax
 * statistics per head in shared memory as before, then O = P V with warp w on head_dim columns
 * [w * HD / 4, (w + 1) * HD / 4) over the whole chunk (P rounded to bf16 as in prefill; V by
 * ldmatrix.trans), so no cross-warp sum is needed. K/V rows are padded to HD + 8 elements
 * (conflict-free ldmatrix); rows past the chunk's end up to a multiple of 16 are zero-filled and
 * their probabilities are 0. smem: K/V [2][split16][HD + 8] bf16, scores [split16][G] fp32, K row
 * offsets [split] int64. */
template <int HD, int G>
__global__ void __launch_bounds__(DEC_THREADS, 3)
    attn_decode_mma(const bf16 *q, int q_stride, const bf16 *kv, const pds_cuda_seq_t *seqs,
                    const int32_t *bts, int n_heads, int n_kv_heads, int bs, int split,
                    int max_splits, float scale_log2, float *part_o, float *part_ml, int l2)
{
    static_assert(G <= 8 && (HD == 64 || HD == 128), "decode mma: G <= 8, head_dim 64 or 128");
    constexpr int LD = HD + 8, DW = HD / 4; /* DW: columns of P V per warp */
    extern __shared__ __align__(16) unsigned char dsm_m[];
    const int split16 = (split + 15) & ~15;
    bf16 *sk = (bf16 *)dsm_m;                              /* [split16][LD] */
    bf16 *sv = sk + (size_t)split16 * LD;                  /* [split16][LD] */
    float *ss = (float *)(sv + (size_t)split16 * LD);      /* [split16][G] */
    int64_t *srow = (int64_t *)(ss + (size_t)split16 * G); /* [split16] (8-byte aligned) */
    pdl_wait();
    pdl_trigger();
    const int sp = blockIdx.x, kvh = blockIdx.y, si = blockIdx.z;
    const pds_cuda_seq_t S = seqs[si];
    const int start = sp * split;
    if (start >= S.n_ctx) return;
    const int end = min(S.n_ctx, start + split), n = end - start, n16 = (n + 15) & ~15;
    const int32_t *bt = bts + S.bt_off;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;

    dec_stage_chunk<HD>(kv, bt, start, n, n16, kvh, n_kv_heads, bs, srow, sk, sv, LD, l2);

    /* Q as A fragments (row g = query head kvh * G + g; rows >= G zero), all of head_dim */
    uint32_t qa[HD / 16][4];
    {
        const bf16 *qr = q + (int64_t)S.q_start * q_stride + (kvh * G + g) * HD + t4 * 2;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            qa[kk][0] = g < G ? *(const uint32_t *)(qr + kk * 16) : 0u;
            qa[kk][2] = g < G ? *(const uint32_t *)(qr + kk * 16 + 8) : 0u;
            qa[kk][1] = qa[kk][3] = 0u; /* rows g + 8 >= 8 >= G */
        }
    }
    cp_async_wait<1>(); /* this thread's K copies have landed */
    __syncthreads();

    /* S = Q K^T: warp w takes the 8-token tiles w, w + 4, ...; lanes with g < G hold head g's
     * scores of tokens 8 t + 2 t4 and + 1 */
    for (int t = warp; t < n16 / 8; t += DEC_THREADS / 32) {
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk += 2) {
            uint32_t b[4];
            ldsm_x4(b, &sk[(t * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8]);
            mma_bf16(s, qa[kk], b[0], b[1]);
            mma_bf16(s, qa[kk + 1], b[2], b[3]);
        }
        if (g < G) {
            const int j = t * 8 + t4 * 2;
            ss[j * G + g] = s[0] * scale_log2;
            ss[(j + 1) * G + g] = s[1] * scale_log2;
        }
    }
    __syncthreads();

    /* softmax statistics per head: warp w handles heads w, w + 4, ...; probabilities of the
     * padding rows n..n16 are 0 */
    __shared__ float sm_m[G], sm_l[G];
    dec_softmax_stats<G>(ss, n, n16, warp, lane, sm_m, sm_l);
    cp_async_wait<0>(); /* V */
    __syncthreads();

    /* O = P V: warp w on columns [w * DW, (w + 1) * DW) of every head, all of the chunk */
    float o[DW / 8][4];
#pragma unroll
    for (int i = 0; i < DW / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    for (int k2 = 0; k2 < n16 / 16; k2++) {
        uint32_t a[4];
        const int j = k2 * 16 + t4 * 2;
        a[0] = g < G ? pack_bf16(ss[j * G + g], ss[(j + 1) * G + g]) : 0u;
        a[2] = g < G ? pack_bf16(ss[(j + 8) * G + g], ss[(j + 9) * G + g]) : 0u;
        a[1] = a[3] = 0u;
#pragma unroll
        for (int nd = 0; nd < DW / 8; nd += 2) {
            uint32_t b[4];
            ldsm_x4_t(b, &sv[(k2 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + warp * DW +
                             nd * 8 + (lane >> 4) * 8]);
            mma_bf16(o[nd], a, b[0], b[1]);
            mma_bf16(o[nd + 1], a, b[2], b[3]);
        }
    }
    if (g < G) {
        const int h = kvh * G + g;
        const int64_t pidx = ((int64_t)si * n_heads + h) * max_splits + sp;
#pragma unroll
        for (int nd = 0; nd < DW / 8; nd++) {
            const int d = warp * DW + nd * 8 + t4 * 2;
            *(float2 *)&part_o[pidx * HD + d] = make_float2(o[nd][0], o[nd][1]);
        }
        if (warp == 0 && t4 == 0) {
            part_ml[pidx * 2] = sm_m[g];
            part_ml[pidx * 2 + 1] = sm_l[g];
        }
    }
}

__global__ void attn_decode_combine(const pds_cuda_seq_t *seqs, int n_heads, int hd, int split,
                                    int max_splits, const float *part_o, const float *part_ml,
                                    bf16 *out)
{
    pdl_wait();
    pdl_trigger();
    const int si = blockIdx.x, h = blockIdx.y;
    const pds_cuda_seq_t S = seqs[si];
    int ns = min((S.n_ctx + split - 1) / split, max_splits);
    int64_t base = ((int64_t)si * n_heads + h) * max_splits;
    float M = -INFINITY;
    for (int i = 0; i < ns; i++) M = fmaxf(M, part_ml[(base + i) * 2]);
    float L = 0.0f;
    for (int i = 0; i < ns; i++)
        L += part_ml[(base + i) * 2 + 1] * exp2f(part_ml[(base + i) * 2] - M);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < ns; i++)
            acc += part_o[(base + i) * hd + d] * exp2f(part_ml[(base + i) * 2] - M);
        out[(int64_t)S.q_start * n_heads * hd + h * hd + d] = __float2bfloat16_rn(acc / L);
    }
}

extern "C" size_t pds_cuda_attn_decode_part_floats(int n_seqs, int n_heads, int head_dim,
                                                   int max_splits)
{
    return (size_t)n_seqs * n_heads * max_splits * (head_dim + 2);
}

extern "C" int pds_cuda_attn_decode_max_staged_split(int head_dim)
{
    static int v = -1; /* PDS_ENGINE_CUDA_DEC_STAGED=0: always the register-staged kernel */
    if (v < 0) {
        const char *e = getenv("PDS_ENGINE_CUDA_DEC_STAGED");
        v = !(e && strcmp(e, "0") == 0);
    }
    if (!v || head_dim <= 0) return 0;
    return DEC_STAGED_BYTES / (head_dim * 4);
}

/* Raises kernel's dynamic shared memory limit to the device's opt-in maximum once (per *raised,
 * one per kernel instance) when smem needs more than the default 48 KiB. */
template <typename K> static pds_status_t smem_optin(K kernel, size_t smem, int *raised)
{
    if (smem <= 48 * 1024 || *raised) return PDS_OK;
    int dev = 0, optin = 0;
    PDS_CUDA_TRY(cudaGetDevice(&dev));
    PDS_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    struct cudaFuncAttributes fa;
    PDS_CUDA_TRY(cudaFuncGetAttributes(&fa, kernel));
    optin -= (int)fa.sharedSizeBytes; /* the opt-in limit counts static shared memory too */
    PDS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    *raised = optin;
    return PDS_OK;
}

template <int HD, int G>
static pds_status_t launch_decode(const uint16_t *q, int q_stride, const uint16_t *kv,
                                  const pds_cuda_seq_t *seqs, const int32_t *bts, int n_seqs,
                                  int n_heads, int n_kv_heads, int bs, int split, int max_splits,
                                  float *part_o, float *part_ml, int l2, cudaStream_t s)
{
    const size_t RG = DEC_THREADS / (HD / 8);
    dim3 grid(max_splits, n_kv_heads, n_seqs);
    static int mma = -1; /* PDS_ENGINE_CUDA_DEC_MMA=0: the scalar staged kernel */
    if (mma < 0) {
        const char *e = getenv("PDS_ENGINE_CUDA_DEC_MMA");
        mma = !(e && strcmp(e, "0") == 0);
    }
    if (mma && G <= 8 && (HD == 64 || HD == 128) &&
        split <= pds_cuda_attn_decode_max_staged_split(HD)) {
        const size_t s16 = ((size_t)split + 15) & ~(size_t)15;
        const size_t sm =
            2 * s16 * (HD + 8) * sizeof(uint16_t) + s16 * G * sizeof(float) + s16 * sizeof(int64_t);
        static int raised_m = 0;
        PDS_TRY(smem_optin(attn_decode_mma<HD, (G <= 8 ? G : 8)>, sm, &raised_m));
        if (sm > 48 * 1024 && sm > (size_t)raised_m)
            return PDS_ERR(PDS_ERR_UNSUPPORTED,
                           "decode attention: split of %d tokens needs %zu bytes of shared memory",
                           split, sm);
        pds_launch(attn_decode_mma<HD, (G <= 8 ? G : 8)>, grid, DEC_THREADS, sm, s, (const bf16 *)q,
                   q_stride, (const bf16 *)kv, seqs, bts, n_heads, n_kv_heads, bs, split,
                   max_splits, (1.0f / sqrtf((float)HD)) * LOG2E, part_o, part_ml, l2);
        LAUNCH_CHECK("attn_decode_mma");
        return PDS_OK;
    }
    if (split <= pds_cuda_attn_decode_max_staged_split(HD)) {
        size_t kvb = PDS_MAX((size_t)split * HD * 4, RG * G * HD * 4);
        size_t sm =
            kvb + sizeof(float) * ((size_t)G * HD + (size_t)G * split) + 8 * (size_t)split + 8;
        static int raised_st = 0;
        PDS_TRY(smem_optin(attn_decode_staged<HD, G>, sm, &raised_st));
        if (sm > 48 * 1024 && sm > (size_t)raised_st)
            return PDS_ERR(PDS_ERR_UNSUPPORTED,
                           "decode attention: split of %d tokens needs %zu bytes of shared memory",
                           split, sm);
        pds_launch(attn_decode_staged<HD, G>, grid, DEC_THREADS, sm, s, (const bf16 *)q, q_stride,
                   (const bf16 *)kv, seqs, bts, n_heads, n_kv_heads, bs, split, max_splits,
                   (1.0f / sqrtf((float)HD)) * LOG2E, part_o, part_ml, l2);
        LAUNCH_CHECK("attn_decode_staged");
        return PDS_OK;
    }
    size_t smem = sizeof(float) * ((size_t)G * HD + (size_t)G * split + RG * G * HD);
    if (smem > 48 * 1024) {
        static int raised = 0; /* per template instance: the opt-in limit, set once */
        PDS_TRY(smem_optin(attn_decode_split<HD, G>, smem, &raised));
        if (smem > (size_t)raised)
            return PDS_ERR(PDS_ERR_UNSUPPORTED,
                           "decode attention: split of %d tokens needs %zu "
                           "bytes of shared memory",
                           split, smem);
    }
    pds_launch(attn_decode_split<HD, G>, grid, DEC_THREADS, smem, s, (const bf16 *)q, q_stride,
               (const bf16 *)kv, seqs, bts, n_heads, n_kv_heads, bs, split, max_splits,
               (1.0f / sqrtf((float)HD)) * LOG2E, part_o, part_ml, l2);
    LAUNCH_CHECK("attn_decode_split");
    return PDS_OK;
}

extern "C" pds_status_t pds_cuda_attn_decode(const uint16_t *q, int q_stride,
                                             const uint16_t *kv_layer, const pds_cuda_seq_t *seqs,
                                             const int32_t *block_tables, int n_seqs, int n_heads,
                                             int n_kv_heads, int head_dim, int block_size,
                                             int split_tokens, int max_splits, float *part,
                                             uint16_t *out, int l2_hints, cudaStream_t s)
{
    if (n_seqs <= 0) return PDS_OK;
    int G = n_heads / n_kv_heads;
    float *part_o = part;
    float *part_ml = part + (size_t)n_seqs * n_heads * max_splits * head_dim;
    pds_status_t st = PDS_ERR_UNSUPPORTED;
#define DEC_CASE(HD_, G_)                                                                       \
    if (head_dim == HD_ && G == G_)                                                             \
        st = launch_decode<HD_, G_>(q, q_stride, kv_layer, seqs, block_tables, n_seqs, n_heads, \
                                    n_kv_heads, block_size, split_tokens, max_splits, part_o,   \
                                    part_ml, l2_hints, s);
    DEC_CASE(128, 1)
    DEC_CASE(128, 2)
    DEC_CASE(128, 4)
    DEC_CASE(128, 8)
    DEC_CASE(64, 1)
    DEC_CASE(64, 2)
    DEC_CASE(64, 4)
    DEC_CASE(64, 8)
#undef DEC_CASE
    if (st == PDS_ERR_UNSUPPORTED)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "decode attention: head_dim %d, group %d", head_dim, G);
    if (st != PDS_OK) return st;
    pds_launch(attn_decode_combine, dim3(n_seqs, n_heads), 128, 0, s, seqs, n_heads, head_dim,
               split_tokens, max_splits, (const float *)part_o, (const float *)part_ml,
               (bf16 *)out);
    LAUNCH_CHECK("attn_decode_combine");
    return PDS_OK;
}

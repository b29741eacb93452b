/* kvx_sum.cu: pds_kvx_checksum on the GPU, one KV block per 4-thread group. The hash has four
 * independent lanes over 32-byte strides (see kvx.c), so thread k of a group runs lane k over the
 * block's 8-byte words k, k+4, k+8, ... and thread 0 combines them and hashes the tail exactly as
 * the CPU does. Few threads per block, but every lane's loads are independent of its arithmetic,
 * so they pipeline; a layer of 1k blocks of 64 KiB hashes in well under a millisecond, next to
 * the ~1 ms that NVLink needs to move it. The CPU function is the reference (tests compare both).
 */
#include <stdint.h>

static __device__ __forceinline__ uint64_t d_mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static __device__ __forceinline__ uint64_t d_rotl(uint64_t v, int r)
{
    return (v << r) | (v >> (64 - r));
}

static __device__ __forceinline__ uint64_t d_lane(uint64_t acc, uint64_t w)
{
    acc += w * 0xc2b2ae3d27d4eb4fULL;
    return d_rotl(acc, 31) * 0x9e3779b185ebca87ULL;
}

// grid (n), block (4): group g hashes block ids[g] of (block_bytes) bytes at base.
__global__ void kvx_sum_kernel(const uint8_t *base, int64_t block_bytes, const int32_t *ids,
                               uint64_t *out)
{
    __shared__ uint64_t acc[4];
    const int k = threadIdx.x;
    const uint8_t *p = base + (int64_t)ids[blockIdx.x] * block_bytes;
    const int64_t n32 = block_bytes / 32;
    uint64_t a = d_mix64((uint64_t)(k + 1));
    if (((uintptr_t)p & 7) == 0) {
        const uint64_t *w = (const uint64_t *)p + k;
        int64_t i = 0;
        for (; i + 4 <= n32; i += 4) {
            uint64_t w0 = w[4 * i], w1 = w[4 * i + 4], w2 = w[4 * i + 8], w3 = w[4 * i + 12];
            a = d_lane(a, w0);
            a = d_lane(a, w1);
            a = d_lane(a, w2);
            a = d_lane(a, w3);
        }
        for (; i < n32; i++) a = d_lane(a, w[4 * i]);
    } else {
        for (int64_t i = 0; i < n32; i++) {
            uint64_t w = 0;
            for (int b = 0; b < 8; b++) w |= (uint64_t)p[32 * i + 8 * k + b] << (8 * b);
            a = d_lane(a, w);
        }
    }
    acc[k] = a;
    __syncthreads();
    if (k != 0) return;
    uint64_t h = d_mix64(acc[0] ^ d_rotl(acc[1], 17) ^ d_rotl(acc[2], 29) ^ d_rotl(acc[3], 43));
    int64_t i = n32 * 32;
    for (; i + 8 <= block_bytes; i += 8) {
        uint64_t w = 0;
        for (int b = 0; b < 8; b++) w |= (uint64_t)p[i + b] << (8 * b);
        h = d_mix64(h ^ w);
    }
    if (i < block_bytes) {
        uint64_t w = 0;
        for (int b = 0; i + b < block_bytes; b++) w |= (uint64_t)p[i + b] << (8 * b);
        h = d_mix64(h ^ w ^ 0xff);
    }
    out[blockIdx.x] = d_mix64(h ^ (uint64_t)block_bytes);
}

extern "C" int kvx_sum_launch(const void *base, int64_t block_bytes, int n, const int32_t *ids,
                              uint64_t *out, void *stream)
{
    if (n <= 0) return 0;
    kvx_sum_kernel<<<n, 4, 0, (cudaStream_t)stream>>>((const uint8_t *)base, block_bytes, ids, out);
    return (int)cudaGetLastError();
}

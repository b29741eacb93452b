/* synth.cu: synthetic weights generated on the GPU, bit-identical to the CPU generator.
 *
 * pds_model_synth_value() is shared source (model/model.h); this file is compiled with
 * --fmad=false so that `1 + 0.1 * u` is a multiply then an add, as on the CPU, and not a fused
 * multiply-add that rounds once — otherwise a norm weight could differ in its last bit and the
 * "same seed, same model" promise between CPU files and GPU memory would not hold.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "engine/cuda/cuda_kernels.h"

__global__ void synth_kernel(__nv_bfloat16 *dbf, float *df, int64_t n, uint64_t seed, int tensor,
                             float scale, int is_norm, int round_to)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = pds_model_synth_value(seed, tensor, i, scale, is_norm);
        if (round_to == PDS_DTYPE_BF16)
            v = __bfloat162float(__float2bfloat16_rn(v));
        else if (round_to == PDS_DTYPE_F16)
            v = __half2float(__float2half_rn(v));
        if (dbf)
            dbf[i] = __float2bfloat16_rn(v);
        else
            df[i] = v;
    }
}

extern "C" pds_status_t pds_cuda_synth_fill(uint16_t *dst_bf16, float *dst_f32, int64_t n,
                                            uint64_t seed, int tensor, float scale, int is_norm,
                                            pds_dtype_t round_to, cudaStream_t s)
{
    if (n <= 0) return PDS_OK;
    int64_t blocks = PDS_MIN((n + 255) / 256, (int64_t)65536);
    synth_kernel<<<(unsigned)blocks, 256, 0, s>>>((__nv_bfloat16 *)dst_bf16, dst_f32, n, seed,
                                                  tensor, scale, is_norm, (int)round_to);
    PDS_CUDA_TRY(cudaGetLastError());
    return PDS_OK;
}

/* kv_slot.cuh: where a new token's K or V row goes in one layer of the paged pool — the shared
 * layout [blocks][2][block_size][kv_heads][head_dim] (common/kv) — for the kernels that write it
 * (RoPE + K/V write, the fused gemv and split-K products). Private to the .cu files of this
 * folder. */
#ifndef PDS_ENGINE_CUDA_KV_SLOT_CUH
#define PDS_ENGINE_CUDA_KV_SLOT_CUH

#include <stdint.h>

/* The row (n_kv_heads * head_dim elements) of pool slot `slot`: its K row (v 0) or V row (v 1). */
template <typename T>
__device__ __forceinline__ T *pds_kv_slot_row(T *kv_layer, int slot, int block_size, int n_kv_heads,
                                              int head_dim, int v)
{
    return kv_layer + (((int64_t)(slot / block_size) * 2 + v) * block_size + slot % block_size) *
                          ((int64_t)n_kv_heads * head_dim);
}

#endif /* PDS_ENGINE_CUDA_KV_SLOT_CUH */

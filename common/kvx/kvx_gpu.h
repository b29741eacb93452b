/* kvx_gpu.h: the CUDA runtime calls kvx makes for device pools — pinned host mirrors, block copies
 * between a device pool and its mirror (one copy per run of consecutive block ids), and the
 * per-block checksum computed on the GPU (bit-identical to pds_kvx_checksum, so either side may
 * hash on host or device). Built from kvx_gpu.c + kvx_sum.cu with CUDA, kvx_nogpu.c (every call
 * PDS_ERR_UNSUPPORTED) without. Not a public header; CUDA types never appear here.
 *
 * A kvx_gpu_t is one CUDA stream plus scratch buffers on one device, used by one thread at a time
 * (its calls first make its device current on the calling thread).
 */
#ifndef PDS_KVX_GPU_H
#define PDS_KVX_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

bool kvx_gpu_built(void);
/* The device that owns `p`; PDS_ERR_INVALID_ARG if p is not device memory, PDS_ERR_DEVICE if
 * the runtime cannot tell (no GPU). */
pds_status_t kvx_gpu_device_of(const void *p, int *device);
/* PDS_OK if `device` exists and can be used (PDS_ERR_DEVICE with the runtime's reason if not). */
pds_status_t kvx_gpu_check_device(int device);

/* Pinned host memory (cudaHostAlloc, portable): the UCX-registered mirrors. */
pds_status_t kvx_gpu_host_alloc(size_t bytes, void **out);
void kvx_gpu_host_free(void *p); /* accepts NULL */
/* Device memory (tests and NCCL scratch). */
pds_status_t kvx_gpu_dev_alloc(int device, size_t bytes, void **out);
void kvx_gpu_dev_free(void *p); /* accepts NULL */
/* Synchronous copy in either direction (cudaMemcpyDefault). */
pds_status_t kvx_gpu_memcpy(void *dst, const void *src, size_t n);

typedef struct kvx_gpu kvx_gpu_t;
pds_status_t kvx_gpu_create(int device, kvx_gpu_t **out);
void kvx_gpu_destroy(kvx_gpu_t *g); /* accepts NULL */
int kvx_gpu_device(const kvx_gpu_t *g);
/* Makes g's device current on the calling thread. */
pds_status_t kvx_gpu_use(kvx_gpu_t *g);
/* Copies blocks ids[0..n) of a layer from src_base to the same offsets at dst_base (block_bytes
 * each; one cudaMemcpyAsync per run of consecutive ids) and waits for them. */
pds_status_t kvx_gpu_copy_blocks(kvx_gpu_t *g, void *dst_base, const void *src_base,
                                 int64_t block_bytes, int n, const int32_t *ids);
/* Copies n bytes (any direction) on g's stream and waits for that copy only. */
pds_status_t kvx_gpu_copy(kvx_gpu_t *g, void *dst, const void *src, size_t n);
/* pds_kvx_checksum of blocks ids[0..n) of a device layer array into host sums[0..n); waits. */
pds_status_t kvx_gpu_block_sums(kvx_gpu_t *g, const void *dev_base, int64_t block_bytes, int n,
                                const int32_t *ids, uint64_t *sums);

/* kvx_sum.cu: the checksum kernel's launcher (one 4-thread group per block, the 4 lanes of
 * pds_kvx_checksum in parallel). ids and out are device pointers; stream is a cudaStream_t. */
int kvx_sum_launch(const void *base, int64_t block_bytes, int n, const int32_t *ids, uint64_t *out,
                   void *stream);

#endif /* PDS_KVX_GPU_H */

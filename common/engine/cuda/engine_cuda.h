/* engine_cuda.h: what the CUDA backend offers beyond the backend interface — the hardware-floor
 * probes that `pdserve-bench engine --backend cuda` reports against, and GPU memory figures.
 * Internal to the engine module (its users: the bench and tests/test_engine_cuda.c); exists only
 * in builds with CUDA (PDS_HAVE_CUDA).
 */
#ifndef PDS_ENGINE_CUDA_H
#define PDS_ENGINE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

/* Device-to-device copy rate of `bytes` (median of `iters` timed copies after a warm-up),
 * counting bytes read plus bytes written, in bytes/s. */
pds_status_t pds_engine_cuda_measure_bandwidth(int device, size_t bytes, int iters,
                                               double *bytes_per_s);
/* bf16 GEMM rate (fp32 accumulate, cuBLASLt, algorithm from the heuristic) for C[m,n] = A[m,k]
 * B[k,n] on random data, median of `iters`, in FLOP/s (2mnk per product). */
pds_status_t pds_engine_cuda_measure_gemm(int device, int m, int n, int k, int iters,
                                          double *flops);
/* Device memory in use (total - free) and total, in bytes. */
pds_status_t pds_engine_cuda_memory(int device, int64_t *used, int64_t *total);

#endif /* PDS_ENGINE_CUDA_H */

/* engine_cuda.h: what the CUDA backend offers beyond the backend interface — the hardware-floor
 * probes that `pdserve-bench engine --backend cuda` reports against, and GPU memory figures.
 * Internal to the engine module (its users: the bench and tests/test_engine_cuda.c); exists only
 * in builds with CUDA (PDS_HAVE_CUDA).
 */
#ifndef PDS_ENGINE_CUDA_H
#define PDS_ENGINE_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "base/base.h"
#include "engine/engine.h"

/* Device-to-device copy rate of `bytes` (median of `iters` timed copies after a warm-up),
 * counting bytes read plus bytes written, in bytes/s. */
pds_status_t pds_engine_cuda_measure_bandwidth(int device, size_t bytes, int iters,
                                               double *bytes_per_s);
/* bf16 GEMM rate (fp32 accumulate, cuBLASLt, algorithm from the heuristic) for C[m,n] = A[m,k]
 * B[k,n] on random data, median of `iters`, in FLOP/s (2mnk per product). */
pds_status_t pds_engine_cuda_measure_gemm(int device, int m, int n, int k, int iters,
                                          double *flops);
/* With PDS_ENGINE_CUDA_PROFILE=1 set when the engine was created: prints to f the GPU time per
 * op kind (events between ops; decode steps then run without CUDA graphs) summed over the
 * forwards since the last report, divided by their number, and starts a new sum (f NULL: only
 * that). Does nothing for other engines or without the variable. */
void pds_engine_cuda_profile_report(pds_engine_t *e, const char *label, FILE *f);
/* GEMM shapes tuned at creation (every row bucket up to max_batch_tokens, the LM head up to
 * max_batch_seqs; 0 with PDS_ENGINE_CUDA_TUNE=0) and the host time it took, in ms. Zeros for
 * other engines. */
void pds_engine_cuda_tune_stats(pds_engine_t *e, int *shapes, double *ms);
/* Device memory in use (total - free) and total, in bytes. */
pds_status_t pds_engine_cuda_memory(int device, int64_t *used, int64_t *total);

#endif /* PDS_ENGINE_CUDA_H */

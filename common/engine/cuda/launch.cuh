/* launch.cuh: programmatic dependent launch (PDL) for the CUDA engine's kernels, private to the
 * .cu files of this folder.
 *
 * A kernel launched with pds_launch() may be scheduled while the kernel before it in the stream
 * is still running (its blocks then wait in pdl_wait() until that kernel has finished and its
 * writes are visible), so launch latency and any work that does not depend on the previous
 * kernel — such as a matrix-vector product's first weight loads — overlap its tail. Every kernel
 * launched this way calls pdl_wait() before it reads or writes anything another kernel touches,
 * and before any early return, which keeps the chain ordered transitively. pdl_trigger() lets the
 * next kernel be scheduled early. Outside a PDL launch both are no-ops. PDS_ENGINE_CUDA_PDL=0
 * turns the attribute off (plain stream order).
 */
#ifndef PDS_ENGINE_CUDA_LAUNCH_CUH
#define PDS_ENGINE_CUDA_LAUNCH_CUH

#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

__device__ __forceinline__ void pdl_wait()
{
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

__device__ __forceinline__ void pdl_trigger()
{
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

static inline bool pds_pdl_enabled()
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("PDS_ENGINE_CUDA_PDL");
        v = !(e && strcmp(e, "0") == 0);
    }
    return v == 1;
}

/* kernel<<<grid, block, smem, s>>>(args...), with the PDL attribute when enabled. */
template <typename... KArgs, typename... Args>
static cudaError_t pds_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                              cudaStream_t s, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pds_pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

#endif /* PDS_ENGINE_CUDA_LAUNCH_CUH */

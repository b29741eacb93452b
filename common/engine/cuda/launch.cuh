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

/* kernel<<<grid, block, smem, s>>>(args...) as a grid of thread-block clusters of cluster_x CTAs
 * along x (gridDim.x a multiple of it; 0: no cluster attribute), with the PDL attribute when
 * enabled. */
template <typename... KArgs, typename... Args>
static cudaError_t pds_launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t s, unsigned cluster_x, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[2];
    unsigned na = 0;
    if (cluster_x > 0) {
        attr[na].id = cudaLaunchAttributeClusterDimension;
        attr[na].val.clusterDim.x = cluster_x;
        attr[na].val.clusterDim.y = 1;
        attr[na].val.clusterDim.z = 1;
        na++;
    }
    if (pds_pdl_enabled()) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na].val.programmaticStreamSerializationAllowed = 1;
        na++;
    }
    cfg.attrs = attr;
    cfg.numAttrs = na;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

/* kernel<<<grid, block, smem, s>>>(args...), with the PDL attribute when enabled. */
template <typename... KArgs, typename... Args>
static cudaError_t pds_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                              cudaStream_t s, Args... args)
{
    return pds_launch_cluster(kernel, grid, block, smem, s, 0u, args...);
}

#endif /* PDS_ENGINE_CUDA_LAUNCH_CUH */

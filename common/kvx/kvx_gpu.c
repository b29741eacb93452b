/* kvx_gpu.c: kvx's CUDA runtime calls (see kvx_gpu.h). Every runtime error becomes PDS_ERR_DEVICE
 * naming the call and the runtime's message, once, where it happened. The copies between a pool
 * and its pinned mirror go one cudaMemcpyAsync per run of consecutive block ids on the object's
 * own non-blocking stream, so they never wait behind the engine's compute stream. */
#include "kvx/kvx_gpu.h"

#include <cuda_runtime_api.h>
#include <string.h>

#define CU_ERR(e, call) \
    pds_err_set(PDS_ERR_DEVICE, __FILE__, __LINE__, "%s: %s", call, cudaGetErrorString(e))

struct kvx_gpu {
    int device;
    cudaStream_t stream;
    int32_t *ids_dev;   /* (cap) block ids for the checksum kernel */
    uint64_t *sums_dev; /* (cap) its output */
    int cap;
};

bool kvx_gpu_built(void)
{
    return true;
}

pds_status_t kvx_gpu_check_device(int device)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return CU_ERR(e, "cudaGetDeviceCount");
    if (device < 0 || device >= n)
        return PDS_ERR(PDS_ERR_DEVICE, "CUDA device %d does not exist (%d present)", device, n);
    return PDS_OK;
}

pds_status_t kvx_gpu_device_of(const void *p, int *device)
{
    struct cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) return CU_ERR(e, "cudaPointerGetAttributes");
    if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "%p is not device memory", p);
    *device = a.device;
    return PDS_OK;
}

pds_status_t kvx_gpu_host_alloc(size_t bytes, void **out)
{
    void *p = NULL;
    cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return PDS_ERR(PDS_ERR_DEVICE, "cudaHostAlloc of %zu bytes (pinned mirror): %s", bytes,
                       cudaGetErrorString(e));
    }
    *out = p;
    return PDS_OK;
}

void kvx_gpu_host_free(void *p)
{
    if (p) cudaFreeHost(p);
}

pds_status_t kvx_gpu_dev_alloc(int device, size_t bytes, void **out)
{
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return CU_ERR(e, "cudaSetDevice");
    void *p = NULL;
    e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return PDS_ERR(PDS_ERR_DEVICE, "cudaMalloc of %zu bytes: %s", bytes, cudaGetErrorString(e));
    }
    *out = p;
    return PDS_OK;
}

void kvx_gpu_dev_free(void *p)
{
    if (p) cudaFree(p);
}

pds_status_t kvx_gpu_memcpy(void *dst, const void *src, size_t n)
{
    cudaError_t e = cudaMemcpy(dst, src, n, cudaMemcpyDefault);
    return e == cudaSuccess ? PDS_OK : CU_ERR(e, "cudaMemcpy");
}

pds_status_t kvx_gpu_create(int device, kvx_gpu_t **out)
{
    PDS_TRY(kvx_gpu_check_device(device));
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return CU_ERR(e, "cudaSetDevice");
    kvx_gpu_t *g = pds_calloc(1, sizeof *g);
    if (!g) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx gpu state");
    g->device = device;
    e = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        pds_free(g);
        return CU_ERR(e, "cudaStreamCreateWithFlags");
    }
    *out = g;
    return PDS_OK;
}

void kvx_gpu_destroy(kvx_gpu_t *g)
{
    if (!g) return;
    cudaSetDevice(g->device);
    /* Stream-ordered frees: cudaFree could wait for every kernel on the device, an NCCL receive
     * that is waiting for its peer included. */
    if (g->ids_dev) cudaFreeAsync(g->ids_dev, g->stream);
    if (g->sums_dev) cudaFreeAsync(g->sums_dev, g->stream);
    cudaStreamSynchronize(g->stream);
    cudaStreamDestroy(g->stream);
    pds_free(g);
}

int kvx_gpu_device(const kvx_gpu_t *g)
{
    return g->device;
}

pds_status_t kvx_gpu_use(kvx_gpu_t *g)
{
    cudaError_t e = cudaSetDevice(g->device);
    return e == cudaSuccess ? PDS_OK : CU_ERR(e, "cudaSetDevice");
}

pds_status_t kvx_gpu_copy_blocks(kvx_gpu_t *g, void *dst_base, const void *src_base,
                                 int64_t block_bytes, int n, const int32_t *ids)
{
    PDS_TRY(kvx_gpu_use(g));
    for (int i = 0; i < n;) {
        int k = 1;
        while (i + k < n && ids[i + k] == ids[i] + k) k++;
        int64_t off = (int64_t)ids[i] * block_bytes;
        cudaError_t e = cudaMemcpyAsync((uint8_t *)dst_base + off, (const uint8_t *)src_base + off,
                                        (size_t)(k * block_bytes), cudaMemcpyDefault, g->stream);
        if (e != cudaSuccess) {
            cudaStreamSynchronize(g->stream);
            return CU_ERR(e, "cudaMemcpyAsync");
        }
        i += k;
    }
    cudaError_t e = cudaStreamSynchronize(g->stream);
    return e == cudaSuccess ? PDS_OK : CU_ERR(e, "cudaStreamSynchronize");
}

pds_status_t kvx_gpu_copy(kvx_gpu_t *g, void *dst, const void *src, size_t n)
{
    PDS_TRY(kvx_gpu_use(g));
    cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, g->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g->stream);
    return e == cudaSuccess ? PDS_OK : CU_ERR(e, "cudaMemcpyAsync");
}

pds_status_t kvx_gpu_block_sums(kvx_gpu_t *g, const void *dev_base, int64_t block_bytes, int n,
                                const int32_t *ids, uint64_t *sums)
{
    if (n <= 0) return PDS_OK;
    PDS_TRY(kvx_gpu_use(g));
    cudaError_t e;
    if (n > g->cap) { /* stream-ordered, as in kvx_gpu_destroy */
        if (g->ids_dev) cudaFreeAsync(g->ids_dev, g->stream);
        if (g->sums_dev) cudaFreeAsync(g->sums_dev, g->stream);
        g->ids_dev = NULL;
        g->sums_dev = NULL;
        g->cap = 0;
        if ((e = cudaMallocAsync((void **)&g->ids_dev, (size_t)n * sizeof(int32_t), g->stream)) !=
                cudaSuccess ||
            (e = cudaMallocAsync((void **)&g->sums_dev, (size_t)n * sizeof(uint64_t), g->stream)) !=
                cudaSuccess)
            return CU_ERR(e, "cudaMallocAsync (checksum scratch)");
        g->cap = n;
    }
    e = cudaMemcpyAsync(g->ids_dev, ids, (size_t)n * sizeof *ids, cudaMemcpyHostToDevice,
                        g->stream);
    if (e != cudaSuccess) return CU_ERR(e, "cudaMemcpyAsync (block ids)");
    e = (cudaError_t)kvx_sum_launch(dev_base, block_bytes, n, g->ids_dev, g->sums_dev, g->stream);
    if (e != cudaSuccess) return CU_ERR(e, "kvx_sum_kernel launch");
    e = cudaMemcpyAsync(sums, g->sums_dev, (size_t)n * sizeof *sums, cudaMemcpyDeviceToHost,
                        g->stream);
    if (e != cudaSuccess) return CU_ERR(e, "cudaMemcpyAsync (checksums)");
    e = cudaStreamSynchronize(g->stream);
    return e == cudaSuccess ? PDS_OK : CU_ERR(e, "cudaStreamSynchronize (checksums)");
}

/* kvx_nogpu.c: kvx_gpu.h for builds without CUDA — every call says PDS_ERR_UNSUPPORTED, so a node
 * configured with a device pool fails at start-up with a clear message instead of at run time. */
#include "kvx/kvx_gpu.h"

#define NO_CUDA(what) PDS_ERR(PDS_ERR_UNSUPPORTED, "%s: this build of kvx has no CUDA", what)

bool kvx_gpu_built(void)
{
    return false;
}

pds_status_t kvx_gpu_device_of(const void *p, int *device)
{
    return NO_CUDA("device pointer query");
}

pds_status_t kvx_gpu_check_device(int device)
{
    return NO_CUDA("CUDA device");
}

pds_status_t kvx_gpu_host_alloc(size_t bytes, void **out)
{
    return NO_CUDA("pinned host mirror");
}

void kvx_gpu_host_free(void *p) {}

pds_status_t kvx_gpu_dev_alloc(int device, size_t bytes, void **out)
{
    return NO_CUDA("device allocation");
}

void kvx_gpu_dev_free(void *p) {}

pds_status_t kvx_gpu_memcpy(void *dst, const void *src, size_t n)
{
    return NO_CUDA("device copy");
}

pds_status_t kvx_gpu_create(int device, kvx_gpu_t **out)
{
    return NO_CUDA("CUDA stream");
}

void kvx_gpu_destroy(kvx_gpu_t *g) {}

int kvx_gpu_device(const kvx_gpu_t *g)
{
    return -1;
}

pds_status_t kvx_gpu_use(kvx_gpu_t *g)
{
    return NO_CUDA("CUDA device");
}

pds_status_t kvx_gpu_copy_blocks(kvx_gpu_t *g, void *dst_base, const void *src_base,
                                 int64_t block_bytes, int n, const int32_t *ids)
{
    return NO_CUDA("block copy");
}

pds_status_t kvx_gpu_copy(kvx_gpu_t *g, void *dst, const void *src, size_t n)
{
    return NO_CUDA("device copy");
}

pds_status_t kvx_gpu_block_sums(kvx_gpu_t *g, const void *dev_base, int64_t block_bytes, int n,
                                const int32_t *ids, uint64_t *sums)
{
    return NO_CUDA("device checksum");
}

int kvx_sum_launch(const void *base, int64_t block_bytes, int n, const int32_t *ids, uint64_t *out,
                   void *stream)
{
    return -1;
}

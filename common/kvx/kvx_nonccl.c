/* kvx_nonccl.c: the NCCL backend's entry points in a build without NCCL (no CUDA, or no nccl.h):
 * creating an NCCL kvx fails with PDS_ERR_UNSUPPORTED and a message saying what the build lacks,
 * so a node configured with [kvx] backend = nccl stops at start-up with that message. */
#include "kvx/kvx_internal.h"

#define NO_NCCL                                                                              \
    PDS_ERR(PDS_ERR_UNSUPPORTED, "this build of kvx has no NCCL backend (it needs CUDA and " \
                                 "nccl.h at build time; see -DPDS_KVX_NCCL)")

bool pds_kvx_has_nccl(void)
{
    return false;
}

pds_status_t kvx_nccl_create(pds_kvx_t *x)
{
    return NO_NCCL;
}

void kvx_nccl_destroy(pds_kvx_t *x) {}

pds_status_t kvx_nccl_pool_blob_for(pds_kvx_t *x, const kvx_naddr_t *peer, const void **blob,
                                    size_t *len)
{
    return NO_NCCL;
}

pds_status_t kvx_nccl_open(pds_kvx_send_t *t, const void *addr, size_t addr_len, const void *pool,
                           size_t pool_len)
{
    return NO_NCCL;
}

pds_status_t kvx_nccl_send_layer(pds_kvx_send_t *t, int layer, const uint8_t *dev_base,
                                 const int32_t *src_ids)
{
    return NO_NCCL;
}

pds_status_t kvx_nccl_commit(pds_kvx_send_t *t, int64_t deadline_ns)
{
    return NO_NCCL;
}

void kvx_nccl_send_close(pds_kvx_send_t *t) {}

void kvx_nccl_wake(pds_kvx_t *x) {}

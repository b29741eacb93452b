/* kvx_nccl_wire.c: the NCCL backend's formats — address payload, the pair key inside the pool
 * blob, the fixed-size header that announces each group of data on a communicator — and their
 * checks. Kept apart from kvx_nccl.c (which needs CUDA and nccl.h) so that every build, CI's
 * included, parses and tests them: a receiver posts NCCL receives straight into its pool only for
 * runs these checks accepted.
 */
#include "kvx/kvx_internal.h"

#include <string.h>

_Static_assert(sizeof(kvx_nhdr_t) == KVX_NCCL_HDR_BYTES, "NCCL header is one fixed-size message");

pds_status_t kvx_nccl_addr_parse(const void *blob, size_t len, kvx_naddr_t *out)
{
    const void *payload;
    size_t n;
    PDS_TRY(kvx_addr_parse(blob, len, PDS_KVX_NCCL, &payload, &n));
    if (n != sizeof *out)
        return PDS_ERR(PDS_ERR_PARSE, "NCCL address payload of %zu bytes (want %zu)", n,
                       sizeof *out);
    memcpy(out, payload, sizeof *out);
    if (out->instance == 0) return PDS_ERR(PDS_ERR_PARSE, "NCCL address without an instance id");
    out->host[sizeof out->host - 1] = '\0';
    return PDS_OK;
}

pds_status_t kvx_nccl_pool_key(const void *blob, size_t len, kvx_pool_hdr_t *h, kvx_nkey_t *out)
{
    PDS_TRY(kvx_pool_parse(blob, len, h));
    if (h->h.backend != PDS_KVX_NCCL)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "pool blob is for backend %s, not nccl",
                       pds_kvx_backend_name((pds_kvx_backend_t)h->h.backend));
    if (h->n_layers > 1 << 16) return PDS_ERR(PDS_ERR_PARSE, "pool blob: %d layers", h->n_layers);
    uint64_t *bases = pds_calloc((size_t)h->n_layers, sizeof *bases);
    const void **rk = pds_calloc((size_t)h->n_layers, sizeof *rk);
    uint32_t *rl = pds_calloc((size_t)h->n_layers, sizeof *rl);
    pds_status_t s = PDS_OK;
    if (!bases || !rk || !rl) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "pool blob of %d layers", h->n_layers);
        goto out;
    }
    s = kvx_pool_entries(blob, len, h, bases, rk, rl);
    if (s != PDS_OK) goto out;
    if (rl[0] != sizeof *out) {
        s = PDS_ERR(PDS_ERR_PARSE,
                    "NCCL pool blob carries a %u-byte pair key (want %zu): not made for a sender "
                    "(use pds_kvx_pool_blob_for)",
                    rl[0], sizeof *out);
        goto out;
    }
    memcpy(out, rk[0], sizeof *out);
    if (out->receiver == 0 || out->sender == 0)
        s = PDS_ERR(PDS_ERR_PARSE, "NCCL pair key without receiver/sender instance");
out:
    pds_free(bases);
    pds_free(rk);
    pds_free(rl);
    return s;
}

pds_status_t kvx_nccl_hdr_check(const void *buf, size_t len, int64_t block_bytes, int n_layers,
                                kvx_nhdr_t *out)
{
    if (len != sizeof *out)
        return PDS_ERR(PDS_ERR_PARSE, "NCCL header of %zu bytes (want %zu)", len, sizeof *out);
    memcpy(out, buf, sizeof *out);
    const kvx_wire_t *w = &out->w;
    if (w->magic != KVX_MAGIC_MSG || w->version != KVX_VERSION || w->length != sizeof *w ||
        (w->kind != KVX_MSG_DATA && w->kind != KVX_MSG_DONE && w->kind != KVX_MSG_ABORT))
        return PDS_ERR(PDS_ERR_PARSE, "bad NCCL header (magic %08x version %u kind %u)", w->magic,
                       w->version, w->kind);
    if (w->kind != KVX_MSG_DATA) {
        if (out->n_runs != 0)
            return PDS_ERR(PDS_ERR_PARSE, "NCCL %s header with %u runs",
                           w->kind == KVX_MSG_DONE ? "DONE" : "ABORT", out->n_runs);
        return PDS_OK;
    }
    if (out->n_runs == 0 || out->n_runs > KVX_NCCL_MAX_RUNS)
        return PDS_ERR(PDS_ERR_CORRUPT, "NCCL data header with %u runs (1..%zu)", out->n_runs,
                       (size_t)KVX_NCCL_MAX_RUNS);
    if (w->layer >= (uint32_t)n_layers)
        return PDS_ERR(PDS_ERR_CORRUPT, "NCCL data header for layer %u of %d", w->layer, n_layers);
    uint64_t total = 0;
    for (uint32_t i = 0; i < out->n_runs; i++) {
        const kvx_nrun_t *r = &out->runs[i];
        if (r->n == 0 || r->n > (1u << 30) || r->index > (1u << 30))
            return PDS_ERR(PDS_ERR_CORRUPT, "NCCL run %u: %u blocks at position %u", i, r->n,
                           r->index);
        total += r->n;
    }
    if (total != w->n_blocks || w->bytes != total * (uint64_t)block_bytes)
        return PDS_ERR(PDS_ERR_CORRUPT,
                       "NCCL data header: runs add up to %llu blocks, header says %u blocks / "
                       "%llu bytes (block %lld bytes)",
                       (unsigned long long)total, w->n_blocks, (unsigned long long)w->bytes,
                       (long long)block_bytes);
    return PDS_OK;
}

int kvx_nccl_runs(int n, const int32_t *src_ids, const int32_t *dst_ids, kvx_nrun_t *runs)
{
    int k = 0;
    for (int i = 0; i < n;) {
        int m = 1;
        while (i + m < n && src_ids[i + m] == src_ids[i] + m && dst_ids[i + m] == dst_ids[i] + m)
            m++;
        runs[k++] = (kvx_nrun_t){(uint32_t)i, (uint32_t)dst_ids[i], (uint32_t)m};
        i += m;
    }
    return k;
}

/* kvx.c: the backend-neutral half of the KV transfer — argument checking, the receiver's state
 * machine (runs accepted against the expected block list, arrival accounting, DONE, checksum
 * verification, deadlines, notifications), the sender's run merging and checksums, the blob
 * formats and stats. Backends (kvx_ucx.c, kvx_loop.c) only move bytes and messages.
 *
 * Trade-off: verification hashes every destination block once more after arrival (~memory speed,
 * a few ms per 100 MiB) on the transfer progress thread with the kvx lock dropped; in exchange a
 * bit error, a wrong block id or a half-written block is caught before the decode node computes
 * on it. Turn it off per node with params.checksum = false (the sender then sends no sums and the
 * receiver only accounts for arrival).
 */
#include "kvx/kvx_internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define MOD "kvx"

pds_kvx_params_t pds_kvx_default_params(void)
{
    return (pds_kvx_params_t){.backend = PDS_KVX_UCX, .path = PDS_KVX_PATH_AM, .checksum = true};
}

const char *pds_kvx_backend_name(pds_kvx_backend_t b)
{
    return b == PDS_KVX_UCX        ? "ucx"
           : b == PDS_KVX_LOOPBACK ? "loopback"
           : b == PDS_KVX_NCCL     ? "nccl"
                                   : "unknown";
}

pds_status_t pds_kvx_backend_parse(const char *name, pds_kvx_backend_t *out)
{
    static const pds_kvx_backend_t all[] = {PDS_KVX_UCX, PDS_KVX_LOOPBACK, PDS_KVX_NCCL};
    for (size_t i = 0; name && out && i < PDS_ARRAY_LEN(all); i++)
        if (strcmp(name, pds_kvx_backend_name(all[i])) == 0) {
            *out = all[i];
            return PDS_OK;
        }
    return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown kvx backend '%s' (ucx, loopback or nccl)",
                   name ? name : "(null)");
}

bool pds_kvx_has_cuda(void)
{
    return kvx_gpu_built();
}

const char *pds_kvx_path_name(pds_kvx_path_t p)
{
    return p == PDS_KVX_PATH_AM ? "am" : p == PDS_KVX_PATH_PUT ? "put" : "unknown";
}

/* ---- checksum ------------------------------------------------------------------------------- */
static inline uint64_t rotl64(uint64_t v, int r)
{
    return (v << r) | (v >> (64 - r));
}

/* One lane step: xxhash64's round (two multiplies, no long dependency), so four lanes keep the
 * multiplier busy and the hash runs near memory speed. */
static inline uint64_t lane(uint64_t acc, uint64_t w)
{
    acc += w * 0xc2b2ae3d27d4eb4fULL;
    return rotl64(acc, 31) * 0x9e3779b185ebca87ULL;
}

uint64_t pds_kvx_checksum(const void *data, size_t n)
{
    const uint8_t *p = data;
    uint64_t a = pds_mix64(1), b = pds_mix64(2), c = pds_mix64(3), d = pds_mix64(4);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        a = lane(a, w[0]);
        b = lane(b, w[1]);
        c = lane(c, w[2]);
        d = lane(d, w[3]);
    }
    uint64_t h = pds_mix64(a ^ rotl64(b, 17) ^ rotl64(c, 29) ^ rotl64(d, 43));
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = pds_mix64(h ^ w);
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i);
        h = pds_mix64(h ^ w ^ 0xff);
    }
    return pds_mix64(h ^ (uint64_t)n);
}

void kvx_layer_sums(const uint8_t *base, int64_t block_bytes, int n, const int32_t *ids,
                    uint64_t *sums)
{
    for (int i = 0; i < n; i++)
        sums[i] = pds_kvx_checksum(base + (int64_t)ids[i] * block_bytes, (size_t)block_bytes);
}

/* ---- wire and blobs ------------------------------------------------------------------------- */
void kvx_wire_init(kvx_wire_t *w, int kind, uint64_t transfer_id)
{
    memset(w, 0, sizeof *w);
    w->magic = KVX_MAGIC_MSG;
    w->version = KVX_VERSION;
    w->kind = (uint16_t)kind;
    w->length = sizeof *w;
    w->transfer_id = transfer_id;
}

pds_status_t kvx_wire_check(const void *hdr, size_t len, int kind, kvx_wire_t *out)
{
    if (len != sizeof(kvx_wire_t))
        return PDS_ERR(PDS_ERR_PARSE, "kvx message header of %zu bytes (want %zu)", len,
                       sizeof(kvx_wire_t));
    memcpy(out, hdr, sizeof *out);
    if (out->magic != KVX_MAGIC_MSG || out->version != KVX_VERSION || out->length != sizeof *out ||
        out->kind != kind)
        return PDS_ERR(PDS_ERR_PARSE, "bad kvx message header (magic %08x version %u kind %u)",
                       out->magic, out->version, out->kind);
    return PDS_OK;
}

pds_status_t kvx_addr_build(pds_kvx_t *x, const void *payload, size_t n)
{
    size_t len = sizeof(kvx_blob_hdr_t) + n;
    uint8_t *b = pds_malloc(len);
    if (!b) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx address blob of %zu bytes", len);
    kvx_blob_hdr_t h = {KVX_MAGIC_ADDR, KVX_VERSION, (uint16_t)x->p.backend, (uint32_t)len,
                        (uint32_t)n};
    memcpy(b, &h, sizeof h);
    memcpy(b + sizeof h, payload, n);
    x->addr = b;
    x->addr_len = len;
    return PDS_OK;
}

pds_status_t kvx_addr_parse(const void *blob, size_t len, pds_kvx_backend_t backend,
                            const void **payload, size_t *n)
{
    kvx_blob_hdr_t h;
    if (!blob || len < sizeof h)
        return PDS_ERR(PDS_ERR_PARSE, "kvx address blob too short (%zu bytes)", len);
    memcpy(&h, blob, sizeof h);
    if (h.magic != KVX_MAGIC_ADDR || h.version != KVX_VERSION || h.length != len ||
        h.payload != len - sizeof h)
        return PDS_ERR(PDS_ERR_PARSE, "malformed kvx address blob (magic %08x, %zu bytes)", h.magic,
                       len);
    if (h.backend != backend)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "peer address is for backend %s, this kvx is %s",
                       pds_kvx_backend_name((pds_kvx_backend_t)h.backend),
                       pds_kvx_backend_name(backend));
    *payload = (const uint8_t *)blob + sizeof h;
    *n = h.payload;
    return PDS_OK;
}

static size_t pad8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

pds_status_t kvx_pool_blob_build(pds_kvx_t *x, const void *const *rkeys, const size_t *rkey_lens)
{
    return kvx_pool_blob_make(x, rkeys, rkey_lens, &x->pool_blob, &x->pool_len);
}

pds_status_t kvx_pool_blob_make(pds_kvx_t *x, const void *const *rkeys, const size_t *rkey_lens,
                                void **blob, size_t *blob_len)
{
    int L = x->layout.n_layers;
    size_t len = sizeof(kvx_pool_hdr_t);
    for (int l = 0; l < L; l++) len += 16 + pad8(rkey_lens ? rkey_lens[l] : 0);
    uint8_t *b = pds_calloc(1, len);
    if (!b) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx pool blob of %zu bytes", len);
    kvx_pool_hdr_t h = {
        .h = {KVX_MAGIC_POOL, KVX_VERSION, (uint16_t)x->p.backend, (uint32_t)len,
              (uint32_t)(len - sizeof(kvx_blob_hdr_t))},
        .n_layers = L,
        .n_blocks = x->layout.n_blocks,
        .block_bytes = x->block_bytes,
    };
    memcpy(b, &h, sizeof h);
    size_t off = sizeof h;
    for (int l = 0; l < L; l++) {
        uint64_t base = (uint64_t)(uintptr_t)x->pool_base[l];
        uint32_t rl = rkey_lens ? (uint32_t)rkey_lens[l] : 0;
        memcpy(b + off, &base, 8);
        memcpy(b + off + 8, &rl, 4);
        if (rl) memcpy(b + off + 16, rkeys[l], rl);
        off += 16 + pad8(rl);
    }
    *blob = b;
    *blob_len = len;
    return PDS_OK;
}

pds_status_t kvx_pool_parse(const void *blob, size_t len, kvx_pool_hdr_t *out)
{
    if (!blob || len < sizeof *out)
        return PDS_ERR(PDS_ERR_PARSE, "kvx pool blob too short (%zu bytes)", len);
    memcpy(out, blob, sizeof *out);
    if (out->h.magic != KVX_MAGIC_POOL || out->h.version != KVX_VERSION || out->h.length != len ||
        out->h.payload != len - sizeof(kvx_blob_hdr_t) || out->n_layers <= 0 ||
        out->n_blocks <= 0 || out->block_bytes <= 0)
        return PDS_ERR(PDS_ERR_PARSE, "malformed kvx pool blob (magic %08x, %zu bytes)",
                       out->h.magic, len);
    return PDS_OK;
}

pds_status_t kvx_pool_entries(const void *blob, size_t len, const kvx_pool_hdr_t *h,
                              uint64_t *bases, const void **rkeys, uint32_t *rkey_lens)
{
    const uint8_t *b = blob;
    size_t off = sizeof *h;
    for (int l = 0; l < h->n_layers; l++) {
        uint32_t rl;
        if (off + 16 > len) return PDS_ERR(PDS_ERR_PARSE, "kvx pool blob truncated at layer %d", l);
        memcpy(&bases[l], b + off, 8);
        memcpy(&rl, b + off + 8, 4);
        if (rl > len - off - 16)
            return PDS_ERR(PDS_ERR_PARSE, "kvx pool blob: rkey of layer %d overruns", l);
        rkeys[l] = b + off + 16;
        rkey_lens[l] = rl;
        off += 16 + pad8(rl);
    }
    if (off != len)
        return PDS_ERR(PDS_ERR_PARSE, "kvx pool blob has %zu trailing bytes", len - off);
    return PDS_OK;
}

/* ---- lifecycle ------------------------------------------------------------------------------ */
pds_status_t pds_kvx_create(const pds_kvx_params_t *p, pds_kvx_t **out)
{
    pds_kvx_params_t prm = p ? *p : pds_kvx_default_params();
    if (prm.backend != PDS_KVX_UCX && prm.backend != PDS_KVX_LOOPBACK &&
        prm.backend != PDS_KVX_NCCL)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown kvx backend %d", (int)prm.backend);
    if (prm.init_timeout_ms <= 0) prm.init_timeout_ms = 30000;
    if (prm.path != PDS_KVX_PATH_AM && prm.path != PDS_KVX_PATH_PUT)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown kvx data path %d", (int)prm.path);
    if (prm.backend == PDS_KVX_LOOPBACK && !prm.hub)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "loopback kvx needs params.hub");
    pds_kvx_t *x = pds_calloc(1, sizeof *x);
    if (!x) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx object");
    x->p = prm;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, &ca);
    pthread_condattr_destroy(&ca);
    pds_status_t s = prm.backend == PDS_KVX_UCX    ? kvx_ucx_create(x)
                     : prm.backend == PDS_KVX_NCCL ? kvx_nccl_create(x)
                                                   : kvx_loop_attach(x);
    if (s != PDS_OK) goto undo_sync;
    *out = x;
    return PDS_OK;

undo_sync:
    pthread_cond_destroy(&x->cv);
    pthread_mutex_destroy(&x->mu);
    pds_free(x->addr);
    pds_free(x);
    return s;
}

static void recv_free(pds_kvx_recv_t *r)
{
    pds_free(r->dst_ids);
    pds_free(r->unit);
    pds_free(r->sums);
    pds_free(r);
}

void pds_kvx_destroy(pds_kvx_t *x)
{
    if (!x) return;
    pthread_mutex_lock(&x->mu);
    for (pds_kvx_recv_t *r = x->recvs; r; r = r->next)
        kvx_recv_finish(r, PDS_ERR_CANCELLED, "kvx destroyed");
    bool open_sends = false;
    for (pds_kvx_send_t *t = x->sends; t; t = t->next) open_sends |= !t->closed;
    if (x->recvs || open_sends)
        PDS_LOG_WARN(MOD, "destroy with open handles (recv %s, send %s): closing them",
                     x->recvs ? "yes" : "no", open_sends ? "yes" : "no");
    pthread_mutex_unlock(&x->mu);
    /* The staging thread first: it calls into the backend. */
    kvx_stage_destroy(x);
    if (x->p.backend == PDS_KVX_UCX) {
        kvx_ucx_destroy(x);
    } else if (x->p.backend == PDS_KVX_NCCL) {
        kvx_nccl_destroy(x);
    } else {
        kvx_loop_detach(x);
    }
    /* The backend is gone: nothing can call back any more. */
    while (x->recvs) {
        pds_kvx_recv_t *r = x->recvs;
        x->recvs = r->next;
        recv_free(r);
    }
    while (x->sends) {
        pds_kvx_send_t *t = x->sends;
        x->sends = t->next;
        pds_free(t->dst_ids);
        pds_free(t->layer_sent);
        pds_free(t->sums);
        pds_free(t);
    }
    kvx_gpu_destroy(x->rx_gpu);      /* the progress thread that used it is gone */
    kvx_gpu_host_free(x->rx_mirror); /* after the backend unregistered it */
    pds_free(x->rx_dev);
    pds_free(x->pool_blob);
    pds_free(x->pool_base);
    pds_free(x->addr);
    pthread_cond_destroy(&x->cv);
    pthread_mutex_destroy(&x->mu);
    pds_free(x);
}

pds_status_t pds_kvx_address(pds_kvx_t *x, const void **blob, size_t *len)
{
    if (!x || !blob || !len) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    *blob = x->addr;
    *len = x->addr_len;
    return PDS_OK;
}

void pds_kvx_stats(pds_kvx_t *x, pds_kvx_stats_t *out)
{
    pthread_mutex_lock(&x->mu);
    *out = x->stats;
    pthread_mutex_unlock(&x->mu);
}

void pds_kvx_test_corrupt_next(pds_kvx_t *x, int layer, int block_index, size_t byte)
{
    pthread_mutex_lock(&x->mu);
    x->corrupt.armed = true;
    x->corrupt.layer = layer;
    x->corrupt.block = block_index;
    x->corrupt.byte = byte;
    pthread_mutex_unlock(&x->mu);
}

bool kvx_cv_wait_until(pds_kvx_t *x, int64_t deadline_ns)
{
    struct timespec ts = {(time_t)(deadline_ns / 1000000000LL), (long)(deadline_ns % 1000000000LL)};
    return pthread_cond_timedwait(&x->cv, &x->mu, &ts) != ETIMEDOUT;
}

static int64_t deadline_after(int64_t ms)
{
    int64_t now = pds_time_now_ns();
    if (ms > (INT64_MAX - now) / 1000000) return INT64_MAX;
    return now + ms * 1000000;
}

/* ---- receiver ------------------------------------------------------------------------------- */
static bool layout_ok(const pds_kv_layout_t *l)
{
    return l && l->n_layers > 0 && l->n_blocks > 0 && l->block_size > 0 && l->n_kv_heads > 0 &&
           l->head_dim > 0 && (l->elem_size == 2 || l->elem_size == 4);
}

pds_status_t pds_kvx_register_pool(pds_kvx_t *x, const pds_kv_layout_t *layout,
                                   void *const *layer_base, pds_kvx_mem_t mem,
                                   const void **pool_blob, size_t *pool_len)
{
    if (!x || !layer_base || !pool_blob || !pool_len)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    if (!layout_ok(layout)) return PDS_ERR(PDS_ERR_INVALID_ARG, "bad KV layout");
    if (mem != PDS_KVX_MEM_HOST && mem != PDS_KVX_MEM_CUDA)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown memory kind %d", (int)mem);
    if (mem == PDS_KVX_MEM_CUDA && x->p.backend == PDS_KVX_LOOPBACK)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "loopback kvx moves host memory only");
    if (mem == PDS_KVX_MEM_HOST && x->p.backend == PDS_KVX_NCCL)
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "NCCL moves device memory only; use [kvx] backend = ucx for a host pool");
    for (int l = 0; l < layout->n_layers; l++)
        if (!layer_base[l]) return PDS_ERR(PDS_ERR_INVALID_ARG, "layer %d base is NULL", l);
    pthread_mutex_lock(&x->mu);
    pds_status_t s = PDS_OK;
    if (x->have_pool) {
        s = PDS_ERR(PDS_ERR_ALREADY_EXISTS, "kvx already has a registered pool");
        goto out;
    }
    x->pool_base = pds_calloc((size_t)layout->n_layers, sizeof *x->pool_base);
    if (!x->pool_base) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "kvx pool bases");
        goto out;
    }
    for (int l = 0; l < layout->n_layers; l++) x->pool_base[l] = layer_base[l];
    x->layout = *layout;
    x->block_bytes = pds_kv_block_bytes(layout);
    /* Device pool: UCX registers a pinned mirror instead (pool_base re-pointed into it). */
    if (mem == PDS_KVX_MEM_CUDA) s = kvx_stage_rx_register(x, layer_base);
    if (s == PDS_OK)
        s = x->p.backend == PDS_KVX_UCX ? kvx_ucx_register(x) : kvx_pool_blob_build(x, NULL, NULL);
    if (s != PDS_OK) {
        kvx_gpu_destroy(x->rx_gpu);
        x->rx_gpu = NULL;
        kvx_gpu_host_free(x->rx_mirror);
        x->rx_mirror = NULL;
        pds_free(x->rx_dev);
        x->rx_dev = NULL;
        x->pool_on_gpu = false;
        pds_free(x->pool_base);
        x->pool_base = NULL;
        goto out;
    }
    x->have_pool = true;
    *pool_blob = x->pool_blob;
    *pool_len = x->pool_len;
out:
    pthread_mutex_unlock(&x->mu);
    return s;
}

pds_status_t pds_kvx_pool_blob_for(pds_kvx_t *x, const void *peer_addr, size_t addr_len,
                                   const void **pool_blob, size_t *pool_len)
{
    if (!x || !pool_blob || !pool_len) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    kvx_naddr_t peer;
    if (x->p.backend == PDS_KVX_NCCL) PDS_TRY(kvx_nccl_addr_parse(peer_addr, addr_len, &peer));
    pthread_mutex_lock(&x->mu);
    pds_status_t s = PDS_OK;
    if (!x->have_pool) {
        s = PDS_ERR(PDS_ERR_FAILED_PRECONDITION,
                    "pool blob requested before pds_kvx_register_pool");
    } else if (x->p.backend == PDS_KVX_NCCL) {
        s = kvx_nccl_pool_blob_for(x, &peer, pool_blob, pool_len);
    } else {
        *pool_blob = x->pool_blob;
        *pool_len = x->pool_len;
    }
    pthread_mutex_unlock(&x->mu);
    return s;
}

pds_kvx_recv_t *kvx_recv_find(pds_kvx_t *x, uint64_t id)
{
    for (pds_kvx_recv_t *r = x->recvs; r; r = r->next)
        if (r->id == id && !r->closed) return r;
    return NULL;
}

pds_kvx_send_t *kvx_send_find(pds_kvx_t *x, uint64_t id)
{
    for (pds_kvx_send_t *t = x->sends; t; t = t->next)
        if (t->id == id && !t->closed) return t;
    return NULL;
}

pds_status_t pds_kvx_expect(pds_kvx_t *x, uint64_t transfer_id, int n_blocks,
                            const int32_t *dst_ids, int64_t timeout_ms, pds_kvx_notify_fn notify,
                            void *ctx, pds_kvx_recv_t **out)
{
    if (!x || !dst_ids || !out) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    if (n_blocks <= 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "transfer of %d blocks", n_blocks);
    if (timeout_ms <= 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "timeout %lld ms", (long long)timeout_ms);
    pthread_mutex_lock(&x->mu);
    pds_status_t s = PDS_OK;
    uint8_t *seen = NULL;
    pds_kvx_recv_t *r = NULL;
    if (!x->have_pool) {
        s = PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "kvx_expect before pds_kvx_register_pool");
        goto out;
    }
    if (kvx_recv_find(x, transfer_id)) {
        s = PDS_ERR(PDS_ERR_ALREADY_EXISTS, "transfer %llu already expected",
                    (unsigned long long)transfer_id);
        goto out;
    }
    int nb = x->layout.n_blocks, L = x->layout.n_layers;
    if (n_blocks > nb) {
        s = PDS_ERR(PDS_ERR_INVALID_ARG, "transfer of %d blocks into a pool of %d", n_blocks, nb);
        goto out;
    }
    seen = pds_calloc((size_t)nb, 1);
    r = pds_calloc(1, sizeof *r);
    if (!seen || !r) goto oom;
    for (int i = 0; i < n_blocks; i++) {
        if (dst_ids[i] < 0 || dst_ids[i] >= nb || seen[dst_ids[i]]) {
            s = PDS_ERR(PDS_ERR_INVALID_ARG, "destination block id %d (index %d) %s", dst_ids[i], i,
                        dst_ids[i] < 0 || dst_ids[i] >= nb ? "out of range" : "repeated");
            goto out;
        }
        seen[dst_ids[i]] = 1;
    }
    r->dst_ids = pds_malloc((size_t)n_blocks * sizeof *r->dst_ids);
    r->unit = pds_calloc((size_t)L * n_blocks, 1);
    r->sums = pds_calloc((size_t)L * n_blocks, sizeof *r->sums);
    if (!r->dst_ids || !r->unit || !r->sums) goto oom;
    memcpy(r->dst_ids, dst_ids, (size_t)n_blocks * sizeof *dst_ids);
    r->x = x;
    r->id = transfer_id;
    r->n_layers = L;
    r->n_blocks = n_blocks;
    r->deadline_ns = deadline_after(timeout_ms);
    r->status = PDS_IN_PROGRESS;
    r->notify = notify;
    r->ctx = ctx;
    r->next = x->recvs;
    x->recvs = r;
    if (x->p.backend == PDS_KVX_UCX) kvx_ucx_wake(x); /* re-arm the deadline in the poll */
    if (x->p.backend == PDS_KVX_NCCL) kvx_nccl_wake(x);
    *out = r;
    r = NULL;
    goto out;
oom:
    s = PDS_ERR(PDS_ERR_NO_MEMORY, "kvx expect of %d blocks", n_blocks);
out:
    pthread_mutex_unlock(&x->mu);
    if (r) recv_free(r);
    pds_free(seen);
    return s;
}

static int64_t recv_units(const pds_kvx_recv_t *r)
{
    return (int64_t)r->n_layers * r->n_blocks;
}

void kvx_recv_finish(pds_kvx_recv_t *r, pds_status_t s, const char *fmt, ...)
{
    if (r->status != PDS_IN_PROGRESS) return;
    pds_kvx_t *x = r->x;
    r->status = s;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->detail, sizeof r->detail, fmt, ap);
    va_end(ap);
    if (s == PDS_OK) {
        x->stats.transfers_received++;
        x->stats.bytes_received += recv_units(r) * x->block_bytes;
    } else {
        x->stats.recv_failed++;
        PDS_LOG(s == PDS_ERR_CANCELLED ? PDS_LOG_DEBUG : PDS_LOG_WARN, MOD,
                "recv_failed transfer=%llu status=%s detail=\"%s\"", (unsigned long long)r->id,
                pds_status_name(s), r->detail);
    }
    r->notify_pending = r->notify != NULL && !r->closed;
    if (x->p.backend == PDS_KVX_UCX) kvx_ucx_recv_final(r);
    pthread_cond_broadcast(&x->cv);
}

static void recv_maybe_ready(pds_kvx_recv_t *r)
{
    if (r->status == PDS_IN_PROGRESS && r->done_received && !r->verify_queued && !r->verifying &&
        r->n_landed == recv_units(r)) {
        r->verify_queued = true;
        r->x->n_verify_queued++;
    }
}

uint8_t *kvx_recv_accept_run(pds_kvx_recv_t *r, const kvx_wire_t *h, size_t len)
{
    if (r->status != PDS_IN_PROGRESS) return NULL;
    pds_kvx_t *x = r->x;
    int64_t n = h->n_blocks;
    if (h->layer >= (uint32_t)r->n_layers || n <= 0 || h->index >= (uint32_t)r->n_blocks ||
        n > r->n_blocks - (int64_t)h->index || h->bytes != (uint64_t)(n * x->block_bytes) ||
        len != h->bytes) {
        kvx_recv_finish(r, PDS_ERR_CORRUPT,
                        "malformed data run: layer %u index %u blocks %lld bytes %zu", h->layer,
                        h->index, (long long)n, len);
        return NULL;
    }
    uint8_t *unit = r->unit + (int64_t)h->layer * r->n_blocks + h->index;
    for (int64_t k = 0; k < n; k++) {
        if (r->dst_ids[h->index + k] != (int64_t)h->dst_first + k) {
            kvx_recv_finish(r, PDS_ERR_CORRUPT,
                            "data run for layer %u index %lld targets block %lld, expected %d",
                            h->layer, (long long)(h->index + k), (long long)(h->dst_first + k),
                            r->dst_ids[h->index + k]);
            return NULL;
        }
        if (unit[k]) {
            kvx_recv_finish(r, PDS_ERR_CORRUPT, "block index %lld of layer %u sent twice",
                            (long long)(h->index + k), h->layer);
            return NULL;
        }
    }
    memset(unit, 1, (size_t)n);
    return x->pool_base[h->layer] + (int64_t)h->dst_first * x->block_bytes;
}

void kvx_recv_landed(pds_kvx_recv_t *r, int layer, int index, int n)
{
    memset(r->unit + (int64_t)layer * r->n_blocks + index, 2, (size_t)n);
    r->n_landed += n;
    recv_maybe_ready(r);
}

void kvx_recv_on_done(pds_kvx_recv_t *r, const kvx_wire_t *h, const void *data, size_t len)
{
    r->done_received = true;
    if (r->status != PDS_IN_PROGRESS) return;
    int64_t units = recv_units(r);
    if (h->n_layers != (uint32_t)r->n_layers || h->n_blocks != (uint32_t)r->n_blocks ||
        h->bytes != (uint64_t)(units * r->x->block_bytes)) {
        kvx_recv_finish(
            r, PDS_ERR_CORRUPT, "DONE for %u layers x %u blocks (%llu bytes), expected %d x %d",
            h->n_layers, h->n_blocks, (unsigned long long)h->bytes, r->n_layers, r->n_blocks);
        return;
    }
    if (h->flags & KVX_FLAG_CHECKSUM) {
        if (len != (size_t)units * sizeof(uint64_t)) {
            kvx_recv_finish(r, PDS_ERR_CORRUPT, "DONE carries %zu checksum bytes, expected %zu",
                            len, (size_t)units * sizeof(uint64_t));
            return;
        }
        memcpy(r->sums, data, len);
        r->have_sums = true;
    }
    if (h->flags & KVX_FLAG_PUT) {
        /* One-sided puts leave no trace here; the sender flushed its endpoint before DONE. */
        memset(r->unit, 2, (size_t)units);
        r->n_landed = units;
    }
    recv_maybe_ready(r);
}

void kvx_verify_queued(pds_kvx_t *x)
{
    while (x->n_verify_queued > 0) {
        pds_kvx_recv_t *r = x->recvs;
        while (r && !r->verify_queued) r = r->next;
        if (!r) {
            x->n_verify_queued = 0;
            return;
        }
        r->verify_queued = false;
        x->n_verify_queued--;
        if (r->status != PDS_IN_PROGRESS) continue;
        r->verifying = true;
        bool corrupt = x->corrupt.armed;
        int c_layer = x->corrupt.layer, c_block = x->corrupt.block;
        size_t c_byte = x->corrupt.byte;
        x->corrupt.armed = false;
        int64_t bb = x->block_bytes;
        pthread_mutex_unlock(&x->mu);

        int64_t t0 = pds_time_now_ns();
        if (corrupt && c_layer >= 0 && c_layer < r->n_layers && c_block >= 0 &&
            c_block < r->n_blocks && (int64_t)c_byte < bb) {
            uint8_t *p = x->pool_base[c_layer] + (int64_t)r->dst_ids[c_block] * bb + c_byte;
            uint8_t v = 0;
            if (!x->pool_on_gpu)
                *p ^= 0x01;
            else if (kvx_gpu_memcpy(&v, p, 1) == PDS_OK) { /* a bit error in device memory */
                v ^= 0x01;
                (void)kvx_gpu_memcpy(p, &v, 1);
            }
        }
        /* Staged device pool: into the reserved device blocks first, verified there. */
        pds_status_t vs = PDS_OK;
        int64_t dt_land = 0;
        if (x->rx_mirror) {
            vs = kvx_stage_rx_land(x, r);
            dt_land = pds_time_now_ns() - t0;
            t0 = pds_time_now_ns();
        }
        int bad_layer = -1, bad_index = -1;
        uint64_t got = 0, want = 0;
        if (vs == PDS_OK && r->have_sums)
            vs = kvx_stage_rx_verify(x, r, &bad_layer, &bad_index, &got);
        if (bad_layer >= 0) want = r->sums[(int64_t)bad_layer * r->n_blocks + bad_index];
        int64_t dt = pds_time_now_ns() - t0;
        char vdetail[160];
        snprintf(vdetail, sizeof vdetail, "%s", vs == PDS_OK ? "" : pds_err_detail());

        pthread_mutex_lock(&x->mu);
        r->verifying = false;
        x->stats.verify_ns += dt;
        if (x->rx_mirror) {
            x->stats.stage_ns += dt_land;
            x->stats.staged_bytes += (int64_t)r->n_layers * r->n_blocks * bb;
        }
        if (vs != PDS_OK)
            kvx_recv_finish(r, vs, "device pool: %s", vdetail);
        else if (bad_layer >= 0)
            kvx_recv_finish(r, PDS_ERR_CORRUPT,
                            "checksum mismatch at layer %d block index %d (block %d): "
                            "got %016llx, sender %016llx",
                            bad_layer, bad_index, r->dst_ids[bad_index], (unsigned long long)got,
                            (unsigned long long)want);
        else
            kvx_recv_finish(r, PDS_OK, "ok");
        pthread_cond_broadcast(&x->cv);
    }
}

int64_t kvx_check_deadlines(pds_kvx_t *x, int64_t now_ns)
{
    int64_t next = INT64_MAX;
    for (pds_kvx_recv_t *r = x->recvs; r; r = r->next) {
        if (r->status != PDS_IN_PROGRESS || r->verifying || r->verify_queued) continue;
        if (r->deadline_ns <= now_ns)
            kvx_recv_finish(r, PDS_ERR_TIMEOUT,
                            "transfer %llu incomplete at its deadline (%lld of %lld block-layers "
                            "landed, done %s)",
                            (unsigned long long)r->id, (long long)r->n_landed,
                            (long long)recv_units(r), r->done_received ? "received" : "missing");
        else if (r->deadline_ns - now_ns < next)
            next = r->deadline_ns - now_ns;
    }
    return next;
}

void kvx_deliver_notifies(pds_kvx_t *x)
{
    for (;;) {
        struct {
            pds_kvx_notify_fn fn;
            void *ctx;
            uint64_t id;
            pds_status_t s;
        } q[16];
        int n = 0;
        for (pds_kvx_recv_t *r = x->recvs; r && n < 16; r = r->next) {
            if (!r->notify_pending) continue;
            r->notify_pending = false;
            q[n].fn = r->notify;
            q[n].ctx = r->ctx;
            q[n].id = r->id;
            q[n].s = r->status;
            n++;
        }
        if (n == 0) return;
        pthread_mutex_unlock(&x->mu);
        for (int i = 0; i < n; i++) q[i].fn(q[i].ctx, q[i].id, q[i].s);
        pthread_mutex_lock(&x->mu);
    }
}

static pds_status_t recv_status_locked(pds_kvx_recv_t *r)
{
    kvx_check_deadlines(r->x, pds_time_now_ns());
    if (r->status < 0) return PDS_ERR(r->status, "%s", r->detail);
    return r->status;
}

pds_status_t pds_kvx_recv_poll(pds_kvx_recv_t *r)
{
    if (!r) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL recv handle");
    pds_kvx_t *x = r->x;
    pthread_mutex_lock(&x->mu);
    pds_status_t s = recv_status_locked(r);
    kvx_deliver_notifies(x);
    pthread_mutex_unlock(&x->mu);
    return s;
}

pds_status_t pds_kvx_recv_wait(pds_kvx_recv_t *r, int64_t wait_ms)
{
    if (!r) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL recv handle");
    pds_kvx_t *x = r->x;
    int64_t until = deadline_after(wait_ms < 0 ? 0 : wait_ms);
    pthread_mutex_lock(&x->mu);
    for (;;) {
        int64_t now = pds_time_now_ns();
        kvx_check_deadlines(x, now);
        if (r->status != PDS_IN_PROGRESS || now >= until) break;
        int64_t wake = until;
        if (!r->verifying && !r->verify_queued && r->deadline_ns < wake) wake = r->deadline_ns;
        kvx_cv_wait_until(x, wake);
    }
    pds_status_t s = recv_status_locked(r);
    kvx_deliver_notifies(x);
    pthread_mutex_unlock(&x->mu);
    return s;
}

void pds_kvx_recv_cancel(pds_kvx_recv_t *r)
{
    if (!r) return;
    pds_kvx_t *x = r->x;
    pthread_mutex_lock(&x->mu);
    kvx_recv_finish(r, PDS_ERR_CANCELLED, "cancelled by the receiver");
    kvx_deliver_notifies(x);
    pthread_mutex_unlock(&x->mu);
}

void pds_kvx_recv_close(pds_kvx_recv_t *r)
{
    if (!r) return;
    pds_kvx_t *x = r->x;
    pthread_mutex_lock(&x->mu);
    r->closed = true;
    r->notify_pending = false;
    kvx_recv_finish(r, PDS_ERR_CANCELLED, "closed by the receiver");
    r->notify_pending = false;
    /* Receives already writing into the blocks finish (or fail) before the blocks are handed back;
     * verification holds a pointer to r. */
    while (r->inflight > 0 || r->verifying) kvx_cv_wait_until(x, pds_time_now_ns() + 100000000LL);
    if (r->verify_queued) x->n_verify_queued--;
    for (pds_kvx_recv_t **pp = &x->recvs; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    pthread_mutex_unlock(&x->mu);
    recv_free(r);
}

uint64_t pds_kvx_recv_id(const pds_kvx_recv_t *r)
{
    return r ? r->id : 0;
}

/* ---- sender --------------------------------------------------------------------------------- */
static void send_free(pds_kvx_send_t *t)
{
    pds_free(t->dst_ids);
    pds_free(t->layer_sent);
    pds_free(t->sums);
    pds_free(t);
}

pds_status_t pds_kvx_send_open(pds_kvx_t *x, const void *peer_addr, size_t addr_len,
                               const void *peer_pool, size_t pool_len,
                               const pds_kv_layout_t *src_layout, uint64_t transfer_id,
                               int n_blocks, const int32_t *dst_ids, pds_kvx_send_t **out)
{
    if (!x || !dst_ids || !out) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    if (!layout_ok(src_layout)) return PDS_ERR(PDS_ERR_INVALID_ARG, "bad source KV layout");
    kvx_pool_hdr_t ph;
    PDS_TRY(kvx_pool_parse(peer_pool, pool_len, &ph));
    if (ph.h.backend != (uint16_t)x->p.backend)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "peer pool blob is for backend %s, this kvx is %s",
                       pds_kvx_backend_name((pds_kvx_backend_t)ph.h.backend),
                       pds_kvx_backend_name(x->p.backend));
    if (ph.n_layers != src_layout->n_layers || ph.block_bytes != pds_kv_block_bytes(src_layout))
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "layout mismatch: peer pool has %d layers of %lld-byte blocks, source has "
                       "%d layers of %lld-byte blocks",
                       ph.n_layers, (long long)ph.block_bytes, src_layout->n_layers,
                       (long long)pds_kv_block_bytes(src_layout));
    if (n_blocks <= 0 || n_blocks > ph.n_blocks)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "transfer of %d blocks into a pool of %d", n_blocks,
                       ph.n_blocks);
    for (int i = 0; i < n_blocks; i++)
        if (dst_ids[i] < 0 || dst_ids[i] >= ph.n_blocks)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "destination block id %d out of range [0, %d)",
                           dst_ids[i], ph.n_blocks);
    pds_kvx_send_t *t = pds_calloc(1, sizeof *t);
    if (!t) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx send handle");
    int L = ph.n_layers;
    t->dst_ids = pds_malloc((size_t)n_blocks * sizeof *t->dst_ids);
    t->layer_sent = pds_calloc((size_t)L, 1);
    t->sums = pds_calloc((size_t)L * n_blocks, sizeof *t->sums);
    if (!t->dst_ids || !t->layer_sent || !t->sums) {
        send_free(t);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx send handle of %d blocks", n_blocks);
    }
    memcpy(t->dst_ids, dst_ids, (size_t)n_blocks * sizeof *dst_ids);
    t->x = x;
    t->id = transfer_id;
    t->n_layers = L;
    t->n_blocks = n_blocks;
    t->block_bytes = ph.block_bytes;
    t->t_open_ns = pds_time_now_ns();
    t->status = PDS_OK;
    t->verdict = PDS_IN_PROGRESS;
    t->src_n_blocks = src_layout->n_blocks;
    pds_status_t s;
    if (x->p.backend == PDS_KVX_NCCL && !(x->have_source && x->src_mem == PDS_KVX_MEM_CUDA)) {
        s = PDS_ERR(PDS_ERR_FAILED_PRECONDITION,
                    "NCCL sends device memory: pds_kvx_register_source(.., PDS_KVX_MEM_CUDA, ..) "
                    "first");
    } else if (x->p.backend != PDS_KVX_LOOPBACK) {
        pthread_mutex_lock(&x->mu);
        s = x->p.backend == PDS_KVX_UCX
                ? kvx_ucx_open(t, peer_addr, addr_len, peer_pool, pool_len)
                : kvx_nccl_open(t, peer_addr, addr_len, peer_pool, pool_len);
        if (s == PDS_OK) {
            t->next = x->sends;
            x->sends = t;
        }
        pthread_mutex_unlock(&x->mu);
    } else {
        s = kvx_loop_open(t, peer_addr, addr_len);
        if (s == PDS_OK) {
            pthread_mutex_lock(&x->mu);
            t->next = x->sends;
            x->sends = t;
            pthread_mutex_unlock(&x->mu);
        }
    }
    if (s != PDS_OK) {
        send_free(t);
        return s;
    }
    *out = t;
    return PDS_OK;
}

pds_status_t pds_kvx_send_layer(pds_kvx_send_t *t, int layer, const void *src_base,
                                const int32_t *src_ids)
{
    if (!t || !src_base || !src_ids) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    pds_kvx_t *x = t->x;
    if (layer < 0 || layer >= t->n_layers)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "layer %d of %d", layer, t->n_layers);
    if (t->layer_sent[layer]) return PDS_ERR(PDS_ERR_INVALID_ARG, "layer %d sent twice", layer);
    if (t->committing) return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "send_layer after commit");
    for (int i = 0; i < t->n_blocks; i++)
        if (src_ids[i] < 0 || src_ids[i] >= t->src_n_blocks)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "source block id %d at index %d out of [0, %d)",
                           src_ids[i], i, t->src_n_blocks);
    if (x->have_source && x->src_mem == PDS_KVX_MEM_CUDA) {
        if (src_base != x->src_base[layer])
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "layer %d: src_base %p is not the registered device base %p", layer,
                           src_base, (void *)x->src_base[layer]);
        t->layer_sent[layer] = 1;
        return kvx_stage_send_layer(t, layer, src_ids);
    }
    const uint8_t *src = src_base;
    if (!t->t_first_ns) t->t_first_ns = pds_time_now_ns();
    if (x->p.checksum)
        kvx_layer_sums(src, t->block_bytes, t->n_blocks, src_ids,
                       t->sums + (int64_t)layer * t->n_blocks);
    t->layer_sent[layer] = 1;
    if (x->p.backend == PDS_KVX_LOOPBACK) return kvx_loop_send_runs(t, layer, src, src_ids);

    pthread_mutex_lock(&x->mu);
    pds_status_t s = t->status;
    for (int i = 0; i < t->n_blocks && s == PDS_OK;) {
        int n = 1;
        while (i + n < t->n_blocks && src_ids[i + n] == src_ids[i] + n &&
               t->dst_ids[i + n] == t->dst_ids[i] + n)
            n++;
        s = kvx_ucx_send_run(t, layer, i, src + (int64_t)src_ids[i] * t->block_bytes, n);
        i += n;
    }
    if (s != PDS_OK && t->status == PDS_OK) t->status = s;
    kvx_ucx_wake(x);
    pthread_mutex_unlock(&x->mu);
    return s;
}

pds_status_t pds_kvx_send_commit(pds_kvx_send_t *t, int64_t timeout_ms)
{
    if (!t) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL send handle");
    pds_kvx_t *x = t->x;
    if (t->committing) return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "commit called twice");
    for (int l = 0; l < t->n_layers; l++)
        if (!t->layer_sent[l])
            return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "commit before layer %d was sent", l);
    int64_t deadline = deadline_after(timeout_ms < 0 ? 0 : timeout_ms);
    pds_status_t s;
    if (x->p.backend == PDS_KVX_LOOPBACK) {
        t->committing = true;
        s = kvx_loop_commit(t);
        pthread_mutex_lock(&x->mu);
    } else {
        pthread_mutex_lock(&x->mu);
        t->committing = true;
        s = kvx_stage_drain(t, deadline); /* device source: every layer handed to the transport */
        if (s == PDS_OK && t->status != PDS_OK)
            s = PDS_ERR(t->status, "transfer %llu failed while staging", (unsigned long long)t->id);
        if (s == PDS_OK)
            s = x->p.backend == PDS_KVX_UCX ? kvx_ucx_commit(t, deadline)
                                            : kvx_nccl_commit(t, deadline);
    }
    x->stats.bytes_sent += t->bytes;
    x->stats.msgs_sent += t->msgs;
    t->t_done_ns = pds_time_now_ns();
    if (s == PDS_OK) {
        t->committed_ok = true;
        x->stats.transfers_sent++;
        x->stats.send_ns += pds_time_now_ns() - t->t_open_ns;
    } else {
        x->stats.transfers_failed++;
    }
    pthread_mutex_unlock(&x->mu);
    return s;
}

void pds_kvx_send_times(const pds_kvx_send_t *t, int64_t *first_ns, int64_t *done_ns)
{
    if (first_ns) *first_ns = t ? t->t_first_ns : 0;
    if (done_ns) *done_ns = t ? t->t_done_ns : 0;
}

void pds_kvx_send_close(pds_kvx_send_t *t)
{
    if (!t) return;
    pds_kvx_t *x = t->x;
    if (x->p.backend == PDS_KVX_LOOPBACK && !t->committed_ok) kvx_loop_abort(t);
    pthread_mutex_lock(&x->mu);
    if (t->staging > 0) {
        /* Staged layers still queued: make them skip their work, and wait (bounded by compute). */
        if (t->status == PDS_OK) t->status = PDS_ERR_CANCELLED;
        (void)kvx_stage_drain(t, INT64_MAX);
    }
    if (x->p.backend == PDS_KVX_UCX) kvx_ucx_send_close(t);
    if (x->p.backend == PDS_KVX_NCCL) kvx_nccl_send_close(t);
    if (!t->committing) {
        x->stats.bytes_sent += t->bytes;
        x->stats.msgs_sent += t->msgs;
        x->stats.transfers_failed++;
    }
    t->closed = true;
    if (t->inflight > 0) {
        /* Parked (see kvx_ucx_send_close): a transport request still names it; freed with x. */
        pthread_mutex_unlock(&x->mu);
        return;
    }
    for (pds_kvx_send_t **pp = &x->sends; *pp; pp = &(*pp)->next)
        if (*pp == t) {
            *pp = t->next;
            break;
        }
    pthread_mutex_unlock(&x->mu);
    send_free(t);
}

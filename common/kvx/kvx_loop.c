/* kvx_loop.c: the loopback backend — two kvx objects in one process, attached to one hub, move KV
 * by memcpy straight into the receiver's registered pool, through the same receiver state machine
 * (run checks, arrival accounting, DONE, checksum verification) as UCX. Everything happens on the
 * sender's thread: send_layer copies, commit verifies and returns the verdict, and notify
 * callbacks run there too. The hub (not a global) is what lets a sender find a receiver by the id
 * in its address blob, and tell a destroyed receiver (PDS_ERR_UNAVAILABLE) from a live one.
 *
 * Lock order: hub->mu, then the receiving kvx's mu. Never the sender's own mu inside.
 */
#include "kvx/kvx_internal.h"

#include <string.h>

typedef struct hub_entry {
    struct hub_entry *next;
    uint64_t id;
    pds_kvx_t *x;
} hub_entry_t;

struct pds_kvx_hub {
    pthread_mutex_t mu;
    uint64_t next_id;
    hub_entry_t *entries;
};

pds_status_t pds_kvx_hub_create(pds_kvx_hub_t **out)
{
    if (!out) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL out");
    pds_kvx_hub_t *h = pds_calloc(1, sizeof *h);
    if (!h) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx hub");
    pthread_mutex_init(&h->mu, NULL);
    *out = h;
    return PDS_OK;
}

void pds_kvx_hub_destroy(pds_kvx_hub_t *h)
{
    if (!h) return;
    if (h->entries) PDS_LOG_WARN("kvx", "hub_destroy with kvx objects still attached");
    while (h->entries) {
        hub_entry_t *e = h->entries;
        h->entries = e->next;
        pds_free(e);
    }
    pthread_mutex_destroy(&h->mu);
    pds_free(h);
}

pds_status_t kvx_loop_attach(pds_kvx_t *x)
{
    pds_kvx_hub_t *h = x->p.hub;
    hub_entry_t *e = pds_calloc(1, sizeof *e);
    if (!e) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx hub entry");
    pthread_mutex_lock(&h->mu);
    e->id = ++h->next_id;
    pthread_mutex_unlock(&h->mu);
    pds_status_t s = kvx_addr_build(x, &e->id, sizeof e->id);
    if (s != PDS_OK) {
        pds_free(e);
        return s;
    }
    e->x = x;
    x->loop_id = e->id;
    pthread_mutex_lock(&h->mu);
    e->next = h->entries;
    h->entries = e;
    pthread_mutex_unlock(&h->mu);
    return PDS_OK;
}

void kvx_loop_detach(pds_kvx_t *x)
{
    pds_kvx_hub_t *h = x->p.hub;
    pthread_mutex_lock(&h->mu);
    for (hub_entry_t **pp = &h->entries; *pp; pp = &(*pp)->next)
        if ((*pp)->x == x) {
            hub_entry_t *e = *pp;
            *pp = e->next;
            pds_free(e);
            break;
        }
    pthread_mutex_unlock(&h->mu);
}

/* hub->mu held. */
static pds_kvx_t *hub_find(pds_kvx_hub_t *h, uint64_t id)
{
    for (hub_entry_t *e = h->entries; e; e = e->next)
        if (e->id == id) return e->x;
    return NULL;
}

pds_status_t kvx_loop_open(pds_kvx_send_t *t, const void *addr, size_t addr_len)
{
    const void *payload;
    size_t n;
    PDS_TRY(kvx_addr_parse(addr, addr_len, PDS_KVX_LOOPBACK, &payload, &n));
    if (n != sizeof(uint64_t)) return PDS_ERR(PDS_ERR_PARSE, "loopback address of %zu bytes", n);
    memcpy(&t->loop_peer, payload, sizeof t->loop_peer);
    pds_kvx_hub_t *h = t->x->p.hub;
    pthread_mutex_lock(&h->mu);
    bool live = hub_find(h, t->loop_peer) != NULL;
    pthread_mutex_unlock(&h->mu);
    if (!live)
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "loopback peer %llu is not attached to this hub",
                       (unsigned long long)t->loop_peer);
    return PDS_OK;
}

/* Locks the hub and the receiver and finds t's recv there; on failure returns the status to give
 * the sender with the hub unlocked. */
static pds_status_t lock_peer(pds_kvx_send_t *t, pds_kvx_t **rx, pds_kvx_recv_t **r)
{
    pds_kvx_hub_t *h = t->x->p.hub;
    pthread_mutex_lock(&h->mu);
    *rx = hub_find(h, t->loop_peer);
    if (!*rx) {
        pthread_mutex_unlock(&h->mu);
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "loopback peer %llu vanished",
                       (unsigned long long)t->loop_peer);
    }
    pthread_mutex_lock(&(*rx)->mu);
    *r = kvx_recv_find(*rx, t->id);
    return PDS_OK;
}

static void unlock_peer(pds_kvx_send_t *t, pds_kvx_t *rx)
{
    kvx_deliver_notifies(rx);
    pthread_mutex_unlock(&rx->mu);
    pthread_mutex_unlock(&t->x->p.hub->mu);
}

static pds_status_t recv_gone(pds_kvx_send_t *t, pds_kvx_recv_t *r)
{
    if (!r)
        return PDS_ERR(PDS_ERR_CANCELLED, "receiver does not expect transfer %llu",
                       (unsigned long long)t->id);
    return PDS_ERR(r->status, "receiver: %s", r->detail);
}

pds_status_t kvx_loop_send_runs(pds_kvx_send_t *t, int layer, const uint8_t *src,
                                const int32_t *src_ids)
{
    if (t->status != PDS_OK) return t->status;
    pds_kvx_t *rx = NULL;
    pds_kvx_recv_t *r = NULL; /* initialised: gcc -O3 (Release) cannot see lock_peer sets it */
    pds_status_t s = lock_peer(t, &rx, &r);
    if (s != PDS_OK) return t->status = s;
    for (int i = 0; i < t->n_blocks && s == PDS_OK;) {
        int n = 1;
        while (i + n < t->n_blocks && src_ids[i + n] == src_ids[i] + n &&
               t->dst_ids[i + n] == t->dst_ids[i] + n)
            n++;
        kvx_wire_t h;
        kvx_wire_init(&h, KVX_MSG_DATA, t->id);
        h.layer = (uint32_t)layer;
        h.index = (uint32_t)i;
        h.dst_first = (uint32_t)t->dst_ids[i];
        h.n_blocks = (uint32_t)n;
        h.bytes = (uint64_t)(n * t->block_bytes);
        uint8_t *dst = r ? kvx_recv_accept_run(r, &h, h.bytes) : NULL;
        if (!dst) {
            s = recv_gone(t, r);
            break;
        }
        memcpy(dst, src + (int64_t)src_ids[i] * t->block_bytes, h.bytes);
        kvx_recv_landed(r, layer, i, n);
        t->bytes += (int64_t)h.bytes;
        t->msgs++;
        i += n;
    }
    unlock_peer(t, rx);
    if (s != PDS_OK) t->status = s;
    return s;
}

pds_status_t kvx_loop_commit(pds_kvx_send_t *t)
{
    if (t->status != PDS_OK) return t->status;
    pds_kvx_t *rx = NULL;
    pds_kvx_recv_t *r = NULL; /* initialised: gcc -O3 (Release) cannot see lock_peer sets it */
    pds_status_t s = lock_peer(t, &rx, &r);
    if (s != PDS_OK) return t->status = s;
    if (!r) {
        s = recv_gone(t, r);
    } else {
        kvx_wire_t h;
        kvx_wire_init(&h, KVX_MSG_DONE, t->id);
        h.n_layers = (uint32_t)t->n_layers;
        h.n_blocks = (uint32_t)t->n_blocks;
        h.bytes = (uint64_t)((int64_t)t->n_layers * t->n_blocks * t->block_bytes);
        h.flags = t->x->p.checksum ? KVX_FLAG_CHECKSUM : 0;
        size_t len = h.flags ? (size_t)t->n_layers * t->n_blocks * sizeof(uint64_t) : 0;
        kvx_recv_on_done(r, &h, t->sums, len);
        kvx_verify_queued(rx); /* drops rx->mu while hashing; r stays (verifying) */
        if (r->status == PDS_IN_PROGRESS)
            kvx_recv_finish(r, PDS_ERR_CORRUPT, "DONE before every block arrived");
        s = r->status == PDS_OK ? PDS_OK : recv_gone(t, r);
    }
    unlock_peer(t, rx);
    t->verdict = s;
    return s;
}

void kvx_loop_abort(pds_kvx_send_t *t)
{
    pds_kvx_t *rx = NULL;
    pds_kvx_recv_t *r = NULL;
    if (lock_peer(t, &rx, &r) != PDS_OK) return;
    if (r) kvx_recv_finish(r, PDS_ERR_CANCELLED, "sender aborted transfer");
    unlock_peer(t, rx);
}

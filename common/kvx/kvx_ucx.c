/* kvx_ucx.c: the UCX backend — one UCP context + worker per kvx, driven by one progress thread.
 *
 * Data path trade-off (the sender's params.path; the receiver handles both):
 *   AM:  each run of blocks is one active message (header = kvx_wire_t). Small runs arrive eagerly
 *        and are copied into place; large runs arrive as rendezvous and the receive lands them
 *        straight in the reserved blocks (ucp_am_recv_data_nbx: zero-copy get on shm/cma/rdma, a
 *        pipelined fetch on tcp). The receiver checks each run against the blocks it expects before
 *        any byte lands, so stale or stray data is refused (the sender's send fails instead). Works
 *        on every transport; costs a rendezvous round trip per large run.
 *   PUT: ucp_put_nbx into the pool the receiver registered (one rkey per layer in the pool blob),
 *        then ucp_ep_flush_nbx before DONE, so "done" is only sent once every put is complete at
 *        the target. One-sided, no receiver work on shm/cma/rdma (tcp emulates it with AM); but the
 *        receiver cannot refuse a put, so after a failed transfer its blocks must stay quarantined
 *        until the sender's endpoint is closed.
 * Either way DONE (eager AM with the checksums, sent after an endpoint flush) is answered by an ACK
 * carrying the receiver's verdict, so a sender learns CORRUPT / CANCELLED / TIMEOUT, and a peer
 * that vanished without a transport error (shared memory does not notice) still yields
 * PDS_ERR_TIMEOUT from commit instead of a hang. Endpoints use UCP_ERR_HANDLING_MODE_PEER: a dead
 * peer fails the endpoint and every transfer on it with PDS_ERR_UNAVAILABLE.
 *
 * Threads: every UCX call is made with x->mu held, including the progress thread's
 * ucp_worker_progress, so the worker is created UCS_THREAD_MODE_SERIALIZED and callbacks never
 * lock. The progress thread sleeps on the worker's event fd (ucp_worker_arm + poll, woken by
 * ucp_worker_signal when a caller starts work) with a short cap so deadlines are noticed; where
 * the transports offer no event fd it falls back to 50 us naps. Verification and notify callbacks
 * run on this thread with x->mu dropped.
 */
#include "kvx/kvx_internal.h"

#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <ucp/api/ucp.h>

#define MOD "kvx"

struct kvx_peer {
    kvx_peer_t *next;
    pds_kvx_t *x;
    void *addr; /* UCX worker address (blob payload) */
    size_t addr_len;
    ucp_ep_h ep; /* NULL once closed */
    bool failed;
    void *pool; /* the pool blob the rkeys were unpacked from */
    size_t pool_len;
    int n_layers;
    uint64_t *bases;   /* [n_layers] remote layer base addresses */
    ucp_rkey_h *rkeys; /* [n_layers] */
    int users;         /* open send handles */
};

struct kvx_ucx {
    ucp_context_h ctx;
    ucp_worker_h worker;
    int efd; /* -1: no wakeup support, nap instead */
    pthread_t thread;
    bool thread_started, stop;
    ucp_mem_h *memh; /* [n_layers] */
    int n_memh;
    kvx_peer_t *peers;
    void **closing; /* ep close requests still in progress */
    int n_closing, cap_closing;
    struct kvx_op *live; /* ops of requests in flight; what is left is freed at destroy */
};

/* Per-request context (UCX requests' user_data); owns the header until completion. */
enum { OP_DATA, OP_PUT, OP_FLUSH, OP_DONE, OP_ACK, OP_ABORT, OP_RECV };
typedef struct kvx_op {
    struct kvx_op *prev, *next; /* u->live while a UCX request holds it */
    int kind;
    pds_kvx_t *x;
    pds_kvx_send_t *t; /* sender ops that count in t->inflight */
    pds_kvx_recv_t *r; /* OP_RECV */
    int layer, index, n;
    int64_t bytes;
    kvx_wire_t hdr;
} kvx_op_t;

static pds_status_t ucs_to_pds(ucs_status_t s)
{
    switch (s) {
    case UCS_OK:
        return PDS_OK;
    case UCS_ERR_NO_MEMORY:
        return PDS_ERR_NO_MEMORY;
    case UCS_ERR_TIMED_OUT:
        return PDS_ERR_TIMEOUT;
    case UCS_ERR_CANCELED:
        return PDS_ERR_CANCELLED;
    case UCS_ERR_INVALID_PARAM:
        return PDS_ERR_INVALID_ARG;
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_IO_ERROR:
        return PDS_ERR_UNAVAILABLE;
    default:
        return PDS_ERR_TRANSPORT;
    }
}

#define UCX_ERR(st, call) ucx_err((st), (call), __FILE__, __LINE__)
static pds_status_t ucx_err(ucs_status_t st, const char *call, const char *file, int line)
{
    return pds_err_set(ucs_to_pds(st), file, line, "%s: %s", call, ucs_status_string(st));
}

static void send_cb(void *req, ucs_status_t st, void *user);

static void op_live(kvx_ucx_t *u, kvx_op_t *op)
{
    op->prev = NULL;
    op->next = u->live;
    if (u->live) u->live->prev = op;
    u->live = op;
}

/* A request finished: unlink and free its op. */
static void op_done(kvx_ucx_t *u, kvx_op_t *op)
{
    if (op->prev)
        op->prev->next = op->next;
    else
        u->live = op->next;
    if (op->next) op->next->prev = op->prev;
    pds_free(op);
}

/* ---- receiver: active message handlers (progress thread, x->mu held) ----------------------- */
static void send_ack(pds_kvx_t *x, ucp_ep_h ep, uint64_t id, pds_status_t verdict)
{
    kvx_op_t *op = pds_calloc(1, sizeof *op);
    if (!op) {
        PDS_LOG_ERROR(MOD, "ack_dropped transfer=%llu reason=\"out of memory\"",
                      (unsigned long long)id);
        return;
    }
    op->kind = OP_ACK;
    op->x = x;
    kvx_wire_init(&op->hdr, KVX_MSG_ACK, id);
    op->hdr.status = verdict;
    ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                                               UCP_OP_ATTR_FIELD_USER_DATA |
                                               UCP_OP_ATTR_FIELD_FLAGS,
                               .flags = UCP_AM_SEND_FLAG_EAGER,
                               .cb.send = send_cb,
                               .user_data = op};
    ucs_status_ptr_t req =
        ucp_am_send_nbx(ep, KVX_MSG_ACK, &op->hdr, sizeof op->hdr, NULL, 0, &prm);
    if (UCS_PTR_IS_ERR(req)) {
        PDS_LOG_WARN(MOD, "ack_failed transfer=%llu error=%s", (unsigned long long)id,
                     ucs_status_string(UCS_PTR_STATUS(req)));
        pds_free(op);
    } else if (req == NULL) {
        pds_free(op);
    } else {
        op_live(x->ucx, op);
    }
}

/* The reply endpoint is UCX's (created by wire-up when the sender connected); we only keep its
 * handle from DONE until the verdict is known, normally within the same progress pass. */
void kvx_ucx_recv_final(pds_kvx_recv_t *r)
{
    if (!r->done_received || r->acked || !r->reply_ep) return;
    r->acked = true;
    send_ack(r->x, (ucp_ep_h)r->reply_ep, r->id, r->status);
}

static void recv_cb(void *req, ucs_status_t st, size_t length, void *user)
{
    kvx_op_t *op = user;
    pds_kvx_recv_t *r = op->r;
    r->inflight--;
    if (st == UCS_OK)
        kvx_recv_landed(r, op->layer, op->index, op->n);
    else
        kvx_recv_finish(r, ucs_to_pds(st), "receiving layer %d block index %d failed: %s",
                        op->layer, op->index, ucs_status_string(st));
    pthread_cond_broadcast(&op->x->cv);
    op_done(op->x->ucx, op);
    ucp_request_free(req);
}

static ucs_status_t am_data(void *arg, const void *header, size_t header_length, void *data,
                            size_t length, const ucp_am_recv_param_t *param)
{
    pds_kvx_t *x = arg;
    bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    kvx_wire_t h;
    if (kvx_wire_check(header, header_length, KVX_MSG_DATA, &h) != PDS_OK) {
        PDS_LOG_WARN(MOD, "data_dropped reason=\"%s\"", pds_err_detail());
        return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    pds_kvx_recv_t *r = kvx_recv_find(x, h.transfer_id);
    if (!r || r->status != PDS_IN_PROGRESS) {
        PDS_LOG_DEBUG(MOD, "data_dropped transfer=%llu reason=\"%s\"",
                      (unsigned long long)h.transfer_id, r ? "transfer final" : "not expected");
        return rndv ? UCS_ERR_CANCELED : UCS_OK;
    }
    uint8_t *dst = kvx_recv_accept_run(r, &h, length);
    if (!dst) return rndv ? UCS_ERR_CANCELED : UCS_OK;
    if (!rndv) {
        memcpy(dst, data, length);
        kvx_recv_landed(r, (int)h.layer, (int)h.index, (int)h.n_blocks);
        return UCS_OK;
    }
    kvx_op_t *op = pds_calloc(1, sizeof *op);
    if (!op) {
        kvx_recv_finish(r, PDS_ERR_NO_MEMORY, "out of memory starting a receive");
        return UCS_ERR_NO_MEMORY;
    }
    op->kind = OP_RECV;
    op->x = x;
    op->r = r;
    op->layer = (int)h.layer;
    op->index = (int)h.index;
    op->n = (int)h.n_blocks;
    ucp_request_param_t prm = {.op_attr_mask =
                                   UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
                               .cb.recv_am = recv_cb,
                               .user_data = op};
    ucs_status_ptr_t req = ucp_am_recv_data_nbx(x->ucx->worker, data, dst, length, &prm);
    if (UCS_PTR_IS_ERR(req)) {
        kvx_recv_finish(r, ucs_to_pds(UCS_PTR_STATUS(req)), "ucp_am_recv_data_nbx: %s",
                        ucs_status_string(UCS_PTR_STATUS(req)));
        pds_free(op);
    } else if (req == NULL) {
        kvx_recv_landed(r, op->layer, op->index, op->n);
        pds_free(op);
    } else {
        r->inflight++;
        op_live(x->ucx, op);
    }
    return UCS_OK;
}

static ucs_status_t am_done(void *arg, const void *header, size_t header_length, void *data,
                            size_t length, const ucp_am_recv_param_t *param)
{
    pds_kvx_t *x = arg;
    kvx_wire_t h;
    if (kvx_wire_check(header, header_length, KVX_MSG_DONE, &h) != PDS_OK) {
        PDS_LOG_WARN(MOD, "done_dropped reason=\"%s\"", pds_err_detail());
        return UCS_OK;
    }
    ucp_ep_h reply = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : NULL;
    pds_kvx_recv_t *r = kvx_recv_find(x, h.transfer_id);
    if (!r) {
        if (reply) send_ack(x, reply, h.transfer_id, PDS_ERR_CANCELLED);
        return UCS_OK;
    }
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        /* DONE is always sent eager; a rendezvous one is malformed. */
        r->reply_ep = reply;
        r->done_received = true;
        kvx_recv_finish(r, PDS_ERR_CORRUPT, "DONE arrived as rendezvous");
        return UCS_ERR_INVALID_PARAM;
    }
    r->reply_ep = reply;
    kvx_recv_on_done(r, &h, data, length);
    if (r->status != PDS_IN_PROGRESS) kvx_ucx_recv_final(r);
    return UCS_OK;
}

static ucs_status_t am_ack(void *arg, const void *header, size_t header_length, void *data,
                           size_t length, const ucp_am_recv_param_t *param)
{
    pds_kvx_t *x = arg;
    kvx_wire_t h;
    if (kvx_wire_check(header, header_length, KVX_MSG_ACK, &h) != PDS_OK) {
        PDS_LOG_WARN(MOD, "ack_dropped reason=\"%s\"", pds_err_detail());
        return UCS_OK;
    }
    pds_kvx_send_t *t = kvx_send_find(x, h.transfer_id);
    if (t && t->committing && t->verdict == PDS_IN_PROGRESS) {
        t->verdict = h.status > 0 ? PDS_ERR_INTERNAL : (pds_status_t)h.status;
        pthread_cond_broadcast(&x->cv);
    }
    return UCS_OK;
}

static ucs_status_t am_abort(void *arg, const void *header, size_t header_length, void *data,
                             size_t length, const ucp_am_recv_param_t *param)
{
    pds_kvx_t *x = arg;
    kvx_wire_t h;
    if (kvx_wire_check(header, header_length, KVX_MSG_ABORT, &h) != PDS_OK) return UCS_OK;
    pds_kvx_recv_t *r = kvx_recv_find(x, h.transfer_id);
    if (r) kvx_recv_finish(r, PDS_ERR_CANCELLED, "sender aborted transfer");
    return UCS_OK;
}

/* ---- sender side ----------------------------------------------------------------------------- */
static void send_cb(void *req, ucs_status_t st, void *user)
{
    kvx_op_t *op = user;
    pds_kvx_send_t *t = op->t;
    if (t) {
        t->inflight--;
        if (st != UCS_OK && t->status == PDS_OK) {
            t->status = ucs_to_pds(st);
            PDS_LOG_WARN(MOD, "send_failed transfer=%llu op=%d error=%s", (unsigned long long)t->id,
                         op->kind, ucs_status_string(st));
        }
    }
    pthread_cond_broadcast(&op->x->cv);
    op_done(op->x->ucx, op);
    if (req) ucp_request_free(req);
}

/* Finishes a just-started request: immediate completion, error, or in flight. */
static pds_status_t track(kvx_op_t *op, ucs_status_ptr_t req, const char *call)
{
    if (req == NULL) {
        pds_free(op);
        return PDS_OK;
    }
    if (UCS_PTR_IS_ERR(req)) {
        pds_status_t s = UCX_ERR(UCS_PTR_STATUS(req), call);
        pds_free(op);
        return s;
    }
    if (op->t) op->t->inflight++;
    op_live(op->x->ucx, op);
    return PDS_OK;
}

static ucp_request_param_t send_param(kvx_op_t *op, uint32_t flags)
{
    return (ucp_request_param_t){.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                                                 UCP_OP_ATTR_FIELD_USER_DATA |
                                                 (flags ? UCP_OP_ATTR_FIELD_FLAGS : 0),
                                 .flags = flags,
                                 .cb.send = send_cb,
                                 .user_data = op};
}

static void peer_drop_rkeys(kvx_peer_t *p)
{
    for (int l = 0; l < p->n_layers; l++)
        if (p->rkeys && p->rkeys[l]) ucp_rkey_destroy(p->rkeys[l]);
    pds_free(p->rkeys);
    pds_free(p->bases);
    pds_free(p->pool);
    p->rkeys = NULL;
    p->bases = NULL;
    p->pool = NULL;
    p->pool_len = 0;
    p->n_layers = 0;
}

/* Force-closes a peer's endpoint (outstanding requests complete with an error). */
static void peer_close_ep(kvx_ucx_t *u, kvx_peer_t *p)
{
    peer_drop_rkeys(p);
    if (!p->ep) return;
    ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                               .flags = UCP_EP_CLOSE_FLAG_FORCE};
    ucs_status_ptr_t req = ucp_ep_close_nbx(p->ep, &prm);
    p->ep = NULL;
    if (req && !UCS_PTR_IS_ERR(req)) {
        if (u->n_closing == u->cap_closing) {
            int cap = u->cap_closing ? 2 * u->cap_closing : 8;
            void **c = pds_realloc(u->closing, (size_t)cap * sizeof *c);
            if (!c) {
                /* Cannot track it: progress it to completion here. */
                while (ucp_request_check_status(req) == UCS_INPROGRESS)
                    ucp_worker_progress(u->worker);
                ucp_request_free(req);
                return;
            }
            u->closing = c;
            u->cap_closing = cap;
        }
        u->closing[u->n_closing++] = req;
    }
}

static void reap_closing(kvx_ucx_t *u)
{
    for (int i = 0; i < u->n_closing;) {
        if (ucp_request_check_status(u->closing[i]) != UCS_INPROGRESS) {
            ucp_request_free(u->closing[i]);
            u->closing[i] = u->closing[--u->n_closing];
        } else {
            i++;
        }
    }
}

static void peer_fail(pds_kvx_t *x, kvx_peer_t *p, pds_status_t s, const char *why)
{
    if (!p->failed)
        PDS_LOG_WARN(MOD, "peer_failed status=%s reason=\"%s\"", pds_status_name(s), why);
    p->failed = true;
    for (pds_kvx_send_t *t = x->sends; t; t = t->next)
        if (t->peer == p && t->status == PDS_OK) t->status = s;
    pthread_cond_broadcast(&x->cv);
}

static void ep_error(void *arg, ucp_ep_h ep, ucs_status_t st)
{
    kvx_peer_t *p = arg;
    peer_fail(p->x, p, PDS_ERR_UNAVAILABLE, ucs_status_string(st));
}

static void peer_free(kvx_peer_t *p)
{
    pds_free(p->addr);
    pds_free(p);
}

/* Closes and frees failed peers nobody uses any more. */
static void reap_peers(pds_kvx_t *x)
{
    kvx_ucx_t *u = x->ucx;
    for (kvx_peer_t **pp = &u->peers; *pp;) {
        kvx_peer_t *p = *pp;
        if (p->failed && p->users == 0) {
            *pp = p->next;
            peer_close_ep(u, p);
            peer_free(p);
        } else {
            pp = &p->next;
        }
    }
}

static pds_status_t peer_get(pds_kvx_t *x, const void *addr, size_t n, kvx_peer_t **out)
{
    kvx_ucx_t *u = x->ucx;
    reap_peers(x);
    for (kvx_peer_t *p = u->peers; p; p = p->next)
        if (!p->failed && p->addr_len == n && memcmp(p->addr, addr, n) == 0) {
            *out = p;
            return PDS_OK;
        }
    kvx_peer_t *p = pds_calloc(1, sizeof *p);
    if (!p) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx peer");
    p->addr = pds_malloc(n);
    if (!p->addr) {
        pds_free(p);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx peer address");
    }
    memcpy(p->addr, addr, n);
    p->addr_len = n;
    p->x = x;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .address = p->addr,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = {.cb = ep_error, .arg = p},
    };
    ucs_status_t st = ucp_ep_create(u->worker, &ep, &p->ep);
    if (st == UCS_ERR_UNREACHABLE) {
        /* UCX 1.13's shared-memory transports (posix, sysv) cannot detect a dead peer, so they
         * refuse UCP_ERR_HANDLING_MODE_PEER. Use them without it: a vanished peer then shows as
         * a missing ACK (PDS_ERR_TIMEOUT from commit) instead of an endpoint error. */
        ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
        ep.field_mask &= ~(uint64_t)UCP_EP_PARAM_FIELD_ERR_HANDLER;
        st = ucp_ep_create(u->worker, &ep, &p->ep);
        if (st == UCS_OK) PDS_LOG_DEBUG(MOD, "endpoint without peer failure detection");
    }
    if (st != UCS_OK) {
        peer_free(p);
        /* A malformed or unreachable address: either way the peer cannot be reached. */
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "ucp_ep_create: %s", ucs_status_string(st));
    }
    p->next = u->peers;
    u->peers = p;
    *out = p;
    return PDS_OK;
}

static pds_status_t peer_rkeys(kvx_peer_t *p, const void *pool, size_t len)
{
    if (p->pool && p->pool_len == len && memcmp(p->pool, pool, len) == 0) return PDS_OK;
    peer_drop_rkeys(p);
    kvx_pool_hdr_t h;
    PDS_TRY(kvx_pool_parse(pool, len, &h));
    int L = h.n_layers;
    const void **rk = pds_calloc((size_t)L, sizeof *rk);
    uint32_t *rl = pds_calloc((size_t)L, sizeof *rl);
    p->bases = pds_calloc((size_t)L, sizeof *p->bases);
    p->rkeys = pds_calloc((size_t)L, sizeof *p->rkeys);
    p->pool = pds_malloc(len);
    pds_status_t s = PDS_OK;
    if (!rk || !rl || !p->bases || !p->rkeys || !p->pool) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "kvx remote keys for %d layers", L);
        goto out;
    }
    p->n_layers = L;
    s = kvx_pool_entries(pool, len, &h, p->bases, rk, rl);
    for (int l = 0; l < L && s == PDS_OK; l++) {
        if (rl[l] == 0) {
            s = PDS_ERR(PDS_ERR_PARSE, "pool blob has no remote key for layer %d", l);
            break;
        }
        ucs_status_t st = ucp_ep_rkey_unpack(p->ep, rk[l], &p->rkeys[l]);
        if (st != UCS_OK) s = UCX_ERR(st, "ucp_ep_rkey_unpack");
    }
    if (s == PDS_OK) {
        memcpy(p->pool, pool, len);
        p->pool_len = len;
    }
out:
    if (s != PDS_OK) peer_drop_rkeys(p);
    pds_free(rk);
    pds_free(rl);
    return s;
}

pds_status_t kvx_ucx_open(pds_kvx_send_t *t, const void *addr, size_t addr_len, const void *pool,
                          size_t pool_len)
{
    pds_kvx_t *x = t->x;
    const void *payload;
    size_t n;
    PDS_TRY(kvx_addr_parse(addr, addr_len, PDS_KVX_UCX, &payload, &n));
    if (n == 0) return PDS_ERR(PDS_ERR_PARSE, "empty UCX worker address");
    kvx_peer_t *p = NULL;
    PDS_TRY(peer_get(x, payload, n, &p));
    if (x->p.path == PDS_KVX_PATH_PUT) PDS_TRY(peer_rkeys(p, pool, pool_len));
    t->peer = p;
    p->users++;
    return PDS_OK;
}

pds_status_t kvx_ucx_send_run(pds_kvx_send_t *t, int layer, int index, const uint8_t *src, int n)
{
    pds_kvx_t *x = t->x;
    kvx_peer_t *p = t->peer;
    if (p->failed || !p->ep) return PDS_ERR(PDS_ERR_UNAVAILABLE, "peer endpoint failed");
    kvx_op_t *op = pds_calloc(1, sizeof *op);
    if (!op) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx send op");
    op->x = x;
    op->t = t;
    op->layer = layer;
    op->index = index;
    op->n = n;
    int64_t bytes = n * t->block_bytes;
    int32_t dst_first = t->dst_ids[index];
    ucs_status_ptr_t req;
    pds_status_t s;
    if (x->p.path == PDS_KVX_PATH_PUT) {
        op->kind = OP_PUT;
        ucp_request_param_t prm = send_param(op, 0);
        req = ucp_put_nbx(p->ep, src, (size_t)bytes,
                          p->bases[layer] + (uint64_t)dst_first * (uint64_t)t->block_bytes,
                          p->rkeys[layer], &prm);
        s = track(op, req, "ucp_put_nbx");
    } else {
        op->kind = OP_DATA;
        kvx_wire_init(&op->hdr, KVX_MSG_DATA, t->id);
        op->hdr.layer = (uint32_t)layer;
        op->hdr.index = (uint32_t)index;
        op->hdr.dst_first = (uint32_t)dst_first;
        op->hdr.n_blocks = (uint32_t)n;
        op->hdr.bytes = (uint64_t)bytes;
        ucp_request_param_t prm = send_param(op, 0);
        req = ucp_am_send_nbx(p->ep, KVX_MSG_DATA, &op->hdr, sizeof op->hdr, src, (size_t)bytes,
                              &prm);
        s = track(op, req, "ucp_am_send_nbx");
    }
    if (s == PDS_OK) {
        t->bytes += bytes;
        t->msgs++;
    }
    return s;
}

/* Waits (x->mu held) until t has nothing in flight, failed, or the deadline passed. */
static pds_status_t wait_quiet(pds_kvx_send_t *t, int64_t deadline_ns, const char *what)
{
    pds_kvx_t *x = t->x;
    while (t->inflight > 0 && t->status == PDS_OK) {
        if (pds_time_now_ns() >= deadline_ns)
            return PDS_ERR(PDS_ERR_TIMEOUT, "transfer %llu: %s did not complete in time",
                           (unsigned long long)t->id, what);
        kvx_cv_wait_until(x, PDS_MIN(deadline_ns, pds_time_now_ns() + 50000000LL));
    }
    if (t->status != PDS_OK)
        return PDS_ERR(t->status, "transfer %llu failed during %s", (unsigned long long)t->id,
                       what);
    return PDS_OK;
}

pds_status_t kvx_ucx_commit(pds_kvx_send_t *t, int64_t deadline_ns)
{
    pds_kvx_t *x = t->x;
    kvx_peer_t *p = t->peer;
    PDS_TRY(wait_quiet(t, deadline_ns, "sending data"));
    if (p->failed || !p->ep) return PDS_ERR(PDS_ERR_UNAVAILABLE, "peer endpoint failed");
    /* Flush: every put / message before it is complete at the target before DONE goes out. */
    kvx_op_t *op = pds_calloc(1, sizeof *op);
    if (!op) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx flush op");
    op->kind = OP_FLUSH;
    op->x = x;
    op->t = t;
    ucp_request_param_t prm = send_param(op, 0);
    PDS_TRY(track(op, ucp_ep_flush_nbx(p->ep, &prm), "ucp_ep_flush_nbx"));
    kvx_ucx_wake(x);
    PDS_TRY(wait_quiet(t, deadline_ns, "flushing"));
    if (p->failed || !p->ep) return PDS_ERR(PDS_ERR_UNAVAILABLE, "peer endpoint failed");

    op = pds_calloc(1, sizeof *op);
    if (!op) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx done op");
    op->kind = OP_DONE;
    op->x = x;
    op->t = t;
    kvx_wire_init(&op->hdr, KVX_MSG_DONE, t->id);
    op->hdr.n_layers = (uint32_t)t->n_layers;
    op->hdr.n_blocks = (uint32_t)t->n_blocks;
    op->hdr.bytes = (uint64_t)((int64_t)t->n_layers * t->n_blocks * t->block_bytes);
    op->hdr.flags = (x->p.checksum ? KVX_FLAG_CHECKSUM : 0u) |
                    (x->p.path == PDS_KVX_PATH_PUT ? KVX_FLAG_PUT : 0u);
    size_t len = x->p.checksum ? (size_t)t->n_layers * t->n_blocks * sizeof(uint64_t) : 0;
    prm = send_param(op, UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_REPLY);
    PDS_TRY(track(op,
                  ucp_am_send_nbx(p->ep, KVX_MSG_DONE, &op->hdr, sizeof op->hdr,
                                  len ? t->sums : NULL, len, &prm),
                  "ucp_am_send_nbx(done)"));
    kvx_ucx_wake(x);
    while (t->verdict == PDS_IN_PROGRESS && t->status == PDS_OK) {
        if (pds_time_now_ns() >= deadline_ns)
            return PDS_ERR(PDS_ERR_TIMEOUT, "transfer %llu: no verdict from the receiver in time",
                           (unsigned long long)t->id);
        kvx_cv_wait_until(x, PDS_MIN(deadline_ns, pds_time_now_ns() + 50000000LL));
    }
    if (t->verdict == PDS_IN_PROGRESS)
        return PDS_ERR(t->status, "transfer %llu failed waiting for the receiver",
                       (unsigned long long)t->id);
    if (t->verdict != PDS_OK)
        return PDS_ERR(t->verdict, "receiver refused transfer %llu: %s", (unsigned long long)t->id,
                       pds_status_text(t->verdict));
    return PDS_OK;
}

void kvx_ucx_send_close(pds_kvx_send_t *t)
{
    pds_kvx_t *x = t->x;
    kvx_peer_t *p = t->peer;
    if (!p) return;
    if (!t->committed_ok && !p->failed && p->ep) {
        kvx_op_t *op = pds_calloc(1, sizeof *op);
        if (op) {
            op->kind = OP_ABORT;
            op->x = x;
            op->t = t;
            kvx_wire_init(&op->hdr, KVX_MSG_ABORT, t->id);
            ucp_request_param_t prm = send_param(op, UCP_AM_SEND_FLAG_EAGER);
            (void)track(
                op, ucp_am_send_nbx(p->ep, KVX_MSG_ABORT, &op->hdr, sizeof op->hdr, NULL, 0, &prm),
                "ucp_am_send_nbx(abort)");
            kvx_ucx_wake(x);
        }
    }
    /* A healthy peer finishes what is in flight (and takes the ABORT) quickly; give it a short
     * grace period before cutting the endpoint. */
    int64_t grace = pds_time_now_ns() + 1000000000LL;
    while (t->inflight > 0 && !p->failed && pds_time_now_ns() < grace)
        kvx_cv_wait_until(x, PDS_MIN(grace, pds_time_now_ns() + 10000000LL));
    if (t->inflight > 0) {
        /* Requests still reading the source: cancel them by closing the endpoint, so that no
         * transport touches the caller's memory after close returns. */
        peer_fail(x, p, PDS_ERR_CANCELLED, "send handle closed with requests in flight");
        peer_close_ep(x->ucx, p);
        kvx_ucx_wake(x);
        int64_t until = pds_time_now_ns() + 200000000LL;
        while (t->inflight > 0 && pds_time_now_ns() < until)
            kvx_cv_wait_until(x, pds_time_now_ns() + 10000000LL);
        if (t->inflight > 0) {
            /* Only on endpoints without peer failure detection (shared memory) whose peer is
             * gone: nobody is left to read the source. The handle stays on x->sends (closed) and
             * is freed with the kvx. */
            PDS_LOG_WARN(MOD, "close_parked transfer=%llu inflight=%d", (unsigned long long)t->id,
                         t->inflight);
            return;
        }
    }
    p->users--;
    t->peer = NULL;
    reap_peers(x);
}

void kvx_ucx_wake(pds_kvx_t *x)
{
    if (x->ucx && x->ucx->efd >= 0) ucp_worker_signal(x->ucx->worker);
}

/* ---- progress thread ------------------------------------------------------------------------- */
static void *progress_main(void *arg)
{
    pds_kvx_t *x = arg;
    kvx_ucx_t *u = x->ucx;
    pthread_mutex_lock(&x->mu);
    while (!u->stop) {
        unsigned n = 0;
        for (int i = 0; i < 64; i++) {
            unsigned k = ucp_worker_progress(u->worker);
            n += k;
            if (!k) break;
        }
        if (u->n_closing) reap_closing(u);
        if (x->n_verify_queued) kvx_verify_queued(x);
        int64_t next = kvx_check_deadlines(x, pds_time_now_ns());
        kvx_deliver_notifies(x);
        if (n) {
            /* Let API callers in between bursts. */
            pthread_mutex_unlock(&x->mu);
            sched_yield();
            pthread_mutex_lock(&x->mu);
            continue;
        }
        if (u->efd >= 0) {
            ucs_status_t st = ucp_worker_arm(u->worker);
            if (st == UCS_ERR_BUSY) continue;
            int ms = (int)PDS_MIN((int64_t)5, next / 1000000 + 1);
            pthread_mutex_unlock(&x->mu);
            struct pollfd pfd = {.fd = u->efd, .events = POLLIN};
            (void)poll(&pfd, 1, st == UCS_OK ? ms : 0);
            pthread_mutex_lock(&x->mu);
        } else {
            pthread_mutex_unlock(&x->mu);
            pds_time_sleep_ms(0.05);
            pthread_mutex_lock(&x->mu);
        }
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

void pds_kvx_transport_version(char *buf, size_t cap)
{
    if (buf && cap) snprintf(buf, cap, "ucx %s", ucp_get_version_string());
}

/* ---- lifecycle ------------------------------------------------------------------------------- */
static const struct {
    int id;
    ucp_am_recv_callback_t cb;
} am_handlers[] = {
    {KVX_MSG_DATA, am_data},
    {KVX_MSG_DONE, am_done},
    {KVX_MSG_ACK, am_ack},
    {KVX_MSG_ABORT, am_abort},
};

pds_status_t kvx_ucx_create(pds_kvx_t *x)
{
    pds_status_t s;
    kvx_ucx_t *u = pds_calloc(1, sizeof *u);
    if (!u) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx ucx state");
    u->efd = -1;
    x->ucx = u;

    ucp_config_t *cfg;
    ucs_status_t st = ucp_config_read(NULL, NULL, &cfg);
    if (st != UCS_OK) {
        s = UCX_ERR(st, "ucp_config_read");
        goto undo_alloc;
    }
    ucp_params_t prm = {.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED,
                        .features = UCP_FEATURE_AM | UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP,
                        .mt_workers_shared = 0};
    st = ucp_init(&prm, cfg, &u->ctx);
    if (st != UCS_OK) { /* retry without wakeup: the progress thread naps instead */
        prm.features &= ~(uint64_t)UCP_FEATURE_WAKEUP;
        st = ucp_init(&prm, cfg, &u->ctx);
    }
    ucp_config_release(cfg);
    if (st != UCS_OK) {
        s = UCX_ERR(st, "ucp_init");
        goto undo_alloc;
    }
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SERIALIZED};
    st = ucp_worker_create(u->ctx, &wp, &u->worker);
    if (st != UCS_OK) {
        s = UCX_ERR(st, "ucp_worker_create");
        goto undo_init;
    }
    if (prm.features & UCP_FEATURE_WAKEUP) {
        if (ucp_worker_get_efd(u->worker, &u->efd) != UCS_OK) u->efd = -1;
    }
    for (size_t i = 0; i < PDS_ARRAY_LEN(am_handlers); i++) {
        ucp_am_handler_param_t hp = {
            .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                          UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG,
            .id = (unsigned)am_handlers[i].id,
            .flags = UCP_AM_FLAG_WHOLE_MSG,
            .cb = am_handlers[i].cb,
            .arg = x,
        };
        st = ucp_worker_set_am_recv_handler(u->worker, &hp);
        if (st != UCS_OK) {
            s = UCX_ERR(st, "ucp_worker_set_am_recv_handler");
            goto undo_worker;
        }
    }
    ucp_address_t *wa;
    size_t wa_len;
    st = ucp_worker_get_address(u->worker, &wa, &wa_len);
    if (st != UCS_OK) {
        s = UCX_ERR(st, "ucp_worker_get_address");
        goto undo_worker;
    }
    s = kvx_addr_build(x, wa, wa_len);
    ucp_worker_release_address(u->worker, wa);
    if (s != PDS_OK) goto undo_worker;
    if (pthread_create(&u->thread, NULL, progress_main, x) != 0) {
        s = PDS_ERR(PDS_ERR_INTERNAL, "cannot start the kvx progress thread");
        goto undo_addr;
    }
    u->thread_started = true;
    PDS_LOG_DEBUG(MOD, "created backend=ucx address_bytes=%zu wakeup=%s", wa_len,
                  u->efd >= 0 ? "efd" : "nap");
    return PDS_OK;

undo_addr:
    pds_free(x->addr);
    x->addr = NULL;
undo_worker:
    ucp_worker_destroy(u->worker);
undo_init:
    ucp_cleanup(u->ctx);
undo_alloc:
    pds_free(u);
    x->ucx = NULL;
    return s;
}

pds_status_t kvx_ucx_register(pds_kvx_t *x)
{
    kvx_ucx_t *u = x->ucx;
    int L = x->layout.n_layers;
    size_t layer_bytes = (size_t)pds_kv_layer_bytes(&x->layout);
    pds_status_t s = PDS_OK;
    void **packed = pds_calloc((size_t)L, sizeof *packed);
    size_t *packed_len = pds_calloc((size_t)L, sizeof *packed_len);
    u->memh = pds_calloc((size_t)L, sizeof *u->memh);
    if (!packed || !packed_len || !u->memh) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "kvx registration of %d layers", L);
        goto out;
    }
    for (int l = 0; l < L && s == PDS_OK; l++) {
        ucp_mem_map_params_t mp = {
            .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
            .address = x->pool_base[l],
            .length = layer_bytes,
        };
        ucs_status_t st = ucp_mem_map(u->ctx, &mp, &u->memh[l]);
        if (st != UCS_OK) {
            s = UCX_ERR(st, "ucp_mem_map");
            break;
        }
        u->n_memh = l + 1;
        st = ucp_rkey_pack(u->ctx, u->memh[l], &packed[l], &packed_len[l]);
        if (st != UCS_OK) s = UCX_ERR(st, "ucp_rkey_pack");
    }
    if (s == PDS_OK) s = kvx_pool_blob_build(x, (const void *const *)packed, packed_len);
out:
    for (int l = 0; packed && l < L; l++)
        if (packed[l]) ucp_rkey_buffer_release(packed[l]);
    pds_free(packed);
    pds_free(packed_len);
    if (s != PDS_OK && u->memh) {
        for (int l = 0; l < u->n_memh; l++) ucp_mem_unmap(u->ctx, u->memh[l]);
        pds_free(u->memh);
        u->memh = NULL;
        u->n_memh = 0;
    }
    return s;
}

/* Progresses the worker (single-threaded, after the progress thread stopped) until req completes
 * or the time runs out; frees it. */
static void drive(kvx_ucx_t *u, ucs_status_ptr_t req, int64_t ms)
{
    if (req == NULL || UCS_PTR_IS_ERR(req)) return;
    int64_t until = pds_time_now_ns() + ms * 1000000;
    while (ucp_request_check_status(req) == UCS_INPROGRESS && pds_time_now_ns() < until)
        ucp_worker_progress(u->worker);
    if (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_request_cancel(u->worker, req);
    ucp_request_free(req);
}

void kvx_ucx_destroy(pds_kvx_t *x)
{
    kvx_ucx_t *u = x->ucx;
    if (!u) return;
    if (u->thread_started) {
        pthread_mutex_lock(&x->mu);
        u->stop = true;
        kvx_ucx_wake(x);
        pthread_mutex_unlock(&x->mu);
        pthread_join(u->thread, NULL);
    }
    /* Single-threaded from here. Deliver what we owe (ACKs) before closing, bounded. */
    ucp_request_param_t none = {.op_attr_mask = 0};
    drive(u, ucp_worker_flush_nbx(u->worker, &none), 1000);
    while (u->peers) {
        kvx_peer_t *p = u->peers;
        u->peers = p->next;
        peer_close_ep(u, p);
        peer_free(p);
    }
    int64_t until = pds_time_now_ns() + 1000000000LL;
    while (u->n_closing && pds_time_now_ns() < until) {
        ucp_worker_progress(u->worker);
        reap_closing(u);
    }
    for (int i = 0; i < u->n_closing; i++) ucp_request_free(u->closing[i]);
    pds_free(u->closing);
    for (int l = 0; l < u->n_memh; l++) ucp_mem_unmap(u->ctx, u->memh[l]);
    pds_free(u->memh);
    ucp_worker_destroy(u->worker);
    ucp_cleanup(u->ctx);
    while (u->live) op_done(u, u->live); /* requests UCX never completed */
    pds_free(u);
    x->ucx = NULL;
}

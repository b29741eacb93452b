/* kvx_nccl.c: the NCCL backend — a prefill GPU's KV blocks straight into the blocks a decode GPU
 * reserved, over one 2-rank communicator per prefill/decode pair (rank 0 receives, rank 1 sends).
 *
 * Set-up: the receiver makes the pair's unique id (ncclGetUniqueId) the first time it hands a pool
 * blob to a sender (pds_kvx_pool_blob_for, from OpenTransfer) and starts its rank; the sender
 * starts its rank when send_open sees a key it has no communicator for. Both initialise
 * non-blocking (config.blocking = 0): the progress thread polls ncclCommGetAsyncError until the
 * communicator is up, and aborts it (ncclCommAbort) at the deadline or on any error. A failed
 * communicator fails what uses it with PDS_ERR_UNAVAILABLE; the next pool blob for that peer
 * carries a fresh id (epoch + 1).
 *
 * Data: NCCL point-to-point calls match in issue order, but a prefill node's compute order need
 * not be the order the decode node expected its transfers in. So every group starts with a fixed
 * 4 KiB header (kvx_nhdr_t: transfer id, layer, up to 336 runs), for which the receiver always has
 * one receive posted. When it lands, the progress thread checks the runs against the blocks the
 * transfer reserved (the same kvx_recv_accept_run as UCX) and posts one receive per run straight
 * into them — or into a scratch sink for a transfer it no longer expects, since the sender's data
 * must be consumed either way — then the next header receive. A sender's group is that header
 * plus one ncclSend per run of consecutive source and destination ids. A DONE header carries the
 * sizes, followed by the checksums (computed on the GPU, pds_kvx_checksum's function, by the
 * staging thread after the layer's ready()). The receiver verifies with the same kernel.
 *
 * Ordering against compute: the staging thread (kvx_stage.c) waits ready(layer) — the engine's
 * per-layer event, through pds_engine_layer_wait — before the layer's sends are enqueued on the
 * pair's stream, so NCCL never reads a block the forward is still writing.
 *
 * Trade-offs: one header round trip per layer on the receiver (a 4 KiB device -> host copy and a
 * few µs of host work) in exchange for order independence and a check before any byte lands; the
 * link is one-way, so commit returns when DONE left this GPU and the receiver's verdict comes back
 * through the control plane (CommitTransfer answers DATA_LOSS on a checksum mismatch). Nothing
 * calls cudaFree while a communicator may have a receive pending (it could wait for that kernel):
 * scratch comes from the stream-ordered allocator.
 *
 * Threads: NCCL and CUDA calls on a communicator happen under x->mu (the progress thread polls,
 * the staging thread enqueues sends, callers open and close), so a communicator is never used by
 * two threads at once.
 */
#include "kvx/kvx_internal.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MOD         "kvx"
#define NSLOT       256 /* sender header slots per communicator */
#define RECV_PEER   0   /* rank of the receiving side */
#define SEND_PEER   1
#define ABORT_GRACE 1000000000LL /* a final transfer's receives get 1 s before the pair is cut */

_Static_assert(sizeof(ncclUniqueId) == KVX_NCCL_ID_BYTES, "unique id size");

static pds_status_t nccl_to_pds(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess:
        return PDS_OK;
    case ncclInProgress:
        return PDS_IN_PROGRESS;
    case ncclUnhandledCudaError:
        return PDS_ERR_DEVICE;
    case ncclInvalidArgument:
    case ncclInvalidUsage:
        return PDS_ERR_INVALID_ARG;
    case ncclSystemError:
    case ncclRemoteError:
        return PDS_ERR_UNAVAILABLE;
    default:
        return PDS_ERR_TRANSPORT;
    }
}

#define NC_ERR(r, call) \
    pds_err_set(nccl_to_pds(r), __FILE__, __LINE__, "%s: %s", call, ncclGetErrorString(r))
#define CU_ERR(e, call) \
    pds_err_set(PDS_ERR_DEVICE, __FILE__, __LINE__, "%s: %s", call, cudaGetErrorString(e))

enum { COMM_INIT = 0, COMM_READY, COMM_FAILED };
enum { NOP_DATA = 0, NOP_SUMS };

/* A receive-side group in flight on the pair's stream (in stream order). */
typedef struct nop {
    struct nop *next;
    cudaEvent_t ev;
    int kind;
    pds_kvx_recv_t *r; /* NULL: sunk */
    int accepted;      /* DATA: runs [0, accepted) land in r's blocks */
    int64_t t_post_ns;
    void *sums_dev; /* NOP_SUMS: (units) checksums, freed stream-ordered */
    kvx_nhdr_t hdr;
} nop_t;

struct kvx_ncomm {
    kvx_ncomm_t *next;
    pds_kvx_t *x;
    uint64_t peer; /* peer instance */
    bool receiver;
    kvx_nkey_t key;
    ncclComm_t comm;
    cudaStream_t stream;
    int state;
    bool aborted;
    int64_t init_deadline_ns;
    char why[200];
    int users;  /* send handles (sender side) */
    void *blob; /* receiver: the pool blob carrying this key */
    size_t blob_len;
    /* receiver */
    uint8_t *hdr_dev; /* one header */
    kvx_nhdr_t *hdr_host;
    cudaEvent_t hdr_ev;
    bool hdr_posted;
    nop_t *ops, *ops_tail;
    void *sink;
    size_t sink_cap;
    /* sender */
    uint8_t *slot_dev;     /* (NSLOT, 4096) headers on the device */
    kvx_nhdr_t *slot_host; /* (NSLOT) pinned */
    cudaEvent_t slot_ev[NSLOT];
    pds_kvx_send_t *slot_owner[NSLOT]; /* counts in owner->inflight until the event passes */
    int next_slot;
    uint64_t *done_pin; /* DONE checksums: pinned staging and device copy (done_cap entries) */
    void *done_dev;
    int64_t done_cap;
};

struct kvx_nccl {
    uint64_t instance;
    int device;
    pthread_t thread;
    bool started, stop;
    kvx_ncomm_t *comms;
    uint64_t epoch;
    void **retired; /* pinned host buffers of dead pairs, freed at destroy (cudaFreeHost may wait
                       for the device, where other pairs' receives can be pending) */
    int n_retired, cap_retired;
};

static void retire_pinned(kvx_nccl_t *n, void *p)
{
    if (!p) return;
    if (n->n_retired == n->cap_retired) {
        int cap = n->cap_retired ? 2 * n->cap_retired : 16;
        void **r = pds_realloc(n->retired, (size_t)cap * sizeof *r);
        if (!r) return; /* leaked until exit rather than risk a device-wide wait */
        n->retired = r;
        n->cap_retired = cap;
    }
    n->retired[n->n_retired++] = p;
}

bool pds_kvx_has_nccl(void)
{
    return true;
}

/* After a call on a non-blocking communicator returned ncclInProgress: wait until it is done. */
static ncclResult_t nc_settle(kvx_ncomm_t *c, ncclResult_t r)
{
    int64_t until = pds_time_now_ns() + 10000000000LL;
    while (r == ncclInProgress && pds_time_now_ns() < until) {
        ncclResult_t st = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(c->comm, &st);
        r = q != ncclSuccess ? q : st;
    }
    return r;
}

/* ---- communicator life cycle (x->mu held) ---------------------------------------------------- */
/* Device scratch is stream-ordered (cudaMallocAsync / cudaFreeAsync on the pair's stream), pinned
 * host buffers are retired: nothing here can wait on another pair's pending receive. */
static void comm_release_buffers(kvx_ncomm_t *c)
{
    kvx_nccl_t *n = c->x->nccl;
    while (c->ops) {
        nop_t *op = c->ops;
        c->ops = op->next;
        cudaEventDestroy(op->ev);
        if (op->sums_dev) cudaFreeAsync(op->sums_dev, c->stream);
        pds_free(op);
    }
    c->ops_tail = NULL;
    if (c->stream) {
        if (c->hdr_dev) cudaFreeAsync(c->hdr_dev, c->stream);
        if (c->sink) cudaFreeAsync(c->sink, c->stream);
        if (c->slot_dev) cudaFreeAsync(c->slot_dev, c->stream);
        if (c->done_dev) cudaFreeAsync(c->done_dev, c->stream);
    }
    retire_pinned(n, c->hdr_host);
    retire_pinned(n, c->slot_host);
    retire_pinned(n, c->done_pin);
    if (c->hdr_ev) cudaEventDestroy(c->hdr_ev);
    for (int i = 0; i < NSLOT; i++)
        if (c->slot_ev[i]) cudaEventDestroy(c->slot_ev[i]);
    if (c->stream) cudaStreamDestroy(c->stream);
    c->hdr_dev = c->slot_dev = NULL;
    c->sink = c->done_dev = NULL;
    c->hdr_host = c->slot_host = NULL;
    c->done_pin = NULL;
    c->hdr_ev = NULL;
    memset(c->slot_ev, 0, sizeof c->slot_ev);
    c->stream = NULL;
}

/* Fails the pair: aborts the communicator (kills its kernels, so no late write or read), fails
 * every transfer with work on it. */
static void comm_fail(pds_kvx_t *x, kvx_ncomm_t *c, pds_status_t s, const char *why)
{
    if (c->state == COMM_FAILED) return;
    PDS_LOG_WARN(MOD, "nccl_pair_failed peer=%016llx role=%s status=%s reason=\"%s\"",
                 (unsigned long long)c->peer, c->receiver ? "receiver" : "sender",
                 pds_status_name(s), why);
    snprintf(c->why, sizeof c->why, "%s", why);
    c->state = COMM_FAILED;
    if (c->comm && !c->aborted) ncclCommAbort(c->comm);
    c->aborted = true;
    for (nop_t *op = c->ops; op; op = op->next)
        if (op->r) {
            op->r->inflight--;
            kvx_recv_finish(op->r, PDS_ERR_UNAVAILABLE, "NCCL pair failed: %s", c->why);
            op->r = NULL;
        }
    for (int i = 0; i < NSLOT; i++)
        if (c->slot_owner[i]) {
            c->slot_owner[i]->inflight--;
            c->slot_owner[i] = NULL;
        }
    for (pds_kvx_send_t *t = x->sends; t; t = t->next)
        if (t->comm == c && t->status == PDS_OK) t->status = PDS_ERR_UNAVAILABLE;
    comm_release_buffers(c);
    pthread_cond_broadcast(&x->cv);
}

static void comm_free(kvx_ncomm_t *c)
{
    if (c->comm && !c->aborted) ncclCommAbort(c->comm);
    comm_release_buffers(c);
    pds_free(c->blob);
    pds_free(c);
}

/* Frees failed communicators nobody holds. */
static void comms_reap(pds_kvx_t *x)
{
    for (kvx_ncomm_t **pp = &x->nccl->comms; *pp;) {
        kvx_ncomm_t *c = *pp;
        if (c->state == COMM_FAILED && c->users == 0) {
            *pp = c->next;
            comm_free(c);
        } else {
            pp = &c->next;
        }
    }
}

static pds_status_t comm_start(pds_kvx_t *x, kvx_ncomm_t *c)
{
    cudaError_t e = cudaSetDevice(x->nccl->device);
    if (e != cudaSuccess) return CU_ERR(e, "cudaSetDevice");
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess)
        return CU_ERR(e, "cudaStreamCreateWithFlags");
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclUniqueId id;
    memcpy(&id, c->key.id, sizeof id);
    ncclResult_t r =
        ncclCommInitRankConfig(&c->comm, 2, id, c->receiver ? RECV_PEER : SEND_PEER, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        pds_status_t s = NC_ERR(r, "ncclCommInitRankConfig");
        if (c->comm) ncclCommAbort(c->comm);
        c->aborted = true;
        return s;
    }
    c->state = COMM_INIT;
    c->init_deadline_ns = pds_time_now_ns() + x->p.init_timeout_ms * 1000000LL;
    PDS_LOG_INFO(MOD, "nccl_pair_init peer=%016llx role=%s epoch=%llu device=%d",
                 (unsigned long long)c->peer, c->receiver ? "receiver" : "sender",
                 (unsigned long long)c->key.epoch, x->nccl->device);
    return PDS_OK;
}

/* The communicator came up: the buffers its side needs. */
static pds_status_t comm_ready(pds_kvx_t *x, kvx_ncomm_t *c)
{
    cudaError_t e;
    if (c->receiver) {
        if ((e = cudaMallocAsync((void **)&c->hdr_dev, KVX_NCCL_HDR_BYTES, c->stream)) !=
                cudaSuccess ||
            (e = cudaHostAlloc((void **)&c->hdr_host, KVX_NCCL_HDR_BYTES, 0)) != cudaSuccess ||
            (e = cudaEventCreateWithFlags(&c->hdr_ev, cudaEventDisableTiming)) != cudaSuccess)
            return CU_ERR(e, "receiver header buffers");
    } else {
        if ((e = cudaMallocAsync((void **)&c->slot_dev, (size_t)NSLOT * KVX_NCCL_HDR_BYTES,
                                 c->stream)) != cudaSuccess ||
            (e = cudaHostAlloc((void **)&c->slot_host, (size_t)NSLOT * KVX_NCCL_HDR_BYTES, 0)) !=
                cudaSuccess)
            return CU_ERR(e, "sender header slots");
        for (int i = 0; i < NSLOT; i++)
            if ((e = cudaEventCreateWithFlags(&c->slot_ev[i], cudaEventDisableTiming)) !=
                cudaSuccess)
                return CU_ERR(e, "cudaEventCreate");
    }
    c->state = COMM_READY;
    PDS_LOG_INFO(MOD, "nccl_pair_ready peer=%016llx role=%s", (unsigned long long)c->peer,
                 c->receiver ? "receiver" : "sender");
    pthread_cond_broadcast(&x->cv);
    return PDS_OK;
}

/* ---- receiver (progress thread, x->mu held) -------------------------------------------------- */
static pds_status_t post_header(kvx_ncomm_t *c)
{
    ncclResult_t r = nc_settle(
        c, ncclRecv(c->hdr_dev, KVX_NCCL_HDR_BYTES, ncclUint8, SEND_PEER, c->comm, c->stream));
    if (r != ncclSuccess) return NC_ERR(r, "ncclRecv(header)");
    cudaError_t e = cudaEventRecord(c->hdr_ev, c->stream);
    if (e != cudaSuccess) return CU_ERR(e, "cudaEventRecord");
    c->hdr_posted = true;
    return PDS_OK;
}

static pds_status_t sink_reserve(kvx_ncomm_t *c, size_t bytes)
{
    if (bytes <= c->sink_cap) return PDS_OK;
    /* Stream-ordered: the old sink is freed after the receives already writing into it. */
    if (c->sink) cudaFreeAsync(c->sink, c->stream);
    c->sink = NULL;
    c->sink_cap = 0;
    cudaError_t e = cudaMallocAsync(&c->sink, bytes, c->stream);
    if (e != cudaSuccess) return CU_ERR(e, "cudaMallocAsync(sink)");
    c->sink_cap = bytes;
    return PDS_OK;
}

static void op_append(kvx_ncomm_t *c, nop_t *op)
{
    op->next = NULL;
    if (c->ops_tail)
        c->ops_tail->next = op;
    else
        c->ops = op;
    c->ops_tail = op;
}

/* The data announced by a DATA header: receives into the reserved blocks or the sink. */
static pds_status_t on_data(pds_kvx_t *x, kvx_ncomm_t *c, const kvx_nhdr_t *h)
{
    pds_kvx_recv_t *r = kvx_recv_find(x, h->w.transfer_id);
    nop_t *op = pds_calloc(1, sizeof *op);
    if (!op) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx nccl op");
    op->kind = NOP_DATA;
    op->hdr = *h;
    uint8_t *dst[KVX_NCCL_MAX_RUNS];
    size_t biggest = 0;
    for (uint32_t i = 0; i < h->n_runs; i++) {
        const kvx_nrun_t *run = &h->runs[i];
        size_t bytes = (size_t)run->n * (size_t)x->block_bytes;
        dst[i] = NULL;
        if (r && r->status == PDS_IN_PROGRESS && op->accepted == (int)i) {
            kvx_wire_t w = h->w;
            w.index = run->index;
            w.dst_first = run->dst_first;
            w.n_blocks = run->n;
            w.bytes = bytes;
            dst[i] = kvx_recv_accept_run(r, &w, bytes);
            if (dst[i]) op->accepted++;
        }
        if (!dst[i] && bytes > biggest) biggest = bytes;
    }
    pds_status_t s = biggest ? sink_reserve(c, biggest) : PDS_OK;
    if (s != PDS_OK) {
        pds_free(op);
        return s;
    }
    ncclResult_t nr = ncclGroupStart();
    for (uint32_t i = 0; i < h->n_runs && nr == ncclSuccess; i++)
        nr = ncclRecv(dst[i] ? (void *)dst[i] : c->sink,
                      (size_t)h->runs[i].n * (size_t)x->block_bytes, ncclUint8, SEND_PEER, c->comm,
                      c->stream);
    ncclResult_t ne = ncclGroupEnd();
    nr = nc_settle(c, nr != ncclSuccess ? nr : ne);
    cudaError_t e = cudaSuccess;
    if (nr == ncclSuccess) e = cudaEventCreateWithFlags(&op->ev, cudaEventDisableTiming);
    if (nr == ncclSuccess && e == cudaSuccess) e = cudaEventRecord(op->ev, c->stream);
    if (nr != ncclSuccess || e != cudaSuccess) {
        s = nr != ncclSuccess ? NC_ERR(nr, "ncclRecv(data)") : CU_ERR(e, "cudaEventRecord");
        if (op->ev) cudaEventDestroy(op->ev);
        pds_free(op);
        return s;
    }
    if (op->accepted > 0) {
        op->r = r;
        r->inflight++;
    }
    op->t_post_ns = pds_time_now_ns();
    op_append(c, op);
    return PDS_OK;
}

/* DONE: the checksums follow as one message of n_layers * n_blocks words. */
static pds_status_t on_done(pds_kvx_t *x, kvx_ncomm_t *c, const kvx_nhdr_t *h)
{
    pds_kvx_recv_t *r = kvx_recv_find(x, h->w.transfer_id);
    uint64_t units = (uint64_t)h->w.n_layers * h->w.n_blocks;
    if (!(h->w.flags & KVX_FLAG_CHECKSUM)) {
        if (r) kvx_recv_on_done(r, &h->w, NULL, 0);
        return PDS_OK;
    }
    if (units == 0 || units > (1u << 26))
        return PDS_ERR(PDS_ERR_CORRUPT, "NCCL DONE announces %llu checksums",
                       (unsigned long long)units);
    nop_t *op = pds_calloc(1, sizeof *op);
    if (!op) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx nccl op");
    op->kind = NOP_SUMS;
    op->hdr = *h;
    cudaError_t e = cudaMallocAsync(&op->sums_dev, units * 8, c->stream);
    if (e != cudaSuccess) {
        pds_free(op);
        return CU_ERR(e, "cudaMallocAsync(checksums)");
    }
    ncclResult_t nr =
        nc_settle(c, ncclRecv(op->sums_dev, units * 8, ncclUint8, SEND_PEER, c->comm, c->stream));
    if (nr == ncclSuccess) e = cudaEventCreateWithFlags(&op->ev, cudaEventDisableTiming);
    if (nr == ncclSuccess && e == cudaSuccess) e = cudaEventRecord(op->ev, c->stream);
    if (nr != ncclSuccess || e != cudaSuccess) {
        pds_status_t s =
            nr != ncclSuccess ? NC_ERR(nr, "ncclRecv(checksums)") : CU_ERR(e, "cudaEventRecord");
        cudaFreeAsync(op->sums_dev, c->stream);
        if (op->ev) cudaEventDestroy(op->ev);
        pds_free(op);
        return s;
    }
    if (r) {
        op->r = r;
        r->inflight++;
    }
    op->t_post_ns = pds_time_now_ns();
    op_append(c, op);
    return PDS_OK;
}

/* A receive group completed: account its runs, or hand DONE's checksums to the state machine. */
static pds_status_t op_complete(pds_kvx_t *x, kvx_ncomm_t *c, nop_t *op)
{
    pds_kvx_recv_t *r = op->r;
    pds_status_t s = PDS_OK;
    if (r) r->inflight--;
    if (op->kind == NOP_DATA) {
        for (int i = 0; r && i < op->accepted && r->status == PDS_IN_PROGRESS; i++)
            kvx_recv_landed(r, (int)op->hdr.w.layer, (int)op->hdr.runs[i].index,
                            (int)op->hdr.runs[i].n);
    } else {
        size_t len = (size_t)op->hdr.w.n_layers * op->hdr.w.n_blocks * 8;
        uint64_t *sums = r ? pds_malloc(len) : NULL;
        /* Not on the pair's stream: the next header receive is queued there behind the sums. */
        if (sums)
            s = x->rx_gpu ? kvx_gpu_copy(x->rx_gpu, sums, op->sums_dev, len)
                          : PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "no device pool registered");
        cudaFreeAsync(op->sums_dev, c->stream);
        op->sums_dev = NULL;
        if (r && !sums)
            kvx_recv_finish(r, PDS_ERR_NO_MEMORY, "no memory for %zu checksum bytes", len);
        else if (r && s != PDS_OK)
            kvx_recv_finish(r, s, "copying checksums: %s", pds_err_detail());
        else if (r)
            kvx_recv_on_done(r, &op->hdr.w, sums, len);
        pds_free(sums);
    }
    pthread_cond_broadcast(&x->cv);
    cudaEventDestroy(op->ev);
    pds_free(op);
    return PDS_OK;
}

static void rx_progress(pds_kvx_t *x, kvx_ncomm_t *c)
{
    pds_status_t s = PDS_OK;
    int64_t now = pds_time_now_ns();
    while (c->ops) {
        nop_t *op = c->ops;
        cudaError_t e = cudaEventQuery(op->ev);
        if (e == cudaErrorNotReady) {
            /* A transfer that is final (failed, closed) but whose data never comes: cut the pair,
             * or its blocks could never be re-used. */
            if (op->r && op->r->status != PDS_IN_PROGRESS && now - op->t_post_ns > ABORT_GRACE) {
                comm_fail(x, c, PDS_ERR_TIMEOUT, "data of a finished transfer never arrived");
                return;
            }
            break;
        }
        c->ops = op->next;
        if (!c->ops) c->ops_tail = NULL;
        if (e != cudaSuccess) {
            op->next = c->ops; /* let comm_fail account for it */
            c->ops = op;
            if (!c->ops_tail) c->ops_tail = op;
            comm_fail(x, c, PDS_ERR_DEVICE, cudaGetErrorString(e));
            return;
        }
        op_complete(x, c, op);
    }
    if (!c->hdr_posted) {
        if ((s = post_header(c)) != PDS_OK) {
            comm_fail(x, c, s, pds_err_detail());
            return;
        }
    }
    cudaError_t e = cudaEventQuery(c->hdr_ev);
    if (e == cudaErrorNotReady) return;
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(c->hdr_host, c->hdr_dev, KVX_NCCL_HDR_BYTES, cudaMemcpyDeviceToHost,
                            c->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        comm_fail(x, c, PDS_ERR_DEVICE, cudaGetErrorString(e));
        return;
    }
    c->hdr_posted = false;
    kvx_nhdr_t *h = pds_malloc(sizeof *h);
    if (!h) {
        comm_fail(x, c, PDS_ERR_NO_MEMORY, "header copy");
        return;
    }
    s = kvx_nccl_hdr_check(c->hdr_host, sizeof *h, x->block_bytes, x->layout.n_layers, h);
    if (s == PDS_OK) {
        if (h->w.kind == KVX_MSG_DATA)
            s = on_data(x, c, h);
        else if (h->w.kind == KVX_MSG_DONE)
            s = on_done(x, c, h);
        else {
            pds_kvx_recv_t *r = kvx_recv_find(x, h->w.transfer_id);
            if (r) kvx_recv_finish(r, PDS_ERR_CANCELLED, "sender aborted transfer");
        }
    }
    pds_free(h);
    /* A header we cannot follow leaves the stream unframed: nothing after it can be trusted. */
    if (s != PDS_OK) comm_fail(x, c, s, pds_err_detail());
}

/* ---- sender ------------------------------------------------------------------------------------
 */
static void tx_progress(pds_kvx_t *x, kvx_ncomm_t *c)
{
    for (int i = 0; i < NSLOT; i++) {
        if (!c->slot_owner[i]) continue;
        cudaError_t e = cudaEventQuery(c->slot_ev[i]);
        if (e == cudaErrorNotReady) continue;
        if (e != cudaSuccess) {
            comm_fail(x, c, PDS_ERR_DEVICE, cudaGetErrorString(e));
            return;
        }
        c->slot_owner[i]->inflight--;
        c->slot_owner[i] = NULL;
        pthread_cond_broadcast(&x->cv);
    }
}

/* Waits (x->mu held) until the communicator is up; PDS_OK or why not. */
static pds_status_t comm_wait_ready(pds_kvx_t *x, kvx_ncomm_t *c)
{
    while (c->state == COMM_INIT) kvx_cv_wait_until(x, pds_time_now_ns() + 20000000LL);
    if (c->state != COMM_READY)
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "NCCL pair with the receiver failed: %s", c->why);
    return PDS_OK;
}

/* A free header slot (its previous group passed), or PDS_ERR_TIMEOUT. */
static pds_status_t slot_take(pds_kvx_t *x, kvx_ncomm_t *c, int *out)
{
    int64_t until = pds_time_now_ns() + x->p.init_timeout_ms * 1000000LL;
    for (;;) {
        if (c->state != COMM_READY)
            return PDS_ERR(PDS_ERR_UNAVAILABLE, "NCCL pair failed: %s", c->why);
        for (int k = 0; k < NSLOT; k++) {
            int i = (c->next_slot + k) % NSLOT;
            if (!c->slot_owner[i]) {
                c->next_slot = (i + 1) % NSLOT;
                *out = i;
                return PDS_OK;
            }
        }
        if (pds_time_now_ns() >= until)
            return PDS_ERR(PDS_ERR_TIMEOUT, "no NCCL header slot free: the receiver stopped "
                                            "receiving");
        kvx_cv_wait_until(x, pds_time_now_ns() + 5000000LL);
    }
}

/* Enqueues one header (already in slot_host[slot]) and its payload messages as one group. */
static pds_status_t send_group(pds_kvx_t *x, kvx_ncomm_t *c, pds_kvx_send_t *t, int slot,
                               int n_msgs, void *const *bufs, const size_t *lens)
{
    uint8_t *hd = c->slot_dev + (size_t)slot * KVX_NCCL_HDR_BYTES;
    cudaError_t e = cudaMemcpyAsync(hd, &c->slot_host[slot], KVX_NCCL_HDR_BYTES,
                                    cudaMemcpyHostToDevice, c->stream);
    if (e != cudaSuccess) return CU_ERR(e, "cudaMemcpyAsync(header)");
    ncclResult_t r = ncclGroupStart();
    if (r == ncclSuccess)
        r = ncclSend(hd, KVX_NCCL_HDR_BYTES, ncclUint8, RECV_PEER, c->comm, c->stream);
    for (int i = 0; i < n_msgs && r == ncclSuccess; i++)
        r = ncclSend(bufs[i], lens[i], ncclUint8, RECV_PEER, c->comm, c->stream);
    ncclResult_t re = ncclGroupEnd();
    r = nc_settle(c, r != ncclSuccess ? r : re);
    if (r != ncclSuccess) return NC_ERR(r, "ncclSend");
    if ((e = cudaEventRecord(c->slot_ev[slot], c->stream)) != cudaSuccess)
        return CU_ERR(e, "cudaEventRecord");
    c->slot_owner[slot] = t;
    t->inflight++;
    return PDS_OK;
}

pds_status_t kvx_nccl_send_layer(pds_kvx_send_t *t, int layer, const uint8_t *dev_base,
                                 const int32_t *src_ids)
{
    pds_kvx_t *x = t->x;
    kvx_ncomm_t *c = t->comm;
    PDS_TRY(comm_wait_ready(x, c));
    kvx_nrun_t *runs = pds_malloc((size_t)t->n_blocks * sizeof *runs);
    void **bufs = pds_malloc(KVX_NCCL_MAX_RUNS * sizeof *bufs);
    size_t *lens = pds_malloc(KVX_NCCL_MAX_RUNS * sizeof *lens);
    pds_status_t s = PDS_OK;
    if (!runs || !bufs || !lens) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "runs of %d blocks", t->n_blocks);
        goto out;
    }
    int n_runs = kvx_nccl_runs(t->n_blocks, src_ids, t->dst_ids, runs);
    for (int first = 0; first < n_runs && s == PDS_OK;) {
        int k = PDS_MIN(n_runs - first, (int)KVX_NCCL_MAX_RUNS);
        int slot;
        if ((s = slot_take(x, c, &slot)) != PDS_OK) break;
        kvx_nhdr_t *h = &c->slot_host[slot];
        memset(h, 0, sizeof *h);
        kvx_wire_init(&h->w, KVX_MSG_DATA, t->id);
        h->w.layer = (uint32_t)layer;
        h->n_runs = (uint32_t)k;
        uint64_t blocks = 0;
        for (int i = 0; i < k; i++) {
            const kvx_nrun_t *run = &runs[first + i];
            h->runs[i] = *run;
            blocks += run->n;
            bufs[i] = (void *)(dev_base + (int64_t)src_ids[run->index] * t->block_bytes);
            lens[i] = (size_t)run->n * (size_t)t->block_bytes;
        }
        h->w.n_blocks = (uint32_t)blocks;
        h->w.bytes = blocks * (uint64_t)t->block_bytes;
        s = send_group(x, c, t, slot, k, bufs, lens);
        if (s == PDS_OK) {
            t->bytes += (int64_t)h->w.bytes;
            t->msgs += k;
        }
        first += k;
    }
out:
    pds_free(runs);
    pds_free(bufs);
    pds_free(lens);
    return s;
}

/* Waits until t has nothing in flight (x->mu held). */
static pds_status_t wait_idle(pds_kvx_send_t *t, int64_t deadline_ns, const char *what)
{
    pds_kvx_t *x = t->x;
    while (t->inflight > 0 && t->status == PDS_OK) {
        if (pds_time_now_ns() >= deadline_ns)
            return PDS_ERR(PDS_ERR_TIMEOUT, "transfer %llu: %s not done at the deadline",
                           (unsigned long long)t->id, what);
        kvx_cv_wait_until(x, PDS_MIN(deadline_ns, pds_time_now_ns() + 20000000LL));
    }
    if (t->status != PDS_OK)
        return PDS_ERR(t->status, "transfer %llu failed during %s", (unsigned long long)t->id,
                       what);
    return PDS_OK;
}

pds_status_t kvx_nccl_commit(pds_kvx_send_t *t, int64_t deadline_ns)
{
    pds_kvx_t *x = t->x;
    kvx_ncomm_t *c = t->comm;
    PDS_TRY(comm_wait_ready(x, c));
    /* The previous DONE's checksum buffers are free once nothing of ours is in flight. */
    pds_status_t s = wait_idle(t, deadline_ns, "sending data");
    if (s != PDS_OK) goto fail;
    int64_t units = (int64_t)t->n_layers * t->n_blocks;
    bool sums = x->p.checksum;
    int n_msgs = 0;
    void *buf = NULL;
    size_t len = (size_t)units * 8;
    if (sums) {
        /* One DONE in flight per pair at a time: its buffers are the pair's. */
        for (pds_kvx_send_t *o = x->sends; o; o = o->next)
            while (o != t && o->comm == c && o->committing && o->inflight > 0 &&
                   c->state == COMM_READY && pds_time_now_ns() < deadline_ns)
                kvx_cv_wait_until(x, pds_time_now_ns() + 5000000LL);
        if (units > c->done_cap) {
            cudaError_t e = cudaSuccess;
            if (c->done_dev) cudaFreeAsync(c->done_dev, c->stream);
            retire_pinned(x->nccl, c->done_pin);
            c->done_dev = NULL;
            c->done_pin = NULL;
            c->done_cap = 0;
            e = cudaHostAlloc((void **)&c->done_pin, len, 0);
            if (e == cudaSuccess) e = cudaMallocAsync(&c->done_dev, len, c->stream);
            if (e != cudaSuccess) {
                s = CU_ERR(e, "DONE checksum buffers");
                goto fail;
            }
            c->done_cap = units;
        }
        memcpy(c->done_pin, t->sums, len);
        cudaError_t e =
            cudaMemcpyAsync(c->done_dev, c->done_pin, len, cudaMemcpyHostToDevice, c->stream);
        if (e != cudaSuccess) {
            s = CU_ERR(e, "cudaMemcpyAsync(checksums)");
            goto fail;
        }
        buf = c->done_dev;
        n_msgs = 1;
    }
    int slot;
    if ((s = slot_take(x, c, &slot)) != PDS_OK) goto fail;
    kvx_nhdr_t *h = &c->slot_host[slot];
    memset(h, 0, sizeof *h);
    kvx_wire_init(&h->w, KVX_MSG_DONE, t->id);
    h->w.n_layers = (uint32_t)t->n_layers;
    h->w.n_blocks = (uint32_t)t->n_blocks;
    h->w.bytes = (uint64_t)units * (uint64_t)t->block_bytes;
    h->w.flags = sums ? KVX_FLAG_CHECKSUM : 0u;
    if ((s = send_group(x, c, t, slot, n_msgs, &buf, &len)) != PDS_OK) goto fail;
    if ((s = wait_idle(t, deadline_ns, "sending DONE")) != PDS_OK) goto fail;
    return PDS_OK;
fail:
    /* Sends stuck on the stream would hold the pair forever: cut it. */
    if (s == PDS_ERR_TIMEOUT) comm_fail(x, c, s, "commit timed out");
    return s;
}

void kvx_nccl_send_close(pds_kvx_send_t *t)
{
    pds_kvx_t *x = t->x;
    kvx_ncomm_t *c = t->comm;
    if (!c) return;
    if (!t->committed_ok && c->state == COMM_READY) {
        int slot;
        if (slot_take(x, c, &slot) == PDS_OK) {
            kvx_nhdr_t *h = &c->slot_host[slot];
            memset(h, 0, sizeof *h);
            kvx_wire_init(&h->w, KVX_MSG_ABORT, t->id);
            (void)send_group(x, c, t, slot, 0, NULL, NULL);
        }
    }
    int64_t grace = pds_time_now_ns() + ABORT_GRACE;
    while (t->inflight > 0 && c->state == COMM_READY && pds_time_now_ns() < grace)
        kvx_cv_wait_until(x, pds_time_now_ns() + 10000000LL);
    /* Still reading the source: abort the pair so nothing reads it after close returns. */
    if (t->inflight > 0) comm_fail(x, c, PDS_ERR_CANCELLED, "send closed with data in flight");
    c->users--;
    t->comm = NULL;
    comms_reap(x);
}

pds_status_t kvx_nccl_open(pds_kvx_send_t *t, const void *addr, size_t addr_len, const void *pool,
                           size_t pool_len)
{
    pds_kvx_t *x = t->x;
    kvx_nccl_t *n = x->nccl;
    kvx_naddr_t peer;
    kvx_pool_hdr_t ph;
    kvx_nkey_t key;
    PDS_TRY(kvx_nccl_addr_parse(addr, addr_len, &peer));
    PDS_TRY(kvx_nccl_pool_key(pool, pool_len, &ph, &key));
    if (key.sender != n->instance || key.receiver != peer.instance)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "NCCL pool blob was made for the pair %016llx -> %016llx, not %016llx -> "
                       "%016llx",
                       (unsigned long long)key.sender, (unsigned long long)key.receiver,
                       (unsigned long long)n->instance, (unsigned long long)peer.instance);
    comms_reap(x);
    kvx_ncomm_t *c = NULL;
    for (kvx_ncomm_t *o = n->comms; o; o = o->next) {
        if (o->receiver || o->peer != peer.instance) continue;
        if (memcmp(&o->key, &key, sizeof key) == 0 && o->state != COMM_FAILED) c = o;
        /* The receiver re-keyed the pair: the old communicator is dead to it. */
        else if (o->state != COMM_FAILED && o->key.epoch < key.epoch)
            comm_fail(x, o, PDS_ERR_UNAVAILABLE, "the receiver re-created the pair");
    }
    if (!c) {
        c = pds_calloc(1, sizeof *c);
        if (!c) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx nccl pair");
        c->x = x;
        c->peer = peer.instance;
        c->key = key;
        pds_status_t s = comm_start(x, c);
        if (s != PDS_OK) {
            c->state = COMM_FAILED;
            comm_free(c);
            return PDS_ERR(s == PDS_ERR_INVALID_ARG ? PDS_ERR_UNAVAILABLE : s,
                           "NCCL pair with %s pid %d device %d: %s", peer.host, peer.pid,
                           peer.device, pds_err_detail());
        }
        c->next = n->comms;
        n->comms = c;
    }
    c->users++;
    t->comm = c;
    return PDS_OK;
}

pds_status_t kvx_nccl_pool_blob_for(pds_kvx_t *x, const kvx_naddr_t *peer, const void **blob,
                                    size_t *len)
{
    kvx_nccl_t *n = x->nccl;
    comms_reap(x);
    for (kvx_ncomm_t *c = n->comms; c; c = c->next)
        if (c->receiver && c->peer == peer->instance && c->state != COMM_FAILED) {
            *blob = c->blob;
            *len = c->blob_len;
            return PDS_OK;
        }
    kvx_ncomm_t *c = pds_calloc(1, sizeof *c);
    if (!c) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx nccl pair");
    c->x = x;
    c->peer = peer->instance;
    c->receiver = true;
    c->key.receiver = n->instance;
    c->key.sender = peer->instance;
    c->key.epoch = ++n->epoch;
    pds_status_t s = PDS_OK;
    ncclUniqueId id;
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
        s = NC_ERR(r, "ncclGetUniqueId");
        goto fail;
    }
    memcpy(c->key.id, &id, sizeof id);
    int L = x->layout.n_layers;
    const void **rk = pds_calloc((size_t)L, sizeof *rk);
    size_t *rl = pds_calloc((size_t)L, sizeof *rl);
    if (!rk || !rl) {
        pds_free(rk);
        pds_free(rl);
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "pool blob");
        goto fail;
    }
    rk[0] = &c->key;
    rl[0] = sizeof c->key;
    s = kvx_pool_blob_make(x, rk, rl, &c->blob, &c->blob_len);
    pds_free(rk);
    pds_free(rl);
    if (s != PDS_OK) goto fail;
    if ((s = comm_start(x, c)) != PDS_OK) goto fail;
    c->next = n->comms;
    n->comms = c;
    *blob = c->blob;
    *len = c->blob_len;
    return PDS_OK;
fail:
    c->state = COMM_FAILED;
    comm_free(c);
    return s;
}

void kvx_nccl_wake(pds_kvx_t *x)
{
    (void)x; /* the progress thread polls every 50 µs while anything is in flight */
}

/* ---- progress thread ---------------------------------------------------------------------------
 */
static void *progress_main(void *arg)
{
    pds_kvx_t *x = arg;
    kvx_nccl_t *n = x->nccl;
    cudaSetDevice(n->device);
    pthread_mutex_lock(&x->mu);
    while (!n->stop) {
        bool busy = false;
        for (kvx_ncomm_t *c = n->comms; c; c = c->next) {
            if (c->state == COMM_INIT) {
                busy = true;
                ncclResult_t st = ncclSuccess;
                ncclResult_t q = ncclCommGetAsyncError(c->comm, &st);
                if (q != ncclSuccess) st = q;
                if (st == ncclSuccess) {
                    pds_status_t s = comm_ready(x, c);
                    if (s != PDS_OK) comm_fail(x, c, s, pds_err_detail());
                } else if (st != ncclInProgress) {
                    char why[200];
                    snprintf(why, sizeof why, "communicator set-up failed: %s",
                             ncclGetErrorString(st));
                    comm_fail(x, c, nccl_to_pds(st), why);
                } else if (pds_time_now_ns() >= c->init_deadline_ns) {
                    char why[200];
                    snprintf(why, sizeof why, "communicator not up within %lld ms",
                             (long long)x->p.init_timeout_ms);
                    comm_fail(x, c, PDS_ERR_TIMEOUT, why);
                }
                continue;
            }
            if (c->state != COMM_READY) continue;
            ncclResult_t st = ncclSuccess;
            ncclResult_t q = ncclCommGetAsyncError(c->comm, &st);
            if (q != ncclSuccess) st = q;
            if (st != ncclSuccess && st != ncclInProgress) {
                comm_fail(x, c, nccl_to_pds(st), ncclGetErrorString(st));
                continue;
            }
            if (c->receiver) {
                rx_progress(x, c);
                busy |= c->ops != NULL;
            } else {
                tx_progress(x, c);
                busy |= c->users > 0;
            }
        }
        if (x->n_verify_queued) kvx_verify_queued(x);
        kvx_check_deadlines(x, pds_time_now_ns());
        kvx_deliver_notifies(x);
        busy |= x->recvs != NULL;
        pthread_mutex_unlock(&x->mu);
        usleep(busy ? 50 : 1000);
        pthread_mutex_lock(&x->mu);
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

pds_status_t kvx_nccl_create(pds_kvx_t *x)
{
    if (kvx_gpu_check_device(x->p.device) != PDS_OK)
        return PDS_ERR(PDS_ERR_DEVICE, "the NCCL backend needs a GPU: %s", pds_err_detail());
    kvx_nccl_t *n = pds_calloc(1, sizeof *n);
    if (!n) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx nccl state");
    n->device = x->p.device;
    n->instance = pds_mix64((uint64_t)pds_time_now_ns() ^ ((uint64_t)getpid() << 32) ^
                            (uint64_t)(uintptr_t)x) |
                  1;
    kvx_naddr_t a = {.instance = n->instance, .device = n->device, .pid = (int32_t)getpid()};
    gethostname(a.host, sizeof a.host - 1);
    x->nccl = n;
    pds_status_t s = kvx_addr_build(x, &a, sizeof a);
    if (s != PDS_OK) goto undo;
    if (pthread_create(&n->thread, NULL, progress_main, x) != 0) {
        s = PDS_ERR(PDS_ERR_INTERNAL, "cannot start the kvx nccl progress thread");
        pds_free(x->addr);
        x->addr = NULL;
        goto undo;
    }
    n->started = true;
    return PDS_OK;
undo:
    pds_free(n);
    x->nccl = NULL;
    return s;
}

void kvx_nccl_destroy(pds_kvx_t *x)
{
    kvx_nccl_t *n = x->nccl;
    if (!n) return;
    if (n->started) {
        pthread_mutex_lock(&x->mu);
        n->stop = true;
        pthread_mutex_unlock(&x->mu);
        pthread_join(n->thread, NULL);
    }
    pthread_mutex_lock(&x->mu);
    for (kvx_ncomm_t *c = n->comms; c; c = c->next)
        comm_fail(x, c, PDS_ERR_CANCELLED, "kvx destroyed");
    while (n->comms) {
        kvx_ncomm_t *c = n->comms;
        n->comms = c->next;
        comm_free(c);
    }
    pthread_mutex_unlock(&x->mu);
    for (int i = 0; i < n->n_retired; i++) cudaFreeHost(n->retired[i]);
    pds_free(n->retired);
    pds_free(n);
    x->nccl = NULL;
}

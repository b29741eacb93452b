/* kvx internals shared by the core (kvx.c: receiver state machine, checksums, blobs, stats) and the
 * backends (kvx_ucx.c, kvx_loop.c). Not a public header.
 *
 * Locking: one mutex per kvx (x->mu) guards all of its state and, for UCX, every UCX call on its
 * worker (the worker runs in serialized mode). UCX callbacks run inside ucp_worker_progress, which
 * is only ever called with x->mu held, so callbacks never lock. Waiters use x->cv. Loopback senders
 * take hub->mu then the receiving kvx's mu (never the other way round).
 */
#ifndef PDS_KVX_INTERNAL_H
#define PDS_KVX_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>

#include "kvx/kvx.h"
#include "kvx/kvx_gpu.h"

#define KVX_MAGIC_ADDR 0x4158564bu /* "KVXA" little-endian */
#define KVX_MAGIC_POOL 0x5058564bu /* "KVXP" */
#define KVX_MAGIC_MSG  0x4d58564bu /* "KVXM" */
#define KVX_VERSION    1

/* Message kinds (also the UCX active message ids). */
enum { KVX_MSG_DATA = 1, KVX_MSG_DONE = 2, KVX_MSG_ACK = 3, KVX_MSG_ABORT = 4 };
#define KVX_FLAG_CHECKSUM 1u /* DONE carries n_layers * n_blocks checksums */
#define KVX_FLAG_PUT      2u /* DONE: data went by RMA put (no per-run arrival to count) */

/* Every control/data message header (host byte order: a cluster is one architecture). */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    uint32_t length; /* sizeof(kvx_wire_t) */
    int32_t status;  /* ACK: the receiver's verdict */
    uint64_t transfer_id;
    uint32_t layer;     /* DATA */
    uint32_t index;     /* DATA: position of the run's first block in the transfer's id list */
    uint32_t dst_first; /* DATA: first destination block id of the run */
    uint32_t n_blocks;  /* DATA: run length; DONE: blocks per layer */
    uint32_t n_layers;  /* DONE */
    uint32_t flags;     /* DONE: KVX_FLAG_* */
    uint64_t bytes;     /* DATA: payload bytes; DONE: total payload bytes sent */
} kvx_wire_t;

void kvx_wire_init(kvx_wire_t *w, int kind, uint64_t transfer_id);
/* PDS_ERR_PARSE unless magic/version/length/kind are sane. */
pds_status_t kvx_wire_check(const void *hdr, size_t len, int kind, kvx_wire_t *out);

/* Blob headers (address and pool blobs). */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t backend;
    uint32_t length; /* total blob bytes */
    uint32_t payload;
} kvx_blob_hdr_t;

typedef struct {
    kvx_blob_hdr_t h;
    int32_t n_layers, n_blocks;
    int64_t block_bytes;
    /* then per layer: uint64_t base, uint32_t rkey_len, uint32_t pad, rkey bytes (8-aligned) */
} kvx_pool_hdr_t;

/* ---- NCCL wire formats (kvx_nccl_wire.c, in every build so that CI tests the parsers) ----
 * Address blob payload: who this kvx is. Pool blob: the usual header and per-layer device bases;
 * layer 0's "remote key" is a kvx_nkey_t naming the pair and carrying the communicator's unique
 * id. Every data group on a communicator starts with one fixed-size kvx_nhdr_t. */
#define KVX_NCCL_ID_BYTES  128 /* sizeof(ncclUniqueId) */
#define KVX_NCCL_HDR_BYTES 4096
typedef struct {
    uint64_t instance; /* random per kvx object */
    int32_t device, pid;
    char host[64];
} kvx_naddr_t;
typedef struct {
    uint64_t receiver, sender; /* instances */
    uint64_t epoch;            /* bumps when the pair's communicator is re-created */
    uint8_t id[KVX_NCCL_ID_BYTES];
} kvx_nkey_t;
typedef struct {
    uint32_t index, dst_first, n; /* a run: n blocks from transfer position index */
} kvx_nrun_t;
#define KVX_NCCL_MAX_RUNS ((KVX_NCCL_HDR_BYTES - sizeof(kvx_wire_t) - 8) / sizeof(kvx_nrun_t))
typedef struct {
    kvx_wire_t w; /* DATA: layer, n_blocks (all runs), bytes; DONE: as UCX's; ABORT */
    uint32_t n_runs, pad;
    kvx_nrun_t runs[KVX_NCCL_MAX_RUNS];
} kvx_nhdr_t;

/* PDS_ERR_PARSE unless an NCCL address blob of the right size. */
pds_status_t kvx_nccl_addr_parse(const void *blob, size_t len, kvx_naddr_t *out);
/* The pair key inside an NCCL pool blob (PDS_ERR_PARSE when malformed or missing). */
pds_status_t kvx_nccl_pool_key(const void *blob, size_t len, kvx_pool_hdr_t *h, kvx_nkey_t *out);
/* Checks a received header (PDS_ERR_PARSE / PDS_ERR_CORRUPT) and copies it out: sane magic,
 * version, kind; DATA: 1..KVX_NCCL_MAX_RUNS runs of n > 0 blocks adding up to w.n_blocks, bytes
 * equal to n_blocks * block_bytes, layer below n_layers. */
pds_status_t kvx_nccl_hdr_check(const void *buf, size_t len, int64_t block_bytes, int n_layers,
                                kvx_nhdr_t *out);
/* Merges positions [0, n) into runs whose source and destination ids are both consecutive. */
int kvx_nccl_runs(int n, const int32_t *src_ids, const int32_t *dst_ids, kvx_nrun_t *runs);

typedef struct kvx_ucx kvx_ucx_t;
typedef struct kvx_peer kvx_peer_t;
typedef struct kvx_nccl kvx_nccl_t;
typedef struct kvx_ncomm kvx_ncomm_t;
typedef struct kvx_stage kvx_stage_t;

/* A transfer this node expects (receiver side). unit = (layer, block index), n_layers * n_blocks.
 */
struct pds_kvx_recv {
    pds_kvx_t *x;
    pds_kvx_recv_t *next;
    uint64_t id;
    int n_layers, n_blocks;
    int32_t *dst_ids; /* [n_blocks] */
    uint8_t *unit;    /* [n_layers * n_blocks] 0 = nothing, 1 = receiving, 2 = landed */
    uint64_t *sums;   /* [n_layers * n_blocks] from DONE */
    int64_t n_landed; /* units in state 2 */
    int64_t deadline_ns;
    pds_status_t status; /* PDS_IN_PROGRESS until final */
    char detail[192];
    bool done_received, have_sums, verify_queued, verifying, acked, closed, notify_pending;
    int inflight;   /* UCX receives writing into its blocks */
    void *reply_ep; /* UCX: endpoint DONE arrived on, for the ACK */
    pds_kvx_notify_fn notify;
    void *ctx;
};

/* A transfer this node sends. */
struct pds_kvx_send {
    pds_kvx_t *x;
    pds_kvx_send_t *next;
    uint64_t id;
    int n_layers, n_blocks, src_n_blocks;
    int64_t block_bytes;
    int32_t *dst_ids;    /* [n_blocks] */
    uint8_t *layer_sent; /* [n_layers] */
    uint64_t *sums;      /* [n_layers * n_blocks] */
    int64_t bytes, msgs, t_open_ns;
    int64_t t_first_ns, t_done_ns; /* first layer moving, commit returned */
    pds_status_t status;           /* first transport error (PDS_OK while fine) */
    pds_status_t verdict;          /* receiver's ACK, PDS_IN_PROGRESS until it arrives */
    bool committing, committed_ok, closed;
    int inflight;       /* UCX requests not completed */
    kvx_peer_t *peer;   /* UCX */
    uint64_t loop_peer; /* loopback: receiver's hub id */
    int staging;        /* device source: layers queued on / in the staging thread */
    kvx_ncomm_t *comm;  /* NCCL */
    void *sums_dev;     /* NCCL: (n_layers * n_blocks) checksums for DONE */
};

struct pds_kvx {
    pds_kvx_params_t p;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    void *addr; /* address blob */
    size_t addr_len;
    /* registered pool */
    bool have_pool;
    pds_kv_layout_t layout;
    int64_t block_bytes;
    uint8_t **pool_base; /* [n_layers] */
    void *pool_blob;
    size_t pool_len;
    pds_kvx_recv_t *recvs;
    pds_kvx_send_t *sends;
    pds_kvx_stats_t stats;
    int n_verify_queued;
    struct {
        bool armed;
        int layer, block;
        size_t byte;
    } corrupt;
    kvx_ucx_t *ucx;   /* UCX backend state */
    uint64_t loop_id; /* loopback: id on the hub */
    kvx_nccl_t *nccl; /* NCCL backend state */

    /* device pools (kvx_stage.c) */
    bool pool_on_gpu;  /* pool_base[] are device addresses (NCCL) */
    void *rx_mirror;   /* UCX + device pool: pinned mirror that pool_base[] point into */
    uint8_t **rx_dev;  /* [n_layers] device bases behind the mirror */
    kvx_gpu_t *rx_gpu; /* verification / host->device copies (progress thread) */
    bool have_source;
    pds_kvx_mem_t src_mem;
    pds_kv_layout_t src_layout;
    uint8_t **src_base;   /* [n_layers] registered source bases */
    uint8_t **src_mirror; /* [n_layers] UCX + device source: pinned mirror */
    void *src_mirror_mem;
    pds_kvx_ready_fn ready;
    void *ready_ctx;
    kvx_stage_t *stage; /* the staging thread */
};

/* ---- core (kvx.c), all with x->mu held unless said otherwise ---- */
pds_kvx_recv_t *kvx_recv_find(pds_kvx_t *x, uint64_t id);
pds_kvx_send_t *kvx_send_find(pds_kvx_t *x, uint64_t id);
/* Makes a pending recv final with status (no-op when final). */
void kvx_recv_finish(pds_kvx_recv_t *r, pds_status_t s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Validates an incoming run and marks its units "receiving"; returns its destination address
 * or NULL with the recv failed (PDS_ERR_CORRUPT) / already final. */
uint8_t *kvx_recv_accept_run(pds_kvx_recv_t *r, const kvx_wire_t *h, size_t len);
/* Marks a run's units landed and queues verification when everything is in. */
void kvx_recv_landed(pds_kvx_recv_t *r, int layer, int index, int n);
/* Handles DONE (sums: n_layers * n_blocks checksums when flagged). */
void kvx_recv_on_done(pds_kvx_recv_t *r, const kvx_wire_t *h, const void *data, size_t len);
/* Verifies every queued recv; drops x->mu while hashing. */
void kvx_verify_queued(pds_kvx_t *x);
/* Fails pending recvs whose deadline passed; returns ns until the next deadline (or INT64_MAX). */
int64_t kvx_check_deadlines(pds_kvx_t *x, int64_t now_ns);
/* Calls pending notify callbacks with x->mu dropped. */
void kvx_deliver_notifies(pds_kvx_t *x);
/* Checksums of one layer's blocks src_ids[0..n) into sums[0..n) (no lock needed). */
void kvx_layer_sums(const uint8_t *base, int64_t block_bytes, int n, const int32_t *ids,
                    uint64_t *sums);
/* Builds a pool blob of x's pool into *blob (caller frees) from per-layer remote keys. */
pds_status_t kvx_pool_blob_make(pds_kvx_t *x, const void *const *rkeys, const size_t *rkey_lens,
                                void **blob, size_t *len);
/* Builds x's pool blob from per-layer remote keys (rkeys[l] of rkey_lens[l] bytes; NULLs and 0
 * for loopback) into x->pool_blob. */
pds_status_t kvx_pool_blob_build(pds_kvx_t *x, const void *const *rkeys, const size_t *rkey_lens);
/* Parses a pool blob's fixed part (PDS_ERR_PARSE when malformed). */
pds_status_t kvx_pool_parse(const void *blob, size_t len, kvx_pool_hdr_t *out);
/* Walks its per-layer entries: bases[l], rkeys[l] (pointing into the blob), rkey_lens[l]. */
pds_status_t kvx_pool_entries(const void *blob, size_t len, const kvx_pool_hdr_t *h,
                              uint64_t *bases, const void **rkeys, uint32_t *rkey_lens);
/* Builds an address blob around payload into x->addr. */
pds_status_t kvx_addr_build(pds_kvx_t *x, const void *payload, size_t n);
/* Payload of an address blob of the given backend (PDS_ERR_PARSE when malformed). */
pds_status_t kvx_addr_parse(const void *blob, size_t len, pds_kvx_backend_t backend,
                            const void **payload, size_t *n);
/* Wall-clock helper for cond waits: abs timespec deadline_ns (monotonic cv). Returns false on
 * timeout. */
bool kvx_cv_wait_until(pds_kvx_t *x, int64_t deadline_ns);

/* ---- UCX backend (kvx_ucx.c) ---- */
pds_status_t kvx_ucx_create(pds_kvx_t *x);
void kvx_ucx_destroy(pds_kvx_t *x);          /* without x->mu; stops the progress thread first */
pds_status_t kvx_ucx_register(pds_kvx_t *x); /* mu held: maps the pool, builds the blob */
pds_status_t kvx_ucx_open(pds_kvx_send_t *t, const void *addr, size_t addr_len, const void *pool,
                          size_t pool_len); /* mu held */
pds_status_t kvx_ucx_send_run(pds_kvx_send_t *t, int layer, int index, const uint8_t *src,
                              int n);                                /* mu held */
pds_status_t kvx_ucx_commit(pds_kvx_send_t *t, int64_t deadline_ns); /* mu held */
void kvx_ucx_send_close(pds_kvx_send_t *t);                          /* mu held */
void kvx_ucx_recv_final(pds_kvx_recv_t *r); /* mu held: send the ACK if DONE arrived */
void kvx_ucx_wake(pds_kvx_t *x);            /* mu held */

/* ---- device pools and sources (kvx_stage.c) ---- */
/* register_pool with device memory, mu held: UCX registers a pinned mirror (x->pool_base points
 * into it), NCCL the device pool itself. Undone by kvx_stage_destroy. */
pds_status_t kvx_stage_rx_register(pds_kvx_t *x, void *const *layer_base);
/* Hashes recv r's blocks (host mirror or device), mu dropped. Sets *bad_layer/_index = -1 if all
 * match r->sums; returns PDS_ERR_DEVICE etc. if the GPU failed. */
pds_status_t kvx_stage_rx_verify(pds_kvx_t *x, pds_kvx_recv_t *r, int *bad_layer, int *bad_index,
                                 uint64_t *got);
/* UCX + device pool, mu dropped: copies r's blocks mirror -> device (before r is reported OK). */
pds_status_t kvx_stage_rx_land(pds_kvx_t *x, pds_kvx_recv_t *r);
/* send_layer with a device source (mu not held): queues the layer for the staging thread. */
pds_status_t kvx_stage_send_layer(pds_kvx_send_t *t, int layer, const int32_t *src_ids);
/* mu held: waits until t has no staging work left, or the deadline (PDS_ERR_TIMEOUT). */
pds_status_t kvx_stage_drain(pds_kvx_send_t *t, int64_t deadline_ns);
/* Stops the staging thread (mu not held), frees mirrors and GPU state. */
void kvx_stage_destroy(pds_kvx_t *x);

/* ---- NCCL backend (kvx_nccl.c, or kvx_nonccl.c: PDS_ERR_UNSUPPORTED) ---- */
pds_status_t kvx_nccl_create(pds_kvx_t *x); /* address blob, progress thread */
void kvx_nccl_destroy(pds_kvx_t *x);        /* without x->mu */
/* mu held: the per-peer pool blob (new communicator on first use or after a failure). */
pds_status_t kvx_nccl_pool_blob_for(pds_kvx_t *x, const kvx_naddr_t *peer, const void **blob,
                                    size_t *len);
pds_status_t kvx_nccl_open(pds_kvx_send_t *t, const void *addr, size_t addr_len, const void *pool,
                           size_t pool_len); /* mu held */
/* Staging thread, mu held, after ready(layer): the layer's checksums are in t->sums; enqueues the
 * header and the runs on the pair's stream. */
pds_status_t kvx_nccl_send_layer(pds_kvx_send_t *t, int layer, const uint8_t *dev_base,
                                 const int32_t *src_ids);
pds_status_t kvx_nccl_commit(pds_kvx_send_t *t, int64_t deadline_ns); /* mu held */
void kvx_nccl_send_close(pds_kvx_send_t *t);                          /* mu held */
void kvx_nccl_wake(pds_kvx_t *x);                                     /* mu held */

/* ---- loopback backend (kvx_loop.c) ---- */
pds_status_t kvx_loop_attach(pds_kvx_t *x);
void kvx_loop_detach(pds_kvx_t *x);
pds_status_t kvx_loop_open(pds_kvx_send_t *t, const void *addr, size_t addr_len);
pds_status_t kvx_loop_send_runs(pds_kvx_send_t *t, int layer, const uint8_t *src,
                                const int32_t *src_ids); /* no lock held */
pds_status_t kvx_loop_commit(pds_kvx_send_t *t);         /* no lock held */
void kvx_loop_abort(pds_kvx_send_t *t);                  /* no lock held */

#endif /* PDS_KVX_INTERNAL_H */

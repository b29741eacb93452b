/* kvx: moves a sequence's KV cache from a prefill node's pool straight into the blocks a decode
 * node reserved for it, layer by layer, with end-to-end integrity checks.
 *
 * Flow (one transfer; ids come from the control plane, bytes never travel over gRPC):
 *   decode  pds_kvx_create, pds_kvx_register_pool -> pool blob; pds_kvx_address -> address blob
 *           (both go to the prefill node in the OpenTransfer reply, with the reserved block ids)
 *   decode  pds_kvx_expect(id, dst block ids, timeout) -> recv handle     (before replying)
 *   prefill pds_kvx_send_open(address blob, pool blob, id, dst ids) -> send handle
 *   prefill pds_kvx_send_layer(layer, src base, src ids) after each layer (non-blocking)
 *   prefill pds_kvx_send_commit(timeout): all data in place, then "done" + checksums; returns the
 *           receiver's verdict (ok / PDS_ERR_CORRUPT / ...)
 *   decode  pds_kvx_recv_poll / _wait (or the notify callback) -> PDS_OK once every layer's blocks
 *           arrived and each (layer, block) checksum matched; then adopt the blocks.
 *
 * Backends: UCX (any transport UCX finds: tcp, shared memory, cma, rdma) and LOOPBACK (memcpy
 * between two kvx objects in one process that share a pds_kvx_hub_t; for unit tests of nodes).
 * Two data paths on UCX, chosen by the sender (the receiver accepts both):
 *   AM  (default) active message per run of blocks; large ones use rendezvous and land directly in
 *       the reserved blocks (ucp_am_recv_data_nbx). The receiver checks every run against the
 *       blocks it expects, so a late or stray message can never write into blocks that were
 *       released or re-used: safe on every transport, tcp included.
 *   PUT one-sided ucp_put_nbx into the registered pool (rkeys in the pool blob), then an endpoint
 *       flush before "done". Fewer round trips on shared memory / cma / rdma, but the receiver
 *       cannot stop a late put: after a failed or cancelled PUT transfer, keep its blocks out of
 *       use until the sender's endpoint is gone (or use AM).
 * Runs of consecutive source AND destination ids are merged into one message per run, so a
 * sequence with consecutive ids on both sides costs one message per layer.
 *
 * NCCL (builds with CUDA and nccl.h): GPU memory straight from the prefill pool into the decode
 * pool. One communicator per prefill/decode pair (2 ranks), whose unique id the receiver creates
 * and hands out in the per-peer pool blob (pds_kvx_pool_blob_for); non-blocking initialisation with
 * a deadline and ncclCommAbort on failure. Every data group is announced by a fixed-size header
 * (transfer id, layer, runs) the receiver always has a receive posted for, so it can check the
 * runs against the blocks it reserved before posting the receives straight into them, in whatever
 * order the sender's schedule produces. Checksums are computed on the GPU on both sides (the same
 * function as pds_kvx_checksum). The stream is one-way: commit returns once DONE and the checksums
 * left this GPU; the receiver's verdict comes back through the control plane (CommitTransfer).
 *
 * Memory: UCX moves host memory (Debian's UCX 1.13 has no CUDA support), so device pools stage
 * through pinned host mirrors as large as the pool (size the pool with [engine] kv_tokens):
 *   receiver  pds_kvx_register_pool(.., PDS_KVX_MEM_CUDA) registers the mirror with UCX; once a
 *             transfer arrived and verified, its blocks are copied host -> device (one copy per
 *             merged run) before the recv handle reports PDS_OK, so the decode node can compute on
 *             them as soon as it hears.
 *   sender    pds_kvx_register_source(.., PDS_KVX_MEM_CUDA, ready) once; then send_layer with the
 *             device layer base returns at once and a kvx staging thread waits ready(layer)
 *             (pds_engine_layer_wait), copies the layer's blocks device -> mirror, checksums and
 *             sends them from there, so layer l's copy and send overlap layer l+1's compute.
 * NCCL uses the same two calls without mirrors.
 *
 * Threads: a UCX kvx owns one progress thread that drives the UCX worker (all UCX calls happen
 * under one kvx lock, so the worker runs in serialized mode), verifies checksums of arrived
 * transfers and calls notify callbacks. Every public function is thread-safe on a kvx; a handle
 * (send or recv) is used by one thread at a time, normally the node's engine loop.
 */
#ifndef PDS_KVX_H
#define PDS_KVX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "kv/kv.h"

/* Values are also the [kvx] backend config enum's order (node.c). */
typedef enum { PDS_KVX_UCX = 0, PDS_KVX_LOOPBACK, PDS_KVX_NCCL } pds_kvx_backend_t;
typedef enum { PDS_KVX_PATH_AM = 0, PDS_KVX_PATH_PUT } pds_kvx_path_t;
typedef enum { PDS_KVX_MEM_HOST = 0, PDS_KVX_MEM_CUDA } pds_kvx_mem_t;

/* The in-process "network" that loopback kvx objects attach to (no globals: a test creates one
 * and hands it to every loopback kvx). Thread-safe. Must outlive the kvx objects attached. */
typedef struct pds_kvx_hub pds_kvx_hub_t;
pds_status_t pds_kvx_hub_create(pds_kvx_hub_t **out);
void pds_kvx_hub_destroy(pds_kvx_hub_t *h); /* accepts NULL */

typedef struct {
    pds_kvx_backend_t backend;
    pds_kvx_path_t path; /* how this node sends (UCX); ignored by loopback */
    bool checksum;       /* sender computes per-(layer, block) checksums; receiver verifies them */
    pds_kvx_hub_t *hub;  /* LOOPBACK: required */
    int device;          /* NCCL: the CUDA device of this node's pool */
    int64_t init_timeout_ms; /* NCCL: communicator set-up deadline (0 = 30 s) */
} pds_kvx_params_t;

/* UCX, AM path, checksums on. */
pds_kvx_params_t pds_kvx_default_params(void);
const char *pds_kvx_backend_name(pds_kvx_backend_t b); /* "ucx", "loopback", "nccl" */
/* "ucx" / "loopback" / "nccl" -> backend; PDS_ERR_INVALID_ARG (naming the choices) otherwise. */
pds_status_t pds_kvx_backend_parse(const char *name, pds_kvx_backend_t *out);
/* Whether this build has the NCCL backend and CUDA staging (a GPU is still needed at run time). */
bool pds_kvx_has_nccl(void);
bool pds_kvx_has_cuda(void);
const char *pds_kvx_path_name(pds_kvx_path_t p); /* "am", "put" */
/* Writes "ucx 1.13.1" (the UCX library this process runs with, for reports) into buf. */
void pds_kvx_transport_version(char *buf, size_t cap);

/* One per node process. UCX: reads UCX_* environment variables (UCX_TLS, UCX_NET_DEVICES, ...) at
 * create, so set them before. Starts the progress thread. NCCL: PDS_ERR_UNSUPPORTED in a build
 * without it, PDS_ERR_DEVICE without a usable GPU (params.device). */
typedef struct pds_kvx pds_kvx_t;
pds_status_t pds_kvx_create(const pds_kvx_params_t *p, pds_kvx_t **out);
/* Fails every pending transfer (PDS_ERR_CANCELLED), closes endpoints, stops the progress thread,
 * unregisters the pool. Handles must be closed before. Accepts NULL. */
void pds_kvx_destroy(pds_kvx_t *x);

/* This node's address as an opaque blob (magic, version, length; then the UCX worker address or
 * the loopback id) for the control plane. Valid until destroy; owned by the kvx. */
pds_status_t pds_kvx_address(pds_kvx_t *x, const void **blob, size_t *len);

/* 64-bit checksum of n bytes (4 independent lanes over 8-byte words, finished with pds_mix64;
 * ~memory speed). The sender computes it per (layer, block) of the source, the receiver per
 * destination block after arrival. */
uint64_t pds_kvx_checksum(const void *data, size_t n);

/* ---- receiver (decode node) -------------------------------------------------------------------
 */

/* Registers the node's KV pool: layer_base[l] points at layer l's block array of
 * pds_kv_layer_bytes(layout) bytes (layout as in kv/kv.h). Once per kvx; the memory must stay
 * mapped until destroy. Writes a pool blob (magic, version, length, layout, per-layer address and
 * remote key) owned by the kvx and valid until destroy. PDS_ERR_UNSUPPORTED for CUDA memory (stage
 * through host; see above), PDS_ERR_ALREADY_EXISTS if a pool is already registered. Re-registering
 * needs a new kvx. */
pds_status_t pds_kvx_register_pool(pds_kvx_t *x, const pds_kv_layout_t *layout,
                                   void *const *layer_base, pds_kvx_mem_t mem,
                                   const void **pool_blob, size_t *pool_len);

/* The pool blob to hand to sender `peer_addr` (its pds_kvx_address blob, from OpenTransfer) for
 * its next transfers here. UCX / loopback: the registered pool blob. NCCL: the pool blob plus the
 * unique id of this pair's communicator, which is created (non-blocking) on first use and again
 * after a failure. Owned by the kvx, valid until the next call for the same peer or destroy.
 * PDS_ERR_FAILED_PRECONDITION without a registered pool, PDS_ERR_PARSE for a bad peer blob. */
pds_status_t pds_kvx_pool_blob_for(pds_kvx_t *x, const void *peer_addr, size_t addr_len,
                                   const void **pool_blob, size_t *pool_len);

/* Called once when a recv handle reaches its final state (ok or error), with no kvx lock held, on
 * whichever thread saw it become final: the UCX progress thread, a loopback sender's thread, or
 * the caller of pds_kvx_recv_poll / _wait / _cancel (a deadline noticed there). Keep it short: hand
 * the news to your own loop and read the state with pds_kvx_recv_poll. It may still run while
 * pds_kvx_recv_close is returning for the same id; match by transfer id. */
typedef void (*pds_kvx_notify_fn)(void *ctx, uint64_t transfer_id, pds_status_t status);

typedef struct pds_kvx_recv pds_kvx_recv_t;
/* Expects transfer `transfer_id` of every layer of the registered pool into the blocks
 * dst_ids[0..n_blocks) (distinct, in range, in the sender's order). The transfer must complete
 * within timeout_ms (> 0) from now or it fails with PDS_ERR_TIMEOUT. notify may be NULL.
 * PDS_ERR_FAILED_PRECONDITION without a registered pool, PDS_ERR_ALREADY_EXISTS if the id is
 * already expected, PDS_ERR_INVALID_ARG for bad ids. */
pds_status_t pds_kvx_expect(pds_kvx_t *x, uint64_t transfer_id, int n_blocks,
                            const int32_t *dst_ids, int64_t timeout_ms, pds_kvx_notify_fn notify,
                            void *ctx, pds_kvx_recv_t **out);
/* PDS_IN_PROGRESS while pending; PDS_OK when every layer arrived and verified; otherwise the error:
 * PDS_ERR_TIMEOUT, PDS_ERR_CORRUPT (checksum mismatch, malformed or duplicate data; the detail
 * names the layer and block), PDS_ERR_CANCELLED (cancelled here or aborted by the sender),
 * PDS_ERR_UNAVAILABLE (the sender's endpoint failed). Sets pds_err_detail on errors. */
pds_status_t pds_kvx_recv_poll(pds_kvx_recv_t *r);
/* Blocks until the handle is final or wait_ms passes (then PDS_IN_PROGRESS); returns as poll. */
pds_status_t pds_kvx_recv_wait(pds_kvx_recv_t *r, int64_t wait_ms);
/* Fails a pending transfer with PDS_ERR_CANCELLED (late data for it is dropped). No-op if final. */
void pds_kvx_recv_cancel(pds_kvx_recv_t *r);
/* Cancels if pending, waits for receives already writing into its blocks to finish (so the blocks
 * can be re-used once this returns), frees the handle. Accepts NULL. */
void pds_kvx_recv_close(pds_kvx_recv_t *r);
uint64_t pds_kvx_recv_id(const pds_kvx_recv_t *r);

/* ---- sender (prefill node) ----------------------------------------------------------------------
 */
/* Blocks until `layer`'s KV of the latest forward is written on the device (a prefill node passes
 * pds_engine_layer_wait). Called from the kvx staging thread. */
typedef pds_status_t (*pds_kvx_ready_fn)(void *ctx, int layer);

/* Declares where this node's transfers read from: layer_base[l] is layer l's block array (layout as
 * in kv/kv.h). Once per kvx, before any send_open. HOST: nothing changes (send_layer reads the
 * caller's memory; optional). CUDA: UCX allocates a pinned host mirror of the pool and starts a
 * staging thread; NCCL starts the thread and sends from the device. With a CUDA source,
 * send_layer's src_base must be the registered base of that layer and `ready` is required.
 * PDS_ERR_UNSUPPORTED (loopback + CUDA, a build without CUDA, NCCL + host), PDS_ERR_DEVICE (no
 * usable GPU, pinned allocation failed), PDS_ERR_ALREADY_EXISTS (registered before). */
pds_status_t pds_kvx_register_source(pds_kvx_t *x, const pds_kv_layout_t *layout,
                                     void *const *layer_base, pds_kvx_mem_t mem,
                                     pds_kvx_ready_fn ready, void *ctx);

typedef struct pds_kvx_send pds_kvx_send_t;
/* Opens transfer `transfer_id` to the peer whose address and pool blobs the control plane
 * delivered, into its blocks dst_ids[0..n_blocks). src_layout (this node's pool) must have the
 * peer's n_layers and block bytes. Endpoints (and remote keys) are cached per peer and reused.
 * PDS_ERR_PARSE for a malformed blob, PDS_ERR_INVALID_ARG for a layout mismatch or bad ids,
 * PDS_ERR_UNAVAILABLE if the peer is unknown (loopback) or the endpoint cannot be created. */
pds_status_t pds_kvx_send_open(pds_kvx_t *x, const void *peer_addr, size_t addr_len,
                               const void *peer_pool, size_t pool_len,
                               const pds_kv_layout_t *src_layout, uint64_t transfer_id,
                               int n_blocks, const int32_t *dst_ids, pds_kvx_send_t **out);
/* Starts sending layer `layer` (each layer once, any order): block src_ids[i] of the layer array
 * at src_base goes to dst_ids[i]. Non-blocking; the source bytes must stay unchanged until commit
 * returns (or close). Computes the checksums here when enabled (device sources: on the staging
 * thread, which also does the copy and the sends; NCCL wants the same src_ids for every layer).
 * Returns the first error the transfer met (PDS_ERR_UNAVAILABLE when the peer's endpoint
 * failed). */
pds_status_t pds_kvx_send_layer(pds_kvx_send_t *t, int layer, const void *src_base,
                                const int32_t *src_ids);
/* Waits (up to timeout_ms) until every layer's data is in place at the receiver, sends "done"
 * with the checksums, and waits for the receiver's verdict. PDS_OK, or PDS_ERR_FAILED_PRECONDITION
 * (a layer was not sent), PDS_ERR_TIMEOUT, PDS_ERR_UNAVAILABLE (peer unreachable or vanished),
 * PDS_ERR_CORRUPT / PDS_ERR_CANCELLED / PDS_ERR_TIMEOUT (the receiver's verdict). Once. */
pds_status_t pds_kvx_send_commit(pds_kvx_send_t *t, int64_t timeout_ms);
/* For reports: when the transfer's first layer started moving (send_layer on host memory; after
 * ready() for a device source) and when commit returned (0 if not yet). */
void pds_kvx_send_times(const pds_kvx_send_t *t, int64_t *first_ns, int64_t *done_ns);
/* Releases the handle. If not committed successfully, tells the receiver to abort (best effort) and
 * makes sure no transport reads the source memory after it returns (an endpoint with operations
 * still in flight is closed). Accepts NULL. */
void pds_kvx_send_close(pds_kvx_send_t *t);

/* ---- stats ------------------------------------------------------------------------------------
 */
typedef struct {
    int64_t bytes_sent;     /* payload bytes handed to the transport by send_layer */
    int64_t msgs_sent;      /* data messages / puts (one per merged run) */
    int64_t transfers_sent; /* commits that returned PDS_OK */
    int64_t transfers_failed;
    int64_t send_ns;        /* sum over committed transfers of open -> commit return */
    int64_t bytes_received; /* payload bytes of transfers that completed OK here */
    int64_t transfers_received;
    int64_t recv_failed;
    int64_t verify_ns; /* receiver time spent computing checksums */
    int64_t stage_ns;  /* device <-> host staging copies (both sides) */
    int64_t staged_bytes;
} pds_kvx_stats_t;
void pds_kvx_stats(pds_kvx_t *x, pds_kvx_stats_t *out);

/* ---- test hooks -------------------------------------------------------------------------------
 */
/* The next transfer this receiver verifies gets byte `byte` of destination block index
 * `block_index` of layer `layer` flipped just before verification (a stand-in for a bit error in
 * transit). */
void pds_kvx_test_corrupt_next(pds_kvx_t *x, int layer, int block_index, size_t byte);

#endif /* PDS_KVX_H */

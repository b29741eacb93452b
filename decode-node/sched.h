/* sched: the decode node's engine loop — KV transfers in (OpenTransfer / CommitTransfer / Cancel),
 * continuous batching with preemption by recompute, and tokens out through the per-router
 * TokenStreams (streams.h).
 *
 * One engine thread owns the engine, its KV block manager, every sequence and the streams. RPC
 * handlers (and kvx notify callbacks) only push commands onto its queue; it answers the calls
 * itself through pds_decode_calls_t. Each loop iteration: drain the queue; expire transfers past
 * their deadline; admit committed and preempted sequences; grow every running sequence by one
 * token (preempting the most recently committed one when the pool is empty); run ONE forward over
 * the decode tokens plus recompute chunks (within max_batch_tokens / max_batch_seqs); append and
 * check each new token; send one TokenBatch per router. With nothing to compute it blocks on the
 * queue (until the nearest transfer deadline).
 *
 * Request lifecycle (state of a sequence):
 *   OPEN      blocks allocated for n_tokens, kvx expecting the transfer (reply sent)
 *   FAILED    transfer failed or expired before commit: blocks freed; kept only so that a late
 *             CommitTransfer gets the real error, until its deadline
 *   WAITING   committed (blocks adopted) but the batch is full (max_batch_seqs)
 *   RUNNING   in the decode batch
 *   PREEMPTED blocks freed, tokens kept; waits until its KV fits again
 *   RECOMPUTE prefilling its tokens locally (chunked), then RUNNING again with the same tokens
 * A colocated node (local_mode != 0) also takes whole requests (PrefillLocal): such a sequence
 * starts PREEMPTED with its prompt and no KV and goes through RECOMPUTE like a preempted one, but
 * computes every token and samples its first output token from the last chunk (as a prefill node
 * would), sending it on the TokenStream. Prefill-first (vLLM): while a local prompt waits, the
 * forward carries only prompt chunks (up to max_batch_tokens) and the decode batch stalls.
 * Chunked (Sarathi-Serve): each forward is the decode batch plus prompt chunks within
 * chunk_tokens, so a prompt never stalls the running sequences for more than one step's budget.
 * Blocks are freed on every exit: finish, Cancel, transfer error, expiry, shutdown.
 *
 * Cancel of a committed sequence sends its router a finished SeqTokens with FINISH_REASON_CANCELLED
 * (the router may have asked itself; a definite end costs one message and keeps its bookkeeping
 * simple). Cancel of an open transfer sends nothing (no token ever went out for it). Shutdown ends
 * committed sequences with FINISH_REASON_ABORTED so the router re-places them.
 *
 * Threads: pds_decode_sched_open/_commit/_cancel/_stream/_stream_gone/_load/_snapshot are
 * thread-safe; create/start/stop/destroy belong to the owner (main). Without start, a test drives
 * the loop on its own thread with pds_decode_sched_run_once.
 */
#ifndef PDS_DECODE_SCHED_H
#define PDS_DECODE_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"
#include "decode-node/streams.h"
#include "engine/engine.h"
#include "kvx/kvx.h"
#include "proto/pdserve.pb-c.h"

typedef struct {
    const char *node_id;     /* copied */
    pds_engine_t *engine;    /* used only by the engine thread from create on; not owned */
    pds_kvx_t *kvx;          /* pool of `engine` registered; not owned */
    const char *kvx_backend; /* "ucx" / "loopback": OpenTransfer must name the same */
    const void *kvx_address; /* pds_kvx_address blob; must outlive the scheduler */
    size_t kvx_address_len;
    const void *pool_blob; /* pds_kvx_register_pool blob; must outlive the scheduler */
    size_t pool_blob_len;
    int64_t transfer_timeout_ms; /* KV must arrive within this after OpenTransfer (> 0) */
    int64_t commit_timeout_ms;   /* and CommitTransfer within this after that; 0 = the same */
    int max_batch_seqs;          /* 0 = the engine's */
    int64_t max_buffered_tokens; /* per router without a stream; 0 = 65536 */
    int local_mode;              /* pds_decode_local_mode_t: PrefillLocal and its scheduling */
    int chunk_tokens;            /* PDS_DECODE_LOCAL_CHUNKED: token budget of a step (> 0) */
    pds_decode_calls_t calls;
} pds_decode_sched_params_t;

typedef enum {
    PDS_DECODE_LOCAL_OFF = 0,       /* a decode node: PrefillLocal is FAILED_PRECONDITION */
    PDS_DECODE_LOCAL_PREFILL_FIRST, /* colocated, vLLM-style */
    PDS_DECODE_LOCAL_CHUNKED        /* colocated, Sarathi-Serve-style */
} pds_decode_local_mode_t;

typedef struct pds_decode_sched pds_decode_sched_t;

pds_status_t pds_decode_sched_create(const pds_decode_sched_params_t *p, pds_decode_sched_t **out);
/* Starts the engine thread. */
pds_status_t pds_decode_sched_start(pds_decode_sched_t *s);
/* Ends everything: no new commands; queued ones are answered UNAVAILABLE; open transfers are
 * cancelled; committed sequences end ABORTED ("decode node shutting down"); every stream is
 * finished OK; all blocks are freed. Joins the thread (or does it inline if never started).
 * Idempotent. */
void pds_decode_sched_stop(pds_decode_sched_t *s);
/* Stops if needed and frees. Accepts NULL. Destroy before the engine and kvx. */
void pds_decode_sched_destroy(pds_decode_sched_t *s);

/* Hand a call to the engine thread. On PDS_OK the scheduler owns `call` and answers it (through
 * params.calls); `req` must stay valid until then (an RPC request lives until its call ends). Any
 * other status (PDS_ERR_UNAVAILABLE: shutting down; PDS_ERR_NO_MEMORY) leaves the call with the
 * caller, who must answer it. */
pds_status_t pds_decode_sched_open(pds_decode_sched_t *s, void *call,
                                   const Pdserve__V1__OpenTransferRequest *req);
pds_status_t pds_decode_sched_commit(pds_decode_sched_t *s, void *call,
                                     const Pdserve__V1__CommitTransferRequest *req);
pds_status_t pds_decode_sched_cancel(pds_decode_sched_t *s, void *call,
                                     const Pdserve__V1__CancelRequest *req);
/* PrefillLocal: a whole request to prefill and decode here (colocated). Answered (PrefillReply)
 * once admitted to the queue; its tokens go to req->router_id's TokenStream. */
pds_status_t pds_decode_sched_local(pds_decode_sched_t *s, void *call,
                                    const Pdserve__V1__PrefillRequest *req);
/* A TokenStream call for req->router_id; stream_id is unique per call (see _stream_gone). */
pds_status_t pds_decode_sched_stream(pds_decode_sched_t *s, void *call,
                                     const Pdserve__V1__TokenStreamRequest *req,
                                     uint64_t stream_id);
/* The client cancelled stream `stream_id`: the engine thread releases its call. */
void pds_decode_sched_stream_gone(pds_decode_sched_t *s, uint64_t stream_id);

/* What the engine loop published after its last iteration (mutex-protected copy). */
typedef struct {
    int running;        /* RUNNING + RECOMPUTE */
    int waiting;        /* WAITING + PREEMPTED */
    int open_transfers; /* OPEN */
    int64_t context_tokens;
    int64_t queued_prompt_tokens; /* local prompts: tokens not computed yet */
    int free_blocks, reserved_blocks, total_blocks;
    float recent_step_ms; /* moving average of decode steps */
    uint64_t steps;
    uint64_t preemptions;
    uint64_t finished;
    int streams; /* open TokenStreams */
    int64_t pending_tokens;
    bool stopped;
} pds_decode_stats_t;
void pds_decode_sched_snapshot(pds_decode_sched_t *s, pds_decode_stats_t *out);
/* pds_node_load_fn for the reporter: fills r's load fields from the snapshot. */
void pds_decode_sched_load(void *sched, Pdserve__V1__LoadReport *r);

/* Test driving (no engine thread): handles what is queued and runs at most one iteration without
 * blocking. Returns true while there is work that another call would advance. */
bool pds_decode_sched_run_once(pds_decode_sched_t *s);

#endif /* PDS_DECODE_SCHED_H */

/* streams: the decode node's per-router TokenStream calls and the tokens waiting for them.
 *
 * Each router keeps ONE long-lived server-streaming TokenStream call open to a decode node. Every
 * decode step the scheduler adds each sequence's new token (and, at the end, its finish) to its
 * router's pending list and then flushes: one TokenBatch per router per step, whatever the number
 * of sequences. Pending tokens of one request are merged (contiguous indices) so that a router
 * with no open stream (not connected yet, reconnecting, or a send that found the call's queue
 * full) gets everything in order, in one message, once it can take it. The pending list of a
 * router is bounded (max_buffered_tokens): past it the router's buffer is dropped with an error
 * log — a router that stays away that long has re-placed those requests anyway.
 *
 * Calls are reached only through pds_decode_calls_t, so a unit test can stand in a fake sink; the
 * program uses pds_rpc_call_* (service.c). Owner: the scheduler's engine thread; nothing here is
 * thread-safe.
 */
#ifndef PDS_DECODE_STREAMS_H
#define PDS_DECODE_STREAMS_H

#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"
#include "proto/pdserve.pb-c.h"

/* How the decode node answers calls (opaque call handles). The program's implementation is
 * pds_decode_calls_rpc() (service.c); every function must be callable from the engine thread. */
typedef struct {
    /* Queues one stream message; PDS_ERR_CANCELLED when the peer is gone, PDS_ERR_EXHAUSTED when
     * too many are queued. `msg` stays the caller's. */
    pds_status_t (*send)(void *call, const ProtobufCMessage *msg);
    /* Unary success (msg may be NULL) and release of the handle. */
    void (*reply)(void *call, const ProtobufCMessage *msg);
    /* Ends the call with a status and message, and releases the handle. */
    void (*finish)(void *call, pds_status_t s, const char *message);
} pds_decode_calls_t;

/* The end of a sequence, as it goes into its last SeqTokens. */
typedef struct {
    int reason;         /* Pdserve__V1__FinishReason */
    const char *error;  /* ABORTED: what went wrong; NULL otherwise */
    float queue_ms;     /* commit to first decode step */
    float tpot_mean_ms; /* gaps between this node's output tokens */
    float tpot_p90_ms;
    uint32_t decode_steps;
} pds_decode_finish_t;

typedef struct pds_decode_streams pds_decode_streams_t;

/* node_id is copied (TokenBatch.decode_node_id). max_buffered_tokens: per router, > 0. */
pds_status_t pds_decode_streams_create(const char *node_id, const pds_decode_calls_t *calls,
                                       int64_t max_buffered_tokens, pds_decode_streams_t **out);
/* Frees the state; calls still attached are NOT finished (call finish_all first). Accepts NULL. */
void pds_decode_streams_destroy(pds_decode_streams_t *st);

/* Makes `call` the stream of router_id (stream_id names it for _gone). A stream already open for
 * that router is finished first (OK, "replaced by a newer TokenStream"). Pending tokens go out on
 * the next flush. On allocation failure the call is finished with RESOURCE_EXHAUSTED. */
void pds_decode_streams_attach(pds_decode_streams_t *st, const char *router_id, void *call,
                               uint64_t stream_id);
/* The stream with this id was cancelled by its client: release it (its pending tokens stay).
 * Unknown ids (already replaced or dropped) are ignored. */
void pds_decode_streams_gone(pds_decode_streams_t *st, uint64_t stream_id);

/* Adds n tokens of request_id (output positions index..index+n-1) and, if fin is non-NULL, its
 * finish, to router_id's pending list. n may be 0 (a finish without tokens). */
void pds_decode_streams_add(pds_decode_streams_t *st, const char *router_id, const char *request_id,
                            const int32_t *tokens, int n, uint32_t index,
                            const pds_decode_finish_t *fin);
/* Sends one TokenBatch to each router that has pending tokens and an open stream. */
void pds_decode_streams_flush(pds_decode_streams_t *st, uint64_t step, float step_ms);
/* Flushes what can go, then finishes every open stream with (s, message). */
void pds_decode_streams_finish_all(pds_decode_streams_t *st, pds_status_t s, const char *message);

/* Open streams; tokens (plus finish-only entries) waiting across all routers. */
int pds_decode_streams_open_count(const pds_decode_streams_t *st);
int64_t pds_decode_streams_pending(const pds_decode_streams_t *st);

#endif /* PDS_DECODE_STREAMS_H */

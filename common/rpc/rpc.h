/* rpc: pdserve's thin layer over the gRPC C core with protobuf-c payloads. It is the only code that
 * includes gRPC headers; nothing of gRPC shows through this header. Messages are the protobuf-c
 * types generated from proto/pdserve.proto ("proto/pdserve.pb-c.h"); methods are named by their
 * full gRPC path, e.g. "/pdserve.v1.Pdserve/Generate".
 *
 * Server. A server listens on one address, knows a table of methods (unary or server-streaming),
 * unpacks each request with the method's protobuf-c descriptor (bytes that do not parse are
 * answered INVALID_ARGUMENT "malformed <full message name>" without calling the handler; an unknown
 * method gets UNIMPLEMENTED) and hands the handler a call handle plus the unpacked request. The
 * handler answers now or later, from any thread: pds_rpc_call_send() queues a stream message (one
 * send is in flight per call, the rest wait in order), pds_rpc_call_reply() / pds_rpc_call_finish()
 * end the call. A client cancel, an expired deadline or server shutdown marks the call cancelled
 * and calls the method's on_cancel, so the work behind it can stop.
 *
 * Threading contract.
 *   - One RPC thread per server (started by pds_rpc_server_start) owns the completion queue. Method
 *     handlers and on_cancel run on it: they must not block (hand the work to another thread).
 *   - pds_rpc_call_* functions are thread-safe and may be called from any thread.
 *   - A call handle given to a handler belongs to the handler until it calls pds_rpc_call_reply()
 *     or pds_rpc_call_finish() exactly once, cancelled or not; the handle (and the request) are
 *     invalid after that. Handles stay valid even past pds_rpc_server_destroy (sends then fail with
 *     PDS_ERR_CANCELLED), so a worker thread finishing late never touches freed memory.
 *   - Channels are thread-safe: any number of threads may make calls on one channel at once. A
 *     stream is used by one thread at a time, except pds_rpc_stream_cancel (any thread).
 *
 * Status. pds_status_t travels as a gRPC status code (pds_rpc_status_to_code / _from_code, the one
 * mapping in the project) plus the message text, carried unchanged both ways: on the client the
 * server's message is the pds_err_detail() of the failed call (the detail slot keeps 511 bytes).
 *
 * Memory. Messages this module hands out (client replies, stream messages) are allocated through
 * pds_malloc and freed with pds_rpc_msg_free(). Security: plaintext (insecure credentials) for
 * now; rpc.c creates credentials in one place each for server and channel, where TLS will go.
 */
#ifndef PDS_RPC_H
#define PDS_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "base/base.h"

/* Must equal the proto enums PROTOCOL_MAGIC_PDSERVE / PROTOCOL_VERSION_CURRENT (rpc.c checks). */
#define PDS_RPC_PROTOCOL_MAGIC   0x70647376u /* "pdsv" */
#define PDS_RPC_PROTOCOL_VERSION 1u

/* ---- status mapping --------------------------------------------------------------------------
 * gRPC status codes are wire values (0 OK .. 16 UNAUTHENTICATED), so they appear here as int.
 *   OK -> OK                          INVALID_ARG, PARSE -> INVALID_ARGUMENT
 *   OUT_OF_RANGE -> OUT_OF_RANGE      (kept apart: "valid request, value past a limit")
 *   NOT_FOUND -> NOT_FOUND            ALREADY_EXISTS -> ALREADY_EXISTS
 *   EXHAUSTED, NO_MEMORY -> RESOURCE_EXHAUSTED
 *   TIMEOUT -> DEADLINE_EXCEEDED      CANCELLED -> CANCELLED
 *   UNAVAILABLE, AGAIN, TRANSPORT -> UNAVAILABLE (retry elsewhere may succeed)
 *   FAILED_PRECONDITION -> FAILED_PRECONDITION
 *   UNSUPPORTED -> UNIMPLEMENTED      CORRUPT -> DATA_LOSS
 *   everything else (IO, DEVICE, INTERNAL, IN_PROGRESS, unknown) -> INTERNAL
 * and back: each code to the first status named for it above; UNKNOWN, ABORTED, PERMISSION_DENIED,
 * UNAUTHENTICATED and unknown codes -> PDS_ERR_INTERNAL. */
int pds_rpc_status_to_code(pds_status_t s);
pds_status_t pds_rpc_status_from_code(int code);

/* Frees a message this module unpacked (client replies, stream messages). Accepts NULL. */
void pds_rpc_msg_free(ProtobufCMessage *msg);

/* ---- server ---------------------------------------------------------------------------------- */
typedef struct pds_rpc_server pds_rpc_server_t;
typedef struct pds_rpc_call pds_rpc_call_t;

/* Runs on the RPC thread when a request arrived and parsed. `request` has the method's message
 * type and lives until the call is finished. `arg` is pds_rpc_method_t.arg. Must not block. */
typedef void (*pds_rpc_handler_fn)(pds_rpc_call_t *call, const ProtobufCMessage *request,
                                   void *arg);
/* Runs on the RPC thread, at most once per call, when the call ends cancelled (client cancel,
 * deadline, connection loss, server shutdown) while the handler still holds it. The handler must
 * still finish the call (that is then only a release); on_cancel may do so itself. It can race
 * with a worker thread's finish of the same call: the handle stays valid until on_cancel returns,
 * and finishing twice is a bug, so exactly one side (e.g. whoever takes the work item off a
 * queue) finishes. Must not block. */
typedef void (*pds_rpc_cancel_fn)(pds_rpc_call_t *call, void *arg);

typedef enum {
    PDS_RPC_UNARY,         /* one reply: pds_rpc_call_reply() or an error via _finish() */
    PDS_RPC_SERVER_STREAM, /* any number of pds_rpc_call_send(), then pds_rpc_call_finish() */
} pds_rpc_kind_t;

typedef struct {
    const char *name; /* full path, "/pdserve.v1.Pdserve/Generate"; copied */
    pds_rpc_kind_t kind;
    const ProtobufCMessageDescriptor *request; /* e.g. &pdserve__v1__generate_request__descriptor */
    pds_rpc_handler_fn handler;
    pds_rpc_cancel_fn on_cancel; /* optional */
    void *arg;                   /* passed to handler and on_cancel */
} pds_rpc_method_t;

typedef struct {
    const char *address;   /* "host:port" to listen on; port 0 = an ephemeral port */
    int max_queued_sends;  /* stream messages waiting per call before send fails; 0 = 4096 */
    int max_message_bytes; /* largest message accepted from clients; 0 = 4 MiB */
} pds_rpc_server_params_t;

pds_rpc_server_params_t pds_rpc_server_default_params(void); /* address "127.0.0.1:0" */

/* Creates a server bound to p->address (the port is taken now; a port in use is
 * PDS_ERR_UNAVAILABLE). Not serving until pds_rpc_server_start. */
pds_status_t pds_rpc_server_create(const pds_rpc_server_params_t *p, pds_rpc_server_t **out);
/* The bound port (the real one when 0 was asked). */
int pds_rpc_server_port(const pds_rpc_server_t *srv);
/* Adds a method (before start only). PDS_ERR_ALREADY_EXISTS for a name added twice,
 * PDS_ERR_INVALID_ARG for a name not starting with '/' or a missing handler/descriptor. */
pds_status_t pds_rpc_server_add_method(pds_rpc_server_t *srv, const pds_rpc_method_t *m);
/* Starts serving on a new RPC thread. */
pds_status_t pds_rpc_server_start(pds_rpc_server_t *srv);
/* Stops taking calls, gives calls in flight up to grace_ms to finish, then cancels the rest
 * (on_cancel runs for those a handler still holds) and waits until gRPC has let go of all of them.
 * Idempotent; call from any thread but the RPC thread. */
void pds_rpc_server_shutdown(pds_rpc_server_t *srv, int grace_ms);
/* Shutdown (grace 0) if not done, then frees everything. Accepts NULL. */
void pds_rpc_server_destroy(pds_rpc_server_t *srv);

/* ---- server call handle (all thread-safe) -----------------------------------------------------
 */
/* Queues one stream message (packed now; `msg` stays the caller's). PDS_ERR_CANCELLED when the
 * call has ended (the client is gone: stop and finish), PDS_ERR_EXHAUSTED when max_queued_sends
 * are waiting (the client reads too slowly), PDS_ERR_INVALID_ARG on a unary call or after finish.
 */
pds_status_t pds_rpc_call_send(pds_rpc_call_t *call, const ProtobufCMessage *msg);
/* Sends `msg` (if not NULL) then status OK, and releases the handle. */
void pds_rpc_call_reply(pds_rpc_call_t *call, const ProtobufCMessage *msg);
/* Ends the call with `s` and `message` (NULL = pds_status_text(s)) after the queued messages, and
 * releases the handle. */
void pds_rpc_call_finish(pds_rpc_call_t *call, pds_status_t s, const char *message);
/* True once the call ended without a status from us (client cancel, deadline, shutdown). */
bool pds_rpc_call_cancelled(pds_rpc_call_t *call);
/* The client's deadline on the pds_time_now_ns() clock; INT64_MAX when there is none. */
int64_t pds_rpc_call_deadline_ns(const pds_rpc_call_t *call);
/* The method path, e.g. "/pdserve.v1.Pdserve/Generate". */
const char *pds_rpc_call_method(const pds_rpc_call_t *call);
/* One pointer of handler state per call (e.g. so on_cancel finds the request's work). */
void pds_rpc_call_set_data(pds_rpc_call_t *call, void *data);
void *pds_rpc_call_data(const pds_rpc_call_t *call);

/* ---- client ---------------------------------------------------------------------------------- */
typedef struct pds_rpc_channel pds_rpc_channel_t;
typedef struct pds_rpc_stream pds_rpc_stream_t;

/* A channel to "host:port". Connects lazily; calls to an unreachable peer fail fast with
 * PDS_ERR_UNAVAILABLE. */
pds_status_t pds_rpc_channel_create(const char *target, pds_rpc_channel_t **out);
void pds_rpc_channel_destroy(pds_rpc_channel_t *ch); /* accepts NULL; no call may be running */

/* Blocking unary call. timeout_ms: deadline from now; 0 = none. On PDS_OK *reply is a message of
 * type reply_desc (free with pds_rpc_msg_free). On error nothing is written and pds_err_detail()
 * holds the server's (or gRPC's) status message. */
pds_status_t pds_rpc_channel_call(pds_rpc_channel_t *ch, const char *method,
                                  const ProtobufCMessage *request,
                                  const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                                  ProtobufCMessage **reply);
/* The same with the request given as bytes (forwarding, tests of malformed input). */
pds_status_t pds_rpc_channel_call_raw(pds_rpc_channel_t *ch, const char *method,
                                      const void *request, size_t request_len,
                                      const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                                      ProtobufCMessage **reply);

/* Starts a server-streaming call. timeout_ms: deadline for the whole stream; 0 = none. Only
 * local failures are reported here; the server's answer comes through pds_rpc_stream_next. */
pds_status_t pds_rpc_stream_open(pds_rpc_channel_t *ch, const char *method,
                                 const ProtobufCMessage *request,
                                 const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                                 pds_rpc_stream_t **out);
/* Blocks for the next message. PDS_OK with *msg set (free with pds_rpc_msg_free); PDS_OK with
 * *msg == NULL once the server finished with status OK; otherwise the stream's final error (the
 * server's status and message, PDS_ERR_CANCELLED after pds_rpc_stream_cancel, PDS_ERR_TIMEOUT
 * past the deadline, PDS_ERR_PARSE for a message that does not unpack). Once ended, every further
 * call returns the same result. */
pds_status_t pds_rpc_stream_next(pds_rpc_stream_t *st, ProtobufCMessage **msg);
/* Cancels the call; a blocked pds_rpc_stream_next returns PDS_ERR_CANCELLED. Any thread. */
void pds_rpc_stream_cancel(pds_rpc_stream_t *st);
/* Cancels if still running and frees. Accepts NULL. */
void pds_rpc_stream_destroy(pds_rpc_stream_t *st);

#endif /* PDS_RPC_H */

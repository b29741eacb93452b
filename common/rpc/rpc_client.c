/* rpc_client.c: the client half of the gRPC layer — blocking unary calls and server streams.
 *
 * Every call gets its own pluck completion queue, so any thread can block on its own call without
 * a shared poller thread: one unary call is one batch of all six ops, plucked once; a stream has a
 * start batch, a status batch started up front, and one receive batch per pds_rpc_stream_next.
 * The deadline is the call's gRPC deadline, so plucks themselves wait without a limit. The cost is
 * a completion queue per call (cheap next to a network round trip), bought for having no shared
 * state between calls at all.
 */
#include "rpc/rpc_internal.h"

#include <stdio.h>
#include <string.h>

struct pds_rpc_channel {
    grpc_channel *gc;
};

/* ---- channel ----------------------------------------------------------------------------------
 */
pds_status_t pds_rpc_channel_create(const char *target, pds_rpc_channel_t **out)
{
    if (!target || !*target) return PDS_ERR(PDS_ERR_INVALID_ARG, "channel target missing");
    pds_rpc_channel_t *ch = pds_calloc(1, sizeof *ch);
    if (!ch) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for a channel");
    rpc_lib_ref();
    grpc_channel_credentials *creds = rpc_channel_credentials();
    ch->gc = grpc_channel_create(target, creds, NULL); /* never NULL: a bad target gives a channel
                                                          whose calls fail */
    grpc_channel_credentials_release(creds);
    *out = ch;
    return PDS_OK;
}

void pds_rpc_channel_destroy(pds_rpc_channel_t *ch)
{
    if (!ch) return;
    grpc_channel_destroy(ch->gc);
    pds_free(ch);
    rpc_lib_unref();
}

static grpc_call *channel_new_call(pds_rpc_channel_t *ch, grpc_completion_queue *cq,
                                   const char *method, int timeout_ms)
{
    grpc_slice m = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(ch->gc, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL,
                                               rpc_deadline(timeout_ms), NULL);
    grpc_slice_unref(m);
    return call;
}

static void cq_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
}

/* Maps a received final status to ours, with the server's message as the error detail. */
static pds_status_t status_result(grpc_status_code code, grpc_slice details)
{
    if (code == GRPC_STATUS_OK) return PDS_OK;
    return PDS_ERR(pds_rpc_status_from_code(code), "%.*s", (int)GRPC_SLICE_LENGTH(details),
                   (const char *)GRPC_SLICE_START_PTR(details));
}

/* ---- unary ------------------------------------------------------------------------------------
 */
/* Takes `req`. */
static pds_status_t unary_call(pds_rpc_channel_t *ch, const char *method, grpc_byte_buffer *req,
                               const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                               ProtobufCMessage **reply)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call *call = channel_new_call(ch, cq, method, timeout_ms);
    grpc_metadata_array md_initial, md_trailing;
    grpc_metadata_array_init(&md_initial);
    grpc_metadata_array_init(&md_trailing);
    grpc_byte_buffer *resp = NULL;
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &resp;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trailing;
    ops[5].data.recv_status_on_client.status = &code;
    ops[5].data.recv_status_on_client.status_details = &details;

    pds_status_t s;
    grpc_call_error err = grpc_call_start_batch(call, ops, 6, ops, NULL);
    if (err != GRPC_CALL_OK) {
        s = PDS_ERR(PDS_ERR_INTERNAL, "grpc_call_start_batch %s: %s", method,
                    grpc_call_error_to_string(err));
    } else {
        grpc_event ev =
            grpc_completion_queue_pluck(cq, ops, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        PDS_ASSERT(ev.type == GRPC_OP_COMPLETE);
        s = status_result(code, details);
        if (s == PDS_OK && !resp)
            s = PDS_ERR(PDS_ERR_INTERNAL, "%s answered OK without a reply message", method);
        if (s == PDS_OK) s = rpc_unpack(resp, reply_desc, reply);
    }
    if (resp) grpc_byte_buffer_destroy(resp);
    grpc_byte_buffer_destroy(req);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&md_initial);
    grpc_metadata_array_destroy(&md_trailing);
    grpc_call_unref(call);
    cq_destroy(cq);
    return s;
}

pds_status_t pds_rpc_channel_call(pds_rpc_channel_t *ch, const char *method,
                                  const ProtobufCMessage *request,
                                  const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                                  ProtobufCMessage **reply)
{
    if (!method || !request || !reply_desc)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "call needs a method, a request and a reply type");
    grpc_byte_buffer *req = rpc_pack(request);
    if (!req) return PDS_ERR_NO_MEMORY;
    return unary_call(ch, method, req, reply_desc, timeout_ms, reply);
}

pds_status_t pds_rpc_channel_call_raw(pds_rpc_channel_t *ch, const char *method,
                                      const void *request, size_t request_len,
                                      const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                                      ProtobufCMessage **reply)
{
    if (!method || (!request && request_len) || !reply_desc)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "call needs a method, request bytes and a reply type");
    grpc_byte_buffer *req = rpc_pack_raw(request, request_len);
    if (!req) return PDS_ERR_NO_MEMORY;
    return unary_call(ch, method, req, reply_desc, timeout_ms, reply);
}

/* ---- server streams ---------------------------------------------------------------------------
 */
struct pds_rpc_stream {
    grpc_completion_queue *cq;
    grpc_call *call;
    const ProtobufCMessageDescriptor *reply_desc;
    grpc_byte_buffer *req; /* until the start batch completes */
    grpc_metadata_array md_initial, md_trailing;
    grpc_status_code code;
    grpc_slice details;
    bool start_pending, status_pending, ended;
    pds_status_t result;                 /* once ended */
    char *result_msg;                    /* its detail (NULL: out of memory for it) */
    int tag_start, tag_status, tag_recv; /* addresses used as tags */
};

static void stream_pluck(pds_rpc_stream_t *st, void *tag)
{
    grpc_event ev =
        grpc_completion_queue_pluck(st->cq, tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    PDS_ASSERT(ev.type == GRPC_OP_COMPLETE);
}

/* Waits for the start batch (it holds the request buffer). */
static void stream_settle_start(pds_rpc_stream_t *st)
{
    if (!st->start_pending) return;
    stream_pluck(st, &st->tag_start);
    st->start_pending = false;
    grpc_byte_buffer_destroy(st->req);
    st->req = NULL;
}

/* Records the final result: `s` with the current error detail. */
static pds_status_t stream_end(pds_rpc_stream_t *st, pds_status_t s)
{
    st->ended = true;
    st->result = s;
    st->result_msg = s == PDS_OK ? NULL : pds_strdup(pds_err_detail());
    return s;
}

pds_status_t pds_rpc_stream_open(pds_rpc_channel_t *ch, const char *method,
                                 const ProtobufCMessage *request,
                                 const ProtobufCMessageDescriptor *reply_desc, int timeout_ms,
                                 pds_rpc_stream_t **out)
{
    if (!method || !request || !reply_desc)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "stream needs a method, a request and a reply type");
    pds_rpc_stream_t *st = pds_calloc(1, sizeof *st);
    if (!st) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for a stream");
    st->req = rpc_pack(request);
    if (!st->req) {
        pds_free(st);
        return PDS_ERR_NO_MEMORY;
    }
    st->reply_desc = reply_desc;
    st->details = grpc_empty_slice();
    grpc_metadata_array_init(&st->md_initial);
    grpc_metadata_array_init(&st->md_trailing);
    st->cq = grpc_completion_queue_create_for_pluck(NULL);
    st->call = channel_new_call(ch, st->cq, method, timeout_ms);

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = st->req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &st->md_initial;
    grpc_call_error err = grpc_call_start_batch(st->call, ops, 4, &st->tag_start, NULL);
    if (err == GRPC_CALL_OK) {
        st->start_pending = true;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[0].data.recv_status_on_client.trailing_metadata = &st->md_trailing;
        ops[0].data.recv_status_on_client.status = &st->code;
        ops[0].data.recv_status_on_client.status_details = &st->details;
        err = grpc_call_start_batch(st->call, ops, 1, &st->tag_status, NULL);
        if (err == GRPC_CALL_OK) st->status_pending = true;
    }
    if (err != GRPC_CALL_OK) {
        pds_status_t s = PDS_ERR(PDS_ERR_INTERNAL, "grpc_call_start_batch %s: %s", method,
                                 grpc_call_error_to_string(err));
        pds_rpc_stream_destroy(st);
        return s;
    }
    *out = st;
    return PDS_OK;
}

pds_status_t pds_rpc_stream_next(pds_rpc_stream_t *st, ProtobufCMessage **msg)
{
    if (st->ended) {
        if (st->result == PDS_OK) {
            *msg = NULL;
            return PDS_OK;
        }
        return PDS_ERR(st->result, "%s", st->result_msg ? st->result_msg : "");
    }
    stream_settle_start(st);
    grpc_byte_buffer *bb = NULL;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &bb;
    grpc_call_error err = grpc_call_start_batch(st->call, &op, 1, &st->tag_recv, NULL);
    if (err != GRPC_CALL_OK) {
        grpc_call_cancel(st->call, NULL);
        return stream_end(st, PDS_ERR(PDS_ERR_INTERNAL, "grpc_call_start_batch: %s",
                                      grpc_call_error_to_string(err)));
    }
    stream_pluck(st, &st->tag_recv);
    if (bb) {
        ProtobufCMessage *m = NULL;
        pds_status_t s = rpc_unpack(bb, st->reply_desc, &m);
        grpc_byte_buffer_destroy(bb);
        if (s == PDS_OK) {
            *msg = m;
            return PDS_OK;
        }
        /* A message we cannot read: stop the stream and report that, not the status it gets. */
        char detail[256];
        snprintf(detail, sizeof detail, "%s", pds_err_detail());
        grpc_call_cancel(st->call, NULL);
        stream_pluck(st, &st->tag_status);
        st->status_pending = false;
        return stream_end(st, PDS_ERR(s, "%s", detail));
    }
    /* End of stream (or cancelled): the status says which. */
    stream_pluck(st, &st->tag_status);
    st->status_pending = false;
    pds_status_t s = status_result(st->code, st->details);
    stream_end(st, s);
    if (s == PDS_OK) *msg = NULL;
    return s;
}

void pds_rpc_stream_cancel(pds_rpc_stream_t *st)
{
    grpc_call_cancel(st->call, NULL);
}

void pds_rpc_stream_destroy(pds_rpc_stream_t *st)
{
    if (!st) return;
    if (st->status_pending || st->start_pending) grpc_call_cancel(st->call, NULL);
    stream_settle_start(st);
    if (st->status_pending) stream_pluck(st, &st->tag_status);
    if (st->req) grpc_byte_buffer_destroy(st->req);
    grpc_call_unref(st->call);
    cq_destroy(st->cq);
    grpc_slice_unref(st->details);
    grpc_metadata_array_destroy(&st->md_initial);
    grpc_metadata_array_destroy(&st->md_trailing);
    pds_free(st->result_msg);
    pds_free(st);
}

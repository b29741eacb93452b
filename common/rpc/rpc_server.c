/* rpc_server.c: the server half of the gRPC layer — one completion queue, one RPC thread, generic
 * (unregistered) call requests matched against our own method table.
 *
 * Each incoming call gets a pds_rpc_call_t that lives through four kinds of completion, each with
 * its own tag: NEW (grpc_server_request_call matched a call; we immediately ask for the next one),
 * RECV (the request message; unpacked here, then the handler runs), CLOSE (RECV_CLOSE_ON_SERVER,
 * started on arrival: it completes when the call is over and says whether it was cancelled) and
 * SEND (the one send batch in flight; queued messages follow it in order, and the final status
 * rides in the same batch as the last message). The trade-off: one generic request at a time and
 * a linear method lookup, which is plenty for a control plane of a few dozen calls per second per
 * method, against not touching gRPC's registered-method machinery at all.
 *
 * Lifetime: a call holds a reference for the RPC layer while gRPC's call is alive (until CLOSE has
 * completed and no batch is in flight; only the RPC thread drops it) and one for the handler from
 * the handler's invocation to its reply/finish. Whichever goes last frees the struct, so a worker
 * thread may finish a call after the server is gone. Per-call state is guarded by the call's mutex;
 * grpc_call_start_batch is thread-safe, so sends start straight from the caller's thread.
 */
#include "rpc/rpc_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define DEFAULT_MAX_QUEUED    4096
#define DEFAULT_MAX_MSG_BYTES (4 << 20)
#define REARM_RETRY_MS        100

typedef enum { TAG_NEW, TAG_RECV, TAG_SEND, TAG_CLOSE, TAG_SHUTDOWN } tag_kind_t;

typedef struct {
    tag_kind_t kind;
    pds_rpc_call_t *call; /* NULL for TAG_SHUTDOWN */
} rpc_tag_t;

/* One queued send: a message, or the final status (msg == NULL). */
typedef struct send_item {
    struct send_item *next;
    grpc_byte_buffer *msg;
    grpc_status_code code;
    grpc_slice details;
} send_item_t;

typedef struct {
    char *name;
    pds_rpc_kind_t kind;
    const ProtobufCMessageDescriptor *request;
    pds_rpc_handler_fn handler;
    pds_rpc_cancel_fn on_cancel;
    void *arg;
} method_t;

struct pds_rpc_call {
    pthread_mutex_t mu;
    int refs; /* RPC layer (while gc is held) + handler (until reply/finish); under mu */

    /* Set on the RPC thread before the handler runs; read-only afterwards. */
    pds_rpc_server_t *srv; /* only dereferenced on the RPC thread, while gc is held */
    const method_t *m;     /* idem; NULL for an unknown method */
    pds_rpc_kind_t kind;
    char *method_name;
    int64_t deadline_ns;
    ProtobufCMessage *request;
    int max_queued;

    /* Filled by gRPC. */
    grpc_call *gc; /* NULL once released */
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *recv_bb;
    int close_cancelled;
    rpc_tag_t tag_new, tag_recv, tag_send, tag_close;

    /* Under mu. */
    void *data;
    bool closed;        /* CLOSE completed: no new batches */
    bool cancelled;     /* ... and it ended cancelled */
    bool finished;      /* final status queued (handler or layer) */
    bool handler_holds; /* handler got the call and has not finished it */
    bool initial_md_sent;
    bool send_busy;
    int inflight; /* batches started, not completed */
    int n_queued_msgs;
    send_item_t *q_head, *q_tail;
    send_item_t *batch[2]; /* items of the send batch in flight */
};

struct pds_rpc_server {
    grpc_server *gs;
    grpc_completion_queue *cq;
    int port;
    int max_queued;
    method_t *methods;
    int n_methods;
    pthread_t thread;
    bool started;
    rpc_tag_t shutdown_tag;

    pthread_mutex_t mu; /* guards the three flags below */
    pthread_cond_t cv;
    bool shutdown_requested;
    bool shutdown_seen; /* the shutdown tag came out of the CQ */
    bool shut;          /* pds_rpc_server_shutdown has completed */

    /* RPC thread only. */
    pds_rpc_call_t *pending; /* the outstanding grpc_server_request_call, if any */
    int live_calls;          /* calls whose gc we still hold */
};

/* ---- call objects -----------------------------------------------------------------------------
 */
static void item_free(send_item_t *it)
{
    if (!it) return;
    if (it->msg)
        grpc_byte_buffer_destroy(it->msg);
    else
        grpc_slice_unref(it->details);
    pds_free(it);
}

static pds_rpc_call_t *call_new(pds_rpc_server_t *srv)
{
    pds_rpc_call_t *c = pds_calloc(1, sizeof *c);
    if (!c) return NULL;
    pthread_mutex_init(&c->mu, NULL);
    c->refs = 1;
    c->srv = srv;
    c->max_queued = srv->max_queued;
    c->deadline_ns = INT64_MAX;
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    c->tag_new = (rpc_tag_t){TAG_NEW, c};
    c->tag_recv = (rpc_tag_t){TAG_RECV, c};
    c->tag_send = (rpc_tag_t){TAG_SEND, c};
    c->tag_close = (rpc_tag_t){TAG_CLOSE, c};
    return c;
}

static void call_free(pds_rpc_call_t *c)
{
    PDS_ASSERT(c->gc == NULL);
    while (c->q_head) {
        send_item_t *it = c->q_head;
        c->q_head = it->next;
        item_free(it);
    }
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    pds_rpc_msg_free(c->request);
    pds_free(c->method_name);
    pthread_mutex_destroy(&c->mu);
    pds_free(c);
}

static void call_unref(pds_rpc_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    int left = --c->refs;
    pthread_mutex_unlock(&c->mu);
    if (left == 0) call_free(c);
}

/* RPC thread, mu held. Lets go of gRPC's call once it is over and idle; true if the RPC layer's
 * reference must now be dropped (after unlocking). */
static bool call_release_locked(pds_rpc_call_t *c)
{
    if (!c->gc || !c->closed || c->inflight > 0) return false;
    grpc_call_unref(c->gc);
    c->gc = NULL;
    while (c->q_head) { /* sends that can no longer go anywhere */
        send_item_t *it = c->q_head;
        c->q_head = it->next;
        item_free(it);
    }
    c->q_tail = NULL;
    c->n_queued_msgs = 0;
    c->srv->live_calls--;
    c->srv = NULL;
    c->m = NULL;
    return true;
}

static void call_maybe_release(pds_rpc_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    bool drop = call_release_locked(c);
    pthread_mutex_unlock(&c->mu);
    if (drop) call_unref(c);
}

/* mu held, any thread. Starts the next send batch if none is in flight: initial metadata with the
 * first one, and the final status together with the last message. */
static void call_pump_locked(pds_rpc_call_t *c)
{
    if (c->send_busy || !c->q_head || !c->gc || c->closed) return;
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!c->initial_md_sent) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    send_item_t *first = c->q_head, *second = NULL;
    c->q_head = first->next;
    if (first->msg) {
        c->n_queued_msgs--;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = first->msg;
        if (c->q_head && !c->q_head->msg) {
            second = c->q_head;
            c->q_head = second->next;
        }
    } else {
        second = first;
        first = NULL;
    }
    if (!c->q_head) c->q_tail = NULL;
    if (second) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = second->code;
        ops[n++].data.send_status_from_server.status_details = &second->details;
    }
    grpc_call_error err = grpc_call_start_batch(c->gc, ops, n, &c->tag_send, NULL);
    if (err != GRPC_CALL_OK) {
        /* Only a bug in this file gets here; end the call rather than hang it. */
        PDS_LOG_ERROR("rpc", "grpc_call_start_batch method=%s err=%s", c->method_name,
                      grpc_call_error_to_string(err));
        item_free(first);
        item_free(second);
        grpc_call_cancel_with_status(c->gc, GRPC_STATUS_INTERNAL, "rpc send failed", NULL);
        return;
    }
    c->initial_md_sent = true;
    c->send_busy = true;
    c->inflight++;
    c->batch[0] = first;
    c->batch[1] = second;
}

/* mu held. Queues the final status (once) and pumps. */
static void call_queue_status_locked(pds_rpc_call_t *c, pds_status_t s, const char *message)
{
    if (c->finished) return;
    c->finished = true;
    if (!c->gc || c->closed) return;
    grpc_status_code code = (grpc_status_code)pds_rpc_status_to_code(s);
    const char *text = message ? message : pds_status_text(s);
    send_item_t *it = pds_calloc(1, sizeof *it);
    if (!it) { /* cannot queue: say it now, dropping any queued messages */
        grpc_call_cancel_with_status(c->gc, code, text, NULL);
        return;
    }
    it->code = code;
    it->details = grpc_slice_from_copied_string(text);
    if (c->q_tail)
        c->q_tail->next = it;
    else
        c->q_head = it;
    c->q_tail = it;
    call_pump_locked(c);
}

/* mu held. Queues a packed message (taking it). */
static pds_status_t call_queue_msg_locked(pds_rpc_call_t *c, grpc_byte_buffer *bb)
{
    if (c->finished) {
        grpc_byte_buffer_destroy(bb);
        return PDS_ERR(PDS_ERR_INVALID_ARG, "send after finish on %s", c->method_name);
    }
    if (!c->gc || c->closed) {
        grpc_byte_buffer_destroy(bb);
        return PDS_ERR(PDS_ERR_CANCELLED, "call %s has ended", c->method_name);
    }
    if (c->n_queued_msgs >= c->max_queued) {
        grpc_byte_buffer_destroy(bb);
        return PDS_ERR(PDS_ERR_EXHAUSTED, "%d messages already queued on %s", c->n_queued_msgs,
                       c->method_name);
    }
    send_item_t *it = pds_calloc(1, sizeof *it);
    if (!it) {
        grpc_byte_buffer_destroy(bb);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory to queue a message on %s", c->method_name);
    }
    it->msg = bb;
    if (c->q_tail)
        c->q_tail->next = it;
    else
        c->q_head = it;
    c->q_tail = it;
    c->n_queued_msgs++;
    call_pump_locked(c);
    return PDS_OK;
}

/* ---- call handle API --------------------------------------------------------------------------
 */
pds_status_t pds_rpc_call_send(pds_rpc_call_t *call, const ProtobufCMessage *msg)
{
    if (call->kind != PDS_RPC_SERVER_STREAM)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "send on unary call %s", call->method_name);
    grpc_byte_buffer *bb = rpc_pack(msg);
    if (!bb) return PDS_ERR_NO_MEMORY;
    pthread_mutex_lock(&call->mu);
    pds_status_t s = call_queue_msg_locked(call, bb);
    pthread_mutex_unlock(&call->mu);
    return s;
}

void pds_rpc_call_finish(pds_rpc_call_t *call, pds_status_t s, const char *message)
{
    pthread_mutex_lock(&call->mu);
    PDS_ASSERT(call->handler_holds); /* finished twice, or a handle the handler never got */
    call->handler_holds = false;
    call_queue_status_locked(call, s, message);
    pthread_mutex_unlock(&call->mu);
    call_unref(call);
}

void pds_rpc_call_reply(pds_rpc_call_t *call, const ProtobufCMessage *msg)
{
    if (msg) {
        grpc_byte_buffer *bb = rpc_pack(msg);
        if (!bb) {
            pds_rpc_call_finish(call, PDS_ERR_NO_MEMORY, "no memory to pack the reply");
            return;
        }
        pthread_mutex_lock(&call->mu);
        pds_status_t s = call_queue_msg_locked(call, bb);
        pthread_mutex_unlock(&call->mu);
        if (s != PDS_OK && s != PDS_ERR_CANCELLED) {
            pds_rpc_call_finish(call, s, pds_err_detail());
            return;
        }
    }
    pds_rpc_call_finish(call, PDS_OK, "");
}

bool pds_rpc_call_cancelled(pds_rpc_call_t *call)
{
    pthread_mutex_lock(&call->mu);
    bool c = call->cancelled;
    pthread_mutex_unlock(&call->mu);
    return c;
}

int64_t pds_rpc_call_deadline_ns(const pds_rpc_call_t *call)
{
    return call->deadline_ns;
}

const char *pds_rpc_call_method(const pds_rpc_call_t *call)
{
    return call->method_name;
}

void pds_rpc_call_set_data(pds_rpc_call_t *call, void *data)
{
    pthread_mutex_lock(&call->mu);
    call->data = data;
    pthread_mutex_unlock(&call->mu);
}

void *pds_rpc_call_data(const pds_rpc_call_t *call)
{
    pds_rpc_call_t *c = (pds_rpc_call_t *)call; /* the mutex is not part of the value */
    pthread_mutex_lock(&c->mu);
    void *d = c->data;
    pthread_mutex_unlock(&c->mu);
    return d;
}

/* ---- RPC thread: completions ------------------------------------------------------------------
 */
static bool shutdown_requested(pds_rpc_server_t *srv)
{
    pthread_mutex_lock(&srv->mu);
    bool r = srv->shutdown_requested;
    pthread_mutex_unlock(&srv->mu);
    return r;
}

/* Asks gRPC for the next incoming call (one outstanding request at a time). */
static void server_arm(pds_rpc_server_t *srv)
{
    if (srv->pending || shutdown_requested(srv)) return;
    pds_rpc_call_t *c = call_new(srv);
    if (!c) {
        PDS_LOG_ERROR("rpc", "no memory for a call; retrying in %d ms", REARM_RETRY_MS);
        return;
    }
    grpc_call_error err = grpc_server_request_call(srv->gs, &c->gc, &c->details, &c->md, srv->cq,
                                                   srv->cq, &c->tag_new);
    if (err != GRPC_CALL_OK) {
        PDS_LOG_ERROR("rpc", "grpc_server_request_call err=%s", grpc_call_error_to_string(err));
        call_free(c);
        return;
    }
    srv->pending = c;
}

static const method_t *server_find(const pds_rpc_server_t *srv, grpc_slice name)
{
    for (int i = 0; i < srv->n_methods; i++)
        if (grpc_slice_str_cmp(name, srv->methods[i].name) == 0) return &srv->methods[i];
    return NULL;
}

/* Starts a batch of one op; false (and logs) if gRPC refuses it. */
static bool call_start_one(pds_rpc_call_t *c, grpc_op *op, rpc_tag_t *tag)
{
    pthread_mutex_lock(&c->mu);
    grpc_call_error err = grpc_call_start_batch(c->gc, op, 1, tag, NULL);
    if (err == GRPC_CALL_OK) c->inflight++;
    pthread_mutex_unlock(&c->mu);
    if (err != GRPC_CALL_OK)
        PDS_LOG_ERROR("rpc", "grpc_call_start_batch op=%d method=%s err=%s", (int)op->op,
                      c->method_name, grpc_call_error_to_string(err));
    return err == GRPC_CALL_OK;
}

static void on_new(pds_rpc_server_t *srv, pds_rpc_call_t *c, bool ok)
{
    srv->pending = NULL;
    if (!ok) { /* server shutting down: no call came */
        if (c->gc) grpc_call_unref(c->gc);
        c->gc = NULL;
        call_free(c);
        return;
    }
    server_arm(srv);
    srv->live_calls++;
    grpc_slice name = c->details.method;
    c->method_name = pds_strndup((const char *)GRPC_SLICE_START_PTR(name), GRPC_SLICE_LENGTH(name));
    c->deadline_ns = rpc_deadline_to_ns(c->details.deadline);
    c->m = server_find(srv, name);
    if (c->m) c->kind = c->m->kind;

    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    if (!c->method_name || !call_start_one(c, &op, &c->tag_close)) {
        /* Without CLOSE we would never learn the end: give the call up now. */
        grpc_call_cancel_with_status(c->gc, GRPC_STATUS_INTERNAL, "rpc server error", NULL);
        pthread_mutex_lock(&c->mu);
        c->closed = c->cancelled = true;
        bool drop = call_release_locked(c);
        pthread_mutex_unlock(&c->mu);
        if (drop) call_unref(c);
        return;
    }
    if (!c->m) {
        PDS_LOG_DEBUG("rpc", "unimplemented method=%s", c->method_name);
        char msg[300];
        snprintf(msg, sizeof msg, "unknown method %s", c->method_name);
        pthread_mutex_lock(&c->mu);
        call_queue_status_locked(c, PDS_ERR_UNSUPPORTED, msg);
        pthread_mutex_unlock(&c->mu);
        return;
    }
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    if (!call_start_one(c, &op, &c->tag_recv)) {
        pthread_mutex_lock(&c->mu);
        call_queue_status_locked(c, PDS_ERR_INTERNAL, "rpc server error");
        pthread_mutex_unlock(&c->mu);
    }
}

static void on_recv(pds_rpc_call_t *c, bool ok)
{
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    pthread_mutex_lock(&c->mu);
    c->inflight--;
    bool alive = c->gc && !c->closed;
    pthread_mutex_unlock(&c->mu);

    pds_status_t s = PDS_OK;
    ProtobufCMessage *req = NULL;
    if (!ok || !bb)
        s = PDS_ERR(PDS_ERR_INVALID_ARG, "no request message");
    else
        s = rpc_unpack(bb, c->m->request, &req);
    if (bb) grpc_byte_buffer_destroy(bb);
    if (s != PDS_OK || !alive) {
        pds_rpc_msg_free(req);
        if (alive)
            PDS_LOG_DEBUG("rpc", "bad request method=%s detail=\"%s\"", c->method_name,
                          pds_err_detail());
        pthread_mutex_lock(&c->mu);
        call_queue_status_locked(c, s, pds_err_detail());
        pthread_mutex_unlock(&c->mu);
        call_maybe_release(c);
        return;
    }
    c->request = req;
    pthread_mutex_lock(&c->mu);
    c->handler_holds = true;
    c->refs++;
    pthread_mutex_unlock(&c->mu);
    c->m->handler(c, req, c->m->arg);
    call_maybe_release(c);
}

static void on_send(pds_rpc_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    c->inflight--;
    c->send_busy = false;
    item_free(c->batch[0]);
    item_free(c->batch[1]);
    c->batch[0] = c->batch[1] = NULL;
    call_pump_locked(c);
    bool drop = call_release_locked(c);
    pthread_mutex_unlock(&c->mu);
    if (drop) call_unref(c);
}

static void on_close(pds_rpc_call_t *c, bool ok)
{
    pthread_mutex_lock(&c->mu);
    c->inflight--;
    c->closed = true;
    c->cancelled = c->close_cancelled || !ok;
    bool notify = c->cancelled && c->handler_holds && c->m && c->m->on_cancel;
    pthread_mutex_unlock(&c->mu);
    if (notify) {
        PDS_LOG_DEBUG("rpc", "cancelled method=%s", c->method_name);
        c->m->on_cancel(c, c->m->arg);
    }
    call_maybe_release(c);
}

/* Runs until shutdown has been seen and gRPC has let go of every call. */
static void server_loop(pds_rpc_server_t *srv)
{
    server_arm(srv);
    for (;;) {
        pthread_mutex_lock(&srv->mu);
        bool done = srv->shutdown_seen;
        pthread_mutex_unlock(&srv->mu);
        if (done && srv->live_calls == 0 && !srv->pending) break;
        gpr_timespec deadline =
            srv->pending ? gpr_inf_future(GPR_CLOCK_MONOTONIC) : rpc_deadline(REARM_RETRY_MS);
        grpc_event ev = grpc_completion_queue_next(srv->cq, deadline, NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            server_arm(srv);
            continue;
        }
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break; /* not expected: we shut the CQ after this */
        rpc_tag_t *tag = ev.tag;
        switch (tag->kind) {
        case TAG_NEW:
            on_new(srv, tag->call, ev.success);
            break;
        case TAG_RECV:
            on_recv(tag->call, ev.success);
            break;
        case TAG_SEND:
            on_send(tag->call);
            break;
        case TAG_CLOSE:
            on_close(tag->call, ev.success);
            break;
        case TAG_SHUTDOWN:
            pthread_mutex_lock(&srv->mu);
            srv->shutdown_seen = true;
            pthread_cond_broadcast(&srv->cv);
            pthread_mutex_unlock(&srv->mu);
            break;
        }
    }
}

static void *server_thread(void *arg)
{
    server_loop(arg);
    return NULL;
}

/* ---- server lifecycle -------------------------------------------------------------------------
 */
pds_rpc_server_params_t pds_rpc_server_default_params(void)
{
    return (pds_rpc_server_params_t){.address = "127.0.0.1:0"};
}

static void cq_drain_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
}

pds_status_t pds_rpc_server_create(const pds_rpc_server_params_t *p, pds_rpc_server_t **out)
{
    if (!p || !p->address || !*p->address)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "server address missing");
    if (p->max_queued_sends < 0 || p->max_message_bytes < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "negative server limit");
    pds_rpc_server_t *srv = pds_calloc(1, sizeof *srv);
    if (!srv) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for an rpc server");
    srv->max_queued = p->max_queued_sends ? p->max_queued_sends : DEFAULT_MAX_QUEUED;
    srv->shutdown_tag = (rpc_tag_t){TAG_SHUTDOWN, NULL};
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cv, NULL);
    rpc_lib_ref();

    /* SO_REUSEPORT off: a second node on the same port must fail, not share the port. */
    grpc_arg args[2];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[0].value.integer = 0;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].value.integer = p->max_message_bytes ? p->max_message_bytes : DEFAULT_MAX_MSG_BYTES;
    grpc_channel_args chargs = {2, args};
    srv->cq = grpc_completion_queue_create_for_next(NULL);
    srv->gs = grpc_server_create(&chargs, NULL);
    grpc_server_register_completion_queue(srv->gs, srv->cq, NULL);
    grpc_server_credentials *creds = rpc_server_credentials();
    srv->port = grpc_server_add_http2_port(srv->gs, p->address, creds);
    grpc_server_credentials_release(creds);
    if (srv->port <= 0) {
        pds_status_t s = PDS_ERR(PDS_ERR_UNAVAILABLE, "cannot listen on %s", p->address);
        grpc_server_destroy(srv->gs); /* no listener, never started: allowed */
        cq_drain_destroy(srv->cq);
        rpc_lib_unref();
        pthread_cond_destroy(&srv->cv);
        pthread_mutex_destroy(&srv->mu);
        pds_free(srv);
        return s;
    }
    /* Started now so that shutdown is always legal; calls that arrive before
     * pds_rpc_server_start wait in gRPC until the RPC thread asks for them. */
    grpc_server_start(srv->gs);
    *out = srv;
    return PDS_OK;
}

int pds_rpc_server_port(const pds_rpc_server_t *srv)
{
    return srv->port;
}

pds_status_t pds_rpc_server_add_method(pds_rpc_server_t *srv, const pds_rpc_method_t *m)
{
    if (srv->started || srv->shut)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "methods must be added before start");
    if (!m->name || m->name[0] != '/' || !m->handler || !m->request)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "method needs a /path, a handler and a request type");
    if (m->kind != PDS_RPC_UNARY && m->kind != PDS_RPC_SERVER_STREAM)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "method %s: bad kind %d", m->name, (int)m->kind);
    for (int i = 0; i < srv->n_methods; i++)
        if (strcmp(srv->methods[i].name, m->name) == 0)
            return PDS_ERR(PDS_ERR_ALREADY_EXISTS, "method %s added twice", m->name);
    method_t *grown = pds_realloc(srv->methods, (size_t)(srv->n_methods + 1) * sizeof *grown);
    if (!grown) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for method %s", m->name);
    srv->methods = grown;
    char *name = pds_strdup(m->name);
    if (!name) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for method %s", m->name);
    srv->methods[srv->n_methods++] =
        (method_t){name, m->kind, m->request, m->handler, m->on_cancel, m->arg};
    return PDS_OK;
}

pds_status_t pds_rpc_server_start(pds_rpc_server_t *srv)
{
    if (srv->started || srv->shut)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "server already started or shut down");
    int rc = pthread_create(&srv->thread, NULL, server_thread, srv);
    if (rc != 0) return PDS_ERR(PDS_ERR_INTERNAL, "pthread_create: %s", strerror(rc));
    srv->started = true;
    PDS_LOG_INFO("rpc", "listening port=%d methods=%d", srv->port, srv->n_methods);
    return PDS_OK;
}

void pds_rpc_server_shutdown(pds_rpc_server_t *srv, int grace_ms)
{
    pthread_mutex_lock(&srv->mu);
    if (srv->shutdown_requested) { /* second caller: wait for the first to finish */
        while (!srv->shut) pthread_cond_wait(&srv->cv, &srv->mu);
        pthread_mutex_unlock(&srv->mu);
        return;
    }
    srv->shutdown_requested = true;
    pthread_mutex_unlock(&srv->mu);

    grpc_server_shutdown_and_notify(srv->gs, srv->cq, &srv->shutdown_tag);
    if (srv->started) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        int64_t ns = until.tv_nsec + (int64_t)(grace_ms > 0 ? grace_ms : 0) * 1000000;
        until.tv_sec += ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
        pthread_mutex_lock(&srv->mu);
        int rc = 0;
        while (!srv->shutdown_seen && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&srv->cv, &srv->mu, &until);
        bool seen = srv->shutdown_seen;
        pthread_mutex_unlock(&srv->mu);
        if (!seen) grpc_server_cancel_all_calls(srv->gs);
        pthread_join(srv->thread, NULL);
    } else {
        grpc_server_cancel_all_calls(srv->gs);
        server_loop(srv); /* no RPC thread: drain here */
    }
    grpc_server_destroy(srv->gs);
    srv->gs = NULL;
    cq_drain_destroy(srv->cq);
    srv->cq = NULL;
    PDS_LOG_INFO("rpc", "server stopped port=%d", srv->port);

    pthread_mutex_lock(&srv->mu);
    srv->shut = true;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
}

void pds_rpc_server_destroy(pds_rpc_server_t *srv)
{
    if (!srv) return;
    pds_rpc_server_shutdown(srv, 0);
    for (int i = 0; i < srv->n_methods; i++) pds_free(srv->methods[i].name);
    pds_free(srv->methods);
    pthread_cond_destroy(&srv->cv);
    pthread_mutex_destroy(&srv->mu);
    pds_free(srv);
    rpc_lib_unref();
}

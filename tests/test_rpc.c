/* Tests of common/rpc: a real server and client in one process on 127.0.0.1 (port 0), speaking the
 * real pdserve.v1 messages. Handlers run on the RPC thread; some hand their call to a worker
 * thread, as the node programs do. Waits are bounded (10 s) only so that a bug fails instead of
 * hanging; nothing asserts on how long anything took. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"

#define M_REGISTER "/pdserve.v1.RouterInternal/RegisterNode"
#define M_GENERATE "/pdserve.v1.Pdserve/Generate"
#define M_CANCEL   "/pdserve.v1.DecodeNode/Cancel"
#define WAIT_MS    10000

/* ---- what the handlers saw (one test per process: Criterion forks) ----------------------------
 */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint8_t register_bytes[4096]; /* the request as the server unpacked it, packed again */
    size_t register_len;
    int handler_calls;
    int cancel_calls;
    bool cancel_seen;
    pds_status_t send_after_cancel; /* what pds_rpc_call_send said once the client was gone */
    bool worker_done;
    int64_t deadline_ns; /* pds_rpc_call_deadline_ns seen by the Cancel handler */
    pthread_t workers[8];
    int n_workers;
} g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* Waits until *flag is true (under g.mu); false after WAIT_MS. */
static bool wait_flag(const bool *flag)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&g.mu);
    int rc = 0;
    while (!*flag && rc == 0) rc = pthread_cond_timedwait(&g.cv, &g.mu, &until);
    bool ok = *flag;
    pthread_mutex_unlock(&g.mu);
    return ok;
}

static void set_flag(bool *flag)
{
    pthread_mutex_lock(&g.mu);
    *flag = true;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
}

/* ---- handlers (cr_expect only: they run off the test's thread)
 * --------------------------------------------------------------------------------- */
/* RegisterNode: refuses a wrong magic like the router will; otherwise answers with values derived
 * from the request so the client can check every one. */
static void on_register(pds_rpc_call_t *call, const ProtobufCMessage *request, void *arg)
{
    const Pdserve__V1__NodeInfo *ni = (const Pdserve__V1__NodeInfo *)request;
    pthread_mutex_lock(&g.mu);
    g.handler_calls++;
    size_t n = protobuf_c_message_get_packed_size(request);
    if (n <= sizeof g.register_bytes)
        g.register_len = protobuf_c_message_pack(request, g.register_bytes);
    pthread_mutex_unlock(&g.mu);
    if (ni->magic != PDS_RPC_PROTOCOL_MAGIC) {
        char msg[128];
        snprintf(msg, sizeof msg, "node %s: protocol magic 0x%x, want 0x%x", ni->node_id, ni->magic,
                 PDS_RPC_PROTOCOL_MAGIC);
        pds_rpc_call_finish(call, PDS_ERR_FAILED_PRECONDITION, msg);
        return;
    }
    char router_id[96];
    snprintf(router_id, sizeof router_id, "router-for-%s", ni->node_id);
    Pdserve__V1__RegisterReply r = PDSERVE__V1__REGISTER_REPLY__INIT;
    r.router_id = router_id;
    r.router_epoch = ni->model_fingerprint ^ 1;
    r.report_interval_ms = ni->max_batch_seqs * 2;
    pds_rpc_call_reply(call, &r.base);
}

/* Sends output token i of a Generate call: id = base + i, text "t<i>". */
static pds_status_t send_chunk(pds_rpc_call_t *call, int32_t base, uint32_t i)
{
    int32_t id = base + (int32_t)i;
    char text[16];
    snprintf(text, sizeof text, "t%u", i);
    Pdserve__V1__TokenChunk chunk = PDSERVE__V1__TOKEN_CHUNK__INIT;
    chunk.n_ids = 1;
    chunk.ids = &id;
    chunk.text.data = (uint8_t *)text;
    chunk.text.len = strlen(text);
    chunk.index = i;
    Pdserve__V1__GenerateResponse resp = PDSERVE__V1__GENERATE_RESPONSE__INIT;
    resp.kind_case = PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK;
    resp.chunk = &chunk;
    return pds_rpc_call_send(call, &resp.base);
}

typedef struct {
    pds_rpc_call_t *call;
    int32_t base;
    uint32_t n;
    bool hold; /* send one token, then wait for the cancel and try once more */
} gen_job_t;

static void *gen_worker(void *arg)
{
    gen_job_t job = *(gen_job_t *)arg;
    pds_free(arg);
    if (job.hold) {
        (void)send_chunk(job.call, job.base, 0);
        bool seen = wait_flag(&g.cancel_seen);
        pds_status_t s = seen ? send_chunk(job.call, job.base, 1) : PDS_ERR_INTERNAL;
        pthread_mutex_lock(&g.mu);
        g.send_after_cancel = s;
        pthread_mutex_unlock(&g.mu);
        pds_rpc_call_finish(job.call, PDS_ERR_CANCELLED, "client went away");
        set_flag(&g.worker_done);
        return NULL;
    }
    for (uint32_t i = 2; i < job.n; i++) cr_expect_eq(send_chunk(job.call, job.base, i), PDS_OK);
    Pdserve__V1__Summary sum = PDSERVE__V1__SUMMARY__INIT;
    sum.request_id = "req-1";
    sum.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    sum.output_tokens = job.n;
    Pdserve__V1__GenerateResponse resp = PDSERVE__V1__GENERATE_RESPONSE__INIT;
    resp.kind_case = PDSERVE__V1__GENERATE_RESPONSE__KIND_SUMMARY;
    resp.summary = &sum;
    cr_expect_eq(pds_rpc_call_send(job.call, &resp.base), PDS_OK);
    pds_rpc_call_finish(job.call, PDS_OK, NULL);
    set_flag(&g.worker_done);
    return NULL;
}

/* Generate: prompt ids[0] is the base of the output ids. The first two tokens go out from the RPC
 * thread, the rest (and the summary) from a worker thread. request_id "hold" makes the worker
 * wait for a cancel instead. */
static void on_generate(pds_rpc_call_t *call, const ProtobufCMessage *request, void *arg)
{
    const Pdserve__V1__GenerateRequest *req = (const Pdserve__V1__GenerateRequest *)request;
    if (req->prompt_case != PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS ||
        req->token_ids->n_ids == 0) {
        pds_rpc_call_finish(call, PDS_ERR_INVALID_ARG, "token ids required");
        return;
    }
    if (strcmp(req->request_id, "flood") == 0) {
        /* Sends in a burst from the RPC thread: no send can complete meanwhile, so exactly
         * 1 (in flight) + max_queued_sends are taken. */
        pds_status_t s = PDS_OK;
        uint32_t i = 0;
        while (i < req->max_tokens && (s = send_chunk(call, req->token_ids->ids[0], i)) == PDS_OK)
            i++;
        char msg[128];
        snprintf(msg, sizeof msg, "took %u tokens, then %s", i, pds_status_name(s));
        pds_rpc_call_finish(call, s, msg);
        return;
    }
    gen_job_t *job = pds_malloc(sizeof *job);
    *job = (gen_job_t){call, req->token_ids->ids[0], req->max_tokens,
                       strcmp(req->request_id, "hold") == 0};
    if (!job->hold) {
        cr_expect_eq(send_chunk(call, job->base, 0), PDS_OK);
        cr_expect_eq(send_chunk(call, job->base, 1), PDS_OK);
    }
    pthread_mutex_lock(&g.mu);
    cr_expect_lt(g.n_workers, 8); /* (cr_expect: not on the test's thread) */
    pthread_create(&g.workers[g.n_workers++], NULL, gen_worker, job);
    pthread_mutex_unlock(&g.mu);
}

static void on_generate_cancel(pds_rpc_call_t *call, void *arg)
{
    pthread_mutex_lock(&g.mu);
    g.cancel_calls++;
    pthread_mutex_unlock(&g.mu);
    set_flag(&g.cancel_seen);
}

/* Cancel (used as "a handler that never answers"): records the deadline and holds the call until
 * it is cancelled; on_cancel finishes it. */
static void on_slow(pds_rpc_call_t *call, const ProtobufCMessage *request, void *arg)
{
    pthread_mutex_lock(&g.mu);
    g.deadline_ns = pds_rpc_call_deadline_ns(call);
    g.handler_calls++;
    pthread_mutex_unlock(&g.mu);
}

static void on_slow_cancel(pds_rpc_call_t *call, void *arg)
{
    cr_expect(pds_rpc_call_cancelled(call));
    pthread_mutex_lock(&g.mu);
    g.cancel_calls++;
    pthread_mutex_unlock(&g.mu);
    pds_rpc_call_finish(call, PDS_ERR_CANCELLED, "gave up");
    set_flag(&g.cancel_seen);
}

/* ---- fixture ----------------------------------------------------------------------------------
 */
static pds_rpc_server_t *srv;
static pds_rpc_channel_t *ch;
static pds_alloc_stats_t stats_before;

/* The server (with our three methods) and a channel to it. */
static void start(int max_queued_sends)
{
    pds_rpc_server_params_t p = pds_rpc_server_default_params();
    p.max_queued_sends = max_queued_sends;
    cr_assert_eq(pds_rpc_server_create(&p, &srv), PDS_OK, "%s", pds_err_detail());
    cr_assert_gt(pds_rpc_server_port(srv), 0);
    pds_rpc_method_t methods[] = {
        {M_REGISTER, PDS_RPC_UNARY, &pdserve__v1__node_info__descriptor, on_register, NULL, NULL},
        {M_GENERATE, PDS_RPC_SERVER_STREAM, &pdserve__v1__generate_request__descriptor, on_generate,
         on_generate_cancel, NULL},
        {M_CANCEL, PDS_RPC_UNARY, &pdserve__v1__cancel_request__descriptor, on_slow, on_slow_cancel,
         NULL},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(methods); i++)
        cr_assert_eq(pds_rpc_server_add_method(srv, &methods[i]), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_rpc_server_start(srv), PDS_OK);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", pds_rpc_server_port(srv));
    cr_assert_eq(pds_rpc_channel_create(target, &ch), PDS_OK);
}

static void setup(void)
{
    pds_alloc_stats(&stats_before);
    start(0);
}

static void close_all(void)
{
    pds_rpc_channel_destroy(ch);
    pds_rpc_server_destroy(srv);
    ch = NULL;
    srv = NULL;
    for (int i = 0; i < g.n_workers; i++) pthread_join(g.workers[i], NULL);
    g.n_workers = 0;
}

/* Ends a test: everything torn down and the workers joined, every pds_malloc the layer made (calls,
 * messages, packed buffers handed to gRPC) must have been freed. (In the test body: an assertion
 * in .fini would not fail the test.) */
static void expect_no_leaks(void)
{
    close_all();
    pds_alloc_stats_t after;
    pds_alloc_stats(&after);
    cr_expect_eq(after.live_blocks, stats_before.live_blocks, "leaked %lld pds blocks",
                 (long long)(after.live_blocks - stats_before.live_blocks));
}

TestSuite(rpc, .init = setup, .fini = close_all);

static Pdserve__V1__NodeInfo *node_info(Pdserve__V1__NodeInfo *ni, Pdserve__V1__KvGeometry *kv)
{
    static const uint8_t kvx_addr[] = {0x00, 0x01, 0xff, 0x00, 0x7f};
    *kv = (Pdserve__V1__KvGeometry)PDSERVE__V1__KV_GEOMETRY__INIT;
    kv->n_layers = 32;
    kv->n_kv_heads = 8;
    kv->head_dim = 128;
    kv->block_size = 16;
    kv->dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16;
    *ni = (Pdserve__V1__NodeInfo)PDSERVE__V1__NODE_INFO__INIT;
    ni->magic = PDS_RPC_PROTOCOL_MAGIC;
    ni->protocol_version = PDS_RPC_PROTOCOL_VERSION;
    ni->node_id = "decode-7";
    ni->role = PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE;
    ni->address = "10.0.0.7:7001";
    ni->kvx_backend = "ucx";
    ni->kvx_address = (ProtobufCBinaryData){sizeof kvx_addr, (uint8_t *)kvx_addr};
    ni->kv = kv;
    ni->total_kv_blocks = 4096;
    ni->model_name = "llama-3-8b";
    ni->model_fingerprint = 0x0123456789abcdefULL;
    ni->max_batch_seqs = 256;
    ni->max_context_tokens = 8192;
    return ni;
}

/* ---- tests ------------------------------------------------------------------------------------
 */
Test(rpc, unary_round_trip_carries_every_field_exactly)
{
    Pdserve__V1__NodeInfo ni;
    Pdserve__V1__KvGeometry kv;
    node_info(&ni, &kv);
    ProtobufCMessage *reply = NULL;
    cr_assert_eq(pds_rpc_channel_call(ch, M_REGISTER, &ni.base,
                                      &pdserve__v1__register_reply__descriptor, 5000, &reply),
                 PDS_OK, "%s", pds_err_detail());
    const Pdserve__V1__RegisterReply *r = (const Pdserve__V1__RegisterReply *)reply;
    cr_expect_str_eq(r->router_id, "router-for-decode-7");
    cr_expect_eq(r->router_epoch, 0x0123456789abcdeeULL);
    cr_expect_eq(r->report_interval_ms, 512);
    pds_rpc_msg_free(reply);

    /* The server's unpacked request packs to the very bytes the client packed. */
    uint8_t sent[4096];
    size_t n = protobuf_c_message_pack(&ni.base, sent);
    pthread_mutex_lock(&g.mu);
    cr_expect_eq(g.handler_calls, 1);
    cr_assert_eq(g.register_len, n);
    cr_expect_arr_eq(g.register_bytes, sent, n);
    pthread_mutex_unlock(&g.mu);
    expect_no_leaks();
}

Test(rpc, server_stream_delivers_all_messages_in_order_then_ok)
{
    int32_t prompt[] = {1000, 5, 6};
    Pdserve__V1__TokenIds ids = PDSERVE__V1__TOKEN_IDS__INIT;
    ids.n_ids = PDS_ARRAY_LEN(prompt);
    ids.ids = prompt;
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    req.request_id = "req-1";
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    req.max_tokens = 50;
    pds_rpc_stream_t *st = NULL;
    cr_assert_eq(pds_rpc_stream_open(ch, M_GENERATE, &req.base,
                                     &pdserve__v1__generate_response__descriptor, 10000, &st),
                 PDS_OK);
    for (uint32_t i = 0; i < 50; i++) {
        ProtobufCMessage *m = NULL;
        cr_assert_eq(pds_rpc_stream_next(st, &m), PDS_OK, "token %u: %s", i, pds_err_detail());
        cr_assert_not_null(m);
        const Pdserve__V1__GenerateResponse *resp = (const Pdserve__V1__GenerateResponse *)m;
        cr_assert_eq(resp->kind_case, PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK);
        cr_expect_eq(resp->chunk->index, i);
        cr_assert_eq(resp->chunk->n_ids, 1);
        cr_expect_eq(resp->chunk->ids[0], 1000 + (int32_t)i);
        char text[16];
        snprintf(text, sizeof text, "t%u", i);
        cr_expect_eq(resp->chunk->text.len, strlen(text));
        cr_expect_arr_eq(resp->chunk->text.data, text, strlen(text));
        pds_rpc_msg_free(m);
    }
    ProtobufCMessage *m = NULL;
    cr_assert_eq(pds_rpc_stream_next(st, &m), PDS_OK);
    const Pdserve__V1__GenerateResponse *resp = (const Pdserve__V1__GenerateResponse *)m;
    cr_assert_eq(resp->kind_case, PDSERVE__V1__GENERATE_RESPONSE__KIND_SUMMARY);
    cr_expect_eq(resp->summary->output_tokens, 50);
    cr_expect_eq(resp->summary->finish_reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    cr_expect_str_eq(resp->summary->request_id, "req-1");
    pds_rpc_msg_free(m);
    m = (ProtobufCMessage *)1;
    cr_expect_eq(pds_rpc_stream_next(st, &m), PDS_OK);
    cr_expect_null(m, "end of stream is OK with no message");
    cr_expect_eq(pds_rpc_stream_next(st, &m), PDS_OK, "and stays ended");
    cr_expect_null(m);
    pds_rpc_stream_destroy(st);
    cr_expect(wait_flag(&g.worker_done));
    expect_no_leaks();
}

Test(rpc, malformed_request_is_invalid_argument_and_skips_the_handler)
{
    /* Field 3 (node_id) claims 10 bytes but only 1 follows. */
    const uint8_t bad[] = {0x1a, 0x0a, 'x'};
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call_raw(
        ch, M_REGISTER, bad, sizeof bad, &pdserve__v1__register_reply__descriptor, 5000, &reply);
    cr_expect_eq(s, PDS_ERR_INVALID_ARG, "got %s", pds_status_name(s));
    cr_expect_str_eq(pds_err_detail(), "malformed pdserve.v1.NodeInfo");
    cr_expect_null(reply);
    pthread_mutex_lock(&g.mu);
    cr_expect_eq(g.handler_calls, 0);
    pthread_mutex_unlock(&g.mu);
    expect_no_leaks();
}

Test(rpc, handler_status_and_message_reach_the_client_exactly)
{
    Pdserve__V1__NodeInfo ni;
    Pdserve__V1__KvGeometry kv;
    node_info(&ni, &kv);
    ni.magic = 0x1234;
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call(ch, M_REGISTER, &ni.base,
                                          &pdserve__v1__register_reply__descriptor, 5000, &reply);
    cr_expect_eq(s, PDS_ERR_FAILED_PRECONDITION, "got %s", pds_status_name(s));
    cr_expect_str_eq(pds_err_detail(), "node decode-7: protocol magic 0x1234, want 0x70647376");
    cr_expect_null(reply);

    /* A streaming handler's error arrives the same way through next(). */
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    req.text = "hello";
    pds_rpc_stream_t *st = NULL;
    cr_assert_eq(pds_rpc_stream_open(ch, M_GENERATE, &req.base,
                                     &pdserve__v1__generate_response__descriptor, 5000, &st),
                 PDS_OK);
    ProtobufCMessage *m = NULL;
    cr_expect_eq(pds_rpc_stream_next(st, &m), PDS_ERR_INVALID_ARG);
    cr_expect_str_eq(pds_err_detail(), "token ids required");
    cr_expect_null(m);
    pds_rpc_stream_destroy(st);
    expect_no_leaks();
}

Test(rpc, deadline_expires_as_timeout_and_the_handler_sees_it)
{
    Pdserve__V1__CancelRequest req = PDSERVE__V1__CANCEL_REQUEST__INIT;
    req.request_id = "r";
    int64_t t0 = pds_time_now_ns();
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call(ch, M_CANCEL, &req.base,
                                          &pdserve__v1__cancel_reply__descriptor, 200, &reply);
    cr_expect_eq(s, PDS_ERR_TIMEOUT, "got %s (%s)", pds_status_name(s), pds_err_detail());
    cr_expect_null(reply);
    cr_assert(wait_flag(&g.cancel_seen), "on_cancel ran for the expired call");
    pthread_mutex_lock(&g.mu);
    cr_expect_eq(g.handler_calls, 1);
    cr_expect_eq(g.cancel_calls, 1);
    /* The server saw a real deadline, after the call began and no later than its 200 ms (plus
     * clock-conversion slack). */
    cr_expect_neq(g.deadline_ns, INT64_MAX);
    cr_expect_gt(g.deadline_ns, t0);
    cr_expect_leq(g.deadline_ns, t0 + 250 * 1000000LL);
    pthread_mutex_unlock(&g.mu);
    expect_no_leaks();
}

Test(rpc, client_cancel_is_observed_by_the_handler)
{
    int32_t prompt[] = {7};
    Pdserve__V1__TokenIds ids = PDSERVE__V1__TOKEN_IDS__INIT;
    ids.n_ids = 1;
    ids.ids = prompt;
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    req.request_id = "hold";
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    pds_rpc_stream_t *st = NULL;
    cr_assert_eq(pds_rpc_stream_open(ch, M_GENERATE, &req.base,
                                     &pdserve__v1__generate_response__descriptor, 0, &st),
                 PDS_OK);
    ProtobufCMessage *m = NULL;
    cr_assert_eq(pds_rpc_stream_next(st, &m), PDS_OK);
    cr_assert_not_null(m);
    cr_expect_eq(((Pdserve__V1__GenerateResponse *)m)->chunk->ids[0], 7);
    pds_rpc_msg_free(m);

    pds_rpc_stream_cancel(st);
    m = NULL;
    cr_expect_eq(pds_rpc_stream_next(st, &m), PDS_ERR_CANCELLED);
    cr_expect_null(m);
    cr_assert(wait_flag(&g.cancel_seen), "server's on_cancel ran");
    cr_assert(wait_flag(&g.worker_done));
    pthread_mutex_lock(&g.mu);
    cr_expect_eq(g.cancel_calls, 1);
    cr_expect_eq(g.send_after_cancel, PDS_ERR_CANCELLED, "sends fail once the client is gone");
    pthread_mutex_unlock(&g.mu);
    pds_rpc_stream_destroy(st);
}

static void *stream_reader(void *arg)
{
    pds_rpc_stream_t *st = arg;
    ProtobufCMessage *m = NULL;
    pds_status_t s;
    while ((s = pds_rpc_stream_next(st, &m)) == PDS_OK && m) pds_rpc_msg_free(m);
    return (void *)(intptr_t)s;
    expect_no_leaks();
}

Test(rpc, shutdown_with_calls_in_flight_cancels_them_and_frees_everything)
{
    int32_t prompt[] = {42};
    Pdserve__V1__TokenIds ids = PDSERVE__V1__TOKEN_IDS__INIT;
    ids.n_ids = 1;
    ids.ids = prompt;
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    req.request_id = "hold";
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    pds_rpc_stream_t *st = NULL;
    cr_assert_eq(pds_rpc_stream_open(ch, M_GENERATE, &req.base,
                                     &pdserve__v1__generate_response__descriptor, 0, &st),
                 PDS_OK);
    ProtobufCMessage *m = NULL;
    cr_assert_eq(pds_rpc_stream_next(st, &m), PDS_OK);
    cr_assert_not_null(m);
    pds_rpc_msg_free(m);
    pthread_t reader;
    pthread_create(&reader, NULL, stream_reader, st); /* blocked in next() during shutdown */

    /* Destroy the server while the handler's worker still holds the call. */
    pds_rpc_server_destroy(srv);
    srv = NULL;
    cr_assert(wait_flag(&g.cancel_seen), "on_cancel ran for the call cut by shutdown");
    cr_assert(wait_flag(&g.worker_done), "the worker finished its call after the server was gone");
    void *rs;
    pthread_join(reader, &rs);
    pds_status_t s = (pds_status_t)(intptr_t)rs;
    cr_expect(s != PDS_OK, "the client sees the stream fail, got %s", pds_status_name(s));
    pthread_mutex_lock(&g.mu);
    cr_expect_eq(g.send_after_cancel, PDS_ERR_CANCELLED);
    pthread_mutex_unlock(&g.mu);
    pds_rpc_stream_destroy(st);
    expect_no_leaks();
}

Test(rpc, unknown_method_is_unimplemented)
{
    const uint8_t empty[1] = {0};
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call_raw(ch, "/pdserve.v1.Pdserve/NoSuchMethod", empty, 0,
                                              &pdserve__v1__health_reply__descriptor, 5000, &reply);
    cr_expect_eq(s, PDS_ERR_UNSUPPORTED, "got %s", pds_status_name(s));
    cr_expect_str_eq(pds_err_detail(), "unknown method /pdserve.v1.Pdserve/NoSuchMethod");
    cr_expect_null(reply);
    expect_no_leaks();
}

Test(rpc, unreachable_peer_is_unavailable)
{
    /* A port that was just bound and released: nothing listens there. */
    pds_rpc_server_params_t p = pds_rpc_server_default_params();
    pds_rpc_server_t *tmp = NULL;
    cr_assert_eq(pds_rpc_server_create(&p, &tmp), PDS_OK);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", pds_rpc_server_port(tmp));
    pds_rpc_server_destroy(tmp);
    pds_rpc_channel_t *dead = NULL;
    cr_assert_eq(pds_rpc_channel_create(target, &dead), PDS_OK);
    Pdserve__V1__HealthRequest req = PDSERVE__V1__HEALTH_REQUEST__INIT;
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call(dead, "/pdserve.v1.Pdserve/Health", &req.base,
                                          &pdserve__v1__health_reply__descriptor, 5000, &reply);
    cr_expect_eq(s, PDS_ERR_UNAVAILABLE, "got %s (%s)", pds_status_name(s), pds_err_detail());
    cr_expect_null(reply);
    pds_rpc_channel_destroy(dead);
    expect_no_leaks();
}

Test(rpc, port_in_use_and_bad_methods_are_refused)
{
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", pds_rpc_server_port(srv));
    pds_rpc_server_params_t p = pds_rpc_server_default_params();
    p.address = addr;
    pds_rpc_server_t *second = NULL;
    cr_expect_eq(pds_rpc_server_create(&p, &second), PDS_ERR_UNAVAILABLE);
    cr_expect_null(second);

    p = pds_rpc_server_default_params();
    cr_assert_eq(pds_rpc_server_create(&p, &second), PDS_OK);
    pds_rpc_method_t m = {M_REGISTER,  PDS_RPC_UNARY, &pdserve__v1__node_info__descriptor,
                          on_register, NULL,          NULL};
    cr_expect_eq(pds_rpc_server_add_method(second, &m), PDS_OK);
    cr_expect_eq(pds_rpc_server_add_method(second, &m), PDS_ERR_ALREADY_EXISTS);
    m.name = "no-slash";
    cr_expect_eq(pds_rpc_server_add_method(second, &m), PDS_ERR_INVALID_ARG);
    m.name = "/x/y";
    m.handler = NULL;
    cr_expect_eq(pds_rpc_server_add_method(second, &m), PDS_ERR_INVALID_ARG);
    pds_rpc_server_destroy(second); /* never started: still shuts down cleanly */
    expect_no_leaks();
}

Test(rpc, status_mapping_round_trips_and_collapses_as_documented)
{
    const pds_status_t kept[] = {PDS_OK,
                                 PDS_ERR_INVALID_ARG,
                                 PDS_ERR_OUT_OF_RANGE,
                                 PDS_ERR_NOT_FOUND,
                                 PDS_ERR_ALREADY_EXISTS,
                                 PDS_ERR_EXHAUSTED,
                                 PDS_ERR_TIMEOUT,
                                 PDS_ERR_CANCELLED,
                                 PDS_ERR_UNAVAILABLE,
                                 PDS_ERR_FAILED_PRECONDITION,
                                 PDS_ERR_UNSUPPORTED,
                                 PDS_ERR_CORRUPT,
                                 PDS_ERR_INTERNAL};
    for (size_t i = 0; i < PDS_ARRAY_LEN(kept); i++)
        cr_expect_eq(pds_rpc_status_from_code(pds_rpc_status_to_code(kept[i])), kept[i], "%s",
                     pds_status_name(kept[i]));
    cr_expect_eq(pds_rpc_status_to_code(PDS_OK), 0);
    cr_expect_eq(pds_rpc_status_to_code(PDS_ERR_PARSE), 3);        /* INVALID_ARGUMENT */
    cr_expect_eq(pds_rpc_status_to_code(PDS_ERR_TIMEOUT), 4);      /* DEADLINE_EXCEEDED */
    cr_expect_eq(pds_rpc_status_to_code(PDS_ERR_NO_MEMORY), 8);    /* RESOURCE_EXHAUSTED */
    cr_expect_eq(pds_rpc_status_to_code(PDS_ERR_UNSUPPORTED), 12); /* UNIMPLEMENTED */
    cr_expect_eq(pds_rpc_status_to_code(PDS_ERR_TRANSPORT), 14);   /* UNAVAILABLE */
    cr_expect_eq(pds_rpc_status_to_code(PDS_ERR_IO), 13);          /* INTERNAL */
    cr_expect_eq(pds_rpc_status_to_code((pds_status_t)-999), 13);
    cr_expect_eq(pds_rpc_status_from_code(2), PDS_ERR_INTERNAL); /* UNKNOWN */
    cr_expect_eq(pds_rpc_status_from_code(7), PDS_ERR_INTERNAL); /* PERMISSION_DENIED */
    cr_expect_eq(pds_rpc_status_from_code(99), PDS_ERR_INTERNAL);
}

Test(rpc, a_reader_too_slow_makes_send_fail_after_max_queued_sends)
{
    close_all();
    start(4);
    int32_t prompt[] = {300};
    Pdserve__V1__TokenIds ids = PDSERVE__V1__TOKEN_IDS__INIT;
    ids.n_ids = 1;
    ids.ids = prompt;
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    req.request_id = "flood";
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &ids;
    req.max_tokens = 100;
    pds_rpc_stream_t *st = NULL;
    cr_assert_eq(pds_rpc_stream_open(ch, M_GENERATE, &req.base,
                                     &pdserve__v1__generate_response__descriptor, 10000, &st),
                 PDS_OK);
    for (int i = 0; i < 5; i++) {
        ProtobufCMessage *m = NULL;
        cr_assert_eq(pds_rpc_stream_next(st, &m), PDS_OK, "token %d: %s", i, pds_err_detail());
        cr_assert_not_null(m);
        cr_expect_eq(((Pdserve__V1__GenerateResponse *)m)->chunk->ids[0], 300 + i);
        pds_rpc_msg_free(m);
    }
    ProtobufCMessage *m = NULL;
    cr_expect_eq(pds_rpc_stream_next(st, &m), PDS_ERR_EXHAUSTED);
    cr_expect_str_eq(pds_err_detail(), "took 5 tokens, then PDS_ERR_EXHAUSTED");
    cr_expect_null(m);
    pds_rpc_stream_destroy(st);
    expect_no_leaks();
}

/* The Python example client (deploy/python) against this C server: it generates its stubs from
 * proto/pdserve.proto with protoc, streams Generate and must print exactly the tokens sent. */
Test(rpc, python_client_streams_the_generated_tokens)
{
    if (access("/usr/bin/python3", X_OK) != 0 ||
        system("/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null") != 0 ||
        system("command -v protoc >/dev/null && test -x /usr/bin/grpc_python_plugin") != 0) {
        expect_no_leaks();
        cr_skip_test("needs /usr/bin/python3 with grpc + protobuf, protoc, grpc_python_plugin");
    }
    char src[512];
    const char *env = getenv("PDS_SOURCE_DIR");
    if (env) {
        snprintf(src, sizeof src, "%s", env);
    } else { /* __FILE__ is <src>/tests/test_rpc.c */
        snprintf(src, sizeof src, "%s", __FILE__);
        char *cut = strstr(src, "/tests/test_rpc.c");
        cr_assert_not_null(cut, "set PDS_SOURCE_DIR");
        *cut = '\0';
    }
    char stubs[] = "/tmp/pds-rpc-py-XXXXXX";
    cr_assert_not_null(mkdtemp(stubs));
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 %s/deploy/python/pdserve_client.py --stubs-dir %s generate "
             "--target 127.0.0.1:%d --tokens 1000,1,2 --request-id req-1 --max-tokens 20 "
             "--json --timeout 20",
             src, stubs, pds_rpc_server_port(srv));
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    char out[8192];
    size_t n = fread(out, 1, sizeof out - 1, f);
    out[n] = '\0';
    int rc = pclose(f);
    snprintf(cmd, sizeof cmd, "rm -rf %s", stubs);
    cr_expect_eq(system(cmd), 0);
    cr_assert_eq(rc, 0, "client failed; output:\n%s", out);

    char want[4096];
    size_t w = 0;
    for (int i = 0; i < 20; i++)
        w += (size_t)snprintf(want + w, sizeof want - w,
                              "{\"ids\":[%d],\"index\":%d,\"text\":\"t%d\",\"type\":\"chunk\"}\n",
                              1000 + i, i, i);
    cr_assert(strncmp(out, want, w) == 0, "chunks differ; got:\n%s", out);
    const char *summary = out + w;
    cr_expect(strstr(summary, "\"type\":\"summary\"") != NULL, "got: %s", summary);
    cr_expect(strstr(summary, "\"output_tokens\":20") != NULL, "got: %s", summary);
    cr_expect(strstr(summary, "\"finish_reason\":\"FINISH_REASON_LENGTH\"") != NULL);
    cr_expect(strstr(summary, "\"request_id\":\"req-1\"") != NULL);
    expect_no_leaks();
}

/* Tests of the decode node (decode-node/), in two layers.
 *
 * 1. The scheduler in-process (test names sched_* / streams_*): a real CPU engine and a real
 *    loopback kvx on each side, the test playing the prefill node (compute the prompt on its own
 *    engine, send the KV with pds_kvx_send_*), and a FAKE call sink standing in for gRPC calls —
 *    the fake exists only in this file: it records replies, statuses and stream messages. The
 *    scheduler runs on the test thread (pds_decode_sched_run_once), so every step is deterministic.
 * 2. The program (node_*): bin/pdserve-decode started with the tiny preset, kvx over UCX on
 *    loopback TCP and no router; the test talks to it through pds_rpc and pds_kvx (UCX) exactly as
 *    a prefill node and a router would.
 *
 * The oracle everywhere is pds_engine_generate on an engine with the same preset and seed: the
 * tokens that reach the router must be the same, token for token. Waits are bounded only so that a
 * bug fails instead of hanging; nothing asserts on how long anything took.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "decode-node/sched.h"
#include "decode-node/service.h"
#include "engine/engine.h"
#include "kvx/kvx.h"
#include "node/node.h"
#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"

#define SEED     1
#define ROUTER   "router-t"
#define MAX_OUT  160
#define PUMP_MAX 200000
#define WAIT_MS  30000
#define BS       16

/* ---- reference ------------------------------------------------------------------------------ */
static pds_engine_t *tiny_engine(int n_blocks, int max_batch_tokens)
{
    pds_model_config_t cfg;
    cr_assert_eq(pds_model_preset("tiny", &cfg), PDS_OK);
    pds_engine_params_t p = pds_engine_default_params();
    p.block_size = BS;
    p.n_kv_blocks = n_blocks;
    p.n_threads = 1;
    if (max_batch_tokens) p.max_batch_tokens = max_batch_tokens;
    pds_engine_t *e = NULL;
    cr_assert_eq(pds_engine_create_synth(&cfg, SEED, &p, &e), PDS_OK, "%s", pds_err_detail());
    return e;
}

typedef struct {
    char id[32];
    int32_t prompt[520];
    int n_prompt;
    pds_sample_params_t sp;
    bool seeded;
    int max_tokens;
    int32_t stop[4];
    int n_stop;
    bool ignore_eos;
    /* what pds_engine_generate says */
    int32_t want[MAX_OUT];
    int n_want;
    pds_finish_reason_t why;
    /* what the decode node produced (got[0] = the prefill's first token) */
    int32_t got[MAX_OUT];
    int n_got;
    bool finished;
    int reason;
    int seq_msgs;
} req_t;

static void req_init(req_t *r, const char *id, int n_prompt, int salt, int max_tokens)
{
    memset(r, 0, sizeof *r);
    snprintf(r->id, sizeof r->id, "%s", id);
    r->n_prompt = n_prompt;
    for (int i = 0; i < n_prompt; i++) r->prompt[i] = (int32_t)((i * 37 + salt * 11 + 3) % 272);
    r->sp = pds_sample_default_params();
    r->max_tokens = max_tokens;
}

static void req_seeded(req_t *r, float temp, int top_k, float top_p, uint64_t seed)
{
    r->sp.temperature = temp;
    r->sp.top_k = top_k;
    r->sp.top_p = top_p;
    r->sp.seed = seed;
    r->seeded = true;
}

static void reference(pds_engine_t *e, req_t *r)
{
    pds_gen_request_t g = {.prompt = r->prompt,
                           .n_prompt = r->n_prompt,
                           .max_new_tokens = r->max_tokens,
                           .sample = r->sp,
                           .stop = r->stop,
                           .n_stop = r->n_stop,
                           .ignore_eos = r->ignore_eos};
    cr_assert_eq(pds_engine_generate(e, &g, r->want, &r->n_want, &r->why, NULL, NULL), PDS_OK, "%s",
                 pds_err_detail());
}

/* The decode node's tokens equal generate's, and it finished for the same reason. */
static void expect_same(const req_t *r)
{
    cr_assert(r->finished, "%s: no finished SeqTokens (got %d tokens)", r->id, r->n_got);
    cr_assert_eq(r->n_got, r->n_want, "%s: %d tokens, generate made %d", r->id, r->n_got,
                 r->n_want);
    for (int i = 0; i < r->n_want; i++)
        cr_assert_eq(r->got[i], r->want[i], "%s: token %d is %d, generate says %d", r->id, i,
                     r->got[i], r->want[i]);
    int want_reason = r->why == PDS_FINISH_LENGTH ? PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH
                      : r->why == PDS_FINISH_CONTEXT
                          ? PDSERVE__V1__FINISH_REASON__FINISH_REASON_CONTEXT
                          : -1;
    if (want_reason < 0)
        cr_assert(r->reason == PDSERVE__V1__FINISH_REASON__FINISH_REASON_STOP ||
                      r->reason == PDSERVE__V1__FINISH_REASON__FINISH_REASON_EOS,
                  "%s: reason %d, generate stopped on a stop/EOS token", r->id, r->reason);
    else
        cr_assert_eq(r->reason, want_reason, "%s: reason %d, want %d", r->id, r->reason,
                     want_reason);
}

/* Applies one SeqTokens to the request it names (index 1.. since n_generated is 0). */
static void apply_seq(req_t *reqs, int n, const Pdserve__V1__SeqTokens *s)
{
    for (int k = 0; k < n; k++) {
        req_t *r = &reqs[k];
        if (strcmp(r->id, s->request_id) != 0) continue;
        cr_assert(!r->finished, "%s: SeqTokens after finished", r->id);
        cr_assert_eq((int)s->index, r->n_got, "%s: index %u, expected %d (gap or repeat)", r->id,
                     s->index, r->n_got);
        for (size_t i = 0; i < s->n_token_ids && r->n_got < MAX_OUT; i++)
            r->got[r->n_got++] = s->token_ids[i];
        r->seq_msgs++;
        if (s->finished) {
            r->finished = true;
            r->reason = s->finish_reason;
            cr_assert(s->timings, "%s: finished without timings", r->id);
        }
        return;
    }
}

/* ---- request messages (live until their call is answered) -------------------------------- */
typedef struct {
    Pdserve__V1__OpenTransferRequest m;
    Pdserve__V1__KvGeometry kv;
    Pdserve__V1__SamplingParams sp;
    int32_t ids[600];
    int32_t stop[4];
} open_msg_t;

static void open_msg(open_msg_t *o, const req_t *r, const char *backend)
{
    pdserve__v1__open_transfer_request__init(&o->m);
    pdserve__v1__kv_geometry__init(&o->kv);
    pdserve__v1__sampling_params__init(&o->sp);
    memcpy(o->ids, r->prompt, (size_t)r->n_prompt * sizeof *o->ids);
    memcpy(o->stop, r->stop, sizeof o->stop);
    o->kv.n_layers = 2;
    o->kv.n_kv_heads = 2;
    o->kv.head_dim = 16;
    o->kv.block_size = BS;
    o->kv.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    o->sp.temperature = r->sp.temperature;
    o->sp.top_k = r->sp.top_k;
    o->sp.top_p = r->sp.top_p;
    if (r->seeded) {
        o->sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        o->sp.seed = r->sp.seed;
    }
    o->m.request_id = (char *)r->id;
    o->m.n_tokens = (uint32_t)r->n_prompt;
    o->m.n_token_ids = (size_t)r->n_prompt;
    o->m.token_ids = o->ids;
    o->m.sampling = &o->sp;
    o->m.max_tokens = (uint32_t)r->max_tokens;
    o->m.n_stop_token_ids = (size_t)r->n_stop;
    o->m.stop_token_ids = o->stop;
    o->m.ignore_eos = r->ignore_eos;
    o->m.router_id = (char *)ROUTER;
    o->m.prefill_node_id = (char *)"prefill-test";
    o->m.kvx_backend = (char *)backend;
    o->m.kv = &o->kv;
}

/* Computes r's prompt on the prefill engine pe, sends its KV into the blocks of `rep` through px,
 * and returns the sender's commit verdict; r->got[0] is the first token. */
static pds_status_t prefill_send(pds_engine_t *pe, pds_kvx_t *px, req_t *r,
                                 const Pdserve__V1__OpenTransferReply *rep)
{
    pds_kv_pool_t *pool = pds_engine_kv_pool(pe);
    pds_kv_seq_t kv;
    pds_kv_seq_init(&kv);
    cr_assert_eq(pds_kv_seq_grow(&kv, pool, BS, r->n_prompt, NULL), PDS_OK);
    int32_t first = -1;
    pds_engine_seq_t s = {.tokens = r->prompt,
                          .n_tokens = r->n_prompt,
                          .kv = &kv,
                          .sample = &r->sp,
                          .token_out = &first};
    cr_assert_eq(pds_engine_forward(pe, &s, 1, NULL, NULL), PDS_OK, "%s", pds_err_detail());
    r->got[0] = first;
    r->n_got = 1;
    cr_assert_eq((int)rep->n_block_ids, kv.n_blocks);
    pds_engine_info_t info;
    pds_engine_info(pe, &info);
    pds_kvx_send_t *t = NULL;
    cr_assert_eq(pds_kvx_send_open(px, rep->kvx_receiver_address.data,
                                   rep->kvx_receiver_address.len, rep->kvx_rkey.data,
                                   rep->kvx_rkey.len, &info.kv, rep->transfer_id,
                                   (int)rep->n_block_ids, rep->block_ids, &t),
                 PDS_OK, "%s", pds_err_detail());
    for (int l = 0; l < info.kv.n_layers; l++) {
        void *base;
        size_t bytes;
        bool dev;
        cr_assert_eq(pds_engine_kv_layer_memory(pe, l, &base, &bytes, &dev), PDS_OK);
        cr_assert_eq(pds_kvx_send_layer(t, l, base, kv.blocks), PDS_OK, "%s", pds_err_detail());
    }
    pds_status_t st = pds_kvx_send_commit(t, WAIT_MS);
    pds_kvx_send_close(t);
    pds_kv_seq_release(&kv, pool);
    pds_kv_seq_fini(&kv);
    return st;
}

/* ================================================================================================
 * 1. The scheduler in-process, with a fake call sink
 * ============================================================================================== */

/* FAKE gRPC call: records what the scheduler answered. Copies go through pack/unpack. */
typedef struct {
    bool done;
    pds_status_t status;
    char msg[512];
    ProtobufCMessage *reply;
    ProtobufCMessage *sent[4096];
    int n_sent, n_read;
    pds_status_t refuse; /* non-OK: every send answers this (peer gone / backlog) */
} fake_call_t;

static ProtobufCMessage *msg_copy(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n + 1);
    protobuf_c_message_pack(m, buf);
    ProtobufCMessage *c = protobuf_c_message_unpack(m->descriptor, NULL, n, buf);
    free(buf);
    return c; /* NULL on failure: callers on the test thread assert */
}

static pds_status_t fake_send(void *call, const ProtobufCMessage *msg)
{
    fake_call_t *c = call;
    cr_assert(!c->done, "send on a finished call");
    if (c->refuse != PDS_OK) return c->refuse;
    cr_assert(c->n_sent < 4096);
    c->sent[c->n_sent] = msg_copy(msg);
    cr_assert(c->sent[c->n_sent++], "message copy");
    return PDS_OK;
}

static void fake_reply(void *call, const ProtobufCMessage *msg)
{
    fake_call_t *c = call;
    cr_assert(!c->done, "reply on a finished call");
    if (msg) cr_assert((c->reply = msg_copy(msg)), "message copy");
    c->status = PDS_OK;
    c->done = true;
}

static void fake_finish(void *call, pds_status_t s, const char *message)
{
    fake_call_t *c = call;
    cr_assert(!c->done, "finish on a finished call");
    c->status = s;
    snprintf(c->msg, sizeof c->msg, "%s", message ? message : "");
    c->done = true;
}

static fake_call_t *fake_new(void)
{
    fake_call_t *c = calloc(1, sizeof *c);
    cr_assert(c);
    return c;
}

static void fake_free(fake_call_t *c)
{
    if (!c) return;
    protobuf_c_message_free_unpacked(c->reply, NULL);
    for (int i = 0; i < c->n_sent; i++) protobuf_c_message_free_unpacked(c->sent[i], NULL);
    free(c);
}

static struct {
    pds_engine_t *de, *pe;
    pds_kvx_hub_t *hub;
    pds_kvx_t *dx, *px;
    pds_decode_sched_t *s;
    fake_call_t *stream;
    uint64_t next_stream;
} R;

static void rig_up(int decode_blocks, int decode_batch_tokens, int max_seqs, int64_t timeout_ms)
{
    memset(&R, 0, sizeof R);
    R.de = tiny_engine(decode_blocks, decode_batch_tokens);
    R.pe = tiny_engine(0, 0);
    cr_assert_eq(pds_kvx_hub_create(&R.hub), PDS_OK);
    pds_kvx_params_t kp = pds_kvx_default_params();
    kp.backend = PDS_KVX_LOOPBACK;
    kp.hub = R.hub;
    cr_assert_eq(pds_kvx_create(&kp, &R.dx), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_create(&kp, &R.px), PDS_OK, "%s", pds_err_detail());
    pds_engine_info_t info;
    pds_engine_info(R.de, &info);
    void *bases[2];
    for (int l = 0; l < 2; l++) {
        size_t bytes;
        bool dev;
        cr_assert_eq(pds_engine_kv_layer_memory(R.de, l, &bases[l], &bytes, &dev), PDS_OK);
    }
    const void *pool, *addr;
    size_t pool_len, addr_len;
    cr_assert_eq(pds_kvx_register_pool(R.dx, &info.kv, bases, PDS_KVX_MEM_HOST, &pool, &pool_len),
                 PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_address(R.dx, &addr, &addr_len), PDS_OK);
    pds_decode_sched_params_t sp = {
        .node_id = "decode-test",
        .engine = R.de,
        .kvx = R.dx,
        .kvx_backend = "loopback",
        .kvx_address = addr,
        .kvx_address_len = addr_len,
        .pool_blob = pool,
        .pool_blob_len = pool_len,
        .transfer_timeout_ms = timeout_ms,
        .max_batch_seqs = max_seqs,
        .calls = {fake_send, fake_reply, fake_finish},
    };
    cr_assert_eq(pds_decode_sched_create(&sp, &R.s), PDS_OK, "%s", pds_err_detail());
    R.next_stream = 1;
}

static void rig_down(void)
{
    pds_decode_sched_destroy(R.s);
    pds_kvx_destroy(R.px);
    pds_kvx_destroy(R.dx);
    pds_kvx_hub_destroy(R.hub);
    pds_engine_destroy(R.pe);
    pds_engine_destroy(R.de);
}

/* Runs the loop until `cond` holds (bounded by iterations, not time). */
#define PUMP_UNTIL(cond)                                                        \
    do {                                                                        \
        int pump_i_ = 0;                                                        \
        while (!(cond) && pump_i_++ < PUMP_MAX) pds_decode_sched_run_once(R.s); \
        cr_assert((cond), "never happened: %s", #cond);                         \
    } while (0)

/* Runs until the loop has nothing left to do. */
static void pump_idle(void)
{
    int i = 0;
    while (pds_decode_sched_run_once(R.s) && i++ < PUMP_MAX) {
    }
    cr_assert(i < PUMP_MAX, "scheduler never went idle");
}

static pds_decode_stats_t stats(void)
{
    pds_decode_stats_t st;
    pds_decode_sched_snapshot(R.s, &st);
    return st;
}

static fake_call_t *stream_open(const char *router)
{
    static Pdserve__V1__TokenStreamRequest reqs[8];
    static int n;
    Pdserve__V1__TokenStreamRequest *q = &reqs[n++ % 8];
    pdserve__v1__token_stream_request__init(q);
    q->router_id = (char *)router;
    fake_call_t *c = fake_new();
    cr_assert_eq(pds_decode_sched_stream(R.s, c, q, R.next_stream++), PDS_OK);
    pds_decode_sched_run_once(R.s);
    return c;
}

/* Feeds the stream's unread batches to the requests. */
static void drain_stream(fake_call_t *st, req_t *reqs, int n)
{
    for (; st->n_read < st->n_sent; st->n_read++) {
        const Pdserve__V1__TokenBatch *b = (const Pdserve__V1__TokenBatch *)st->sent[st->n_read];
        cr_assert_str_eq(b->decode_node_id, "decode-test");
        for (size_t i = 0; i < b->n_seqs; i++) apply_seq(reqs, n, b->seqs[i]);
    }
}

/* OpenTransfer through the scheduler; returns the answered call (caller frees). */
static fake_call_t *sched_open(open_msg_t *o)
{
    fake_call_t *c = fake_new();
    cr_assert_eq(pds_decode_sched_open(R.s, c, &o->m), PDS_OK);
    PUMP_UNTIL(c->done);
    return c;
}

static fake_call_t *sched_commit(Pdserve__V1__CommitTransferRequest *m, bool wait)
{
    fake_call_t *c = fake_new();
    cr_assert_eq(pds_decode_sched_commit(R.s, c, m), PDS_OK);
    if (wait) PUMP_UNTIL(c->done);
    return c;
}

static fake_call_t *sched_cancel(Pdserve__V1__CancelRequest *m)
{
    fake_call_t *c = fake_new();
    cr_assert_eq(pds_decode_sched_cancel(R.s, c, m), PDS_OK);
    PUMP_UNTIL(c->done);
    return c;
}

/* Open + prefill + KV + commit for one request; the decode node then runs it. */
typedef struct {
    open_msg_t om;
    Pdserve__V1__CommitTransferRequest cm;
} flight_t;

static void start_request(flight_t *f, req_t *r)
{
    open_msg(&f->om, r, "loopback");
    fake_call_t *oc = sched_open(&f->om);
    cr_assert_eq(oc->status, PDS_OK, "%s: OpenTransfer: %s", r->id, oc->msg);
    const Pdserve__V1__OpenTransferReply *rep = (const Pdserve__V1__OpenTransferReply *)oc->reply;
    cr_assert_eq(prefill_send(R.pe, R.px, r, rep), PDS_OK, "%s", pds_err_detail());
    pdserve__v1__commit_transfer_request__init(&f->cm);
    f->cm.transfer_id = rep->transfer_id;
    f->cm.request_id = r->id;
    f->cm.first_token = r->got[0];
    fake_call_t *cc = sched_commit(&f->cm, true);
    cr_assert_eq(cc->status, PDS_OK, "%s: CommitTransfer: %s", r->id, cc->msg);
    cr_assert(cc->reply);
    cr_assert_eq(((Pdserve__V1__CommitReply *)cc->reply)->received_bytes,
                 (uint64_t)rep->n_block_ids * 2 * 4096, "received bytes = blocks x layers x 4 KiB");
    fake_free(oc);
    fake_free(cc);
}

Test(decode_node, sched_tokens_equal_generate_for_concurrent_requests)
{
    rig_up(0, 0, 0, WAIT_MS);
    req_t r[4];
    req_init(&r[0], "greedy", 13, 1, 40);
    req_init(&r[1], "seeded", 37, 2, 50);
    req_seeded(&r[1], 0.9f, 40, 0.95f, 7);
    req_init(&r[2], "hot", 5, 3, 30);
    req_seeded(&r[2], 1.5f, 0, 1.0f, 1234567);
    req_init(&r[3], "stop", 21, 4, 60);
    for (int i = 0; i < 4; i++) reference(R.pe, &r[i]);
    /* a stop id that the unstopped run produces at output 6: the run must stop there */
    r[3].stop[0] = r[3].want[6];
    r[3].n_stop = 1;
    reference(R.pe, &r[3]);
    cr_assert_lt(r[3].n_want, 40, "the stop id ends the reference early");

    fake_call_t *st = stream_open(ROUTER);
    flight_t f[4];
    for (int i = 0; i < 4; i++) start_request(&f[i], &r[i]);
    pump_idle();
    drain_stream(st, r, 4);
    for (int i = 0; i < 4; i++) expect_same(&r[i]);
    cr_expect_eq(r[3].reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_STOP);

    pds_decode_stats_t s = stats();
    cr_expect_eq(s.free_blocks, s.total_blocks, "every block is back in the pool");
    cr_expect_eq(s.running + s.waiting + s.open_transfers, 0);
    cr_expect_eq(s.finished, 4);
    cr_expect_eq(s.preemptions, 0);
    /* one TokenBatch per step: never two SeqTokens of one request in one batch */
    for (int k = 0; k < st->n_sent; k++) {
        const Pdserve__V1__TokenBatch *b = (const Pdserve__V1__TokenBatch *)st->sent[k];
        for (size_t i = 0; i < b->n_seqs; i++)
            for (size_t j = i + 1; j < b->n_seqs; j++)
                cr_assert_str_neq(b->seqs[i]->request_id, b->seqs[j]->request_id);
    }
    rig_down();
    fake_free(st);
}

Test(decode_node, sched_preempts_and_recomputes_to_the_same_tokens)
{
    /* 14 blocks (224 tokens) for three sequences that grow to ~100 tokens each (7 blocks), and a
     * forward budget of 24 tokens so that recompute runs in chunks. */
    rig_up(14, 24, 0, WAIT_MS);
    req_t r[3];
    req_init(&r[0], "a", 20, 5, 80);
    req_init(&r[1], "b", 18, 6, 80);
    req_seeded(&r[1], 0.8f, 50, 0.9f, 42);
    req_init(&r[2], "c", 22, 7, 80);
    req_seeded(&r[2], 1.1f, 0, 1.0f, 9);
    for (int i = 0; i < 3; i++) {
        r[i].ignore_eos = true;
        reference(R.pe, &r[i]);
    }
    fake_call_t *st = stream_open(ROUTER);
    flight_t f[3];
    for (int i = 0; i < 3; i++) start_request(&f[i], &r[i]);
    pump_idle();
    drain_stream(st, r, 3);
    for (int i = 0; i < 3; i++) expect_same(&r[i]);
    pds_decode_stats_t s = stats();
    cr_expect_gt(s.preemptions, 0, "the pool is too small for all three: someone was preempted");
    cr_expect_eq(s.free_blocks, s.total_blocks);
    cr_expect_eq(s.reserved_blocks, 0);
    rig_down();
    fake_free(st);
}

/* OpenTransfer with a broken request: status and message, nothing allocated. */
static void expect_open_refused(open_msg_t *o, pds_status_t want, const char *needle)
{
    fake_call_t *c = sched_open(o);
    cr_expect_eq(c->status, want, "status %s, want %s (%s)", pds_status_name(c->status),
                 pds_status_name(want), c->msg);
    cr_expect(strstr(c->msg, needle), "message '%s' names '%s'", c->msg, needle);
    cr_expect_null(c->reply);
    fake_free(c);
}

Test(decode_node, sched_open_refuses_bad_requests_with_exact_codes)
{
    rig_up(8, 0, 0, WAIT_MS);
    req_t r;
    req_init(&r, "bad", 20, 1, 10);
    open_msg_t o;

    open_msg(&o, &r, "loopback");
    o.kv.n_layers = 3;
    expect_open_refused(&o, PDS_ERR_FAILED_PRECONDITION, "geometry");
    open_msg(&o, &r, "loopback");
    o.kv.block_size = 32;
    expect_open_refused(&o, PDS_ERR_FAILED_PRECONDITION, "block_size=32");
    open_msg(&o, &r, "loopback");
    o.kv.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16;
    expect_open_refused(&o, PDS_ERR_FAILED_PRECONDITION, "dtype=bf16");
    open_msg(&o, &r, "ucx");
    expect_open_refused(&o, PDS_ERR_FAILED_PRECONDITION, "kvx backend");
    open_msg(&o, &r, "loopback");
    o.m.kv = NULL;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "geometry");
    open_msg(&o, &r, "loopback");
    o.ids[7] = 272;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "token_ids[7] = 272");
    open_msg(&o, &r, "loopback");
    o.ids[0] = -1;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "token_ids[0] = -1");
    open_msg(&o, &r, "loopback");
    o.m.n_tokens = 19;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "n_tokens 19");
    open_msg(&o, &r, "loopback");
    o.m.n_tokens = 0;
    o.m.n_token_ids = 0;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "n_tokens 0");
    open_msg(&o, &r, "loopback");
    o.m.max_tokens = 0;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "max_tokens 0");
    open_msg(&o, &r, "loopback");
    o.m.n_generated = 3;
    o.m.max_tokens = 3;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "must exceed n_generated 3");
    open_msg(&o, &r, "loopback");
    o.sp.temperature = -1.0f;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "sampling");
    open_msg(&o, &r, "loopback");
    o.sp.top_p = 1.5f;
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "sampling");
    open_msg(&o, &r, "loopback");
    o.m.request_id = (char *)"";
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "request_id");
    open_msg(&o, &r, "loopback");
    o.m.router_id = (char *)"";
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "router_id");

    /* 512 tokens = the whole context: no room for even one more */
    req_t big;
    req_init(&big, "big", 512, 2, 10);
    open_msg(&o, &big, "loopback");
    expect_open_refused(&o, PDS_ERR_INVALID_ARG, "context of 512");
    /* 200 tokens = 13 blocks > the 8 this pool has */
    req_init(&big, "big", 200, 2, 10);
    open_msg(&o, &big, "loopback");
    expect_open_refused(&o, PDS_ERR_EXHAUSTED, "has 8 free blocks, needs 13");

    pds_decode_stats_t s = stats();
    cr_expect_eq(s.free_blocks, 8, "no refused request holds blocks");
    cr_expect_eq(s.open_transfers, 0);
    rig_down();
}

Test(decode_node, sched_cancel_frees_blocks_and_is_idempotent)
{
    rig_up(8, 0, 0, WAIT_MS);
    fake_call_t *st = stream_open(ROUTER);
    /* an open transfer holding the whole pool */
    req_t a;
    req_init(&a, "a", 128, 1, 20);
    open_msg_t oa;
    open_msg(&oa, &a, "loopback");
    fake_call_t *c = sched_open(&oa);
    cr_assert_eq(c->status, PDS_OK, "%s", c->msg);
    uint64_t tid = ((Pdserve__V1__OpenTransferReply *)c->reply)->transfer_id;
    cr_expect_eq(((Pdserve__V1__OpenTransferReply *)c->reply)->n_block_ids, 8);
    fake_free(c);
    cr_expect_eq(stats().free_blocks, 0);
    req_t b;
    req_init(&b, "b", 16, 2, 20);
    open_msg_t ob;
    open_msg(&ob, &b, "loopback");
    expect_open_refused(&ob, PDS_ERR_EXHAUSTED, "has 0 free blocks, needs 1");

    Pdserve__V1__CancelRequest cr = PDSERVE__V1__CANCEL_REQUEST__INIT;
    cr.request_id = (char *)"a";
    cr.reason = (char *)"test";
    c = sched_cancel(&cr);
    cr_expect_eq(c->status, PDS_OK);
    cr_expect(((Pdserve__V1__CancelReply *)c->reply)->found);
    fake_free(c);
    cr_expect_eq(stats().free_blocks, 8, "cancel gave the transfer's blocks back");
    c = sched_cancel(&cr);
    cr_expect_not(((Pdserve__V1__CancelReply *)c->reply)->found, "second cancel: unknown");
    fake_free(c);
    /* the transfer is gone: its commit is NOT_FOUND, and nothing went to the router */
    Pdserve__V1__CommitTransferRequest cm = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    cm.transfer_id = tid;
    cm.first_token = 5;
    c = sched_commit(&cm, true);
    cr_expect_eq(c->status, PDS_ERR_NOT_FOUND, "%s", c->msg);
    fake_free(c);
    cr_expect_eq(st->n_sent, 0);

    /* now the whole pool can be had again; run it, then cancel it while decoding */
    req_init(&a, "a2", 100, 3, 100);
    a.ignore_eos = true;
    flight_t f;
    start_request(&f, &a);
    for (int i = 0; i < 5; i++) pds_decode_sched_run_once(R.s);
    cr.request_id = (char *)"a2";
    c = sched_cancel(&cr);
    cr_expect(((Pdserve__V1__CancelReply *)c->reply)->found);
    fake_free(c);
    drain_stream(st, &a, 1);
    cr_expect(a.finished);
    cr_expect_eq(a.reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_CANCELLED);
    cr_expect_gt(a.n_got, 1, "some tokens came before the cancel");
    pds_decode_stats_t s = stats();
    cr_expect_eq(s.free_blocks, 8);
    cr_expect_eq(s.running, 0);
    rig_down();
    fake_free(st);
}

Test(decode_node, sched_commit_before_data_waits_for_it)
{
    rig_up(0, 0, 0, WAIT_MS);
    fake_call_t *st = stream_open(ROUTER);
    req_t r;
    req_init(&r, "early", 30, 8, 12);
    reference(R.pe, &r);
    open_msg_t o;
    open_msg(&o, &r, "loopback");
    fake_call_t *oc = sched_open(&o);
    cr_assert_eq(oc->status, PDS_OK, "%s", oc->msg);
    const Pdserve__V1__OpenTransferReply *rep = (const Pdserve__V1__OpenTransferReply *)oc->reply;
    /* the commit arrives first (it raced the data): it must wait, not fail and not block */
    Pdserve__V1__CommitTransferRequest cm = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    cm.transfer_id = rep->transfer_id;
    cm.request_id = r.id;
    cm.first_token = r.want[0];
    fake_call_t *cc = sched_commit(&cm, false);
    for (int i = 0; i < 50; i++) pds_decode_sched_run_once(R.s);
    cr_expect_not(cc->done, "commit answered before the KV arrived");
    /* a second commit for the same transfer is refused while the first waits */
    fake_call_t *c2 = sched_commit(&cm, true);
    cr_expect_eq(c2->status, PDS_ERR_FAILED_PRECONDITION, "%s", c2->msg);
    fake_free(c2);
    cr_assert_eq(prefill_send(R.pe, R.px, &r, rep), PDS_OK);
    PUMP_UNTIL(cc->done);
    cr_expect_eq(cc->status, PDS_OK, "%s", cc->msg);
    pump_idle();
    drain_stream(st, &r, 1);
    expect_same(&r);
    cr_expect_eq(stats().free_blocks, stats().total_blocks);
    fake_free(oc);
    fake_free(cc);
    rig_down();
    fake_free(st);
}

Test(decode_node, sched_corrupt_transfer_is_data_loss_and_frees_blocks)
{
    rig_up(0, 0, 0, WAIT_MS);
    req_t r;
    req_init(&r, "corrupt", 40, 9, 12);
    open_msg_t o;
    open_msg(&o, &r, "loopback");
    fake_call_t *oc = sched_open(&o);
    cr_assert_eq(oc->status, PDS_OK, "%s", oc->msg);
    const Pdserve__V1__OpenTransferReply *rep = (const Pdserve__V1__OpenTransferReply *)oc->reply;
    pds_kvx_test_corrupt_next(R.dx, 1, 2, 100);
    cr_expect_eq(prefill_send(R.pe, R.px, &r, rep), PDS_ERR_CORRUPT,
                 "the sender hears the verdict");
    for (int i = 0; i < 5; i++) pds_decode_sched_run_once(R.s);
    cr_expect_eq(stats().free_blocks, stats().total_blocks, "failed transfer freed its blocks");
    Pdserve__V1__CommitTransferRequest cm = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    cm.transfer_id = rep->transfer_id;
    cm.first_token = r.got[0];
    fake_call_t *cc = sched_commit(&cm, true);
    cr_expect_eq(cc->status, PDS_ERR_CORRUPT, "%s", cc->msg);
    cr_expect(strstr(cc->msg, "checksum mismatch at layer 1"), "%s", cc->msg);
    fake_free(cc);
    cm.transfer_id = 12345;
    cc = sched_commit(&cm, true);
    cr_expect_eq(cc->status, PDS_ERR_NOT_FOUND, "%s", cc->msg);
    cr_expect(strstr(cc->msg, "unknown transfer 12345"), "%s", cc->msg);
    fake_free(cc);
    fake_free(oc);
    rig_down();
}

Test(decode_node, streams_buffer_until_the_router_connects_and_survive_a_lost_stream)
{
    rig_up(0, 0, 0, WAIT_MS);
    req_t r[2];
    req_init(&r[0], "early-bird", 12, 10, 25);
    req_init(&r[1], "second", 9, 11, 25);
    req_seeded(&r[1], 0.7f, 20, 0.8f, 77);
    for (int i = 0; i < 2; i++) {
        r[i].ignore_eos = true;
        reference(R.pe, &r[i]);
    }
    flight_t f[2];
    start_request(&f[0], &r[0]); /* no stream yet: everything is buffered */
    pump_idle();
    cr_expect_eq(stats().pending_tokens, 24 + 0, "24 decode tokens wait (the finish rides along)");
    fake_call_t *s1 = stream_open(ROUTER);
    cr_assert_eq(s1->n_sent, 1, "the buffer goes out as one TokenBatch");
    const Pdserve__V1__TokenBatch *b = (const Pdserve__V1__TokenBatch *)s1->sent[0];
    cr_expect_eq(b->n_seqs, 1, "contiguous tokens of one request merge into one SeqTokens");
    drain_stream(s1, r, 2);
    expect_same(&r[0]);

    /* the router's stream breaks (sends see CANCELLED): tokens wait for its next stream */
    s1->refuse = PDS_ERR_CANCELLED;
    start_request(&f[1], &r[1]);
    pump_idle();
    cr_expect(s1->done, "a lost stream is released");
    cr_expect_eq(s1->status, PDS_ERR_CANCELLED);
    fake_call_t *s2 = stream_open(ROUTER);
    /* a newer stream for the same router replaces the old one */
    fake_call_t *s3 = stream_open(ROUTER);
    cr_expect(s2->done, "replaced stream finished");
    cr_expect_eq(s2->status, PDS_OK, "%s", s2->msg);
    drain_stream(s2, r, 2);
    drain_stream(s3, r, 2);
    expect_same(&r[1]);
    /* the client cancels s3: released */
    pds_decode_sched_stream_gone(R.s, R.next_stream - 1);
    pds_decode_sched_run_once(R.s);
    cr_expect(s3->done);
    cr_expect_eq(stats().streams, 0);
    rig_down();
    fake_free(s1);
    fake_free(s2);
    fake_free(s3);
}

Test(decode_node, sched_stop_aborts_sequences_and_answers_every_call)
{
    rig_up(0, 0, 0, WAIT_MS);
    fake_call_t *st = stream_open(ROUTER);
    req_t r[2];
    req_init(&r[0], "long", 10, 12, 150);
    r[0].ignore_eos = true;
    flight_t f;
    start_request(&f, &r[0]);
    for (int i = 0; i < 3; i++) pds_decode_sched_run_once(R.s);
    /* an open transfer with a parked commit */
    req_init(&r[1], "parked", 10, 13, 10);
    open_msg_t o;
    open_msg(&o, &r[1], "loopback");
    fake_call_t *oc = sched_open(&o);
    cr_assert_eq(oc->status, PDS_OK);
    Pdserve__V1__CommitTransferRequest cm = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    cm.transfer_id = ((Pdserve__V1__OpenTransferReply *)oc->reply)->transfer_id;
    cm.first_token = 1;
    fake_call_t *cc = sched_commit(&cm, false);
    pds_decode_sched_run_once(R.s);
    /* and a call still queued when the stop comes */
    Pdserve__V1__CancelRequest cr = PDSERVE__V1__CANCEL_REQUEST__INIT;
    cr.request_id = (char *)"nobody";
    fake_call_t *late = fake_new();
    cr_assert_eq(pds_decode_sched_cancel(R.s, late, &cr), PDS_OK);

    pds_decode_sched_stop(R.s);
    cr_expect(cc->done);
    cr_expect_eq(cc->status, PDS_ERR_UNAVAILABLE, "%s", cc->msg);
    cr_expect(late->done);
    cr_expect_eq(late->status, PDS_ERR_UNAVAILABLE);
    cr_expect(st->done, "streams finished");
    cr_expect_eq(st->status, PDS_OK);
    drain_stream(st, r, 1);
    cr_expect(r[0].finished);
    cr_expect_eq(r[0].reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_ABORTED);
    pds_decode_stats_t s = stats();
    cr_expect(s.stopped);
    cr_expect_eq(s.free_blocks, s.total_blocks);
    fake_call_t *after = fake_new();
    cr_expect_eq(pds_decode_sched_cancel(R.s, after, &cr), PDS_ERR_UNAVAILABLE,
                 "after stop the caller answers");
    fake_free(after);
    fake_free(late);
    fake_free(cc);
    fake_free(oc);
    rig_down();
    fake_free(st);
}

/* ================================================================================================
 * 2. The program: bin/pdserve-decode over gRPC + UCX
 * ============================================================================================== */
static pid_t child = -1;
static char child_log[1024];

static void kill_child(void)
{
    if (child > 0) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        child = -1;
    }
}

/* Starts pdserve-decode with the tiny preset and `extra` flags; returns its address. */
static void node_start(const char *const *extra, char *addr, size_t cap)
{
    const char *bdir = getenv("PDS_BUILD_DIR");
    cr_assert(bdir, "PDS_BUILD_DIR is not set (run through ctest)");
    char path[1024];
    snprintf(path, sizeof path, "%s/bin/pdserve-decode", bdir);
    cr_assert_eq(access(path, X_OK), 0, "%s is missing: build target pdserve-decode", path);
    const char *tmp = getenv("PDS_TEST_TMP");
    if (tmp) mkdir(tmp, 0755);
    snprintf(child_log, sizeof child_log, "%s/decode_node_%d.log", tmp ? tmp : "/tmp", getpid());
    const char *argv[32] = {path,
                            "--node.id=decode-t",
                            "--node.router=",
                            "--node.listen=127.0.0.1:0",
                            "--model.preset=tiny",
                            "--model.seed=1",
                            "--engine.threads=1",
                            "--engine.block_size=16",
                            "--kvx.backend=ucx"};
    int n = 9;
    for (int i = 0; extra && extra[i]; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a crashed test leaves no node behind */
        dup2(pfd[1], 1);
        int fd = open(child_log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) dup2(fd, 2);
        close(pfd[0]);
        execv(path, (char *const *)argv);
        _exit(127);
    }
    close(pfd[1]);
    char buf[512];
    size_t len = 0;
    for (;;) {
        struct pollfd p = {pfd[0], POLLIN, 0};
        int pr = poll(&p, 1, WAIT_MS);
        cr_assert_gt(pr, 0, "pdserve-decode printed no READY line (log: %s)", child_log);
        ssize_t k = read(pfd[0], buf + len, sizeof buf - 1 - len);
        cr_assert_gt(k, 0, "pdserve-decode exited before READY (log: %s)", child_log);
        len += (size_t)k;
        buf[len] = '\0';
        if (strchr(buf, '\n')) break;
    }
    close(pfd[0]);
    cr_assert(strncmp(buf, "READY ", 6) == 0, "first stdout line: '%s'", buf);
    *strchr(buf, '\n') = '\0';
    cr_assert_lt(strlen(buf + 6), cap, "address too long");
    memcpy(addr, buf + 6, strlen(buf + 6) + 1);
}

/* SIGTERM, then the exit status must be 0 and the log must show no live allocation. */
static void node_stop(void)
{
    cr_assert_eq(kill(child, SIGTERM), 0);
    int status = 0;
    pid_t w = 0;
    for (int i = 0; i < WAIT_MS / 10 && w == 0; i++) {
        w = waitpid(child, &status, WNOHANG);
        if (w == 0) usleep(10000);
    }
    cr_assert_eq(w, child, "pdserve-decode did not exit after SIGTERM (log: %s)", child_log);
    child = -1;
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "exit status %d (log: %s)", status,
              child_log);
    FILE *f = fopen(child_log, "r");
    cr_assert(f);
    char line[2048];
    bool clean = false;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "msg=exit") && strstr(line, "live_blocks=0 ")) clean = true;
    fclose(f);
    cr_expect(clean, "exit line reports live_blocks=0 (log: %s)", child_log);
}

static pds_status_t call(pds_rpc_channel_t *ch, const char *m, const ProtobufCMessage *req,
                         const ProtobufCMessageDescriptor *d, ProtobufCMessage **rep)
{
    *rep = NULL;
    return pds_rpc_channel_call(ch, m, req, d, WAIT_MS, rep);
}

/* One request through the real node: OpenTransfer, prefill + UCX send, CommitTransfer, then the
 * TokenStream until it finishes. */
static void node_request(pds_rpc_channel_t *ch, pds_rpc_stream_t *st, pds_engine_t *pe,
                         pds_kvx_t *px, req_t *r)
{
    open_msg_t o;
    open_msg(&o, r, "ucx");
    ProtobufCMessage *rep = NULL;
    cr_assert_eq(
        call(ch, PDS_DECODE_M_OPEN, &o.m.base, &pdserve__v1__open_transfer_reply__descriptor, &rep),
        PDS_OK, "%s: OpenTransfer: %s", r->id, pds_err_detail());
    const Pdserve__V1__OpenTransferReply *orep = (const Pdserve__V1__OpenTransferReply *)rep;
    cr_expect_eq(orep->block_size, BS);
    cr_expect_eq(orep->kv_dtype, PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32);
    cr_assert_eq(prefill_send(pe, px, r, orep), PDS_OK, "%s: kvx: %s", r->id, pds_err_detail());
    Pdserve__V1__CommitTransferRequest cm = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    cm.transfer_id = orep->transfer_id;
    cm.request_id = r->id;
    cm.first_token = r->got[0];
    ProtobufCMessage *crep = NULL;
    cr_assert_eq(
        call(ch, PDS_DECODE_M_COMMIT, &cm.base, &pdserve__v1__commit_reply__descriptor, &crep),
        PDS_OK, "%s: CommitTransfer: %s", r->id, pds_err_detail());
    pds_rpc_msg_free(crep);
    pds_rpc_msg_free(rep);
    while (!r->finished) {
        ProtobufCMessage *m = NULL;
        cr_assert_eq(pds_rpc_stream_next(st, &m), PDS_OK, "TokenStream: %s", pds_err_detail());
        cr_assert(m, "TokenStream ended");
        const Pdserve__V1__TokenBatch *b = (const Pdserve__V1__TokenBatch *)m;
        cr_expect_str_eq(b->decode_node_id, "decode-t");
        for (size_t i = 0; i < b->n_seqs; i++) apply_seq(r, 1, b->seqs[i]);
        pds_rpc_msg_free(m);
    }
}

static pds_status_t node_open_status(pds_rpc_channel_t *ch, open_msg_t *o, uint64_t *tid)
{
    ProtobufCMessage *rep = NULL;
    pds_status_t s = call(ch, PDS_DECODE_M_OPEN, &o->m.base,
                          &pdserve__v1__open_transfer_reply__descriptor, &rep);
    if (s == PDS_OK && tid) *tid = ((Pdserve__V1__OpenTransferReply *)rep)->transfer_id;
    pds_rpc_msg_free(rep);
    return s;
}

static bool node_cancel(pds_rpc_channel_t *ch, const char *id)
{
    Pdserve__V1__CancelRequest c = PDSERVE__V1__CANCEL_REQUEST__INIT;
    c.request_id = (char *)id;
    ProtobufCMessage *rep = NULL;
    cr_assert_eq(
        call(ch, PDS_DECODE_M_CANCEL, &c.base, &pdserve__v1__cancel_reply__descriptor, &rep),
        PDS_OK, "%s", pds_err_detail());
    bool found = ((Pdserve__V1__CancelReply *)rep)->found;
    pds_rpc_msg_free(rep);
    return found;
}

Test(decode_node, node_program_decodes_ucx_transfers_to_the_reference_tokens, .fini = kill_child)
{
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    /* a 32-block pool (512 tokens): one maximal request takes all of it */
    const char *extra[] = {"--engine.kv_tokens=512", NULL};
    char addr[160];
    node_start(extra, addr, sizeof addr);
    pds_rpc_channel_t *ch = NULL;
    cr_assert_eq(pds_rpc_channel_create(addr, &ch), PDS_OK);

    Pdserve__V1__HealthRequest hr = PDSERVE__V1__HEALTH_REQUEST__INIT;
    ProtobufCMessage *h = NULL;
    cr_assert_eq(call(ch, "/pdserve.v1.Pdserve/Health", &hr.base,
                      &pdserve__v1__health_reply__descriptor, &h),
                 PDS_OK, "%s", pds_err_detail());
    cr_expect_str_eq(((Pdserve__V1__HealthReply *)h)->node_id, "decode-t");
    cr_expect_eq(((Pdserve__V1__HealthReply *)h)->role, PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE);
    pds_rpc_msg_free(h);

    pds_engine_t *pe = tiny_engine(0, 0);
    pds_kvx_params_t kp = pds_kvx_default_params();
    pds_kvx_t *px = NULL;
    cr_assert_eq(pds_kvx_create(&kp, &px), PDS_OK, "%s", pds_err_detail());

    Pdserve__V1__TokenStreamRequest tr = PDSERVE__V1__TOKEN_STREAM_REQUEST__INIT;
    tr.router_id = (char *)ROUTER;
    pds_rpc_stream_t *st = NULL;
    cr_assert_eq(pds_rpc_stream_open(ch, PDS_DECODE_M_STREAM, &tr.base,
                                     &pdserve__v1__token_batch__descriptor, 120000, &st),
                 PDS_OK);

    req_t r[3];
    req_init(&r[0], "n-greedy", 24, 21, 48);
    req_init(&r[1], "n-seeded", 40, 22, 48);
    req_seeded(&r[1], 0.8f, 30, 0.9f, 2024);
    req_init(&r[2], "n-stop", 7, 23, 64);
    req_seeded(&r[2], 1.0f, 0, 1.0f, 5);
    for (int i = 0; i < 3; i++) reference(pe, &r[i]);
    r[2].stop[0] = r[2].want[3];
    r[2].n_stop = 1;
    reference(pe, &r[2]);
    for (int i = 0; i < 3; i++) {
        node_request(ch, st, pe, px, &r[i]);
        expect_same(&r[i]);
    }

    /* refusals travel as exact gRPC codes */
    req_t b;
    req_init(&b, "n-bad", 20, 24, 10);
    open_msg_t o;
    open_msg(&o, &b, "ucx");
    o.kv.head_dim = 32;
    cr_expect_eq(node_open_status(ch, &o, NULL), PDS_ERR_FAILED_PRECONDITION, "%s",
                 pds_err_detail());
    cr_expect(strstr(pds_err_detail(), "KV geometry mismatch"), "%s", pds_err_detail());
    open_msg(&o, &b, "loopback");
    cr_expect_eq(node_open_status(ch, &o, NULL), PDS_ERR_FAILED_PRECONDITION);
    open_msg(&o, &b, "ucx");
    o.ids[3] = 100000;
    cr_expect_eq(node_open_status(ch, &o, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "outside the vocabulary"), "%s", pds_err_detail());
    req_t big;
    req_init(&big, "n-big", 512, 25, 10);
    open_msg(&o, &big, "ucx");
    cr_expect_eq(node_open_status(ch, &o, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "context of 512"), "%s", pds_err_detail());
    Pdserve__V1__CommitTransferRequest cm = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    cm.transfer_id = 77;
    ProtobufCMessage *rep = NULL;
    cr_expect_eq(
        call(ch, PDS_DECODE_M_COMMIT, &cm.base, &pdserve__v1__commit_reply__descriptor, &rep),
        PDS_ERR_NOT_FOUND);

    /* Cancel frees blocks: 511 tokens need all 32 blocks; a second such request does not fit
     * until the first is cancelled. */
    req_init(&big, "n-whole", 511, 26, 1 + 0);
    big.max_tokens = 1;
    open_msg(&o, &big, "ucx");
    cr_assert_eq(node_open_status(ch, &o, NULL), PDS_OK, "%s", pds_err_detail());
    req_t big2;
    req_init(&big2, "n-whole-2", 511, 27, 1);
    open_msg_t o2;
    open_msg(&o2, &big2, "ucx");
    cr_expect_eq(node_open_status(ch, &o2, NULL), PDS_ERR_EXHAUSTED);
    cr_expect(strstr(pds_err_detail(), "has 0 free blocks, needs 32"), "%s", pds_err_detail());
    cr_expect(node_cancel(ch, "n-whole"));
    cr_expect_not(node_cancel(ch, "n-whole"), "idempotent: second cancel finds nothing");
    cr_expect_eq(node_open_status(ch, &o2, NULL), PDS_OK, "%s", pds_err_detail());
    cr_expect(node_cancel(ch, "n-whole-2"));

    node_stop();
    /* the stream ends with OK when the node shuts down */
    ProtobufCMessage *m = NULL;
    pds_status_t s;
    while ((s = pds_rpc_stream_next(st, &m)) == PDS_OK && m) pds_rpc_msg_free(m);
    cr_expect_eq(s, PDS_OK, "TokenStream ended with %s", pds_status_name(s));
    pds_rpc_stream_destroy(st);
    pds_rpc_channel_destroy(ch);
    pds_kvx_destroy(px);
    pds_engine_destroy(pe);
}

/* ---- a fake router: records what the node registers and reports ----------------------------- */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ProtobufCMessage *info;   /* first NodeInfo */
    ProtobufCMessage *report; /* latest LoadReport */
    int reports;
} fr = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void fr_register(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pthread_mutex_lock(&fr.mu);
    if (!fr.info) fr.info = msg_copy(req);
    pthread_cond_broadcast(&fr.cv);
    pthread_mutex_unlock(&fr.mu);
    Pdserve__V1__RegisterReply r = PDSERVE__V1__REGISTER_REPLY__INIT;
    r.router_id = (char *)"fake-router";
    r.router_epoch = 1;
    r.report_interval_ms = 20;
    pds_rpc_call_reply(call, &r.base);
}

static void fr_report(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pthread_mutex_lock(&fr.mu);
    protobuf_c_message_free_unpacked(fr.report, NULL);
    fr.report = msg_copy(req);
    fr.reports++;
    pthread_cond_broadcast(&fr.cv);
    pthread_mutex_unlock(&fr.mu);
    Pdserve__V1__ReportReply r = PDSERVE__V1__REPORT_REPLY__INIT;
    pds_rpc_call_reply(call, &r.base);
}

Test(decode_node, node_program_registers_with_its_router_and_reports_load, .fini = kill_child)
{
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    pds_rpc_server_params_t sp = pds_rpc_server_default_params();
    pds_rpc_server_t *srv = NULL;
    cr_assert_eq(pds_rpc_server_create(&sp, &srv), PDS_OK);
    pds_rpc_method_t m1 = {"/pdserve.v1.RouterInternal/RegisterNode",
                           PDS_RPC_UNARY,
                           &pdserve__v1__node_info__descriptor,
                           fr_register,
                           NULL,
                           NULL};
    pds_rpc_method_t m2 = {"/pdserve.v1.RouterInternal/ReportLoad",
                           PDS_RPC_UNARY,
                           &pdserve__v1__load_report__descriptor,
                           fr_report,
                           NULL,
                           NULL};
    cr_assert_eq(pds_rpc_server_add_method(srv, &m1), PDS_OK);
    cr_assert_eq(pds_rpc_server_add_method(srv, &m2), PDS_OK);
    cr_assert_eq(pds_rpc_server_start(srv), PDS_OK);
    char router_flag[64];
    snprintf(router_flag, sizeof router_flag, "--node.router=127.0.0.1:%d",
             pds_rpc_server_port(srv));
    const char *extra[] = {"--engine.kv_tokens=512", router_flag, NULL};
    char addr[160];
    node_start(extra, addr, sizeof addr);

    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&fr.mu);
    int rc = 0;
    while ((!fr.info || fr.reports < 2) && rc == 0)
        rc = pthread_cond_timedwait(&fr.cv, &fr.mu, &until);
    pthread_mutex_unlock(&fr.mu);
    cr_assert(fr.info, "the node never registered");
    cr_assert_geq(fr.reports, 2, "the node did not keep reporting");

    /* the fingerprint the router compares: same flags, same function */
    const char *args[] = {"x", "--model.preset=tiny", "--model.seed=1", "--engine.block_size=16"};
    pds_node_config_t cfg;
    cr_assert_eq(pds_node_config_parse(4, (char **)args, PDS_NODE_DECODE, &cfg), PDS_OK);
    pds_model_config_t mc;
    cr_assert_eq(pds_model_preset("tiny", &mc), PDS_OK);

    const Pdserve__V1__NodeInfo *ni = (const Pdserve__V1__NodeInfo *)fr.info;
    cr_expect_eq(ni->magic, PDS_RPC_PROTOCOL_MAGIC);
    cr_expect_eq(ni->protocol_version, PDS_RPC_PROTOCOL_VERSION);
    cr_expect_str_eq(ni->node_id, "decode-t");
    cr_expect_eq(ni->role, PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE);
    cr_expect_str_eq(ni->address, addr, "registered address = the READY address");
    cr_expect_str_eq(ni->kvx_backend, "ucx");
    cr_expect_gt(ni->kvx_address.len, 16, "a UCX worker address");
    cr_assert(ni->kv);
    cr_expect_eq(ni->kv->n_layers, 2);
    cr_expect_eq(ni->kv->n_kv_heads, 2);
    cr_expect_eq(ni->kv->head_dim, 16);
    cr_expect_eq(ni->kv->block_size, 16);
    cr_expect_eq(ni->kv->dtype, PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32);
    cr_expect_eq(ni->total_kv_blocks, 32);
    cr_expect_str_eq(ni->model_name, mc.name);
    cr_expect_eq(ni->model_fingerprint, pds_node_model_fingerprint(&cfg, &mc));
    cr_expect_eq(ni->max_batch_seqs, 256);
    cr_expect_eq(ni->max_context_tokens, 512);
    cr_expect_eq(ni->vocab_size, 272);
    cr_expect_eq(ni->bos_token_id, mc.bos_id);
    cr_expect_eq(ni->eos_token_id, mc.eos_id);
    pthread_mutex_lock(&fr.mu);
    const Pdserve__V1__LoadReport *lr = (const Pdserve__V1__LoadReport *)fr.report;
    cr_assert(lr);
    cr_expect_str_eq(lr->node_id, "decode-t");
    cr_expect_eq(lr->state, PDSERVE__V1__NODE_STATE__NODE_STATE_UP);
    cr_expect_eq(lr->total_kv_blocks, 32);
    cr_expect_eq(lr->free_kv_blocks, 32);
    cr_expect_eq(lr->running_seqs, 0);
    cr_expect_geq(lr->seq, 2);
    pthread_mutex_unlock(&fr.mu);

    node_stop();
    pds_rpc_server_destroy(srv);
    protobuf_c_message_free_unpacked(fr.info, NULL);
    protobuf_c_message_free_unpacked(fr.report, NULL);
}

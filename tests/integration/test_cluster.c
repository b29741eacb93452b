/* Integration tests of the whole cluster: a real pdserve-router, prefill and decode nodes as
 * separate processes on loopback with KV over UCX (tcp, then shared memory), driven through the
 * public Pdserve API. The acceptance criteria of the cluster, as tests:
 *   - concurrent requests return exactly the tokens of the in-process reference
 *     (pds_engine_generate, tiny preset, model seed 1) for greedy and seeded sampling, over both
 *     UCX transports, with a correct summary;
 *   - cancelled streams give every KV block back;
 *   - bad input is INVALID_ARGUMENT with a message and changes nothing;
 *   - a dead decode node, or one without room, does not fail requests another node can take;
 *   - more work than one decode pool holds still finishes exactly (preemption + recompute);
 *   - a decode node killed mid-generation loses no request (re-placement, same tokens);
 *   - the Python client and pdserve-cli stream the reference tokens.
 * Each test starts its own cluster (tiny model, one engine thread per node) and tears it down in
 * .fini, whatever happened; logs stay under $PDS_TEST_TMP/integ/.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "cluster.h"
#include "proto/pdserve.pb-c.h"

#define FR(x)    PDSERVE__V1__FINISH_REASON__FINISH_REASON_##x
#define STATE(x) PDSERVE__V1__NODE_STATE__NODE_STATE_##x

static pdt_cluster_t *g_cluster;
static pdt_ref_t *g_ref;

static void teardown(void)
{
    pdt_cluster_destroy(g_cluster);
    g_cluster = NULL;
    pdt_ref_destroy(g_ref);
    g_ref = NULL;
}

/* A cluster of n_prefill + n_decode nodes of `preset` over `tls` (kv_tokens 0 = the harness
 * default for every node, else that pool on every node), plus the reference engine. */
static void setup_cluster(const char *name, const char *tls, const char *preset, int n_prefill,
                          int n_decode, int64_t prefill_kv_tokens, int64_t decode_kv_tokens)
{
    g_ref = pdt_ref_create(preset);
    cr_assert(g_ref, "reference engine");
    g_cluster = pdt_cluster_create(name, tls);
    cr_assert(g_cluster, "cluster directory");
    pdt_cluster_set_preset(g_cluster, preset);
    cr_assert(
        pdt_cluster_start(g_cluster, n_prefill, n_decode, prefill_kv_tokens, decode_kv_tokens),
        "%s", pdt_cluster_error(g_cluster));
}

/* The reference for req (seed: what the router reported, for requests without one). */
typedef struct {
    int32_t tokens[PDT_MAX_OUT];
    int n, finish, n_prompt;
} expect_t;

static void reference(const pdt_req_t *req, uint64_t seed, expect_t *e)
{
    pds_status_t s = pdt_ref_generate(g_ref, req, seed, e->tokens, &e->n, &e->finish, &e->n_prompt);
    cr_assert_eq(s, PDS_OK, "reference generate for %s: %s", req->id, pds_err_detail());
}

static bool in_list(const char *s, const char *const *list)
{
    for (; *list; list++)
        if (strcmp(s, *list) == 0) return true;
    return false;
}

/* Everything one successful request must satisfy. */
static void check_result(const pdt_req_t *req, const pdt_res_t *res, const char *const *prefills,
                         const char *const *decodes, bool allow_replacement)
{
    cr_assert_eq(res->status, PDS_OK, "%s failed: %s: %s", req->id, pds_status_name(res->status),
                 res->message);
    expect_t e;
    reference(req, res->seed, &e);
    char diff[160];
    pdt_diff_tokens(res->tokens, res->n_tokens, e.tokens, e.n, diff, sizeof diff);
    cr_assert_str_empty(diff, "%s (decode %s, prefill %s): cluster vs reference: %s", req->id,
                        res->decode_node, res->prefill_node, diff);
    cr_assert(res->in_order, "%s: chunk indices not contiguous", req->id);
    cr_assert(res->text_matches, "%s: chunk text is not the decoding of its ids", req->id);
    cr_assert(res->has_summary && res->summary_last, "%s: one summary, last (%d after it)", req->id,
              res->n_after_summary);
    cr_assert_str_eq(res->request_id, req->id);
    cr_assert_eq(res->output_tokens, (uint32_t)e.n, "%s: output_tokens %u, streamed %d", req->id,
                 res->output_tokens, e.n);
    cr_assert_eq(res->prompt_tokens, (uint32_t)e.n_prompt, "%s: prompt_tokens %u, expected %d",
                 req->id, res->prompt_tokens, e.n_prompt);
    cr_assert_eq(res->finish_reason, e.finish, "%s: finish reason %d, reference %d", req->id,
                 res->finish_reason, e.finish);
    if (req->has_seed) cr_assert_eq(res->seed, req->seed, "%s: summary seed", req->id);
    cr_assert(in_list(res->prefill_node, prefills), "%s: prefill node '%s'", req->id,
              res->prefill_node);
    cr_assert(in_list(res->decode_node, decodes), "%s: decode node '%s'", req->id,
              res->decode_node);
    if (!allow_replacement)
        cr_assert_eq(res->replacements, 0, "%s: %u re-placements", req->id, res->replacements);
    cr_assert(res->ttft_ms > 0, "%s: ttft_ms %f", req->id, res->ttft_ms);
}

/* Request i of a varied mix: prompt lengths around block boundaries (block 16), text and token
 * prompts, greedy and seeded sampling, max_tokens 8..48, some ignore_eos, some without a seed. */
static void mixed_request(pdt_req_t *q, int i)
{
    static const int lens[] = {1, 5, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 129};
    static char texts[8][96];
    memset(q, 0, sizeof *q);
    snprintf(q->id, sizeof q->id, "mix-%02d", i);
    if (i % 8 == 2) {
        snprintf(texts[(i / 8) % 8], sizeof texts[0],
                 "Request %d: the quick brown fox jumps over the lazy dog %d times.", i, i * 3);
        q->text = texts[(i / 8) % 8];
    } else {
        pdt_fill_prompt(q, lens[i % 16] + (i / 16) % 3, (uint64_t)i);
    }
    q->max_tokens = (uint32_t)(8 + (i * 7) % 41);
    if (i % 2 == 1) {
        q->temperature = 0.8f;
        q->top_k = 40;
        q->top_p = 0.9f;
        if (i % 16 != 5) {
            q->has_seed = true;
            q->seed = 1000 + (uint64_t)i * 7919;
        }
    }
    q->ignore_eos = i % 4 == 3;
}

static const char *const two_prefills[] = {"p0", "p1", NULL};
static const char *const two_decodes[] = {"d0", "d1", NULL};
static const char *const one_prefill[] = {"p0", NULL};
static const char *const one_decode[] = {"d0", NULL};
static const char *const two_decodes_full[] = {"d0", "d-full", NULL};

/* 64 concurrent requests through 2 prefill + 2 decode nodes over `tls`. */
static void run_concurrent(const char *name, const char *tls)
{
    setup_cluster(name, tls, "tiny", 2, 2, 0, 0);
    enum { N = 64 };
    pdt_req_t *reqs = pds_calloc(N, sizeof *reqs);
    pdt_res_t *res = pds_calloc(N, sizeof *res);
    cr_assert(reqs && res);
    for (int i = 0; i < N; i++) {
        mixed_request(&reqs[i], i);
        if (i % 8 == 6) { /* a stop token the reference produces a few tokens in */
            expect_t e;
            reference(&reqs[i], 0, &e);
            reqs[i].stop[0] = e.tokens[PDS_MIN(3, e.n - 1)];
            reqs[i].n_stop = 1;
        }
    }
    pdt_generate_many(pdt_cluster_router(g_cluster), reqs, res, N, 120000);
    bool used[4] = {false};
    int stops = 0;
    for (int i = 0; i < N; i++) {
        check_result(&reqs[i], &res[i], two_prefills, two_decodes, false);
        used[0] |= strcmp(res[i].prefill_node, "p0") == 0;
        used[1] |= strcmp(res[i].prefill_node, "p1") == 0;
        used[2] |= strcmp(res[i].decode_node, "d0") == 0;
        used[3] |= strcmp(res[i].decode_node, "d1") == 0;
        stops += res[i].finish_reason == FR(STOP);
        if (!reqs[i].has_seed)
            cr_assert_neq(res[i].seed, 0, "%s: the router should report its seed", reqs[i].id);
    }
    cr_assert(used[0] && used[1] && used[2] && used[3],
              "64 concurrent requests should use every node (p0 %d p1 %d d0 %d d1 %d)", used[0],
              used[1], used[2], used[3]);
    cr_assert_geq(stops, 8, "stop-token requests ended STOP (%d)", stops);
    cr_assert(pdt_cluster_wait_idle(g_cluster, 10000), "%s", pdt_cluster_error(g_cluster));
    cr_assert(pdt_cluster_check_alive(g_cluster), "%s", pdt_cluster_error(g_cluster));
    pds_free(reqs);
    pds_free(res);
}

Test(cluster, concurrent_requests_equal_reference_over_ucx_tcp, .fini = teardown, .timeout = 180)
{
    run_concurrent("concurrent-tcp", "tcp");
}

Test(cluster, concurrent_requests_equal_reference_over_ucx_shared_memory, .fini = teardown,
     .timeout = 180)
{
    /* sysv/posix/cma are what `ucx_info -d` lists for shared memory on Debian's UCX 1.13. */
    run_concurrent("concurrent-sm", "sm,self");
}

Test(cluster, cancelled_streams_return_every_kv_block, .fini = teardown, .timeout = 150)
{
    /* The `small` model (a few ms per decode step on one core), so that streams are surely
     * still running when they are cancelled; the tiny one finishes 500 tokens in 30 ms. */
    setup_cluster("cancel", "tcp", "small", 1, 2, 2048, 2048);
    const char *router = pdt_cluster_router(g_cluster);
    enum { N = 16 };
    pds_rpc_channel_t *ch[N] = {0};
    pds_rpc_stream_t *st[N] = {0};
    pdt_req_t *q = pds_calloc(1, sizeof *q);
    cr_assert(q);
    for (int i = 0; i < N; i++) {
        memset(q, 0, sizeof *q);
        snprintf(q->id, sizeof q->id, "cancel-%02d", i);
        pdt_fill_prompt(q, 20 + 3 * i, 500 + (uint64_t)i);
        q->max_tokens = 100;
        q->ignore_eos = true;
        q->temperature = i % 2 ? 0.8f : 0.0f;
        q->has_seed = true;
        q->seed = 77 + (uint64_t)i;
        /* The first four are cancelled before their first token (queued or in prefill). */
        int got = 0;
        pds_status_t s = pdt_generate_open(router, q, i < 4 ? 0 : 2, &ch[i], &st[i], &got, 60000);
        cr_assert_eq(s, PDS_OK, "%s: %s", q->id, pds_err_detail());
    }
    int active = pdt_cluster_active(g_cluster);
    for (int i = 0; i < N; i++) pdt_generate_cancel(ch[i], st[i]);
    cr_assert_geq(active, N - 2, "only %d of %d requests were still running when cancelled", active,
                  N);
    cr_assert(pdt_cluster_wait_idle(g_cluster, 15000), "after cancelling %d streams: %s", N,
              pdt_cluster_error(g_cluster));
    cr_assert(pdt_cluster_check_alive(g_cluster), "%s", pdt_cluster_error(g_cluster));

    /* The cluster still serves, exactly. */
    pdt_res_t *res = pds_calloc(2, sizeof *res);
    pdt_req_t *after = pds_calloc(2, sizeof *after);
    cr_assert(res && after);
    for (int i = 0; i < 2; i++) {
        mixed_request(&after[i], 40 + i);
        after[i].max_tokens = 12;
    }
    pdt_generate_many(router, after, res, 2, 60000);
    for (int i = 0; i < 2; i++) check_result(&after[i], &res[i], one_prefill, two_decodes, false);
    cr_assert(pdt_cluster_wait_idle(g_cluster, 10000), "%s", pdt_cluster_error(g_cluster));
    pds_free(after);
    pds_free(res);
    pds_free(q);
}

/* Expects INVALID_ARGUMENT with a message and no token. */
static void expect_invalid(const pdt_req_t *q, const char *what)
{
    pdt_res_t *res = pds_calloc(1, sizeof *res);
    cr_assert(res);
    pds_status_t s = pdt_generate(pdt_cluster_router(g_cluster), q, res, 20000);
    cr_assert_eq(s, PDS_ERR_INVALID_ARG, "%s: expected INVALID_ARGUMENT, got %s (%s)", what,
                 pds_status_name(s), res->message);
    cr_assert_str_not_empty(res->message, "%s: INVALID_ARGUMENT without a message", what);
    cr_assert_eq(res->n_tokens, 0, "%s: %d tokens streamed before the error", what, res->n_tokens);
    pds_free(res);
}

Test(cluster, bad_requests_are_invalid_argument_and_change_nothing, .fini = teardown,
     .timeout = 120)
{
    setup_cluster("bad-input", "tcp", "tiny", 1, 1, 0, 0);
    const char *router = pdt_cluster_router(g_cluster);
    const int ctx = pdt_ref_context(g_ref), vocab = pdt_ref_vocab(g_ref);

    /* Bytes that are no GenerateRequest (a field header whose varint never ends). */
    static const unsigned char junk[] = {0x0a, 0xff, 0xff, 0xff, 0xff, 0xff,
                                         0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    char msg[512] = "";
    pds_status_t s =
        pdt_call_raw(router, "/pdserve.v1.Pdserve/Generate", junk, sizeof junk, msg, sizeof msg);
    cr_assert_eq(s, PDS_ERR_INVALID_ARG, "malformed bytes: got %s (%s)", pds_status_name(s), msg);
    cr_assert_str_not_empty(msg, "malformed bytes: no message");

    pdt_req_t *q = pds_calloc(1, sizeof *q);
    cr_assert(q);
#define RESET(name)                                    \
    do {                                               \
        memset(q, 0, sizeof *q);                       \
        snprintf(q->id, sizeof q->id, "bad-%s", name); \
        pdt_fill_prompt(q, 10, 3);                     \
        q->max_tokens = 8;                             \
    } while (0)

    RESET("empty-text");
    q->text = "";
    expect_invalid(q, "empty text prompt");
    RESET("empty-ids");
    q->n_prompt = 0;
    expect_invalid(q, "empty token-id prompt");
    RESET("long-prompt");
    pdt_fill_prompt(q, ctx + 1, 4);
    expect_invalid(q, "prompt longer than the context");
    RESET("full-prompt");
    pdt_fill_prompt(q, ctx, 4);
    q->max_tokens = 1;
    expect_invalid(q, "prompt filling the whole context (no room for one token)");
    static char long_text[1024];
    memset(long_text, 'a', (size_t)ctx);
    long_text[ctx] = '\0'; /* BOS + ctx bytes > ctx */
    RESET("long-text");
    q->text = long_text;
    expect_invalid(q, "text prompt longer than the context after BOS");
    RESET("max0");
    q->max_tokens = 0;
    expect_invalid(q, "max_tokens 0");
    RESET("max-beyond");
    q->max_tokens = (uint32_t)(ctx - 10 + 1);
    expect_invalid(q, "prompt + max_tokens beyond the context");
    RESET("max-huge");
    q->max_tokens = 4000000000u;
    expect_invalid(q, "max_tokens 4e9");
    RESET("id-vocab");
    q->prompt[3] = vocab;
    expect_invalid(q, "token id == vocab");
    RESET("id-negative");
    q->prompt[0] = -1;
    expect_invalid(q, "negative token id");
    RESET("temp-nan");
    q->temperature = NAN;
    expect_invalid(q, "NaN temperature");
    RESET("temp-negative");
    q->temperature = -0.5f;
    expect_invalid(q, "negative temperature");
    RESET("temp-inf");
    q->temperature = INFINITY;
    expect_invalid(q, "infinite temperature");
    RESET("top-p-big");
    q->temperature = 0.8f;
    q->top_p = 1.5f;
    expect_invalid(q, "top_p 1.5");
    RESET("top-p-negative");
    q->temperature = 0.8f;
    q->top_p = -0.25f;
    expect_invalid(q, "top_p -0.25");
    RESET("top-p-nan");
    q->temperature = 0.8f;
    q->top_p = NAN;
    expect_invalid(q, "top_p NaN");
    RESET("top-k-negative");
    q->temperature = 0.8f;
    q->top_k = -1;
    expect_invalid(q, "top_k -1");
#undef RESET

    /* Nothing changed: nodes alive, no request left, every block free, and exact service. */
    cr_assert(pdt_cluster_check_alive(g_cluster), "%s", pdt_cluster_error(g_cluster));
    cr_assert(pdt_cluster_wait_idle(g_cluster, 5000), "%s", pdt_cluster_error(g_cluster));
    pdt_res_t *res = pds_calloc(2, sizeof *res);
    pdt_req_t *ok = pds_calloc(2, sizeof *ok);
    cr_assert(res && ok);
    mixed_request(&ok[0], 17);
    mixed_request(&ok[1], 18);
    pdt_generate_many(router, ok, res, 2, 60000);
    for (int i = 0; i < 2; i++) check_result(&ok[i], &res[i], one_prefill, one_decode, false);
    pds_free(ok);
    pds_free(res);
    pds_free(q);
}

/* n requests with prompts of 20..(20+n) tokens (more than one block: a one-block decode node
 * can never hold one), half greedy, half sampled. */
static void run_batch(const char *tag, int n, const char *const *decodes)
{
    pdt_req_t *reqs = pds_calloc((size_t)n, sizeof *reqs);
    pdt_res_t *res = pds_calloc((size_t)n, sizeof *res);
    cr_assert(reqs && res);
    for (int i = 0; i < n; i++) {
        mixed_request(&reqs[i], i);
        snprintf(reqs[i].id, sizeof reqs[i].id, "%s-%02d", tag, i);
        pdt_fill_prompt(&reqs[i], 20 + 3 * i, 900 + (uint64_t)i);
    }
    pdt_generate_many(pdt_cluster_router(g_cluster), reqs, res, n, 60000);
    for (int i = 0; i < n; i++) check_result(&reqs[i], &res[i], one_prefill, decodes, false);
    pds_free(reqs);
    pds_free(res);
}

/* Reserves n_tokens of KV on a decode node the way a prefill node would (OpenTransfer for tiny's
 * geometry), without ever sending the data: the node then has no room, while the router's view
 * of it stays stale until its next load report. */
static void hog(const char *addr, const char *id, int n_tokens)
{
    static int32_t ids[PDT_MAX_PROMPT];
    Pdserve__V1__OpenTransferRequest r = PDSERVE__V1__OPEN_TRANSFER_REQUEST__INIT;
    Pdserve__V1__KvGeometry kv = PDSERVE__V1__KV_GEOMETRY__INIT;
    kv.n_layers = 2;
    kv.n_kv_heads = 2;
    kv.head_dim = 16;
    kv.block_size = 16;
    kv.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    r.request_id = (char *)id;
    r.n_tokens = (uint32_t)n_tokens;
    r.n_token_ids = (size_t)n_tokens;
    r.token_ids = ids;
    r.max_tokens = 1;
    r.router_id = (char *)"r0";
    r.prefill_node_id = (char *)"test";
    r.kvx_backend = (char *)"ucx";
    r.kv = &kv;
    pds_rpc_channel_t *ch = NULL;
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_create(addr, &ch);
    if (s == PDS_OK)
        s = pds_rpc_channel_call(ch, "/pdserve.v1.DecodeNode/OpenTransfer", &r.base,
                                 &pdserve__v1__open_transfer_reply__descriptor, 5000, &reply);
    cr_assert_eq(s, PDS_OK, "hog %s on %s: %s", id, addr, pds_err_detail());
    pds_rpc_msg_free(reply);
    pds_rpc_channel_destroy(ch);
}

static void unhog(const char *addr, const char *id)
{
    Pdserve__V1__CancelRequest r = PDSERVE__V1__CANCEL_REQUEST__INIT;
    r.request_id = (char *)id;
    r.reason = (char *)"test done";
    pds_rpc_channel_t *ch = NULL;
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_create(addr, &ch);
    if (s == PDS_OK)
        s = pds_rpc_channel_call(ch, "/pdserve.v1.DecodeNode/Cancel", &r.base,
                                 &pdserve__v1__cancel_reply__descriptor, 5000, &reply);
    cr_assert_eq(s, PDS_OK, "unhog %s: %s", id, pds_err_detail());
    pds_rpc_msg_free(reply);
    pds_rpc_channel_destroy(ch);
}

Test(cluster, dead_or_full_decode_node_does_not_fail_requests, .fini = teardown, .timeout = 150)
{
    g_ref = pdt_ref_create("tiny");
    cr_assert(g_ref);
    g_cluster = pdt_cluster_create("decode-failures", "tcp");
    cr_assert(g_cluster);
    pdt_cluster_t *c = g_cluster;
    cr_assert(pdt_cluster_start_router(c, NULL), "%s", pdt_cluster_error(c));
    /* A router that prefers free blocks tries d-dead (128 blocks) first, then d-full (64, but
     * all reserved behind its back), and must end on d0 (32) for every request. */
    cr_assert(pdt_cluster_spawn_node(c, PDT_PREFILL, "p0", 0, NULL), "%s", pdt_cluster_error(c));
    cr_assert(pdt_cluster_spawn_node(c, PDT_DECODE, "d0", 512, NULL), "%s", pdt_cluster_error(c));
    cr_assert(pdt_cluster_spawn_node(c, PDT_DECODE, "d-full", 1024, NULL), "%s",
              pdt_cluster_error(c));
    cr_assert(pdt_cluster_spawn_node(c, PDT_DECODE, "d-dead", 2048, NULL), "%s",
              pdt_cluster_error(c));
    cr_assert(pdt_cluster_wait_ready(c, 30000), "%s", pdt_cluster_error(c));
    cr_assert(pdt_cluster_wait_up(c, 20000), "%s", pdt_cluster_error(c));
    const char *full = pdt_cluster_addr(c, "d-full");

    /* Down at request time, before the router noticed; d-full without room while the router
     * still believes it has 64 free blocks (its next report is up to 100 ms away, so retry the
     * round a few times until d-full has refused at least once). */
    cr_assert(pdt_cluster_kill(c, "d-dead", SIGKILL), "%s", pdt_cluster_error(c));
    int refused = 0;
    for (int round = 0; round < 5 && refused == 0; round++) {
        hog(full, "hog-a", 511); /* 32 blocks each: the whole pool */
        hog(full, "hog-b", 511);
        char tag[16];
        snprintf(tag, sizeof tag, "r%d", round);
        run_batch(tag, 12, one_decode);
        unhog(full, "hog-a");
        unhog(full, "hog-b");
        refused = pdt_cluster_log_count(c, "d-full", "open_refused");
        pds_time_sleep_ms(250); /* a report with d-full's pool free again */
    }
    cr_assert_gt(refused, 0, "d-full never refused: the router never tried it while full");
    /* ... and after the router noticed d-dead. */
    cr_assert(pdt_cluster_wait_state(c, "d-dead", STATE(DOWN), 15000), "%s", pdt_cluster_error(c));
    run_batch("noticed", 12, two_decodes_full);
    cr_assert(pdt_cluster_check_alive(c), "%s", pdt_cluster_error(c));
    cr_assert(pdt_cluster_wait_idle(c, 10000), "%s", pdt_cluster_error(c));
}

Test(cluster, more_work_than_the_decode_pool_holds_finishes_exactly, .fini = teardown,
     .timeout = 150)
{
    /* 20 blocks of 16 tokens; 20 requests of 40 prompt + 40 output tokens need 100. */
    setup_cluster("preempt", "tcp", "tiny", 1, 1, 0, 320);
    enum { N = 20 };
    pdt_req_t *reqs = pds_calloc(N, sizeof *reqs);
    pdt_res_t *res = pds_calloc(N, sizeof *res);
    cr_assert(reqs && res);
    for (int i = 0; i < N; i++) {
        mixed_request(&reqs[i], i);
        snprintf(reqs[i].id, sizeof reqs[i].id, "full-%02d", i);
        pdt_fill_prompt(&reqs[i], 40, 300 + (uint64_t)i);
        reqs[i].max_tokens = 40;
        reqs[i].ignore_eos = true;
    }
    pdt_generate_many(pdt_cluster_router(g_cluster), reqs, res, N, 120000);
    for (int i = 0; i < N; i++) check_result(&reqs[i], &res[i], one_prefill, one_decode, false);
    cr_assert_gt(pdt_cluster_log_count(g_cluster, "d0", "msg=preempt"), 0,
                 "the decode node never preempted: the test did not exercise recompute");
    cr_assert(pdt_cluster_wait_idle(g_cluster, 10000), "%s", pdt_cluster_error(g_cluster));
    cr_assert(pdt_cluster_check_alive(g_cluster), "%s", pdt_cluster_error(g_cluster));
    pds_free(reqs);
    pds_free(res);
}

/* ---- a decode node killed mid-generation ---- */
typedef struct {
    pdt_req_t *reqs;
    pdt_res_t *res;
    int n;
} batch_t;

static void *batch_thread(void *arg)
{
    batch_t *b = arg;
    pdt_generate_many(pdt_cluster_router(g_cluster), b->reqs, b->res, b->n, 120000);
    return NULL;
}

Test(cluster, decode_node_killed_mid_generation_loses_no_request, .fini = teardown, .timeout = 150)
{
    /* `small`, so that generation lasts long enough to kill a node in the middle of it. */
    setup_cluster("kill-mid", "tcp", "small", 1, 2, 2048, 2048);
    enum { N = 6 };
    batch_t b = {pds_calloc(N, sizeof(pdt_req_t)), pds_calloc(N, sizeof(pdt_res_t)), N};
    cr_assert(b.reqs && b.res);
    for (int i = 0; i < N; i++) {
        mixed_request(&b.reqs[i], i);
        snprintf(b.reqs[i].id, sizeof b.reqs[i].id, "survive-%d", i);
        pdt_fill_prompt(&b.reqs[i], 24 + i, 700 + (uint64_t)i);
        b.reqs[i].max_tokens = 150;
        b.reqs[i].ignore_eos = true;
    }
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, batch_thread, &b), 0);
    /* Kill d1 once it runs some of them (its load report says so). */
    bool busy = pdt_cluster_wait_running(g_cluster, "d1", 1, 30000);
    bool killed = busy && pdt_cluster_kill(g_cluster, "d1", SIGKILL);
    pthread_join(th, NULL);
    cr_assert(killed, "%s", pdt_cluster_error(g_cluster));
    int replaced = 0;
    for (int i = 0; i < N; i++) {
        check_result(&b.reqs[i], &b.res[i], one_prefill, two_decodes, true);
        replaced += b.res[i].replacements > 0;
        if (b.res[i].replacements)
            cr_assert_str_eq(b.res[i].decode_node, "d0", "%s re-placed onto a dead node",
                             b.reqs[i].id);
    }
    cr_assert_gt(replaced, 0, "no request was running on d1 when it was killed");
    cr_assert(pdt_cluster_wait_idle(g_cluster, 10000), "%s", pdt_cluster_error(g_cluster));
    pds_free(b.reqs);
    pds_free(b.res);
}

/* ---- clients ---- */
/* Runs a command, returns its stdout (pds_malloc'ed) and exit status. */
static char *run_capture(const char *cmd, int *status)
{
    FILE *p = popen(cmd, "r");
    cr_assert(p, "popen %s", cmd);
    size_t cap = 1 << 16, len = 0;
    char *buf = pds_malloc(cap);
    cr_assert(buf);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (len + 1 == cap) {
            cap *= 2;
            buf = pds_realloc(buf, cap);
            cr_assert(buf);
        }
    }
    buf[len] = '\0';
    *status = pclose(p);
    return buf;
}

static void sampled_request(pdt_req_t *q, const char *id)
{
    memset(q, 0, sizeof *q);
    snprintf(q->id, sizeof q->id, "%s", id);
    pdt_fill_prompt(q, 37, 4242);
    q->max_tokens = 24;
    q->temperature = 0.8f;
    q->top_k = 40;
    q->top_p = 0.9f;
    q->has_seed = true;
    q->seed = 31337;
    q->ignore_eos = true;
}

static void ids_arg(const pdt_req_t *q, char *buf, size_t cap)
{
    size_t len = 0;
    for (int i = 0; i < q->n_prompt; i++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%d", i ? "," : "", q->prompt[i]);
}

Test(cluster, python_client_and_cli_stream_reference_tokens, .fini = teardown, .timeout = 120)
{
    setup_cluster("clients", "tcp", "tiny", 1, 1, 0, 0);
    const char *router = pdt_cluster_router(g_cluster);
    const char *src = getenv("PDS_SOURCE_DIR"), *build = getenv("PDS_BUILD_DIR");
    cr_assert(src && build, "PDS_SOURCE_DIR and PDS_BUILD_DIR must be set (ctest sets them)");
    pdt_req_t *q = pds_calloc(1, sizeof *q);
    cr_assert(q);
    sampled_request(q, "py-1");
    expect_t e;
    reference(q, 0, &e);
    char ids[4096], cmd[8192];
    ids_arg(q, ids, sizeof ids);

    /* Python: one JSON line per message (chunks, then the summary). */
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 %s/deploy/python/pdserve_client.py --stubs-dir %s/pystubs "
             "generate --target %s --tokens %s --max-tokens %u --temperature 0.8 --top-k 40 "
             "--top-p 0.9 --seed 31337 --ignore-eos --request-id py-1 --json 2>&1",
             src, pdt_cluster_dir(g_cluster), router, ids, q->max_tokens);
    int status = 0;
    char *out = run_capture(cmd, &status);
    cr_assert_eq(status, 0, "python client failed (%d):\n%s", status, out);
    int32_t got[PDT_MAX_OUT];
    int n_got = 0;
    bool summary = false;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        json_error_t jerr;
        json_t *j = json_loads(line, 0, &jerr);
        cr_assert(j, "python client printed a non-JSON line: %s", line);
        const char *type = json_string_value(json_object_get(j, "type"));
        cr_assert(type, "line without type: %s", line);
        if (strcmp(type, "chunk") == 0) {
            cr_assert_eq(json_integer_value(json_object_get(j, "index")), n_got);
            json_t *a = json_object_get(j, "ids");
            for (size_t k = 0; k < json_array_size(a) && n_got < PDT_MAX_OUT; k++)
                got[n_got++] = (int32_t)json_integer_value(json_array_get(a, k));
        } else if (strcmp(type, "summary") == 0) {
            summary = true;
            cr_assert_eq(json_integer_value(json_object_get(j, "output_tokens")), e.n);
            cr_assert_str_eq(json_string_value(json_object_get(j, "finish_reason")),
                             "FINISH_REASON_LENGTH");
            cr_assert_str_eq(json_string_value(json_object_get(j, "request_id")), "py-1");
        }
        json_decref(j);
    }
    pds_free(out);
    cr_assert(summary, "python client printed no summary");
    char diff[160];
    pdt_diff_tokens(got, n_got, e.tokens, e.n, diff, sizeof diff);
    cr_assert_str_empty(diff, "python client vs reference: %s", diff);

    /* pdserve-cli --json: one object with the tokens. */
    snprintf(cmd, sizeof cmd,
             "%s/bin/pdserve-cli generate --router %s --tokens %s --max-tokens %u "
             "--temperature 0.8 --top-k 40 --top-p 0.9 --seed 31337 --ignore-eos --json",
             build, router, ids, q->max_tokens);
    out = run_capture(cmd, &status);
    cr_assert_eq(status, 0, "pdserve-cli failed (%d):\n%s", status, out);
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    cr_assert(j, "pdserve-cli --json printed: %s", out);
    json_t *a = json_object_get(j, "tokens");
    n_got = 0;
    for (size_t k = 0; k < json_array_size(a) && n_got < PDT_MAX_OUT; k++)
        got[n_got++] = (int32_t)json_integer_value(json_array_get(a, k));
    pdt_diff_tokens(got, n_got, e.tokens, e.n, diff, sizeof diff);
    cr_assert_str_empty(diff, "pdserve-cli vs reference: %s", diff);
    cr_assert_str_eq(json_string_value(json_object_get(j, "finish_reason")), "length");
    cr_assert_str_eq(json_string_value(json_object_get(j, "decode_node")), "d0");
    json_decref(j);
    pds_free(out);

    /* pdserve-cli status lists both nodes UP; a bad request exits 1 with the router's message. */
    snprintf(cmd, sizeof cmd, "%s/bin/pdserve-cli status --router %s --json", build, router);
    out = run_capture(cmd, &status);
    cr_assert_eq(status, 0, "pdserve-cli status failed:\n%s", out);
    j = json_loads(out, 0, &jerr);
    cr_assert(j, "pdserve-cli status --json printed: %s", out);
    json_t *nodes = json_object_get(j, "nodes");
    cr_assert_eq(json_array_size(nodes), 2, "%s", out);
    for (size_t k = 0; k < 2; k++)
        cr_assert_str_eq(json_string_value(json_object_get(json_array_get(nodes, k), "state")),
                         "UP");
    json_decref(j);
    pds_free(out);
    snprintf(cmd, sizeof cmd,
             "%s/bin/pdserve-cli generate --router %s --tokens 1,2,3 --max-tokens 0 2>&1", build,
             router);
    out = run_capture(cmd, &status);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "exit %d:\n%s", status, out);
    cr_assert(strstr(out, "INVALID_ARGUMENT"), "pdserve-cli error output: %s", out);
    pds_free(out);
    pds_free(q);
}

/* Tests of pdserve-prefill: the real binary (tiny preset, one engine thread, UCX over TCP on
 * loopback, no router), driven over gRPC. The test plays the decode node itself: a pds_rpc server
 * with DecodeNode OpenTransfer / CommitTransfer / Cancel over its own CPU engine and a kvx receiver
 * whose pool is that engine's KV pool. So each test can check what actually landed in the decode
 * node's blocks (exactly the KV the test's engine computes for the same tokens), that the first
 * token is pds_engine_generate's, and that decoding on from the received KV reproduces the
 * reference continuation. Failure cases check the exact status the router would see, and that the
 * node keeps serving afterwards. Every test ends with SIGTERM and expects a clean exit 0 (under
 * the sanitizer build, that includes LeakSanitizer finding nothing).
 *
 * Waits are bounded only so that a bug fails instead of hanging; nothing asserts on timing.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "kvx/kvx.h"
#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"

#define M_PREFILL  "/pdserve.v1.PrefillNode/Prefill"
#define M_P_CANCEL "/pdserve.v1.PrefillNode/Cancel"
#define M_HEALTH   "/pdserve.v1.Pdserve/Health"
#define SEED       1 /* the node's default [model] seed */
#define CALL_MS    60000
#define WAIT_MS    20000
#define MAX_XFERS  16
#define MAX_TOK    600

/* ================================================================================================
 * The fake decode node (one per test process: Criterion forks per test)
 * ================================================================================================
 */
typedef enum { D_NORMAL = 0, D_EXHAUSTED, D_HOLD } d_mode_t;

typedef struct {
    char request_id[64];
    uint64_t transfer_id;
    Pdserve__V1__OpenTransferRequest *open; /* the request as received (unpacked copy) */
    int32_t ids[64];
    int n_blocks;
    pds_kvx_recv_t *recv;
    pds_status_t recv_status;
    bool committed, cancelled, blocks_held;
    int32_t first_token;
    uint64_t sent_bytes;
} xfer_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pds_engine_t *e;
    pds_engine_info_t info;
    pds_kvx_t *x;
    const void *addr, *pool;
    size_t addr_len, pool_len;
    pds_rpc_server_t *srv;
    char address[64];
    d_mode_t mode;
    uint64_t next_id;
    int opens, commits, cancels;
    xfer_t xf[MAX_XFERS];
    int n_xf;
    pds_rpc_call_t *held; /* D_HOLD: an OpenTransfer not answered yet */
    int held_xf;
} D = {.mu = PTHREAD_ERRORCHECK_MUTEX_INITIALIZER_NP, .cv = PTHREAD_COND_INITIALIZER};
/* (error-checking: a failed assertion may leave the test's thread holding D.mu; teardown then
 * unlocks it, and an unlock by a thread that does not hold it is a harmless EPERM) */

static xfer_t *d_find(const char *request_id)
{
    for (int i = 0; i < D.n_xf; i++)
        if (strcmp(D.xf[i].request_id, request_id) == 0) return &D.xf[i];
    return NULL;
}

/* Reserves blocks, expects the transfer and answers with where to put the KV. Under D.mu. */
static void d_answer_open(pds_rpc_call_t *call, xfer_t *t)
{
    int bs = D.info.kv.block_size;
    t->n_blocks = (int)((t->open->n_tokens + (uint32_t)bs - 1) / (uint32_t)bs);
    pds_status_t s = pds_kv_pool_alloc(pds_engine_kv_pool(D.e), t->n_blocks, NULL, t->ids);
    if (s != PDS_OK) {
        pds_rpc_call_finish(call, PDS_ERR_EXHAUSTED, "fake decode node: pool full");
        return;
    }
    t->blocks_held = true;
    t->transfer_id = ++D.next_id;
    s = pds_kvx_expect(D.x, t->transfer_id, t->n_blocks, t->ids, 20000, NULL, NULL, &t->recv);
    cr_expect_eq(s, PDS_OK, "kvx_expect: %s", pds_err_detail());
    Pdserve__V1__OpenTransferReply rep = PDSERVE__V1__OPEN_TRANSFER_REPLY__INIT;
    rep.transfer_id = t->transfer_id;
    rep.n_block_ids = (size_t)t->n_blocks;
    rep.block_ids = t->ids;
    rep.kvx_receiver_address.data = (uint8_t *)D.addr;
    rep.kvx_receiver_address.len = D.addr_len;
    rep.kvx_rkey.data = (uint8_t *)D.pool;
    rep.kvx_rkey.len = D.pool_len;
    rep.block_size = (uint32_t)bs;
    rep.kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    pds_rpc_call_reply(call, &rep.base);
}

static void d_open(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    const Pdserve__V1__OpenTransferRequest *r = (const Pdserve__V1__OpenTransferRequest *)msg;
    pthread_mutex_lock(&D.mu);
    D.opens++;
    if (D.mode == D_EXHAUSTED) {
        pthread_mutex_unlock(&D.mu);
        pds_rpc_call_finish(call, PDS_ERR_EXHAUSTED, "fake decode node: no room for 40 blocks");
        return;
    }
    cr_expect_lt(D.n_xf, MAX_XFERS);
    xfer_t *t = &D.xf[D.n_xf++];
    memset(t, 0, sizeof *t);
    snprintf(t->request_id, sizeof t->request_id, "%s", r->request_id);
    uint8_t buf[8192];
    size_t n = protobuf_c_message_pack(msg, buf);
    t->open = pdserve__v1__open_transfer_request__unpack(NULL, n, buf);
    t->first_token = -1;
    t->recv_status = PDS_IN_PROGRESS;
    if (D.mode == D_HOLD) {
        D.held = call;
        D.held_xf = D.n_xf - 1;
    } else {
        d_answer_open(call, t);
    }
    pthread_cond_broadcast(&D.cv);
    pthread_mutex_unlock(&D.mu);
}

static void d_commit(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    const Pdserve__V1__CommitTransferRequest *r = (const Pdserve__V1__CommitTransferRequest *)msg;
    pthread_mutex_lock(&D.mu);
    D.commits++;
    xfer_t *t = d_find(r->request_id);
    pds_status_t s = PDS_ERR_NOT_FOUND;
    if (t && t->transfer_id == r->transfer_id && t->recv) {
        /* The sender's kvx commit returned after our verdict, so this does not wait in practice. */
        s = pds_kvx_recv_wait(t->recv, 5000);
        t->recv_status = s;
        t->committed = s == PDS_OK;
        t->first_token = r->first_token;
        t->sent_bytes = r->sent_bytes;
    }
    pthread_cond_broadcast(&D.cv);
    pthread_mutex_unlock(&D.mu);
    if (s != PDS_OK) {
        pds_rpc_call_finish(call, s, "fake decode node: transfer not complete");
        return;
    }
    Pdserve__V1__CommitReply rep = PDSERVE__V1__COMMIT_REPLY__INIT;
    rep.received_bytes = r->sent_bytes;
    pds_rpc_call_reply(call, &rep.base);
}

static void d_release_locked(xfer_t *t)
{
    pds_kvx_recv_close(t->recv);
    t->recv = NULL;
    if (t->blocks_held) pds_kv_pool_free(pds_engine_kv_pool(D.e), t->n_blocks, t->ids);
    t->blocks_held = false;
}

static void d_cancel(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    const Pdserve__V1__CancelRequest *r = (const Pdserve__V1__CancelRequest *)msg;
    Pdserve__V1__CancelReply rep = PDSERVE__V1__CANCEL_REPLY__INIT;
    pthread_mutex_lock(&D.mu);
    D.cancels++;
    xfer_t *t = d_find(r->request_id);
    if (t) {
        rep.found = !t->cancelled;
        t->cancelled = true;
        d_release_locked(t);
    }
    pthread_cond_broadcast(&D.cv);
    pthread_mutex_unlock(&D.mu);
    pds_rpc_call_reply(call, &rep.base);
}

/* An engine like the node's: tiny preset, same seed, one thread, the given token budget. */
static pds_engine_t *engine_new(int max_batch_tokens)
{
    pds_model_config_t mc;
    cr_assert_eq(pds_model_preset("tiny", &mc), PDS_OK);
    pds_engine_params_t p = pds_engine_default_params();
    p.n_threads = 1;
    p.max_batch_tokens = max_batch_tokens;
    pds_engine_t *e = NULL;
    cr_assert_eq(pds_engine_create_synth(&mc, SEED, &p, &e), PDS_OK, "%s", pds_err_detail());
    return e;
}

static void d_start(void)
{
    D.e = engine_new(8192);
    pds_engine_info(D.e, &D.info);
    pds_kvx_params_t kp = pds_kvx_default_params();
    cr_assert_eq(pds_kvx_create(&kp, &D.x), PDS_OK, "kvx: %s", pds_err_detail());
    cr_assert_eq(pds_kvx_address(D.x, &D.addr, &D.addr_len), PDS_OK);
    void *bases[64];
    for (int l = 0; l < D.info.kv.n_layers; l++) {
        size_t bytes;
        bool dev;
        cr_assert_eq(pds_engine_kv_layer_memory(D.e, l, &bases[l], &bytes, &dev), PDS_OK);
    }
    cr_assert_eq(
        pds_kvx_register_pool(D.x, &D.info.kv, bases, PDS_KVX_MEM_HOST, &D.pool, &D.pool_len),
        PDS_OK, "%s", pds_err_detail());
    pds_rpc_server_params_t sp = pds_rpc_server_default_params();
    cr_assert_eq(pds_rpc_server_create(&sp, &D.srv), PDS_OK);
    pds_rpc_method_t m[] = {
        {"/pdserve.v1.DecodeNode/OpenTransfer", PDS_RPC_UNARY,
         &pdserve__v1__open_transfer_request__descriptor, d_open, NULL, NULL},
        {"/pdserve.v1.DecodeNode/CommitTransfer", PDS_RPC_UNARY,
         &pdserve__v1__commit_transfer_request__descriptor, d_commit, NULL, NULL},
        {"/pdserve.v1.DecodeNode/Cancel", PDS_RPC_UNARY, &pdserve__v1__cancel_request__descriptor,
         d_cancel, NULL, NULL},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(m); i++)
        cr_assert_eq(pds_rpc_server_add_method(D.srv, &m[i]), PDS_OK);
    cr_assert_eq(pds_rpc_server_start(D.srv), PDS_OK);
    snprintf(D.address, sizeof D.address, "127.0.0.1:%d", pds_rpc_server_port(D.srv));
}

static void d_stop(void)
{
    if (D.srv) pds_rpc_server_destroy(D.srv);
    D.srv = NULL;
    pthread_mutex_lock(&D.mu);
    for (int i = 0; i < D.n_xf; i++) {
        d_release_locked(&D.xf[i]);
        pdserve__v1__open_transfer_request__free_unpacked(D.xf[i].open, NULL);
        D.xf[i].open = NULL;
    }
    D.n_xf = 0;
    pthread_mutex_unlock(&D.mu);
    pds_kvx_destroy(D.x);
    D.x = NULL;
    pds_engine_destroy(D.e);
    D.e = NULL;
}

/* ================================================================================================
 * The prefill node under test
 * ================================================================================================
 */
static struct {
    pid_t pid;
    FILE *out;
    char address[256];
    pds_rpc_channel_t *ch;
} P;

static void node_start(const char *const *extra)
{
    const char *build = getenv("PDS_BUILD_DIR");
    cr_assert(build && *build, "PDS_BUILD_DIR must name the build directory (ctest sets it)");
    char path[512];
    snprintf(path, sizeof path, "%s/bin/pdserve-prefill", build);
    cr_assert_eq(access(path, X_OK), 0, "%s is not built", path);
    char *argv[24];
    int n = 0;
    argv[n++] = path;
    argv[n++] = (char *)"--node.id=p-test";
    bool router_given = false;
    for (int i = 0; extra && extra[i]; i++)
        router_given = router_given || strncmp(extra[i], "--node.router=", 14) == 0;
    if (!router_given) argv[n++] = (char *)"--node.router=";
    argv[n++] = (char *)"--node.listen=127.0.0.1:0";
    argv[n++] = (char *)"--model.preset=tiny";
    argv[n++] = (char *)"--engine.threads=1";
    argv[n++] = (char *)"--log.level=warn";
    for (int i = 0; extra && extra[i]; i++) argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t parent = getpid();
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(path, argv);
        _exit(127);
    }
    close(fds[1]);
    P.pid = pid;
    P.out = fdopen(fds[0], "r");
    char line[256] = "";
    bool ready = false;
    while (!ready && fgets(line, sizeof line, P.out)) ready = strncmp(line, "READY ", 6) == 0;
    cr_assert(ready, "pdserve-prefill exited without printing READY");
    line[strcspn(line, "\r\n")] = '\0';
    snprintf(P.address, sizeof P.address, "%s", line + 6);
    cr_assert_eq(pds_rpc_channel_create(P.address, &P.ch), PDS_OK);
}

/* SIGTERM, then expects exit status 0 (clean shutdown; no leak under LSan). */
static void node_stop_clean(void)
{
    pds_rpc_channel_destroy(P.ch);
    P.ch = NULL;
    cr_assert_eq(kill(P.pid, SIGTERM), 0);
    int st = 0;
    cr_assert_eq(waitpid(P.pid, &st, 0), P.pid);
    P.pid = 0;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "pdserve-prefill exit status %d (signal %d)",
              WIFEXITED(st) ? WEXITSTATUS(st) : -1, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

static void setup(void)
{
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
}

static void teardown(void)
{
    pthread_mutex_unlock(&D.mu); /* held if an assertion failed inside a locked section */
    if (P.ch) pds_rpc_channel_destroy(P.ch);
    P.ch = NULL;
    if (P.pid > 0) {
        kill(P.pid, SIGKILL);
        waitpid(P.pid, NULL, 0);
    }
    if (P.out) fclose(P.out);
    P.out = NULL;
    d_stop();
}

TestSuite(prefill_node, .init = setup, .fini = teardown, .timeout = 300);

/* ================================================================================================
 * Helpers
 * ================================================================================================
 */
typedef struct {
    const char *id;
    const int32_t *prompt;
    int n_prompt;
    const int32_t *gen;
    int n_gen;
    Pdserve__V1__SamplingParams *sampling;
    uint32_t max_tokens;
    const int32_t *stop;
    int n_stop;
    bool ignore_eos;
    const char *decode_address; /* NULL = the fake decode node */
} req_t;

static pds_status_t prefill(const req_t *q, Pdserve__V1__PrefillReply **out, char *msg, size_t cap)
{
    Pdserve__V1__PrefillRequest r = PDSERVE__V1__PREFILL_REQUEST__INIT;
    r.request_id = (char *)q->id;
    r.n_prompt_ids = (size_t)q->n_prompt;
    r.prompt_ids = (int32_t *)q->prompt;
    r.n_generated_ids = (size_t)q->n_gen;
    r.generated_ids = (int32_t *)q->gen;
    r.sampling = q->sampling;
    r.max_tokens = q->max_tokens;
    r.n_stop_token_ids = (size_t)q->n_stop;
    r.stop_token_ids = (int32_t *)q->stop;
    r.ignore_eos = q->ignore_eos;
    r.router_id = (char *)"router-t";
    r.decode_node_id = (char *)"d-test";
    r.decode_address = (char *)(q->decode_address ? q->decode_address : D.address);
    r.decode_kvx_address.data = (uint8_t *)D.addr;
    r.decode_kvx_address.len = D.addr_len;
    ProtobufCMessage *rep = NULL;
    pds_status_t s = pds_rpc_channel_call(P.ch, M_PREFILL, &r.base,
                                          &pdserve__v1__prefill_reply__descriptor, CALL_MS, &rep);
    if (msg) snprintf(msg, cap, "%s", s == PDS_OK ? "" : pds_err_detail());
    *out = (Pdserve__V1__PrefillReply *)rep;
    return s;
}

static void prompt_fill(int32_t *p, int n, int salt)
{
    for (int i = 0; i < n; i++) p[i] = (int32_t)((i * 37 + salt * 11 + 5) % 256);
}

/* pds_engine_generate on a fresh reference engine. */
static int reference(int max_batch_tokens, const int32_t *prompt, int n, pds_sample_params_t sp,
                     int max_new, int32_t *out)
{
    pds_engine_t *e = engine_new(max_batch_tokens);
    pds_gen_request_t g = {.prompt = prompt,
                           .n_prompt = n,
                           .max_new_tokens = max_new,
                           .sample = sp,
                           .ignore_eos = true};
    int n_out = 0;
    pds_finish_reason_t why;
    cr_assert_eq(pds_engine_generate(e, &g, out, &n_out, &why, NULL, NULL), PDS_OK, "%s",
                 pds_err_detail());
    pds_engine_destroy(e);
    return n_out;
}

/* The KV the reference engine computes for toks (in chunks of max_batch_tokens, as the node
 * does), exported as fp32. */
static float *reference_kv(int max_batch_tokens, const int32_t *toks, int n, size_t *bytes)
{
    pds_engine_t *e = engine_new(max_batch_tokens);
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    pds_kv_seq_t s;
    pds_kv_seq_init(&s);
    for (int done = 0; done < n;) {
        int c = n - done < max_batch_tokens ? n - done : max_batch_tokens;
        cr_assert_eq(pds_kv_seq_grow(&s, pds_engine_kv_pool(e), info.kv.block_size, c, NULL),
                     PDS_OK);
        pds_engine_seq_t q = {.tokens = toks + done, .n_tokens = c, .kv = &s};
        cr_assert_eq(pds_engine_forward(e, &q, 1, NULL, NULL), PDS_OK, "%s", pds_err_detail());
        done += c;
    }
    *bytes = pds_engine_kv_export_bytes(e, s.n_blocks, PDS_DTYPE_F32);
    float *buf = malloc(*bytes);
    cr_assert_eq(pds_engine_kv_export(e, &s, PDS_DTYPE_F32, buf, *bytes), PDS_OK);
    pds_kv_seq_release(&s, pds_engine_kv_pool(e));
    pds_kv_seq_fini(&s);
    pds_engine_destroy(e);
    return buf;
}

/* Compares the KV of the first n tokens (the slots past n in the last block mean nothing). */
static void kv_expect_equal(const float *got, const float *want, int n_tokens, int n_blocks)
{
    pds_kv_layout_t l = D.info.kv;
    l.n_blocks = n_blocks;
    int64_t layer_elems = (int64_t)n_blocks * pds_kv_block_elems(&l);
    int64_t diffs = 0;
    for (int layer = 0; layer < l.n_layers; layer++)
        for (int t = 0; t < n_tokens; t++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < l.n_kv_heads; h++)
                    for (int d = 0; d < l.head_dim; d++) {
                        int64_t o =
                            layer * layer_elems +
                            pds_kv_layout_offset(&l, t / l.block_size, kv, t % l.block_size, h, d);
                        if (memcmp(&got[o], &want[o], sizeof(float)) != 0 && diffs++ < 5)
                            cr_log_error("KV differs: layer %d token %d %s head %d dim %d: "
                                         "%.9g vs %.9g",
                                         layer, t, kv ? "V" : "K", h, d, (double)got[o],
                                         (double)want[o]);
                    }
    cr_assert_eq(diffs, 0, "%lld KV values differ from the reference engine's", (long long)diffs);
}

/* Exports the KV that landed in t's blocks, checks it against the reference, then decodes on
 * from it in the decode node's engine and checks the tokens against ref[from..n_ref). */
static void check_landed(xfer_t *t, const int32_t *toks, int n_tokens, int chunk,
                         const pds_sample_params_t *sp, const int32_t *ref, int from, int n_ref)
{
    pthread_mutex_lock(&D.mu);
    cr_assert_eq(t->recv_status, PDS_OK);
    pds_kv_seq_t s;
    pds_kv_seq_init(&s);
    cr_assert_eq(pds_kv_seq_adopt(&s, t->n_blocks, t->ids, n_tokens), PDS_OK);
    t->blocks_held = false; /* the sequence owns them now */
    size_t bytes = pds_engine_kv_export_bytes(D.e, t->n_blocks, PDS_DTYPE_F32), want_bytes = 0;
    float *got = malloc(bytes);
    cr_assert_eq(pds_engine_kv_export(D.e, &s, PDS_DTYPE_F32, got, bytes), PDS_OK);
    float *want = reference_kv(chunk, toks, n_tokens, &want_bytes);
    cr_assert_eq(bytes, want_bytes);
    kv_expect_equal(got, want, n_tokens, t->n_blocks);
    free(got);
    free(want);

    int32_t tok = t->first_token;
    cr_assert_eq(tok, ref[from], "first token %d, reference %d", tok, ref[from]);
    for (int k = from + 1; k < n_ref; k++) {
        cr_assert_eq(pds_kv_seq_grow(&s, pds_engine_kv_pool(D.e), D.info.kv.block_size, 1, NULL),
                     PDS_OK);
        int32_t in = tok;
        pds_engine_seq_t q = {
            .tokens = &in, .n_tokens = 1, .kv = &s, .sample = sp, .token_out = &tok};
        cr_assert_eq(pds_engine_forward(D.e, &q, 1, NULL, NULL), PDS_OK);
        cr_assert_eq(tok, ref[k], "output %d: %d after the transferred KV, reference %d", k, tok,
                     ref[k]);
    }
    pds_kv_seq_release(&s, pds_engine_kv_pool(D.e));
    pds_kv_seq_fini(&s);
    pthread_mutex_unlock(&D.mu);
}

static int d_free_blocks(void)
{
    pthread_mutex_lock(&D.mu);
    int n = pds_kv_pool_free_count(pds_engine_kv_pool(D.e));
    pthread_mutex_unlock(&D.mu);
    return n;
}

static pds_sample_params_t greedy(Pdserve__V1__SamplingParams *wire)
{
    *wire = (Pdserve__V1__SamplingParams)PDSERVE__V1__SAMPLING_PARAMS__INIT;
    wire->seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    wire->seed = 0;
    return pds_sample_default_params();
}

/* A request that must succeed: first token = reference, transfer committed. */
static void expect_serving(const char *id, int salt)
{
    int32_t prompt[21], ref[4];
    prompt_fill(prompt, 21, salt);
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t sp = greedy(&w);
    reference(8192, prompt, 21, sp, 4, ref);
    req_t q = {.id = id,
               .prompt = prompt,
               .n_prompt = 21,
               .sampling = &w,
               .max_tokens = 4,
               .ignore_eos = true};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s: %s", id, msg);
    cr_assert_eq(rep->first_token, ref[0]);
    cr_assert_not(rep->finished);
    pthread_mutex_lock(&D.mu);
    xfer_t *t = d_find(id);
    cr_assert(t && t->committed && t->first_token == ref[0], "%s not committed at D", id);
    pthread_mutex_unlock(&D.mu);
    pds_rpc_msg_free(&rep->base);
}

/* ================================================================================================
 * Tests
 * ================================================================================================
 */
Test(prefill_node, kv_lands_in_decode_blocks_and_decoding_continues_exactly)
{
    node_start(NULL);
    d_start();
    enum { N = 37, NEW = 8 };
    int32_t prompt[N], ref[NEW];
    prompt_fill(prompt, N, 1);
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t sp = greedy(&w);
    cr_assert_eq(reference(8192, prompt, N, sp, NEW, ref), NEW);

    req_t q = {.id = "r-greedy",
               .prompt = prompt,
               .n_prompt = N,
               .sampling = &w,
               .max_tokens = NEW,
               .ignore_eos = true};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    cr_assert_eq(rep->first_token, ref[0]);
    cr_assert_not(rep->finished);
    cr_assert_str_eq(rep->prefill_node_id, "p-test");
    cr_assert_eq(rep->computed_tokens, (uint32_t)N);
    int nb = (N + D.info.kv.block_size - 1) / D.info.kv.block_size;
    cr_assert_eq(rep->kv_transfer_bytes, (uint64_t)D.info.kv.n_layers * (uint64_t)nb *
                                             (uint64_t)pds_kv_block_bytes(&D.info.kv));

    pthread_mutex_lock(&D.mu);
    cr_assert_eq(D.opens, 1);
    cr_assert_eq(D.commits, 1);
    cr_assert_eq(D.cancels, 0);
    xfer_t *t = d_find("r-greedy");
    cr_assert_not_null(t);
    cr_assert_eq(rep->transfer_id, t->transfer_id);
    cr_assert_eq(t->sent_bytes, rep->kv_transfer_bytes);
    const Pdserve__V1__OpenTransferRequest *o = t->open;
    cr_assert_eq(o->n_tokens, (uint32_t)N);
    cr_assert_eq(o->n_token_ids, (size_t)N);
    cr_assert_arr_eq(o->token_ids, prompt, sizeof prompt);
    cr_assert_eq(o->n_generated, 0);
    cr_assert_eq(o->max_tokens, (uint32_t)NEW);
    cr_assert(o->ignore_eos);
    cr_assert_str_eq(o->router_id, "router-t");
    cr_assert_str_eq(o->prefill_node_id, "p-test");
    cr_assert_str_eq(o->kvx_backend, "ucx");
    cr_assert_gt(o->kvx_sender_address.len, 0);
    cr_assert_not_null(o->kv);
    cr_assert_eq(o->kv->n_layers, (uint32_t)D.info.kv.n_layers);
    cr_assert_eq(o->kv->n_kv_heads, (uint32_t)D.info.kv.n_kv_heads);
    cr_assert_eq(o->kv->head_dim, (uint32_t)D.info.kv.head_dim);
    cr_assert_eq(o->kv->block_size, (uint32_t)D.info.kv.block_size);
    cr_assert_eq(o->kv->dtype, PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32);
    cr_assert_eq(o->sampling->seed_opt_case, PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED);
    pthread_mutex_unlock(&D.mu);

    check_landed(t, prompt, N, 8192, &sp, ref, 0, NEW);
    pds_rpc_msg_free(&rep->base);
    node_stop_clean();
}

Test(prefill_node, replaced_request_with_generated_ids_continues_seeded_sampling)
{
    node_start(NULL);
    d_start();
    enum { N = 30, NEW = 12, GEN = 5 };
    int32_t prompt[N], ref[NEW], all[N + GEN];
    prompt_fill(prompt, N, 2);
    Pdserve__V1__SamplingParams w = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    w.temperature = 0.9f;
    w.top_k = 50;
    w.top_p = 0.95f;
    w.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    w.seed = 1234;
    pds_sample_params_t sp = {.temperature = 0.9f, .top_k = 50, .top_p = 0.95f, .seed = 1234};
    cr_assert_eq(reference(8192, prompt, N, sp, NEW, ref), NEW);
    memcpy(all, prompt, sizeof prompt);
    memcpy(all + N, ref, GEN * sizeof(int32_t));

    req_t q = {.id = "r-seeded",
               .prompt = prompt,
               .n_prompt = N,
               .gen = ref,
               .n_gen = GEN,
               .sampling = &w,
               .max_tokens = NEW,
               .ignore_eos = true};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    cr_assert_eq(rep->first_token, ref[GEN], "first token %d, reference output %d is %d",
                 rep->first_token, GEN, ref[GEN]);
    cr_assert_eq(rep->computed_tokens, (uint32_t)(N + GEN));
    pthread_mutex_lock(&D.mu);
    xfer_t *t = d_find("r-seeded");
    cr_assert_not_null(t);
    cr_assert_eq(t->open->n_tokens, (uint32_t)(N + GEN));
    cr_assert_eq(t->open->n_generated, (uint32_t)GEN);
    cr_assert_arr_eq(t->open->token_ids, all, sizeof all);
    cr_assert_eq(t->open->sampling->seed, 1234);
    cr_assert_float_eq(t->open->sampling->temperature, 0.9f, 0);
    pthread_mutex_unlock(&D.mu);
    check_landed(t, all, N + GEN, 8192, &sp, ref, GEN, NEW);
    pds_rpc_msg_free(&rep->base);
    node_stop_clean();
}

Test(prefill_node, prompt_longer_than_the_token_budget_is_prefilled_in_chunks)
{
    const char *extra[] = {"--engine.max_batch_tokens=16", NULL};
    node_start(extra);
    d_start();
    enum { N = 53, NEW = 6, CHUNK = 16 };
    int32_t prompt[N], ref[NEW];
    prompt_fill(prompt, N, 3);
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t sp = greedy(&w);
    cr_assert_eq(reference(CHUNK, prompt, N, sp, NEW, ref), NEW);
    req_t q = {.id = "r-chunked",
               .prompt = prompt,
               .n_prompt = N,
               .sampling = &w,
               .max_tokens = NEW,
               .ignore_eos = true};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    cr_assert_eq(rep->first_token, ref[0]);
    cr_assert_eq(rep->computed_tokens, (uint32_t)N);
    pthread_mutex_lock(&D.mu);
    xfer_t *t = d_find("r-chunked");
    cr_assert(t && t->committed);
    pthread_mutex_unlock(&D.mu);
    check_landed(t, prompt, N, CHUNK, &sp, ref, 0, NEW);
    pds_rpc_msg_free(&rep->base);
    node_stop_clean();
}

typedef struct {
    req_t q;
    pds_status_t s;
    Pdserve__V1__PrefillReply *rep;
    char msg[512];
} call_t;

static void *call_thread(void *arg)
{
    call_t *c = arg;
    c->s = prefill(&c->q, &c->rep, c->msg, sizeof c->msg);
    return NULL;
}

Test(prefill_node, concurrent_requests_each_get_their_own_first_token_and_kv)
{
    node_start(NULL);
    d_start();
    enum { R = 6, NEW = 3 };
    static int32_t prompts[R][40];
    int32_t ref[R][NEW];
    int lens[R];
    call_t calls[R];
    pthread_t th[R];
    char ids[R][16];
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t sp = greedy(&w);
    for (int i = 0; i < R; i++) {
        lens[i] = 9 + 5 * i;
        prompt_fill(prompts[i], lens[i], 10 + i);
        reference(8192, prompts[i], lens[i], sp, NEW, ref[i]);
        snprintf(ids[i], sizeof ids[i], "r-c%d", i);
        calls[i] = (call_t){.q = {.id = ids[i],
                                  .prompt = prompts[i],
                                  .n_prompt = lens[i],
                                  .sampling = &w,
                                  .max_tokens = NEW,
                                  .ignore_eos = true}};
    }
    for (int i = 0; i < R; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, call_thread, &calls[i]), 0);
    for (int i = 0; i < R; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < R; i++) {
        cr_assert_eq(calls[i].s, PDS_OK, "%s: %s", ids[i], calls[i].msg);
        cr_assert_eq(calls[i].rep->first_token, ref[i][0], "%s", ids[i]);
        pthread_mutex_lock(&D.mu);
        xfer_t *t = d_find(ids[i]);
        cr_assert(t && t->committed && t->first_token == ref[i][0], "%s", ids[i]);
        pthread_mutex_unlock(&D.mu);
        /* Batched with others, the numbers may differ in the last bits from a lone forward; the
         * tokens may not. */
        pthread_mutex_lock(&D.mu);
        pds_kv_seq_t s;
        pds_kv_seq_init(&s);
        cr_assert_eq(pds_kv_seq_adopt(&s, t->n_blocks, t->ids, lens[i]), PDS_OK);
        t->blocks_held = false;
        int32_t tok = t->first_token;
        for (int k = 1; k < NEW; k++) {
            cr_assert_eq(
                pds_kv_seq_grow(&s, pds_engine_kv_pool(D.e), D.info.kv.block_size, 1, NULL),
                PDS_OK);
            int32_t in = tok;
            pds_engine_seq_t q = {
                .tokens = &in, .n_tokens = 1, .kv = &s, .sample = &sp, .token_out = &tok};
            cr_assert_eq(pds_engine_forward(D.e, &q, 1, NULL, NULL), PDS_OK);
            cr_assert_eq(tok, ref[i][k], "%s output %d", ids[i], k);
        }
        pds_kv_seq_release(&s, pds_engine_kv_pool(D.e));
        pds_kv_seq_fini(&s);
        pthread_mutex_unlock(&D.mu);
        pds_rpc_msg_free(&calls[i].rep->base);
    }
    node_stop_clean();
}

Test(prefill_node, small_pool_makes_later_jobs_wait_and_refuses_a_prompt_that_never_fits)
{
    /* 4 blocks of 16 tokens: two 40-token prompts (3 blocks each) cannot be held at once */
    const char *extra[] = {"--engine.kv_tokens=64", NULL};
    node_start(extra);
    d_start();
    int total = d_free_blocks();
    enum { R = 3, N = 40 };
    static int32_t prompts[R][N];
    int32_t ref[R][1];
    call_t calls[R];
    pthread_t th[R];
    char ids[R][16];
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t sp = greedy(&w);
    for (int i = 0; i < R; i++) {
        prompt_fill(prompts[i], N, 30 + i);
        reference(8192, prompts[i], N, sp, 1, ref[i]);
        snprintf(ids[i], sizeof ids[i], "r-s%d", i);
        calls[i] = (call_t){.q = {.id = ids[i],
                                  .prompt = prompts[i],
                                  .n_prompt = N,
                                  .sampling = &w,
                                  .max_tokens = 4,
                                  .ignore_eos = true}};
    }
    for (int i = 0; i < R; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, call_thread, &calls[i]), 0);
    for (int i = 0; i < R; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < R; i++) {
        cr_assert_eq(calls[i].s, PDS_OK, "%s: %s", ids[i], calls[i].msg);
        cr_assert_eq(calls[i].rep->first_token, ref[i][0], "%s", ids[i]);
        pds_rpc_msg_free(&calls[i].rep->base);
    }

    /* 100 tokens need 7 blocks: never, on this node; the transfer opened at D is cancelled */
    static int32_t big[100];
    prompt_fill(big, 100, 40);
    req_t q = {.id = "r-huge", .prompt = big, .n_prompt = 100, .sampling = &w, .max_tokens = 4};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_ERR_EXHAUSTED, "%s", msg);
    cr_assert_not_null(strstr(msg, "needs 7 KV blocks; this prefill node's pool has 4"), "%s", msg);
    pthread_mutex_lock(&D.mu);
    xfer_t *t = d_find("r-huge");
    cr_assert(t && t->cancelled && !t->committed);
    cr_assert_eq(D.commits, R);
    pthread_mutex_unlock(&D.mu);
    /* D: the three committed transfers still hold their blocks (3 each); r-huge's came back */
    cr_assert_eq(d_free_blocks(), total - R * 3);
    expect_serving("r-after-huge", 41);
    node_stop_clean();
}

Test(prefill_node, bad_requests_are_invalid_argument_and_touch_no_decode_node)
{
    node_start(NULL);
    d_start();
    int32_t prompt[8], big[511], bad_vocab[3] = {1, 272, 2}, neg[2] = {5, -1}, gen_bad[1] = {999};
    int32_t gen2[2] = {1, 2};
    prompt_fill(prompt, 8, 4);
    prompt_fill(big, 511, 5);
    Pdserve__V1__SamplingParams w;
    greedy(&w);
    Pdserve__V1__SamplingParams hot = w, topp = w, topk = w;
    hot.temperature = -1.0f;
    topp.top_p = 1.5f;
    topk.top_k = -3;
    struct {
        req_t q;
        const char *msg;
    } cases[] = {
        {{.id = "b1", .prompt = prompt, .n_prompt = 0, .sampling = &w, .max_tokens = 4},
         "prompt_ids is empty"},
        {{.id = "b2", .prompt = bad_vocab, .n_prompt = 3, .sampling = &w, .max_tokens = 4},
         "prompt_ids[1] = 272 is outside the vocabulary of 272"},
        {{.id = "b3", .prompt = neg, .n_prompt = 2, .sampling = &w, .max_tokens = 4},
         "prompt_ids[1] = -1 is outside the vocabulary"},
        {{.id = "b4",
          .prompt = prompt,
          .n_prompt = 8,
          .gen = gen_bad,
          .n_gen = 1,
          .sampling = &w,
          .max_tokens = 4},
         "generated_ids[0] = 999 is outside the vocabulary"},
        {{.id = "b5",
          .prompt = big,
          .n_prompt = 511,
          .gen = gen2,
          .n_gen = 1,
          .sampling = &w,
          .max_tokens = 4},
         "511 prompt + 1 generated tokens leave no room for a new token in the context of 512"},
        {{.id = "b6", .prompt = prompt, .n_prompt = 8, .sampling = &hot, .max_tokens = 4},
         "sampling: "},
        {{.id = "b7", .prompt = prompt, .n_prompt = 8, .sampling = &topp, .max_tokens = 4},
         "sampling: "},
        {{.id = "b8", .prompt = prompt, .n_prompt = 8, .sampling = &topk, .max_tokens = 4},
         "sampling: "},
        {{.id = "b9", .prompt = prompt, .n_prompt = 8, .sampling = &w, .max_tokens = 0},
         "max_tokens 0 must exceed the 0 tokens already generated"},
        {{.id = "b10",
          .prompt = prompt,
          .n_prompt = 8,
          .gen = gen2,
          .n_gen = 2,
          .sampling = &w,
          .max_tokens = 2},
         "max_tokens 2 must exceed the 2 tokens already generated"},
        {{.id = "", .prompt = prompt, .n_prompt = 8, .sampling = &w, .max_tokens = 4},
         "request_id is empty"},
        {{.id = "b12",
          .prompt = prompt,
          .n_prompt = 8,
          .sampling = &w,
          .max_tokens = 4,
          .decode_address = ""},
         "decode_address is empty"},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(cases); i++) {
        Pdserve__V1__PrefillReply *rep = NULL;
        char msg[512];
        pds_status_t s = prefill(&cases[i].q, &rep, msg, sizeof msg);
        cr_assert_eq(s, PDS_ERR_INVALID_ARG, "case %zu: %s (%s)", i, pds_status_name(s), msg);
        cr_assert_not_null(strstr(msg, cases[i].msg), "case %zu: message '%s' lacks '%s'", i, msg,
                           cases[i].msg);
        cr_assert_null(rep);
    }
    /* bytes that are no PrefillRequest at all */
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    ProtobufCMessage *rep = NULL;
    cr_assert_eq(pds_rpc_channel_call_raw(P.ch, M_PREFILL, junk, sizeof junk,
                                          &pdserve__v1__prefill_reply__descriptor, CALL_MS, &rep),
                 PDS_ERR_INVALID_ARG);
    pthread_mutex_lock(&D.mu);
    cr_assert_eq(D.opens, 0, "a rejected request reached the decode node");
    pthread_mutex_unlock(&D.mu);
    expect_serving("r-after-bad", 6);
    node_stop_clean();
}

Test(prefill_node, decode_node_out_of_blocks_is_resource_exhausted_then_serving_goes_on)
{
    node_start(NULL);
    d_start();
    D.mode = D_EXHAUSTED;
    int32_t prompt[20];
    prompt_fill(prompt, 20, 7);
    Pdserve__V1__SamplingParams w;
    greedy(&w);
    req_t q = {.id = "r-full", .prompt = prompt, .n_prompt = 20, .sampling = &w, .max_tokens = 4};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_ERR_EXHAUSTED, "%s", msg);
    cr_assert_not_null(strstr(msg, "no room for 40 blocks"), "message: %s", msg);
    cr_assert_not_null(strstr(msg, "d-test"), "message names no decode node: %s", msg);
    pthread_mutex_lock(&D.mu);
    cr_assert_eq(D.opens, 1);
    cr_assert_eq(D.cancels, 0); /* nothing was opened, so nothing to cancel */
    D.mode = D_NORMAL;
    pthread_mutex_unlock(&D.mu);
    /* the same request id again, now with room */
    q.ignore_eos = true;
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    pds_rpc_msg_free(&rep->base);
    expect_serving("r-after-full", 8);
    node_stop_clean();
}

Test(prefill_node, unreachable_decode_node_is_unavailable_then_serving_goes_on)
{
    node_start(NULL);
    d_start();
    /* a port nobody listens on: bind one, note it, close it */
    pds_rpc_server_params_t sp = pds_rpc_server_default_params();
    pds_rpc_server_t *tmp = NULL;
    cr_assert_eq(pds_rpc_server_create(&sp, &tmp), PDS_OK);
    char dead[64];
    snprintf(dead, sizeof dead, "127.0.0.1:%d", pds_rpc_server_port(tmp));
    pds_rpc_server_destroy(tmp);

    int32_t prompt[12];
    prompt_fill(prompt, 12, 9);
    Pdserve__V1__SamplingParams w;
    greedy(&w);
    req_t q = {.id = "r-dead",
               .prompt = prompt,
               .n_prompt = 12,
               .sampling = &w,
               .max_tokens = 4,
               .decode_address = dead};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_ERR_UNAVAILABLE, "%s", msg);
    cr_assert_not_null(strstr(msg, dead), "message names no address: %s", msg);
    expect_serving("r-after-dead", 10);
    node_stop_clean();
}

Test(prefill_node, first_token_that_ends_the_request_cancels_instead_of_committing)
{
    node_start(NULL);
    d_start();
    int total = d_free_blocks();
    int32_t prompt[25], ref[2];
    prompt_fill(prompt, 25, 11);
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t sp = greedy(&w);
    reference(8192, prompt, 25, sp, 2, ref);

    /* stop id */
    req_t q = {.id = "r-stop",
               .prompt = prompt,
               .n_prompt = 25,
               .sampling = &w,
               .max_tokens = 9,
               .stop = ref,
               .n_stop = 1,
               .ignore_eos = true};
    Pdserve__V1__PrefillReply *rep = NULL;
    char msg[512];
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    cr_assert(rep->finished);
    cr_assert_eq(rep->finish_reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_STOP);
    cr_assert_eq(rep->first_token, ref[0]);
    cr_assert_eq(rep->transfer_id, 0);
    pds_rpc_msg_free(&rep->base);

    /* max_tokens reached by the first token (after 2 re-placed ones) */
    int32_t gen[2] = {3, 4};
    q = (req_t){.id = "r-len",
                .prompt = prompt,
                .n_prompt = 25,
                .gen = gen,
                .n_gen = 2,
                .sampling = &w,
                .max_tokens = 3,
                .ignore_eos = true};
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    cr_assert(rep->finished);
    cr_assert_eq(rep->finish_reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    pds_rpc_msg_free(&rep->base);

    /* the context is full after the first token */
    static int32_t big[511];
    prompt_fill(big, 511, 12);
    q = (req_t){.id = "r-ctx",
                .prompt = big,
                .n_prompt = 511,
                .sampling = &w,
                .max_tokens = 100,
                .ignore_eos = true};
    cr_assert_eq(prefill(&q, &rep, msg, sizeof msg), PDS_OK, "%s", msg);
    cr_assert(rep->finished);
    cr_assert_eq(rep->finish_reason, PDSERVE__V1__FINISH_REASON__FINISH_REASON_CONTEXT);
    pds_rpc_msg_free(&rep->base);

    pthread_mutex_lock(&D.mu);
    cr_assert_eq(D.opens, 3);
    cr_assert_eq(D.commits, 0);
    cr_assert_eq(D.cancels, 3);
    for (int i = 0; i < D.n_xf; i++) cr_assert(D.xf[i].cancelled, "%s", D.xf[i].request_id);
    pthread_mutex_unlock(&D.mu);
    cr_assert_eq(d_free_blocks(), total, "the decode node's blocks were not all given back");
    expect_serving("r-after-finish", 13);
    node_stop_clean();
}

Test(prefill_node, cancel_while_opening_fails_the_call_cancelled_and_cancels_at_decode)
{
    node_start(NULL);
    d_start();
    int total = d_free_blocks();
    D.mode = D_HOLD;
    int32_t prompt[18];
    prompt_fill(prompt, 18, 14);
    Pdserve__V1__SamplingParams w;
    greedy(&w);
    call_t c = {.q = {.id = "r-cancel",
                      .prompt = prompt,
                      .n_prompt = 18,
                      .sampling = &w,
                      .max_tokens = 4,
                      .ignore_eos = true}};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, call_thread, &c), 0);
    /* wait until the node's OpenTransfer is held at D */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&D.mu);
    while (!D.held) cr_assert_eq(pthread_cond_timedwait(&D.cv, &D.mu, &until), 0);
    pthread_mutex_unlock(&D.mu);

    Pdserve__V1__CancelRequest cr = PDSERVE__V1__CANCEL_REQUEST__INIT;
    cr.request_id = (char *)"r-cancel";
    cr.reason = (char *)"client went away";
    ProtobufCMessage *rep = NULL;
    cr_assert_eq(pds_rpc_channel_call(P.ch, M_P_CANCEL, &cr.base,
                                      &pdserve__v1__cancel_reply__descriptor, CALL_MS, &rep),
                 PDS_OK);
    cr_assert(((Pdserve__V1__CancelReply *)rep)->found);
    pds_rpc_msg_free(rep);
    cr.request_id = (char *)"r-unknown";
    cr_assert_eq(pds_rpc_channel_call(P.ch, M_P_CANCEL, &cr.base,
                                      &pdserve__v1__cancel_reply__descriptor, CALL_MS, &rep),
                 PDS_OK);
    cr_assert_not(((Pdserve__V1__CancelReply *)rep)->found);
    pds_rpc_msg_free(rep);

    /* now D answers the open: the node must notice the cancel, cancel at D, fail the call */
    pthread_mutex_lock(&D.mu);
    d_answer_open(D.held, &D.xf[D.held_xf]);
    D.held = NULL;
    D.mode = D_NORMAL;
    pthread_mutex_unlock(&D.mu);
    pthread_join(th, NULL);
    cr_assert_eq(c.s, PDS_ERR_CANCELLED, "%s: %s", pds_status_name(c.s), c.msg);
    pthread_mutex_lock(&D.mu);
    xfer_t *t = d_find("r-cancel");
    cr_assert(t && t->cancelled && !t->committed);
    cr_assert_eq(D.commits, 0);
    pthread_mutex_unlock(&D.mu);
    cr_assert_eq(d_free_blocks(), total);
    expect_serving("r-after-cancel", 15);
    node_stop_clean();
}

Test(prefill_node, health_reports_an_up_prefill_node)
{
    node_start(NULL);
    Pdserve__V1__HealthRequest hq = PDSERVE__V1__HEALTH_REQUEST__INIT;
    ProtobufCMessage *rep = NULL;
    cr_assert_eq(pds_rpc_channel_call(P.ch, M_HEALTH, &hq.base,
                                      &pdserve__v1__health_reply__descriptor, CALL_MS, &rep),
                 PDS_OK);
    Pdserve__V1__HealthReply *h = (Pdserve__V1__HealthReply *)rep;
    cr_assert_str_eq(h->node_id, "p-test");
    cr_assert_eq(h->role, PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL);
    cr_assert_eq(h->state, PDSERVE__V1__NODE_STATE__NODE_STATE_UP);
    cr_assert_eq(h->protocol_version, PDS_RPC_PROTOCOL_VERSION);
    pds_rpc_msg_free(rep);
    node_stop_clean();
}

Test(prefill_node, bad_configuration_is_refused_with_a_message)
{
    const char *build = getenv("PDS_BUILD_DIR");
    cr_assert(build && *build);
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "%s/bin/pdserve-prefill --node.router= --model.preset=tiny --node.role=decode "
             ">/dev/null 2>&1",
             build);
    int st = system(cmd);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "role decode: status %d", st);
    snprintf(cmd, sizeof cmd,
             "%s/bin/pdserve-prefill --node.router= --model.preset=tiny --kvx.backend=loopback "
             ">/dev/null 2>&1",
             build);
    st = system(cmd);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1, "loopback kvx: status %d", st);
}

/* [kvx] backend = nccl is a valid configuration (exit 1, not the config error 2), and a node that
 * cannot use it — no NCCL in the build, no GPU, or a CPU engine whose pool NCCL cannot send —
 * stops at start-up with a message naming NCCL. */
Test(prefill_node, nccl_backend_is_configurable_and_refused_at_start_where_it_cannot_work)
{
    const char *build = getenv("PDS_BUILD_DIR");
    cr_assert(build && *build);
    char log[] = "/tmp/pds-prefill-nccl-XXXXXX";
    int fd = mkstemp(log);
    cr_assert(fd >= 0);
    close(fd);
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "%s/bin/pdserve-prefill --node.router= --model.preset=tiny --kvx.backend=nccl "
             ">/dev/null 2>%s",
             build, log);
    int st = system(cmd);
    char text[4096] = "";
    FILE *f = fopen(log, "r");
    if (f) {
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = '\0';
        fclose(f);
    }
    unlink(log);
    cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 1, "nccl kvx: status %d, stderr: %s", st, text);
    cr_expect(strstr(text, "NCCL") != NULL, "stderr names NCCL: %s", text);
}

/* ---- a fake router: what the node registers and reports -----------------------------------------
 */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    Pdserve__V1__NodeInfo *info; /* unpacked copy of the registration */
    Pdserve__V1__LoadReport last;
    uint64_t reports;
} R = {.mu = PTHREAD_ERRORCHECK_MUTEX_INITIALIZER_NP, .cv = PTHREAD_COND_INITIALIZER};

static void r_register(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    uint8_t buf[8192];
    size_t n = protobuf_c_message_pack(msg, buf);
    pthread_mutex_lock(&R.mu);
    if (!R.info) R.info = pdserve__v1__node_info__unpack(NULL, n, buf);
    pthread_cond_broadcast(&R.cv);
    pthread_mutex_unlock(&R.mu);
    Pdserve__V1__RegisterReply rep = PDSERVE__V1__REGISTER_REPLY__INIT;
    rep.router_id = (char *)"router-t";
    rep.router_epoch = 1;
    rep.report_interval_ms = 20;
    pds_rpc_call_reply(call, &rep.base);
}

static void r_report(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    const Pdserve__V1__LoadReport *l = (const Pdserve__V1__LoadReport *)msg;
    pthread_mutex_lock(&R.mu);
    R.last = *l;
    R.last.node_id = NULL; /* the strings die with the call */
    R.last.latency = NULL;
    R.reports++;
    pthread_cond_broadcast(&R.cv);
    pthread_mutex_unlock(&R.mu);
    Pdserve__V1__ReportReply rep = PDSERVE__V1__REPORT_REPLY__INIT;
    pds_rpc_call_reply(call, &rep.base);
}

/* Waits (bounded) for a report, the (after+1)th or later, that satisfies `done`. */
static bool r_wait(uint64_t after, bool (*done)(const Pdserve__V1__LoadReport *))
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&R.mu);
    bool ok = false;
    while (!(ok = R.reports > after && done(&R.last)))
        if (pthread_cond_timedwait(&R.cv, &R.mu, &until) != 0) break;
    pthread_mutex_unlock(&R.mu);
    return ok;
}

static bool all_blocks_back(const Pdserve__V1__LoadReport *l)
{
    return l->total_kv_blocks > 0 && l->free_kv_blocks == l->total_kv_blocks &&
           l->queued_requests == 0 && l->queued_prompt_tokens == 0;
}

Test(prefill_node, registers_with_the_router_and_gets_every_kv_block_back_on_every_path)
{
    pds_rpc_server_params_t sp = pds_rpc_server_default_params();
    pds_rpc_server_t *router = NULL;
    cr_assert_eq(pds_rpc_server_create(&sp, &router), PDS_OK);
    pds_rpc_method_t m[] = {
        {"/pdserve.v1.RouterInternal/RegisterNode", PDS_RPC_UNARY,
         &pdserve__v1__node_info__descriptor, r_register, NULL, NULL},
        {"/pdserve.v1.RouterInternal/ReportLoad", PDS_RPC_UNARY,
         &pdserve__v1__load_report__descriptor, r_report, NULL, NULL},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(m); i++)
        cr_assert_eq(pds_rpc_server_add_method(router, &m[i]), PDS_OK);
    cr_assert_eq(pds_rpc_server_start(router), PDS_OK);
    char flag[96];
    snprintf(flag, sizeof flag, "--node.router=127.0.0.1:%d", pds_rpc_server_port(router));
    const char *extra[] = {flag, NULL};
    node_start(extra);
    d_start();

    cr_assert(r_wait(0, all_blocks_back), "no load report with an idle pool");
    pthread_mutex_lock(&R.mu);
    const Pdserve__V1__NodeInfo *ni = R.info;
    cr_assert_not_null(ni);
    cr_assert_eq(ni->magic, PDS_RPC_PROTOCOL_MAGIC);
    cr_assert_eq(ni->protocol_version, PDS_RPC_PROTOCOL_VERSION);
    cr_assert_str_eq(ni->node_id, "p-test");
    cr_assert_eq(ni->role, PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL);
    cr_assert_str_eq(ni->address, P.address);
    cr_assert_str_eq(ni->kvx_backend, "ucx");
    cr_assert_gt(ni->kvx_address.len, 0);
    cr_assert_not_null(ni->kv);
    cr_assert_eq(ni->kv->n_layers, (uint32_t)D.info.kv.n_layers);
    cr_assert_eq(ni->kv->block_size, (uint32_t)D.info.kv.block_size);
    cr_assert_eq(ni->kv->dtype, PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32);
    cr_assert_eq(ni->total_kv_blocks, R.last.total_kv_blocks);
    cr_assert_str_eq(ni->model_name, "tiny");
    cr_assert_neq(ni->model_fingerprint, 0);
    cr_assert_eq(ni->max_context_tokens, (uint32_t)D.info.model.max_context);
    cr_assert_eq(ni->vocab_size, (uint32_t)D.info.model.vocab);
    cr_assert_eq(ni->bos_token_id, D.info.model.bos_id);
    cr_assert_eq(ni->eos_token_id, D.info.model.eos_id);
    cr_assert_eq(R.last.state, PDSERVE__V1__NODE_STATE__NODE_STATE_UP);
    pthread_mutex_unlock(&R.mu);

    /* every way a request can end on this node */
    expect_serving("r-ok", 20);
    int32_t prompt[19], ref[1];
    prompt_fill(prompt, 19, 21);
    Pdserve__V1__SamplingParams w;
    pds_sample_params_t gs = greedy(&w);
    reference(8192, prompt, 19, gs, 1, ref);
    Pdserve__V1__PrefillReply *rep = NULL;
    req_t q = {.id = "r-stop",
               .prompt = prompt,
               .n_prompt = 19,
               .sampling = &w,
               .max_tokens = 5,
               .stop = ref,
               .n_stop = 1};
    cr_assert_eq(prefill(&q, &rep, NULL, 0), PDS_OK);
    cr_assert(rep->finished);
    pds_rpc_msg_free(&rep->base);
    D.mode = D_EXHAUSTED;
    q = (req_t){.id = "r-full", .prompt = prompt, .n_prompt = 19, .sampling = &w, .max_tokens = 5};
    cr_assert_eq(prefill(&q, &rep, NULL, 0), PDS_ERR_EXHAUSTED);
    D.mode = D_NORMAL;
    q.id = "r-dead";
    q.decode_address = "127.0.0.1:1";
    cr_assert_eq(prefill(&q, &rep, NULL, 0), PDS_ERR_UNAVAILABLE);

    /* blocks come back after the reply (the engine loop frees them), so wait for a report made
     * after this point */
    pthread_mutex_lock(&R.mu);
    uint64_t mark = R.reports;
    pthread_mutex_unlock(&R.mu);
    cr_assert(r_wait(mark, all_blocks_back),
              "KV blocks or queue figures did not come back: free %u of %u, "
              "queued %u requests / %llu tokens",
              R.last.free_kv_blocks, R.last.total_kv_blocks, R.last.queued_requests,
              (unsigned long long)R.last.queued_prompt_tokens);
    node_stop_clean();
    pds_rpc_server_destroy(router);
    pthread_mutex_lock(&R.mu);
    pdserve__v1__node_info__free_unpacked(R.info, NULL);
    R.info = NULL;
    pthread_mutex_unlock(&R.mu);
}

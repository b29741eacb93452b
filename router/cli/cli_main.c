/* pdserve-cli: the command-line client of a pdserve router (the public pdserve.v1.Pdserve API).
 *
 *   pdserve-cli generate --router HOST:PORT (--prompt TEXT | --tokens ID,..) [options] [--json]
 *   pdserve-cli status   --router HOST:PORT [--json]
 *   pdserve-cli health   --router HOST:PORT [--json]       (any node answers Health too)
 *
 * `generate` streams the text as chunks arrive, then prints the router's summary plus what this
 * client measured itself (time to the first chunk, mean gap between chunks), so a person sees
 * both the server-side and the end-to-end view of one request. With --json it prints one object
 * at the end with the exact token ids (what scripts and tests compare). The model's bytes are
 * printed as they are with --raw; otherwise control bytes and bytes that are not UTF-8 are shown
 * as \xNN, since a synthetic-weight model emits arbitrary bytes that would garble a terminal.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"

#define MAX_IDS       65536
#define DEFAULT_ROUTE "127.0.0.1:7100"

static const char *const finish_names[] = {"unspecified", "length",    "stop",   "eos",
                                           "context",     "cancelled", "aborted"};
static const char *const role_names[] = {"-", "prefill", "decode", "colocated"};
static const char *const state_names[] = {"-", "UP", "DRAINING", "DOWN"};

static const char *finish_name(int r)
{
    return r >= 0 && r < (int)PDS_ARRAY_LEN(finish_names) ? finish_names[r] : "unknown";
}
static const char *role_name(int r)
{
    return r >= 0 && r < (int)PDS_ARRAY_LEN(role_names) ? role_names[r] : "unknown";
}
static const char *state_name(int s)
{
    return s >= 0 && s < (int)PDS_ARRAY_LEN(state_names) ? state_names[s] : "unknown";
}

static void usage(FILE *f)
{
    fprintf(f, "usage: pdserve-cli <command> [options]\n"
               "commands:\n"
               "  generate   stream tokens for one prompt, then print the summary\n"
               "  status     the router's view of the cluster (one line per node)\n"
               "  health     liveness of the router (or of any node, given its address)\n"
               "common options:\n"
               "  --router HOST:PORT    router address (default $PDS_ROUTER or " DEFAULT_ROUTE ")\n"
               "  --timeout-ms N        deadline of the call (default: none for generate, 5000 "
               "otherwise)\n"
               "  --json                machine-readable output (one JSON object)\n"
               "generate options:\n"
               "  --prompt TEXT | --tokens ID,ID,...   the prompt (text gets BOS from the router)\n"
               "  --max-tokens N        output tokens at most (default 64)\n"
               "  --temperature T       0 = greedy (default 0)\n"
               "  --top-k K             0 = no limit\n"
               "  --top-p P             (0, 1]; 0 = unset\n"
               "  --seed N              sampling seed (default: the router picks one)\n"
               "  --stop ID,...         stop token ids\n"
               "  --ignore-eos          keep generating past EOS\n"
               "  --ttft-ms X --tpot-ms Y --slo-class NAME   latency targets\n"
               "  --request-id ID       client request id (default: the router makes one)\n"
               "  --raw                 write the model's bytes unescaped\n"
               "  --quiet               no streamed text (summary only)\n");
}

static int bad_usage(const char *what, const char *arg)
{
    fprintf(stderr, "pdserve-cli: %s '%s' (see --help)\n", what, arg ? arg : "");
    return 2;
}

static bool parse_i64(const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

static bool parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-') return false;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return false;
    *out = v;
    return true;
}

/* Accepts anything strtof reads, "nan" included: checking values is the router's job. */
static bool parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end) return false;
    *out = v;
    return true;
}

/* "1,2,3" -> ids (any int32: the router validates them). */
static bool parse_ids(const char *s, int32_t *ids, int cap, int *n)
{
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (errno || end == p || v < INT32_MIN || v > INT32_MAX || *n >= cap) return false;
        ids[(*n)++] = (int32_t)v;
        if (*end == ',') {
            p = end + 1;
            if (!*p) return false;
        } else if (*end) {
            return false;
        } else {
            p = end;
        }
    }
    return *n > 0;
}

/* Errors are shown with their gRPC code name, as every other client of the API would. */
static int fail(const char *what, pds_status_t s)
{
    static const char *const codes[] = {"OK",
                                        "CANCELLED",
                                        "UNKNOWN",
                                        "INVALID_ARGUMENT",
                                        "DEADLINE_EXCEEDED",
                                        "NOT_FOUND",
                                        "ALREADY_EXISTS",
                                        "PERMISSION_DENIED",
                                        "RESOURCE_EXHAUSTED",
                                        "FAILED_PRECONDITION",
                                        "ABORTED",
                                        "OUT_OF_RANGE",
                                        "UNIMPLEMENTED",
                                        "INTERNAL",
                                        "UNAVAILABLE",
                                        "DATA_LOSS",
                                        "UNAUTHENTICATED"};
    int code = pds_rpc_status_to_code(s);
    fprintf(stderr, "pdserve-cli: %s: %s: %s\n", what,
            code >= 0 && code < (int)PDS_ARRAY_LEN(codes) ? codes[code] : "UNKNOWN",
            pds_err_detail()[0] ? pds_err_detail() : pds_status_text(s));
    return 1;
}

/* ---- text output ---------------------------------------------------------------------------- */
/* Length of a complete valid UTF-8 sequence at s[0..n): >0 valid, 0 invalid, -1 incomplete. */
static int utf8_seq(const unsigned char *s, size_t n)
{
    int len = s[0] < 0x80         ? 1
              : (s[0] >> 5) == 6  ? 2
              : (s[0] >> 4) == 14 ? 3
              : (s[0] >> 3) == 30 ? 4
                                  : 0;
    if (len == 0) return 0;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return -1;
        if ((s[i] & 0xC0) != 0x80) return 0;
    }
    uint32_t cp = len == 1 ? s[0] : (uint32_t)(s[0] & (0x7F >> len));
    for (int i = 1; i < len; i++) cp = cp << 6 | (s[i] & 0x3F);
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* Escapes model bytes for a terminal; keeps an incomplete UTF-8 tail until the next chunk. */
typedef struct {
    unsigned char pending[4];
    size_t n_pending;
    FILE *out;
    bool raw;
} text_out_t;

static void pending_drop(text_out_t *t, size_t k)
{
    memmove(t->pending, t->pending + k, t->n_pending - k);
    t->n_pending -= k;
}

/* Writes what can be written of the pending bytes; `final`: no more bytes will come. */
static void pending_flush(text_out_t *t, bool final)
{
    while (t->n_pending > 0) {
        unsigned char c = t->pending[0];
        if (c == '\n' || c == '\t' || (c >= 0x20 && c < 0x7f)) {
            fputc(c, t->out);
            pending_drop(t, 1);
            continue;
        }
        int l = c >= 0x80 ? utf8_seq(t->pending, t->n_pending) : 0;
        if (l < 0 && !final) return; /* wait for the rest of the character */
        if (l > 0) {
            fwrite(t->pending, 1, (size_t)l, t->out);
            pending_drop(t, (size_t)l);
        } else {
            fprintf(t->out, "\\x%02x", c);
            pending_drop(t, 1);
        }
    }
}

static void text_emit(text_out_t *t, const unsigned char *b, size_t n, bool final)
{
    if (t->raw) {
        if (n) fwrite(b, 1, n, t->out);
        return;
    }
    for (size_t k = 0; k < n; k++) {
        t->pending[t->n_pending++] = b[k];
        pending_flush(t, false);
    }
    if (final) pending_flush(t, true);
}

/* ---- generate ---------------------------------------------------------------------------------
 */
typedef struct {
    const char *router;
    int timeout_ms;
    bool json, raw, quiet;
} common_opts_t;

static int cmd_generate(int argc, char **argv, common_opts_t *co)
{
    enum {
        O_ROUTER = 256,
        O_TIMEOUT,
        O_JSON,
        O_PROMPT,
        O_TOKENS,
        O_MAX,
        O_TEMP,
        O_TOPK,
        O_TOPP,
        O_SEED,
        O_STOP,
        O_IGNORE_EOS,
        O_TTFT,
        O_TPOT,
        O_CLASS,
        O_ID,
        O_RAW,
        O_QUIET,
        O_HELP
    };
    static const struct option opts[] = {{"router", required_argument, 0, O_ROUTER},
                                         {"timeout-ms", required_argument, 0, O_TIMEOUT},
                                         {"json", no_argument, 0, O_JSON},
                                         {"prompt", required_argument, 0, O_PROMPT},
                                         {"tokens", required_argument, 0, O_TOKENS},
                                         {"max-tokens", required_argument, 0, O_MAX},
                                         {"temperature", required_argument, 0, O_TEMP},
                                         {"top-k", required_argument, 0, O_TOPK},
                                         {"top-p", required_argument, 0, O_TOPP},
                                         {"seed", required_argument, 0, O_SEED},
                                         {"stop", required_argument, 0, O_STOP},
                                         {"ignore-eos", no_argument, 0, O_IGNORE_EOS},
                                         {"ttft-ms", required_argument, 0, O_TTFT},
                                         {"tpot-ms", required_argument, 0, O_TPOT},
                                         {"slo-class", required_argument, 0, O_CLASS},
                                         {"request-id", required_argument, 0, O_ID},
                                         {"raw", no_argument, 0, O_RAW},
                                         {"quiet", no_argument, 0, O_QUIET},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    static int32_t prompt_ids[MAX_IDS], stop_ids[1024];
    int n_prompt = 0, n_stop = 0;
    const char *text = NULL, *tokens = NULL;
    long long v;
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    Pdserve__V1__Slo slo = PDSERVE__V1__SLO__INIT;
    Pdserve__V1__TokenIds tid = PDSERVE__V1__TOKEN_IDS__INIT;
    bool have_slo = false;
    req.max_tokens = 64;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_ROUTER:
            co->router = optarg;
            break;
        case O_TIMEOUT:
            if (!parse_i64(optarg, 0, INT32_MAX, &v)) return bad_usage("bad --timeout-ms", optarg);
            co->timeout_ms = (int)v;
            break;
        case O_JSON:
            co->json = true;
            break;
        case O_PROMPT:
            text = optarg;
            break;
        case O_TOKENS:
            tokens = optarg;
            break;
        case O_MAX:
            if (!parse_i64(optarg, 0, UINT32_MAX, &v)) return bad_usage("bad --max-tokens", optarg);
            req.max_tokens = (uint32_t)v;
            break;
        case O_TEMP:
            if (!parse_float(optarg, &sp.temperature))
                return bad_usage("bad --temperature", optarg);
            break;
        case O_TOPK:
            if (!parse_i64(optarg, INT32_MIN, INT32_MAX, &v))
                return bad_usage("bad --top-k", optarg);
            sp.top_k = (int32_t)v;
            break;
        case O_TOPP:
            if (!parse_float(optarg, &sp.top_p)) return bad_usage("bad --top-p", optarg);
            break;
        case O_SEED:
            if (!parse_u64(optarg, &sp.seed)) return bad_usage("bad --seed", optarg);
            sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
            break;
        case O_STOP:
            if (!parse_ids(optarg, stop_ids, (int)PDS_ARRAY_LEN(stop_ids), &n_stop))
                return bad_usage("bad --stop (expected ID,ID,...)", optarg);
            break;
        case O_IGNORE_EOS:
            req.ignore_eos = true;
            break;
        case O_TTFT:
            if (!parse_float(optarg, &slo.ttft_ms)) return bad_usage("bad --ttft-ms", optarg);
            have_slo = true;
            break;
        case O_TPOT:
            if (!parse_float(optarg, &slo.tpot_ms)) return bad_usage("bad --tpot-ms", optarg);
            have_slo = true;
            break;
        case O_CLASS:
            slo.class_name = optarg;
            have_slo = true;
            break;
        case O_ID:
            req.request_id = optarg;
            break;
        case O_RAW:
            co->raw = true;
            break;
        case O_QUIET:
            co->quiet = true;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            return 2;
        }
    }
    if (optind < argc) return bad_usage("unexpected argument", argv[optind]);
    if (!text == !tokens) return bad_usage("give exactly one of --prompt or --tokens", "");
    if (text) {
        req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
        req.text = (char *)text;
    } else {
        if (!parse_ids(tokens, prompt_ids, MAX_IDS, &n_prompt))
            return bad_usage("bad --tokens (expected ID,ID,...)", tokens);
        tid.n_ids = (size_t)n_prompt;
        tid.ids = prompt_ids;
        req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
        req.token_ids = &tid;
    }
    req.sampling = &sp;
    req.n_stop_token_ids = (size_t)n_stop;
    req.stop_token_ids = stop_ids;
    if (have_slo) req.slo = &slo;

    pds_rpc_channel_t *ch = NULL;
    pds_status_t s = pds_rpc_channel_create(co->router, &ch);
    if (s != PDS_OK) return fail("channel", s);
    double t0 = pds_time_now_ms(), t_first = 0, t_last = 0;
    pds_rpc_stream_t *st = NULL;
    s = pds_rpc_stream_open(ch, "/pdserve.v1.Pdserve/Generate", &req.base,
                            &pdserve__v1__generate_response__descriptor, co->timeout_ms, &st);
    if (s != PDS_OK) {
        pds_rpc_channel_destroy(ch);
        return fail("generate", s);
    }
    int32_t *out = pds_malloc(sizeof(int32_t) * MAX_IDS);
    int n_out = 0, n_chunks = 0, rc = 1;
    size_t n_text_bytes = 0;
    bool gaps = false;
    Pdserve__V1__GenerateResponse *summary_msg = NULL;
    text_out_t to = {.out = stdout, .raw = co->raw};
    bool stream_text = !co->json && !co->quiet;
    if (!out) {
        fprintf(stderr, "pdserve-cli: out of memory\n");
        goto done;
    }
    for (;;) {
        ProtobufCMessage *m = NULL;
        s = pds_rpc_stream_next(st, &m);
        if (s != PDS_OK) {
            if (stream_text && n_out) fputc('\n', stdout);
            fflush(stdout);
            fail("generate", s);
            goto done;
        }
        if (!m) break;
        Pdserve__V1__GenerateResponse *r = (Pdserve__V1__GenerateResponse *)m;
        if (r->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK && r->chunk) {
            double now = pds_time_now_ms();
            if (n_out == 0) t_first = now;
            t_last = now;
            n_chunks++;
            if (r->chunk->index != (uint32_t)n_out) gaps = true;
            for (size_t i = 0; i < r->chunk->n_ids && n_out < MAX_IDS; i++)
                out[n_out++] = r->chunk->ids[i];
            n_text_bytes += r->chunk->text.len;
            if (stream_text) {
                text_emit(&to, r->chunk->text.data, r->chunk->text.len, false);
                fflush(stdout);
            }
            pds_rpc_msg_free(m);
        } else if (r->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_SUMMARY && r->summary) {
            if (summary_msg) pds_rpc_msg_free(&summary_msg->base); /* a second one */
            summary_msg = r;
        } else {
            pds_rpc_msg_free(m);
        }
    }
    double t_end = pds_time_now_ms();
    if (stream_text) {
        text_emit(&to, NULL, 0, true);
        if (n_out > 0 && n_text_bytes == 0) fputs("(no text: every token id is >= 256)", stdout);
        fputc('\n', stdout);
        fflush(stdout);
    }
    if (!summary_msg) {
        fprintf(stderr, "pdserve-cli: generate: the stream ended without a summary\n");
        goto done;
    }
    if (gaps) fprintf(stderr, "pdserve-cli: warning: chunk indices were not contiguous\n");
    const Pdserve__V1__Summary *sm = summary_msg->summary;
    double c_ttft = n_out ? t_first - t0 : 0;
    double c_tpot = n_out > 1 ? (t_last - t_first) / (n_out - 1) : 0;
    if (co->json) {
        json_t *toks = json_array();
        for (int i = 0; i < n_out; i++) json_array_append_new(toks, json_integer(out[i]));
        json_t *root = json_pack(
            "{s:s, s:o, s:s, s:I, s:I, s:f, s:f, s:f, s:f, s:I, s:f, s:s, s:s, s:I, s:I, "
            "s:{s:f, s:f, s:f, s:i}}",
            "request_id", sm->request_id ? sm->request_id : "", "tokens", toks, "finish_reason",
            finish_name(sm->finish_reason), "prompt_tokens", (json_int_t)sm->prompt_tokens,
            "output_tokens", (json_int_t)sm->output_tokens, "ttft_ms", (double)sm->ttft_ms,
            "tpot_mean_ms", (double)sm->tpot_mean_ms, "tpot_p90_ms", (double)sm->tpot_p90_ms,
            "queue_ms", (double)sm->queue_ms, "kv_transfer_bytes",
            (json_int_t)sm->kv_transfer_bytes, "kv_transfer_ms", (double)sm->kv_transfer_ms,
            "prefill_node", sm->prefill_node ? sm->prefill_node : "", "decode_node",
            sm->decode_node ? sm->decode_node : "", "seed", (json_int_t)sm->seed, "replacements",
            (json_int_t)sm->replacements, "client", "ttft_ms", c_ttft, "tpot_ms", c_tpot,
            "total_ms", t_end - t0, "chunks", n_chunks);
        if (!root) {
            fprintf(stderr, "pdserve-cli: could not build the JSON output\n");
            goto done;
        }
        json_dumpf(root, stdout, JSON_COMPACT | JSON_REAL_PRECISION(6));
        fputc('\n', stdout);
        json_decref(root);
    } else {
        fprintf(stderr,
                "[%s] %u prompt + %u output tokens, finish %s | router: ttft %.1f ms, tpot "
                "%.2f ms (p90 %.2f), queue %.1f ms, kv %llu B in %.2f ms | client: ttft %.1f ms, "
                "tpot %.2f ms, total %.1f ms | prefill %s, decode %s, seed %llu%s\n",
                sm->request_id, sm->prompt_tokens, sm->output_tokens,
                finish_name(sm->finish_reason), sm->ttft_ms, sm->tpot_mean_ms, sm->tpot_p90_ms,
                sm->queue_ms, (unsigned long long)sm->kv_transfer_bytes, sm->kv_transfer_ms, c_ttft,
                c_tpot, t_end - t0, sm->prefill_node, sm->decode_node, (unsigned long long)sm->seed,
                sm->replacements ? " (re-placed)" : "");
    }
    rc = 0;
done:
    pds_rpc_msg_free(summary_msg ? &summary_msg->base : NULL);
    pds_free(out);
    pds_rpc_stream_destroy(st);
    pds_rpc_channel_destroy(ch);
    return rc;
}

/* ---- status / health --------------------------------------------------------------------------
 */
static int parse_simple(int argc, char **argv, common_opts_t *co)
{
    enum { O_ROUTER = 256, O_TIMEOUT, O_JSON, O_HELP };
    static const struct option opts[] = {{"router", required_argument, 0, O_ROUTER},
                                         {"addr", required_argument, 0, O_ROUTER},
                                         {"timeout-ms", required_argument, 0, O_TIMEOUT},
                                         {"json", no_argument, 0, O_JSON},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    long long v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_ROUTER:
            co->router = optarg;
            break;
        case O_TIMEOUT:
            if (!parse_i64(optarg, 0, INT32_MAX, &v)) return bad_usage("bad --timeout-ms", optarg);
            co->timeout_ms = (int)v;
            break;
        case O_JSON:
            co->json = true;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            return 2;
        }
    }
    if (optind < argc) return bad_usage("unexpected argument", argv[optind]);
    if (!co->timeout_ms) co->timeout_ms = 5000;
    return -1;
}

static int cmd_status(int argc, char **argv, common_opts_t *co)
{
    int rc = parse_simple(argc, argv, co);
    if (rc >= 0) return rc;
    pds_rpc_channel_t *ch = NULL;
    pds_status_t s = pds_rpc_channel_create(co->router, &ch);
    if (s != PDS_OK) return fail("channel", s);
    Pdserve__V1__ClusterStatusRequest req = PDSERVE__V1__CLUSTER_STATUS_REQUEST__INIT;
    Pdserve__V1__ClusterStatusReply *r = NULL;
    s = pds_rpc_channel_call(ch, "/pdserve.v1.Pdserve/ClusterStatus", &req.base,
                             &pdserve__v1__cluster_status_reply__descriptor, co->timeout_ms,
                             (ProtobufCMessage **)&r);
    pds_rpc_channel_destroy(ch);
    if (s != PDS_OK) return fail("status", s);
    if (co->json) {
        json_t *nodes = json_array();
        for (size_t i = 0; i < r->n_nodes; i++) {
            const Pdserve__V1__NodeStatus *n = r->nodes[i];
            json_array_append_new(
                nodes, json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I}", "node_id",
                                 n->node_id, "address", n->address, "role", role_name(n->role),
                                 "state", state_name(n->state), "queued_prompt_tokens",
                                 (json_int_t)n->queued_prompt_tokens, "running_seqs",
                                 (json_int_t)n->running_seqs, "context_tokens",
                                 (json_int_t)n->context_tokens, "free_kv_blocks",
                                 (json_int_t)n->free_kv_blocks, "total_kv_blocks",
                                 (json_int_t)n->total_kv_blocks, "last_report_age_ms",
                                 (json_int_t)n->last_report_age_ms));
        }
        json_t *root = json_pack("{s:s, s:I, s:I, s:o}", "router_id", r->router_id,
                                 "queued_requests", (json_int_t)r->queued_requests,
                                 "active_requests", (json_int_t)r->active_requests, "nodes", nodes);
        const Pdserve__V1__SloStats *st = r->slo;
        if (st)
            json_object_set_new(
                root, "slo",
                json_pack(
                    "{s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f, s:f, "
                    "s:f, s:I}",
                    "placement", st->placement, "policy", st->policy, "placed",
                    (json_int_t)st->placed, "placed_meeting", (json_int_t)st->placed_meeting,
                    "placed_best_effort", (json_int_t)st->placed_best_effort, "placed_local",
                    (json_int_t)st->placed_local, "queued", (json_int_t)st->queued, "rejected",
                    (json_int_t)st->rejected, "finished", (json_int_t)st->finished, "met_predicted",
                    (json_int_t)st->met_predicted, "met_actual", (json_int_t)st->met_actual,
                    "ttft_mean_abs_err_pct", st->ttft_mean_abs_err_pct, "tpot_mean_abs_err_pct",
                    st->tpot_mean_abs_err_pct, "ttft_mean_err_pct", st->ttft_mean_err_pct,
                    "tpot_mean_err_pct", st->tpot_mean_err_pct, "refits", (json_int_t)st->refits));
        json_dumpf(root, stdout, JSON_COMPACT);
        fputc('\n', stdout);
        json_decref(root);
    } else {
        printf("router %s: %u queued, %u active requests, %zu nodes\n", r->router_id,
               r->queued_requests, r->active_requests, r->n_nodes);
        const Pdserve__V1__SloStats *st = r->slo;
        if (st)
            printf("placement %s (policy %s): %llu placed (%llu predicted to meet, %llu "
                   "best-effort, %llu local prefill), %llu queued, %llu rejected; finished with "
                   "targets %llu, met %llu (predicted %llu); mean |error| TTFT %.1f%% TPOT "
                   "%.1f%%; %llu refits\n",
                   st->placement, st->policy, (unsigned long long)st->placed,
                   (unsigned long long)st->placed_meeting,
                   (unsigned long long)st->placed_best_effort, (unsigned long long)st->placed_local,
                   (unsigned long long)st->queued, (unsigned long long)st->rejected,
                   (unsigned long long)st->finished, (unsigned long long)st->met_actual,
                   (unsigned long long)st->met_predicted, st->ttft_mean_abs_err_pct,
                   st->tpot_mean_abs_err_pct, (unsigned long long)st->refits);
        printf("%-14s %-21s %-9s %-8s %9s %7s %9s %13s %7s\n", "NODE", "ADDRESS", "ROLE", "STATE",
               "QUEUED_TK", "RUNNING", "CONTEXT", "KV_FREE/TOTAL", "AGE_MS");
        for (size_t i = 0; i < r->n_nodes; i++) {
            const Pdserve__V1__NodeStatus *n = r->nodes[i];
            char kv[32];
            snprintf(kv, sizeof kv, "%u/%u", n->free_kv_blocks, n->total_kv_blocks);
            printf("%-14s %-21s %-9s %-8s %9llu %7u %9llu %13s %7u\n", n->node_id, n->address,
                   role_name(n->role), state_name(n->state),
                   (unsigned long long)n->queued_prompt_tokens, n->running_seqs,
                   (unsigned long long)n->context_tokens, kv, n->last_report_age_ms);
        }
    }
    pds_rpc_msg_free(&r->base);
    return 0;
}

static int cmd_health(int argc, char **argv, common_opts_t *co)
{
    int rc = parse_simple(argc, argv, co);
    if (rc >= 0) return rc;
    pds_rpc_channel_t *ch = NULL;
    pds_status_t s = pds_rpc_channel_create(co->router, &ch);
    if (s != PDS_OK) return fail("channel", s);
    Pdserve__V1__HealthRequest req = PDSERVE__V1__HEALTH_REQUEST__INIT;
    Pdserve__V1__HealthReply *h = NULL;
    s = pds_rpc_channel_call(ch, "/pdserve.v1.Pdserve/Health", &req.base,
                             &pdserve__v1__health_reply__descriptor, co->timeout_ms,
                             (ProtobufCMessage **)&h);
    pds_rpc_channel_destroy(ch);
    if (s != PDS_OK) return fail("health", s);
    if (co->json) {
        json_t *root = json_pack("{s:s, s:s, s:s, s:I, s:s, s:I}", "node_id", h->node_id, "state",
                                 state_name(h->state), "role", role_name(h->role),
                                 "protocol_version", (json_int_t)h->protocol_version, "build",
                                 h->build, "uptime_ms", (json_int_t)h->uptime_ms);
        json_dumpf(root, stdout, JSON_COMPACT);
        fputc('\n', stdout);
        json_decref(root);
    } else {
        printf("%s %s role=%s protocol=%u build=\"%s\" uptime_ms=%llu\n",
               h->node_id[0] ? h->node_id : "(router)", state_name(h->state),
               h->role ? role_name(h->role) : "router", h->protocol_version, h->build,
               (unsigned long long)h->uptime_ms);
    }
    rc = h->state == PDSERVE__V1__NODE_STATE__NODE_STATE_UP ? 0 : 1;
    pds_rpc_msg_free(&h->base);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!getenv("PDS_LOG_LEVEL")) pds_log_set_level(PDS_LOG_WARN); /* no gRPC chatter */
    const char *env_router = getenv("PDS_ROUTER");
    common_opts_t co = {.router = env_router && *env_router ? env_router : DEFAULT_ROUTE};
    const char *cmd = argv[1];
    argv[1] = argv[0];
    if (strcmp(cmd, "generate") == 0) return cmd_generate(argc - 1, argv + 1, &co);
    if (strcmp(cmd, "status") == 0) return cmd_status(argc - 1, argv + 1, &co);
    if (strcmp(cmd, "health") == 0) return cmd_health(argc - 1, argv + 1, &co);
    fprintf(stderr, "pdserve-cli: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}

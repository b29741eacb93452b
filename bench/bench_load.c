/* bench load: open-loop Poisson load against a pdserve router, measured from the client.
 *
 * Arrivals are drawn up front (exponential gaps at --rate, from --seed) and each request is sent
 * at its arrival time by its own thread, whatever happened to earlier ones: a slow cluster makes
 * requests pile up instead of slowing the offered load (open loop, as DistServe and vLLM's
 * benchmarks measure). Prompts are token ids (byte range) of --prompt-len; max_tokens is
 * --output-len with ignore_eos so every request produces exactly that many tokens. Measured per
 * request: TTFT = send -> first chunk, TPOT = (last chunk - first chunk) / (n - 1), end-to-end;
 * and the router's own TTFT/TPOT from the summary, so the two views can be compared (the
 * difference is what the router -> client hop costs). Reported: mean and p50/p90/p99 of each,
 * throughput over the wall time from the first send to the last answer, errors by message.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/base.h"
#include "bench.h"
#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"
#include "sample/sample.h"

#define MAX_REQUESTS 100000
#define MAX_THREADS  2048

typedef struct {
    const char *router;
    double rate;     /* requests/s; 0 = all at once */
    double duration; /* seconds of arrivals (with rate) */
    int n_requests;  /* or a fixed count */
    int prompt_len, output_len;
    bool ignore_eos;
    float temperature;
    uint64_t seed;
    int timeout_ms;
    const char *json_path;
} load_opts_t;

typedef struct {
    int index;
    const load_opts_t *o;
    pds_rpc_channel_t *ch;
    double t0;      /* benchmark start, ms */
    double t_sched; /* arrival time, ms after t0 */
    double t_send, t_first, t_last, t_end;
    int n_tokens;
    pds_status_t status;
    char err[160];
    double s_ttft, s_tpot, s_queue;
    uint32_t replacements;
    atomic_int *live; /* requests in flight, shared */
    pthread_t th;
    bool started;
} rec_t;

static void *request_thread(void *arg)
{
    rec_t *r = arg;
    const load_opts_t *o = r->o;
    int32_t *prompt = pds_malloc(sizeof(int32_t) * (size_t)o->prompt_len);
    if (!prompt) {
        r->status = PDS_ERR_NO_MEMORY;
        snprintf(r->err, sizeof r->err, "out of memory");
        atomic_fetch_sub(r->live, 1);
        return NULL;
    }
    /* Distinct prompts (no request is a prefix of another), reproducible from --seed. */
    for (int i = 0; i < o->prompt_len; i++)
        prompt[i] =
            (int32_t)(pds_mix64(o->seed ^ pds_mix64((uint64_t)r->index * 65537u + i)) % 256);
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__TokenIds tid = PDSERVE__V1__TOKEN_IDS__INIT;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    char id[48];
    snprintf(id, sizeof id, "load-%d", r->index);
    req.request_id = id;
    tid.n_ids = (size_t)o->prompt_len;
    tid.ids = prompt;
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &tid;
    sp.temperature = o->temperature;
    sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = o->seed + (uint64_t)r->index;
    req.sampling = &sp;
    req.max_tokens = (uint32_t)o->output_len;
    req.ignore_eos = o->ignore_eos;

    r->t_send = pds_time_now_ms() - r->t0;
    pds_rpc_stream_t *st = NULL;
    pds_status_t s =
        pds_rpc_stream_open(r->ch, "/pdserve.v1.Pdserve/Generate", &req.base,
                            &pdserve__v1__generate_response__descriptor, o->timeout_ms, &st);
    bool summary = false;
    while (s == PDS_OK) {
        ProtobufCMessage *m = NULL;
        s = pds_rpc_stream_next(st, &m);
        if (s != PDS_OK || !m) break;
        double now = pds_time_now_ms() - r->t0;
        const Pdserve__V1__GenerateResponse *g = (const Pdserve__V1__GenerateResponse *)m;
        if (g->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK && g->chunk &&
            g->chunk->n_ids) {
            if (r->n_tokens == 0) r->t_first = now;
            r->t_last = now;
            r->n_tokens += (int)g->chunk->n_ids;
        } else if (g->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_SUMMARY && g->summary) {
            summary = true;
            r->s_ttft = g->summary->ttft_ms;
            r->s_tpot = g->summary->tpot_mean_ms;
            r->s_queue = g->summary->queue_ms;
            r->replacements = g->summary->replacements;
        }
        pds_rpc_msg_free(m);
    }
    r->t_end = pds_time_now_ms() - r->t0;
    atomic_fetch_sub(r->live, 1);
    if (s == PDS_OK && !summary) s = PDS_ERR(PDS_ERR_INTERNAL, "stream ended without a summary");
    if (s == PDS_OK && o->ignore_eos && r->n_tokens != o->output_len)
        s = PDS_ERR(PDS_ERR_INTERNAL, "%d tokens instead of %d", r->n_tokens, o->output_len);
    r->status = s;
    if (s != PDS_OK)
        snprintf(r->err, sizeof r->err, "%s: %s", pds_status_name(s), pds_err_detail());
    pds_rpc_stream_destroy(st);
    pds_free(prompt);
    return NULL;
}

/* ---- statistics --------------------------------------------------------------------------------
 */
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v. */
static double pct(const double *v, int n, double p)
{
    if (n == 0) return 0;
    int k = (int)ceil(p / 100.0 * n) - 1;
    return v[k < 0 ? 0 : k >= n ? n - 1 : k];
}

/* {"n", "mean", "p50", "p90", "p99", "max"} of v (sorted in place); printed as one line too. */
static json_t *stats(const char *name, double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    double mean = n ? sum / n : 0;
    printf("  %-16s n=%-5d mean %9.2f  p50 %9.2f  p90 %9.2f  p99 %9.2f  max %9.2f\n", name, n, mean,
           pct(v, n, 50), pct(v, n, 90), pct(v, n, 99), n ? v[n - 1] : 0);
    return json_pack("{s:i, s:f, s:f, s:f, s:f, s:f}", "n", n, "mean", mean, "p50", pct(v, n, 50),
                     "p90", pct(v, n, 90), "p99", pct(v, n, 99), "max", n ? v[n - 1] : 0.0);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: pdserve-bench load --router HOST:PORT (--rate R --duration S | --requests N "
               "[--rate R])\n"
               "                          --prompt-len L --output-len O [options]\n"
               "  --rate R          Poisson arrivals per second (0 = all at once; default 1)\n"
               "  --duration S      seconds of arrivals (with --rate)\n"
               "  --requests N      number of requests (instead of --duration)\n"
               "  --prompt-len L    prompt tokens (ids 0..255; default 128)\n"
               "  --output-len O    max_tokens (default 64)\n"
               "  --no-ignore-eos   stop at EOS (default: ignore it, so every output is O tokens)\n"
               "  --temperature T   sampling temperature (default 0: greedy)\n"
               "  --seed N          seed of arrivals, prompts and sampling (default 1)\n"
               "  --timeout-ms N    deadline per request (default 600000)\n"
               "  --json FILE       write the results as JSON\n");
}

static bool parse_double(const char *s, double lo, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo) || !isfinite(v)) return false;
    *out = v;
    return true;
}

static bool parse_int(const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

int pds_bench_load_main(int argc, char **argv)
{
    enum {
        O_ROUTER = 256,
        O_RATE,
        O_DURATION,
        O_REQUESTS,
        O_PLEN,
        O_OLEN,
        O_NO_IGNORE,
        O_IGNORE,
        O_TEMP,
        O_SEED,
        O_TIMEOUT,
        O_JSON,
        O_HELP
    };
    static const struct option opts[] = {{"router", required_argument, 0, O_ROUTER},
                                         {"rate", required_argument, 0, O_RATE},
                                         {"duration", required_argument, 0, O_DURATION},
                                         {"requests", required_argument, 0, O_REQUESTS},
                                         {"prompt-len", required_argument, 0, O_PLEN},
                                         {"output-len", required_argument, 0, O_OLEN},
                                         {"no-ignore-eos", no_argument, 0, O_NO_IGNORE},
                                         {"ignore-eos", no_argument, 0, O_IGNORE},
                                         {"temperature", required_argument, 0, O_TEMP},
                                         {"seed", required_argument, 0, O_SEED},
                                         {"timeout-ms", required_argument, 0, O_TIMEOUT},
                                         {"json", required_argument, 0, O_JSON},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    load_opts_t o = {.router = NULL,
                     .rate = 1.0,
                     .prompt_len = 128,
                     .output_len = 64,
                     .ignore_eos = true,
                     .seed = 1,
                     .timeout_ms = 600000};
    double d;
    int c, v;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_ROUTER:
            o.router = optarg;
            break;
        case O_RATE:
            if (!parse_double(optarg, 0, &o.rate)) goto bad;
            break;
        case O_DURATION:
            if (!parse_double(optarg, 0, &o.duration) || o.duration <= 0) goto bad;
            break;
        case O_REQUESTS:
            if (!parse_int(optarg, 1, MAX_REQUESTS, &o.n_requests)) goto bad;
            break;
        case O_PLEN:
            if (!parse_int(optarg, 1, 1 << 20, &o.prompt_len)) goto bad;
            break;
        case O_OLEN:
            if (!parse_int(optarg, 1, 1 << 20, &o.output_len)) goto bad;
            break;
        case O_NO_IGNORE:
            o.ignore_eos = false;
            break;
        case O_IGNORE:
            o.ignore_eos = true;
            break;
        case O_TEMP:
            if (!parse_double(optarg, 0, &d)) goto bad;
            o.temperature = (float)d;
            break;
        case O_SEED:
            if (!parse_int(optarg, 0, 1 << 30, &v)) goto bad;
            o.seed = (uint64_t)v;
            break;
        case O_TIMEOUT:
            if (!parse_int(optarg, 1, 1 << 30, &o.timeout_ms)) goto bad;
            break;
        case O_JSON:
            o.json_path = optarg;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        continue;
    bad:
        fprintf(stderr, "%s: bad value '%s' for an option (see --help)\n", argv[0], optarg);
        return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", argv[0], argv[optind]);
        return 2;
    }
    if (!o.router || (!o.n_requests && o.duration <= 0) || (o.n_requests && o.duration > 0) ||
        (o.duration > 0 && o.rate <= 0)) {
        fprintf(stderr, "%s: give --router and either --rate R --duration S or --requests N\n",
                argv[0]);
        usage(stderr);
        return 2;
    }

    /* Arrival times: exponential gaps (Poisson process), or all at 0 for rate 0. */
    int cap = o.n_requests ? o.n_requests : MAX_REQUESTS;
    double *arrive = pds_malloc(sizeof(double) * (size_t)cap);
    if (!arrive) return 1;
    int n = 0;
    double t = 0;
    for (int i = 0; i < cap; i++) {
        if (o.rate > 0) {
            double u = pds_sample_uniform(o.seed ^ 0x6c6f6164u, i);
            t += -log(1.0 - u) / o.rate;
        }
        if (o.duration > 0 && t > o.duration) break;
        arrive[n++] = t * 1000.0;
    }
    if (n == 0) {
        fprintf(stderr, "%s: no arrival within %.1f s at rate %.3f\n", argv[0], o.duration, o.rate);
        pds_free(arrive);
        return 2;
    }
    rec_t *recs = pds_calloc((size_t)n, sizeof *recs);
    pds_rpc_channel_t *ch = NULL;
    pds_status_t s = pds_rpc_channel_create(o.router, &ch);
    if (!recs || s != PDS_OK) {
        fprintf(stderr, "%s: %s\n", argv[0], recs ? pds_err_detail() : "out of memory");
        pds_free(recs);
        pds_free(arrive);
        return 1;
    }
    char cpu[128];
    pds_bench_cpu_name(cpu, sizeof cpu);
    printf("load: %d requests, rate %.3f/s, prompt %d, output %d%s -> %s\n", n, o.rate,
           o.prompt_len, o.output_len, o.ignore_eos ? " (ignore_eos)" : "", o.router);
    fflush(stdout);

    /* Dispatch: sleep until each arrival, start its thread; never wait for answers here. */
    double t0 = pds_time_now_ms();
    int launched = 0, in_flight_max = 0;
    atomic_int live = 0;
    for (int i = 0; i < n; i++) {
        double wait = arrive[i] - (pds_time_now_ms() - t0);
        if (wait > 0) pds_time_sleep_ms(wait);
        rec_t *r = &recs[i];
        r->index = i;
        r->o = &o;
        r->ch = ch;
        r->t0 = t0;
        r->t_sched = arrive[i];
        r->live = &live;
        if (i - launched >= MAX_THREADS) { /* bound threads: join the oldest */
            pthread_join(recs[launched].th, NULL);
            recs[launched].started = false;
            launched++;
        }
        int now_live = atomic_fetch_add(&live, 1) + 1; /* not inside PDS_MAX: evaluated twice */
        in_flight_max = PDS_MAX(in_flight_max, now_live);
        r->started = pthread_create(&r->th, NULL, request_thread, r) == 0;
        if (!r->started) {
            atomic_fetch_sub(&live, 1);
            r->status = PDS_ERR_INTERNAL;
            snprintf(r->err, sizeof r->err, "pthread_create failed");
        }
    }
    for (int i = launched; i < n; i++)
        if (recs[i].started) pthread_join(recs[i].th, NULL);
    double wall_ms = 0;
    for (int i = 0; i < n; i++) wall_ms = PDS_MAX(wall_ms, recs[i].t_end);
    wall_ms -= recs[0].t_send;

    /* ---- aggregate ---- */
    const size_t nd = (size_t)n, ds = sizeof(double);
    double *ttft = pds_calloc(nd, ds), *tpot = pds_calloc(nd, ds), *e2e = pds_calloc(nd, ds),
           *sttft = pds_calloc(nd, ds), *stpot = pds_calloc(nd, ds), *lag = pds_calloc(nd, ds),
           *relay = pds_calloc(nd, ds);
    if (!ttft || !tpot || !e2e || !sttft || !stpot || !lag || !relay) {
        fprintf(stderr, "%s: out of memory\n", argv[0]);
        exit(1);
    }
    int n_ok = 0, n_tpot = 0, n_err = 0;
    long long out_tokens = 0, replaced = 0;
    json_t *errs = json_array();
    for (int i = 0; i < n; i++) {
        rec_t *r = &recs[i];
        lag[i] = r->t_send - r->t_sched;
        if (r->status != PDS_OK) {
            n_err++;
            if (json_array_size(errs) < 10) json_array_append_new(errs, json_string(r->err));
            continue;
        }
        ttft[n_ok] = r->t_first - r->t_send;
        e2e[n_ok] = r->t_end - r->t_send;
        sttft[n_ok] = r->s_ttft;
        out_tokens += r->n_tokens;
        replaced += r->replacements > 0;
        if (r->n_tokens > 1) {
            tpot[n_tpot] = (r->t_last - r->t_first) / (r->n_tokens - 1);
            stpot[n_tpot] = r->s_tpot;
            relay[n_tpot] = tpot[n_tpot] - r->s_tpot;
            n_tpot++;
        }
        n_ok++;
    }
    printf("results: %d ok, %d errors, %lld re-placed, wall %.2f s, %d in flight at most\n", n_ok,
           n_err, replaced, wall_ms / 1e3, in_flight_max);
    double secs = wall_ms > 0 ? wall_ms / 1e3 : 1;
    printf("  throughput       %.3f req/s, %.1f output tok/s, %.1f total tok/s\n", n_ok / secs,
           out_tokens / secs, (out_tokens + (double)n_ok * o.prompt_len) / secs);
    json_t *j_ttft = stats("ttft_ms (client)", ttft, n_ok);
    json_t *j_tpot = stats("tpot_ms (client)", tpot, n_tpot);
    json_t *j_e2e = stats("e2e_ms", e2e, n_ok);
    json_t *j_sttft = stats("ttft_ms (router)", sttft, n_ok);
    json_t *j_stpot = stats("tpot_ms (router)", stpot, n_tpot);
    json_t *j_relay = stats("tpot client-router", relay, n_tpot);
    json_t *j_lag = stats("dispatch lag ms", lag, n);
    for (size_t k = 0; k < json_array_size(errs); k++)
        printf("  error: %s\n", json_string_value(json_array_get(errs, k)));

    int rc = n_err ? 1 : 0;
    if (o.json_path) {
        json_t *root = json_pack(
            "{s:s, s:s, s:{s:f, s:f, s:i, s:i, s:i, s:b, s:f, s:I}, s:{s:s, s:i}, "
            "s:{s:i, s:i, s:i, s:I, s:o}, s:f, s:i, s:{s:f, s:f, s:f}, s:o, s:o, s:o, s:o, s:o, "
            "s:o, s:o}",
            "bench", "load", "router", o.router, "config", "rate", o.rate, "duration_s", o.duration,
            "requests", o.n_requests, "prompt_len", o.prompt_len, "output_len", o.output_len,
            "ignore_eos", o.ignore_eos, "temperature", (double)o.temperature, "seed",
            (json_int_t)o.seed, "machine", "cpu", cpu, "cores", (int)sysconf(_SC_NPROCESSORS_ONLN),
            "requests", "sent", n, "ok", n_ok, "errors", n_err, "replaced", (json_int_t)replaced,
            "error_samples", errs, "wall_s", wall_ms / 1e3, "max_in_flight", in_flight_max,
            "throughput", "requests_per_s", n_ok / secs, "output_tokens_per_s", out_tokens / secs,
            "total_tokens_per_s", (out_tokens + (double)n_ok * o.prompt_len) / secs, "ttft_ms",
            j_ttft, "tpot_ms", j_tpot, "e2e_ms", j_e2e, "router_ttft_ms", j_sttft, "router_tpot_ms",
            j_stpot, "tpot_client_minus_router_ms", j_relay, "dispatch_lag_ms", j_lag);
        if (!root || json_dump_file(root, o.json_path, JSON_INDENT(2) | JSON_REAL_PRECISION(6))) {
            fprintf(stderr, "%s: cannot write %s\n", argv[0], o.json_path);
            rc = 1;
        }
        json_decref(root);
    } else {
        json_decref(errs);
        json_decref(j_ttft);
        json_decref(j_tpot);
        json_decref(j_e2e);
        json_decref(j_sttft);
        json_decref(j_stpot);
        json_decref(j_relay);
        json_decref(j_lag);
    }
    pds_free(ttft);
    pds_free(tpot);
    pds_free(e2e);
    pds_free(sttft);
    pds_free(stpot);
    pds_free(lag);
    pds_free(relay);
    pds_rpc_channel_destroy(ch);
    pds_free(recs);
    pds_free(arrive);
    return rc;
}

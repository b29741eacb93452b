/* bench load: open-loop load against a pdserve router, measured from the client — one run, a rate
 * sweep, or a goodput search.
 *
 * Requests come from common/slo's workload generator, the same one the planner's simulator uses,
 * so a run and a simulation at the same (workload, rate, requests, seed) see identical requests:
 * fixed lengths (--prompt-len/--output-len), the built-in chatbot / code / summarization length
 * distributions, or the lengths of an Azure LLM inference trace (--workload trace:FILE.csv,
 * replayed in its own arrival pattern stretched to the rate); arrivals are Poisson or gamma with a
 * given coefficient of variation (bursty for cv > 1). --length-scale shrinks every length (a
 * long-context trace on a small CPU model) before lengths are clipped to --max-context.
 *
 * Each request is sent at its arrival time by its own thread whatever happened to earlier ones (an
 * open loop, as DistServe and vLLM's benchmarks measure). Prompts are token ids (byte range),
 * distinct per request; max_tokens is the output length with ignore_eos, so every request
 * produces exactly that many tokens. Measured per request: TTFT = send -> first chunk, TPOT =
 * (last chunk - first chunk) / (n - 1); the router's own TTFT/TPOT from the summary beside them.
 * With targets (--ttft-ms, --tpot-ms; also sent in GenerateRequest.slo so SLO placement sees
 * them) a request meets its SLO when both hold; attainment = met / sent (errors and rejections
 * count as missed). Goodput = the highest rate with attainment >= --attainment, by bisection over
 * runs at the same seed (common random numbers keep attainment monotone in rate).
 *
 * Output: a summary per run (and a progress bar on stderr while it runs), --json with every run,
 * --csv with one line per run (what bench/plot_load.sh draws attainment vs rate from), and
 * --requests-csv with one line per request (the latency CDFs). --label names the setup
 * ("disaggregated", "colocated") in both CSVs so several runs share one chart.
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
#include "slo/slo.h"

#define MAX_REQUESTS 100000
#define MAX_THREADS  2048
#define MAX_RATES    64

typedef struct {
    const char *router;
    double rate;     /* requests/s (single run) */
    double duration; /* seconds of arrivals */
    int n_requests;  /* or a fixed count */
    int prompt_len, output_len;
    const char *workload; /* NULL = fixed lengths */
    const char *arrival;  /* NULL = the workload's (Poisson, or the trace's pattern) */
    double length_scale;
    int max_context;
    bool ignore_eos;
    float temperature;
    uint64_t seed;
    int timeout_ms;
    double ttft_ms, tpot_ms; /* targets; 0 = none */
    const char *slo_class;
    bool send_slo;
    double rates[MAX_RATES];
    int n_rates;
    bool goodput;
    double attain_target, rate_lo, rate_hi;
    int probes;
    bool progress;
    const char *label;
    const char *json_path, *csv_path, *req_csv_path;
} load_opts_t;

typedef struct {
    int index;
    const load_opts_t *o;
    pds_rpc_channel_t *ch;
    double t0;      /* run start, ms */
    double t_sched; /* arrival time, ms after t0 */
    int prompt_len, output_len;
    double t_send, t_first, t_last, t_end;
    int n_tokens;
    pds_status_t status;
    char err[160];
    double s_ttft, s_tpot, s_queue;
    uint32_t replacements;
    char prefill[32], decode[32];
    atomic_int *live, *done;
    pthread_t th;
    bool started;
} rec_t;

static void *request_thread(void *arg)
{
    rec_t *r = arg;
    const load_opts_t *o = r->o;
    int32_t *prompt = pds_malloc(sizeof(int32_t) * (size_t)r->prompt_len);
    if (!prompt) {
        r->status = PDS_ERR_NO_MEMORY;
        snprintf(r->err, sizeof r->err, "out of memory");
        atomic_fetch_sub(r->live, 1);
        atomic_fetch_add(r->done, 1);
        return NULL;
    }
    /* Distinct prompts (no request is a prefix of another), reproducible from --seed. */
    for (int i = 0; i < r->prompt_len; i++)
        prompt[i] =
            (int32_t)(pds_mix64(o->seed ^ pds_mix64((uint64_t)r->index * 65537u + i)) % 256);
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__TokenIds tid = PDSERVE__V1__TOKEN_IDS__INIT;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    Pdserve__V1__Slo slo = PDSERVE__V1__SLO__INIT;
    char id[48];
    /* the pid keeps concurrent load generators on one router from colliding (ALREADY_EXISTS) */
    snprintf(id, sizeof id, "load-%d-%d", (int)getpid(), r->index);
    req.request_id = id;
    tid.n_ids = (size_t)r->prompt_len;
    tid.ids = prompt;
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req.token_ids = &tid;
    sp.temperature = o->temperature;
    sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = o->seed + (uint64_t)r->index;
    req.sampling = &sp;
    req.max_tokens = (uint32_t)r->output_len;
    req.ignore_eos = o->ignore_eos;
    if (o->send_slo) {
        slo.ttft_ms = (float)o->ttft_ms;
        slo.tpot_ms = (float)o->tpot_ms;
        slo.class_name = (char *)(o->slo_class ? o->slo_class : "");
        req.slo = &slo;
    }

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
            snprintf(r->prefill, sizeof r->prefill, "%s", g->summary->prefill_node);
            snprintf(r->decode, sizeof r->decode, "%s", g->summary->decode_node);
        }
        pds_rpc_msg_free(m);
    }
    r->t_end = pds_time_now_ms() - r->t0;
    if (s == PDS_OK && !summary) s = PDS_ERR(PDS_ERR_INTERNAL, "stream ended without a summary");
    if (s == PDS_OK && o->ignore_eos && r->n_tokens != r->output_len)
        s = PDS_ERR(PDS_ERR_INTERNAL, "%d tokens instead of %d", r->n_tokens, r->output_len);
    r->status = s;
    if (s != PDS_OK)
        snprintf(r->err, sizeof r->err, "%s: %s", pds_status_name(s), pds_err_detail());
    pds_rpc_stream_destroy(st);
    pds_free(prompt);
    atomic_fetch_sub(r->live, 1);
    atomic_fetch_add(r->done, 1);
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

typedef struct {
    int n;
    double mean, p50, p90, p99, max;
} dist_t;

/* Sorts v in place. */
static dist_t dist_of(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    return (dist_t){
        n, n ? sum / n : 0, pct(v, n, 50), pct(v, n, 90), pct(v, n, 99), n ? v[n - 1] : 0};
}

static json_t *dist_json(const dist_t *d)
{
    return json_pack("{s:i, s:f, s:f, s:f, s:f, s:f}", "n", d->n, "mean", d->mean, "p50", d->p50,
                     "p90", d->p90, "p99", d->p99, "max", d->max);
}

static void dist_print(const char *name, const dist_t *d)
{
    printf("  %-18s n=%-5d mean %9.2f  p50 %9.2f  p90 %9.2f  p99 %9.2f  max %9.2f\n", name, d->n,
           d->mean, d->p50, d->p90, d->p99, d->max);
}

/* ---- one run ----------------------------------------------------------------------------------
 */
typedef struct {
    double rate;
    int sent, ok, errors, rejected, met, replaced, in_flight_max;
    double attainment, wall_s, rps, out_tps, goodput_rps;
    dist_t ttft, tpot, e2e, sttft, stpot, lag;
    json_t *errs;
} run_t;

static void progress(const load_opts_t *o, int done, int launched, int n, double t_ms)
{
    if (!o->progress) return;
    int w = 30, fill = n ? done * w / n : w;
    char bar[64];
    for (int i = 0; i < w; i++) bar[i] = i < fill ? '=' : i == fill ? '>' : ' ';
    bar[w] = '\0';
    fprintf(stderr, "\r  [%s] %d/%d done, %d in flight, %.1f s ", bar, done, n, launched - done,
            t_ms / 1e3);
    fflush(stderr);
}

/* Runs reqs (arrival, lengths) against the router; fills *out and, when f_req is set, writes one
 * CSV line per request. */
static int run_load(const load_opts_t *o, pds_rpc_channel_t *ch, double rate,
                    const pds_slo_req_t *reqs, int n, FILE *f_req, run_t *out)
{
    rec_t *recs = pds_calloc((size_t)n, sizeof *recs);
    if (!recs) return 1;
    memset(out, 0, sizeof *out);
    out->rate = rate;
    double t0 = pds_time_now_ms();
    int launched = 0, joined = 0;
    atomic_int live = 0, done = 0;
    double last_bar = 0;
    for (int i = 0; i < n; i++) {
        for (;;) { /* sleep until the arrival, drawing the bar now and then */
            double now = pds_time_now_ms() - t0, wait = reqs[i].arrival_ms - now;
            if (now - last_bar > 250) {
                progress(o, atomic_load(&done), launched, n, now);
                last_bar = now;
            }
            if (wait <= 0) break;
            pds_time_sleep_ms(wait < 250 ? wait : 250);
        }
        rec_t *r = &recs[i];
        r->index = i;
        r->o = o;
        r->ch = ch;
        r->t0 = t0;
        r->t_sched = reqs[i].arrival_ms;
        r->prompt_len = reqs[i].prompt_tokens;
        r->output_len = reqs[i].output_tokens;
        r->live = &live;
        r->done = &done;
        if (i - joined >= MAX_THREADS) { /* bound threads: join the oldest */
            if (recs[joined].started) pthread_join(recs[joined].th, NULL);
            recs[joined].started = false;
            joined++;
        }
        int now_live = atomic_fetch_add(&live, 1) + 1;
        out->in_flight_max = PDS_MAX(out->in_flight_max, now_live);
        r->started = pthread_create(&r->th, NULL, request_thread, r) == 0;
        if (!r->started) {
            atomic_fetch_sub(&live, 1);
            atomic_fetch_add(&done, 1);
            r->status = PDS_ERR_INTERNAL;
            snprintf(r->err, sizeof r->err, "pthread_create failed");
        }
        launched++;
    }
    while (atomic_load(&done) < n) {
        progress(o, atomic_load(&done), launched, n, pds_time_now_ms() - t0);
        pds_time_sleep_ms(250);
    }
    progress(o, n, n, n, pds_time_now_ms() - t0);
    if (o->progress) fputc('\n', stderr);
    for (int i = joined; i < n; i++)
        if (recs[i].started) pthread_join(recs[i].th, NULL);
    double wall_ms = 0;
    for (int i = 0; i < n; i++) wall_ms = PDS_MAX(wall_ms, recs[i].t_end);
    wall_ms -= recs[0].t_send;

    const size_t nd = (size_t)n, ds = sizeof(double);
    double *ttft = pds_calloc(nd, ds), *tpot = pds_calloc(nd, ds), *e2e = pds_calloc(nd, ds),
           *sttft = pds_calloc(nd, ds), *stpot = pds_calloc(nd, ds), *lag = pds_calloc(nd, ds);
    if (!ttft || !tpot || !e2e || !sttft || !stpot || !lag) {
        fprintf(stderr, "pdserve-bench load: out of memory\n");
        exit(1);
    }
    int n_tpot = 0;
    long long out_tokens = 0;
    out->errs = json_array();
    for (int i = 0; i < n; i++) {
        rec_t *r = &recs[i];
        lag[i] = r->t_send - r->t_sched;
        double c_ttft = -1, c_tpot = -1;
        bool met = false;
        if (r->status != PDS_OK) {
            out->errors++;
            out->rejected += r->status == PDS_ERR_EXHAUSTED;
            if (json_array_size(out->errs) < 10)
                json_array_append_new(out->errs, json_string(r->err));
        } else {
            c_ttft = r->t_first - r->t_send;
            ttft[out->ok] = c_ttft;
            e2e[out->ok] = r->t_end - r->t_send;
            sttft[out->ok] = r->s_ttft;
            out_tokens += r->n_tokens;
            out->replaced += r->replacements > 0;
            c_tpot = 0;
            if (r->n_tokens > 1) {
                c_tpot = (r->t_last - r->t_first) / (r->n_tokens - 1);
                tpot[n_tpot] = c_tpot;
                stpot[n_tpot] = r->s_tpot;
                n_tpot++;
            }
            met = (o->ttft_ms <= 0 || c_ttft <= o->ttft_ms) &&
                  (o->tpot_ms <= 0 || r->n_tokens <= 1 || c_tpot <= o->tpot_ms);
            out->met += met;
            out->ok++;
        }
        if (f_req)
            fprintf(f_req, "%s,%.4f,%d,%.2f,%d,%d,%s,%.3f,%.4f,%d,%s,%s\n",
                    o->label ? o->label : "", rate, i, r->t_sched, r->prompt_len, r->output_len,
                    r->status == PDS_OK ? "ok" : pds_status_name(r->status), c_ttft, c_tpot, met,
                    r->prefill, r->decode);
    }
    double secs = wall_ms > 0 ? wall_ms / 1e3 : 1;
    out->sent = n;
    out->wall_s = wall_ms / 1e3;
    out->rps = out->ok / secs;
    out->out_tps = out_tokens / secs;
    out->attainment = n ? (double)out->met / n : 0;
    out->goodput_rps = out->met / secs;
    out->ttft = dist_of(ttft, out->ok);
    out->tpot = dist_of(tpot, n_tpot);
    out->e2e = dist_of(e2e, out->ok);
    out->sttft = dist_of(sttft, out->ok);
    out->stpot = dist_of(stpot, n_tpot);
    out->lag = dist_of(lag, n);
    pds_free(ttft);
    pds_free(tpot);
    pds_free(e2e);
    pds_free(sttft);
    pds_free(stpot);
    pds_free(lag);
    pds_free(recs);
    return 0;
}

static void run_print(const load_opts_t *o, const run_t *r)
{
    printf("rate %.3f req/s: %d sent, %d ok, %d errors (%d rejected), %d re-placed, wall %.2f s, "
           "%d in flight at most\n",
           r->rate, r->sent, r->ok, r->errors, r->rejected, r->replaced, r->wall_s,
           r->in_flight_max);
    printf("  throughput         %.3f req/s, %.1f output tok/s\n", r->rps, r->out_tps);
    if (o->ttft_ms > 0 || o->tpot_ms > 0)
        printf("  SLO attainment     %.1f%% (%d of %d within TTFT %.0f ms and TPOT %.1f ms)\n",
               100 * r->attainment, r->met, r->sent, o->ttft_ms, o->tpot_ms);
    dist_print("ttft_ms (client)", &r->ttft);
    dist_print("tpot_ms (client)", &r->tpot);
    dist_print("e2e_ms", &r->e2e);
    dist_print("ttft_ms (router)", &r->sttft);
    dist_print("tpot_ms (router)", &r->stpot);
    dist_print("dispatch lag ms", &r->lag);
    for (size_t k = 0; k < json_array_size(r->errs); k++)
        printf("  error: %s\n", json_string_value(json_array_get(r->errs, k)));
    fflush(stdout);
}

static json_t *run_json(const run_t *r)
{
    return json_pack("{s:f, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:f, s:i, s:o, s:o, "
                     "s:o, s:o, s:o, s:o, s:O}",
                     "rate", r->rate, "sent", r->sent, "ok", r->ok, "errors", r->errors, "rejected",
                     r->rejected, "met", r->met, "replaced", r->replaced, "attainment",
                     r->attainment, "wall_s", r->wall_s, "requests_per_s", r->rps,
                     "output_tokens_per_s", r->out_tps, "slo_goodput_rps", r->goodput_rps,
                     "max_in_flight", r->in_flight_max, "ttft_ms", dist_json(&r->ttft), "tpot_ms",
                     dist_json(&r->tpot), "e2e_ms", dist_json(&r->e2e), "router_ttft_ms",
                     dist_json(&r->sttft), "router_tpot_ms", dist_json(&r->stpot),
                     "dispatch_lag_ms", dist_json(&r->lag), "error_samples", r->errs);
}

static void run_csv(FILE *f, const load_opts_t *o, const run_t *r)
{
    fprintf(f, "%s,%.4f,%d,%d,%d,%d,%.4f,%.3f,%.3f,%.3f,%.3f,%.4f,%.4f,%.4f,%.4f,%.3f\n",
            o->label ? o->label : "", r->rate, r->sent, r->ok, r->errors, r->met, r->attainment,
            r->ttft.p50, r->ttft.p90, r->ttft.p99, r->ttft.mean, r->tpot.p50, r->tpot.p90,
            r->tpot.p99, r->tpot.mean, r->rps);
    fflush(f);
}

/* ---- options -----------------------------------------------------------------------------------
 */
static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: pdserve-bench load --router HOST:PORT [--rate R (--duration S | --requests N)]\n"
        "         [--rates R1,R2,... | --goodput --rate-lo A --rate-hi B] [options]\n"
        "workload:\n"
        "  --workload W      fixed (--prompt-len/--output-len; default) | chatbot | code |\n"
        "                    summarization | trace:FILE.csv (Azure LLM trace format)\n"
        "  --prompt-len L    fixed: prompt tokens (ids 0..255; default 128)\n"
        "  --output-len O    fixed: output tokens (default 64)\n"
        "  --arrival A       poisson | gamma:CV (bursty for CV > 1) | trace (default: poisson,\n"
        "                    a trace's own pattern for trace workloads)\n"
        "  --length-scale F  multiply every prompt and output length by F (default 1)\n"
        "  --max-context N   clip prompt + output to N tokens (the model's context; default 0 =\n"
        "                    no clip)\n"
        "  --rate R          arrivals per second (default 1)\n"
        "  --duration S      seconds of arrivals per run   | --requests N   requests per run\n"
        "  --seed N          seed of arrivals, lengths, prompts and sampling (default 1)\n"
        "  --temperature T   sampling temperature (default 0: greedy)\n"
        "  --no-ignore-eos   stop at EOS (default: ignore it: every output has its length)\n"
        "SLO:\n"
        "  --ttft-ms X --tpot-ms Y   targets for attainment (also sent with each request)\n"
        "  --slo-class NAME          class sent with each request (router's [slo] classes)\n"
        "  --no-send-slo             measure attainment but send no targets to the router\n"
        "sweeps:\n"
        "  --rates R1,R2,..  one run per rate (same requests, stretched in time)\n"
        "  --goodput         bisect the highest rate with attainment >= --attainment (0.9)\n"
        "                    between --rate-lo and --rate-hi, --probes runs (default 6)\n"
        "output:\n"
        "  --label NAME      setup name in the CSVs (e.g. disaggregated, colocated)\n"
        "  --json FILE       every run as JSON     --csv FILE   one line per run\n"
        "  --requests-csv FILE   one line per request (latency CDFs)\n"
        "  --no-progress     no progress bar on stderr\n"
        "  --timeout-ms N    deadline per request (default 600000)\n");
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

static bool parse_rates(const char *s, load_opts_t *o)
{
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", s);
    o->n_rates = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        double v;
        if (o->n_rates == MAX_RATES || !parse_double(t, 0, &v) || v <= 0) return false;
        o->rates[o->n_rates++] = v;
    }
    return o->n_rates > 0;
}

/* The workload named by the options; *trace holds a loaded trace (caller destroys). */
static pds_status_t make_workload(const load_opts_t *o, pds_slo_workload_t *w,
                                  pds_slo_trace_t **trace)
{
    *trace = NULL;
    if (!o->workload || strcmp(o->workload, "fixed") == 0) {
        *w = (pds_slo_workload_t){.name = "fixed",
                                  .arrival = PDS_SLO_ARRIVAL_POISSON,
                                  .cv = 1,
                                  .prompt_median = o->prompt_len,
                                  .prompt_min = o->prompt_len,
                                  .prompt_max = o->prompt_len,
                                  .output_median = o->output_len,
                                  .output_min = o->output_len,
                                  .output_max = o->output_len};
    } else if (strncmp(o->workload, "trace:", 6) == 0) {
        PDS_TRY(pds_slo_trace_load(o->workload + 6, trace));
        *w = (pds_slo_workload_t){
            .name = o->workload, .arrival = PDS_SLO_ARRIVAL_TRACE, .cv = 1, .trace = *trace};
    } else {
        PDS_TRY(pds_slo_workload_builtin(o->workload, w));
    }
    w->length_scale = o->length_scale;
    if (o->arrival) {
        if (strcmp(o->arrival, "poisson") == 0) {
            w->arrival = PDS_SLO_ARRIVAL_POISSON;
        } else if (strncmp(o->arrival, "gamma:", 6) == 0) {
            w->arrival = PDS_SLO_ARRIVAL_GAMMA;
            if (!parse_double(o->arrival + 6, 0, &w->cv) || w->cv <= 0)
                return PDS_ERR(PDS_ERR_INVALID_ARG, "--arrival %s: CV must be > 0", o->arrival);
        } else if (strcmp(o->arrival, "trace") == 0 && *trace) {
            w->arrival = PDS_SLO_ARRIVAL_TRACE;
        } else {
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "--arrival '%s': poisson, gamma:CV or (trace workloads) trace",
                           o->arrival);
        }
    }
    return PDS_OK;
}

/* The requests of one run at `rate`: --requests of them, or those arriving within --duration. */
static pds_status_t make_requests(const load_opts_t *o, const pds_slo_workload_t *w, double rate,
                                  pds_slo_req_t **out, int *n_out)
{
    int n = o->n_requests;
    if (!n) n = (int)PDS_MIN((double)MAX_REQUESTS, ceil(rate * o->duration * 2 + 16));
    pds_slo_req_t *r = pds_malloc(sizeof *r * (size_t)n);
    if (!r) return PDS_ERR(PDS_ERR_NO_MEMORY, "%d requests", n);
    pds_status_t s = pds_slo_workload_generate(w, rate, n, o->seed, o->max_context, r);
    if (s != PDS_OK) {
        pds_free(r);
        return s;
    }
    if (!o->n_requests) {
        int k = 0;
        while (k < n && r[k].arrival_ms <= o->duration * 1000.0) k++;
        n = k;
    }
    if (n == 0) {
        pds_free(r);
        return PDS_ERR(PDS_ERR_INVALID_ARG, "no arrival within %.1f s at rate %.3f", o->duration,
                       rate);
    }
    *out = r;
    *n_out = n;
    return PDS_OK;
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
        O_CSV,
        O_REQCSV,
        O_WORKLOAD,
        O_ARRIVAL,
        O_SCALE,
        O_MAXCTX,
        O_TTFT,
        O_TPOT,
        O_CLASS,
        O_NOSEND,
        O_RATES,
        O_GOODPUT,
        O_ATTAIN,
        O_RLO,
        O_RHI,
        O_PROBES,
        O_LABEL,
        O_NOPROG,
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
                                         {"csv", required_argument, 0, O_CSV},
                                         {"requests-csv", required_argument, 0, O_REQCSV},
                                         {"workload", required_argument, 0, O_WORKLOAD},
                                         {"arrival", required_argument, 0, O_ARRIVAL},
                                         {"length-scale", required_argument, 0, O_SCALE},
                                         {"max-context", required_argument, 0, O_MAXCTX},
                                         {"ttft-ms", required_argument, 0, O_TTFT},
                                         {"tpot-ms", required_argument, 0, O_TPOT},
                                         {"slo-class", required_argument, 0, O_CLASS},
                                         {"no-send-slo", no_argument, 0, O_NOSEND},
                                         {"rates", required_argument, 0, O_RATES},
                                         {"goodput", no_argument, 0, O_GOODPUT},
                                         {"attainment", required_argument, 0, O_ATTAIN},
                                         {"rate-lo", required_argument, 0, O_RLO},
                                         {"rate-hi", required_argument, 0, O_RHI},
                                         {"probes", required_argument, 0, O_PROBES},
                                         {"label", required_argument, 0, O_LABEL},
                                         {"no-progress", no_argument, 0, O_NOPROG},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
    load_opts_t o = {.rate = 1.0,
                     .prompt_len = 128,
                     .output_len = 64,
                     .length_scale = 1.0,
                     .ignore_eos = true,
                     .seed = 1,
                     .timeout_ms = 600000,
                     .send_slo = true,
                     .attain_target = 0.9,
                     .probes = 6,
                     .progress = isatty(2)};
    double d;
    int c, v;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_ROUTER:
            o.router = optarg;
            break;
        case O_RATE:
            if (!parse_double(optarg, 0, &o.rate) || o.rate <= 0) goto bad;
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
        case O_CSV:
            o.csv_path = optarg;
            break;
        case O_REQCSV:
            o.req_csv_path = optarg;
            break;
        case O_WORKLOAD:
            o.workload = optarg;
            break;
        case O_ARRIVAL:
            o.arrival = optarg;
            break;
        case O_SCALE:
            if (!parse_double(optarg, 0, &o.length_scale) || o.length_scale <= 0) goto bad;
            break;
        case O_MAXCTX:
            if (!parse_int(optarg, 0, 1 << 24, &o.max_context)) goto bad;
            break;
        case O_TTFT:
            if (!parse_double(optarg, 0, &o.ttft_ms)) goto bad;
            break;
        case O_TPOT:
            if (!parse_double(optarg, 0, &o.tpot_ms)) goto bad;
            break;
        case O_CLASS:
            o.slo_class = optarg;
            break;
        case O_NOSEND:
            o.send_slo = false;
            break;
        case O_RATES:
            if (!parse_rates(optarg, &o)) goto bad;
            break;
        case O_GOODPUT:
            o.goodput = true;
            break;
        case O_ATTAIN:
            if (!parse_double(optarg, 0, &o.attain_target) || o.attain_target > 1) goto bad;
            break;
        case O_RLO:
            if (!parse_double(optarg, 0, &o.rate_lo) || o.rate_lo <= 0) goto bad;
            break;
        case O_RHI:
            if (!parse_double(optarg, 0, &o.rate_hi) || o.rate_hi <= 0) goto bad;
            break;
        case O_PROBES:
            if (!parse_int(optarg, 2, 64, &o.probes)) goto bad;
            break;
        case O_LABEL:
            o.label = optarg;
            break;
        case O_NOPROG:
            o.progress = false;
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
    if (!o.router || (!o.n_requests && o.duration <= 0) || (o.n_requests && o.duration > 0)) {
        fprintf(stderr, "%s: give --router and either --duration S or --requests N\n", argv[0]);
        usage(stderr);
        return 2;
    }
    if (o.goodput &&
        (o.rate_lo <= 0 || o.rate_hi <= o.rate_lo || !(o.ttft_ms > 0 || o.tpot_ms > 0))) {
        fprintf(stderr,
                "%s: --goodput needs --rate-lo < --rate-hi and a --ttft-ms or --tpot-ms "
                "target\n",
                argv[0]);
        return 2;
    }
    if (!o.send_slo || (!(o.ttft_ms > 0) && !(o.tpot_ms > 0) && !o.slo_class)) o.send_slo = false;
    if (!o.goodput && o.n_rates == 0) o.rates[o.n_rates++] = o.rate;

    pds_slo_workload_t w;
    pds_slo_trace_t *trace = NULL;
    pds_status_t s = make_workload(&o, &w, &trace);
    if (s != PDS_OK) {
        fprintf(stderr, "%s: %s\n", argv[0], pds_err_detail());
        return 2;
    }
    pds_rpc_channel_t *ch = NULL;
    if ((s = pds_rpc_channel_create(o.router, &ch)) != PDS_OK) {
        fprintf(stderr, "%s: %s\n", argv[0], pds_err_detail());
        pds_slo_trace_destroy(trace);
        return 1;
    }
    FILE *f_csv = NULL, *f_req = NULL;
    if (o.csv_path && !(f_csv = fopen(o.csv_path, "w"))) {
        fprintf(stderr, "%s: cannot write %s: %s\n", argv[0], o.csv_path, strerror(errno));
        return 1;
    }
    if (o.req_csv_path && !(f_req = fopen(o.req_csv_path, "w"))) {
        fprintf(stderr, "%s: cannot write %s: %s\n", argv[0], o.req_csv_path, strerror(errno));
        return 1;
    }
    if (f_csv)
        fprintf(f_csv, "label,rate,sent,ok,errors,met,attainment,ttft_p50_ms,ttft_p90_ms,"
                       "ttft_p99_ms,ttft_mean_ms,tpot_p50_ms,tpot_p90_ms,tpot_p99_ms,"
                       "tpot_mean_ms,throughput_rps\n");
    if (f_req)
        fprintf(f_req, "label,rate,index,arrival_ms,prompt_tokens,output_tokens,status,ttft_ms,"
                       "tpot_ms,met,prefill_node,decode_node\n");
    char cpu[128];
    pds_bench_cpu_name(cpu, sizeof cpu);
    printf("load: workload %s (arrivals %s%s, length scale %g, max context %d) -> %s%s%s\n", w.name,
           w.arrival == PDS_SLO_ARRIVAL_POISSON ? "poisson"
           : w.arrival == PDS_SLO_ARRIVAL_GAMMA ? "gamma"
                                                : "trace",
           w.arrival == PDS_SLO_ARRIVAL_GAMMA ? " cv" : "", w.length_scale, o.max_context, o.router,
           o.label ? ", label " : "", o.label ? o.label : "");
    fflush(stdout);

    json_t *runs = json_array();
    int rc = 0;
    /* one run per rate (sweep), or the bisection's probes */
    double lo = o.rate_lo, hi = o.rate_hi, good = 0;
    int n_runs = o.goodput ? o.probes : o.n_rates;
    bool lo_ok = false;
    for (int k = 0; k < n_runs; k++) {
        double rate;
        if (!o.goodput)
            rate = o.rates[k];
        else if (k == 0)
            rate = hi; /* does the top already meet? */
        else if (k == 1)
            rate = lo;
        else
            rate = 0.5 * (lo + hi);
        pds_slo_req_t *reqs = NULL;
        int n = 0;
        if ((s = make_requests(&o, &w, rate, &reqs, &n)) != PDS_OK) {
            fprintf(stderr, "%s: %s\n", argv[0], pds_err_detail());
            rc = 2;
            break;
        }
        if (o.goodput || o.n_rates > 1)
            printf("-- run %d/%d: rate %.3f req/s, %d requests\n", k + 1, n_runs, rate, n);
        fflush(stdout);
        run_t r;
        if (run_load(&o, ch, rate, reqs, n, f_req, &r) != 0) {
            pds_free(reqs);
            rc = 1;
            break;
        }
        pds_free(reqs);
        run_print(&o, &r);
        if (f_csv) run_csv(f_csv, &o, &r);
        json_array_append_new(runs, run_json(&r));
        json_decref(r.errs);
        if (r.errors > r.rejected) rc = 1;
        if (o.goodput) {
            bool ok = r.attainment >= o.attain_target;
            if (k == 0 && ok) {
                good = hi;
                break;
            }
            if (k == 1) {
                lo_ok = ok;
                if (!ok) break;
                good = lo;
            } else if (k >= 2) {
                if (ok)
                    lo = good = rate;
                else
                    hi = rate;
            }
        }
    }
    if (o.goodput) {
        if (good == 0 && !lo_ok)
            printf("goodput: below %.3f req/s (attainment < %.0f%% there)\n", o.rate_lo,
                   100 * o.attain_target);
        else
            printf("goodput: %.3f req/s with >= %.0f%% of requests within TTFT %.0f ms and TPOT "
                   "%.1f ms%s\n",
                   good, 100 * o.attain_target, o.ttft_ms, o.tpot_ms,
                   good >= o.rate_hi ? " (at least: the top of the range met it)" : "");
    }
    if (o.json_path) {
        json_t *root = json_pack(
            "{s:s, s:s, s:s?, s:{s:s, s:s, s:f, s:f, s:i, s:f, s:i, s:i, s:i, s:b, s:f, s:I, "
            "s:f, s:f, s:s?}, s:{s:s, s:i}, s:o, s:o?}",
            "bench", "load", "router", o.router, "label", o.label, "config", "workload", w.name,
            "arrival",
            w.arrival == PDS_SLO_ARRIVAL_POISSON ? "poisson"
            : w.arrival == PDS_SLO_ARRIVAL_GAMMA ? "gamma"
                                                 : "trace",
            "cv", w.cv, "length_scale", o.length_scale, "max_context", o.max_context, "duration_s",
            o.duration, "requests", o.n_requests, "prompt_len", o.prompt_len, "output_len",
            o.output_len, "ignore_eos", o.ignore_eos, "temperature", (double)o.temperature, "seed",
            (json_int_t)o.seed, "ttft_target_ms", o.ttft_ms, "tpot_target_ms", o.tpot_ms,
            "slo_class", o.slo_class, "machine", "cpu", cpu, "cores",
            (int)sysconf(_SC_NPROCESSORS_ONLN), "runs", runs, "goodput_rps",
            o.goodput ? json_real(good) : NULL);
        if (!root || json_dump_file(root, o.json_path, JSON_INDENT(2) | JSON_REAL_PRECISION(6))) {
            fprintf(stderr, "%s: cannot write %s\n", argv[0], o.json_path);
            rc = 1;
        }
        json_decref(root);
    } else {
        json_decref(runs);
    }
    if (f_csv) fclose(f_csv);
    if (f_req) fclose(f_req);
    pds_rpc_channel_destroy(ch);
    pds_slo_trace_destroy(trace);
    return rc;
}

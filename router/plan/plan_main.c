/* plan_main.c: pdserve-plan — how many prefill and decode nodes (and which tensor parallelism) a
 * workload needs to meet its TTFT/TPOT targets, found by simulating candidate clusters with the
 * latency model and the router's own placement function (common/slo).
 *
 * Search: for each per-phase TP degree and each "unit" of np prefill + nd decode instances within
 * --max-unit-gpus (default min(budget, 16)), bisect the request rate at which the simulated
 * attainment stays >= the target; rank units by goodput per GPU (or per dollar when every device
 * has a price). The plan replicates the best unit as many times as the budget holds — goodput is
 * assumed to add up across replicas, which the router's global placement can only improve on. The
 * same search runs for colocated instances (prefill-first and chunked prefill), and the plan says
 * plainly when disaggregation does not pay.
 *
 * Tensor parallelism is not measured but scaled from the profile (an assumption, printed with the
 * plan): with degree k relative to the profile's, every time coefficient is divided by
 * k * eff^log2(k) (eff = --tp-efficiency, default 0.9 per doubling), each step gains
 * 2 * n_layers all-reduces of --tp-allreduce-us (default 10 us) on its fixed cost, and the KV
 * capacity grows k-fold (weights and KV heads both split k ways). Pipeline parallelism is not
 * modelled: --pp other than 1 is refused.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"
#include "plan/plan.h"
#include "slo/slo.h"

#define MAX_TP    8
#define MAX_COSTS 16

pds_status_t plan_parse_int(const char *s, const char *opt, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "%s '%s': expected an integer in %d..%d", opt, s, lo,
                       hi);
    *out = (int)v;
    return PDS_OK;
}

pds_status_t plan_parse_double(const char *s, const char *opt, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !(v >= lo && v <= hi))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "%s '%s': expected a number in %g..%g", opt, s, lo, hi);
    *out = v;
    return PDS_OK;
}

typedef struct {
    char name[32];
    double per_hour;
} gpu_cost_t;

typedef struct {
    const char *profile, *prefill_profile, *decode_profile, *workload, *out_dir, *router;
    double ttft_ms, tpot_ms, attainment, link_gbps, link_msg_ms, tp_eff, tp_allreduce_us, cv;
    int budget, per_node, max_unit, requests, tp[MAX_TP], n_tp, chunk_tokens, max_context;
    uint64_t seed;
    bool quiet, gamma, no_coloc;
    pds_slo_policy_t policy;
    gpu_cost_t costs[MAX_COSTS];
    int n_costs;
} opts_t;

typedef struct {
    pds_slo_sim_mode_t mode;
    int np, tp_p, nd, tp_d, gpus;
    double rate, per_gpu, cost_h, per_dollar;
    pds_slo_sim_result_t at;
} row_t;

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: pdserve-plan --profile P.json [--prefill-profile P.json] [--decode-profile "
        "D.json]\n"
        "         --workload chatbot|code|summarization|trace:FILE.csv --gpus-budget N\n"
        "         [--ttft-ms 250] [--tpot-ms 100] [--attainment 0.9] [--gpus-per-node 8]\n"
        "         [--tp 1,2,4] [--pp 1] [--max-unit-gpus N] [--gpu-cost-per-hour H100=2.5,L4=0.8]\n"
        "         [--link-gbps X] [--link-msg-ms X] [--arrival poisson|gamma:CV]\n"
        "         [--policy queue|best-effort|reject] [--chunk-tokens 512] [--no-colocated]\n"
        "         [--requests 2000] [--seed 1] [--max-context N] [--tp-efficiency 0.9]\n"
        "         [--tp-allreduce-us 10] [--router HOST:PORT] [--out-dir DIR] [--quiet]\n"
        "       pdserve-plan profile --preset NAME --out FILE ...   (pdserve-plan profile --help)\n"
        "       pdserve-plan simulate --profile P.json --rates ... (one cluster; --help)\n"
        "Simulates clusters with the profiled latency model and the router's placement, bisects\n"
        "the rate meeting both targets for --attainment of requests, and reports the cheapest\n"
        "configuration per unit of goodput; --out-dir writes its node config files.\n");
}

static pds_status_t parse_costs(const char *s, opts_t *o)
{
    o->n_costs = 0;
    char buf[512];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok || o->n_costs == MAX_COSTS)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "--gpu-cost-per-hour: '%s' is not NAME=PRICE", tok);
        *eq = '\0';
        gpu_cost_t *c = &o->costs[o->n_costs++];
        snprintf(c->name, sizeof c->name, "%s", tok);
        PDS_TRY(plan_parse_double(eq + 1, "--gpu-cost-per-hour", 0, 1e6, &c->per_hour));
    }
    return PDS_OK;
}

/* Price of one GPU of a profile's device: the first NAME that the device string contains. */
static double device_cost(const opts_t *o, const char *device)
{
    for (int i = 0; i < o->n_costs; i++)
        if (strcasestr(device, o->costs[i].name)) return o->costs[i].per_hour;
    return -1;
}

static pds_status_t parse_args(int argc, char **argv, opts_t *o)
{
    static const struct option opts[] = {{"profile", required_argument, 0, 'P'},
                                         {"prefill-profile", required_argument, 0, 'A'},
                                         {"decode-profile", required_argument, 0, 'D'},
                                         {"workload", required_argument, 0, 'w'},
                                         {"ttft-ms", required_argument, 0, 't'},
                                         {"tpot-ms", required_argument, 0, 'T'},
                                         {"attainment", required_argument, 0, 'a'},
                                         {"gpus-budget", required_argument, 0, 'g'},
                                         {"gpus-per-node", required_argument, 0, 'G'},
                                         {"tp", required_argument, 0, 'x'},
                                         {"pp", required_argument, 0, 'y'},
                                         {"max-unit-gpus", required_argument, 0, 'u'},
                                         {"gpu-cost-per-hour", required_argument, 0, 'c'},
                                         {"link-gbps", required_argument, 0, 'l'},
                                         {"link-msg-ms", required_argument, 0, 'L'},
                                         {"arrival", required_argument, 0, 'r'},
                                         {"policy", required_argument, 0, 'p'},
                                         {"chunk-tokens", required_argument, 0, 'k'},
                                         {"no-colocated", no_argument, 0, 'N'},
                                         {"requests", required_argument, 0, 'n'},
                                         {"seed", required_argument, 0, 's'},
                                         {"max-context", required_argument, 0, 'm'},
                                         {"tp-efficiency", required_argument, 0, 'e'},
                                         {"tp-allreduce-us", required_argument, 0, 'E'},
                                         {"router", required_argument, 0, 'R'},
                                         {"out-dir", required_argument, 0, 'o'},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    *o = (opts_t){.ttft_ms = 250,
                  .tpot_ms = 100,
                  .attainment = 0.9,
                  .link_gbps = -1,
                  .link_msg_ms = -1,
                  .tp_eff = 0.9,
                  .tp_allreduce_us = 10,
                  .per_node = 8,
                  .requests = 2000,
                  .tp = {1},
                  .n_tp = 1,
                  .chunk_tokens = 512,
                  .seed = 1,
                  .router = "127.0.0.1:7100",
                  .policy = PDS_SLO_POLICY_QUEUE};
    int pp = 1, seed = 1;
    for (int c; (c = getopt_long(argc, argv, "hq", opts, NULL)) != -1;) {
        switch (c) {
        case 'P':
            o->profile = optarg;
            break;
        case 'A':
            o->prefill_profile = optarg;
            break;
        case 'D':
            o->decode_profile = optarg;
            break;
        case 'w':
            o->workload = optarg;
            break;
        case 't':
            PDS_TRY(plan_parse_double(optarg, "--ttft-ms", 0, 1e9, &o->ttft_ms));
            break;
        case 'T':
            PDS_TRY(plan_parse_double(optarg, "--tpot-ms", 0, 1e9, &o->tpot_ms));
            break;
        case 'a':
            PDS_TRY(plan_parse_double(optarg, "--attainment", 0.01, 1, &o->attainment));
            break;
        case 'g':
            PDS_TRY(plan_parse_int(optarg, "--gpus-budget", 1, 100000, &o->budget));
            break;
        case 'G':
            PDS_TRY(plan_parse_int(optarg, "--gpus-per-node", 1, 64, &o->per_node));
            break;
        case 'x': {
            o->n_tp = 0;
            char buf[64];
            snprintf(buf, sizeof buf, "%s", optarg);
            for (char *sv = NULL, *t = strtok_r(buf, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
                int v = 0; /* set on success; initialised for -O2's -Wmaybe-uninitialized */
                PDS_TRY(plan_parse_int(t, "--tp", 1, 64, &v));
                if (v & (v - 1))
                    return PDS_ERR(PDS_ERR_INVALID_ARG, "--tp %d: powers of two only", v);
                if (o->n_tp == MAX_TP)
                    return PDS_ERR(PDS_ERR_INVALID_ARG, "--tp: at most %d degrees", MAX_TP);
                o->tp[o->n_tp++] = v;
            }
            if (!o->n_tp) return PDS_ERR(PDS_ERR_INVALID_ARG, "--tp: empty list");
            break;
        }
        case 'y':
            PDS_TRY(plan_parse_int(optarg, "--pp", 1, 64, &pp));
            if (pp != 1)
                return PDS_ERR(PDS_ERR_UNSUPPORTED,
                               "--pp %d: pipeline parallelism is not modelled yet (only 1)", pp);
            break;
        case 'u':
            PDS_TRY(plan_parse_int(optarg, "--max-unit-gpus", 2, 4096, &o->max_unit));
            break;
        case 'c':
            PDS_TRY(parse_costs(optarg, o));
            break;
        case 'l':
            PDS_TRY(plan_parse_double(optarg, "--link-gbps", 0, 1e6, &o->link_gbps));
            break;
        case 'L':
            PDS_TRY(plan_parse_double(optarg, "--link-msg-ms", 0, 1e6, &o->link_msg_ms));
            break;
        case 'r':
            if (strcmp(optarg, "poisson") == 0) {
                o->gamma = false;
            } else if (strncmp(optarg, "gamma:", 6) == 0) {
                o->gamma = true;
                PDS_TRY(plan_parse_double(optarg + 6, "--arrival gamma:CV", 0.01, 100, &o->cv));
            } else {
                return PDS_ERR(PDS_ERR_INVALID_ARG, "--arrival %s: poisson or gamma:CV", optarg);
            }
            break;
        case 'p':
            PDS_TRY(pds_slo_policy_parse(optarg, &o->policy));
            break;
        case 'k':
            PDS_TRY(plan_parse_int(optarg, "--chunk-tokens", 16, 1 << 20, &o->chunk_tokens));
            break;
        case 'N':
            o->no_coloc = true;
            break;
        case 'n':
            PDS_TRY(plan_parse_int(optarg, "--requests", 50, 10000000, &o->requests));
            break;
        case 's':
            PDS_TRY(plan_parse_int(optarg, "--seed", 0, 2147483647, &seed));
            o->seed = (uint64_t)seed;
            break;
        case 'm':
            PDS_TRY(plan_parse_int(optarg, "--max-context", 2, 1 << 24, &o->max_context));
            break;
        case 'e':
            PDS_TRY(plan_parse_double(optarg, "--tp-efficiency", 0.1, 1, &o->tp_eff));
            break;
        case 'E':
            PDS_TRY(plan_parse_double(optarg, "--tp-allreduce-us", 0, 1e6, &o->tp_allreduce_us));
            break;
        case 'R':
            o->router = optarg;
            break;
        case 'o':
            o->out_dir = optarg;
            break;
        case 'q':
            o->quiet = true;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown option (see --help)");
        }
    }
    if (optind < argc)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unexpected argument '%s'", argv[optind]);
    if (!o->profile && !(o->prefill_profile && o->decode_profile))
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "--profile (or both --prefill-profile and --decode-profile) is required");
    if (!o->workload) return PDS_ERR(PDS_ERR_INVALID_ARG, "--workload is required");
    if (!o->budget) return PDS_ERR(PDS_ERR_INVALID_ARG, "--gpus-budget is required");
    if (o->budget < 2)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "--gpus-budget %d: a disaggregated plan needs >= 2",
                       o->budget);
    if (!o->max_unit) o->max_unit = PDS_MIN(o->budget, 16);
    if (o->max_unit > o->budget) o->max_unit = o->budget;
    return PDS_OK;
}

/* The profile's model at tensor-parallel degree tp (see the file comment for the assumption). */
static void scale_tp(const opts_t *o, const pds_slo_profile_t *p, int tp, pds_slo_model_t *m,
                     int64_t *kv_blocks)
{
    *m = p->m;
    double k = (double)tp / p->tp;
    if (k == 1) {
        *kv_blocks = p->kv_blocks;
        return;
    }
    double speed = k * pow(o->tp_eff, log2(k));
    double *coef[] = {&m->prefill_a, &m->prefill_b, &m->prefill_c, &m->decode_d, &m->decode_e,
                      &m->decode_f,  &m->decode_d2, &m->decode_e2, &m->decode_f2};
    for (size_t i = 0; i < PDS_ARRAY_LEN(coef); i++) *coef[i] /= speed;
    for (int i = 0; i < m->decode_knots; i++)
        m->decode_knot_base[i] /= speed, m->decode_knot_f[i] /= speed;
    double ar = tp > 1 ? 2.0 * (m->n_layers > 0 ? m->n_layers : 32) * o->tp_allreduce_us / 1000 : 0;
    m->prefill_a += ar, m->decode_d += ar;
    if (m->decode_split) m->decode_d2 += ar;
    for (int i = 0; i < m->decode_knots; i++) m->decode_knot_base[i] += ar;
    *kv_blocks = (int64_t)((double)p->kv_blocks * k);
}

typedef struct {
    const opts_t *o;
    int idx, total;
    const char *label;
} progress_t;

static void on_probe(void *ctx, double rate, const pds_slo_sim_result_t *r)
{
    progress_t *p = ctx;
    if (p->o->quiet || !isatty(STDERR_FILENO)) return;
    fprintf(stderr, "\r\033[K[%3d/%3d] %-34s probing %9.3f req/s: attainment %5.1f%%", p->idx,
            p->total, p->label, rate, 100 * r->attainment);
    fflush(stderr);
}

static void print_header(void)
{
    printf("%-24s %-9s %-9s %4s %9s %9s %9s | %8s %8s %8s | %7s %7s %7s\n", "mode", "prefill",
           "decode", "GPUs", "goodput", "per GPU", "$/h", "TTFT p50", "p90", "p99", "TPOT p50",
           "p90", "p99");
    printf("%-24s %-9s %-9s %4s %9s %9s %9s | %8s %8s %8s | %7s %7s %7s\n", "", "n x tp", "n x tp",
           "", "req/s", "req/s", "", "ms", "ms", "ms", "ms", "ms", "ms");
}

static void print_row(const row_t *r)
{
    char pre[16] = "-", dec[16], cost[16] = "-";
    if (r->mode == PDS_SLO_SIM_DISAGG) snprintf(pre, sizeof pre, "%d x %d", r->np, r->tp_p);
    snprintf(dec, sizeof dec, "%d x %d", r->nd, r->tp_d);
    if (r->cost_h >= 0) snprintf(cost, sizeof cost, "%.2f", r->cost_h);
    printf("%-24s %-9s %-9s %4d %9.3f %9.4f %9s | %8.1f %8.1f %8.1f | %7.2f %7.2f %7.2f\n",
           pds_slo_sim_mode_name(r->mode), pre, dec, r->gpus, r->rate, r->per_gpu, cost,
           r->at.ttft_p50, r->at.ttft_p90, r->at.ttft_p99, r->at.tpot_p50, r->at.tpot_p90,
           r->at.tpot_p99);
}

static double score(const row_t *r, bool by_cost)
{
    return by_cost ? r->per_dollar : r->per_gpu;
}

static int cmp_rows_gpu(const void *a, const void *b)
{
    double x = ((const row_t *)a)->per_gpu, y = ((const row_t *)b)->per_gpu;
    return (x < y) - (x > y);
}

static int cmp_rows_cost(const void *a, const void *b)
{
    double x = ((const row_t *)a)->per_dollar, y = ((const row_t *)b)->per_dollar;
    return (x < y) - (x > y);
}

/* ---- node config files -------------------------------------------------------------------------
 */
static pds_status_t write_node(const char *dir, const char *id, const char *role, int port,
                               const opts_t *o, const pds_slo_profile_t *p, int tp,
                               pds_slo_sim_mode_t mode)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s-%s.ini", dir, role, id);
    FILE *f = fopen(path, "w");
    if (!f) return PDS_ERR(PDS_ERR_IO, "cannot write %s: %m", path);
    pds_model_config_t mc;
    bool preset = pds_model_preset(p->model_name, &mc) == PDS_OK;
    pds_err_clear();
    fprintf(f, "; pdserve-%s configuration written by pdserve-plan (all keys: pdserve-%s --help)\n",
            strcmp(role, "prefill") == 0 ? "prefill" : "decode",
            strcmp(role, "prefill") == 0 ? "prefill" : "decode");
    fprintf(f, "; planned from a profile of %s on %s", p->model_name, p->device);
    if (tp > 1) fprintf(f, "; tensor parallel degree %d (planned: not a node setting yet)", tp);
    fprintf(f, "\n[node]\nid = %s\nrole = %s\nlisten = 0.0.0.0:%d\nrouter = %s\n\n", id, role, port,
            o->router);
    fprintf(f, "[model]\n");
    if (preset)
        fprintf(f, "; dir = /var/lib/pdserve/models/%s\npreset = %s\nseed = 1\n\n", p->model_name,
                p->model_name);
    else
        fprintf(f, "dir = /var/lib/pdserve/models/%s\n\n", p->model_name);
    fprintf(f, "[engine]\nbackend = %s\n", p->backend[0] ? p->backend : "cpu");
    if (p->threads > 0 && strcmp(p->backend, "cuda") != 0) fprintf(f, "threads = %d\n", p->threads);
    if (strcmp(role, "decode") != 0) fprintf(f, "max_batch_tokens = %d\n", p->max_batch_tokens);
    if (strcmp(role, "prefill") != 0) fprintf(f, "max_batch_seqs = %d\n", p->max_batch_seqs);
    if (strcmp(role, "colocated") == 0 && mode == PDS_SLO_SIM_COLOC_CHUNKED)
        fprintf(f,
                "\n[colocated]\n; chunked prefill (Sarathi-Serve): decodes + prompt chunks "
                "within %d tokens per step\nmode = chunked\nchunk_tokens = %d\n",
                o->chunk_tokens, o->chunk_tokens);
    else if (strcmp(role, "colocated") == 0)
        fprintf(f, "\n[colocated]\n; prefill-first (vLLM style)\nmode = prefill_first\n");
    fprintf(f, "\n[kvx]\nbackend = ucx\npath = am\nchecksum = true\ntimeout = 30s\n");
    bool bad = ferror(f);
    if (fclose(f) != 0 || bad) return PDS_ERR(PDS_ERR_IO, "cannot write %s", path);
    return PDS_OK;
}

static pds_status_t write_plan(const opts_t *o, const row_t *best, int copies,
                               const pds_slo_profile_t *pp, const pds_slo_profile_t *dp)
{
    const char *dir = o->out_dir;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return PDS_ERR(PDS_ERR_IO, "cannot create %s: %m", dir);
    bool disagg = best->mode == PDS_SLO_SIM_DISAGG;
    int np = disagg ? best->np * copies : 0, nd = best->nd * copies;
    char nodes[4096] = "";
    size_t len = 0;
    for (int i = 0; i < np; i++) {
        char id[16];
        snprintf(id, sizeof id, "p%d", i);
        PDS_TRY(write_node(dir, id, "prefill", 7200 + i, o, pp, best->tp_p, best->mode));
        len += (size_t)snprintf(nodes + len, len < sizeof nodes ? sizeof nodes - len : 0,
                                "%s127.0.0.1:%d", len ? "," : "", 7200 + i);
    }
    for (int i = 0; i < nd; i++) {
        char id[16];
        snprintf(id, sizeof id, "%s%d", disagg ? "d" : "c", i);
        PDS_TRY(write_node(dir, id, disagg ? "decode" : "colocated", 7300 + i, o, dp, best->tp_d,
                           best->mode));
        len += (size_t)snprintf(nodes + len, len < sizeof nodes ? sizeof nodes - len : 0,
                                "%s127.0.0.1:%d", len ? "," : "", 7300 + i);
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/router.ini", dir);
    FILE *f = fopen(path, "w");
    if (!f) return PDS_ERR(PDS_ERR_IO, "cannot write %s: %m", path);
    char shape[96];
    if (disagg)
        snprintf(shape, sizeof shape, "%d prefill x tp %d + %d decode x tp %d", np, best->tp_p, nd,
                 best->tp_d);
    else
        snprintf(shape, sizeof shape, "%d colocated x tp %d", nd, best->tp_d);
    fprintf(f,
            "; pdserve-router configuration written by pdserve-plan (all keys: pdserve-router "
            "--help)\n; plan: %s, %s; %.3f req/s with %.0f%% of requests within TTFT %.0f ms "
            "and TPOT %.0f ms (simulated)\n"
            "; nodes: the addresses assume one host; edit them for a real deployment\n",
            pds_slo_sim_mode_name(best->mode), shape, best->rate * copies, 100 * o->attainment,
            o->ttft_ms, o->tpot_ms);
    fprintf(f,
            "[router]\nid = router-0\nlisten = 0.0.0.0:%s\nworkers = 64\nreport_interval = "
            "200ms\nnode_timeout = 2s\nprefill_timeout = 120s\nplace_timeout = 60s\nnodes = "
            "%s\n\n[log]\nlevel = info\n",
            strrchr(o->router, ':') ? strrchr(o->router, ':') + 1 : "7100", nodes);
    bool bad = ferror(f);
    if (fclose(f) != 0 || bad) return PDS_ERR(PDS_ERR_IO, "cannot write %s", path);
    /* the plan itself, machine-readable, with magic and version like every pdserve file */
    snprintf(path, sizeof path, "%s/plan.json", dir);
    f = fopen(path, "w");
    if (!f) return PDS_ERR(PDS_ERR_IO, "cannot write %s: %m", path);
    fprintf(f,
            "{\n  \"magic\": \"pdserve-plan\",\n  \"version\": 1,\n  \"mode\": \"%s\",\n"
            "  \"workload\": \"%s\",\n  \"ttft_ms\": %g,\n  \"tpot_ms\": %g,\n"
            "  \"attainment\": %g,\n  \"prefill\": {\"nodes\": %d, \"tp\": %d, \"profile\": "
            "\"%s\"},\n  \"decode\": {\"nodes\": %d, \"tp\": %d, \"profile\": \"%s\"},\n"
            "  \"gpus\": %d,\n  \"goodput_rps\": %.6g,\n  \"goodput_per_gpu\": %.6g,\n"
            "  \"cost_per_hour\": %.6g,\n  \"ttft_ms_p50_p90_p99\": [%.3f, %.3f, %.3f],\n"
            "  \"tpot_ms_p50_p90_p99\": [%.3f, %.3f, %.3f]\n}\n",
            pds_slo_sim_mode_name(best->mode), o->workload, o->ttft_ms, o->tpot_ms, o->attainment,
            np, best->tp_p, pp->model_name, nd, best->tp_d, dp->model_name, best->gpus * copies,
            best->rate * copies, best->per_gpu, best->cost_h >= 0 ? best->cost_h * copies : -1,
            best->at.ttft_p50, best->at.ttft_p90, best->at.ttft_p99, best->at.tpot_p50,
            best->at.tpot_p90, best->at.tpot_p99);
    bad = ferror(f);
    if (fclose(f) != 0 || bad) return PDS_ERR(PDS_ERR_IO, "cannot write %s", path);
    return PDS_OK;
}

/* ---- search ------------------------------------------------------------------------------------
 */
static pds_status_t evaluate(const opts_t *o, pds_slo_sim_config_t *c, const pds_slo_workload_t *w,
                             const pds_slo_profile_t *pp, const pds_slo_profile_t *dp, row_t *row,
                             progress_t *pr)
{
    /* a starting rate well below capacity: 1/16 of what the prefill side alone could do */
    double mean_prompt =
        w->trace ? 0 : w->prompt_median * exp(0.5 * w->prompt_sigma * w->prompt_sigma);
    if (w->trace) {
        for (int i = 0; i < w->trace->n; i++) mean_prompt += w->trace->reqs[i].prompt_tokens;
        mean_prompt /= w->trace->n;
    }
    int n_pre = c->mode == PDS_SLO_SIM_DISAGG ? c->n_prefill : c->n_decode;
    double pre_ms = pds_slo_prefill_ms(&c->prefill_model, mean_prompt);
    double lo = pre_ms > 0 ? n_pre * 1000.0 / pre_ms / 16 : 0.1;
    if (lo < 1e-3) lo = 1e-3;
    double rate;
    pds_slo_sim_result_t at;
    PDS_TRY(pds_slo_goodput(c, w, o->requests, o->seed, o->attainment, lo, 0.02, &rate, &at,
                            on_probe, pr));
    if (rate == 0) {
        /* even a light load misses: try much lighter before giving up */
        PDS_TRY(pds_slo_goodput(c, w, o->requests, o->seed, o->attainment, lo / 256, 0.02, &rate,
                                &at, on_probe, pr));
    }
    row->rate = rate;
    row->at = at;
    row->per_gpu = rate / row->gpus;
    double cp = device_cost(o, pp->device), cd = device_cost(o, dp->device);
    row->cost_h = -1;
    if (c->mode == PDS_SLO_SIM_DISAGG && cp >= 0 && cd >= 0)
        row->cost_h = cp * row->np * row->tp_p + cd * row->nd * row->tp_d;
    else if (c->mode != PDS_SLO_SIM_DISAGG && cd >= 0)
        row->cost_h = cd * row->nd * row->tp_d;
    row->per_dollar = row->cost_h > 0 ? rate / row->cost_h : 0;
    return PDS_OK;
}

static int run(const opts_t *o)
{
    pds_slo_profile_t prof_p, prof_d;
    pds_slo_trace_t *trace = NULL;
    row_t *rows = NULL;
    int rc = 1;
    const char *pp_path = o->prefill_profile ? o->prefill_profile : o->profile;
    const char *dp_path = o->decode_profile ? o->decode_profile : o->profile;
    if (pds_slo_profile_load(pp_path, &prof_p) != PDS_OK ||
        pds_slo_profile_load(dp_path, &prof_d) != PDS_OK) {
        fprintf(stderr, "pdserve-plan: %s\n", pds_err_detail());
        return 1;
    }
    if (strcmp(prof_p.model_name, prof_d.model_name) != 0)
        fprintf(stderr, "pdserve-plan: warning: prefill profile is of %s, decode of %s\n",
                prof_p.model_name, prof_d.model_name);
    if (o->link_gbps >= 0) prof_p.m.link_gbytes_per_s = o->link_gbps / 8;
    if (o->link_msg_ms >= 0) prof_p.m.link_msg_ms = o->link_msg_ms;

    pds_slo_workload_t w;
    if (strncmp(o->workload, "trace:", 6) == 0) {
        if (pds_slo_trace_load(o->workload + 6, &trace) != PDS_OK) {
            fprintf(stderr, "pdserve-plan: %s\n", pds_err_detail());
            return 1;
        }
        w = (pds_slo_workload_t){
            .name = o->workload, .arrival = PDS_SLO_ARRIVAL_TRACE, .trace = trace};
        if (o->gamma) w.arrival = PDS_SLO_ARRIVAL_GAMMA, w.cv = o->cv;
    } else {
        if (pds_slo_workload_builtin(o->workload, &w) != PDS_OK) {
            fprintf(stderr, "pdserve-plan: %s\n", pds_err_detail());
            return 1;
        }
        if (o->gamma) w.arrival = PDS_SLO_ARRIVAL_GAMMA, w.cv = o->cv;
    }
    int32_t max_ctx = o->max_context;
    pds_model_config_t mc;
    if (!max_ctx && pds_model_preset(prof_d.model_name, &mc) == PDS_OK) max_ctx = mc.max_context;
    pds_err_clear();

    printf("pdserve-plan: %s on %s (prefill: %s; decode: %s)\n", o->workload, prof_d.model_name,
           prof_p.device, prof_d.device);
    printf("targets: TTFT %.0f ms, TPOT %.0f ms for %.0f%% of requests; budget %d GPUs (%d per "
           "node), search units up to %d GPUs; %d requests per probe, seed %llu\n",
           o->ttft_ms, o->tpot_ms, 100 * o->attainment, o->budget, o->per_node, o->max_unit,
           o->requests, (unsigned long long)o->seed);
    if (prof_p.m.link_gbytes_per_s <= 0)
        printf("note: no KV link bandwidth (profile or --link-gbps): transfers are modelled as "
               "free, which flatters disaggregation\n");
    if (o->n_tp > 1 || o->tp[0] != prof_p.tp || o->tp[0] != prof_d.tp)
        printf("note: tensor parallelism is scaled, not measured: coefficients / (k * %.2f^log2 "
               "k) + %.0f us x 2 x layers per step, KV capacity x k\n",
               o->tp_eff, o->tp_allreduce_us);

    /* count the configurations first so that the progress shows i/total */
    int total = 0;
    for (int a = 0; a < o->n_tp; a++)
        for (int b = 0; b < o->n_tp; b++) {
            int tp_p = o->tp[a], tp_d = o->tp[b];
            if (tp_p > o->per_node || tp_d > o->per_node) continue;
            for (int np = 1; np * tp_p + tp_d <= o->max_unit; np++)
                for (int nd = 1; np * tp_p + nd * tp_d <= o->max_unit; nd++) total++;
        }
    int n_coloc_modes = o->no_coloc ? 0 : 2;
    for (int b = 0; b < o->n_tp && n_coloc_modes; b++)
        if (o->tp[b] <= o->per_node)
            for (int nd = 1; nd * o->tp[b] <= o->max_unit; nd++) total += n_coloc_modes;
    if (total == 0) {
        fprintf(stderr, "pdserve-plan: no configuration fits: --tp degrees exceed --gpus-per-node "
                        "or the budget\n");
        goto out;
    }
    rows = pds_calloc((size_t)total, sizeof *rows);
    if (!rows) {
        fprintf(stderr, "pdserve-plan: out of memory\n");
        goto out;
    }
    int n_rows = 0;
    pds_slo_sim_config_t base = pds_slo_sim_default_config();
    base.ttft_ms = o->ttft_ms, base.tpot_ms = o->tpot_ms;
    base.max_context = max_ctx;
    base.place.policy = o->policy;
    base.chunk_tokens = o->chunk_tokens;
    base.block_size = prof_d.block_size;
    base.decode_max_batch_seqs = prof_d.max_batch_seqs;
    base.prefill_max_batch_tokens = prof_p.max_batch_tokens;
    progress_t pr = {.o = o, .total = total};
    char label[64];
    pr.label = label;
    for (int a = 0; a < o->n_tp; a++)
        for (int b = 0; b < o->n_tp; b++) {
            int tp_p = o->tp[a], tp_d = o->tp[b];
            if (tp_p > o->per_node || tp_d > o->per_node) continue;
            pds_slo_sim_config_t c = base;
            c.mode = PDS_SLO_SIM_DISAGG;
            int64_t kvp;
            scale_tp(o, &prof_p, tp_p, &c.prefill_model, &kvp);
            scale_tp(o, &prof_d, tp_d, &c.decode_model, &c.decode_kv_blocks);
            for (int np = 1; np * tp_p + tp_d <= o->max_unit; np++)
                for (int nd = 1; np * tp_p + nd * tp_d <= o->max_unit; nd++) {
                    c.n_prefill = np, c.n_decode = nd;
                    row_t *r = &rows[n_rows++];
                    *r = (row_t){.mode = c.mode,
                                 .np = np,
                                 .tp_p = tp_p,
                                 .nd = nd,
                                 .tp_d = tp_d,
                                 .gpus = np * tp_p + nd * tp_d};
                    pr.idx = n_rows;
                    snprintf(label, sizeof label, "disagg P %dx%d D %dx%d", np, tp_p, nd, tp_d);
                    if (evaluate(o, &c, &w, &prof_p, &prof_d, r, &pr) != PDS_OK) {
                        fprintf(stderr, "\npdserve-plan: %s: %s\n", label, pds_err_detail());
                        goto out;
                    }
                }
        }
    for (int b = 0; b < o->n_tp && n_coloc_modes; b++) {
        int tp = o->tp[b];
        if (tp > o->per_node) continue;
        for (int mi = 0; mi < n_coloc_modes; mi++) {
            pds_slo_sim_config_t c = base;
            c.mode = mi == 0 ? PDS_SLO_SIM_COLOC_PREFILL_FIRST : PDS_SLO_SIM_COLOC_CHUNKED;
            int64_t kvp;
            /* colocated instances run both phases on the decode profile's hardware */
            scale_tp(o, &prof_d, tp, &c.prefill_model, &kvp);
            scale_tp(o, &prof_d, tp, &c.decode_model, &c.decode_kv_blocks);
            c.prefill_model.link_gbytes_per_s = 0;
            for (int nd = 1; nd * tp <= o->max_unit; nd++) {
                c.n_decode = nd;
                row_t *r = &rows[n_rows++];
                *r = (row_t){.mode = c.mode, .nd = nd, .tp_d = tp, .gpus = nd * tp};
                pr.idx = n_rows;
                snprintf(label, sizeof label, "%s %dx%d",
                         mi == 0 ? "coloc prefill-first" : "coloc chunked", nd, tp);
                if (evaluate(o, &c, &w, &prof_d, &prof_d, r, &pr) != PDS_OK) {
                    fprintf(stderr, "\npdserve-plan: %s: %s\n", label, pds_err_detail());
                    goto out;
                }
            }
        }
    }
    if (!o->quiet && isatty(STDERR_FILENO)) fprintf(stderr, "\r\033[K");

    bool by_cost = true;
    for (int i = 0; i < n_rows; i++) by_cost &= rows[i].cost_h > 0;
    qsort(rows, (size_t)n_rows, sizeof *rows, by_cost ? cmp_rows_cost : cmp_rows_gpu);
    printf("\nsearched %d configurations; ranked by goodput per %s (at the goodput rate):\n",
           n_rows, by_cost ? "dollar" : "GPU");
    print_header();
    int shown = 0;
    const row_t *best_d = NULL, *best_c = NULL;
    for (int i = 0; i < n_rows; i++) {
        if (rows[i].mode == PDS_SLO_SIM_DISAGG && !best_d) best_d = &rows[i];
        if (rows[i].mode != PDS_SLO_SIM_DISAGG && !best_c) best_c = &rows[i];
        if (shown < 12) print_row(&rows[i]), shown++;
    }
    if (best_c && best_c - rows >= 12) print_row(best_c); /* always show the colocated baseline */
    if (best_d && best_d - rows >= 12) print_row(best_d);
    printf("\n");
    const row_t *best = &rows[0];
    if (best->rate <= 0) {
        printf("no configuration meets TTFT %.0f ms and TPOT %.0f ms for %.0f%% of requests at "
               "any rate: the targets are below what this hardware does for this workload even "
               "unloaded\n",
               o->ttft_ms, o->tpot_ms, 100 * o->attainment);
        rc = 3;
        goto out;
    }
    int copies = o->budget / best->gpus;
    if (best_d && best_c) {
        double sd = score(best_d, by_cost), sc = score(best_c, by_cost);
        if (best->mode != PDS_SLO_SIM_DISAGG)
            printf("Disaggregation does not pay for this workload: the best colocated setup "
                   "(%s, %d x tp %d) serves %.4f req/s per %s, the best disaggregated one "
                   "(%d prefill + %d decode) %.4f (%.0f%% of it).\n",
                   pds_slo_sim_mode_name(best_c->mode), best_c->nd, best_c->tp_d, sc,
                   by_cost ? "$/h" : "GPU", best_d->np, best_d->nd, sd, sc > 0 ? 100 * sd / sc : 0);
        else
            printf("Disaggregation pays: %d prefill x tp %d + %d decode x tp %d serves %.4f req/s "
                   "per %s, %.2fx the best colocated setup (%s, %.4f).\n",
                   best_d->np, best_d->tp_p, best_d->nd, best_d->tp_d, sd, by_cost ? "$/h" : "GPU",
                   sc > 0 ? sd / sc : INFINITY, pds_slo_sim_mode_name(best_c->mode), sc);
    }
    printf("plan: %d x [%s] = %d GPUs, about %.3f req/s within the targets", copies,
           best->mode == PDS_SLO_SIM_DISAGG ? "prefill + decode" : "colocated", copies * best->gpus,
           copies * best->rate);
    if (best->cost_h >= 0) printf(", %.2f $/h", copies * best->cost_h);
    printf(" (units of %d %s x tp %d", best->mode == PDS_SLO_SIM_DISAGG ? best->np : best->nd,
           best->mode == PDS_SLO_SIM_DISAGG ? "prefill" : "colocated",
           best->mode == PDS_SLO_SIM_DISAGG ? best->tp_p : best->tp_d);
    if (best->mode == PDS_SLO_SIM_DISAGG) printf(" + %d decode x tp %d", best->nd, best->tp_d);
    printf(")\n");
    if (o->out_dir) {
        if (write_plan(o, best, copies, &prof_p, &prof_d) != PDS_OK) {
            fprintf(stderr, "pdserve-plan: %s\n", pds_err_detail());
            goto out;
        }
        printf("wrote node configs, router.ini and plan.json to %s\n", o->out_dir);
    }
    rc = 0;
out:
    pds_free(rows);
    pds_slo_trace_destroy(trace);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "profile") == 0) {
#ifdef PDS_PLAN_PROFILER
        return plan_profile_main(argc - 1, argv + 1);
#else
        fprintf(stderr, "pdserve-plan: this build has no engine, so no profile subcommand\n");
        return 2;
#endif
    }
    if (argc > 1 && strcmp(argv[1], "simulate") == 0) return plan_simulate_main(argc - 1, argv + 1);
    opts_t o;
    if (parse_args(argc, argv, &o) != PDS_OK) {
        fprintf(stderr, "pdserve-plan: %s\n", pds_err_detail());
        usage(stderr);
        return 2;
    }
    return run(&o);
}

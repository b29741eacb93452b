/* plan_sim.c: `pdserve-plan simulate` — the planner's prediction for ONE given cluster at given
 * rates, in the form a measured run reports (attainment, TTFT and TPOT percentiles), so that a
 * prediction can be checked against `pdserve-bench load` on the real cluster.
 *
 * It draws the requests exactly as `pdserve-bench load` does (common/slo's generator with the same
 * workload, arrival process, length scale, context clip, seed and count or duration), simulates
 * them with pds_slo_sim_run on the profile's latency model, and prints one line per rate (JSON
 * with --json). What it cannot know is written in the report, not modelled here: the router's and
 * the transport's per-request overheads, and other processes on the same cores.
 */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plan/plan.h"
#include "slo/slo.h"

static void usage(FILE *f)
{
    fprintf(
        f, "usage: pdserve-plan simulate --profile P.json [--prefill-profile P] [--decode-profile "
           "D]\n"
           "         [--mode disagg|prefill-first|chunked] [--prefill N] [--decode M]\n"
           "         [--chunk-tokens 512] [--decode-kv-tokens K] [--max-batch-tokens T]\n"
           "         --workload fixed:P:O|chatbot|code|summarization|trace:FILE.csv\n"
           "         [--arrival poisson|gamma:CV|trace] [--length-scale F] [--max-context N]\n"
           "         --rates R1,R2,.. (--requests N | --duration S) [--seed 1]\n"
           "         [--ttft-ms X] [--tpot-ms Y] [--policy queue|best-effort|reject]\n"
           "         [--link-gbps X] [--link-msg-ms X] [--json FILE]\n"
           "         [--requests-csv FILE]\n"
           "Simulates the given cluster on the same requests `pdserve-bench load` sends with the\n"
           "same options and prints attainment and TTFT/TPOT percentiles per rate.\n"
           "--requests-csv writes one line per simulated request in the columns of `pdserve-bench\n"
           "load --requests-csv`, so the two can be compared request by request.\n");
}

typedef struct {
    const char *profile, *pp, *dp, *workload, *arrival, *json, *req_csv;
    int mode, np, nd, chunk, requests, max_ctx, max_batch_tokens;
    int64_t kv_tokens;
    double duration, scale, ttft, tpot, link_gbps, link_msg_ms, rates[64];
    int n_rates;
    uint64_t seed;
    pds_slo_policy_t policy;
} sim_opts_t;

/* One CSV line per request; the simulator names no nodes, and a rejected request has ttft < 0. */
static void write_requests(FILE *f, double rate, const pds_slo_req_t *reqs, int n,
                           const double *ttft, const double *tpot, double ttft_target,
                           double tpot_target)
{
    for (int i = 0; i < n; i++) {
        int ok = ttft[i] >= 0;
        int met = ok && (ttft_target <= 0 || ttft[i] <= ttft_target) &&
                  (tpot_target <= 0 || tpot[i] <= tpot_target);
        fprintf(f, "sim,%.4f,%d,%.2f,%d,%d,%s,%.3f,%.4f,%d,,\n", rate, i, reqs[i].arrival_ms,
                reqs[i].prompt_tokens, reqs[i].output_tokens, ok ? "ok" : "rejected",
                ok ? ttft[i] : 0.0, ok ? tpot[i] : 0.0, met);
    }
}

static pds_status_t parse(int argc, char **argv, sim_opts_t *o)
{
    static const struct option opts[] = {{"profile", required_argument, 0, 'P'},
                                         {"prefill-profile", required_argument, 0, 'A'},
                                         {"decode-profile", required_argument, 0, 'D'},
                                         {"mode", required_argument, 0, 'M'},
                                         {"prefill", required_argument, 0, 'p'},
                                         {"decode", required_argument, 0, 'd'},
                                         {"chunk-tokens", required_argument, 0, 'k'},
                                         {"decode-kv-tokens", required_argument, 0, 'K'},
                                         {"max-batch-tokens", required_argument, 0, 'B'},
                                         {"workload", required_argument, 0, 'w'},
                                         {"arrival", required_argument, 0, 'r'},
                                         {"length-scale", required_argument, 0, 'S'},
                                         {"max-context", required_argument, 0, 'm'},
                                         {"rates", required_argument, 0, 'R'},
                                         {"requests", required_argument, 0, 'n'},
                                         {"duration", required_argument, 0, 'u'},
                                         {"seed", required_argument, 0, 's'},
                                         {"ttft-ms", required_argument, 0, 't'},
                                         {"tpot-ms", required_argument, 0, 'T'},
                                         {"policy", required_argument, 0, 'y'},
                                         {"link-gbps", required_argument, 0, 'l'},
                                         {"link-msg-ms", required_argument, 0, 'L'},
                                         {"json", required_argument, 0, 'j'},
                                         {"requests-csv", required_argument, 0, 'Q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    *o = (sim_opts_t){.np = 1,
                      .nd = 1,
                      .chunk = 512,
                      .scale = 1,
                      .seed = 1,
                      .link_gbps = -1,
                      .link_msg_ms = -1,
                      .policy = PDS_SLO_POLICY_QUEUE};
    int seed = 1;
    optind = 1;
    for (int c; (c = getopt_long(argc, argv, "h", opts, NULL)) != -1;) {
        switch (c) {
        case 'P':
            o->profile = optarg;
            break;
        case 'A':
            o->pp = optarg;
            break;
        case 'D':
            o->dp = optarg;
            break;
        case 'M':
            if (strcmp(optarg, "disagg") == 0)
                o->mode = PDS_SLO_SIM_DISAGG;
            else if (strcmp(optarg, "prefill-first") == 0)
                o->mode = PDS_SLO_SIM_COLOC_PREFILL_FIRST;
            else if (strcmp(optarg, "chunked") == 0)
                o->mode = PDS_SLO_SIM_COLOC_CHUNKED;
            else
                return PDS_ERR(PDS_ERR_INVALID_ARG, "--mode '%s': disagg, prefill-first or chunked",
                               optarg);
            break;
        case 'p':
            PDS_TRY(plan_parse_int(optarg, "--prefill", 1, 4096, &o->np));
            break;
        case 'd':
            PDS_TRY(plan_parse_int(optarg, "--decode", 1, 4096, &o->nd));
            break;
        case 'k':
            PDS_TRY(plan_parse_int(optarg, "--chunk-tokens", 1, 1 << 20, &o->chunk));
            break;
        case 'K': {
            int v;
            PDS_TRY(plan_parse_int(optarg, "--decode-kv-tokens", 1, 1 << 30, &v));
            o->kv_tokens = v;
            break;
        }
        case 'B':
            PDS_TRY(plan_parse_int(optarg, "--max-batch-tokens", 1, 1 << 20, &o->max_batch_tokens));
            break;
        case 'w':
            o->workload = optarg;
            break;
        case 'r':
            o->arrival = optarg;
            break;
        case 'S':
            PDS_TRY(plan_parse_double(optarg, "--length-scale", 1e-6, 1e6, &o->scale));
            break;
        case 'm':
            PDS_TRY(plan_parse_int(optarg, "--max-context", 0, 1 << 24, &o->max_ctx));
            break;
        case 'R': {
            char buf[1024];
            snprintf(buf, sizeof buf, "%s", optarg);
            o->n_rates = 0;
            for (char *sv = NULL, *t = strtok_r(buf, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
                if (o->n_rates == 64)
                    return PDS_ERR(PDS_ERR_INVALID_ARG, "--rates: at most 64 rates");
                PDS_TRY(plan_parse_double(t, "--rates", 1e-6, 1e9, &o->rates[o->n_rates++]));
            }
            break;
        }
        case 'n':
            PDS_TRY(plan_parse_int(optarg, "--requests", 1, 1000000, &o->requests));
            break;
        case 'u':
            PDS_TRY(plan_parse_double(optarg, "--duration", 1e-3, 1e7, &o->duration));
            break;
        case 's':
            PDS_TRY(plan_parse_int(optarg, "--seed", 0, 1 << 30, &seed));
            o->seed = (uint64_t)seed;
            break;
        case 't':
            PDS_TRY(plan_parse_double(optarg, "--ttft-ms", 0, 1e9, &o->ttft));
            break;
        case 'T':
            PDS_TRY(plan_parse_double(optarg, "--tpot-ms", 0, 1e9, &o->tpot));
            break;
        case 'y':
            PDS_TRY(pds_slo_policy_parse(optarg, &o->policy));
            break;
        case 'l':
            PDS_TRY(plan_parse_double(optarg, "--link-gbps", 0, 1e6, &o->link_gbps));
            break;
        case 'L':
            PDS_TRY(plan_parse_double(optarg, "--link-msg-ms", 0, 1e6, &o->link_msg_ms));
            break;
        case 'j':
            o->json = optarg;
            break;
        case 'Q':
            o->req_csv = optarg;
            break;
        case 'h':
            usage(stdout);
            return PDS_AGAIN;
        default:
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "unknown option (see pdserve-plan simulate --help)");
        }
    }
    if (optind < argc)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unexpected argument '%s'", argv[optind]);
    if (!o->profile && !(o->pp && o->dp))
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "--profile (or --prefill-profile and --decode-profile)");
    if (!o->workload) return PDS_ERR(PDS_ERR_INVALID_ARG, "--workload is required");
    if (o->n_rates == 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "--rates is required");
    if (!o->requests == !(o->duration > 0))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "give either --requests N or --duration S");
    return PDS_OK;
}

/* The workload as pdserve-bench load builds it (fixed:P:O = fixed lengths). */
static pds_status_t workload(const sim_opts_t *o, pds_slo_workload_t *w, pds_slo_trace_t **trace)
{
    *trace = NULL;
    int p, q;
    char tail;
    if (sscanf(o->workload, "fixed:%d:%d%c", &p, &q, &tail) == 2 && p > 0 && q > 0) {
        *w = (pds_slo_workload_t){.name = "fixed",
                                  .arrival = PDS_SLO_ARRIVAL_POISSON,
                                  .cv = 1,
                                  .prompt_median = p,
                                  .prompt_min = p,
                                  .prompt_max = p,
                                  .output_median = q,
                                  .output_min = q,
                                  .output_max = q};
    } else if (strncmp(o->workload, "trace:", 6) == 0) {
        PDS_TRY(pds_slo_trace_load(o->workload + 6, trace));
        *w = (pds_slo_workload_t){
            .name = o->workload, .arrival = PDS_SLO_ARRIVAL_TRACE, .cv = 1, .trace = *trace};
    } else {
        PDS_TRY(pds_slo_workload_builtin(o->workload, w));
    }
    w->length_scale = o->scale;
    if (o->arrival) {
        if (strcmp(o->arrival, "poisson") == 0) {
            w->arrival = PDS_SLO_ARRIVAL_POISSON;
        } else if (strncmp(o->arrival, "gamma:", 6) == 0) {
            w->arrival = PDS_SLO_ARRIVAL_GAMMA;
            PDS_TRY(plan_parse_double(o->arrival + 6, "--arrival gamma:CV", 1e-6, 1e6, &w->cv));
        } else if (!(strcmp(o->arrival, "trace") == 0 && *trace)) {
            return PDS_ERR(PDS_ERR_INVALID_ARG, "--arrival '%s': poisson, gamma:CV or trace",
                           o->arrival);
        }
    }
    return PDS_OK;
}

int plan_simulate_main(int argc, char **argv)
{
    sim_opts_t o;
    pds_status_t s = parse(argc, argv, &o);
    if (s == PDS_AGAIN) return 0;
    if (s != PDS_OK) {
        fprintf(stderr, "pdserve-plan simulate: %s\n", pds_err_detail());
        return 2;
    }
    pds_slo_profile_t pp, dp;
    pds_slo_workload_t w;
    pds_slo_trace_t *trace = NULL;
    if (pds_slo_profile_load(o.pp ? o.pp : o.profile, &pp) != PDS_OK ||
        pds_slo_profile_load(o.dp ? o.dp : o.profile, &dp) != PDS_OK ||
        workload(&o, &w, &trace) != PDS_OK) {
        fprintf(stderr, "pdserve-plan simulate: %s\n", pds_err_detail());
        pds_slo_trace_destroy(trace);
        return 2;
    }
    if (o.link_gbps >= 0) pp.m.link_gbytes_per_s = o.link_gbps / 8;
    if (o.link_msg_ms >= 0) pp.m.link_msg_ms = o.link_msg_ms;
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.mode = (pds_slo_sim_mode_t)o.mode;
    c.n_prefill = o.np;
    c.n_decode = o.nd;
    c.prefill_model = c.mode == PDS_SLO_SIM_DISAGG ? pp.m : dp.m;
    if (c.mode != PDS_SLO_SIM_DISAGG) c.prefill_model.link_gbytes_per_s = 0;
    c.decode_model = dp.m;
    c.prefill_max_batch_tokens = o.max_batch_tokens ? o.max_batch_tokens : pp.max_batch_tokens;
    c.chunk_tokens = o.chunk;
    c.decode_max_batch_seqs = dp.max_batch_seqs;
    c.block_size = dp.block_size;
    c.decode_kv_blocks =
        o.kv_tokens ? PDS_DIV_UP(o.kv_tokens, (int64_t)dp.block_size) : dp.kv_blocks;
    c.ttft_ms = o.ttft;
    c.tpot_ms = o.tpot;
    c.max_context = o.max_ctx;
    c.place.policy = o.policy;
    printf("simulate: %s, %d prefill + %d decode (%s), workload %s, length scale %g, max context "
           "%d, seed %llu, targets TTFT %.0f ms TPOT %.1f ms, policy %s\n",
           pds_slo_sim_mode_name(c.mode), c.mode == PDS_SLO_SIM_DISAGG ? o.np : 0, o.nd, dp.device,
           w.name, o.scale, o.max_ctx, (unsigned long long)o.seed, o.ttft, o.tpot,
           pds_slo_policy_name(o.policy));
    printf("%9s %6s %9s %9s %9s %9s %9s %9s %9s %9s\n", "rate", "n", "attain", "ttft_p50",
           "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99", "req/s");
    FILE *jf = NULL;
    if (o.json && !(jf = fopen(o.json, "w"))) {
        fprintf(stderr, "pdserve-plan simulate: cannot write %s\n", o.json);
        pds_slo_trace_destroy(trace);
        return 1;
    }
    if (jf)
        fprintf(jf,
                "{\"magic\": \"pdserve-sim\", \"version\": 1, \"mode\": \"%s\", \"prefill\": %d, "
                "\"decode\": %d, \"workload\": \"%s\", \"length_scale\": %g, \"seed\": %llu, "
                "\"ttft_target_ms\": %g, \"tpot_target_ms\": %g, \"runs\": [",
                pds_slo_sim_mode_name(c.mode), o.np, o.nd, w.name, o.scale,
                (unsigned long long)o.seed, o.ttft, o.tpot);
    FILE *qf = NULL;
    if (o.req_csv && !(qf = fopen(o.req_csv, "w"))) {
        fprintf(stderr, "pdserve-plan simulate: cannot write %s\n", o.req_csv);
        if (jf) fclose(jf);
        pds_slo_trace_destroy(trace);
        return 1;
    }
    if (qf)
        fprintf(qf, "label,rate,index,arrival_ms,prompt_tokens,output_tokens,status,ttft_ms,"
                    "tpot_ms,met,prefill_node,decode_node\n");
    int rc = 0;
    for (int k = 0; k < o.n_rates; k++) {
        double rate = o.rates[k];
        int n = o.requests ? o.requests : (int)ceil(rate * o.duration * 2 + 16);
        pds_slo_req_t *reqs = pds_malloc(sizeof *reqs * (size_t)n);
        if (!reqs) {
            rc = 1;
            break;
        }
        pds_slo_sim_result_t r;
        s = pds_slo_workload_generate(&w, rate, n, o.seed, o.max_ctx, reqs);
        if (s == PDS_OK && !o.requests) { /* the arrivals within --duration, as the bench */
            int m = 0;
            while (m < n && reqs[m].arrival_ms <= o.duration * 1000.0) m++;
            n = m;
        }
        double *ttft = qf ? pds_malloc(sizeof *ttft * (size_t)n * 2) : NULL;
        if (qf && !ttft) s = PDS_ERR(PDS_ERR_NO_MEMORY, "per-request results for %d requests", n);
        if (s == PDS_OK) s = pds_slo_sim_run(&c, reqs, n, &r, ttft, ttft ? ttft + n : NULL);
        if (s == PDS_OK && qf) write_requests(qf, rate, reqs, n, ttft, ttft + n, o.ttft, o.tpot);
        pds_free(ttft);
        pds_free(reqs);
        if (s != PDS_OK) {
            fprintf(stderr, "pdserve-plan simulate: %s\n", pds_err_detail());
            rc = 1;
            break;
        }
        printf("%9.3f %6d %8.1f%% %9.1f %9.1f %9.1f %9.2f %9.2f %9.2f %9.3f\n", rate, n,
               100 * r.attainment, r.ttft_p50, r.ttft_p90, r.ttft_p99, r.tpot_p50, r.tpot_p90,
               r.tpot_p99, r.throughput_rps);
        if (jf)
            fprintf(jf,
                    "%s\n  {\"rate\": %g, \"n\": %d, \"attainment\": %.4f, \"ttft_ms\": {\"mean\": "
                    "%.3f, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}, \"tpot_ms\": {\"mean\": "
                    "%.4f, \"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f}, \"throughput_rps\": "
                    "%.4f, \"rejected\": %d}",
                    k ? "," : "", rate, n, r.attainment, r.ttft_mean, r.ttft_p50, r.ttft_p90,
                    r.ttft_p99, r.tpot_mean, r.tpot_p50, r.tpot_p90, r.tpot_p99, r.throughput_rps,
                    r.n_rejected);
    }
    if (jf) {
        fprintf(jf, "\n]}\n");
        if (fclose(jf) != 0) rc = 1;
    }
    if (qf && fclose(qf) != 0) rc = 1;
    pds_slo_trace_destroy(trace);
    return rc;
}

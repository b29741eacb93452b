/* plan_profile.c: `pdserve-plan profile` — measures a node's engine and writes its latency profile.
 *
 * It sweeps prefill over token counts (one sequence per forward, fresh KV each time) and decode
 * over batch x context: for decode the KV tables are grown to the context without computing them,
 * since a step's time depends on how much KV it reads, not on what the KV holds, and filling 16 x
 * 1k contexts by real prefill would cost more than the whole sweep. The decode sweep starts with
 * 30 untimed steps (a decode node steps back to back; a CPU right after the prefill sweep is
 * slower for dozens of steps). Each point is measured `reps` times after one warm-up and the
 * median is the sample the fit sees: a shared machine's stray
 * slow run (another process's burst) then moves nothing, and the printed fit error is the model's
 * error on typical timings; the min and max printed beside each median show the noise. The link is
 * not measured here (the engine has no peer): pass
 * --link-gbps / --link-msg-ms with what the cluster's KV transport achieves, or leave it 0.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "model/model.h"
#include "plan/plan.h"
#include "slo/slo.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: pdserve-plan profile --preset NAME [--backend cpu|cuda] [--threads N]\n"
               "         [--kv-tokens N] [--reps N] [--max-prompt N] [--batches 1,2,4,...]\n"
               "         [--contexts 128,512,...] [--link-gbps X] [--link-msg-ms X] --out FILE\n"
               "Sweeps prefill token counts and decode batch x context on the engine, fits the\n"
               "latency model, prints the fit error and writes the profile JSON.\n");
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static pds_status_t parse_list(const char *s, int *out, int cap, int *n)
{
    *n = 0;
    for (const char *p = s; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 1 << 20 || *n == cap)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "list '%s': expected up to %d integers >= 1", s,
                           cap);
        out[(*n)++] = (int)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return PDS_ERR(PDS_ERR_INVALID_ARG, "list '%s': unexpected '%c'", s, *end);
    }
    return *n ? PDS_OK : PDS_ERR(PDS_ERR_INVALID_ARG, "list '%s' is empty", s);
}

/* One forward of `n` sequences each adding `add` tokens; returns ms. */
static pds_status_t timed_forward(pds_engine_t *e, pds_kv_seq_t *kv, int n, int add,
                                  int32_t *tokens, double *ms)
{
    pds_engine_seq_t *seqs = pds_calloc((size_t)n, sizeof *seqs);
    if (!seqs) return PDS_ERR(PDS_ERR_NO_MEMORY, "profile: batch of %d", n);
    for (int i = 0; i < n; i++)
        seqs[i] =
            (pds_engine_seq_t){.tokens = tokens + (size_t)i * add, .n_tokens = add, .kv = &kv[i]};
    double t0 = pds_time_now_ms();
    pds_status_t s = pds_engine_forward(e, seqs, n, NULL, NULL);
    *ms = pds_time_now_ms() - t0;
    pds_free(seqs);
    return s;
}

int plan_profile_main(int argc, char **argv)
{
    static const struct option opts[] = {{"preset", required_argument, 0, 'p'},
                                         {"backend", required_argument, 0, 'b'},
                                         {"threads", required_argument, 0, 't'},
                                         {"kv-tokens", required_argument, 0, 'k'},
                                         {"reps", required_argument, 0, 'r'},
                                         {"max-prompt", required_argument, 0, 'm'},
                                         {"batches", required_argument, 0, 'B'},
                                         {"contexts", required_argument, 0, 'C'},
                                         {"link-gbps", required_argument, 0, 'l'},
                                         {"link-msg-ms", required_argument, 0, 'L'},
                                         {"out", required_argument, 0, 'o'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *preset = NULL, *out = NULL;
    pds_engine_params_t ep = pds_engine_default_params();
    int reps = 5, max_prompt = 2048, batches[16] = {1, 2, 4, 8, 16}, n_batches = 5;
    int contexts[16] = {128, 512, 1024}, n_contexts = 3;
    double link_gbps = 0, link_msg_ms = 0;
    optind = 1;
    for (int c; (c = getopt_long(argc, argv, "h", opts, NULL)) != -1;) {
        pds_status_t s = PDS_OK;
        switch (c) {
        case 'p':
            preset = optarg;
            break;
        case 'b':
            if (strcmp(optarg, "cpu") == 0)
                ep.backend = PDS_ENGINE_CPU;
            else if (strcmp(optarg, "cuda") == 0)
                ep.backend = PDS_ENGINE_CUDA;
            else
                s = PDS_ERR(PDS_ERR_INVALID_ARG, "--backend %s: cpu or cuda", optarg);
            break;
        case 't':
            s = plan_parse_int(optarg, "--threads", 0, 1024, &ep.n_threads);
            break;
        case 'k': {
            int v;
            s = plan_parse_int(optarg, "--kv-tokens", 1, 1 << 30, &v);
            ep.kv_tokens = v;
            break;
        }
        case 'r':
            s = plan_parse_int(optarg, "--reps", 1, 100, &reps);
            break;
        case 'm':
            s = plan_parse_int(optarg, "--max-prompt", 16, 1 << 20, &max_prompt);
            break;
        case 'B':
            s = parse_list(optarg, batches, 16, &n_batches);
            break;
        case 'C':
            s = parse_list(optarg, contexts, 16, &n_contexts);
            break;
        case 'l':
            s = plan_parse_double(optarg, "--link-gbps", 0, 1e6, &link_gbps);
            break;
        case 'L':
            s = plan_parse_double(optarg, "--link-msg-ms", 0, 1e6, &link_msg_ms);
            break;
        case 'o':
            out = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (s != PDS_OK) {
            fprintf(stderr, "pdserve-plan profile: %s\n", pds_err_detail());
            return 2;
        }
    }
    if (!preset || !out) {
        fprintf(stderr, "pdserve-plan profile: --preset and --out are required\n");
        usage(stderr);
        return 2;
    }
    pds_model_config_t cfg;
    if (pds_model_preset(preset, &cfg) != PDS_OK) {
        fprintf(stderr, "pdserve-plan profile: %s\n", pds_err_detail());
        return 2;
    }
    if (max_prompt > ep.max_batch_tokens) ep.max_batch_tokens = max_prompt;
    pds_engine_t *e = NULL;
    if (pds_engine_create_synth(&cfg, 1, &ep, &e) != PDS_OK) {
        fprintf(stderr, "pdserve-plan profile: engine: %s\n", pds_err_detail());
        return 1;
    }
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    int bs = info.kv.block_size;
    pds_kv_pool_t *pool = pds_engine_kv_pool(e);
    int max_b = 1, max_l = 1;
    for (int i = 0; i < n_batches; i++) max_b = PDS_MAX(max_b, batches[i]);
    for (int i = 0; i < n_contexts; i++) max_l = PDS_MAX(max_l, contexts[i]);
    int n_pre_pts = 0;
    for (int T = 16; T <= max_prompt; T *= 2) n_pre_pts++;
    int rc = 1;
    size_t tok_n = (size_t)PDS_MAX(max_prompt, max_b);
    int32_t *tokens = pds_malloc(sizeof(int32_t) * tok_n);
    pds_kv_seq_t *kv = pds_calloc((size_t)max_b, sizeof *kv);
    pds_slo_prefill_sample_t *ps = pds_calloc((size_t)(n_pre_pts * reps), sizeof *ps);
    pds_slo_decode_sample_t *ds = pds_calloc((size_t)(n_batches * n_contexts * reps), sizeof *ds);
    double *rep_ms = pds_calloc((size_t)reps + 8, sizeof(double));
    int n_ps = 0, n_ds = 0;
    if (!tokens || !kv || !ps || !ds || !rep_ms) {
        fprintf(stderr, "pdserve-plan profile: out of memory\n");
        goto out;
    }
    for (size_t i = 0; i < tok_n; i++) tokens[i] = (int32_t)(pds_mix64(i) % (uint64_t)cfg.vocab);
    for (int i = 0; i < max_b; i++) pds_kv_seq_init(&kv[i]);
    printf("profiling %s on %s, KV pool %lld tokens\n", preset, info.device_name,
           (long long)info.kv_tokens);

    printf("prefill: tokens -> median ms over %d reps\n", reps);
    for (int T = 16; T <= max_prompt; T *= 2) {
        for (int r = -1; r < reps; r++) { /* r = -1: warm-up */
            double ms = 0;
            pds_status_t s = pds_kv_seq_grow(&kv[0], pool, bs, T, NULL);
            if (s == PDS_OK) s = timed_forward(e, kv, 1, T, tokens, &ms);
            pds_kv_seq_release(&kv[0], pool);
            if (s != PDS_OK) {
                fprintf(stderr, "pdserve-plan profile: prefill of %d: %s\n", T, pds_err_detail());
                goto out;
            }
            if (r >= 0) rep_ms[r] = ms;
        }
        qsort(rep_ms, (size_t)reps, sizeof *rep_ms, cmp_double);
        ps[n_ps++] = (pds_slo_prefill_sample_t){T, rep_ms[reps / 2]};
        printf("  %6d  %9.3f  (min %.3f, max %.3f)\n", T, rep_ms[reps / 2], rep_ms[0],
               rep_ms[reps - 1]);
        fflush(stdout);
    }

    /* A decode node steps back to back; right after the prefill sweep the first few dozen
     * one-sequence steps on a CPU run up to ~40% slower than later ones (measured on the 2-vCPU
     * VM: 7.1 ms for the first five against 5.0 steady), which one warm-up step per point does not
     * cover. So the sweep starts from a steady engine: 30 steps first, not timed as samples. */
    {
        double first = 0, last = 0;
        pds_status_t s = pds_kv_seq_grow(&kv[0], pool, bs, 64, NULL);
        for (int r = 0; r < 30 && s == PDS_OK; r++) {
            s = pds_kv_seq_grow(&kv[0], pool, bs, 1, NULL);
            if (s == PDS_OK) s = timed_forward(e, kv, 1, 1, tokens, r == 0 ? &first : &last);
        }
        pds_kv_seq_release(&kv[0], pool);
        if (s != PDS_OK) {
            fprintf(stderr, "pdserve-plan profile: decode warm-up: %s\n", pds_err_detail());
            goto out;
        }
        printf("decode warm-up: 30 steps of one sequence, first %.3f ms, last %.3f ms\n", first,
               last);
    }
    printf("decode: batch x context -> median step ms over %d reps\n", reps);
    for (int bi = 0; bi < n_batches; bi++)
        for (int ci = 0; ci < n_contexts; ci++) {
            int B = batches[bi], L = contexts[ci];
            if ((int64_t)B * (L + reps + 2) > info.kv_tokens - bs * B ||
                L + reps + 2 > cfg.max_context || B > info.max_batch_seqs) {
                printf("  %4d x %5d  skipped (KV pool or limits)\n", B, L);
                continue;
            }
            pds_status_t s = PDS_OK;
            double ctx = 0;
            for (int i = 0; i < B && s == PDS_OK; i++)
                s = pds_kv_seq_grow(&kv[i], pool, bs, L, NULL);
            for (int r = -1; r < reps && s == PDS_OK; r++) {
                double ms = 0;
                for (int i = 0; i < B && s == PDS_OK; i++)
                    s = pds_kv_seq_grow(&kv[i], pool, bs, 1, NULL);
                if (s == PDS_OK) s = timed_forward(e, kv, B, 1, tokens, &ms);
                if (s == PDS_OK && r >= 0) {
                    rep_ms[r] = ms;
                    if (r == reps / 2) /* the middle step's context stands for the point */
                        for (int i = 0; i < B; i++) ctx += kv[i].n_tokens;
                }
            }
            for (int i = 0; i < B; i++) pds_kv_seq_release(&kv[i], pool);
            if (s != PDS_OK) {
                fprintf(stderr, "pdserve-plan profile: decode %d x %d: %s\n", B, L,
                        pds_err_detail());
                goto out;
            }
            qsort(rep_ms, (size_t)reps, sizeof *rep_ms, cmp_double);
            ds[n_ds++] = (pds_slo_decode_sample_t){B, ctx, rep_ms[reps / 2]};
            printf("  %4d x %5d  %9.3f  (min %.3f, max %.3f)\n", B, L, rep_ms[reps / 2], rep_ms[0],
                   rep_ms[reps - 1]);
            fflush(stdout);
        }

    pds_slo_profile_t prof;
    pds_slo_profile_init(&prof);
    snprintf(prof.model_name, sizeof prof.model_name, "%s", preset);
    snprintf(prof.device, sizeof prof.device, "%s", info.device_name);
    snprintf(prof.backend, sizeof prof.backend, "%s",
             info.backend == PDS_ENGINE_CUDA ? "cuda" : "cpu");
    prof.threads = ep.n_threads;
    if (pds_slo_fit_prefill(ps, n_ps, &prof.m, &prof.prefill_fit) != PDS_OK ||
        pds_slo_fit_decode(ds, n_ds, true, &prof.m, &prof.decode_fit) != PDS_OK) {
        fprintf(stderr, "pdserve-plan profile: fit: %s\n", pds_err_detail());
        goto out;
    }
    prof.m.link_gbytes_per_s = link_gbps / 8;
    prof.m.link_msg_ms = link_msg_ms;
    prof.m.n_layers = cfg.n_layers;
    prof.m.kv_bytes_per_token =
        (int64_t)2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * info.kv.elem_size;
    prof.block_size = bs;
    prof.kv_blocks = info.kv_tokens / bs;
    prof.max_batch_tokens = 8192; /* the node's default budget, not the sweep's */
    prof.max_batch_seqs = info.max_batch_seqs;
    printf("fit: prefill = %.4g + %.4g*T + %.4g*T^2 ms   (RMS rel err %.2f%%, R^2 %.5f, %d "
           "samples)\n",
           prof.m.prefill_a, prof.m.prefill_b, prof.m.prefill_c, 100 * prof.prefill_fit.rms_rel,
           prof.prefill_fit.r2, prof.prefill_fit.n);
    printf("fit: decode  = %.4g + %.4g*B + %.4g*C ms", prof.m.decode_d, prof.m.decode_e,
           prof.m.decode_f);
    if (prof.m.decode_split)
        printf(" (B <= %d), %.4g + %.4g*B + %.4g*C (B > %d)", prof.m.decode_split, prof.m.decode_d2,
               prof.m.decode_e2, prof.m.decode_f2, prof.m.decode_split);
    if (prof.m.decode_knots) {
        printf(" as a summary; the step is the table (one line per batch, linear in B between):\n");
        for (int i = 0; i < prof.m.decode_knots; i++)
            printf("        B=%-4g %.4g + %.4g*C ms\n", prof.m.decode_knot_batch[i],
                   prof.m.decode_knot_base[i], prof.m.decode_knot_f[i]);
        printf("       ");
    }
    printf("   (RMS rel err %.2f%%, R^2 %.5f, %d samples)\n", 100 * prof.decode_fit.rms_rel,
           prof.decode_fit.r2, prof.decode_fit.n);
    if (link_gbps <= 0)
        printf("note: no --link-gbps given: the profile models KV transfer as free\n");
    if (pds_slo_profile_save(&prof, out) != PDS_OK) {
        fprintf(stderr, "pdserve-plan profile: %s\n", pds_err_detail());
        goto out;
    }
    printf("wrote %s\n", out);
    rc = 0;
out:
    if (kv)
        for (int i = 0; i < max_b; i++) pds_kv_seq_release(&kv[i], pool), pds_kv_seq_fini(&kv[i]);
    pds_free(tokens), pds_free(kv), pds_free(ps), pds_free(ds), pds_free(rep_ms);
    pds_engine_destroy(e);
    return rc;
}

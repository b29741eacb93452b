/* bench_engine_cuda.c: the CUDA engine against the hardware floor — `pdserve-bench engine-cuda`
 * (meant to serve `pdserve-bench engine --backend cuda`; also built standalone as
 * pdserve-bench-cuda). It measures the two ceilings first on this GPU (device-to-device copy rate,
 * bf16 GEMM rate through cuBLASLt at 8192^3), then TTFT at batch 1 for each prompt length and the
 * decode step at each batch size with a fixed context, each divided by its floor:
 *   prefill floor = FLOPs (linear layers + causal attention + LM head of the last token) / GEMM
 * rate decode floor  = (weight bytes read per step + KV bytes read) / copy rate. The KV of the
 * decode sequences is produced by real prefills of pseudo-random prompts. Timing: the monotonic
 * clock around the engine call, which synchronises because a token is sampled.
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"

#ifdef PDS_HAVE_CUDA
#include "engine/cuda/engine_cuda.h"

int pds_bench_engine_cuda_main(int argc, char **argv);

#define MAXP 16

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
static int parse_list(const char *s, int *out, int cap)
{
    int n = 0;
    while (*s && n < cap) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static void fill_prompt(int32_t *t, int n, int vocab, uint64_t salt)
{
    for (int i = 0; i < n; i++)
        t[i] = (int32_t)(pds_mix64(salt * 7919 + (uint64_t)i) % (uint64_t)vocab);
}

int pds_bench_engine_cuda_main(int argc, char **argv)
{
    const char *preset = "llama3-8b", *out_path = NULL;
    int lens[MAXP] = {128, 512, 1024, 2048, 4096, 8192}, n_lens = 6;
    int batches[MAXP] = {1, 8, 32, 64, 128, 256}, n_batches = 6;
    int context = 1024, steps = 16, repeat = 3;
    float mem_frac = 0.9f;
    static struct option lo[] = {
        {"preset", required_argument, 0, 'p'},          {"prompt-lens", required_argument, 0, 'l'},
        {"decode-batches", required_argument, 0, 'b'},  {"context", required_argument, 0, 'c'},
        {"decode-steps", required_argument, 0, 's'},    {"repeat", required_argument, 0, 'r'},
        {"kv-mem-fraction", required_argument, 0, 'f'}, {"out", required_argument, 0, 'o'},
        {"backend", required_argument, 0, 'B'},         {0, 0, 0, 0}};
    int ch;
    setvbuf(stdout, NULL, _IOLBF, 0); /* lines reach a log even if the run is cut short */
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'p':
            preset = optarg;
            break;
        case 'l':
            n_lens = parse_list(optarg, lens, MAXP);
            break;
        case 'b':
            n_batches = parse_list(optarg, batches, MAXP);
            break;
        case 'c':
            context = atoi(optarg);
            break;
        case 's':
            steps = atoi(optarg);
            break;
        case 'r':
            repeat = atoi(optarg);
            break;
        case 'f':
            mem_frac = (float)atof(optarg);
            break;
        case 'o':
            out_path = optarg;
            break;
        case 'B':
            break; /* always cuda here */
        default:
            fprintf(stderr,
                    "usage: %s [--preset P] [--prompt-lens L] [--decode-batches B] "
                    "[--context N] [--decode-steps N] [--repeat N] [--out F]\n",
                    argv[0]);
            return 2;
        }
    }
    if (n_lens < 0 || n_batches < 0 || context < 1 || steps < 1 || repeat < 1) {
        fprintf(stderr, "%s: bad option value\n", argv[0]);
        return 2;
    }
    char why[200];
    if (!pds_engine_cuda_available(why, sizeof why)) {
        fprintf(stderr, "%s: no GPU: %s\n", argv[0], why);
        return 1;
    }
    pds_model_config_t cfg;
    if (pds_model_preset(preset, &cfg) != PDS_OK) {
        fprintf(stderr, "%s: unknown preset %s\n", argv[0], preset);
        return 2;
    }
    /* floors */
    double bw = 0, mm = 0;
    pds_status_t s = pds_engine_cuda_measure_bandwidth(0, (size_t)2 << 30, 20, &bw);
    if (s == PDS_OK) s = pds_engine_cuda_measure_gemm(0, 8192, 8192, 8192, 20, &mm);
    if (s != PDS_OK) {
        fprintf(stderr, "floors: %s (%s at %s)\n", pds_status_name(s), pds_err_detail(),
                pds_err_where());
        return 1;
    }
    printf("floors: copy %.0f GB/s (read+write), bf16 GEMM 8192^3 %.1f TFLOP/s\n", bw / 1e9,
           mm / 1e12);

    int maxlen = 0;
    for (int i = 0; i < n_lens; i++) maxlen = PDS_MAX(maxlen, lens[i]);
    pds_engine_params_t p = pds_engine_default_params();
    p.backend = PDS_ENGINE_CUDA;
    p.max_batch_tokens = PDS_MAX(8192, maxlen);
    p.max_batch_seqs = 256;
    p.kv_mem_fraction = mem_frac;
    pds_engine_t *e = NULL;
    double t0 = pds_time_now_ms();
    s = pds_engine_create_synth(&cfg, 0, &p, &e);
    if (s != PDS_OK) {
        fprintf(stderr, "create: %s (%s at %s)\n", pds_status_name(s), pds_err_detail(),
                pds_err_where());
        return 1;
    }
    double create_ms = pds_time_now_ms() - t0;
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    int64_t used = 0, total = 0;
    pds_engine_cuda_memory(0, &used, &total);
    int tuned = 0;
    double tune_ms = 0;
    pds_engine_cuda_tune_stats(e, &tuned, &tune_ms);
    printf("engine: %d GEMM shapes tuned at creation in %.0f ms\n", tuned, tune_ms);
    printf("engine: %s, %s, create %.0f ms; weights %.2f GB, KV pool %lld tokens (%.2f GB), "
           "workspace %.2f GB; GPU memory in use %.2f of %.2f GB\n",
           info.device_name, preset, create_ms, info.weight_bytes / 1e9, (long long)info.kv_tokens,
           info.kv_bytes / 1e9, info.workspace_bytes / 1e9, used / 1e9, total / 1e9);

    const int64_t L = cfg.n_layers, H = cfg.n_heads, KV = cfg.n_kv_heads, hd = cfg.head_dim;
    const int64_t hid = cfg.hidden;
    double lin_per_tok =
        2.0 * L * (double)(hid * (H + 2 * KV) * hd + H * hd * hid + 3 * hid * cfg.ffn);
    double head_flops = 2.0 * (double)cfg.vocab * hid;
    double kv_tok_bytes = (double)L * 2 * KV * hd * 2;
    double embed_bytes = (double)cfg.vocab * hid * 2;
    double w_step = (double)info.weight_bytes - (cfg.tied_embeddings ? 0 : embed_bytes);
    int bs = info.kv.block_size;
    pds_kv_pool_t *pool = pds_engine_kv_pool(e);
    json_t *jt = json_array(), *jd = json_array();
    pds_sample_params_t greedy = pds_sample_default_params();

    printf("\n%-8s %10s %10s %8s\n", "prompt", "TTFT ms", "floor ms", "ratio");
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)PDS_MAX(maxlen, 8192));
    for (int li = 0; li < n_lens; li++) {
        int n = lens[li];
        double ms[32];
        int reps = PDS_MIN(repeat, 32);
        for (int r = -1; r < reps; r++) { /* r = -1: warm-up */
            pds_kv_seq_t kv;
            pds_kv_seq_init(&kv);
            fill_prompt(prompt, n, cfg.vocab, (uint64_t)(r + 2) * 1000 + (uint64_t)n);
            int32_t tok;
            double a = pds_time_now_ms();
            s = pds_kv_seq_grow(&kv, pool, bs, n, NULL);
            pds_engine_seq_t q = {
                .tokens = prompt, .n_tokens = n, .kv = &kv, .sample = &greedy, .token_out = &tok};
            if (s == PDS_OK) s = pds_engine_forward(e, &q, 1, NULL, NULL);
            double b = pds_time_now_ms();
            pds_kv_seq_release(&kv, pool);
            pds_kv_seq_fini(&kv);
            if (s != PDS_OK) {
                fprintf(stderr, "prefill %d: %s (%s at %s)\n", n, pds_status_name(s),
                        pds_err_detail(), pds_err_where());
                return 1;
            }
            if (r >= 0) ms[r] = b - a;
            if (r < 0) pds_engine_cuda_profile_report(e, "", NULL); /* drop the warm-up */
        }
        char lab[64];
        snprintf(lab, sizeof lab, "prefill %d", n);
        pds_engine_cuda_profile_report(e, lab, stdout);
        double med = median(ms, reps);
        double flops = lin_per_tok * n + 4.0 * L * H * hd * ((double)n * (n + 1) / 2) + head_flops;
        double floor_ms = flops / mm * 1e3;
        printf("%-8d %10.2f %10.2f %8.2f\n", n, med, floor_ms, med / floor_ms);
        json_array_append_new(jt, json_pack("{s:i, s:f, s:f, s:f, s:f}", "prompt", n, "ttft_ms",
                                            med, "floor_ms", floor_ms, "ratio", med / floor_ms,
                                            "tflops", flops / (med * 1e-3) / 1e12));
    }

    printf("\n%-6s %8s %12s %10s %8s %10s\n", "batch", "context", "step ms", "floor ms", "ratio",
           "tok/s");
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        if ((int64_t)B * (context + steps + 8) > info.kv_tokens || B > p.max_batch_seqs) {
            printf("%-6d skipped: %d x %d tokens do not fit the pool or batch limit\n", B, B,
                   context);
            continue;
        }
        pds_kv_seq_t *kv = calloc((size_t)B, sizeof *kv);
        int32_t *next = malloc(sizeof(int32_t) * (size_t)B);
        pds_engine_seq_t *q = calloc((size_t)B, sizeof *q);
        /* prefill the contexts, as many sequences per forward as max_batch_tokens allows */
        int per = PDS_MAX(1, p.max_batch_tokens / context);
        int32_t *ctxp = malloc(sizeof(int32_t) * (size_t)context * (size_t)PDS_MIN(per, B));
        for (int i0 = 0; i0 < B && s == PDS_OK; i0 += per) {
            int nb = PDS_MIN(per, B - i0);
            for (int j = 0; j < nb; j++) {
                int i = i0 + j;
                pds_kv_seq_init(&kv[i]);
                fill_prompt(ctxp + (size_t)j * context, context, cfg.vocab, 5000 + (uint64_t)i);
                s = pds_kv_seq_grow(&kv[i], pool, bs, context, NULL);
                q[j] = (pds_engine_seq_t){.tokens = ctxp + (size_t)j * context,
                                          .n_tokens = context,
                                          .kv = &kv[i],
                                          .sample = &greedy,
                                          .token_out = &next[i]};
            }
            if (s == PDS_OK) s = pds_engine_forward(e, q, nb, NULL, NULL);
        }
        double ms[256];
        int nst = PDS_MIN(steps, 256);
        for (int st = -3; st < nst && s == PDS_OK; st++) { /* 3 warm-up steps (graph capture) */
            double a = pds_time_now_ms();
            for (int i = 0; i < B && s == PDS_OK; i++) {
                s = pds_kv_seq_grow(&kv[i], pool, bs, 1, NULL);
                q[i] = (pds_engine_seq_t){.tokens = &next[i],
                                          .n_tokens = 1,
                                          .kv = &kv[i],
                                          .sample = &greedy,
                                          .token_out = &next[i]};
            }
            if (s == PDS_OK) s = pds_engine_forward(e, q, B, NULL, NULL);
            double b = pds_time_now_ms();
            if (st >= 0) ms[st] = b - a;
            if (st < 0) pds_engine_cuda_profile_report(e, "", NULL); /* drop prefill, warm-up */
        }
        char lab[64];
        snprintf(lab, sizeof lab, "decode batch %d", B);
        pds_engine_cuda_profile_report(e, lab, stdout);
        if (s != PDS_OK) {
            fprintf(stderr, "decode B=%d: %s (%s at %s)\n", B, pds_status_name(s), pds_err_detail(),
                    pds_err_where());
            return 1;
        }
        double med = median(ms, nst);
        double ctx_mid = context + 3 + nst / 2.0;
        double bytes = w_step + B * ctx_mid * kv_tok_bytes;
        double floor_ms = bytes / bw * 1e3;
        printf("%-6d %8d %12.3f %10.3f %8.2f %10.0f\n", B, context, med, floor_ms, med / floor_ms,
               B / (med * 1e-3));
        json_array_append_new(jd, json_pack("{s:i, s:i, s:f, s:f, s:f, s:f, s:f}", "batch", B,
                                            "context", context, "step_ms", med, "floor_ms",
                                            floor_ms, "ratio", med / floor_ms, "tokens_per_s",
                                            B / (med * 1e-3), "bytes_per_step", bytes));
        for (int i = 0; i < B; i++) {
            pds_kv_seq_release(&kv[i], pool);
            pds_kv_seq_fini(&kv[i]);
        }
        free(kv), free(next), free(q), free(ctxp);
    }
    int64_t used2 = 0;
    pds_engine_cuda_memory(0, &used2, &total);
    json_t *root = json_pack(
        "{s:s, s:s, s:s, s:{s:f, s:f}, s:{s:f, s:I, s:f, s:f, s:f, s:f}, s:o, s:o}", "backend",
        "cuda", "device", info.device_name, "preset", preset, "floors", "copy_GBps", bw / 1e9,
        "gemm_bf16_TFLOPs", mm / 1e12, "memory", "weights_GB", info.weight_bytes / 1e9,
        "kv_pool_tokens", (json_int_t)info.kv_tokens, "kv_pool_GB", info.kv_bytes / 1e9,
        "workspace_GB", info.workspace_bytes / 1e9, "gpu_used_after_create_GB", used / 1e9,
        "gpu_used_at_end_GB", used2 / 1e9, "ttft", jt, "decode", jd);
    json_object_set_new(root, "create",
                        json_pack("{s:f, s:i, s:f}", "create_ms", create_ms, "gemm_shapes_tuned",
                                  tuned, "tune_ms", tune_ms));
    if (out_path && json_dump_file(root, out_path, JSON_INDENT(2)) != 0)
        fprintf(stderr, "could not write %s\n", out_path);
    json_decref(root);
    free(prompt);
    pds_engine_destroy(e);
    return 0;
}
#endif /* PDS_HAVE_CUDA */

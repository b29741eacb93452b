/* bench_engine.c: `pdserve-bench engine` — how fast one engine prefills and decodes, the two
 * numbers the SLO model is built from. Prefill: one forward of an L-token prompt, first token
 * sampled (TTFT without queueing), median of --repeat runs. Decode: B sequences each holding
 * --context tokens step together; each timed step is one batched forward of B new tokens (TPOT at
 * batch B).
 *
 * Prompt tokens are pseudo-random bytes from a fixed seed: speed does not depend on the values,
 * and the run is repeatable. Everything is timed with the monotonic clock around the engine call
 * alone (block-table growth included, it is part of a real step).
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "engine/engine.h"

#define MAX_POINTS 32

typedef struct {
    const char *model_dir, *preset, *out_path;
    uint64_t seed;
    pds_engine_params_t ep;
    int prompt_lens[MAX_POINTS], n_prompt_lens;
    int batches[MAX_POINTS], n_batches;
    int context, steps, repeat;
    bool json;
} opts_t;

static void usage(FILE *f)
{
    fprintf(f, "usage: pdserve-bench engine [options]\n"
               "  --preset NAME          synthetic model preset (default small)\n"
               "  --model DIR            load a model directory instead\n"
               "  --seed N               synthetic weight seed (default 0)\n"
               "  --backend cpu|cuda     (default cpu)\n"
               "  --threads N            CPU threads (default: all cores)\n"
               "  --prompt-lens LIST     prefill lengths (default 128,512,1024)\n"
               "  --decode-batches LIST  decode batch sizes (default 1,8,32)\n"
               "  --context N            tokens per sequence before decode (default 512)\n"
               "  --decode-steps N       timed decode steps per batch size (default 16)\n"
               "  --repeat N             prefill runs per length, median reported (default 3)\n"
               "  --json                 print the JSON report instead of the table\n"
               "  --out FILE             also write the JSON report to FILE\n");
}

static int parse_args(int argc, char **argv, opts_t *o)
{
    enum {
        O_PRESET = 256,
        O_MODEL,
        O_SEED,
        O_BACKEND,
        O_THREADS,
        O_PLENS,
        O_BATCHES,
        O_CONTEXT,
        O_STEPS,
        O_REPEAT,
        O_JSON,
        O_OUT,
        O_HELP
    };
    static const struct option lo[] = {{"preset", required_argument, 0, O_PRESET},
                                       {"model", required_argument, 0, O_MODEL},
                                       {"seed", required_argument, 0, O_SEED},
                                       {"backend", required_argument, 0, O_BACKEND},
                                       {"threads", required_argument, 0, O_THREADS},
                                       {"prompt-lens", required_argument, 0, O_PLENS},
                                       {"decode-batches", required_argument, 0, O_BATCHES},
                                       {"context", required_argument, 0, O_CONTEXT},
                                       {"decode-steps", required_argument, 0, O_STEPS},
                                       {"repeat", required_argument, 0, O_REPEAT},
                                       {"json", no_argument, 0, O_JSON},
                                       {"out", required_argument, 0, O_OUT},
                                       {"help", no_argument, 0, O_HELP},
                                       {0, 0, 0, 0}};
    int one[1], n, c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        bool ok = true;
        switch (c) {
        case O_PRESET:
            o->preset = optarg;
            break;
        case O_MODEL:
            o->model_dir = optarg;
            break;
        case O_SEED:
            ok = pds_bench_parse_list(optarg, 0, 1 << 30, one, 1, &n);
            o->seed = (uint64_t)one[0];
            break;
        case O_BACKEND:
            ok = strcmp(optarg, "cpu") == 0 || strcmp(optarg, "cuda") == 0;
            o->ep.backend = strcmp(optarg, "cuda") == 0 ? PDS_ENGINE_CUDA : PDS_ENGINE_CPU;
            break;
        case O_THREADS:
            ok = pds_bench_parse_list(optarg, 0, 4096, one, 1, &n);
            o->ep.n_threads = one[0];
            break;
        case O_PLENS:
            ok = pds_bench_parse_list(optarg, 1, 1 << 20, o->prompt_lens, MAX_POINTS,
                                      &o->n_prompt_lens);
            break;
        case O_BATCHES:
            ok = pds_bench_parse_list(optarg, 1, 1 << 16, o->batches, MAX_POINTS, &o->n_batches);
            break;
        case O_CONTEXT:
            ok = pds_bench_parse_list(optarg, 1, 1 << 20, &o->context, 1, &n);
            break;
        case O_STEPS:
            ok = pds_bench_parse_list(optarg, 1, 1 << 20, &o->steps, 1, &n);
            break;
        case O_REPEAT:
            ok = pds_bench_parse_list(optarg, 1, 1000, &o->repeat, 1, &n);
            break;
        case O_JSON:
            o->json = true;
            break;
        case O_OUT:
            o->out_path = optarg;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "%s: bad value '%s' for --%s\n", argv[0], optarg,
                    lo[c - O_PRESET].name);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", argv[0], argv[optind]);
        return 2;
    }
    if (o->model_dir && o->preset) {
        fprintf(stderr, "%s: give --model or --preset, not both\n", argv[0]);
        return 2;
    }
    return -1; /* go on */
}

static void fill_tokens(int32_t *t, int n, uint64_t salt)
{
    for (int i = 0; i < n; i++) t[i] = (int32_t)(pds_mix64(salt * 7919u + (uint64_t)i) % 256);
}

static int report_error(const char *argv0, pds_status_t s, const char *what)
{
    fprintf(stderr, "%s: %s: %s: %s\n", argv0, what, pds_status_text(s), pds_err_detail());
    return 1;
}

/* One prefill of n tokens (in max_batch_tokens chunks), first token sampled; returns ms. */
static pds_status_t prefill(pds_engine_t *e, const int32_t *toks, int n, int chunk,
                            pds_kv_seq_t *kv, int32_t *first, double *ms)
{
    pds_sample_params_t g = pds_sample_default_params();
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    double t0 = pds_time_now_ms();
    for (int done = 0; done < n;) {
        int m = PDS_MIN(chunk, n - done);
        PDS_TRY(pds_kv_seq_grow(kv, pds_engine_kv_pool(e), info.kv.block_size, m, NULL));
        bool last = done + m == n;
        pds_engine_seq_t s = {.tokens = toks + done,
                              .n_tokens = m,
                              .kv = kv,
                              .sample = last ? &g : NULL,
                              .token_out = last ? first : NULL};
        PDS_TRY(pds_engine_forward(e, &s, 1, NULL, NULL));
        done += m;
    }
    *ms = pds_time_now_ms() - t0;
    return PDS_OK;
}

static pds_status_t bench_prefill(pds_engine_t *e, const opts_t *o, int len, int chunk, json_t *arr,
                                  double *median_out)
{
    int32_t *toks = pds_malloc(sizeof(int32_t) * (size_t)len);
    double *ms = pds_malloc(sizeof(double) * (size_t)o->repeat);
    pds_status_t s = PDS_OK;
    if (!toks || !ms) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "bench: prompt of %d tokens", len);
        goto out;
    }
    fill_tokens(toks, len, (uint64_t)len);
    double best = 1e300;
    for (int r = 0; r < o->repeat && s == PDS_OK; r++) {
        pds_kv_seq_t kv;
        pds_kv_seq_init(&kv);
        int32_t first;
        s = prefill(e, toks, len, chunk, &kv, &first, &ms[r]);
        best = PDS_MIN(best, ms[r]);
        pds_kv_seq_release(&kv, pds_engine_kv_pool(e));
        pds_kv_seq_fini(&kv);
    }
    if (s != PDS_OK) goto out;
    double med = pds_bench_median(ms, o->repeat);
    *median_out = med;
    json_array_append_new(arr, json_pack("{s:i, s:i, s:f, s:f, s:f}", "tokens", len, "runs",
                                         o->repeat, "ttft_ms_median", med, "ttft_ms_min", best,
                                         "tok_s", len / (med / 1e3)));
out:
    pds_free(ms);
    pds_free(toks);
    return s;
}

static pds_status_t bench_decode(pds_engine_t *e, const opts_t *o, int batch, int chunk,
                                 json_t *arr, double *median_out)
{
    pds_kv_seq_t *kv = pds_calloc((size_t)batch, sizeof *kv);
    pds_engine_seq_t *seqs = pds_calloc((size_t)batch, sizeof *seqs);
    int32_t *cur = pds_calloc((size_t)batch, sizeof(int32_t));
    int32_t *next = pds_calloc((size_t)batch, sizeof(int32_t));
    int32_t *toks = pds_malloc(sizeof(int32_t) * (size_t)o->context);
    double *ms = pds_malloc(sizeof(double) * (size_t)o->steps);
    pds_sample_params_t g = pds_sample_default_params();
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    pds_status_t s = PDS_OK;
    int made = 0;
    if (!kv || !seqs || !cur || !next || !toks || !ms) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "bench: decode batch of %d", batch);
        goto out;
    }
    for (; made < batch && s == PDS_OK; made++) {
        pds_kv_seq_init(&kv[made]);
        fill_tokens(toks, o->context, 1000003u + (uint64_t)made);
        double t;
        s = prefill(e, toks, o->context, chunk, &kv[made], &cur[made], &t);
    }
    /* One untimed step, then the timed ones. */
    for (int step = -1; step < o->steps && s == PDS_OK; step++) {
        double t0 = pds_time_now_ms();
        for (int i = 0; i < batch && s == PDS_OK; i++) {
            s = pds_kv_seq_grow(&kv[i], pds_engine_kv_pool(e), info.kv.block_size, 1, NULL);
            seqs[i] = (pds_engine_seq_t){.tokens = &cur[i],
                                         .n_tokens = 1,
                                         .kv = &kv[i],
                                         .sample = &g,
                                         .token_out = &next[i]};
        }
        if (s == PDS_OK) s = pds_engine_forward(e, seqs, batch, NULL, NULL);
        if (step >= 0) ms[step] = pds_time_now_ms() - t0;
        memcpy(cur, next, sizeof(int32_t) * (size_t)batch);
    }
    if (s != PDS_OK) goto out;
    double sum = 0;
    for (int i = 0; i < o->steps; i++) sum += ms[i];
    double med = pds_bench_median(ms, o->steps);
    *median_out = med;
    json_array_append_new(arr,
                          json_pack("{s:i, s:i, s:i, s:f, s:f, s:f}", "batch", batch, "context",
                                    o->context, "steps", o->steps, "step_ms_median", med,
                                    "step_ms_mean", sum / o->steps, "tok_s", batch / (med / 1e3)));
out:
    for (int i = 0; kv && i < made; i++) {
        pds_kv_seq_release(&kv[i], pds_engine_kv_pool(e));
        pds_kv_seq_fini(&kv[i]);
    }
    pds_free(ms);
    pds_free(toks);
    pds_free(next);
    pds_free(cur);
    pds_free(seqs);
    pds_free(kv);
    return s;
}

static json_t *machine_json(int threads)
{
    char cpu[256];
    pds_bench_cpu_name(cpu, sizeof cpu);
    return json_pack("{s:s, s:i, s:i}", "cpu", cpu, "nproc", (int)sysconf(_SC_NPROCESSORS_ONLN),
                     "threads", threads);
}

int pds_bench_engine_main(int argc, char **argv)
{
    opts_t o = {.ep = pds_engine_default_params(),
                .prompt_lens = {128, 512, 1024},
                .n_prompt_lens = 3,
                .batches = {1, 8, 32},
                .n_batches = 3,
                .context = 512,
                .steps = 16,
                .repeat = 3};
    int rc = parse_args(argc, argv, &o);
    if (rc >= 0) return rc;
    if (!o.model_dir && !o.preset) o.preset = "small";

    /* ---- model and engine: pool sized for the largest decode batch at full length ---- */
    pds_model_config_t cfg;
    pds_model_t *model = NULL;
    pds_status_t s;
    if (o.model_dir) {
        s = pds_model_load(o.model_dir, &model);
        if (s != PDS_OK) return report_error(argv[0], s, "loading the model");
        cfg = *pds_model_config(model);
    } else {
        s = pds_model_preset(o.preset, &cfg);
        if (s != PDS_OK) return report_error(argv[0], s, "preset");
    }
    int max_len = 0, max_batch = 0;
    for (int i = 0; i < o.n_prompt_lens; i++) max_len = PDS_MAX(max_len, o.prompt_lens[i]);
    for (int i = 0; i < o.n_batches; i++) max_batch = PDS_MAX(max_batch, o.batches[i]);
    int per_seq = o.context + o.steps + 2;
    if (max_len > cfg.max_context || per_seq > cfg.max_context) {
        pds_model_destroy(model);
        fprintf(stderr, "%s: prompt length %d / context %d exceed the model's %d tokens\n", argv[0],
                max_len, per_seq, cfg.max_context);
        return 2;
    }
    int bs = o.ep.block_size;
    o.ep.kv_tokens = PDS_MAX((int64_t)PDS_DIV_UP(max_len, bs) * bs,
                             (int64_t)max_batch * PDS_DIV_UP(per_seq, bs) * bs);
    o.ep.max_batch_seqs = PDS_MAX(o.ep.max_batch_seqs, max_batch);
    int chunk = o.ep.max_batch_tokens;

    double t0 = pds_time_now_ms();
    pds_engine_t *e = NULL;
    if (model)
        s = pds_engine_create(model, &o.ep, &e);
    else
        s = pds_engine_create_synth(&cfg, o.seed, &o.ep, &e);
    pds_model_destroy(model);
    if (s != PDS_OK) return report_error(argv[0], s, "creating the engine");
    double create_ms = pds_time_now_ms() - t0;
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    int threads = o.ep.n_threads ? o.ep.n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);

    if (!o.json)
        printf("engine bench: %s (%.1fM params, %s) on %s, engine ready in %.0f ms\n",
               info.model.name, pds_model_config_param_count(&info.model) / 1e6,
               pds_dtype_name(info.model.dtype), info.device_name, create_ms);

    json_t *pre = json_array(), *dec = json_array();
    /* Warm-up: first-touch of workspace and BLAS thread start-up are not what we measure. */
    {
        int32_t w[64], first;
        double t;
        fill_tokens(w, 64, 99);
        pds_kv_seq_t kv;
        pds_kv_seq_init(&kv);
        s = prefill(e, w, PDS_MIN(64, max_len), chunk, &kv, &first, &t);
        pds_kv_seq_release(&kv, pds_engine_kv_pool(e));
        pds_kv_seq_fini(&kv);
    }
    if (!o.json && s == PDS_OK) printf("%-10s %12s %12s\n", "prefill", "TTFT ms", "tok/s");
    for (int i = 0; i < o.n_prompt_lens && s == PDS_OK; i++) {
        double med = 0;
        s = bench_prefill(e, &o, o.prompt_lens[i], chunk, pre, &med);
        if (s == PDS_OK && !o.json)
            printf("%-10d %12.2f %12.1f\n", o.prompt_lens[i], med, o.prompt_lens[i] / (med / 1e3));
        fflush(stdout);
    }
    if (!o.json && s == PDS_OK)
        printf("%-10s %12s %12s   (context %d, %d steps)\n", "decode", "step ms", "tok/s",
               o.context, o.steps);
    for (int i = 0; i < o.n_batches && s == PDS_OK; i++) {
        double med = 0;
        s = bench_decode(e, &o, o.batches[i], chunk, dec, &med);
        if (s == PDS_OK && !o.json)
            printf("%-10d %12.2f %12.1f\n", o.batches[i], med, o.batches[i] / (med / 1e3));
        fflush(stdout);
    }
    if (s != PDS_OK) {
        json_decref(pre);
        json_decref(dec);
        pds_engine_destroy(e);
        return report_error(argv[0], s, "benchmark");
    }

    /* The command line, for the report. */
    size_t cl = 0;
    for (int i = 0; i < argc; i++) cl += strlen(argv[i]) + 1;
    char *cmd = pds_malloc(cl + 1);
    rc = 1;
    if (cmd) {
        cmd[0] = '\0';
        for (int i = 0; i < argc; i++) {
            strcat(cmd, argv[i]);
            if (i + 1 < argc) strcat(cmd, " ");
        }
        json_t *root = json_pack(
            "{s:s, s:s, s:o, s:{s:s, s:I, s:s, s:i, s:i}, s:{s:s, s:s, s:I, s:I, s:f}, s:o, s:o}",
            "bench", "engine", "command", cmd, "machine", machine_json(threads), "model", "name",
            info.model.name, "params", (json_int_t)pds_model_config_param_count(&info.model),
            "dtype", pds_dtype_name(info.model.dtype), "layers", info.model.n_layers, "hidden",
            info.model.hidden, "engine", "backend",
            info.backend == PDS_ENGINE_CUDA ? "cuda" : "cpu", "device", info.device_name,
            "weight_bytes", (json_int_t)info.weight_bytes, "kv_bytes", (json_int_t)info.kv_bytes,
            "create_ms", create_ms, "prefill", pre, "decode", dec);
        pre = dec = NULL;
        if (root) {
            rc = 0;
            if (o.json) {
                json_dumpf(root, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
                fputc('\n', stdout);
            }
            if (o.out_path &&
                json_dump_file(root, o.out_path, JSON_INDENT(2) | JSON_REAL_PRECISION(6)) != 0) {
                fprintf(stderr, "%s: cannot write %s\n", argv[0], o.out_path);
                rc = 1;
            }
            json_decref(root);
        } else {
            fprintf(stderr, "%s: could not build the JSON report\n", argv[0]);
        }
    }
    json_decref(pre);
    json_decref(dec);
    pds_free(cmd);
    pds_engine_destroy(e);
    return rc;
}

/* pdserve-generate: the single-process reference — load (or synthesize) a model, run one prompt
 * through pds_engine_generate, stream the text and report prefill and decode speed. What it prints
 * for a (model, seed, prompt, sampling) is what the disaggregated cluster must reproduce token for
 * token, so it does no batching or scheduling of its own.
 *
 * The KV pool is sized to this one request (prompt + max tokens) rather than the engine default,
 * so the demo model starts in a fraction of a second on a laptop.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "tok/tok.h"

#define MAX_LIST 4096

static void usage(FILE *f)
{
    fprintf(f, "usage: pdserve-generate (--model DIR | --preset NAME [--seed N])\n"
               "                        (--prompt TEXT | --tokens ID,ID,...) [options]\n"
               "  --max-tokens N        tokens to generate (default 64)\n"
               "  --temperature T       0 = greedy (default 0)\n"
               "  --top-k K             0 = no limit (default 0)\n"
               "  --top-p P             (0, 1] (default 1)\n"
               "  --sample-seed N       sampling seed (default 0)\n"
               "  --stop ID,...         extra stop token ids\n"
               "  --ignore-eos          keep generating past EOS\n"
               "  --backend cpu|cuda    engine backend (default cpu)\n"
               "  --threads N           CPU threads (default: all cores)\n"
               "  --json                print tokens, text and timings as one JSON object\n"
               "presets:");
    for (const char *const *p = pds_model_preset_names(); *p; p++) fprintf(f, " %s", *p);
    fprintf(f, "\n");
}

static int fail(pds_status_t s, const char *what)
{
    fprintf(stderr, "pdserve-generate: %s: %s: %s\n", what, pds_status_text(s), pds_err_detail());
    return 1;
}

static int bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "pdserve-generate: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see --help)\n");
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

static bool parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end) return false;
    *out = v;
    return true;
}

/* "1,2,3" -> ids; false on any malformed or out-of-int32 element. */
static bool parse_ids(const char *s, int32_t *ids, int cap, int *n)
{
    *n = 0;
    char *copy = pds_strdup(s), *save = NULL;
    bool ok = copy != NULL;
    for (char *t = copy ? strtok_r(copy, ",", &save) : NULL; ok && t;
         t = strtok_r(NULL, ",", &save)) {
        long long v;
        if (*n >= cap || !parse_i64(t, -2147483648LL, 2147483647LL, &v))
            ok = false;
        else
            ids[(*n)++] = (int32_t)v;
    }
    pds_free(copy);
    return ok && *n > 0;
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one. */
static int utf8_seq(const unsigned char *s, size_t n)
{
    int len = s[0] < 0x80         ? 1
              : (s[0] >> 5) == 6  ? 2
              : (s[0] >> 4) == 14 ? 3
              : (s[0] >> 3) == 30 ? 4
                                  : 0;
    if (len == 0 || (size_t)len > n) return 0;
    for (int i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    uint32_t cp = len == 1 ? s[0] : (uint32_t)(s[0] & (0x7F >> len));
    for (int i = 1; i < len; i++) cp = cp << 6 | (s[i] & 0x3F);
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* JSON strings must be UTF-8: model output bytes that are not become U+FFFD (the token ids stay
 * exact in "tokens"). Returns a pds_malloc'ed NUL-terminated string or NULL. */
static char *utf8_sanitize(const char *in, size_t n)
{
    char *out = pds_malloc(n * 3 + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n;) {
        int len = utf8_seq((const unsigned char *)in + i, n - i);
        if (len) {
            memcpy(o, in + i, (size_t)len);
            o += len;
            i += (size_t)len;
        } else {
            memcpy(o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    *o = '\0';
    return out;
}

typedef struct {
    bool stream;
    double t_start, t_first, t_last;
    int n;
} gen_state_t;

static void on_token(void *ctx, int32_t tok, int index)
{
    gen_state_t *g = ctx;
    double now = pds_time_now_ms();
    if (index == 0) g->t_first = now;
    g->t_last = now;
    g->n = index + 1;
    if (g->stream && tok >= 0 && tok < 256) {
        fputc(tok, stdout);
        fflush(stdout);
    }
}

int main(int argc, char **argv)
{
    enum {
        O_MODEL = 256,
        O_PRESET,
        O_SEED,
        O_PROMPT,
        O_TOKENS,
        O_MAX,
        O_TEMP,
        O_TOPK,
        O_TOPP,
        O_SSEED,
        O_STOP,
        O_IGNORE_EOS,
        O_BACKEND,
        O_THREADS,
        O_JSON,
        O_HELP
    };
    static const struct option opts[] = {{"model", required_argument, 0, O_MODEL},
                                         {"preset", required_argument, 0, O_PRESET},
                                         {"seed", required_argument, 0, O_SEED},
                                         {"prompt", required_argument, 0, O_PROMPT},
                                         {"tokens", required_argument, 0, O_TOKENS},
                                         {"max-tokens", required_argument, 0, O_MAX},
                                         {"temperature", required_argument, 0, O_TEMP},
                                         {"top-k", required_argument, 0, O_TOPK},
                                         {"top-p", required_argument, 0, O_TOPP},
                                         {"sample-seed", required_argument, 0, O_SSEED},
                                         {"stop", required_argument, 0, O_STOP},
                                         {"ignore-eos", no_argument, 0, O_IGNORE_EOS},
                                         {"backend", required_argument, 0, O_BACKEND},
                                         {"threads", required_argument, 0, O_THREADS},
                                         {"json", no_argument, 0, O_JSON},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};

    const char *model_dir = NULL, *preset = NULL, *prompt = NULL, *tokens = NULL;
    long long seed = 0, max_tokens = 64, v;
    static int32_t stop[MAX_LIST];
    int n_stop = 0;
    bool json = false;
    pds_sample_params_t sp = pds_sample_default_params();
    pds_gen_request_t req = {0};
    pds_engine_params_t ep = pds_engine_default_params();
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_MODEL:
            model_dir = optarg;
            break;
        case O_PRESET:
            preset = optarg;
            break;
        case O_SEED:
            if (!parse_i64(optarg, 0, INT64_MAX, &seed))
                return bad_usage("bad --seed '%s'", optarg);
            break;
        case O_PROMPT:
            prompt = optarg;
            break;
        case O_TOKENS:
            tokens = optarg;
            break;
        case O_MAX:
            if (!parse_i64(optarg, 0, 1 << 24, &max_tokens))
                return bad_usage("bad --max-tokens '%s'", optarg);
            break;
        case O_TEMP:
            if (!parse_float(optarg, &sp.temperature))
                return bad_usage("bad --temperature '%s'", optarg);
            break;
        case O_TOPK:
            if (!parse_i64(optarg, 0, 1 << 30, &v)) return bad_usage("bad --top-k '%s'", optarg);
            sp.top_k = (int)v;
            break;
        case O_TOPP:
            if (!parse_float(optarg, &sp.top_p)) return bad_usage("bad --top-p '%s'", optarg);
            break;
        case O_SSEED:
            if (!parse_i64(optarg, 0, INT64_MAX, &v))
                return bad_usage("bad --sample-seed '%s'", optarg);
            sp.seed = (uint64_t)v;
            break;
        case O_STOP:
            if (!parse_ids(optarg, stop, MAX_LIST, &n_stop))
                return bad_usage("bad --stop '%s' (expected ID,ID,...)", optarg);
            break;
        case O_IGNORE_EOS:
            req.ignore_eos = true;
            break;
        case O_BACKEND:
            if (strcmp(optarg, "cpu") == 0)
                ep.backend = PDS_ENGINE_CPU;
            else if (strcmp(optarg, "cuda") == 0)
                ep.backend = PDS_ENGINE_CUDA;
            else
                return bad_usage("unknown --backend '%s' (cpu or cuda)", optarg);
            break;
        case O_THREADS:
            if (!parse_i64(optarg, 0, 4096, &v)) return bad_usage("bad --threads '%s'", optarg);
            ep.n_threads = (int)v;
            break;
        case O_JSON:
            json = true;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) return bad_usage("unexpected argument '%s'", argv[optind]);
    if (!model_dir == !preset) return bad_usage("%sgive exactly one of --model or --preset", "");
    if (!prompt == !tokens) return bad_usage("%sgive exactly one of --prompt or --tokens", "");

    /* ---- model and engine ---- */
    double t0 = pds_time_now_ms();
    pds_model_config_t cfg;
    pds_model_t *model = NULL;
    pds_status_t s;
    if (model_dir) {
        s = pds_model_load(model_dir, &model);
        if (s != PDS_OK) return fail(s, "loading the model");
        cfg = *pds_model_config(model);
    } else {
        s = pds_model_preset(preset, &cfg);
        if (s != PDS_OK) return fail(s, "preset");
    }

    int cap = cfg.max_context;
    int32_t *ids = pds_malloc(sizeof(int32_t) * (size_t)cap);
    int n_ids = 0;
    int rc = 1;
    pds_engine_t *e = NULL;
    int32_t *out = NULL;
    char *text = NULL;
    if (!ids) {
        fprintf(stderr, "pdserve-generate: out of memory\n");
        goto done;
    }
    if (prompt) {
        if (cfg.vocab < PDS_TOK_MIN_VOCAB) {
            fprintf(stderr,
                    "pdserve-generate: --prompt needs the byte tokenizer (vocab >= %d); "
                    "this model has %d: use --tokens\n",
                    PDS_TOK_MIN_VOCAB, cfg.vocab);
            rc = 2;
            goto done;
        }
        s = pds_tok_encode(prompt, strlen(prompt), cfg.bos_id, ids, cap, &n_ids);
        if (s != PDS_OK) {
            fail(s, "encoding the prompt");
            goto done;
        }
    } else if (!parse_ids(tokens, ids, cap, &n_ids)) {
        rc = bad_usage("bad --tokens '%s' (ID,ID,... within the model's context)", tokens);
        goto done;
    }

    /* Pool for this request only. */
    ep.kv_tokens = PDS_MIN((int64_t)n_ids + max_tokens, (int64_t)cfg.max_context);
    if (model)
        s = pds_engine_create(model, &ep, &e);
    else
        s = pds_engine_create_synth(&cfg, (uint64_t)seed, &ep, &e);
    pds_model_destroy(model);
    model = NULL;
    if (s != PDS_OK) {
        fail(s, "creating the engine");
        goto done;
    }
    double t_ready = pds_time_now_ms();

    /* ---- generate ---- */
    out = pds_malloc(sizeof(int32_t) * (size_t)(max_tokens ? max_tokens : 1));
    if (!out) {
        fprintf(stderr, "pdserve-generate: out of memory\n");
        goto done;
    }
    req.prompt = ids;
    req.n_prompt = n_ids;
    req.max_new_tokens = (int)max_tokens;
    req.sample = sp;
    req.stop = stop;
    req.n_stop = n_stop;
    gen_state_t g = {.stream = !json, .t_start = pds_time_now_ms()};
    int n_out = 0;
    pds_finish_reason_t why = PDS_FINISH_NONE;
    s = pds_engine_generate(e, &req, out, &n_out, &why, on_token, &g);
    double t_end = pds_time_now_ms();
    if (s != PDS_OK) {
        if (!json) fputc('\n', stdout);
        fail(s, "generating");
        goto done;
    }

    double prefill_ms = n_out ? g.t_first - g.t_start : t_end - g.t_start;
    double decode_ms = n_out > 1 ? g.t_last - g.t_first : 0.0;
    double prefill_tps = prefill_ms > 0 ? n_ids / (prefill_ms / 1e3) : 0.0;
    double decode_tps = decode_ms > 0 ? (n_out - 1) / (decode_ms / 1e3) : 0.0;
    pds_engine_info_t info;
    pds_engine_info(e, &info);

    if (json) {
        size_t tcap = (size_t)n_out + 1, tlen = 0;
        char *raw = pds_malloc(tcap);
        if (raw && pds_tok_decode(out, n_out, raw, tcap, &tlen) == PDS_OK)
            text = utf8_sanitize(raw, tlen);
        pds_free(raw);
        if (!text) {
            fprintf(stderr, "pdserve-generate: out of memory decoding the output\n");
            goto done;
        }
        json_t *toks = json_array(), *pt = json_array();
        for (int i = 0; i < n_out; i++) json_array_append_new(toks, json_integer(out[i]));
        for (int i = 0; i < n_ids; i++) json_array_append_new(pt, json_integer(ids[i]));
        json_error_t jerr;
        json_t *root = json_pack_ex(
            &jerr, 0, "{s:s, s:s, s:s, s:o, s:o, s:s, s:s, s:{s:f, s:f, s:f, s:f, s:f}}", "model",
            info.model.name, "backend", info.backend == PDS_ENGINE_CUDA ? "cuda" : "cpu", "device",
            info.device_name, "prompt_tokens", pt, "tokens", toks, "text", text, "finish_reason",
            pds_finish_reason_name(why), "timings", "load_ms", t_ready - t0, "ttft_ms", prefill_ms,
            "decode_ms", decode_ms, "prefill_tok_s", prefill_tps, "decode_tok_s", decode_tps);
        if (!root) {
            fprintf(stderr, "pdserve-generate: could not build the JSON output: %s\n", jerr.text);
            goto done;
        }
        json_dumpf(root, stdout, JSON_COMPACT | JSON_REAL_PRECISION(6));
        fputc('\n', stdout);
        json_decref(root);
    } else {
        fputc('\n', stdout);
        fprintf(stderr,
                "[%s on %s] prompt %d tokens, prefill %.1f ms (%.1f tok/s); %d tokens, decode "
                "%.1f tok/s; finish %s; load %.0f ms\n",
                info.model.name, info.device_name, n_ids, prefill_ms, prefill_tps, n_out,
                decode_tps, pds_finish_reason_name(why), t_ready - t0);
    }
    rc = 0;
done:
    pds_free(text);
    pds_free(out);
    pds_free(ids);
    pds_engine_destroy(e);
    pds_model_destroy(model);
    return rc;
}

/* pdserve-gpu-handoff: the helper of the GPU hand-off measurements (run_device.sh).
 *
 *   pdserve-gpu-handoff prompt --preset P --len N [--seed S]
 *       the prompt of N token ids the runs use (comma-separated, for pdserve-cli --tokens)
 *   pdserve-gpu-handoff ref --preset P --lens N,N.. [--seed S] [--max-tokens M] [--backend cuda]
 *                           [--temperature T --sample-seed K]
 *       the single-process reference: pds_engine_generate (greedy unless T > 0, EOS ignored) on one
 *       engine for each prompt, as one JSON object {"preset", "backend", "runs": [{"len",
 *       "tokens", "ms"}]}
 *
 * The prompt is a pure function of (vocab, len, seed), so the cluster run and the reference see
 * the same ids without passing files around. The reference engine's pool is sized to the longest
 * request only, so it fits next to nothing else on the GPU for the few seconds it runs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"

#define MAX_LENS 16

static int32_t prompt_token(int vocab, int64_t seed, int i)
{
    /* ids 1 .. vocab-1, never 0 (often BOS or padding in real vocabularies) */
    return 1 +
           (int32_t)(pds_mix64((uint64_t)seed * 1000003ULL + (uint64_t)i) % (uint64_t)(vocab - 1));
}

static int usage(void)
{
    fprintf(stderr, "usage: pdserve-gpu-handoff prompt --preset P --len N [--seed S]\n"
                    "       pdserve-gpu-handoff ref --preset P --lens N,N.. [--seed S] "
                    "[--max-tokens M] [--backend cuda|cpu] [--temperature T --sample-seed K]\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2) return usage();
    const char *cmd = argv[1], *preset = "small", *backend = "cuda";
    int64_t seed = 7;
    int lens[MAX_LENS], n_lens = 0, max_tokens = 32;
    float temperature = 0.0f;
    uint64_t sample_seed = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return usage();
        if (strcmp(a, "--preset") == 0)
            preset = v;
        else if (strcmp(a, "--seed") == 0)
            seed = atoll(v);
        else if (strcmp(a, "--max-tokens") == 0)
            max_tokens = atoi(v);
        else if (strcmp(a, "--backend") == 0)
            backend = v;
        else if (strcmp(a, "--temperature") == 0)
            temperature = (float)atof(v);
        else if (strcmp(a, "--sample-seed") == 0)
            sample_seed = (uint64_t)strtoull(v, NULL, 10);
        else if (strcmp(a, "--len") == 0 || strcmp(a, "--lens") == 0) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *t = strtok(buf, ","); t && n_lens < MAX_LENS; t = strtok(NULL, ","))
                lens[n_lens++] = atoi(t);
        } else
            return usage();
        i++;
    }
    pds_model_config_t mc;
    if (pds_model_preset(preset, &mc) != PDS_OK) {
        fprintf(stderr, "pdserve-gpu-handoff: %s\n", pds_err_detail());
        return 2;
    }
    if (n_lens == 0 || max_tokens < 1) return usage();
    for (int i = 0; i < n_lens; i++)
        if (lens[i] < 1 || lens[i] + max_tokens > mc.max_context) {
            fprintf(stderr, "pdserve-gpu-handoff: bad prompt length %d\n", lens[i]);
            return 2;
        }

    if (strcmp(cmd, "prompt") == 0) {
        for (int i = 0; i < lens[0]; i++)
            printf("%s%d", i ? "," : "", prompt_token(mc.vocab, seed, i));
        printf("\n");
        return 0;
    }
    if (strcmp(cmd, "ref") != 0) return usage();

    int longest = 0;
    for (int i = 0; i < n_lens; i++) longest = lens[i] > longest ? lens[i] : longest;
    pds_engine_params_t ep = pds_engine_default_params();
    ep.backend = strcmp(backend, "cpu") == 0 ? PDS_ENGINE_CPU : PDS_ENGINE_CUDA;
    ep.kv_tokens = longest + max_tokens + 64;
    pds_engine_t *e = NULL;
    double t0 = pds_time_now_ms();
    pds_status_t s = pds_engine_create_synth(&mc, 1, &ep, &e); /* model seed 1, as the nodes */
    if (s != PDS_OK) {
        fprintf(stderr, "pdserve-gpu-handoff: engine: %s: %s\n", pds_status_name(s),
                pds_err_detail());
        return 1;
    }
    pds_engine_info_t info;
    pds_engine_info(e, &info);
    printf("{\"preset\": \"%s\", \"backend\": \"%s\", \"device\": \"%s\", \"create_ms\": %.1f, "
           "\"max_tokens\": %d, \"seed\": %lld, \"temperature\": %g, \"sample_seed\": %llu, "
           "\"runs\": [",
           preset, backend, info.device_name, pds_time_now_ms() - t0, max_tokens, (long long)seed,
           (double)temperature, (unsigned long long)sample_seed);
    int32_t *prompt = malloc((size_t)longest * sizeof *prompt);
    int32_t *out = malloc((size_t)max_tokens * sizeof *out);
    int rc = 0;
    for (int k = 0; k < n_lens && prompt && out; k++) {
        for (int i = 0; i < lens[k]; i++) prompt[i] = prompt_token(mc.vocab, seed, i);
        pds_gen_request_t rq = {.prompt = prompt,
                                .n_prompt = lens[k],
                                .max_new_tokens = max_tokens,
                                .sample = pds_sample_default_params(),
                                .ignore_eos = true};
        rq.sample.temperature = temperature;
        rq.sample.seed = sample_seed;
        int n_out = 0;
        pds_finish_reason_t why;
        double t1 = pds_time_now_ms();
        s = pds_engine_generate(e, &rq, out, &n_out, &why, NULL, NULL);
        double ms = pds_time_now_ms() - t1;
        if (s != PDS_OK) {
            fprintf(stderr, "pdserve-gpu-handoff: generate %d: %s\n", lens[k], pds_err_detail());
            rc = 1;
            break;
        }
        printf("%s{\"len\": %d, \"ms\": %.2f, \"tokens\": [", k ? ", " : "", lens[k], ms);
        for (int i = 0; i < n_out; i++) printf("%s%d", i ? "," : "", out[i]);
        printf("]}");
    }
    printf("]}\n");
    free(prompt);
    free(out);
    pds_engine_destroy(e);
    return rc;
}

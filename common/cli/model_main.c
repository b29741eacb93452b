/* pdserve-model: look at and make model directories.
 *
 *   pdserve-model presets                      the built-in shapes and their sizes
 *   pdserve-model create --preset NAME [--seed N] [--dtype bf16|f16|f32] --out DIR
 *                                              synthetic weights: DIR/config.json +
 * model.safetensors pdserve-model inspect DIR                  config, tensors, parameter count,
 * file sizes
 *
 * A thin shell over common/model: everything it knows comes through model.h, so what it prints is
 * what the engine will see. Exit status: 0 ok, 1 the operation failed (the error detail is
 * printed), 2 the command line was wrong.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/model.h"

static void usage(FILE *f)
{
    fprintf(f, "usage:\n"
               "  pdserve-model presets\n"
               "  pdserve-model create --preset NAME [--seed N] [--dtype bf16|f16|f32] --out DIR\n"
               "  pdserve-model inspect DIR\n"
               "  pdserve-model --help\n"
               "\n"
               "presets  list the built-in model shapes (name, layers, hidden, heads/kv heads,\n"
               "         ffn, vocab, parameters)\n"
               "create   write DIR/config.json and DIR/model.safetensors with seeded synthetic\n"
               "         weights (default seed 0, default dtype the preset's)\n"
               "inspect  load DIR (single file or sharded) and print its config, tensors,\n"
               "         parameter count and file sizes\n");
}

static int fail(pds_status_t s)
{
    fprintf(stderr, "pdserve-model: %s: %s\n", pds_status_text(s), pds_err_detail());
    return 1;
}

static void human(double n, char *buf, size_t cap)
{
    if (n >= 1e9)
        snprintf(buf, cap, "%.2fB", n / 1e9);
    else if (n >= 1e6)
        snprintf(buf, cap, "%.1fM", n / 1e6);
    else if (n >= 1e3)
        snprintf(buf, cap, "%.1fK", n / 1e3);
    else
        snprintf(buf, cap, "%.0f", n);
}

static void human_bytes(double n, char *buf, size_t cap)
{
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (n >= 1024 && u < 4) n /= 1024, u++;
    snprintf(buf, cap, u ? "%.1f %s" : "%.0f %s", n, unit[u]);
}

static int cmd_presets(void)
{
    printf("%-12s %6s %6s %8s %6s %7s %9s\n", "name", "layers", "hidden", "heads/kv", "ffn",
           "vocab", "params");
    for (const char *const *n = pds_model_preset_names(); *n; n++) {
        pds_model_config_t c;
        pds_status_t s = pds_model_preset(*n, &c);
        if (s != PDS_OK) return fail(s);
        char hk[32], params[32];
        snprintf(hk, sizeof hk, "%d/%d", c.n_heads, c.n_kv_heads);
        human((double)pds_model_config_param_count(&c), params, sizeof params);
        printf("%-12s %6d %6d %8s %6d %7d %9s\n", c.name, c.n_layers, c.hidden, hk, c.ffn, c.vocab,
               params);
    }
    return 0;
}

static int parse_dtype(const char *s, pds_dtype_t *out)
{
    if (strcmp(s, "bf16") == 0 || strcmp(s, "bfloat16") == 0)
        *out = PDS_DTYPE_BF16;
    else if (strcmp(s, "f16") == 0 || strcmp(s, "float16") == 0)
        *out = PDS_DTYPE_F16;
    else if (strcmp(s, "f32") == 0 || strcmp(s, "float32") == 0)
        *out = PDS_DTYPE_F32;
    else
        return -1;
    return 0;
}

static int cmd_create(int argc, char **argv)
{
    const char *preset = NULL, *out = NULL, *dtype = NULL;
    uint64_t seed = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "pdserve-model create: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--preset") == 0) {
            preset = v;
        } else if (strcmp(a, "--out") == 0) {
            out = v;
        } else if (strcmp(a, "--dtype") == 0) {
            dtype = v;
        } else if (strcmp(a, "--seed") == 0) {
            char *end;
            errno = 0;
            seed = strtoull(v, &end, 0);
            if (errno || !*v || *end || *v == '-') {
                fprintf(stderr,
                        "pdserve-model create: --seed wants a non-negative integer, got "
                        "'%s'\n",
                        v);
                return 2;
            }
        } else {
            fprintf(stderr, "pdserve-model create: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!preset || !out) {
        fprintf(stderr, "pdserve-model create: --preset and --out are required\n");
        return 2;
    }
    pds_model_config_t c;
    pds_status_t s = pds_model_preset(preset, &c);
    if (s != PDS_OK) return fail(s);
    if (dtype && parse_dtype(dtype, &c.dtype) != 0) {
        fprintf(stderr, "pdserve-model create: --dtype wants bf16, f16 or f32, got '%s'\n", dtype);
        return 2;
    }
    s = pds_model_synth_write(&c, seed, out);
    if (s != PDS_OK) return fail(s);
    char params[32];
    human((double)pds_model_config_param_count(&c), params, sizeof params);
    printf("wrote %s: preset %s, %s parameters, %s, seed %" PRIu64 "\n", out, preset, params,
           pds_dtype_name(c.dtype), seed);
    return 0;
}

static void shape_str(const pds_tensor_view_t *v, char *buf, size_t cap)
{
    size_t len = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < v->ndim && len < cap; d++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%" PRId64, d ? ", " : "", v->shape[d]);
    if (len < cap) snprintf(buf + len, cap - len, "]");
}

/* Sum and list the sizes of DIR's .safetensors files. */
static uint64_t print_files(const char *dir)
{
    DIR *d = opendir(dir);
    uint64_t total = 0;
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n < 12 || strcmp(e->d_name + n - 12, ".safetensors") != 0) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) != 0) continue;
        char hb[32];
        human_bytes((double)st.st_size, hb, sizeof hb);
        printf("  file %-40s %12lld bytes (%s)\n", e->d_name, (long long)st.st_size, hb);
        total += (uint64_t)st.st_size;
    }
    closedir(d);
    return total;
}

static int cmd_inspect(const char *dir)
{
    pds_model_t *m;
    pds_status_t s = pds_model_load(dir, &m);
    if (s != PDS_OK) return fail(s);
    const pds_model_config_t *c = pds_model_config(m);
    printf("model %s\n", dir);
    printf("  layers %d, hidden %d, heads %d, kv heads %d, head_dim %d, ffn %d, vocab %d\n",
           c->n_layers, c->hidden, c->n_heads, c->n_kv_heads, c->head_dim, c->ffn, c->vocab);
    printf("  max_context %d, rope_theta %g, rope_scaling %s", c->max_context,
           (double)c->rope_theta, c->rope_scaling == PDS_ROPE_SCALING_LLAMA3 ? "llama3" : "none");
    if (c->rope_scaling == PDS_ROPE_SCALING_LLAMA3)
        printf(" (factor %g, low %g, high %g, original %d)", (double)c->rope_factor,
               (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor,
               c->rope_original_max_pos);
    printf("\n  rms_norm_eps %g, tied embeddings %s, bos %d, eos %d, dtype %s\n",
           (double)c->norm_eps, c->tied_embeddings ? "yes" : "no", c->bos_id, c->eos_id,
           pds_dtype_name(c->dtype));

    printf("tensors\n");
    int64_t counted = 0;
    int n = 0;
    for (int t = 0; t < pds_model_synth_tensor_count(c); t++) {
        char name[128];
        int64_t shape[2];
        int ndim, is_norm;
        float scale;
        if (pds_model_synth_tensor_info(c, t, name, sizeof name, shape, &ndim, &scale, &is_norm) !=
            PDS_OK)
            continue; /* lm_head of a tied model */
        pds_tensor_view_t v;
        s = pds_model_tensor(m, name, &v);
        if (s != PDS_OK) {
            pds_model_destroy(m);
            return fail(s);
        }
        char sh[64];
        shape_str(&v, sh, sizeof sh);
        printf("  %-52s %-4s %s\n", name, pds_dtype_name(v.dtype), sh);
        counted += v.numel;
        n++;
    }
    char p1[32];
    human((double)counted, p1, sizeof p1);
    printf("parameters %" PRId64 " (%s) in %d tensors; config says %" PRId64 "\n", counted, p1, n,
           pds_model_config_param_count(c));
    uint64_t total = print_files(dir);
    char hb[32];
    human_bytes((double)total, hb, sizeof hb);
    printf("size on disk %" PRIu64 " bytes (%s)\n", total, hb);
    pds_model_destroy(m);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "presets") == 0 && argc == 2) return cmd_presets();
    if (strcmp(cmd, "create") == 0) return cmd_create(argc - 2, argv + 2);
    if (strcmp(cmd, "inspect") == 0 && argc == 3) return cmd_inspect(argv[2]);
    fprintf(stderr, "pdserve-model: bad command line\n");
    usage(stderr);
    return 2;
}

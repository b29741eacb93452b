/* config.c: the model configuration — built-in presets, consistency checks, parameter count, and
 * the Hugging Face config.json mapping (read and written with jansson).
 *
 * Loading is strict where a wrong value would silently change the numbers (types, rope scaling
 * kind, activation, biases) and lenient where Hugging Face itself has defaults
 * (num_key_value_heads, head_dim, rope_theta, ...). Every error names the file and the key. Saving
 * writes the keys a Hugging Face LlamaConfig reads, with floats printed in their shortest
 * round-tripping form so that save + load gives back the same struct bit for bit.
 */
#include "model/model_internal.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- presets ----------------------------------------------------------------------------------
 */
static pds_model_config_t llama3_8b(void)
{
    return (pds_model_config_t){.name = "llama3-8b",
                                .n_layers = 32,
                                .hidden = 4096,
                                .n_heads = 32,
                                .n_kv_heads = 8,
                                .head_dim = 128,
                                .ffn = 14336,
                                .vocab = 128256,
                                .max_context = 131072,
                                .rope_theta = 500000.0f,
                                .rope_scaling = PDS_ROPE_SCALING_LLAMA3,
                                .rope_factor = 8.0f,
                                .rope_low_freq_factor = 1.0f,
                                .rope_high_freq_factor = 4.0f,
                                .rope_original_max_pos = 8192,
                                .norm_eps = 1e-5f,
                                .tied_embeddings = false,
                                .bos_id = 128000,
                                .eos_id = 128001,
                                .dtype = PDS_DTYPE_BF16};
}

static const char *const preset_names[] = {"tiny",      "small",      "llama3-8b",
                                           "llama2-7b", "llama3-70b", NULL};

const char *const *pds_model_preset_names(void)
{
    return preset_names;
}

pds_status_t pds_model_preset(const char *name, pds_model_config_t *out)
{
    pds_model_config_t c;
    if (!name) return PDS_ERR(PDS_ERR_INVALID_ARG, "preset name is NULL");
    if (strcmp(name, "tiny") == 0) {
        c = (pds_model_config_t){.n_layers = 2,
                                 .hidden = 64,
                                 .n_heads = 4,
                                 .n_kv_heads = 2,
                                 .head_dim = 16,
                                 .ffn = 160,
                                 .vocab = 272,
                                 .max_context = 512,
                                 .rope_theta = 10000.0f,
                                 .rope_scaling = PDS_ROPE_SCALING_NONE,
                                 .norm_eps = 1e-5f,
                                 .tied_embeddings = false,
                                 .bos_id = 256,
                                 .eos_id = 257,
                                 .dtype = PDS_DTYPE_F32};
    } else if (strcmp(name, "small") == 0) {
        /* original_max_pos 2048 < max_context so that the llama3 scaling changes the numbers */
        c = (pds_model_config_t){.n_layers = 8,
                                 .hidden = 512,
                                 .n_heads = 8,
                                 .n_kv_heads = 4,
                                 .head_dim = 64,
                                 .ffn = 1536,
                                 .vocab = 512,
                                 .max_context = 8192,
                                 .rope_theta = 500000.0f,
                                 .rope_scaling = PDS_ROPE_SCALING_LLAMA3,
                                 .rope_factor = 8.0f,
                                 .rope_low_freq_factor = 1.0f,
                                 .rope_high_freq_factor = 4.0f,
                                 .rope_original_max_pos = 2048,
                                 .norm_eps = 1e-5f,
                                 .tied_embeddings = true,
                                 .bos_id = 256,
                                 .eos_id = 257,
                                 .dtype = PDS_DTYPE_BF16};
    } else if (strcmp(name, "llama3-8b") == 0) {
        c = llama3_8b();
    } else if (strcmp(name, "llama2-7b") == 0) {
        c = (pds_model_config_t){.n_layers = 32,
                                 .hidden = 4096,
                                 .n_heads = 32,
                                 .n_kv_heads = 32,
                                 .head_dim = 128,
                                 .ffn = 11008,
                                 .vocab = 32000,
                                 .max_context = 4096,
                                 .rope_theta = 10000.0f,
                                 .rope_scaling = PDS_ROPE_SCALING_NONE,
                                 .norm_eps = 1e-5f,
                                 .tied_embeddings = false,
                                 .bos_id = 1,
                                 .eos_id = 2,
                                 .dtype = PDS_DTYPE_BF16};
    } else if (strcmp(name, "llama3-70b") == 0) {
        c = llama3_8b();
        c.n_layers = 80;
        c.hidden = 8192;
        c.n_heads = 64;
        c.ffn = 28672;
    } else {
        return PDS_ERR(PDS_ERR_NOT_FOUND, "unknown model preset '%s'", name);
    }
    snprintf(c.name, sizeof c.name, "%s", name);
    *out = c;
    return PDS_OK;
}

/* ---- validation and size ----------------------------------------------------------------------
 */
pds_status_t pds_model_config_validate(const pds_model_config_t *c)
{
    if (!c) return PDS_ERR(PDS_ERR_INVALID_ARG, "model config is NULL");
#define POS(field, key) \
    if (c->field <= 0)  \
        return PDS_ERR(PDS_ERR_INVALID_ARG, key " must be positive (got %d)", c->field);
    POS(n_layers, "num_hidden_layers")
    POS(hidden, "hidden_size")
    POS(n_heads, "num_attention_heads")
    POS(n_kv_heads, "num_key_value_heads")
    POS(head_dim, "head_dim")
    POS(ffn, "intermediate_size")
    POS(vocab, "vocab_size")
    POS(max_context, "max_position_embeddings")
#undef POS
    if (c->n_heads % c->n_kv_heads != 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                       c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "head_dim (%d) must be even for rotary embeddings",
                       c->head_dim);
    if ((int64_t)c->n_heads * c->head_dim > INT_MAX)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "num_attention_heads * head_dim overflows int");
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "rope_theta must be positive and finite (got %g)",
                       (double)c->rope_theta);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "rms_norm_eps must be positive and finite (got %g)",
                       (double)c->norm_eps);
    if (c->rope_scaling == PDS_ROPE_SCALING_LLAMA3) {
        if (!(c->rope_factor >= 1.0f) || !isfinite(c->rope_factor))
            return PDS_ERR(PDS_ERR_INVALID_ARG, "rope_scaling.factor must be >= 1 (got %g)",
                           (double)c->rope_factor);
        if (!(c->rope_low_freq_factor > 0.0f) ||
            !(c->rope_high_freq_factor > c->rope_low_freq_factor) ||
            !isfinite(c->rope_high_freq_factor))
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "rope_scaling needs 0 < low_freq_factor < high_freq_factor (got %g, "
                           "%g)",
                           (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor);
        if (c->rope_original_max_pos <= 0)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "rope_scaling.original_max_position_embeddings must be positive (got "
                           "%d)",
                           c->rope_original_max_pos);
    } else if (c->rope_scaling != PDS_ROPE_SCALING_NONE) {
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown rope scaling kind %d", (int)c->rope_scaling);
    }
    if (c->bos_id < -1 || c->bos_id >= c->vocab)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "bos_token_id %d outside the vocabulary (%d)",
                       c->bos_id, c->vocab);
    if (c->eos_id < -1 || c->eos_id >= c->vocab)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "eos_token_id %d outside the vocabulary (%d)",
                       c->eos_id, c->vocab);
    if (c->dtype != PDS_DTYPE_F32 && c->dtype != PDS_DTYPE_F16 && c->dtype != PDS_DTYPE_BF16)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown dtype %d", (int)c->dtype);
    if (memchr(c->name, '\0', sizeof c->name) == NULL)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "config name is not NUL-terminated");
    return PDS_OK;
}

int64_t pds_model_config_param_count(const pds_model_config_t *c)
{
    int64_t h = c->hidden, q = (int64_t)c->n_heads * c->head_dim;
    int64_t kv = (int64_t)c->n_kv_heads * c->head_dim;
    int64_t layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * c->ffn;
    int64_t embed = (int64_t)c->vocab * h;
    return embed * (c->tied_embeddings ? 1 : 2) + h + c->n_layers * layer;
}

/* ---- config.json ------------------------------------------------------------------------------
 */
static pds_status_t read_file(const char *path, char **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return PDS_ERR(errno == ENOENT ? PDS_ERR_NOT_FOUND : PDS_ERR_IO, "%s: cannot open: %s",
                       path, strerror(errno));
    pds_status_t s = PDS_OK;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            if (cap >= (64u << 20)) {
                s = PDS_ERR(PDS_ERR_PARSE, "%s: larger than 64 MiB, not a config file", path);
                goto fail;
            }
            cap = cap ? cap * 2 : 4096;
            char *g = pds_realloc(buf, cap);
            if (!g) {
                s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory to read it", path);
                goto fail;
            }
            buf = g;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    if (ferror(f)) {
        s = PDS_ERR(PDS_ERR_IO, "%s: read error", path);
        goto fail;
    }
    fclose(f);
    *out = buf;
    *len = n;
    return PDS_OK;
fail:
    pds_free(buf);
    fclose(f);
    return s;
}

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "?";
}

/* Integer key: required or defaulted (def used when absent or null and !required). */
static pds_status_t get_int(const char *path, json_t *o, const char *prefix, const char *key,
                            bool required, int def, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required) return PDS_ERR(PDS_ERR_PARSE, "%s: missing key \"%s%s\"", path, prefix, key);
        *out = def;
        return PDS_OK;
    }
    /* Some writers emit integral values as reals (e.g. 8192.0); accept those when exact. */
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
        d = json_real_value(v);
    else
        return PDS_ERR(PDS_ERR_PARSE, "%s: key \"%s%s\" must be an integer, got %s", path, prefix,
                       key, json_kind(v));
    if (d < INT_MIN || d > INT_MAX)
        return PDS_ERR(PDS_ERR_PARSE, "%s: key \"%s%s\" is out of range (%.0f)", path, prefix, key,
                       d);
    *out = (int)d;
    return PDS_OK;
}

static pds_status_t get_float(const char *path, json_t *o, const char *prefix, const char *key,
                              bool required, float def, float *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required) return PDS_ERR(PDS_ERR_PARSE, "%s: missing key \"%s%s\"", path, prefix, key);
        *out = def;
        return PDS_OK;
    }
    if (!json_is_number(v))
        return PDS_ERR(PDS_ERR_PARSE, "%s: key \"%s%s\" must be a number, got %s", path, prefix,
                       key, json_kind(v));
    *out = (float)json_number_value(v);
    return PDS_OK;
}

/* bos/eos: an integer, an array of integers (the first one is taken) or null (-1). */
static pds_status_t get_token(const char *path, json_t *o, const char *key, int def, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v) {
        *out = def;
        return PDS_OK;
    }
    if (json_is_null(v)) {
        *out = -1;
        return PDS_OK;
    }
    if (json_is_array(v)) {
        if (json_array_size(v) == 0)
            return PDS_ERR(PDS_ERR_PARSE, "%s: key \"%s\" is an empty array", path, key);
        v = json_array_get(v, 0);
    }
    if (!json_is_integer(v) || json_integer_value(v) < -1 || json_integer_value(v) > INT_MAX)
        return PDS_ERR(PDS_ERR_PARSE, "%s: key \"%s\" must be a token id or an array of them", path,
                       key);
    *out = (int)json_integer_value(v);
    return PDS_OK;
}

static pds_status_t parse_config(const char *path, json_t *root, pds_model_config_t *c)
{
    if (!json_is_object(root))
        return PDS_ERR(PDS_ERR_PARSE, "%s: top level is %s, not an object", path, json_kind(root));
    /* architecture features this engine does not implement: refuse rather than compute wrongly */
    json_t *act = json_object_get(root, "hidden_act");
    if (act && !(json_is_string(act) && strcmp(json_string_value(act), "silu") == 0))
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "%s: key \"hidden_act\": only \"silu\" is supported",
                       path);
    const char *bias_keys[] = {"attention_bias", "mlp_bias"};
    for (size_t i = 0; i < PDS_ARRAY_LEN(bias_keys); i++)
        if (json_is_true(json_object_get(root, bias_keys[i])))
            return PDS_ERR(PDS_ERR_UNSUPPORTED, "%s: key \"%s\": biases are not supported", path,
                           bias_keys[i]);

    PDS_TRY(get_int(path, root, "", "num_hidden_layers", true, 0, &c->n_layers));
    PDS_TRY(get_int(path, root, "", "hidden_size", true, 0, &c->hidden));
    PDS_TRY(get_int(path, root, "", "num_attention_heads", true, 0, &c->n_heads));
    PDS_TRY(get_int(path, root, "", "num_key_value_heads", false, c->n_heads, &c->n_kv_heads));
    int def_hd = c->n_heads > 0 ? c->hidden / c->n_heads : 0;
    PDS_TRY(get_int(path, root, "", "head_dim", false, def_hd, &c->head_dim));
    PDS_TRY(get_int(path, root, "", "intermediate_size", true, 0, &c->ffn));
    PDS_TRY(get_int(path, root, "", "vocab_size", true, 0, &c->vocab));
    PDS_TRY(get_int(path, root, "", "max_position_embeddings", false, 2048, &c->max_context));
    PDS_TRY(get_float(path, root, "", "rope_theta", false, 10000.0f, &c->rope_theta));
    PDS_TRY(get_float(path, root, "", "rms_norm_eps", false, 1e-6f, &c->norm_eps));

    json_t *rs = json_object_get(root, "rope_scaling");
    c->rope_scaling = PDS_ROPE_SCALING_NONE;
    if (rs && !json_is_null(rs)) {
        if (!json_is_object(rs))
            return PDS_ERR(PDS_ERR_PARSE, "%s: key \"rope_scaling\" must be an object or null",
                           path);
        json_t *rt = json_object_get(rs, "rope_type");
        if (!rt) rt = json_object_get(rs, "type"); /* older transformers spelling */
        if (!json_is_string(rt))
            return PDS_ERR(PDS_ERR_PARSE, "%s: missing key \"rope_scaling.rope_type\"", path);
        const char *kind = json_string_value(rt);
        if (strcmp(kind, "llama3") == 0) {
            c->rope_scaling = PDS_ROPE_SCALING_LLAMA3;
            const char *p = "rope_scaling.";
            PDS_TRY(get_float(path, rs, p, "factor", true, 0, &c->rope_factor));
            PDS_TRY(get_float(path, rs, p, "low_freq_factor", true, 0, &c->rope_low_freq_factor));
            PDS_TRY(get_float(path, rs, p, "high_freq_factor", true, 0, &c->rope_high_freq_factor));
            PDS_TRY(get_int(path, rs, p, "original_max_position_embeddings", true, 0,
                            &c->rope_original_max_pos));
        } else if (strcmp(kind, "default") != 0) {
            return PDS_ERR(PDS_ERR_UNSUPPORTED,
                           "%s: key \"rope_scaling.rope_type\": \"%s\" is not supported (only "
                           "\"llama3\" or \"default\")",
                           path, kind);
        }
    }

    json_t *tie = json_object_get(root, "tie_word_embeddings");
    if (tie && !json_is_boolean(tie))
        return PDS_ERR(PDS_ERR_PARSE, "%s: key \"tie_word_embeddings\" must be a boolean, got %s",
                       path, json_kind(tie));
    c->tied_embeddings = tie && json_is_true(tie);
    PDS_TRY(get_token(path, root, "bos_token_id", 1, &c->bos_id));
    PDS_TRY(get_token(path, root, "eos_token_id", 2, &c->eos_id));

    /* newer transformers write "dtype", older "torch_dtype"; absent means the common bf16 */
    const char *dkey = "torch_dtype";
    json_t *dt = json_object_get(root, dkey);
    if (!dt || json_is_null(dt)) {
        dkey = "dtype";
        dt = json_object_get(root, dkey);
    }
    c->dtype = PDS_DTYPE_BF16;
    if (dt && !json_is_null(dt)) {
        const char *d = json_is_string(dt) ? json_string_value(dt) : "";
        if (strcmp(d, "bfloat16") == 0)
            c->dtype = PDS_DTYPE_BF16;
        else if (strcmp(d, "float16") == 0)
            c->dtype = PDS_DTYPE_F16;
        else if (strcmp(d, "float32") == 0)
            c->dtype = PDS_DTYPE_F32;
        else
            return PDS_ERR(PDS_ERR_UNSUPPORTED,
                           "%s: key \"%s\": \"%s\" is not supported (bfloat16, float16, float32)",
                           path, dkey, d);
    }
    return PDS_OK;
}

/* "dir" of "/a/b/dir/config.json" into name (informational). */
static void name_from_path(const char *path, char *name, size_t cap)
{
    const char *end = strrchr(path, '/');
    if (!end) {
        snprintf(name, cap, ".");
        return;
    }
    while (end > path && end[-1] == '/') end--;
    const char *beg = end;
    while (beg > path && beg[-1] != '/') beg--;
    if (beg == end) {
        snprintf(name, cap, "/");
        return;
    }
    snprintf(name, cap, "%.*s", (int)(end - beg), beg);
}

pds_status_t pds_model_config_load(const char *path, pds_model_config_t *out)
{
    char *text = NULL;
    size_t len = 0;
    PDS_TRY(read_file(path, &text, &len));
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    pds_free(text);
    if (!root)
        return PDS_ERR(PDS_ERR_PARSE, "%s: not valid JSON: %s (line %d, column %d)", path,
                       jerr.text, jerr.line, jerr.column);
    pds_model_config_t c;
    memset(&c, 0, sizeof c);
    pds_status_t s = parse_config(path, root, &c);
    json_decref(root);
    if (s != PDS_OK) return s;
    name_from_path(path, c.name, sizeof c.name);
    if (pds_model_config_validate(&c) != PDS_OK) {
        char detail[512];
        snprintf(detail, sizeof detail, "%s", pds_err_detail());
        return PDS_ERR(PDS_ERR_INVALID_ARG, "%s: %s", path, detail);
    }
    *out = c;
    return PDS_OK;
}

/* A float as the shortest decimal that reads back (through double) as the same float, so that
 * 1e-5f is written as 1e-05 and not 9.9999997473787516e-06. */
static json_t *json_float(float f)
{
    char buf[32];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        double d = strtod(buf, NULL);
        if ((float)d == f) return json_real(d);
    }
    return json_real((double)f);
}

static const char *torch_dtype_name(pds_dtype_t t)
{
    switch (t) {
    case PDS_DTYPE_F32:
        return "float32";
    case PDS_DTYPE_F16:
        return "float16";
    case PDS_DTYPE_BF16:
        return "bfloat16";
    }
    return "?";
}

static json_t *token_json(int id)
{
    return id < 0 ? json_null() : json_integer(id);
}

pds_status_t pds_model_config_save(const pds_model_config_t *c, const char *path)
{
    PDS_TRY(pds_model_config_validate(c));
    json_t *o = json_object();
    if (!o) return PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory for JSON", path);
    json_t *arch = json_array();
    json_array_append_new(arch, json_string("LlamaForCausalLM"));
    int bad = 0;
    bad |= json_object_set_new(o, "architectures", arch);
    bad |= json_object_set_new(o, "model_type", json_string("llama"));
    bad |= json_object_set_new(o, "hidden_act", json_string("silu"));
    bad |= json_object_set_new(o, "num_hidden_layers", json_integer(c->n_layers));
    bad |= json_object_set_new(o, "hidden_size", json_integer(c->hidden));
    bad |= json_object_set_new(o, "num_attention_heads", json_integer(c->n_heads));
    bad |= json_object_set_new(o, "num_key_value_heads", json_integer(c->n_kv_heads));
    bad |= json_object_set_new(o, "head_dim", json_integer(c->head_dim));
    bad |= json_object_set_new(o, "intermediate_size", json_integer(c->ffn));
    bad |= json_object_set_new(o, "vocab_size", json_integer(c->vocab));
    bad |= json_object_set_new(o, "max_position_embeddings", json_integer(c->max_context));
    bad |= json_object_set_new(o, "rope_theta", json_float(c->rope_theta));
    if (c->rope_scaling == PDS_ROPE_SCALING_LLAMA3) {
        json_t *rs = json_object();
        bad |= json_object_set_new(o, "rope_scaling", rs);
        bad |= json_object_set_new(rs, "rope_type", json_string("llama3"));
        bad |= json_object_set_new(rs, "factor", json_float(c->rope_factor));
        bad |= json_object_set_new(rs, "low_freq_factor", json_float(c->rope_low_freq_factor));
        bad |= json_object_set_new(rs, "high_freq_factor", json_float(c->rope_high_freq_factor));
        bad |= json_object_set_new(rs, "original_max_position_embeddings",
                                   json_integer(c->rope_original_max_pos));
    } else {
        bad |= json_object_set_new(o, "rope_scaling", json_null());
    }
    bad |= json_object_set_new(o, "rms_norm_eps", json_float(c->norm_eps));
    bad |= json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tied_embeddings));
    bad |= json_object_set_new(o, "bos_token_id", token_json(c->bos_id));
    bad |= json_object_set_new(o, "eos_token_id", token_json(c->eos_id));
    bad |= json_object_set_new(o, "torch_dtype", json_string(torch_dtype_name(c->dtype)));
    if (bad) {
        json_decref(o);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory for JSON", path);
    }
    int rc = json_dump_file(o, path, JSON_INDENT(2) | JSON_REAL_PRECISION(9));
    json_decref(o);
    if (rc != 0) return PDS_ERR(PDS_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
    return PDS_OK;
}

void pds_model_rope_inv_freq(const pds_model_config_t *cfg, float *inv_freq)
{
    int half = cfg->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float expo = (float)(2 * i) / (float)cfg->head_dim;
        inv_freq[i] = 1.0f / powf(cfg->rope_theta, expo);
    }
    if (cfg->rope_scaling != PDS_ROPE_SCALING_LLAMA3) return;
    /* long wavelengths are slowed by `factor`, short ones kept, the band between interpolated */
    float factor = cfg->rope_factor, lo = cfg->rope_low_freq_factor;
    float hi = cfg->rope_high_freq_factor, old = (float)cfg->rope_original_max_pos;
    float low_wl = old / lo, high_wl = old / hi;
    for (int i = 0; i < half; i++) {
        float f = inv_freq[i];
        float wl = 2.0f * (float)M_PI / f;
        if (wl < high_wl) continue;
        if (wl > low_wl) {
            inv_freq[i] = f / factor;
        } else {
            float smooth = (old / wl - lo) / (hi - lo);
            inv_freq[i] = (1.0f - smooth) * f / factor + smooth * f;
        }
    }
}

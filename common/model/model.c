/* model.c: a loaded model — config.json plus the mmap'ed safetensors files, bound to the config.
 *
 * Loading reads the config, maps either dir/model.safetensors or every shard named by
 * dir/model.safetensors.index.json, and builds one table of tensors sorted by name (bsearch for
 * pds_model_tensor). Binding then walks the tensors the config requires, in the synthetic-index
 * order, and checks each one's presence, shape, dtype and alignment, so a model that loads is one
 * the engine can use without further checks. Tensors the config does not name (e.g. an old
 * rotary_emb.inv_freq) are kept in the table but never bound; a stray dtype in one of those is
 * harmless. Views point into the mappings: nothing is copied, and a model is read-only after load.
 */
#include "model/model_internal.h"

#include <inttypes.h>
#include <jansson.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct pds_model {
    pds_model_config_t cfg;
    pds_st_file_t *files; /* (n_files) mapped safetensors files */
    int n_files;
    pds_st_tensor_t *tensors; /* (n_tensors) sorted by name */
    int n_tensors;
    pds_tensor_view_t embed, final_norm, lm_head;
    pds_layer_weights_t *layers; /* (n_layers) */
};

/* Field of pds_layer_weights_t for synthetic index 3 + 9*layer + k. */
static const size_t layer_field[9] = {
    offsetof(pds_layer_weights_t, attn_norm), offsetof(pds_layer_weights_t, wq),
    offsetof(pds_layer_weights_t, wk),        offsetof(pds_layer_weights_t, wv),
    offsetof(pds_layer_weights_t, wo),        offsetof(pds_layer_weights_t, ffn_norm),
    offsetof(pds_layer_weights_t, w_gate),    offsetof(pds_layer_weights_t, w_up),
    offsetof(pds_layer_weights_t, w_down),
};

void pds_model_destroy(pds_model_t *m)
{
    if (!m) return;
    for (int i = 0; i < m->n_tensors; i++) pds_free(m->tensors[i].name);
    pds_free(m->tensors);
    for (int i = 0; i < m->n_files; i++) pds_st_file_close(&m->files[i]);
    pds_free(m->files);
    pds_free(m->layers);
    pds_free(m);
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const pds_st_tensor_t *)a)->name, ((const pds_st_tensor_t *)b)->name);
}

static const pds_st_tensor_t *find_tensor(const pds_model_t *m, const char *name)
{
    pds_st_tensor_t key = {.name = (char *)name};
    return bsearch(&key, m->tensors, (size_t)m->n_tensors, sizeof key, cmp_name);
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Single-file checkpoint. */
static pds_status_t load_single(pds_model_t *m, const char *path)
{
    m->files = pds_calloc(1, sizeof *m->files);
    if (!m->files) return PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory", path);
    PDS_TRY(pds_st_file_open(path, 0, &m->files[0], &m->tensors, &m->n_tensors));
    m->n_files = 1;
    qsort(m->tensors, (size_t)m->n_tensors, sizeof *m->tensors, cmp_name);
    return PDS_OK;
}

/* Index of `file` in the shard list names[0..n), or -1. */
static int shard_index(char **names, int n, const char *file)
{
    for (int i = 0; i < n; i++)
        if (strcmp(names[i], file) == 0) return i;
    return -1;
}

/* Sharded checkpoint: map every shard the index names, then keep exactly the (name, shard) pairs
 * of the weight map; a mapped tensor absent from its shard is an error naming both. */
static pds_status_t load_sharded(pds_model_t *m, const char *dir, const char *index_path)
{
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return PDS_ERR(PDS_ERR_PARSE, "%s: not valid JSON: %s (line %d, column %d)", index_path,
                       jerr.text, jerr.line, jerr.column);
    pds_status_t s = PDS_OK;
    char **shards = NULL; /* (n_shards) borrowed from root */
    int n_shards = 0;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        s = PDS_ERR(PDS_ERR_PARSE, "%s: missing object \"weight_map\"", index_path);
        goto out;
    }
    size_t n_map = json_object_size(wm);
    if (n_map > INT32_MAX / 2) {
        s = PDS_ERR(PDS_ERR_PARSE, "%s: weight_map is too large", index_path);
        goto out;
    }
    shards = pds_calloc(n_map + 1, sizeof *shards);
    if (!shards) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory", index_path);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v)
    {
        const char *f = json_string_value(v);
        if (!f || !*f || strchr(f, '/') || strcmp(f, "..") == 0) {
            s = PDS_ERR(PDS_ERR_PARSE,
                        "%s: tensor '%s': weight_map value must be a file name in the same "
                        "directory",
                        index_path, key);
            goto out;
        }
        if (shard_index(shards, n_shards, f) < 0) shards[n_shards++] = (char *)f;
    }
    m->files = pds_calloc((size_t)n_shards + 1, sizeof *m->files);
    if (!m->files) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory", index_path);
        goto out;
    }
    for (int i = 0; i < n_shards; i++) {
        char *p = pds_model_path_join(dir, shards[i]);
        if (!p) {
            s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory", index_path);
            goto out;
        }
        s = pds_st_file_open(p, i, &m->files[i], &m->tensors, &m->n_tensors);
        if (s == PDS_ERR_NOT_FOUND) {
            char detail[512];
            snprintf(detail, sizeof detail, "%s", pds_err_detail());
            s = PDS_ERR(PDS_ERR_NOT_FOUND, "shard listed in %s is missing: %s", index_path, detail);
        }
        pds_free(p);
        if (s != PDS_OK) goto out;
        m->n_files = i + 1;
    }
    /* Keep the tensors the weight map assigns to the shard they are in; drop the rest. */
    int kept = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        pds_st_tensor_t *t = &m->tensors[i];
        const char *f = json_string_value(json_object_get(wm, t->name));
        if (f && strcmp(f, shards[t->file]) == 0)
            m->tensors[kept++] = *t;
        else
            pds_free(t->name);
    }
    m->n_tensors = kept;
    qsort(m->tensors, (size_t)m->n_tensors, sizeof *m->tensors, cmp_name);
    json_object_foreach(wm, key, v)
    {
        if (!find_tensor(m, key)) {
            char *p = pds_model_path_join(dir, json_string_value(v));
            s = PDS_ERR(PDS_ERR_NOT_FOUND,
                        "%s: tensor '%s' is mapped to shard %s but missing there", index_path, key,
                        p ? p : json_string_value(v));
            pds_free(p);
            goto out;
        }
    }
out:
    pds_free(shards);
    json_decref(root);
    return s;
}

static void shape_str(const int64_t *shape, int ndim, char *buf, size_t cap)
{
    size_t len = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && len < cap; d++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (len < cap) snprintf(buf + len, cap - len, "]");
}

/* A view of table entry t; PDS_ERR_UNSUPPORTED for dtypes or layouts we cannot hand out. */
static pds_status_t make_view(const pds_model_t *m, const pds_st_tensor_t *t,
                              pds_tensor_view_t *out)
{
    const pds_st_file_t *f = &m->files[t->file];
    pds_dtype_t dt;
    if (!pds_st_dtype_to_pds(t->st_dtype, &dt))
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "%s: tensor '%s': dtype %s is not supported (need BF16, F16 or F32)",
                       f->path, t->name, pds_st_dtype_name(t->st_dtype));
    if (t->ndim > 4)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "%s: tensor '%s': %d dimensions (views hold 4)",
                       f->path, t->name, t->ndim);
    uint64_t off = 8 + f->header_len + t->begin;
    if (off % pds_dtype_size(dt) != 0)
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "%s: tensor '%s': data at file offset %" PRIu64
                       " is not aligned to its %zu-byte elements",
                       f->path, t->name, off, pds_dtype_size(dt));
    memset(out, 0, sizeof *out);
    out->data = (const unsigned char *)f->map + off;
    out->dtype = dt;
    out->ndim = t->ndim;
    for (int d = 0; d < t->ndim; d++) out->shape[d] = t->shape[d];
    out->numel = t->numel;
    return PDS_OK;
}

/* Binds every tensor the config requires; errors name the tensor and expected vs actual shape. */
static pds_status_t bind(pds_model_t *m, const char *where)
{
    const pds_model_config_t *c = &m->cfg;
    m->layers = pds_calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for %d layers", c->n_layers);
    int count = pds_model_synth_tensor_count(c);
    for (int i = 0; i < count; i++) {
        char name[128];
        int64_t shape[2];
        int ndim, is_norm;
        float scale;
        pds_status_t s =
            pds_model_synth_tensor_info(c, i, name, sizeof name, shape, &ndim, &scale, &is_norm);
        if (s == PDS_ERR_NOT_FOUND) continue; /* lm_head of a tied model */
        PDS_TRY(s);
        const pds_st_tensor_t *t = find_tensor(m, name);
        if (!t) {
            return PDS_ERR(PDS_ERR_NOT_FOUND, "%s: tensor '%s' is missing", where, name);
        }
        bool same = t->ndim == ndim;
        for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
        if (!same) {
            char want[64], got[160];
            shape_str(shape, ndim, want, sizeof want);
            shape_str(t->shape, t->ndim, got, sizeof got);
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "%s: tensor '%s' has shape %s but the config needs %s",
                           m->files[t->file].path, name, got, want);
        }
        pds_tensor_view_t *dst;
        if (i == 0)
            dst = &m->embed;
        else if (i == 1)
            dst = &m->final_norm;
        else if (i == 2)
            dst = &m->lm_head;
        else
            dst = (pds_tensor_view_t *)((char *)&m->layers[(i - 3) / 9] + layer_field[(i - 3) % 9]);
        PDS_TRY(make_view(m, t, dst));
    }
    if (c->tied_embeddings) m->lm_head = m->embed;
    return PDS_OK;
}

pds_status_t pds_model_load(const char *dir, pds_model_t **out)
{
    if (!dir || !out) return PDS_ERR(PDS_ERR_INVALID_ARG, "pds_model_load: NULL argument");
    pds_status_t s;
    char *cfg_path = NULL, *st_path = NULL, *idx_path = NULL;
    const char *where = NULL; /* the file that names the tensors, for error messages */
    pds_model_t *m = pds_calloc(1, sizeof *m);
    if (!m) return PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for a model");
    cfg_path = pds_model_path_join(dir, "config.json");
    st_path = pds_model_path_join(dir, "model.safetensors");
    idx_path = pds_model_path_join(dir, "model.safetensors.index.json");
    if (!cfg_path || !st_path || !idx_path) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "no memory for paths");
        goto fail;
    }
    s = pds_model_config_load(cfg_path, &m->cfg);
    if (s != PDS_OK) goto fail;
    where = st_path;
    if (file_exists(st_path)) {
        s = load_single(m, st_path);
    } else if (file_exists(idx_path)) {
        where = idx_path;
        s = load_sharded(m, dir, idx_path);
    } else {
        s = PDS_ERR(PDS_ERR_NOT_FOUND,
                    "%s: neither model.safetensors nor model.safetensors.index.json found", dir);
    }
    if (s != PDS_OK) goto fail;
    s = bind(m, where);
    if (s != PDS_OK) goto fail;
    pds_free(cfg_path);
    pds_free(st_path);
    pds_free(idx_path);
    *out = m;
    return PDS_OK;
fail:
    pds_free(cfg_path);
    pds_free(st_path);
    pds_free(idx_path);
    pds_model_destroy(m);
    return s;
}

const pds_model_config_t *pds_model_config(const pds_model_t *m)
{
    return &m->cfg;
}

const pds_tensor_view_t *pds_model_embed(const pds_model_t *m)
{
    return &m->embed;
}

const pds_tensor_view_t *pds_model_final_norm(const pds_model_t *m)
{
    return &m->final_norm;
}

const pds_tensor_view_t *pds_model_lm_head(const pds_model_t *m)
{
    return &m->lm_head;
}

const pds_layer_weights_t *pds_model_layer(const pds_model_t *m, int layer)
{
    PDS_ASSERT(layer >= 0 && layer < m->cfg.n_layers);
    return &m->layers[layer];
}

pds_status_t pds_model_tensor(const pds_model_t *m, const char *name, pds_tensor_view_t *out)
{
    const pds_st_tensor_t *t = find_tensor(m, name);
    if (!t) return PDS_ERR(PDS_ERR_NOT_FOUND, "tensor '%s' not in the model", name);
    return make_view(m, t, out);
}

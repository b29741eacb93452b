/* safetensors.c: maps a .safetensors file and validates its header before anyone touches a byte.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON
 * {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data section
 * that the offsets index. The file is mmap'ed read-only (weights are paged in on first touch and
 * shared with the page cache, so an 8B model costs no copy); the header is parsed once with
 * jansson and turned into a flat table. Every way a header can lie — short file, absurd length,
 * bad JSON, missing field, unknown dtype, shape that disagrees with its byte range, range past the
 * end, ranges that overlap — is rejected here with its own message naming the file and tensor, so
 * that later code can trust every view it hands out.
 */
#include "model/model_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* safetensors data is little-endian and views hand it out as is */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pdserve's model loader assumes a little-endian host"
#endif

/* ---- dtype table ------------------------------------------------------------------------------
 */
static const struct {
    const char *name;
    int size;
    int pds; /* pds_dtype_t, or -1 if valid in the format but not usable as a weight here */
} st_dtypes[] = {
    {"F32", 4, PDS_DTYPE_F32},
    {"F16", 2, PDS_DTYPE_F16},
    {"BF16", 2, PDS_DTYPE_BF16},
    {"F64", 8, -1},
    {"I64", 8, -1},
    {"U64", 8, -1},
    {"I32", 4, -1},
    {"U32", 4, -1},
    {"I16", 2, -1},
    {"U16", 2, -1},
    {"I8", 1, -1},
    {"U8", 1, -1},
    {"BOOL", 1, -1},
    {"F8_E4M3", 1, -1},
    {"F8_E5M2", 1, -1},
};

const char *pds_st_dtype_name(int st_dtype)
{
    return st_dtype >= 0 && st_dtype < (int)PDS_ARRAY_LEN(st_dtypes) ? st_dtypes[st_dtype].name
                                                                     : "?";
}

bool pds_st_dtype_to_pds(int st_dtype, pds_dtype_t *out)
{
    if (st_dtype < 0 || st_dtype >= (int)PDS_ARRAY_LEN(st_dtypes) || st_dtypes[st_dtype].pds < 0)
        return false;
    *out = (pds_dtype_t)st_dtypes[st_dtype].pds;
    return true;
}

int pds_st_dtype_find(const char *name)
{
    for (int i = 0; i < (int)PDS_ARRAY_LEN(st_dtypes); i++)
        if (strcmp(st_dtypes[i].name, name) == 0) return i;
    return -1;
}

char *pds_model_path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir);
    return pds_asprintf("%s%s%s", dir, n && dir[n - 1] == '/' ? "" : "/", name);
}

/* ---- header parsing ---------------------------------------------------------------------------
 */
static void shape_str(const pds_st_tensor_t *t, char *buf, size_t cap)
{
    size_t len = 0;
    len += (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->ndim && len < cap; d++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%" PRId64, d ? ", " : "", t->shape[d]);
    if (len < cap) snprintf(buf + len, cap - len, "]");
}

/* Parses one header entry into *t (name not yet set). */
static pds_status_t parse_entry(const char *path, const char *name, json_t *v, uint64_t data_size,
                                pds_st_tensor_t *t)
{
    if (!json_is_object(v))
        return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': header entry is not an object", path, name);

    json_t *jd = json_object_get(v, "dtype");
    if (!jd) return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': missing field \"dtype\"", path, name);
    if (!json_is_string(jd))
        return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': field \"dtype\" is not a string", path,
                       name);
    t->st_dtype = pds_st_dtype_find(json_string_value(jd));
    if (t->st_dtype < 0)
        return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': unknown dtype \"%s\"", path, name,
                       json_string_value(jd));

    json_t *js = json_object_get(v, "shape");
    if (!js) return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': missing field \"shape\"", path, name);
    if (!json_is_array(js))
        return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': field \"shape\" is not an array", path,
                       name);
    if (json_array_size(js) > PDS_ST_MAX_DIMS)
        return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': shape has %zu dimensions (at most %d)",
                       path, name, json_array_size(js), PDS_ST_MAX_DIMS);
    t->ndim = (int)json_array_size(js);
    t->numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        json_t *e = json_array_get(js, (size_t)d);
        if (!json_is_integer(e) || json_integer_value(e) < 0)
            return PDS_ERR(PDS_ERR_PARSE,
                           "%s: tensor '%s': shape[%d] is not a non-negative integer", path, name,
                           d);
        t->shape[d] = json_integer_value(e);
        if (t->shape[d] && t->numel > INT64_MAX / 8 / t->shape[d])
            return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': shape is too large", path, name);
        t->numel *= t->shape[d];
    }

    json_t *jo = json_object_get(v, "data_offsets");
    if (!jo)
        return PDS_ERR(PDS_ERR_PARSE, "%s: tensor '%s': missing field \"data_offsets\"", path,
                       name);
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(jb) ||
        !json_is_integer(je) || json_integer_value(jb) < 0 ||
        json_integer_value(je) < json_integer_value(jb))
        return PDS_ERR(PDS_ERR_PARSE,
                       "%s: tensor '%s': field \"data_offsets\" is not [begin, end] with "
                       "0 <= begin <= end",
                       path, name);
    t->begin = (uint64_t)json_integer_value(jb);
    t->end = (uint64_t)json_integer_value(je);

    uint64_t need = (uint64_t)t->numel * (uint64_t)st_dtypes[t->st_dtype].size;
    if (t->end - t->begin != need) {
        char sh[160];
        shape_str(t, sh, sizeof sh);
        return PDS_ERR(PDS_ERR_PARSE,
                       "%s: tensor '%s': shape %s of dtype %s needs %" PRIu64
                       " bytes but data_offsets [%" PRIu64 ", %" PRIu64 "] span %" PRIu64,
                       path, name, sh, st_dtypes[t->st_dtype].name, need, t->begin, t->end,
                       t->end - t->begin);
    }
    if (t->end > data_size)
        return PDS_ERR(PDS_ERR_PARSE,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                       "] run past the end of the data section (%" PRIu64 " bytes)",
                       path, name, t->begin, t->end, data_size);
    return PDS_OK;
}

static int cmp_begin(const void *a, const void *b)
{
    const pds_st_tensor_t *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Rejects overlapping byte ranges among t[0..n) (sorts them by offset; order is free here). */
static pds_status_t check_overlap(const char *path, pds_st_tensor_t *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_begin);
    const pds_st_tensor_t *hold = NULL; /* the nonempty tensor reaching furthest so far */
    for (int i = 0; i < n; i++) {
        if (t[i].begin == t[i].end) continue;
        if (hold && t[i].begin < hold->end)
            return PDS_ERR(PDS_ERR_PARSE,
                           "%s: tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64
                           ", %" PRIu64 ") overlap",
                           path, hold->name, hold->begin, hold->end, t[i].name, t[i].begin,
                           t[i].end);
        if (!hold || t[i].end > hold->end) hold = &t[i];
    }
    return PDS_OK;
}

static pds_status_t parse_header(const char *path, const pds_st_file_t *f, int file_index,
                                 pds_st_tensor_t **tensors, int *n)
{
    const char *hdr = (const char *)f->map + 8;
    uint64_t data_size = f->size - 8 - f->header_len;
    json_error_t jerr;
    json_t *root = json_loadb(hdr, (size_t)f->header_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return PDS_ERR(PDS_ERR_PARSE, "%s: header is not valid JSON: %s (line %d, column %d)", path,
                       jerr.text, jerr.line, jerr.column);
    pds_status_t s = PDS_OK;
    int base = *n, added = 0;
    if (!json_is_object(root)) {
        s = PDS_ERR(PDS_ERR_PARSE, "%s: header JSON is not an object", path);
        goto out_json;
    }
    size_t count = json_object_size(root);
    if (count > (size_t)(INT32_MAX / 2) - (size_t)base) {
        s = PDS_ERR(PDS_ERR_PARSE, "%s: header lists too many tensors (%zu)", path, count);
        goto out_json;
    }
    pds_st_tensor_t *grown = pds_realloc(*tensors, (size_t)(base + (int)count) * sizeof *grown);
    if (!grown) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory for a table of %zu tensors", path, count);
        goto out_json;
    }
    *tensors = grown;

    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(v)) {
                s = PDS_ERR(PDS_ERR_PARSE, "%s: \"__metadata__\" is not an object", path);
                goto out_names;
            }
            continue;
        }
        pds_st_tensor_t *t = &grown[base + added];
        memset(t, 0, sizeof *t);
        s = parse_entry(path, key, v, data_size, t);
        if (s != PDS_OK) goto out_names;
        t->file = file_index;
        t->name = pds_strdup(key);
        if (!t->name) {
            s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory for tensor name", path);
            goto out_names;
        }
        added++;
    }
    s = check_overlap(path, grown + base, added);
    if (s != PDS_OK) goto out_names;
    *n = base + added;
    json_decref(root);
    return PDS_OK;

out_names:
    for (int i = 0; i < added; i++) pds_free(grown[base + i].name);
out_json:
    json_decref(root);
    return s;
}

/* ---- files ------------------------------------------------------------------------------------
 */
pds_status_t pds_st_file_open(const char *path, int file_index, pds_st_file_t *f,
                              pds_st_tensor_t **tensors, int *n)
{
    memset(f, 0, sizeof *f);
    pds_status_t s;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return PDS_ERR(errno == ENOENT ? PDS_ERR_NOT_FOUND : PDS_ERR_IO, "%s: cannot open: %s",
                       path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        s = PDS_ERR(PDS_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto out_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        s = PDS_ERR(PDS_ERR_IO, "%s: not a regular file", path);
        goto out_fd;
    }
    f->size = (size_t)st.st_size;
    if (f->size < 8) {
        s = PDS_ERR(PDS_ERR_PARSE,
                    "%s: file is %zu bytes, shorter than the 8-byte header length field", path,
                    f->size);
        goto out_fd;
    }
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        s = PDS_ERR(PDS_ERR_IO, "%s: mmap of %zu bytes failed: %s", path, f->size, strerror(errno));
        goto out_fd;
    }
    close(fd);
    fd = -1;

    const unsigned char *p = f->map;
    for (int i = 7; i >= 0; i--) f->header_len = (f->header_len << 8) | p[i];
    if (f->header_len > PDS_ST_MAX_HEADER) {
        s = PDS_ERR(PDS_ERR_PARSE,
                    "%s: header length %" PRIu64 " is absurd (the format allows at most %llu)",
                    path, f->header_len, PDS_ST_MAX_HEADER);
        goto out_map;
    }
    if (f->header_len > f->size - 8) {
        s = PDS_ERR(PDS_ERR_PARSE,
                    "%s: header length %" PRIu64 " runs past the end of the file (%zu bytes)", path,
                    f->header_len, f->size);
        goto out_map;
    }
    f->path = pds_strdup(path);
    if (!f->path) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "%s: no memory", path);
        goto out_map;
    }
    s = parse_header(path, f, file_index, tensors, n);
    if (s != PDS_OK) goto out_path;
    return PDS_OK;

out_path:
    pds_free(f->path);
    f->path = NULL;
out_map:
    munmap(f->map, f->size);
    f->map = NULL;
out_fd:
    if (fd >= 0) close(fd);
    return s;
}

void pds_st_file_close(pds_st_file_t *f)
{
    if (!f) return;
    if (f->map) munmap(f->map, f->size);
    pds_free(f->path);
    memset(f, 0, sizeof *f);
}

/* slo_profile.c: profile files — a node's fitted latency model as JSON (jansson), with magic and
 * version so a router or planner never mistakes another JSON file for one.
 *
 * Loading is strict about what it needs (magic, version, the six prefill/decode coefficients) and
 * lenient about the rest (defaults from pds_slo_profile_init), and every error names the file and
 * the field, since profiles are written by hand as often as by the profiler.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "slo/slo.h"

void pds_slo_profile_init(pds_slo_profile_t *p)
{
    memset(p, 0, sizeof *p);
    p->tp = p->pp = 1;
    p->block_size = 16;
    p->max_batch_tokens = 8192;
    p->max_batch_seqs = 256;
}

/* Reads obj[key] as a finite number; required fields missing are an error, optional ones keep *out.
 */
static pds_status_t get_num(const char *name, json_t *obj, const char *sect, const char *key,
                            bool required, double *out)
{
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v) {
        if (!required) return PDS_OK;
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: missing field %s%s%s", name, sect ? sect : "",
                       sect ? "." : "", key);
    }
    if (!json_is_number(v) || !isfinite(json_number_value(v)))
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: field %s%s%s must be a finite number", name,
                       sect ? sect : "", sect ? "." : "", key);
    *out = json_number_value(v);
    return PDS_OK;
}

static pds_status_t get_int(const char *name, json_t *obj, const char *sect, const char *key,
                            bool required, int64_t lo, int64_t hi, int64_t *out)
{
    double d = (double)*out;
    PDS_TRY(get_num(name, obj, sect, key, required, &d));
    if (d != floor(d) || d < (double)lo || d > (double)hi)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "profile %s: field %s%s%s = %g, expected an integer in "
                       "%lld..%lld",
                       name, sect ? sect : "", sect ? "." : "", key, d, (long long)lo,
                       (long long)hi);
    *out = (int64_t)d;
    return PDS_OK;
}

static pds_status_t get_str(const char *name, json_t *obj, const char *key, bool required,
                            char *out, size_t cap)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (!required) return PDS_OK;
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: missing field %s", name, key);
    }
    if (!json_is_string(v))
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: field %s must be a string", name, key);
    snprintf(out, cap, "%s", json_string_value(v));
    return PDS_OK;
}

static json_t *get_section(const char *name, json_t *root, const char *key, bool required,
                           pds_status_t *s)
{
    json_t *v = json_object_get(root, key);
    if (!v) {
        if (required) *s = PDS_ERR(PDS_ERR_PARSE, "profile %s: missing section %s", name, key);
        return NULL;
    }
    if (!json_is_object(v)) {
        *s = PDS_ERR(PDS_ERR_PARSE, "profile %s: %s must be an object", name, key);
        return NULL;
    }
    return v;
}

static pds_status_t get_fit(const char *name, json_t *sec, const char *sect, pds_slo_fit_t *f)
{
    int64_t n = f->n;
    PDS_TRY(get_num(name, sec, sect, "rms_rel_err", false, &f->rms_rel));
    PDS_TRY(get_num(name, sec, sect, "r2", false, &f->r2));
    PDS_TRY(get_int(name, sec, sect, "samples", false, 0, INT32_MAX, &n));
    f->n = (int)n;
    return PDS_OK;
}

/* decode.knots: absent, or 2..PDS_SLO_MAX_KNOTS {batch, base_ms, ms_per_context_token} with
 * batches >= 1 and strictly increasing. */
static pds_status_t get_knots(const char *name, json_t *dec, pds_slo_model_t *m)
{
    json_t *arr = json_object_get(dec, "knots");
    m->decode_knots = 0;
    if (!arr) return PDS_OK;
    size_t n = json_is_array(arr) ? json_array_size(arr) : 0;
    if (!json_is_array(arr) || n < 2 || n > PDS_SLO_MAX_KNOTS)
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: decode.knots must be an array of 2..%d knots",
                       name, PDS_SLO_MAX_KNOTS);
    for (size_t i = 0; i < n; i++) {
        json_t *k = json_array_get(arr, i);
        char sect[32];
        snprintf(sect, sizeof sect, "decode.knots[%zu]", i);
        if (!json_is_object(k))
            return PDS_ERR(PDS_ERR_PARSE, "profile %s: %s must be an object", name, sect);
        PDS_TRY(get_num(name, k, sect, "batch", true, &m->decode_knot_batch[i]));
        PDS_TRY(get_num(name, k, sect, "base_ms", true, &m->decode_knot_base[i]));
        PDS_TRY(get_num(name, k, sect, "ms_per_context_token", true, &m->decode_knot_f[i]));
        if (m->decode_knot_batch[i] < 1 ||
            (i > 0 && !(m->decode_knot_batch[i] > m->decode_knot_batch[i - 1])))
            return PDS_ERR(PDS_ERR_PARSE,
                           "profile %s: %s.batch %g: batches must be >= 1 and increasing", name,
                           sect, m->decode_knot_batch[i]);
    }
    m->decode_knots = (int)n;
    return PDS_OK;
}

static pds_status_t profile_from_json(json_t *root, const char *name, pds_slo_profile_t *out)
{
    pds_slo_profile_t p;
    pds_slo_profile_init(&p);
    pds_status_t s = PDS_OK;
    if (!json_is_object(root))
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: top level must be a JSON object", name);
    char magic[32] = "";
    PDS_TRY(get_str(name, root, "magic", true, magic, sizeof magic));
    if (strcmp(magic, PDS_SLO_PROFILE_MAGIC) != 0)
        return PDS_ERR(PDS_ERR_PARSE, "profile %s: magic is '%s', expected '%s'", name, magic,
                       PDS_SLO_PROFILE_MAGIC);
    int64_t version = 0;
    PDS_TRY(get_int(name, root, NULL, "version", true, 1, INT32_MAX, &version));
    if (version > PDS_SLO_PROFILE_VERSION)
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "profile %s: version %lld is newer than this build's %d", name,
                       (long long)version, PDS_SLO_PROFILE_VERSION);
    PDS_TRY(get_str(name, root, "model", true, p.model_name, sizeof p.model_name));
    PDS_TRY(get_str(name, root, "device", false, p.device, sizeof p.device));
    PDS_TRY(get_str(name, root, "backend", false, p.backend, sizeof p.backend));
    PDS_TRY(get_str(name, root, "created", false, p.created, sizeof p.created));
    int64_t tp = 1, pp = 1, threads = 0;
    PDS_TRY(get_int(name, root, NULL, "tp", false, 1, 1024, &tp));
    PDS_TRY(get_int(name, root, NULL, "pp", false, 1, 1024, &pp));
    PDS_TRY(get_int(name, root, NULL, "threads", false, 0, 65536, &threads));
    p.tp = (int)tp, p.pp = (int)pp, p.threads = (int)threads;

    json_t *pre = get_section(name, root, "prefill", true, &s);
    if (!pre) return s;
    PDS_TRY(get_num(name, pre, "prefill", "a_ms", true, &p.m.prefill_a));
    PDS_TRY(get_num(name, pre, "prefill", "b_ms_per_token", true, &p.m.prefill_b));
    PDS_TRY(get_num(name, pre, "prefill", "c_ms_per_token2", true, &p.m.prefill_c));
    PDS_TRY(get_fit(name, pre, "prefill", &p.prefill_fit));

    json_t *dec = get_section(name, root, "decode", true, &s);
    if (!dec) return s;
    PDS_TRY(get_num(name, dec, "decode", "d_ms", true, &p.m.decode_d));
    PDS_TRY(get_num(name, dec, "decode", "e_ms_per_seq", true, &p.m.decode_e));
    PDS_TRY(get_num(name, dec, "decode", "f_ms_per_context_token", true, &p.m.decode_f));
    int64_t split = 0;
    PDS_TRY(get_int(name, dec, "decode", "split_batch", false, 0, 1 << 20, &split));
    p.m.decode_split = (int)split;
    PDS_TRY(get_num(name, dec, "decode", "d2_ms", split > 0, &p.m.decode_d2));
    PDS_TRY(get_num(name, dec, "decode", "e2_ms_per_seq", split > 0, &p.m.decode_e2));
    PDS_TRY(get_num(name, dec, "decode", "f2_ms_per_context_token", split > 0, &p.m.decode_f2));
    PDS_TRY(get_fit(name, dec, "decode", &p.decode_fit));
    PDS_TRY(get_knots(name, dec, &p.m));

    json_t *tr = get_section(name, root, "transfer", false, &s);
    if (s != PDS_OK) return s;
    PDS_TRY(get_num(name, tr, "transfer", "gbytes_per_s", false, &p.m.link_gbytes_per_s));
    PDS_TRY(get_num(name, tr, "transfer", "msg_ms", false, &p.m.link_msg_ms));
    if (p.m.link_gbytes_per_s < 0 || p.m.link_msg_ms < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "profile %s: transfer bandwidth and cost must be >= 0",
                       name);

    json_t *kv = get_section(name, root, "kv", false, &s);
    if (s != PDS_OK) return s;
    int64_t bpt = 0, layers = 0, bs = p.block_size, blocks = 0;
    PDS_TRY(get_int(name, kv, "kv", "bytes_per_token", false, 0, INT64_C(1) << 40, &bpt));
    PDS_TRY(get_int(name, kv, "kv", "n_layers", false, 0, 4096, &layers));
    PDS_TRY(get_int(name, kv, "kv", "block_size", false, 1, 1 << 16, &bs));
    PDS_TRY(get_int(name, kv, "kv", "blocks", false, 0, INT64_C(1) << 40, &blocks));
    p.m.kv_bytes_per_token = bpt, p.m.n_layers = (int)layers;
    p.block_size = (int)bs, p.kv_blocks = blocks;

    json_t *cl = get_section(name, root, "cluster", false, &s);
    if (s != PDS_OK) return s;
    PDS_TRY(get_num(name, cl, "cluster", "ttft_overhead_ms", false, &p.m.ttft_overhead_ms));
    PDS_TRY(get_num(name, cl, "cluster", "decode_step_overhead_ms", false,
                    &p.m.decode_step_overhead_ms));
    PDS_TRY(get_num(name, cl, "cluster", "decode_contention", false, &p.m.decode_contention));
    PDS_TRY(get_num(name, cl, "cluster", "prefill_contention", false, &p.m.prefill_contention));
    if (cl) PDS_TRY(get_str(name, cl, "calibration", false, p.calibration, sizeof p.calibration));
    if (p.m.ttft_overhead_ms < 0 || p.m.decode_step_overhead_ms < 0 || p.m.decode_contention < 0 ||
        p.m.prefill_contention < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "profile %s: cluster overheads and contention must be >= 0", name);

    json_t *lim = get_section(name, root, "limits", false, &s);
    if (s != PDS_OK) return s;
    int64_t mbt = p.max_batch_tokens, mbs = p.max_batch_seqs;
    PDS_TRY(get_int(name, lim, "limits", "max_batch_tokens", false, 1, INT32_MAX, &mbt));
    PDS_TRY(get_int(name, lim, "limits", "max_batch_seqs", false, 1, INT32_MAX, &mbs));
    p.max_batch_tokens = (int)mbt, p.max_batch_seqs = (int)mbs;

    /* a model that predicts no time at all for real work is a broken profile, not a fast GPU */
    if (pds_slo_prefill_ms(&p.m, 1024) <= 0 || pds_slo_decode_step_ms(&p.m, 8, 8192) <= 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "profile %s: coefficients predict no time for a 1024-token prefill or an "
                       "8-sequence decode step",
                       name);
    *out = p;
    return PDS_OK;
}

pds_status_t pds_slo_profile_parse(const char *text, const char *name, pds_slo_profile_t *out)
{
    json_error_t err;
    json_t *root = json_loads(text, 0, &err);
    if (!root)
        return PDS_ERR(PDS_ERR_PARSE, "profile %s:%d:%d: %s", name, err.line, err.column, err.text);
    pds_status_t s = profile_from_json(root, name, out);
    json_decref(root);
    return s;
}

pds_status_t pds_slo_profile_load(const char *path, pds_slo_profile_t *out)
{
    FILE *f = fopen(path, "rb");
    if (!f) return PDS_ERR(PDS_ERR_IO, "profile %s: cannot open: %m", path);
    json_error_t err;
    json_t *root = json_loadf(f, 0, &err);
    fclose(f);
    if (!root)
        return PDS_ERR(PDS_ERR_PARSE, "profile %s:%d:%d: %s", path, err.line, err.column, err.text);
    pds_status_t s = profile_from_json(root, path, out);
    json_decref(root);
    return s;
}

pds_status_t pds_slo_profile_save(const pds_slo_profile_t *p, const char *path)
{
    const pds_slo_model_t *m = &p->m;
    char created[32];
    snprintf(created, sizeof created, "%s", p->created);
    if (!created[0]) {
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    json_t *root = json_pack("{s:s, s:i, s:s, s:s, s:s, s:i, s:i, s:i, s:s}", "magic",
                             PDS_SLO_PROFILE_MAGIC, "version", PDS_SLO_PROFILE_VERSION, "model",
                             p->model_name, "device", p->device, "backend", p->backend, "tp", p->tp,
                             "pp", p->pp, "threads", p->threads, "created", created);
    json_t *pre =
        json_pack("{s:f, s:f, s:f, s:f, s:f, s:i}", "a_ms", m->prefill_a, "b_ms_per_token",
                  m->prefill_b, "c_ms_per_token2", m->prefill_c, "rms_rel_err",
                  p->prefill_fit.rms_rel, "r2", p->prefill_fit.r2, "samples", p->prefill_fit.n);
    json_t *dec = json_pack(
        "{s:f, s:f, s:f, s:i, s:f, s:f, s:f, s:f, s:f, s:i}", "d_ms", m->decode_d, "e_ms_per_seq",
        m->decode_e, "f_ms_per_context_token", m->decode_f, "split_batch", m->decode_split, "d2_ms",
        m->decode_d2, "e2_ms_per_seq", m->decode_e2, "f2_ms_per_context_token", m->decode_f2,
        "rms_rel_err", p->decode_fit.rms_rel, "r2", p->decode_fit.r2, "samples", p->decode_fit.n);
    if (dec && m->decode_knots > 0) {
        json_t *arr = json_array();
        for (int i = 0; arr && i < m->decode_knots; i++)
            json_array_append_new(arr,
                                  json_pack("{s:f, s:f, s:f}", "batch", m->decode_knot_batch[i],
                                            "base_ms", m->decode_knot_base[i],
                                            "ms_per_context_token", m->decode_knot_f[i]));
        if (!arr || json_array_size(arr) != (size_t)m->decode_knots ||
            json_object_set_new(dec, "knots", arr) != 0) {
            json_decref(dec);
            dec = NULL; /* reported below as out of memory */
        }
    }
    json_t *tr =
        json_pack("{s:f, s:f}", "gbytes_per_s", m->link_gbytes_per_s, "msg_ms", m->link_msg_ms);
    json_t *kv = json_pack("{s:I, s:i, s:i, s:I}", "bytes_per_token",
                           (json_int_t)m->kv_bytes_per_token, "n_layers", m->n_layers, "block_size",
                           p->block_size, "blocks", (json_int_t)p->kv_blocks);
    json_t *lim = json_pack("{s:i, s:i}", "max_batch_tokens", p->max_batch_tokens, "max_batch_seqs",
                            p->max_batch_seqs);
    pds_status_t s = PDS_OK;
    if (!root || !pre || !dec || !tr || !kv || !lim) {
        /* NaN fit errors (never evaluated) make json_pack fail: that is a caller bug worth naming
         */
        s = PDS_ERR(PDS_ERR_INVALID_ARG, "profile %s: cannot encode (a NaN or infinite value?)",
                    path);
        json_decref(pre), json_decref(dec), json_decref(tr), json_decref(kv), json_decref(lim);
        goto out;
    }
    json_object_set_new(root, "prefill", pre);
    json_object_set_new(root, "decode", dec);
    json_object_set_new(root, "transfer", tr);
    json_object_set_new(root, "kv", kv);
    json_object_set_new(root, "limits", lim);
    if (m->ttft_overhead_ms != 0 || m->decode_step_overhead_ms != 0 || m->decode_contention != 0 ||
        m->prefill_contention != 0 || p->calibration[0]) {
        json_t *cl = json_pack("{s:f, s:f, s:f, s:f, s:s}", "ttft_overhead_ms", m->ttft_overhead_ms,
                               "decode_step_overhead_ms", m->decode_step_overhead_ms,
                               "decode_contention", m->decode_contention, "prefill_contention",
                               m->prefill_contention, "calibration", p->calibration);
        if (!cl) {
            s = PDS_ERR(PDS_ERR_INVALID_ARG, "profile %s: cannot encode the cluster section", path);
            goto out;
        }
        json_object_set_new(root, "cluster", cl);
    }
    if (json_dump_file(root, path,
                       JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17)) != 0)
        s = PDS_ERR(PDS_ERR_IO, "profile %s: cannot write", path);
out:
    json_decref(root);
    return s;
}

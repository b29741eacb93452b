/* slo_workload.c: request streams for the simulator and the planner — a seeded generator (Poisson
 * or gamma arrivals, lognormal lengths or lengths drawn from a trace), the built-in workloads, and
 * the Azure LLM inference trace CSV reader.
 *
 * Arrivals and lengths come from two independent random streams, and arrivals are drawn at unit
 * rate and then divided by the rate: the same seed at two rates gives the same requests in the same
 * pattern, only stretched. A goodput bisection therefore compares rates on identical requests,
 * which keeps attainment monotone in rate far better than fresh draws would.
 *
 * Built-in length distributions (lognormal: median, sigma of ln; clipped). Where each number comes
 * from — see also router/plan/README.md:
 *   chatbot (ShareGPT-like): means 161 prompt / 338 output tokens, the ShareGPT sample statistics
 *     in the vLLM paper (Kwon et al., SOSP 2023, Fig. 11). The sigmas (1.0 / 0.9, i.e. heavy
 *     tails) are our choice, not fitted to the data: median = mean / exp(sigma^2 / 2).
 *   code (HumanEval-like): HumanEval has 164 problems (Chen et al. 2021); prompt ~130 and
 *     completion ~60 tokens are our estimate (problem text at ~3.5 characters per token), sigma
 * 0.5. summarization (LongBench-like): LongBench's English summarization sets average 8,734
 *     (GovReport), 10,614 (QMSum) and 2,113 (MultiNews) words (Bai et al., ACL 2024, Table 1) and
 *     its evaluation caps outputs at 512 tokens; we take prompts with median 6,000 tokens, sigma
 *     0.6, clipped to 1k..16k, and outputs with median 300, sigma 0.5, clipped to 32..512.
 * The Azure traces (trace:FILE) are measured: use them when the numbers matter.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slo/slo.h"
#include "slo/slo_internal.h"

/* ---- random numbers (xoshiro256**, seeded through splitmix64) -------------------------------- */
void slo_rng_seed(slo_rng_t *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) {
        x = pds_mix64(x + (uint64_t)i);
        r->s[i] = x ? x : 0x9e3779b97f4a7c15ULL;
    }
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t slo_rng_next(slo_rng_t *r)
{
    uint64_t *s = r->s, out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = rotl(s[3], 45);
    return out;
}

double slo_rng_uniform(slo_rng_t *r) /* (0, 1) */
{
    return ((double)(slo_rng_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

double slo_rng_normal(slo_rng_t *r)
{
    /* Box-Muller, one value per call: deterministic draw counts matter more than speed here */
    double u = slo_rng_uniform(r), v = slo_rng_uniform(r);
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/* Gamma(shape k, scale 1) by Marsaglia-Tsang; k < 1 through the U^(1/k) boost. */
double slo_rng_gamma(slo_rng_t *r, double k)
{
    if (k < 1) return slo_rng_gamma(r, k + 1) * pow(slo_rng_uniform(r), 1 / k);
    double d = k - 1.0 / 3, c = 1 / sqrt(9 * d);
    for (;;) {
        double x = slo_rng_normal(r), v = 1 + c * x;
        if (v <= 0) continue;
        v = v * v * v;
        double u = slo_rng_uniform(r);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v)) return d * v;
    }
}

/* ---- built-in workloads -------------------------------------------------------------------------
 */
pds_status_t pds_slo_workload_builtin(const char *name, pds_slo_workload_t *out)
{
    pds_slo_workload_t w = {.name = name, .arrival = PDS_SLO_ARRIVAL_POISSON, .cv = 1};
    if (name && strcmp(name, "chatbot") == 0) {
        w.prompt_median = 161.0 / exp(0.5 * 1.0 * 1.0), w.prompt_sigma = 1.0;
        w.prompt_min = 4, w.prompt_max = 4096;
        w.output_median = 338.0 / exp(0.5 * 0.9 * 0.9), w.output_sigma = 0.9;
        w.output_min = 1, w.output_max = 2048;
    } else if (name && strcmp(name, "code") == 0) {
        w.prompt_median = 130.0 / exp(0.5 * 0.25), w.prompt_sigma = 0.5;
        w.prompt_min = 16, w.prompt_max = 1024;
        w.output_median = 60.0 / exp(0.5 * 0.25), w.output_sigma = 0.5;
        w.output_min = 8, w.output_max = 512;
    } else if (name && strcmp(name, "summarization") == 0) {
        w.prompt_median = 6000, w.prompt_sigma = 0.6;
        w.prompt_min = 1024, w.prompt_max = 16000;
        w.output_median = 300, w.output_sigma = 0.5;
        w.output_min = 32, w.output_max = 512;
    } else {
        return PDS_ERR(PDS_ERR_NOT_FOUND,
                       "workload '%s': expected chatbot, code, summarization or trace:FILE.csv",
                       name ? name : "(null)");
    }
    *out = w;
    return PDS_OK;
}

static int32_t lognormal_len(slo_rng_t *r, double median, double sigma, int32_t lo, int32_t hi)
{
    double v = exp(log(median) + sigma * slo_rng_normal(r));
    v = floor(v + 0.5);
    if (v < lo) v = lo;
    if (v > hi) v = hi;
    return (int32_t)v;
}

pds_status_t pds_slo_workload_generate(const pds_slo_workload_t *w, double rate_per_s, int n,
                                       uint64_t seed, int32_t max_context, pds_slo_req_t *out)
{
    if (!(rate_per_s > 0) || !isfinite(rate_per_s))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "workload: rate %g req/s must be > 0", rate_per_s);
    if (n < 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "workload: %d requests", n);
    bool from_trace = w->trace != NULL;
    if (w->arrival == PDS_SLO_ARRIVAL_TRACE && (!from_trace || w->trace->n < 1))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "workload %s: trace arrivals need a non-empty trace",
                       w->name ? w->name : "");
    if (from_trace && w->trace->n < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "workload %s: empty trace", w->name ? w->name : "");
    if (!from_trace &&
        (!(w->prompt_median >= 1) || !(w->output_median >= 1) || w->prompt_min < 1 ||
         w->output_min < 1 || w->prompt_max < w->prompt_min || w->output_max < w->output_min))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "workload %s: length distribution out of range",
                       w->name ? w->name : "");
    if (!(w->length_scale >= 0) || !isfinite(w->length_scale))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "workload: length scale %g must be >= 0",
                       w->length_scale);
    if (w->arrival == PDS_SLO_ARRIVAL_GAMMA && !(w->cv > 0))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "workload: gamma arrivals need cv > 0 (got %g)", w->cv);
    slo_rng_t ra, rl;
    slo_rng_seed(&ra, seed ^ 0xa5a5a5a5a5a5a5a5ULL);
    slo_rng_seed(&rl, seed);
    const pds_slo_trace_t *tr = w->trace;
    double t = 0, ms_per_unit = 1000.0 / rate_per_s;
    /* trace replay: stretch the trace's time so the mean rate becomes rate_per_s */
    double trace_span = 0, trace_scale = 0;
    if (w->arrival == PDS_SLO_ARRIVAL_TRACE) {
        /* the rate is that of the requests replayed: the first n when n is shorter than the
         * trace (an hour-long trace's first minute may be far from its mean rate) */
        double mean_gap = tr->n > 1 ? tr->duration_ms / (tr->n - 1) : 1000.0;
        if (n > 1 && n < tr->n && tr->reqs[n - 1].arrival_ms > 0)
            mean_gap = tr->reqs[n - 1].arrival_ms / (n - 1);
        if (!(mean_gap > 0)) mean_gap = 1000.0;
        trace_scale = (1000.0 / rate_per_s) / mean_gap;
        trace_span = tr->duration_ms + mean_gap; /* a wrapped replay continues after one gap */
    }
    for (int i = 0; i < n; i++) {
        switch (w->arrival) {
        case PDS_SLO_ARRIVAL_POISSON:
            t += -log(slo_rng_uniform(&ra)) * ms_per_unit;
            break;
        case PDS_SLO_ARRIVAL_GAMMA: {
            double k = 1 / (w->cv * w->cv);
            t += slo_rng_gamma(&ra, k) / k * ms_per_unit;
            break;
        }
        case PDS_SLO_ARRIVAL_TRACE: {
            int wrap = i / tr->n;
            t = (tr->reqs[i % tr->n].arrival_ms + wrap * trace_span) * trace_scale;
            break;
        }
        }
        out[i].arrival_ms = t;
        if (from_trace) {
            int j = w->arrival == PDS_SLO_ARRIVAL_TRACE
                        ? i % tr->n
                        : (int)(slo_rng_next(&rl) % (uint64_t)tr->n);
            out[i].prompt_tokens = tr->reqs[j].prompt_tokens;
            out[i].output_tokens = tr->reqs[j].output_tokens;
        } else {
            out[i].prompt_tokens =
                lognormal_len(&rl, w->prompt_median, w->prompt_sigma, w->prompt_min, w->prompt_max);
            out[i].output_tokens =
                lognormal_len(&rl, w->output_median, w->output_sigma, w->output_min, w->output_max);
        }
        if (w->length_scale > 0 && w->length_scale != 1) {
            out[i].prompt_tokens =
                (int32_t)PDS_MAX(1.0, floor(out[i].prompt_tokens * w->length_scale + 0.5));
            out[i].output_tokens =
                (int32_t)PDS_MAX(1.0, floor(out[i].output_tokens * w->length_scale + 0.5));
        }
        if (max_context > 1) {
            if (out[i].prompt_tokens > max_context - 1) out[i].prompt_tokens = max_context - 1;
            if (out[i].prompt_tokens + out[i].output_tokens > max_context)
                out[i].output_tokens = max_context - out[i].prompt_tokens;
        }
    }
    return PDS_OK;
}

/* ---- trace CSV ----------------------------------------------------------------------------------
 */
static int64_t days_from_civil(int64_t y, int m, int d) /* Howard Hinnant's algorithm */
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* "YYYY-MM-DD HH:MM:SS[.frac]" or seconds as a number -> whole seconds + fraction (kept apart:
 * epoch seconds in one double would leave only ~0.2 us of the fraction); false if neither. */
static bool parse_timestamp(const char *s, int64_t *whole, double *frac)
{
    int y, mo, d, h, mi, sec, n = 0;
    if (sscanf(s, "%4d-%2d-%2d%*[ T]%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) == 6) {
        double f = 0;
        if (s[n] == '.') {
            char *end;
            f = strtod(s + n, &end);
            if (end == s + n + 1 || *end != '\0') return false;
        } else if (s[n] != '\0') {
            return false;
        }
        if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec < 0 || sec > 60)
            return false;
        *whole = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec;
        *frac = f;
        return true;
    }
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno || !isfinite(v) || fabs(v) > 9e15) return false;
    *whole = (int64_t)floor(v);
    *frac = v - floor(v);
    return true;
}

static bool parse_count(const char *s, int32_t *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno || v < 0 || v > INT32_MAX) return false;
    *out = (int32_t)v;
    return true;
}

/* Trims spaces in place. */
static char *trim(char *s)
{
    while (isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = '\0';
    return s;
}

static int cmp_arrival(const void *a, const void *b)
{
    double x = ((const pds_slo_req_t *)a)->arrival_ms, y = ((const pds_slo_req_t *)b)->arrival_ms;
    return (x > y) - (x < y);
}

pds_status_t pds_slo_trace_parse(const char *text, size_t len, const char *name,
                                 pds_slo_trace_t **out)
{
    pds_status_t s = PDS_OK;
    char line[512];
    int col_ts = -1, col_in = -1, col_out = -1, lineno = 0, cap = 0, n = 0;
    int64_t w0 = INT64_MAX;
    double f0 = 0;
    int64_t *whole = NULL;
    double *secs = NULL; /* (cap) fractions */
    pds_slo_trace_t *t = pds_calloc(1, sizeof *t);
    if (!t) return PDS_ERR(PDS_ERR_NO_MEMORY, "trace %s", name);
    size_t pos = 0;
    while (pos < len) {
        size_t end = pos;
        while (end < len && text[end] != '\n') end++;
        lineno++;
        size_t l = end - pos;
        if (l >= sizeof line) {
            s = PDS_ERR(PDS_ERR_PARSE, "trace %s:%d: line longer than %zu bytes", name, lineno,
                        sizeof line - 1);
            goto fail;
        }
        memcpy(line, text + pos, l);
        line[l] = '\0';
        pos = end + 1;
        char *ln = trim(line);
        if (!*ln) continue;
        char *f[4];
        int nf = 0;
        for (char *p = ln;; p++) {
            if (nf < 4) f[nf] = p;
            nf++;
            p = strchr(p, ',');
            if (!p) break;
            *p = '\0';
        }
        if (nf != 3) {
            s = PDS_ERR(PDS_ERR_PARSE, "trace %s:%d: %d fields, expected 3 (%s)", name, lineno, nf,
                        col_ts < 0 ? "TIMESTAMP,ContextTokens,GeneratedTokens"
                                   : "timestamp,context tokens,generated tokens");
            goto fail;
        }
        for (int i = 0; i < 3; i++) f[i] = trim(f[i]);
        if (col_ts < 0) {
            for (int i = 0; i < 3; i++) {
                if (strcasecmp(f[i], "TIMESTAMP") == 0) col_ts = i;
                if (strcasecmp(f[i], "ContextTokens") == 0) col_in = i;
                if (strcasecmp(f[i], "GeneratedTokens") == 0) col_out = i;
            }
            if (col_ts < 0 || col_in < 0 || col_out < 0) {
                s = PDS_ERR(PDS_ERR_PARSE,
                            "trace %s:%d: header must name TIMESTAMP, ContextTokens and "
                            "GeneratedTokens",
                            name, lineno);
                col_ts = -1;
                goto fail;
            }
            continue;
        }
        int64_t sw;
        double sf;
        int32_t in, outn;
        if (!parse_timestamp(f[col_ts], &sw, &sf)) {
            s = PDS_ERR(PDS_ERR_PARSE, "trace %s:%d: bad timestamp '%s'", name, lineno, f[col_ts]);
            goto fail;
        }
        if (!parse_count(f[col_in], &in) || in < 1) {
            s = PDS_ERR(PDS_ERR_PARSE, "trace %s:%d: context tokens '%s' is not an integer >= 1",
                        name, lineno, f[col_in]);
            goto fail;
        }
        if (!parse_count(f[col_out], &outn)) {
            s = PDS_ERR(PDS_ERR_PARSE, "trace %s:%d: generated tokens '%s' is not an integer >= 0",
                        name, lineno, f[col_out]);
            goto fail;
        }
        if (n == cap) {
            int nc = cap ? 2 * cap : 1024;
            pds_slo_req_t *nr = pds_realloc(t->reqs, sizeof *nr * (size_t)nc);
            double *ns = pds_realloc(secs, sizeof *ns * (size_t)nc);
            if (nr) t->reqs = nr;
            if (ns) secs = ns;
            int64_t *nw = pds_realloc(whole, sizeof *nw * (size_t)nc);
            if (nw) whole = nw;
            if (!nr || !ns || !nw) {
                s = PDS_ERR(PDS_ERR_NO_MEMORY, "trace %s: %d requests", name, nc);
                goto fail;
            }
            cap = nc;
        }
        whole[n] = sw, secs[n] = sf;
        if (sw < w0 || (sw == w0 && sf < f0)) w0 = sw, f0 = sf;
        /* a request always yields at least its first token */
        t->reqs[n++] = (pds_slo_req_t){0, in, outn > 0 ? outn : 1};
    }
    if (col_ts < 0) {
        s = PDS_ERR(PDS_ERR_PARSE, "trace %s: empty (no header line)", name);
        goto fail;
    }
    for (int i = 0; i < n; i++)
        t->reqs[i].arrival_ms = ((double)(whole[i] - w0) + (secs[i] - f0)) * 1000.0;
    qsort(t->reqs, (size_t)n, sizeof *t->reqs, cmp_arrival);
    t->n = n;
    t->duration_ms = n ? t->reqs[n - 1].arrival_ms : 0;
    pds_free(secs);
    pds_free(whole);
    *out = t;
    return PDS_OK;
fail:
    pds_free(secs);
    pds_free(whole);
    pds_slo_trace_destroy(t);
    return s;
}

pds_status_t pds_slo_trace_load(const char *path, pds_slo_trace_t **out)
{
    FILE *f = fopen(path, "rb");
    if (!f) return PDS_ERR(PDS_ERR_IO, "trace %s: cannot open: %m", path);
    size_t cap = 1 << 16, len = 0;
    char *buf = pds_malloc(cap);
    pds_status_t s = PDS_OK;
    if (!buf) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "trace %s", path);
        goto out;
    }
    for (;;) {
        if (len == cap) {
            char *nb = pds_realloc(buf, cap * 2);
            if (!nb) {
                s = PDS_ERR(PDS_ERR_NO_MEMORY, "trace %s: %zu bytes", path, cap * 2);
                goto out;
            }
            buf = nb, cap *= 2;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0) break;
    }
    if (ferror(f)) {
        s = PDS_ERR(PDS_ERR_IO, "trace %s: read error", path);
        goto out;
    }
    s = pds_slo_trace_parse(buf, len, path, out);
out:
    pds_free(buf);
    fclose(f);
    return s;
}

void pds_slo_trace_destroy(pds_slo_trace_t *t)
{
    if (!t) return;
    pds_free(t->reqs);
    pds_free(t);
}

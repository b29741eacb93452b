/* slo_model.c: the latency model's predictions, its least-squares fits, the online refit window and
 * the placement choice.
 *
 * Fits weight each sample by 1/y^2 (relative error) and solve by Householder QR after scaling each
 * column to unit norm: the (1, T, T^2) columns of a prefill fit differ by eight orders of
 * magnitude, which the normal equations would square. Placement scores every (prefill, decode) pair
 * — a few dozen nodes make that a few thousand predictions, far below one RPC — and keeps the one
 * with the most slack, ties to the lowest indices so the router and the simulator decide
 * identically.
 */
#include <float.h>
#include <stdlib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "slo/slo.h"

#define LSTSQ_MAX_K 8

/* ---- prediction ---------------------------------------------------------------------------------
 */
double pds_slo_prefill_ms(const pds_slo_model_t *m, double tokens)
{
    return pds_slo_prefill_batch_ms(m, tokens, tokens * tokens);
}

double pds_slo_prefill_batch_ms(const pds_slo_model_t *m, double tokens, double tokens_sq)
{
    if (tokens <= 0) return 0;
    double t = m->prefill_a + m->prefill_b * tokens + m->prefill_c * tokens_sq;
    return t > 0 ? t : 0;
}

double pds_slo_decode_step_ms(const pds_slo_model_t *m, double batch, double context)
{
    if (batch <= 0) return 0;
    double t;
    if (m->decode_knots >= 2) {
        const double *kb = m->decode_knot_batch;
        int i = 0; /* the segment [i, i+1] holding batch, or the nearest one */
        while (i + 2 < m->decode_knots && batch > kb[i + 1]) i++;
        double lo = m->decode_knot_base[i] + m->decode_knot_f[i] * context;
        double hi = m->decode_knot_base[i + 1] + m->decode_knot_f[i + 1] * context;
        t = lo + (hi - lo) * (batch - kb[i]) / (kb[i + 1] - kb[i]);
    } else if (m->decode_split > 0 && batch > m->decode_split)
        t = m->decode_d2 + m->decode_e2 * batch + m->decode_f2 * context;
    else
        t = m->decode_d + m->decode_e * batch + m->decode_f * context;
    return t > 0 ? t : 0;
}

double pds_slo_decode_gap_ms(const pds_slo_model_t *m, double batch, double context,
                             double prefill_ms)
{
    if (batch <= 0) return 0;
    double t = pds_slo_decode_step_ms(m, batch, context);
    if (prefill_ms > 0 && m->decode_contention > 0) {
        double slow = t * (1 + m->decode_contention);
        /* the part done while the prefill runs goes at 1 / (1 + contention), the rest at full
         * speed */
        t = slow <= prefill_ms ? slow : prefill_ms + (t - prefill_ms / (1 + m->decode_contention));
    }
    return t + (m->decode_step_overhead_ms > 0 ? m->decode_step_overhead_ms : 0);
}

double pds_slo_transfer_ms(const pds_slo_model_t *m, double tokens)
{
    if (m->link_gbytes_per_s <= 0 || tokens <= 0) return 0;
    int msgs = m->n_layers > 0 ? m->n_layers : 1;
    double bytes = tokens * (double)m->kv_bytes_per_token;
    return msgs * m->link_msg_ms + bytes / (m->link_gbytes_per_s * 1e6);
}

double pds_slo_transfer_exposed_ms(const pds_slo_model_t *m, double tokens, double compute_ms)
{
    double total = pds_slo_transfer_ms(m, tokens);
    if (total <= 0) return 0;
    int L = m->n_layers > 0 ? m->n_layers : 1;
    double t = total / L, c = compute_ms / L;
    return t + (L - 1) * (t > c ? t - c : 0);
}

/* ---- least squares ------------------------------------------------------------------------------
 */
pds_status_t pds_slo_lstsq(const double *X, const double *y, const double *w, int n, int k,
                           double *beta)
{
    if (k < 1 || k > LSTSQ_MAX_K) return PDS_ERR(PDS_ERR_INVALID_ARG, "lstsq: k=%d not in 1..8", k);
    if (n < k) return PDS_ERR(PDS_ERR_INVALID_ARG, "lstsq: %d samples for %d unknowns", n, k);
    double *A = pds_malloc(sizeof(double) * (size_t)n * (size_t)(k + 1)); /* (n, k+1): [X*s | y] */
    if (!A) return PDS_ERR(PDS_ERR_NO_MEMORY, "lstsq: %d x %d", n, k);
    double scale[LSTSQ_MAX_K];
    for (int j = 0; j < k; j++) scale[j] = 0;
    for (int i = 0; i < n; i++) {
        double sw = w ? sqrt(w[i] > 0 ? w[i] : 0) : 1;
        for (int j = 0; j < k; j++) {
            A[(size_t)i * (k + 1) + j] = X[(size_t)i * k + j] * sw;
            scale[j] += A[(size_t)i * (k + 1) + j] * A[(size_t)i * (k + 1) + j];
        }
        A[(size_t)i * (k + 1) + k] = y[i] * sw;
    }
    pds_status_t s = PDS_OK;
    for (int j = 0; j < k; j++) {
        scale[j] = sqrt(scale[j]);
        if (!(scale[j] > 0) || !isfinite(scale[j])) {
            s = PDS_ERR(PDS_ERR_INVALID_ARG, "lstsq: column %d is all zero (or not finite)", j);
            goto out;
        }
        for (int i = 0; i < n; i++) A[(size_t)i * (k + 1) + j] /= scale[j];
    }
    /* Householder QR, applied to the augmented column too: afterwards the top k x k of A is R and
     * column k holds Q^T y. */
    for (int j = 0; j < k; j++) {
        double norm = 0;
        for (int i = j; i < n; i++) norm += A[(size_t)i * (k + 1) + j] * A[(size_t)i * (k + 1) + j];
        norm = sqrt(norm);
        if (norm < 1e-9) {
            s = PDS_ERR(PDS_ERR_INVALID_ARG,
                        "lstsq: column %d depends on the others (samples do not vary enough)", j);
            goto out;
        }
        double *ajj = &A[(size_t)j * (k + 1) + j];
        double alpha = *ajj > 0 ? -norm : norm;
        /* v = a_j - alpha e_j, stored in place; H = I - 2 v v^T / (v^T v) */
        *ajj -= alpha;
        double vtv = 0;
        for (int i = j; i < n; i++) vtv += A[(size_t)i * (k + 1) + j] * A[(size_t)i * (k + 1) + j];
        for (int c = j + 1; c <= k; c++) {
            double dot = 0;
            for (int i = j; i < n; i++)
                dot += A[(size_t)i * (k + 1) + j] * A[(size_t)i * (k + 1) + c];
            double f = 2 * dot / vtv;
            for (int i = j; i < n; i++)
                A[(size_t)i * (k + 1) + c] -= f * A[(size_t)i * (k + 1) + j];
        }
        *ajj = alpha; /* R[j][j]; the rest of v is no longer needed */
    }
    for (int j = k - 1; j >= 0; j--) {
        double acc = A[(size_t)j * (k + 1) + k];
        for (int c = j + 1; c < k; c++) acc -= A[(size_t)j * (k + 1) + c] * beta[c];
        beta[j] = acc / A[(size_t)j * (k + 1) + j];
    }
    for (int j = 0; j < k; j++) beta[j] /= scale[j];
out:
    pds_free(A);
    return s;
}

/* ---- fits ---------------------------------------------------------------------------------------
 */
static void fit_stats(const double *pred, const double *y, int n, pds_slo_fit_t *out)
{
    double mean = 0, rel = 0, ss_res = 0, ss_tot = 0;
    for (int i = 0; i < n; i++) mean += y[i];
    mean = n ? mean / n : 0;
    for (int i = 0; i < n; i++) {
        double e = pred[i] - y[i];
        rel += y[i] != 0 ? (e / y[i]) * (e / y[i]) : 0;
        ss_res += e * e;
        ss_tot += (y[i] - mean) * (y[i] - mean);
    }
    out->n = n;
    out->rms_rel = n ? sqrt(rel / n) : 0;
    out->r2 = ss_tot > 0 ? 1 - ss_res / ss_tot : (ss_res == 0 ? 1 : 0);
}

void pds_slo_eval_prefill(const pds_slo_model_t *m, const pds_slo_prefill_sample_t *s, int n,
                          pds_slo_fit_t *out)
{
    double *p = pds_malloc(sizeof(double) * (size_t)(2 * n + 1));
    if (!p) {
        *out = (pds_slo_fit_t){.n = n, .rms_rel = NAN, .r2 = NAN};
        return;
    }
    double *y = p + n;
    for (int i = 0; i < n; i++) p[i] = pds_slo_prefill_ms(m, s[i].tokens), y[i] = s[i].ms;
    fit_stats(p, y, n, out);
    pds_free(p);
}

void pds_slo_eval_decode(const pds_slo_model_t *m, const pds_slo_decode_sample_t *s, int n,
                         pds_slo_fit_t *out)
{
    double *p = pds_malloc(sizeof(double) * (size_t)(2 * n + 1));
    if (!p) {
        *out = (pds_slo_fit_t){.n = n, .rms_rel = NAN, .r2 = NAN};
        return;
    }
    double *y = p + n;
    for (int i = 0; i < n; i++)
        p[i] = pds_slo_decode_step_ms(m, s[i].batch, s[i].context), y[i] = s[i].ms;
    fit_stats(p, y, n, out);
    pds_free(p);
}

static pds_status_t check_times(const double *ms, size_t stride, int n, const char *what)
{
    for (int i = 0; i < n; i++) {
        double v = *(const double *)((const char *)ms + (size_t)i * stride);
        if (!(v > 0) || !isfinite(v))
            return PDS_ERR(PDS_ERR_INVALID_ARG, "%s sample %d: time %g ms is not positive", what, i,
                           v);
    }
    return PDS_OK;
}

pds_status_t pds_slo_fit_prefill(const pds_slo_prefill_sample_t *s, int n, pds_slo_model_t *m,
                                 pds_slo_fit_t *fit)
{
    if (!s || n < 3) return PDS_ERR(PDS_ERR_INVALID_ARG, "prefill fit: %d samples, need >= 3", n);
    PDS_TRY(check_times(&s[0].ms, sizeof s[0], n, "prefill"));
    double *buf = pds_malloc(sizeof(double) * (size_t)n * 5);
    if (!buf) return PDS_ERR(PDS_ERR_NO_MEMORY, "prefill fit");
    double *X = buf, *y = buf + 3 * n, *w = buf + 4 * n, beta[3];
    for (int i = 0; i < n; i++) {
        double t = s[i].tokens;
        X[3 * i] = 1, X[3 * i + 1] = t, X[3 * i + 2] = t * t;
        y[i] = s[i].ms;
        w[i] = 1 / (s[i].ms * s[i].ms);
    }
    pds_status_t st = pds_slo_lstsq(X, y, w, n, 3, beta);
    pds_free(buf);
    if (st != PDS_OK) {
        char why[200];
        snprintf(why, sizeof why, "%s", pds_err_detail());
        return PDS_ERR(st, "prefill fit: %s (need >= 3 distinct token counts)", why);
    }
    m->prefill_a = beta[0], m->prefill_b = beta[1], m->prefill_c = beta[2];
    if (fit) pds_slo_eval_prefill(m, s, n, fit);
    return PDS_OK;
}

/* Fits one decode line to the samples with lo < batch <= hi; sq: sum of squared relative error. */
static pds_status_t fit_decode_range(const pds_slo_decode_sample_t *s, int n, double lo, double hi,
                                     double beta[3], double *sq, int *used)
{
    int m = 0;
    for (int i = 0; i < n; i++) m += s[i].batch > lo && s[i].batch <= hi;
    *used = m;
    if (m < 3) return PDS_ERR(PDS_ERR_INVALID_ARG, "decode fit: %d samples, need >= 3", m);
    double *buf = pds_malloc(sizeof(double) * (size_t)m * 5);
    if (!buf) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode fit");
    double *X = buf, *y = buf + 3 * m, *w = buf + 4 * m;
    int j = 0;
    for (int i = 0; i < n; i++) {
        if (!(s[i].batch > lo && s[i].batch <= hi)) continue;
        X[3 * j] = 1, X[3 * j + 1] = s[i].batch, X[3 * j + 2] = s[i].context;
        y[j] = s[i].ms, w[j] = 1 / (s[i].ms * s[i].ms);
        j++;
    }
    pds_status_t st = pds_slo_lstsq(X, y, w, m, 3, beta);
    if (st == PDS_OK) {
        double acc = 0;
        for (int i = 0; i < m; i++) {
            double e = (beta[0] + beta[1] * X[3 * i + 1] + beta[2] * X[3 * i + 2] - y[i]) / y[i];
            acc += e * e;
        }
        *sq = acc;
    }
    pds_free(buf);
    return st;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One line base + f*C per distinct integer batch (relative weights), into m's knots. Needs 3..
 * PDS_SLO_MAX_KNOTS such batches, each with >= 2 distinct contexts (samples at other batches are
 * ignored); PDS_ERR_UNSUPPORTED otherwise. */
static pds_status_t fit_decode_knots(const pds_slo_decode_sample_t *s, int n, pds_slo_model_t *m)
{
    double kb[PDS_SLO_MAX_KNOTS];
    int nk = 0;
    for (int i = 0; i < n; i++) { /* distinct integer batches, sorted */
        double b = s[i].batch;
        if (b < 1 || b != floor(b)) continue;
        int j = 0;
        while (j < nk && kb[j] < b) j++;
        if (j < nk && kb[j] == b) continue;
        if (nk == PDS_SLO_MAX_KNOTS)
            return PDS_ERR(PDS_ERR_UNSUPPORTED, "decode knots: more than %d batch sizes",
                           PDS_SLO_MAX_KNOTS);
        memmove(kb + j + 1, kb + j, sizeof *kb * (size_t)(nk - j));
        kb[j] = b, nk++;
    }
    if (nk < 3) return PDS_ERR(PDS_ERR_UNSUPPORTED, "decode knots: %d batch sizes, need 3", nk);
    double *buf = pds_malloc(sizeof(double) * (size_t)n * 4);
    if (!buf) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode knots");
    double *X = buf, *y = buf + 2 * n, *w = buf + 3 * n;
    pds_status_t st = PDS_OK;
    for (int k = 0; k < nk && st == PDS_OK; k++) {
        int j = 0;
        for (int i = 0; i < n; i++) {
            if (s[i].batch != kb[k]) continue;
            X[2 * j] = 1, X[2 * j + 1] = s[i].context;
            y[j] = s[i].ms, w[j] = 1 / (s[i].ms * s[i].ms);
            j++;
        }
        double beta[2];
        st = pds_slo_lstsq(X, y, w, j, 2, beta);
        if (st != PDS_OK)
            st = PDS_ERR(PDS_ERR_UNSUPPORTED, "decode knots: batch %g needs 2 contexts", kb[k]);
        m->decode_knot_batch[k] = kb[k];
        m->decode_knot_base[k] = beta[0], m->decode_knot_f[k] = beta[1];
    }
    pds_free(buf);
    m->decode_knots = st == PDS_OK ? nk : 0;
    return st;
}

pds_status_t pds_slo_fit_decode(const pds_slo_decode_sample_t *s, int n, bool allow_split,
                                pds_slo_model_t *m, pds_slo_fit_t *fit)
{
    if (!s || n < 3) return PDS_ERR(PDS_ERR_INVALID_ARG, "decode fit: %d samples, need >= 3", n);
    PDS_TRY(check_times(&s[0].ms, sizeof s[0], n, "decode"));
    double beta[3], sq;
    int used;
    pds_status_t st = fit_decode_range(s, n, -INFINITY, INFINITY, beta, &sq, &used);
    if (st != PDS_OK) {
        char why[200];
        snprintf(why, sizeof why, "%s", pds_err_detail());
        return PDS_ERR(st, "decode fit: %s (vary both batch and context)", why);
    }
    double best_sq = sq, best[6] = {beta[0], beta[1], beta[2], 0, 0, 0};
    int best_split = 0;
    if (allow_split && n >= 12 && sq / n > 1e-18) {
        double *b = pds_malloc(sizeof(double) * (size_t)n);
        if (!b) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode fit");
        for (int i = 0; i < n; i++) b[i] = s[i].batch;
        qsort(b, (size_t)n, sizeof *b, cmp_double);
        for (int i = 0; i + 1 < n; i++) {
            if (b[i] == b[i + 1] || b[i] != floor(b[i])) continue;
            double bl[3], br[3], sl, sr;
            int nl, nr;
            if (fit_decode_range(s, n, -INFINITY, b[i], bl, &sl, &nl) != PDS_OK || nl < 6) continue;
            if (fit_decode_range(s, n, b[i], INFINITY, br, &sr, &nr) != PDS_OK || nr < 6) continue;
            if (sl + sr < best_sq) {
                best_sq = sl + sr, best_split = (int)b[i];
                memcpy(best, bl, sizeof bl), memcpy(best + 3, br, sizeof br);
            }
        }
        pds_free(b);
        pds_err_clear();
        /* keep the split only when it cuts the RMS relative error by a third (sq by 5/9) */
        if (best_split && best_sq > sq * (4.0 / 9.0)) best_split = 0;
    }
    m->decode_d = best_split ? best[0] : beta[0];
    m->decode_e = best_split ? best[1] : beta[1];
    m->decode_f = best_split ? best[2] : beta[2];
    m->decode_split = best_split;
    m->decode_d2 = best_split ? best[3] : 0;
    m->decode_e2 = best_split ? best[4] : 0;
    m->decode_f2 = best_split ? best[5] : 0;
    m->decode_knots = 0;
    if (allow_split && n >= 6) {
        pds_slo_model_t k = *m;
        pds_slo_fit_t lines, knots;
        pds_slo_eval_decode(m, s, n, &lines);
        /* keep the table only when it cuts the RMS relative error by a third */
        /* a line within 0.1% is as good as anything measured: no table */
        if (lines.rms_rel > 1e-3 && fit_decode_knots(s, n, &k) == PDS_OK) {
            pds_slo_eval_decode(&k, s, n, &knots);
            if (knots.rms_rel < lines.rms_rel * (2.0 / 3.0)) *m = k;
        }
        pds_err_clear();
    }
    if (fit) pds_slo_eval_decode(m, s, n, fit);
    return PDS_OK;
}

/* ---- online refit -------------------------------------------------------------------------------
 */
struct pds_slo_refit {
    int window;
    double prior_weight;
    pds_slo_prefill_sample_t *pre; /* (window) ring */
    pds_slo_decode_sample_t *dec;  /* (window) ring */
    int n_pre, n_dec;              /* filled, <= window */
    int next_pre, next_dec;
};

pds_status_t pds_slo_refit_create(int window, double prior_weight, pds_slo_refit_t **out)
{
    if (window < 3 || window > 1 << 20)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "refit window %d not in 3..1048576", window);
    if (!(prior_weight >= 0) || !isfinite(prior_weight))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "refit prior weight %g < 0", prior_weight);
    pds_slo_refit_t *r = pds_calloc(1, sizeof *r);
    if (!r) goto fail;
    r->window = window;
    r->prior_weight = prior_weight;
    r->pre = pds_calloc((size_t)window, sizeof *r->pre);
    r->dec = pds_calloc((size_t)window, sizeof *r->dec);
    if (!r->pre || !r->dec) goto fail;
    *out = r;
    return PDS_OK;
fail:
    pds_slo_refit_destroy(r);
    return PDS_ERR(PDS_ERR_NO_MEMORY, "refit window of %d", window);
}

void pds_slo_refit_destroy(pds_slo_refit_t *r)
{
    if (!r) return;
    pds_free(r->pre);
    pds_free(r->dec);
    pds_free(r);
}

void pds_slo_refit_add_prefill(pds_slo_refit_t *r, double tokens, double ms)
{
    if (!(ms > 0) || !(tokens > 0) || !isfinite(ms)) return; /* a bad report is not a sample */
    r->pre[r->next_pre] = (pds_slo_prefill_sample_t){tokens, ms};
    r->next_pre = (r->next_pre + 1) % r->window;
    if (r->n_pre < r->window) r->n_pre++;
}

void pds_slo_refit_add_decode(pds_slo_refit_t *r, double batch, double context, double ms)
{
    if (!(ms > 0) || !(batch > 0) || !(context >= 0) || !isfinite(ms)) return;
    r->dec[r->next_dec] = (pds_slo_decode_sample_t){batch, context, ms};
    r->next_dec = (r->next_dec + 1) % r->window;
    if (r->n_dec < r->window) r->n_dec++;
}

int pds_slo_refit_count(const pds_slo_refit_t *r, bool decode)
{
    return decode ? r->n_dec : r->n_pre;
}

/* Relative-error least squares of rows (m, 3) toward y, plus one prior row per coefficient that
 * pulls it to beta[j] with the weight of prior_weight samples at the column's typical size. */
static pds_status_t refit_rows(const double *X, const double *y, int m, double prior_weight,
                               double beta[3])
{
    int rows = m + 3;
    double *buf = pds_malloc(sizeof(double) * (size_t)rows * 4);
    if (!buf) return PDS_ERR(PDS_ERR_NO_MEMORY, "refit");
    double *A = buf, *b = buf + 3 * rows, typ[3] = {0, 0, 0};
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < 3; j++) {
            A[3 * i + j] = X[3 * i + j] / y[i];
            typ[j] += fabs(A[3 * i + j]) / m;
        }
        b[i] = 1;
    }
    double sw = sqrt(prior_weight > 0 ? prior_weight : 1e-9);
    for (int j = 0; j < 3; j++) {
        double t = typ[j] > 0 ? typ[j] : 1;
        for (int c = 0; c < 3; c++) A[3 * (m + j) + c] = c == j ? sw * t : 0;
        b[m + j] = sw * t * beta[j];
    }
    double out[3];
    pds_status_t s = pds_slo_lstsq(A, b, NULL, rows, 3, out);
    pds_free(buf);
    if (s == PDS_OK) memcpy(beta, out, sizeof out);
    return s;
}

pds_status_t pds_slo_refit_update(pds_slo_refit_t *r, pds_slo_model_t *m, pds_slo_fit_t *prefill,
                                  pds_slo_fit_t *decode)
{
    int n = r->n_pre > r->n_dec ? r->n_pre : r->n_dec;
    double *buf = pds_malloc(sizeof(double) * (size_t)(n + 1) * 4);
    if (!buf) return PDS_ERR(PDS_ERR_NO_MEMORY, "refit");
    double *X = buf, *y = buf + 3 * (n + 1);
    pds_status_t s = PDS_OK;
    if (r->n_pre >= 3) {
        for (int i = 0; i < r->n_pre; i++) {
            double t = r->pre[i].tokens;
            X[3 * i] = 1, X[3 * i + 1] = t, X[3 * i + 2] = t * t, y[i] = r->pre[i].ms;
        }
        double beta[3] = {m->prefill_a, m->prefill_b, m->prefill_c};
        s = refit_rows(X, y, r->n_pre, r->prior_weight, beta);
        if (s != PDS_OK) goto out;
        m->prefill_a = beta[0], m->prefill_b = beta[1], m->prefill_c = beta[2];
    }
    if (prefill) pds_slo_eval_prefill(m, r->pre, r->n_pre, prefill);
    /* each side of a split refits its own line from the samples that fall on it */
    for (int side = 0; side < (m->decode_split > 0 ? 2 : 1); side++) {
        int k = 0;
        for (int i = 0; i < r->n_dec; i++) {
            bool right = m->decode_split > 0 && r->dec[i].batch > m->decode_split;
            if (right != (side == 1)) continue;
            X[3 * k] = 1, X[3 * k + 1] = r->dec[i].batch, X[3 * k + 2] = r->dec[i].context;
            y[k++] = r->dec[i].ms;
        }
        if (k < 3) continue;
        double *d = side ? &m->decode_d2 : &m->decode_d, *e = side ? &m->decode_e2 : &m->decode_e,
               *f = side ? &m->decode_f2 : &m->decode_f;
        double beta[3] = {*d, *e, *f};
        s = refit_rows(X, y, k, r->prior_weight, beta);
        if (s != PDS_OK) goto out;
        *d = beta[0], *e = beta[1], *f = beta[2];
    }
    if (m->decode_knots >= 2 && r->n_dec >= 3) {
        /* the table keeps its shape: one factor, observed over predicted, toward 1 by the prior */
        double obs = 0, pred = 0;
        for (int i = 0; i < r->n_dec; i++) {
            obs += r->dec[i].ms;
            pred += pds_slo_decode_step_ms(m, r->dec[i].batch, r->dec[i].context);
        }
        if (pred > 0) {
            double k = (obs / pred * r->n_dec + r->prior_weight) / (r->n_dec + r->prior_weight);
            for (int i = 0; i < m->decode_knots; i++)
                m->decode_knot_base[i] *= k, m->decode_knot_f[i] *= k;
        }
    }
    if (decode) pds_slo_eval_decode(m, r->dec, r->n_dec, decode);
out:
    pds_free(buf);
    return s;
}

/* ---- prediction of one request ------------------------------------------------------------------
 */
double pds_slo_predict_ttft(const pds_slo_prefill_load_t *p, int64_t prompt_tokens)
{
    const pds_slo_model_t *m = p->model;
    double n = (double)prompt_tokens, q = p->queued_tokens > 0 ? p->queued_tokens : 0;
    double t = p->busy_ms > 0 ? p->busy_ms : 0, own;
    if (p->max_batch_tokens > 0) {
        double B = p->max_batch_tokens;
        double full = floor(q / B), rem = q - full * B;
        t += full * pds_slo_prefill_ms(m, B);
        if (rem > 0 && rem + n <= B) {
            own = pds_slo_prefill_ms(m, rem + n);
        } else {
            t += pds_slo_prefill_ms(m, rem);
            own = pds_slo_prefill_ms(m, n);
        }
    } else {
        own = pds_slo_prefill_ms(m, q + n);
    }
    double over = m->ttft_overhead_ms > 0 ? m->ttft_overhead_ms : 0;
    return t + own + pds_slo_transfer_exposed_ms(m, n, own) + over;
}

double pds_slo_predict_tpot(const pds_slo_decode_load_t *d, int64_t prompt_tokens,
                            int64_t output_tokens)
{
    double ctx = d->context_tokens + (double)prompt_tokens + (double)output_tokens / 2;
    return pds_slo_decode_gap_ms(d->model, d->batch + 1, ctx, 0);
}

/* ---- placement ----------------------------------------------------------------------------------
 */
const char *pds_slo_policy_name(pds_slo_policy_t p)
{
    switch (p) {
    case PDS_SLO_POLICY_QUEUE:
        return "queue";
    case PDS_SLO_POLICY_BEST_EFFORT:
        return "best-effort";
    case PDS_SLO_POLICY_REJECT:
        return "reject";
    }
    return "unknown";
}

pds_status_t pds_slo_policy_parse(const char *s, pds_slo_policy_t *out)
{
    static const pds_slo_policy_t all[] = {PDS_SLO_POLICY_QUEUE, PDS_SLO_POLICY_BEST_EFFORT,
                                           PDS_SLO_POLICY_REJECT};
    for (size_t i = 0; s && i < PDS_ARRAY_LEN(all); i++)
        if (strcmp(s, pds_slo_policy_name(all[i])) == 0) {
            *out = all[i];
            return PDS_OK;
        }
    return PDS_ERR(PDS_ERR_INVALID_ARG, "SLO policy '%s': expected queue, best-effort or reject",
                   s ? s : "(null)");
}

pds_slo_place_params_t pds_slo_place_default_params(void)
{
    return (pds_slo_place_params_t){.policy = PDS_SLO_POLICY_QUEUE,
                                    .tpot_weight = 1.0,
                                    .queue_deadline_ms = 10000.0,
                                    .colocated = false};
}

/* Normalised slack of one target; with no target, -pred in seconds so faster still ranks higher. */
static double slack_term(double target, double pred)
{
    return target > 0 ? (target - pred) / target : -pred / 1000.0;
}

static bool decode_has_room(const pds_slo_decode_load_t *d, const pds_slo_request_t *req)
{
    if (d->max_batch_seqs > 0 && d->batch + 1 > d->max_batch_seqs) return false;
    if (d->block_size <= 0) return true;
    int64_t need = PDS_DIV_UP(req->prompt_tokens + req->output_tokens, (int64_t)d->block_size);
    return d->free_blocks >= need;
}

pds_status_t pds_slo_place(const pds_slo_place_params_t *pp, const pds_slo_request_t *req,
                           const pds_slo_prefill_load_t *pre, int n_prefill,
                           const pds_slo_decode_load_t *dec, int n_decode, pds_slo_decision_t *out)
{
    if (req->prompt_tokens < 1 || req->output_tokens < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "placement: prompt %lld and output %lld must be >= 1",
                       (long long)req->prompt_tokens, (long long)req->output_tokens);
    if (pp->colocated && n_prefill != n_decode)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "placement: colocated needs one prefill load per decode node (%d vs %d)",
                       n_prefill, n_decode);
    memset(out, 0, sizeof *out);
    out->prefill = out->decode = -1;
    out->slack = -INFINITY;
    if (n_prefill <= 0 || n_decode <= 0) {
        snprintf(out->why, sizeof out->why, "no %s node available",
                 n_prefill <= 0 ? "prefill" : "decode");
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "placement: %s", out->why);
    }
    double k = pp->tpot_weight > 0 ? pp->tpot_weight : 1.0;
    bool any_room = false;
    double best_ttft_alone = INFINITY;
    int best_p_alone = -1;
    for (int p = 0; p < n_prefill; p++) {
        double ttft = pds_slo_predict_ttft(&pre[p], req->prompt_tokens) + req->waited_ms;
        if (ttft < best_ttft_alone) best_ttft_alone = ttft, best_p_alone = p;
        for (int d = 0; d < n_decode; d++) {
            if (pp->colocated && p != d) continue;
            if (!decode_has_room(&dec[d], req)) continue;
            any_room = true;
            double tpot = pds_slo_predict_tpot(&dec[d], req->prompt_tokens, req->output_tokens);
            double a = slack_term(req->ttft_ms, ttft);
            double b = req->output_tokens > 1 ? k * slack_term(req->tpot_ms, tpot) : INFINITY;
            double sl = a < b ? a : b;
            if (sl > out->slack) {
                out->slack = sl, out->prefill = p, out->decode = d;
                out->pred_ttft_ms = ttft, out->pred_tpot_ms = tpot;
            }
        }
    }
    double ttft_t = req->ttft_ms, tpot_t = req->tpot_ms;
    if (!any_room) {
        out->prefill = best_p_alone;
        out->pred_ttft_ms = best_ttft_alone;
        snprintf(out->why, sizeof out->why,
                 "no decode node has KV room and a batch slot for %lld tokens",
                 (long long)(req->prompt_tokens + req->output_tokens));
    } else {
        out->meets = (ttft_t <= 0 || out->pred_ttft_ms <= ttft_t) &&
                     (tpot_t <= 0 || req->output_tokens <= 1 || out->pred_tpot_ms <= tpot_t);
        snprintf(out->why, sizeof out->why,
                 "best pair prefill #%d decode #%d predicts TTFT %.1f ms (target %.1f ms), TPOT "
                 "%.2f ms (target %.2f ms)",
                 out->prefill, out->decode, out->pred_ttft_ms, ttft_t, out->pred_tpot_ms, tpot_t);
        if (out->meets || pp->policy == PDS_SLO_POLICY_BEST_EFFORT) {
            out->placed = true;
            return PDS_OK;
        }
    }
    bool expired = pp->policy == PDS_SLO_POLICY_QUEUE && req->waited_ms >= pp->queue_deadline_ms;
    if ((pp->policy == PDS_SLO_POLICY_QUEUE && !expired) ||
        (pp->policy == PDS_SLO_POLICY_BEST_EFFORT && !any_room))
        return PDS_AGAIN;
    return PDS_ERR(PDS_ERR_EXHAUSTED, "SLO cannot be met%s: %s",
                   expired ? " before the queue deadline" : "", out->why);
}

pds_status_t pds_slo_place_cond(const pds_slo_place_params_t *pp, const pds_slo_request_t *req,
                                const pds_slo_prefill_load_t *pre, int n_prefill,
                                const pds_slo_decode_load_t *dec, int n_decode,
                                const pds_slo_prefill_load_t *cpre,
                                const pds_slo_decode_load_t *cdec, int n_coloc,
                                pds_slo_decision_t *out, bool *local)
{
    if (req->prompt_tokens < 1 || req->output_tokens < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "placement: prompt %lld and output %lld must be >= 1",
                       (long long)req->prompt_tokens, (long long)req->output_tokens);
    bool pairs = n_prefill > 0 && n_decode > 0;
    *local = false;
    if (!pairs && n_coloc <= 0) {
        memset(out, 0, sizeof *out);
        out->prefill = out->decode = -1;
        out->slack = -INFINITY;
        snprintf(out->why, sizeof out->why, "no %s node available",
                 n_decode <= 0 ? "decode or colocated" : "prefill or colocated");
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "placement: %s", out->why);
    }
    /* first the best candidate of each group, whatever the policy */
    pds_slo_place_params_t be = *pp;
    be.policy = PDS_SLO_POLICY_BEST_EFFORT;
    be.colocated = false;
    pds_slo_decision_t dd, dl;
    bool have_d = pairs && pds_slo_place(&be, req, pre, n_prefill, dec, n_decode, &dd) == PDS_OK;
    be.colocated = true;
    bool have_l =
        n_coloc > 0 && pds_slo_place(&be, req, cpre, n_coloc, cdec, n_coloc, &dl) == PDS_OK;
    pds_err_clear();
    bool use_l = have_l && (!have_d || (dl.meets && !dd.meets) ||
                            (dl.meets == dd.meets && dl.slack > dd.slack));
    if ((use_l && (dl.meets || pp->policy == PDS_SLO_POLICY_BEST_EFFORT)) ||
        (!use_l && have_d && (dd.meets || pp->policy == PDS_SLO_POLICY_BEST_EFFORT))) {
        *out = use_l ? dl : dd;
        *local = use_l;
        if (use_l)
            snprintf(out->why, sizeof out->why,
                     "best: colocated #%d prefilling locally predicts TTFT %.1f ms (target %.1f "
                     "ms), TPOT %.2f ms (target %.2f ms)",
                     dl.decode, dl.pred_ttft_ms, req->ttft_ms, dl.pred_tpot_ms, req->tpot_ms);
        return PDS_OK;
    }
    /* nothing meets (or nothing has room): the policy, on the group that came closest */
    be = *pp;
    be.colocated = use_l || !pairs;
    *local = be.colocated;
    pds_status_t s = be.colocated ? pds_slo_place(&be, req, cpre, n_coloc, cdec, n_coloc, out)
                                  : pds_slo_place(&be, req, pre, n_prefill, dec, n_decode, out);
    if (s == PDS_OK) s = PDS_AGAIN; /* cannot happen: nothing met above */
    return s;
}

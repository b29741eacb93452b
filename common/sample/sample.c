/* sample.c: the reference sampler. Greedy is a plain argmax; otherwise the weights
 * w_i = exp((l_i - max l) / T) (double precision) are filtered by top-k and top-p over an order of
 * descending logit with ties to the lower id, and the token is drawn by walking the kept ids in
 * ascending id order until the cumulative weight exceeds u * (kept total), u = uniform(seed, pos).
 *
 * Choices the header leaves open, fixed here so that the GPU sampler can match them:
 *  - top-p mass is measured against the full softmax (before top-k), i.e. keep the shortest
 *    descending prefix of the top-k set whose weight reaches top_p * sum(all w);
 *  - the final walk is in ascending id order (not probability order), so the unfiltered case needs
 *    no sort at all and the filtered case is "mask, then the same walk";
 *  - NaN logits count as -inf; if the largest logit is not finite (all -inf/NaN, or +inf present)
 *    the result is the greedy argmax (lowest id among the largest).
 * Trade-off: the filtered path sorts (qsort for top-p alone, a size-k heap for top-k), O(V log V)
 * worst case — fine for a reference; the unfiltered path is two passes over the logits.
 */
#include "sample/sample.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    float v; /* logit, NaN replaced by -inf */
    int32_t id;
} entry_t;

pds_sample_params_t pds_sample_default_params(void)
{
    return (pds_sample_params_t){.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 0};
}

pds_status_t pds_sample_params_validate(const pds_sample_params_t *p)
{
    if (!p) return PDS_ERR(PDS_ERR_INVALID_ARG, "sample params: NULL");
    if (!isfinite(p->temperature) || p->temperature < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "sample params: temperature %g must be finite and >= 0",
                       (double)p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "sample params: top_p %g must be in (0, 1]",
                       (double)p->top_p);
    if (p->top_k < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "sample params: top_k %d must be >= 0", p->top_k);
    return PDS_OK;
}

double pds_sample_uniform(uint64_t seed, int64_t position)
{
    uint64_t h = pds_mix64(pds_mix64(seed) ^ (uint64_t)position);
    return (double)(h >> 11) * 0x1.0p-53;
}

size_t pds_sample_scratch_bytes(int vocab)
{
    return vocab > 0 ? (size_t)vocab * sizeof(entry_t) : 0;
}

bool pds_sample_is_stop(int32_t tok, const int32_t *stop, int n_stop)
{
    for (int i = 0; i < n_stop; i++)
        if (stop[i] == tok) return true;
    return false;
}

static float clean(float v)
{
    return isnan(v) ? -INFINITY : v;
}

/* Lowest id among the largest logits. */
static int32_t argmax(const float *logits, int vocab)
{
    int32_t best = 0;
    float bv = clean(logits[0]);
    for (int i = 1; i < vocab; i++) {
        float v = clean(logits[i]);
        if (v > bv) {
            bv = v;
            best = i;
        }
    }
    return best;
}

/* a ranks before b: larger logit, then lower id. */
static bool better(const entry_t *a, const entry_t *b)
{
    return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static int cmp_rank(const void *x, const void *y)
{
    const entry_t *a = x, *b = y;
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

static int cmp_id(const void *x, const void *y)
{
    const entry_t *a = x, *b = y;
    return (a->id > b->id) - (a->id < b->id);
}

/* Min-heap on rank (root = the worst kept entry). */
static void sift_down(entry_t *h, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && better(&h[w], &h[l])) w = l;
        if (r < n && better(&h[w], &h[r])) w = r;
        if (w == i) return;
        entry_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* Fills e[0..k) with the k best-ranked logits, sorted best first. */
static void select_top_k(const float *logits, int vocab, int k, entry_t *e)
{
    for (int i = 0; i < k; i++) e[i] = (entry_t){clean(logits[i]), i};
    for (int i = k / 2 - 1; i >= 0; i--) sift_down(e, k, i);
    for (int i = k; i < vocab; i++) {
        entry_t c = {clean(logits[i]), i};
        if (better(&c, &e[0])) {
            e[0] = c;
            sift_down(e, k, 0);
        }
    }
    qsort(e, (size_t)k, sizeof(*e), cmp_rank);
}

static int32_t sample_filtered(const pds_sample_params_t *p, const float *logits, int vocab,
                               double lmax, double u, entry_t *e)
{
    double T = p->temperature;
    int k = vocab;
    if (p->top_k > 0 && p->top_k < vocab) {
        k = p->top_k;
        select_top_k(logits, vocab, k, e);
    } else {
        for (int i = 0; i < vocab; i++) e[i] = (entry_t){clean(logits[i]), i};
        qsort(e, (size_t)vocab, sizeof(*e), cmp_rank);
    }
    int m = k;
    if (p->top_p < 1.0f) {
        double z = 0;
        for (int i = 0; i < vocab; i++) z += exp(((double)clean(logits[i]) - lmax) / T);
        double thr = (double)p->top_p * z, cum = 0;
        for (int i = 0; i < k; i++) {
            cum += exp(((double)e[i].v - lmax) / T);
            if (cum >= thr) {
                m = i + 1;
                break;
            }
        }
    }
    qsort(e, (size_t)m, sizeof(*e), cmp_id);
    double total = 0;
    for (int i = 0; i < m; i++) total += exp(((double)e[i].v - lmax) / T);
    double target = u * total, cum = 0;
    int32_t last = e[0].id;
    for (int i = 0; i < m; i++) {
        double w = exp(((double)e[i].v - lmax) / T);
        cum += w;
        if (w > 0) last = e[i].id;
        if (cum > target) return e[i].id;
    }
    return last; /* only reachable through rounding */
}

/* Returns -1 if logits is NULL, vocab <= 0, the parameters fail validation, or the scratch
 * allocation (scratch == NULL) fails. */
int32_t pds_sample_token(const pds_sample_params_t *p, const float *logits, int vocab,
                         int64_t position, void *scratch)
{
    if (!logits || vocab <= 0 || pds_sample_params_validate(p) != PDS_OK) return -1;
    if (p->temperature == 0) return argmax(logits, vocab);
    int32_t top = argmax(logits, vocab);
    double lmax = clean(logits[top]);
    if (!isfinite(lmax) || p->top_k == 1) return top;
    double u = pds_sample_uniform(p->seed, position);
    double T = p->temperature;

    if ((p->top_k == 0 || p->top_k >= vocab) && p->top_p >= 1.0f) {
        double total = 0;
        for (int i = 0; i < vocab; i++) total += exp(((double)clean(logits[i]) - lmax) / T);
        double target = u * total, cum = 0;
        int32_t last = top;
        for (int i = 0; i < vocab; i++) {
            double w = exp(((double)clean(logits[i]) - lmax) / T);
            cum += w;
            if (w > 0) last = i;
            if (cum > target) return i;
        }
        return last; /* only reachable through rounding */
    }

    entry_t *e = scratch;
    entry_t *owned = NULL;
    if (!e) {
        owned = e = pds_malloc(pds_sample_scratch_bytes(vocab));
        if (!e) {
            PDS_ERR(PDS_ERR_NO_MEMORY, "sample: no memory for %d-entry scratch", vocab);
            return -1;
        }
    }
    int32_t tok = sample_filtered(p, logits, vocab, lmax, u, e);
    pds_free(owned);
    return tok;
}

/* cpu_kernels.c: the numeric building blocks of the CPU reference forward pass — matmul (OpenBLAS
 * or a plain triple loop), RMSNorm, RoPE, SwiGLU and causal paged attention — each written to be
 * read against the Hugging Face Llama code it mirrors.
 *
 * Trade-off: the fast attention copies a sequence's K and V of one KV head out of the paged pool
 * into contiguous panels before two sgemms (scores, then weighted values). The copy is as large as
 * the read it replaces, and it turns a gather over blocks into the dense shape BLAS wants; the
 * naive path instead reads every K/V row through the block table, which is slower but has no moving
 * parts, so the two paths check each other.
 */
#include "engine/cpu/cpu_internal.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#define ATTN_QCHUNK 128 /* query rows per score panel: scratch is QCHUNK x ctx floats */

void pds_engine_cpu_matmul(bool naive, int m, int n, int k, const float *x, int ldx, const float *w,
                           float *y, int ldy, bool accumulate)
{
    if (!naive) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, w, k,
                    accumulate ? 1.0f : 0.0f, y, ldy);
        return;
    }
    for (int i = 0; i < m; i++) {
        const float *xr = x + (size_t)i * ldx;
        for (int j = 0; j < n; j++) {
            const float *wr = w + (size_t)j * k;
            float acc = 0.0f;
            for (int l = 0; l < k; l++) acc += xr[l] * wr[l];
            y[(size_t)i * ldy + j] = accumulate ? y[(size_t)i * ldy + j] + acc : acc;
        }
    }
}

void pds_engine_cpu_rmsnorm(int m, int n, const float *x, const float *w, float eps, float *y)
{
    for (int i = 0; i < m; i++) {
        const float *xr = x + (size_t)i * n;
        float *yr = y + (size_t)i * n;
        double ss = 0.0; /* double: the reference should not depend on summation order */
        for (int j = 0; j < n; j++) ss += (double)xr[j] * xr[j];
        float inv = (float)(1.0 / sqrt(ss / n + (double)eps));
        for (int j = 0; j < n; j++) yr[j] = w[j] * (xr[j] * inv);
    }
}

void pds_engine_cpu_rope_table(int pos, int head_dim, const float *inv_freq, float *cos_out,
                               float *sin_out)
{
    for (int i = 0; i < head_dim / 2; i++) {
        float ang = (float)pos * inv_freq[i];
        cos_out[i] = cosf(ang);
        sin_out[i] = sinf(ang);
    }
}

void pds_engine_cpu_rope(float *v, int head_dim, const float *cos_t, const float *sin_t)
{
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * cos_t[i] - x1 * sin_t[i];
        v[i + half] = x1 * cos_t[i] + x0 * sin_t[i];
    }
}

void pds_engine_cpu_swiglu(int m, int n, float *gu, int ld)
{
    for (int r = 0; r < m; r++) {
        float *g = gu + (size_t)r * ld;
        const float *u = g + n;
        for (int i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

size_t pds_engine_cpu_attention_scratch(int ctx, int head_dim)
{
    return (size_t)ctx * head_dim * 2 + (size_t)ATTN_QCHUNK * ctx;
}

/* In-place softmax of s[0..n). */
static void softmax_row(float *s, int n)
{
    float mx = s[0];
    for (int j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    for (int j = 0; j < n; j++) s[j] /= sum;
}

static const float *kv_row(const pds_engine_cpu_attn_t *a, int kv, int tok, int head)
{
    int bs = a->kv->block_size;
    return a->pool_layer + pds_kv_layout_offset(a->kv, a->blocks[tok / bs], kv, tok % bs, head, 0);
}

static void attention_naive(const pds_engine_cpu_attn_t *a, int g, float *scores)
{
    int hd = a->kv->head_dim, group = a->n_heads / a->kv->n_kv_heads;
    int n_past = a->ctx - a->n_new;
    float scale = 1.0f / sqrtf((float)hd);
    for (int i = 0; i < a->n_new; i++) {
        int pos = n_past + i;
        for (int h = g * group; h < (g + 1) * group; h++) {
            const float *q = a->q + (size_t)i * a->q_stride + (size_t)h * hd;
            float *o = a->out + (size_t)i * a->out_stride + (size_t)h * hd;
            for (int j = 0; j <= pos; j++) {
                const float *k = kv_row(a, 0, j, g);
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += q[d] * k[d];
                scores[j] = dot * scale;
            }
            softmax_row(scores, pos + 1);
            for (int d = 0; d < hd; d++) o[d] = 0.0f;
            for (int j = 0; j <= pos; j++) {
                const float *v = kv_row(a, 1, j, g);
                for (int d = 0; d < hd; d++) o[d] += scores[j] * v[d];
            }
        }
    }
}

/* exp(s[j] - max) over s[0..valid), zeros in s[valid..lim); returns 1 / sum, so the caller can
 * normalise the (head_dim-long) output row instead of the (ctx-long) probability row. */
static float softmax_unnormalised(float *s, int valid, int lim)
{
    float mx = s[0];
    for (int j = 1; j < valid; j++) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.0f;
    for (int j = 0; j < valid; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    for (int j = valid; j < lim; j++) s[j] = 0.0f;
    return 1.0f / sum;
}

/* softmax(scale * q . K^T) . V for `rows` query rows (row stride ldq) against the first `lim`
 * keys of the panels; row r may see keys [0, first_valid + r). Output rows at stride ldo. */
static void attend_rows(const float *q, int ldq, int rows, int first_valid, int lim,
                        const float *kp, const float *vp, int hd, float scale, float *s, float *o,
                        int ldo)
{
    float inv[ATTN_QCHUNK];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, lim, hd, scale, q, ldq, kp, hd, 0.0f,
                s, lim);
    for (int r = 0; r < rows; r++)
        inv[r] = softmax_unnormalised(s + (size_t)r * lim, PDS_MIN(first_valid + r, lim), lim);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, lim, 1.0f, s, lim, vp, hd,
                0.0f, o, ldo);
    for (int r = 0; r < rows; r++)
        for (int d = 0; d < hd; d++) o[(size_t)r * ldo + d] *= inv[r];
}

static void attention_fast(const pds_engine_cpu_attn_t *a, int g, float *scratch)
{
    int hd = a->kv->head_dim, group = a->n_heads / a->kv->n_kv_heads;
    int n_past = a->ctx - a->n_new;
    float scale = 1.0f / sqrtf((float)hd);
    float *kp = scratch;                  /* [ctx, head_dim] */
    float *vp = kp + (size_t)a->ctx * hd; /* [ctx, head_dim] */
    float *s = vp + (size_t)a->ctx * hd;  /* [ATTN_QCHUNK, lim] */
    for (int j = 0; j < a->ctx; j++) {
        memcpy(kp + (size_t)j * hd, kv_row(a, 0, j, g), (size_t)hd * sizeof(float));
        memcpy(vp + (size_t)j * hd, kv_row(a, 1, j, g), (size_t)hd * sizeof(float));
    }
    if (a->n_new == 1 && group <= ATTN_QCHUNK) {
        /* Decode: the group's query heads are adjacent in the row, so they form one
         * [group, head_dim] matrix that sees every key. */
        attend_rows(a->q + (size_t)g * group * hd, hd, group, a->ctx, a->ctx, kp, vp, hd, scale, s,
                    a->out + (size_t)g * group * hd, hd);
        return;
    }
    for (int h = g * group; h < (g + 1) * group; h++) {
        for (int i0 = 0; i0 < a->n_new; i0 += ATTN_QCHUNK) {
            int rows = PDS_MIN(ATTN_QCHUNK, a->n_new - i0);
            int lim = n_past + i0 + rows; /* keys the last row of the chunk may see */
            attend_rows(a->q + (size_t)i0 * a->q_stride + (size_t)h * hd, a->q_stride, rows,
                        n_past + i0 + 1, lim, kp, vp, hd, scale, s,
                        a->out + (size_t)i0 * a->out_stride + (size_t)h * hd, a->out_stride);
        }
    }
}

void pds_engine_cpu_attention(bool naive, const pds_engine_cpu_attn_t *a, int kv_head,
                              float *scratch)
{
    if (naive)
        attention_naive(a, kv_head, scratch);
    else
        attention_fast(a, kv_head, scratch);
}

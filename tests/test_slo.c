/* Tests of common/slo: the fitter against known coefficients (exact and with 2% noise), the
 * predictions against hand-computed values (with and without the in-cluster terms), placement
 * choices and every policy's status, the simulator against M/D/1 queueing theory and hand-traced
 * small runs, goodput bisection, profile files (round trip and malformed input), the trace CSV
 * reader and the workload generator, and the online refit. Scratch files live in $PDS_TEST_TMP (or
 * /tmp). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "slo/slo.h"

#define REL(x, ref) (fabs((x) - (ref)) / fabs((double)(ref)))

/* Deterministic noise for the tests: uniform in [-1, 1] from a counter. */
static double noise(uint64_t *ctr)
{
    return (double)(pds_mix64((*ctr)++) >> 11) / 4503599627370496.0 - 1.0;
}

static const pds_slo_model_t truth = {.prefill_a = 5.0,
                                      .prefill_b = 0.02,
                                      .prefill_c = 1.5e-6,
                                      .decode_d = 8.0,
                                      .decode_e = 0.25,
                                      .decode_f = 4e-4};

static int make_prefill(pds_slo_prefill_sample_t *s, int reps, double noise_frac, uint64_t seed)
{
    static const double T[] = {16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
    int n = 0;
    for (int r = 0; r < reps; r++)
        for (size_t i = 0; i < PDS_ARRAY_LEN(T); i++) {
            double y = pds_slo_prefill_ms(&truth, T[i]);
            s[n++] = (pds_slo_prefill_sample_t){T[i], y * (1 + noise_frac * noise(&seed))};
        }
    return n;
}

static int make_decode(const pds_slo_model_t *m, pds_slo_decode_sample_t *s, int reps,
                       double noise_frac, uint64_t seed)
{
    static const double B[] = {1, 2, 4, 8, 16, 32, 64, 128};
    static const double L[] = {128, 512, 2048};
    int n = 0;
    for (int r = 0; r < reps; r++)
        for (size_t i = 0; i < PDS_ARRAY_LEN(B); i++)
            for (size_t j = 0; j < PDS_ARRAY_LEN(L); j++) {
                double y = pds_slo_decode_step_ms(m, B[i], B[i] * L[j]);
                s[n++] = (pds_slo_decode_sample_t){B[i], B[i] * L[j],
                                                   y * (1 + noise_frac * noise(&seed))};
            }
    return n;
}

/* ---- fitting ----------------------------------------------------------------------------------
 */
Test(slo, prefill_fit_recovers_exact_coefficients_without_noise)
{
    pds_slo_prefill_sample_t s[10];
    int n = make_prefill(s, 1, 0, 1);
    pds_slo_model_t m = {0};
    pds_slo_fit_t fit;
    cr_assert_eq(pds_slo_fit_prefill(s, n, &m, &fit), PDS_OK);
    cr_expect_lt(REL(m.prefill_a, truth.prefill_a), 1e-6);
    cr_expect_lt(REL(m.prefill_b, truth.prefill_b), 1e-6);
    cr_expect_lt(REL(m.prefill_c, truth.prefill_c), 1e-6);
    cr_expect_eq(fit.n, 10);
    cr_expect_lt(fit.rms_rel, 1e-9);
    cr_expect_gt(fit.r2, 1 - 1e-9);
}

Test(slo, prefill_fit_with_two_percent_noise_is_within_a_few_percent)
{
    pds_slo_prefill_sample_t s[200];
    int n = make_prefill(s, 20, 0.02, 42);
    pds_slo_model_t m = {0};
    pds_slo_fit_t fit;
    cr_assert_eq(pds_slo_fit_prefill(s, n, &m, &fit), PDS_OK);
    cr_expect_lt(REL(m.prefill_a, truth.prefill_a), 0.03, "a=%g", m.prefill_a);
    cr_expect_lt(REL(m.prefill_b, truth.prefill_b), 0.03, "b=%g", m.prefill_b);
    cr_expect_lt(REL(m.prefill_c, truth.prefill_c), 0.05, "c=%g", m.prefill_c);
    /* uniform +-2% noise has RMS 2/sqrt(3) = 1.15% */
    cr_expect(fit.rms_rel > 0.008 && fit.rms_rel < 0.015, "rms %g", fit.rms_rel);
    cr_expect_gt(fit.r2, 0.999);
}

Test(slo, decode_fit_recovers_exact_coefficients_and_keeps_one_line)
{
    pds_slo_decode_sample_t s[24];
    int n = make_decode(&truth, s, 1, 0, 1);
    pds_slo_model_t m = {0};
    pds_slo_fit_t fit;
    cr_assert_eq(pds_slo_fit_decode(s, n, true, &m, &fit), PDS_OK);
    cr_expect_lt(REL(m.decode_d, truth.decode_d), 1e-6);
    cr_expect_lt(REL(m.decode_e, truth.decode_e), 1e-6);
    cr_expect_lt(REL(m.decode_f, truth.decode_f), 1e-6);
    cr_expect_eq(m.decode_split, 0);
    cr_expect_lt(fit.rms_rel, 1e-9);
}

Test(slo, decode_fit_with_noise_is_within_a_few_percent)
{
    pds_slo_decode_sample_t s[24 * 10];
    int n = make_decode(&truth, s, 10, 0.02, 7);
    pds_slo_model_t m = {0};
    cr_assert_eq(pds_slo_fit_decode(s, n, true, &m, NULL), PDS_OK);
    cr_expect_eq(m.decode_split, 0);
    cr_expect_lt(REL(m.decode_d, truth.decode_d), 0.03, "d=%g", m.decode_d);
    cr_expect_lt(REL(m.decode_e, truth.decode_e), 0.05, "e=%g", m.decode_e);
    cr_expect_lt(REL(m.decode_f, truth.decode_f), 0.05, "f=%g", m.decode_f);
}

Test(slo, decode_fit_finds_the_breakpoint_of_piecewise_data)
{
    pds_slo_model_t pw = truth;
    pw.decode_split = 16; /* small batches: memory bound, large: compute takes over */
    pw.decode_d2 = 2.0, pw.decode_e2 = 0.6, pw.decode_f2 = 5e-4;
    pds_slo_decode_sample_t s[24];
    int n = make_decode(&pw, s, 1, 0, 1);
    pds_slo_model_t m = {0};
    pds_slo_fit_t fit;
    cr_assert_eq(pds_slo_fit_decode(s, n, true, &m, &fit), PDS_OK);
    cr_expect_eq(m.decode_split, 16);
    cr_expect_lt(REL(m.decode_d, 8.0), 1e-6);
    cr_expect_lt(REL(m.decode_e2, 0.6), 1e-6);
    cr_expect_lt(REL(m.decode_f2, 5e-4), 1e-6);
    cr_expect_lt(fit.rms_rel, 1e-9);
    /* without permission to split it keeps one (worse) line */
    cr_assert_eq(pds_slo_fit_decode(s, n, false, &m, &fit), PDS_OK);
    cr_expect_eq(m.decode_split, 0);
    cr_expect_gt(fit.rms_rel, 0.01);
}

/* A CPU BLAS's decode step (measured: bench/profiles/cpu-small-1t.txt) is no line in the batch:
 * 1 -> 2 sequences nearly doubles it, 3 -> 4 costs almost nothing. */
static const double knot_b[] = {1, 2, 3, 4, 6, 8, 16};
static const double knot_base[] = {4.0, 8.5, 11.0, 11.8, 17.5, 18.6, 24.8};
static const double knot_f[] = {0.0029, 0.0030, 0.0031, 0.0030, 0.0032, 0.0030, 0.0029};

static pds_slo_model_t knot_truth(void)
{
    pds_slo_model_t m = truth;
    m.decode_knots = (int)PDS_ARRAY_LEN(knot_b);
    for (int i = 0; i < m.decode_knots; i++)
        m.decode_knot_batch[i] = knot_b[i], m.decode_knot_base[i] = knot_base[i],
        m.decode_knot_f[i] = knot_f[i];
    return m;
}

Test(slo, decode_fit_builds_a_table_when_the_step_is_not_linear_in_the_batch)
{
    pds_slo_decode_sample_t s[7 * 4];
    int n = 0;
    for (size_t i = 0; i < PDS_ARRAY_LEN(knot_b); i++)
        for (double L = 128; L <= 1024; L *= 2) {
            double C = knot_b[i] * L;
            s[n++] = (pds_slo_decode_sample_t){knot_b[i], C, knot_base[i] + knot_f[i] * C};
        }
    pds_slo_model_t m = {0};
    pds_slo_fit_t fit;
    cr_assert_eq(pds_slo_fit_decode(s, n, true, &m, &fit), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(m.decode_knots, 7);
    for (int i = 0; i < 7; i++) {
        cr_expect_eq(m.decode_knot_batch[i], knot_b[i]);
        cr_expect_lt(REL(m.decode_knot_base[i], knot_base[i]), 1e-9, "knot %d", i);
        cr_expect_lt(REL(m.decode_knot_f[i], knot_f[i]), 1e-6, "knot %d", i);
    }
    cr_expect_lt(fit.rms_rel, 1e-9);
    /* between knots: the two neighbours' lines at that context, mixed linearly in the batch */
    double C = 5 * 300.0;
    double at4 = knot_base[3] + knot_f[3] * C, at6 = knot_base[4] + knot_f[4] * C;
    cr_expect_lt(REL(pds_slo_decode_step_ms(&m, 5, C), (at4 + at6) / 2), 1e-9);
    /* past the last knot the last segment extends */
    double at8 = knot_base[5] + knot_f[5] * 64 * 100.0,
           at16 = knot_base[6] + knot_f[6] * 64 * 100.0;
    cr_expect_lt(REL(pds_slo_decode_step_ms(&m, 64, 64 * 100.0), at16 + (at16 - at8) * 6), 1e-9);
    /* the line(s) kept as the summary miss by far more: that is why the table was kept */
    pds_slo_model_t lines = m;
    lines.decode_knots = 0;
    pds_slo_fit_t lf;
    pds_slo_eval_decode(&lines, s, n, &lf);
    cr_expect_gt(lf.rms_rel, 0.03, "lines %.4f", lf.rms_rel);
    /* without permission for a piecewise model: one line, no table */
    cr_assert_eq(pds_slo_fit_decode(s, n, false, &m, &fit), PDS_OK);
    cr_expect_eq(m.decode_knots, 0);
    cr_expect_eq(m.decode_split, 0);
}

Test(slo, refit_scales_a_decode_table_toward_what_the_node_measures)
{
    pds_slo_refit_t *r;
    cr_assert_eq(pds_slo_refit_create(64, 1.0, &r), PDS_OK);
    pds_slo_model_t m = knot_truth(), before = m;
    /* the node runs 20% slower than profiled, seen at two batch sizes only */
    for (int i = 0; i < 20; i++) {
        double B = i % 2 ? 3 : 8, C = B * 200;
        pds_slo_refit_add_decode(r, B, C, 1.2 * pds_slo_decode_step_ms(&before, B, C));
    }
    cr_assert_eq(pds_slo_refit_update(r, &m, NULL, NULL), PDS_OK);
    cr_expect_eq(m.decode_knots, 7);
    double k = (1.2 * 20 + 1.0) / 21; /* the prior pulls the factor toward 1 */
    for (double B = 1; B <= 16; B++)  /* the whole table, also where nothing was observed */
        cr_expect_lt(REL(pds_slo_decode_step_ms(&m, B, B * 500),
                         k * pds_slo_decode_step_ms(&before, B, B * 500)),
                     1e-9, "B %g", B);
    pds_slo_refit_destroy(r);
}

Test(slo, fits_reject_samples_that_cannot_determine_the_model)
{
    pds_slo_prefill_sample_t same[5];
    for (int i = 0; i < 5; i++) same[i] = (pds_slo_prefill_sample_t){512, 30 + i};
    pds_slo_model_t m = {0};
    cr_expect_eq(pds_slo_fit_prefill(same, 5, &m, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "distinct token counts") != NULL, "%s", pds_err_detail());
    cr_expect_eq(pds_slo_fit_prefill(same, 2, &m, NULL), PDS_ERR_INVALID_ARG);
    pds_slo_prefill_sample_t neg[3] = {{16, 1}, {32, -2}, {64, 3}};
    cr_expect_eq(pds_slo_fit_prefill(neg, 3, &m, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "sample 1") != NULL, "%s", pds_err_detail());
    /* decode samples whose context is a fixed multiple of the batch: columns are dependent */
    pds_slo_decode_sample_t dep[4] = {{1, 100, 5}, {2, 200, 6}, {4, 400, 8}, {8, 800, 12}};
    cr_expect_eq(pds_slo_fit_decode(dep, 4, true, &m, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "vary both") != NULL, "%s", pds_err_detail());
    cr_expect_eq(m.prefill_a, 0); /* untouched on failure */
}

Test(slo, lstsq_solves_a_well_posed_system_exactly)
{
    /* y = 1 + 2x - 3z on four points */
    double X[] = {1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 2, 5}, y[4], beta[3];
    for (int i = 0; i < 4; i++) y[i] = 1 + 2 * X[3 * i + 1] - 3 * X[3 * i + 2];
    cr_assert_eq(pds_slo_lstsq(X, y, NULL, 4, 3, beta), PDS_OK);
    cr_expect_lt(fabs(beta[0] - 1), 1e-12);
    cr_expect_lt(fabs(beta[1] - 2), 1e-12);
    cr_expect_lt(fabs(beta[2] + 3), 1e-12);
    cr_expect_eq(pds_slo_lstsq(X, y, NULL, 2, 3, beta), PDS_ERR_INVALID_ARG);
}

/* ---- predictions ------------------------------------------------------------------------------
 */
static const pds_slo_model_t pm = {.prefill_a = 10,
                                   .prefill_b = 0.1,
                                   .decode_d = 5,
                                   .decode_e = 1,
                                   .decode_f = 0.01,
                                   .link_gbytes_per_s = 1.0,
                                   .link_msg_ms = 0,
                                   .kv_bytes_per_token = 100000,
                                   .n_layers = 10};

Test(slo, transfer_exposure_matches_the_pipeline_formula)
{
    /* 100 tokens = 1e7 B at 1 GB/s = 10 ms over 10 layers: 1 ms per layer */
    cr_expect_float_eq(pds_slo_transfer_ms(&pm, 100), 10.0, 1e-12);
    /* compute 2 ms per layer hides all but the last layer */
    cr_expect_float_eq(pds_slo_transfer_exposed_ms(&pm, 100, 20), 1.0, 1e-12);
    /* compute 0.5 ms per layer: the link is the bottleneck, 1 + 9 * 0.5 */
    cr_expect_float_eq(pds_slo_transfer_exposed_ms(&pm, 100, 5), 5.5, 1e-12);
    pds_slo_model_t nolink = pm;
    nolink.link_gbytes_per_s = 0;
    cr_expect_eq(pds_slo_transfer_exposed_ms(&nolink, 100, 5), 0);
}

Test(slo, ttft_prediction_packs_the_queue_into_budget_sized_batches)
{
    pds_slo_model_t m = pm;
    m.link_gbytes_per_s = 0;
    /* queue 2500, budget 1000: 2 full batches (110 each), rest 500 + own 300 = 800 -> 90 */
    pds_slo_prefill_load_t p = {
        .model = &m, .queued_tokens = 2500, .busy_ms = 7, .max_batch_tokens = 1000};
    cr_expect_float_eq(pds_slo_predict_ttft(&p, 300), 7 + 2 * 110 + 90, 1e-9);
    /* own 600 does not fit beside the 500: 60 for the rest, then 70 alone */
    cr_expect_float_eq(pds_slo_predict_ttft(&p, 600), 7 + 2 * 110 + 60 + 70, 1e-9);
    /* with the link: + exposed transfer of the own batch (compute 70 ms over 10 layers) */
    p.model = &pm;
    cr_expect_float_eq(pds_slo_predict_ttft(&p, 600), 7 + 2 * 110 + 60 + 70 + 6.0, 1e-9);
    pds_slo_decode_load_t d = {.model = &m, .batch = 3, .context_tokens = 1000};
    /* batch 4, context 1000 + 200 + 100/2 = 1250: 5 + 4 + 12.5 */
    cr_expect_float_eq(pds_slo_predict_tpot(&d, 200, 100), 21.5, 1e-9);
}

Test(slo, cluster_terms_add_their_measured_costs_to_predictions)
{
    pds_slo_model_t m = pm;
    m.ttft_overhead_ms = 4, m.decode_step_overhead_ms = 0.5, m.decode_contention = 0.25;
    pds_slo_prefill_load_t p = {
        .model = &m, .queued_tokens = 2500, .busy_ms = 7, .max_batch_tokens = 1000};
    /* as without the terms (7 + 2 * 110 + 60 + 70 + 6 exposed) + the 4 ms control path */
    cr_expect_float_eq(pds_slo_predict_ttft(&p, 600), 7 + 2 * 110 + 60 + 70 + 6.0 + 4, 1e-9);
    /* step at batch 1, context 101: 5 + 1 + 1.01 = 7.01; + 0.5 idle, x 1.25 then + 0.5 with a
     * prefill running throughout; one that ends 4 ms in slows 4 ms of it (3.2 ms of work) */
    cr_expect_float_eq(pds_slo_decode_gap_ms(&m, 1, 101, 0), 7.51, 1e-9);
    cr_expect_float_eq(pds_slo_decode_gap_ms(&m, 1, 101, 100), 7.01 * 1.25 + 0.5, 1e-9);
    cr_expect_float_eq(pds_slo_decode_gap_ms(&m, 1, 101, 4), 4 + (7.01 - 4 / 1.25) + 0.5, 1e-9);
    cr_expect_eq(pds_slo_decode_gap_ms(&m, 0, 101, 100), 0);
    /* TPOT: batch 4, context 1250 -> 21.5 + 0.5 (the router's prediction: no contention) */
    pds_slo_decode_load_t d = {.model = &m, .batch = 3, .context_tokens = 1000};
    cr_expect_float_eq(pds_slo_predict_tpot(&d, 200, 100), 22.0, 1e-9);
    /* all zero: exactly the isolated engine's step */
    cr_expect_float_eq(pds_slo_decode_gap_ms(&pm, 1, 101, true), 7.01, 1e-12);
}

/* ---- placement --------------------------------------------------------------------------------
 */
typedef struct {
    pds_slo_prefill_load_t p[2];
    pds_slo_decode_load_t d[3];
} cluster_t;

static cluster_t small_cluster(void)
{
    cluster_t c = {
        .p = {{.model = &pm, .queued_tokens = 4000, .max_batch_tokens = 2048},
              {.model = &pm, .queued_tokens = 0, .max_batch_tokens = 2048}},
        .d = {{.model = &pm,
               .batch = 40,
               .context_tokens = 40000,
               .free_blocks = 1000,
               .block_size = 16},
              {.model = &pm,
               .batch = 2,
               .context_tokens = 1000,
               .free_blocks = 10,
               .block_size = 16}, /* lightest, but no KV room for 400 tokens (25 blocks) */
              {.model = &pm,
               .batch = 10,
               .context_tokens = 8000,
               .free_blocks = 1000,
               .block_size = 16}}};
    return c;
}

Test(slo, placement_picks_the_pair_with_the_most_predicted_slack)
{
    cluster_t c = small_cluster();
    pds_slo_place_params_t pp = pds_slo_place_default_params();
    pds_slo_request_t req = {
        .prompt_tokens = 300, .output_tokens = 100, .ttft_ms = 200, .tpot_ms = 150};
    pds_slo_decision_t dec;
    cr_assert_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_OK);
    cr_expect_eq(dec.prefill, 1);
    cr_expect_eq(dec.decode, 2); /* d1 has no room, d0 is slower */
    cr_expect(dec.placed && dec.meets);
    double ttft = pds_slo_predict_ttft(&c.p[1], 300),
           tpot = pds_slo_predict_tpot(&c.d[2], 300, 100);
    cr_expect_float_eq(dec.pred_ttft_ms, ttft, 1e-12);
    cr_expect_float_eq(dec.pred_tpot_ms, tpot, 1e-12);
    /* 40 + exposed 3 = 43 ms; 5 + 11 + 0.01 * (8000 + 350) = 99.5 -> min(0.785, 0.337) */
    cr_expect_float_eq(ttft, 43.0, 1e-9);
    cr_expect_float_eq(tpot, 99.5, 1e-9);
    double want = fmin((200 - ttft) / 200, (150 - tpot) / 150);
    cr_expect_float_eq(dec.slack, want, 1e-12);
}

Test(slo, placement_policies_when_nothing_meets_the_targets)
{
    cluster_t c = small_cluster();
    pds_slo_request_t req = {
        .prompt_tokens = 300, .output_tokens = 100, .ttft_ms = 20, .tpot_ms = 50};
    pds_slo_place_params_t pp = pds_slo_place_default_params();
    pds_slo_decision_t dec;

    pp.policy = PDS_SLO_POLICY_QUEUE;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_AGAIN);
    cr_expect(!dec.placed && !dec.meets);
    cr_expect_eq(dec.prefill, 1);
    cr_expect_eq(dec.decode, 2);
    req.waited_ms = pp.queue_deadline_ms;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_ERR_EXHAUSTED);
    cr_expect(strstr(pds_err_detail(), "queue deadline") != NULL, "%s", pds_err_detail());
    req.waited_ms = 0;

    pp.policy = PDS_SLO_POLICY_BEST_EFFORT;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_OK);
    cr_expect(dec.placed && !dec.meets);
    cr_expect_eq(dec.prefill, 1);
    cr_expect_eq(dec.decode, 2);

    pp.policy = PDS_SLO_POLICY_REJECT;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_ERR_EXHAUSTED);
    cr_expect(!dec.placed);
    const char *msg = pds_err_detail();
    cr_expect(strstr(msg, "TTFT 43.0 ms (target 20.0 ms)") != NULL, "%s", msg);
    cr_expect(strstr(msg, "TPOT 99.50 ms (target 50.00 ms)") != NULL, "%s", msg);
    cr_expect_str_eq(dec.why, strstr(msg, "best pair"));
}

Test(slo, placement_without_kv_room_waits_or_rejects)
{
    cluster_t c = small_cluster();
    for (int d = 0; d < 3; d++) c.d[d].free_blocks = 3;
    pds_slo_request_t req = {
        .prompt_tokens = 300, .output_tokens = 100, .ttft_ms = 1000, .tpot_ms = 1000};
    pds_slo_place_params_t pp = pds_slo_place_default_params();
    pds_slo_decision_t dec;
    pp.policy = PDS_SLO_POLICY_QUEUE;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_AGAIN);
    cr_expect_eq(dec.decode, -1);
    pp.policy = PDS_SLO_POLICY_BEST_EFFORT;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_AGAIN);
    pp.policy = PDS_SLO_POLICY_REJECT;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_ERR_EXHAUSTED);
    cr_expect(strstr(pds_err_detail(), "no decode node has KV room") != NULL, "%s",
              pds_err_detail());
    /* a full batch is no room either */
    c = small_cluster();
    for (int d = 0; d < 3; d++) c.d[d].max_batch_seqs = c.d[d].batch;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_ERR_EXHAUSTED);
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 0, c.d, 3, &dec), PDS_ERR_UNAVAILABLE);
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 0, &dec), PDS_ERR_UNAVAILABLE);
    req.prompt_tokens = 0;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_ERR_INVALID_ARG);
}

Test(slo, colocated_placement_only_pairs_a_node_with_itself)
{
    cluster_t c = small_cluster();
    pds_slo_place_params_t pp = pds_slo_place_default_params();
    pp.colocated = true;
    pds_slo_request_t req = {
        .prompt_tokens = 300, .output_tokens = 100, .ttft_ms = 1000, .tpot_ms = 1000};
    pds_slo_decision_t dec;
    cr_expect_eq(pds_slo_place(&pp, &req, c.p, 2, c.d, 3, &dec), PDS_ERR_INVALID_ARG);
    pds_slo_prefill_load_t p3[3] = {c.p[1], c.p[1], c.p[1]};
    cr_assert_eq(pds_slo_place(&pp, &req, p3, 3, c.d, 3, &dec), PDS_OK);
    /* (1,1) has no room, (0,0) has the heavy batch: (2,2), although (0,2) would be as good */
    cr_expect_eq(dec.prefill, 2);
    cr_expect_eq(dec.decode, 2);
}

Test(slo, conditional_disaggregation_prefills_locally_only_when_predicted_better)
{
    cluster_t c = small_cluster();
    pds_slo_model_t local_m = pm;
    local_m.link_gbytes_per_s = 0; /* a local prefill transfers nothing */
    pds_slo_prefill_load_t cp[1] = {{.model = &local_m, .max_batch_tokens = 2048}};
    pds_slo_decode_load_t cd[1] = {c.d[2]};
    cd[0].model = &local_m;
    pds_slo_place_params_t pp = pds_slo_place_default_params();
    pp.policy = PDS_SLO_POLICY_REJECT;
    /* TTFT binds: the best pair predicts 40 + 3 ms of exposed transfer, local 40 ms */
    pds_slo_request_t req = {
        .prompt_tokens = 300, .output_tokens = 100, .ttft_ms = 50, .tpot_ms = 1000};
    pds_slo_decision_t dec;
    bool local = false;
    cr_assert_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local), PDS_OK);
    cr_expect(local && dec.prefill == 0 && dec.decode == 0 && dec.meets);
    cr_expect_float_eq(dec.pred_ttft_ms, 40.0, 1e-9);
    /* a busy local queue (4000 tokens ahead: 2 batches more) loses to the transfer */
    cp[0].queued_tokens = 4000;
    cr_assert_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local), PDS_OK);
    cr_expect(!local && dec.prefill == 1, "local %d prefill %d", local, dec.prefill);
    cr_expect_eq(dec.decode, 0); /* TTFT binds both decode nodes' slack: the tie goes to d0 */
    cr_expect_float_eq(dec.pred_ttft_ms, 43.0, 1e-9);
    /* equal predictions go to the pair */
    cp[0].queued_tokens = 0;
    local_m.link_gbytes_per_s = pm.link_gbytes_per_s;
    cr_assert_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local), PDS_OK);
    cr_expect(!local);
    local_m.link_gbytes_per_s = 0;
    /* no pair at all: local only; nothing at all: unavailable */
    cr_assert_eq(pds_slo_place_cond(&pp, &req, c.p, 0, c.d, 3, cp, cd, 1, &dec, &local), PDS_OK);
    cr_expect(local);
    cr_expect_eq(pds_slo_place_cond(&pp, &req, c.p, 0, c.d, 3, cp, cd, 0, &dec, &local),
                 PDS_ERR_UNAVAILABLE);
    /* nothing meets: the policy, with the closest group's predictions in the message */
    req.ttft_ms = 10;
    cr_expect_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local),
                 PDS_ERR_EXHAUSTED);
    cr_expect(local && !dec.placed);
    cr_expect(strstr(pds_err_detail(), "TTFT 40.0 ms (target 10.0 ms)") != NULL, "%s",
              pds_err_detail());
    pp.policy = PDS_SLO_POLICY_QUEUE;
    cr_expect_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local), PDS_AGAIN);
    pp.policy = PDS_SLO_POLICY_BEST_EFFORT;
    cr_expect_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local), PDS_OK);
    cr_expect(local && dec.placed && !dec.meets);
    req.prompt_tokens = 0;
    cr_expect_eq(pds_slo_place_cond(&pp, &req, c.p, 2, c.d, 3, cp, cd, 1, &dec, &local),
                 PDS_ERR_INVALID_ARG);
}

Test(slo, policy_names_round_trip)
{
    pds_slo_policy_t p;
    cr_expect_eq(pds_slo_policy_parse("best-effort", &p), PDS_OK);
    cr_expect_eq(p, PDS_SLO_POLICY_BEST_EFFORT);
    cr_expect_str_eq(pds_slo_policy_name(PDS_SLO_POLICY_REJECT), "reject");
    cr_expect_eq(pds_slo_policy_parse("later", &p), PDS_ERR_INVALID_ARG);
}

/* ---- simulator --------------------------------------------------------------------------------
 */
/* One prefill node with deterministic service D, batch size 1 and Poisson arrivals: M/D/1, whose
 * mean wait is W = rho / (2 mu (1 - rho)) (DistServe section 3's prefill queue). */
static void check_md1(double rho)
{
    const double D = 10.0;
    const int n = 400000;
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model.prefill_a = D; /* b = c = 0: every prompt costs D */
    c.decode_model.decode_d = 1;
    c.prefill_max_batch_tokens = 100; /* = prompt: one request per batch */
    c.place.policy = PDS_SLO_POLICY_BEST_EFFORT;
    pds_slo_workload_t w = {.name = "md1",
                            .arrival = PDS_SLO_ARRIVAL_POISSON,
                            .prompt_median = 100,
                            .prompt_min = 100,
                            .prompt_max = 100,
                            .output_median = 1,
                            .output_min = 1,
                            .output_max = 1};
    pds_slo_req_t *reqs = malloc(sizeof *reqs * n);
    cr_assert_eq(pds_slo_workload_generate(&w, rho / D * 1000, n, 12345, 0, reqs), PDS_OK);
    pds_slo_sim_result_t r;
    cr_assert_eq(pds_slo_sim_run(&c, reqs, n, &r, NULL, NULL), PDS_OK);
    double mu = 1 / D, want = rho / (2 * mu * (1 - rho)), got = r.ttft_mean - D;
    cr_expect_eq(r.n_finished, n);
    cr_expect_lt(REL(got, want), 0.05, "rho %.1f: W %.3f ms, M/D/1 says %.3f ms", rho, got, want);
    free(reqs);
}

Test(slo, simulator_matches_md1_mean_wait_at_rho_0_5)
{
    check_md1(0.5);
}

Test(slo, simulator_matches_md1_mean_wait_at_rho_0_8)
{
    check_md1(0.8);
}

Test(slo, simulator_traces_one_request_through_prefill_transfer_and_decode)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = pm;
    c.decode_model = pm;
    pds_slo_req_t r = {.arrival_ms = 3, .prompt_tokens = 100, .output_tokens = 5};
    pds_slo_sim_result_t res;
    double ttft, tpot;
    cr_assert_eq(pds_slo_sim_run(&c, &r, 1, &res, &ttft, &tpot), PDS_OK);
    /* prefill 10 + 0.1 * 100 = 20, exposed transfer 1 ms (1 ms/layer under 2 ms/layer compute) */
    cr_expect_float_eq(ttft, 21.0, 1e-9);
    /* 4 steps at batch 1 and context 101..104: 5 + 1 + 0.01 * ctx */
    cr_expect_float_eq(tpot, (7.01 + 7.02 + 7.03 + 7.04) / 4, 1e-9);
    cr_expect_eq(res.n_met, 1);
    cr_expect_float_eq(res.makespan_ms, 21 + 7.01 + 7.02 + 7.03 + 7.04, 1e-9);
}

Test(slo, simulator_adds_control_overhead_and_step_overhead_to_one_request)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = c.decode_model = pm;
    c.prefill_model.ttft_overhead_ms = 4;
    c.decode_model.decode_step_overhead_ms = 0.5;
    pds_slo_req_t r = {.arrival_ms = 3, .prompt_tokens = 100, .output_tokens = 5};
    pds_slo_sim_result_t res;
    double ttft, tpot;
    cr_assert_eq(pds_slo_sim_run(&c, &r, 1, &res, &ttft, &tpot), PDS_OK);
    /* prefill 20 + exposed 1 + control 4 */
    cr_expect_float_eq(ttft, 25.0, 1e-9);
    /* 4 steps at context 101..104, each 0.5 ms slower */
    cr_expect_float_eq(tpot, (7.51 + 7.52 + 7.53 + 7.54) / 4, 1e-9);
    cr_expect_float_eq(res.makespan_ms, 25 + 7.51 + 7.52 + 7.53 + 7.54, 1e-9);
    /* colocated: the control path delays the first token only (prefill-first: prompt 20 ms) */
    c.mode = PDS_SLO_SIM_COLOC_PREFILL_FIRST;
    cr_assert_eq(pds_slo_sim_run(&c, &r, 1, &res, &ttft, &tpot), PDS_OK);
    cr_expect_float_eq(ttft, 20.0 + 4, 1e-9);
    cr_expect_float_eq(tpot, (7.51 + 7.52 + 7.53 + 7.54) / 4, 1e-9);
}

Test(slo, simulator_slows_steps_that_overlap_the_other_phase_by_its_contention)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = c.decode_model = pm;
    c.prefill_model.prefill_contention = 0.5;
    c.decode_model.decode_contention = 0.5;
    pds_slo_req_t r[2] = {{.arrival_ms = 0, .prompt_tokens = 100, .output_tokens = 5},
                          {.arrival_ms = 22, .prompt_tokens = 100, .output_tokens = 5}};
    pds_slo_sim_result_t res;
    double ttft[2], tpot[2];
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, ttft, tpot), PDS_OK);
    /* A: prefill 0..20 (decode idle), first token 21; its steps at context 101..104 start at
     * 21 (prefill idle: 7.01), then 28.01, 38.54 while B's prefill (28.01..58.01) runs (x 1.5),
     * and 49.085, whose first 8.925 ms overlap it (5.95 ms of work at 1 / 1.5 speed) */
    double ov = 58.01 - (21 + 7.01 + 1.5 * (7.02 + 7.03));
    double a_end = 21 + 7.01 + 1.5 * (7.02 + 7.03) + ov + (7.04 - ov / 1.5);
    cr_expect_float_eq(ttft[0], 21.0, 1e-9);
    cr_expect_float_eq(tpot[0], (a_end - 21) / 4, 1e-9);
    /* B (arrives 22, during A's first step): its OpenTransfer waits for that step (28.01), then
     * prefill 28.01..58.01 (20 ms x 1.5: A is decoding), exposed transfer 1 ms; the commit (59.01)
     * waits for A's last step, which ends A: B's first token at a_end, then steps with the
     * prefill node idle again */
    cr_expect_float_eq(ttft[1], a_end - 22.0, 1e-9);
    cr_expect_float_eq(tpot[1], (7.01 + 7.02 + 7.03 + 7.04) / 4, 1e-9);
}

Test(slo, simulator_holds_open_and_commit_until_the_decode_step_ends)
{
    /* pdserve-decode takes OpenTransfer and CommitTransfer between steps (its engine loop owns
     * the pool), so a busy decode node delays both a prompt's start and its first token */
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = c.decode_model = pm;
    pds_slo_req_t r[2] = {{.arrival_ms = 0, .prompt_tokens = 100, .output_tokens = 5},
                          {.arrival_ms = 22, .prompt_tokens = 100, .output_tokens = 5}};
    pds_slo_sim_result_t res;
    double ttft[2], tpot[2];
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, ttft, tpot), PDS_OK);
    /* A alone: prefill 0..20, first token 21, steps 21 -> 28.01 -> 35.03 -> 42.06 -> 49.10 */
    cr_expect_float_eq(ttft[0], 21.0, 1e-9);
    /* B: open at 28.01 (not 22), prefill to 48.01, commit at 49.01 during A's last step, first
     * token at 49.10 when it ends — 27.1 ms, not the 21 of an idle decode node */
    double a_end = 21 + 7.01 + 7.02 + 7.03 + 7.04;
    cr_expect_float_eq(ttft[1], a_end - 22, 1e-9);
    /* B then decodes alone */
    cr_expect_float_eq(tpot[1], (7.01 + 7.02 + 7.03 + 7.04) / 4, 1e-9);
    /* a one-token request's first token never waits for the decode node (Cancel, no commit) */
    r[1].output_tokens = 1;
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, ttft, tpot), PDS_OK);
    cr_expect_float_eq(ttft[1], 28.01 + 20 + 1 - 22, 1e-9);
}

Test(slo, a_prefill_batch_pays_each_prompts_attention_not_the_square_of_the_sum)
{
    /* B and C arrive while A's prompt computes and go into the next batch together: 200 tokens,
     * whose attention is per sequence — a + b * 200 + c * (100^2 + 100^2), not c * 200^2 */
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = c.decode_model = pm;
    c.prefill_model.prefill_c = 0.001;
    c.prefill_model.link_gbytes_per_s = 0;
    pds_slo_req_t r[3] = {{.arrival_ms = 0, .prompt_tokens = 100, .output_tokens = 1},
                          {.arrival_ms = 1, .prompt_tokens = 100, .output_tokens = 1},
                          {.arrival_ms = 1, .prompt_tokens = 100, .output_tokens = 1}};
    pds_slo_sim_result_t res;
    double ttft[3];
    cr_assert_eq(pds_slo_sim_run(&c, r, 3, &res, ttft, NULL), PDS_OK);
    double a = 10 + 0.1 * 100 + 0.001 * 100 * 100;                /* 30 */
    double bc = 10 + 0.1 * 200 + 0.001 * (100 * 100 + 100 * 100); /* 50, not 70 */
    cr_expect_float_eq(ttft[0], a, 1e-9);
    cr_expect_float_eq(ttft[1], a + bc - 1, 1e-9);
    cr_expect_float_eq(ttft[2], a + bc - 1, 1e-9);
    cr_expect_float_eq(pds_slo_prefill_batch_ms(&c.prefill_model, 200, 20000), bc, 1e-9);
    cr_expect_float_eq(pds_slo_prefill_ms(&c.prefill_model, 200), 10 + 20 + 40, 1e-9);
}

Test(slo, simulator_holds_requests_until_kv_room_frees)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = pm;
    c.prefill_model.link_gbytes_per_s = 0;
    c.decode_model = pm;
    c.decode_kv_blocks = 10; /* 160 tokens: one request of 100 + 50 at a time */
    c.place.policy = PDS_SLO_POLICY_BEST_EFFORT;
    pds_slo_req_t r[2] = {{0, 100, 50}, {1, 100, 50}};
    pds_slo_sim_result_t res;
    double ttft[2], tpot[2];
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, ttft, tpot), PDS_OK);
    cr_expect_float_eq(ttft[0], 20.0, 1e-9);
    /* the second starts prefill when the first finishes its 49 decode steps */
    double steps = 0;
    for (int g = 1; g < 50; g++) steps += 5 + 1 + 0.01 * (100 + g);
    cr_expect_float_eq(ttft[1], 20 + steps + 20 - 1, 1e-6);
    cr_expect_eq(res.n_finished, 2);
    /* with REJECT the second one is turned away instead (the targets cannot matter here) */
    c.place.policy = PDS_SLO_POLICY_REJECT;
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, ttft, tpot), PDS_OK);
    cr_expect_eq(res.n_rejected, 1);
    cr_expect_eq(ttft[1], -1);
}

Test(slo, chunked_prefill_of_a_lone_prompt_costs_its_chunks)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.mode = PDS_SLO_SIM_COLOC_CHUNKED;
    c.chunk_tokens = 256;
    c.prefill_model = (pds_slo_model_t){.prefill_a = 4, .prefill_b = 0.1, .prefill_c = 1e-4};
    c.decode_model = pm;
    pds_slo_req_t r = {0, 1000, 1};
    pds_slo_sim_result_t res;
    double ttft;
    cr_assert_eq(pds_slo_sim_run(&c, &r, 1, &res, &ttft, NULL), PDS_OK);
    /* 4 chunks (256, 256, 256, 232): 4 overheads + b * 1000 + c * 1000^2 */
    cr_expect_float_eq(ttft, 4 * 4 + 100 + 100, 1e-9);
    c.mode = PDS_SLO_SIM_COLOC_PREFILL_FIRST;
    cr_assert_eq(pds_slo_sim_run(&c, &r, 1, &res, &ttft, NULL), PDS_OK);
    cr_expect_float_eq(ttft, 4 + 100 + 100, 1e-9);
}

Test(slo, prefill_first_stalls_a_running_decode_and_chunking_spreads_the_prompt)
{
    /* r0 decodes (6 ms steps) when a 4000-token prompt arrives at 50 ms, mid-step (ends at 53) */
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model = (pds_slo_model_t){.prefill_a = 4, .prefill_b = 0.1};
    c.decode_model = (pds_slo_model_t){.decode_d = 5, .decode_e = 1};
    pds_slo_req_t r[2] = {{0, 10, 100}, {50, 4000, 2}};
    pds_slo_sim_result_t res;
    double tt[2], tp[2];
    c.mode = PDS_SLO_SIM_COLOC_PREFILL_FIRST;
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, tt, tp), PDS_OK);
    /* r0: first token at 5, 9 tokens by 53; the 404 ms prefill stalls it until 457; one step of
     * batch 2 (7 ms) finishes r1; 90 more steps: last token at 1004 */
    cr_expect_float_eq(tt[1], 457.0 - 50, 1e-9);
    cr_expect_float_eq(tp[0], (1004.0 - 5) / 99, 1e-9);
    c.mode = PDS_SLO_SIM_COLOC_CHUNKED;
    c.chunk_tokens = 512;
    cr_assert_eq(pds_slo_sim_run(&c, r, 2, &res, tt, tp), PDS_OK);
    /* 7 chunks of 511 beside r0's token (6 + 51.1 ms each) and one of 423 (6 + 42.3): r1's first
     * token at 53 + 448 = 501 (later), r0 gains 8 tokens meanwhile, never waiting > 57.1 ms; a
     * batch-2 step to 508, then 82 steps: 1000 */
    cr_expect_float_eq(tt[1], 501.0 - 50, 1e-9);
    cr_expect_float_eq(tp[0], (1000.0 - 5) / 99, 1e-9);
    cr_expect_eq(res.n_finished, 2);
}

Test(slo, simulator_is_deterministic_for_a_seed)
{
    pds_slo_workload_t w;
    cr_assert_eq(pds_slo_workload_builtin("chatbot", &w), PDS_OK);
    const int n = 3000;
    pds_slo_req_t *reqs = malloc(sizeof *reqs * n);
    double *t1 = malloc(sizeof(double) * n), *t2 = malloc(sizeof(double) * n);
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.n_prefill = 2, c.n_decode = 3;
    c.prefill_model = truth, c.decode_model = truth;
    c.decode_kv_blocks = 4000;
    c.ttft_ms = 250, c.tpot_ms = 100;
    pds_slo_sim_result_t r1, r2;
    cr_assert_eq(pds_slo_workload_generate(&w, 20, n, 9, 8192, reqs), PDS_OK);
    cr_assert_eq(pds_slo_sim_run(&c, reqs, n, &r1, t1, NULL), PDS_OK);
    cr_assert_eq(pds_slo_workload_generate(&w, 20, n, 9, 8192, reqs), PDS_OK);
    cr_assert_eq(pds_slo_sim_run(&c, reqs, n, &r2, t2, NULL), PDS_OK);
    cr_expect_eq(memcmp(t1, t2, sizeof(double) * n), 0);
    cr_expect_eq(memcmp(&r1, &r2, sizeof r1), 0);
    cr_assert_eq(pds_slo_workload_generate(&w, 20, n, 10, 8192, reqs), PDS_OK);
    cr_assert_eq(pds_slo_sim_run(&c, reqs, n, &r2, t2, NULL), PDS_OK);
    cr_expect_neq(memcmp(t1, t2, sizeof(double) * n), 0);
    free(reqs), free(t1), free(t2);
}

Test(slo, goodput_bisection_finds_the_rate_where_attainment_crosses_the_target)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    c.prefill_model.prefill_a = 10;
    c.decode_model.decode_d = 1;
    c.prefill_max_batch_tokens = 100;
    c.ttft_ms = 30; /* 3 service times */
    c.place.policy = PDS_SLO_POLICY_BEST_EFFORT;
    pds_slo_workload_t w = {.name = "md1",
                            .arrival = PDS_SLO_ARRIVAL_POISSON,
                            .prompt_median = 100,
                            .prompt_min = 100,
                            .prompt_max = 100,
                            .output_median = 1,
                            .output_min = 1,
                            .output_max = 1};
    double rate;
    pds_slo_sim_result_t at;
    cr_assert_eq(pds_slo_goodput(&c, &w, 5000, 3, 0.9, 1, 0.01, &rate, &at, NULL, NULL), PDS_OK);
    cr_expect(rate > 10 && rate < 100, "rate %g", rate); /* below the 100 req/s capacity */
    cr_expect_geq(at.attainment, 0.9);
    pds_slo_req_t *reqs = malloc(sizeof *reqs * 5000);
    pds_slo_sim_result_t above;
    cr_assert_eq(pds_slo_workload_generate(&w, rate * 1.03, 5000, 3, 0, reqs), PDS_OK);
    cr_assert_eq(pds_slo_sim_run(&c, reqs, 5000, &above, NULL, NULL), PDS_OK);
    cr_expect_lt(above.attainment, 0.9);
    free(reqs);
}

Test(slo, simulator_rejects_bad_configs_and_requests)
{
    pds_slo_sim_config_t c = pds_slo_sim_default_config();
    pds_slo_req_t r = {0, 10, 10};
    pds_slo_sim_result_t res;
    cr_expect_eq(pds_slo_sim_run(&c, &r, 1, &res, NULL, NULL), PDS_ERR_INVALID_ARG); /* no model */
    c.prefill_model = pm, c.decode_model = pm;
    c.n_decode = 0;
    cr_expect_eq(pds_slo_sim_run(&c, &r, 1, &res, NULL, NULL), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "n_decode") != NULL);
    c.n_decode = 1;
    r.output_tokens = 0;
    cr_expect_eq(pds_slo_sim_run(&c, &r, 1, &res, NULL, NULL), PDS_ERR_INVALID_ARG);
}

/* ---- profiles ----------------------------------------------------------------------------------
 */
static char *tmp_path(const char *name)
{
    const char *root = getenv("PDS_TEST_TMP");
    if (!root || !*root) root = "/tmp";
    mkdir(root, 0755);
    char *p = malloc(strlen(root) + strlen(name) + 32);
    sprintf(p, "%s/slo-%d-%s", root, (int)getpid(), name);
    return p;
}

Test(slo, profile_round_trips_through_a_file)
{
    pds_slo_profile_t a, b;
    pds_slo_profile_init(&a);
    snprintf(a.model_name, sizeof a.model_name, "small");
    snprintf(a.device, sizeof a.device, "NVIDIA H100 80GB HBM3");
    snprintf(a.backend, sizeof a.backend, "cuda");
    a.tp = 2, a.pp = 1, a.threads = 0;
    a.m = truth;
    a.m.decode_split = 24, a.m.decode_d2 = 1.0 / 3, a.m.decode_e2 = 0.7, a.m.decode_f2 = 1e-5;
    pds_slo_model_t kt = knot_truth();
    a.m.decode_knots = kt.decode_knots;
    memcpy(a.m.decode_knot_batch, kt.decode_knot_batch, sizeof kt.decode_knot_batch);
    memcpy(a.m.decode_knot_base, kt.decode_knot_base, sizeof kt.decode_knot_base);
    memcpy(a.m.decode_knot_f, kt.decode_knot_f, sizeof kt.decode_knot_f);
    a.m.link_gbytes_per_s = 12.5, a.m.link_msg_ms = 0.02, a.m.kv_bytes_per_token = 131072;
    a.m.n_layers = 32;
    a.m.ttft_overhead_ms = 7.87, a.m.decode_step_overhead_ms = 0.255;
    a.m.decode_contention = 0.181, a.m.prefill_contention = 0.173;
    snprintf(a.calibration, sizeof a.calibration, "run_slo_cpu.sh calibrate");
    a.prefill_fit = (pds_slo_fit_t){30, 0.0123456789, 0.999};
    a.decode_fit = (pds_slo_fit_t){96, 0.031, 0.98};
    a.kv_blocks = 123456, a.block_size = 16, a.max_batch_tokens = 4096, a.max_batch_seqs = 128;
    char *path = tmp_path("rt.json");
    cr_assert_eq(pds_slo_profile_save(&a, path), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_slo_profile_load(path, &b), PDS_OK, "%s", pds_err_detail());
    cr_expect_str_eq(b.model_name, "small");
    cr_expect_str_eq(b.device, "NVIDIA H100 80GB HBM3");
    cr_expect_str_eq(b.backend, "cuda");
    cr_expect_str_eq(b.calibration, "run_slo_cpu.sh calibrate");
    cr_expect_eq(b.tp, 2);
    cr_expect_eq(memcmp(&a.m, &b.m, sizeof a.m), 0, "model coefficients differ");
    cr_expect_eq(b.prefill_fit.n, 30);
    cr_expect_eq(b.prefill_fit.rms_rel, 0.0123456789);
    cr_expect_eq(b.kv_blocks, 123456);
    cr_expect_eq(b.max_batch_tokens, 4096);
    cr_expect_eq(b.max_batch_seqs, 128);
    cr_expect_neq(b.created[0], '\0');
    unlink(path);
    free(path);
}

static pds_status_t parse(const char *json, pds_slo_profile_t *p)
{
    return pds_slo_profile_parse(json, "t.json", p);
}

#define GOOD_HEAD "{\"magic\": \"pdserve-profile\", \"version\": 1, \"model\": \"small\", "
#define GOOD_PRE  "\"prefill\": {\"a_ms\": 1, \"b_ms_per_token\": 0.01, \"c_ms_per_token2\": 0}, "
#define GOOD_DEC  "\"decode\": {\"d_ms\": 2, \"e_ms_per_seq\": 0.1, \"f_ms_per_context_token\": 0}"

Test(slo, malformed_profiles_are_rejected_with_a_clear_message)
{
    pds_slo_profile_t p;
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE GOOD_DEC "}", &p), PDS_OK, "%s", pds_err_detail());
    cr_expect_eq(p.tp, 1);
    cr_expect_eq(p.max_batch_tokens, 8192);
    cr_expect_eq(p.m.ttft_overhead_ms, 0); /* no cluster section: an isolated engine */
    cr_expect_eq(p.m.decode_contention, 0);
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE GOOD_DEC ", \"cluster\": {\"ttft_overhead_ms\": 8, "
                                                   "\"decode_contention\": 0.2}}",
                       &p),
                 PDS_OK, "%s", pds_err_detail());
    cr_expect_eq(p.m.ttft_overhead_ms, 8);
    cr_expect_eq(p.m.decode_contention, 0.2);
    cr_expect_eq(p.m.decode_step_overhead_ms, 0);
    cr_expect_eq(
        parse(GOOD_HEAD GOOD_PRE GOOD_DEC ", \"cluster\": {\"prefill_contention\": -1}}", &p),
        PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "cluster overheads and contention must be >= 0") != NULL,
              "%s", pds_err_detail());
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE GOOD_DEC ", \"cluster\": 3}", &p), PDS_ERR_PARSE);

    cr_expect_eq(parse("{\"magic\": ", &p), PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "t.json:1:") != NULL, "%s", pds_err_detail());
    cr_expect_eq(parse("[1, 2]", &p), PDS_ERR_PARSE);
    cr_expect_eq(parse("{\"magic\": \"pdserve-plan\", \"version\": 1}", &p), PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "magic is 'pdserve-plan'") != NULL, "%s", pds_err_detail());
    cr_expect_eq(parse("{\"magic\": \"pdserve-profile\", \"version\": 9, \"model\": \"x\"}", &p),
                 PDS_ERR_UNSUPPORTED);
    cr_expect_eq(parse(GOOD_HEAD GOOD_DEC "}", &p), PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "missing section prefill") != NULL, "%s", pds_err_detail());
    cr_expect_eq(
        parse(GOOD_HEAD "\"prefill\": {\"a_ms\": 1, \"c_ms_per_token2\": 0}, " GOOD_DEC "}", &p),
        PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "missing field prefill.b_ms_per_token") != NULL, "%s",
              pds_err_detail());
    cr_expect_eq(parse(GOOD_HEAD "\"prefill\": {\"a_ms\": \"1\", \"b_ms_per_token\": 0.01, "
                                 "\"c_ms_per_token2\": 0}, " GOOD_DEC "}",
                       &p),
                 PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "prefill.a_ms must be a finite number") != NULL, "%s",
              pds_err_detail());
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE GOOD_DEC ", \"transfer\": {\"gbytes_per_s\": -1}}", &p),
                 PDS_ERR_INVALID_ARG);
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE GOOD_DEC ", \"tp\": 0}", &p), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "field tp = 0") != NULL, "%s", pds_err_detail());
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE GOOD_DEC ", \"kv\": {\"blocks\": 1.5}}", &p),
                 PDS_ERR_INVALID_ARG);
    /* a split without its second line */
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE "\"decode\": {\"d_ms\": 2, \"e_ms_per_seq\": 0.1, "
                                          "\"f_ms_per_context_token\": 0, \"split_batch\": 8}}",
                       &p),
                 PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "decode.d2_ms") != NULL, "%s", pds_err_detail());
    /* decode tables: good, one knot, batches out of order, a knot without its slope */
#define DEC_KNOTS(k)                                                                   \
    "\"decode\": {\"d_ms\": 2, \"e_ms_per_seq\": 0.1, \"f_ms_per_context_token\": 0, " \
    "\"knots\": " k "}}"
#define KNOT(b, base) "{\"batch\": " #b ", \"base_ms\": " #base ", \"ms_per_context_token\": 0.003}"
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE DEC_KNOTS("[" KNOT(1, 4) ", " KNOT(4, 12) "]"), &p),
                 PDS_OK, "%s", pds_err_detail());
    cr_expect_eq(p.m.decode_knots, 2);
    cr_expect_eq(p.m.decode_knot_base[1], 12);
    cr_expect_eq(pds_slo_decode_step_ms(&p.m, 2, 0), 4 + (12 - 4) / 3.0);
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE DEC_KNOTS("[" KNOT(1, 4) "]"), &p), PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "decode.knots must be an array of 2..16") != NULL, "%s",
              pds_err_detail());
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE DEC_KNOTS("[" KNOT(4, 4) ", " KNOT(2, 12) "]"), &p),
                 PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "decode.knots[1].batch 2") != NULL, "%s", pds_err_detail());
    cr_expect_eq(parse(GOOD_HEAD GOOD_PRE DEC_KNOTS("[" KNOT(1, 4) ", {\"batch\": 2, "
                                                                   "\"base_ms\": 5}]"),
                       &p),
                 PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "missing field decode.knots[1].ms_per_context_token") !=
                  NULL,
              "%s", pds_err_detail());
#undef KNOT
#undef DEC_KNOTS
    /* all-zero coefficients */
    cr_expect_eq(parse(GOOD_HEAD "\"prefill\": {\"a_ms\": 0, \"b_ms_per_token\": 0, "
                                 "\"c_ms_per_token2\": 0}, " GOOD_DEC "}",
                       &p),
                 PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_slo_profile_load("/nonexistent/p.json", &p), PDS_ERR_IO);
    cr_expect(strstr(pds_err_detail(), "/nonexistent/p.json") != NULL);
}

/* ---- traces and workloads ----------------------------------------------------------------------
 */
Test(slo, trace_csv_parses_azure_format_sorted_and_relative)
{
    const char *csv = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                      "2023-11-16 18:17:03.9799600,4808,10\r\n"
                      "2023-11-16 18:17:03.5,100,0\r\n"
                      "\r\n"
                      "2023-11-16 18:18:00,7,3";
    pds_slo_trace_t *t = NULL;
    cr_assert_eq(pds_slo_trace_parse(csv, strlen(csv), "t.csv", &t), PDS_OK, "%s",
                 pds_err_detail());
    cr_assert_eq(t->n, 3);
    cr_expect_eq(t->reqs[0].prompt_tokens, 100);
    cr_expect_eq(t->reqs[0].output_tokens, 1); /* 0 generated -> the first token still counts */
    cr_expect_float_eq(t->reqs[0].arrival_ms, 0.0, 1e-9);
    cr_expect_eq(t->reqs[1].prompt_tokens, 4808);
    cr_expect_float_eq(t->reqs[1].arrival_ms, 479.96, 1e-6);
    cr_expect_float_eq(t->reqs[2].arrival_ms, 56500.0, 1e-6);
    cr_expect_float_eq(t->duration_ms, 56500.0, 1e-6);
    pds_slo_trace_destroy(t);
    /* plain seconds and reordered columns */
    const char *csv2 = "ContextTokens,GeneratedTokens,TIMESTAMP\n5,6,1.5\n8,9,0.25\n";
    cr_assert_eq(pds_slo_trace_parse(csv2, strlen(csv2), "t2.csv", &t), PDS_OK);
    cr_expect_eq(t->reqs[0].prompt_tokens, 8);
    cr_expect_float_eq(t->reqs[1].arrival_ms, 1250.0, 1e-9);
    pds_slo_trace_destroy(t);
}

Test(slo, trace_csv_rejects_malformed_lines_naming_the_line)
{
    static const struct {
        const char *csv, *msg;
    } bad[] = {
        {"", "empty"},
        {"time,in,out\n1,2,3\n", "header must name"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,5\n", "t.csv:2: 2 fields"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,5,6,7\n", "t.csv:2: 4 fields"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,5,6\nyesterday,5,6\n",
         "t.csv:3: bad timestamp 'yesterday'"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-01 00:00:00,5,6\n", "bad timestamp"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,0,6\n", "t.csv:2: context tokens '0'"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,5,-6\n", "generated tokens '-6'"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,5x,6\n", "context tokens '5x'"},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(bad); i++) {
        pds_slo_trace_t *t = NULL;
        cr_expect_eq(pds_slo_trace_parse(bad[i].csv, strlen(bad[i].csv), "t.csv", &t),
                     PDS_ERR_PARSE, "case %zu", i);
        cr_expect(strstr(pds_err_detail(), bad[i].msg) != NULL, "case %zu: %s", i,
                  pds_err_detail());
        cr_expect_null(t);
    }
    pds_slo_trace_t *t = NULL;
    cr_expect_eq(pds_slo_trace_load("/nonexistent/trace.csv", &t), PDS_ERR_IO);
}

Test(slo, workload_generation_keeps_requests_across_rates_and_hits_the_rate)
{
    pds_slo_workload_t w;
    cr_assert_eq(pds_slo_workload_builtin("code", &w), PDS_OK);
    cr_expect_eq(pds_slo_workload_builtin("poetry", &w), PDS_ERR_NOT_FOUND);
    cr_assert_eq(pds_slo_workload_builtin("chatbot", &w), PDS_OK);
    const int n = 20000;
    pds_slo_req_t *a = malloc(sizeof *a * n), *b = malloc(sizeof *b * n);
    cr_assert_eq(pds_slo_workload_generate(&w, 10, n, 5, 0, a), PDS_OK);
    cr_assert_eq(pds_slo_workload_generate(&w, 40, n, 5, 0, b), PDS_OK);
    for (int i = 0; i < n; i++) {
        cr_assert_eq(a[i].prompt_tokens, b[i].prompt_tokens);
        cr_assert_eq(a[i].output_tokens, b[i].output_tokens);
        cr_assert_lt(fabs(a[i].arrival_ms - 4 * b[i].arrival_ms), 1e-6 * (1 + a[i].arrival_ms));
    }
    cr_expect_lt(REL(a[n - 1].arrival_ms / n, 100.0), 0.03); /* mean gap 100 ms at 10 req/s */
    double mean_in = 0;
    for (int i = 0; i < n; i++) mean_in += a[i].prompt_tokens / (double)n;
    cr_expect_lt(REL(mean_in, 161), 0.06, "mean prompt %g", mean_in); /* clipping trims a little */
    /* bursty arrivals: the gaps' coefficient of variation is the one asked for */
    w.arrival = PDS_SLO_ARRIVAL_GAMMA, w.cv = 3;
    cr_assert_eq(pds_slo_workload_generate(&w, 10, n, 5, 0, a), PDS_OK);
    double m1 = 0, m2 = 0;
    for (int i = 1; i < n; i++) {
        double g = a[i].arrival_ms - a[i - 1].arrival_ms;
        m1 += g / (n - 1), m2 += g * g / (n - 1);
    }
    double cv = sqrt(m2 - m1 * m1) / m1;
    cr_expect_lt(REL(m1, 100.0), 0.1, "mean gap %g", m1);
    cr_expect_lt(REL(cv, 3.0), 0.1, "cv %g", cv);
    /* clipping to the context */
    cr_assert_eq(pds_slo_workload_generate(&w, 10, n, 5, 300, a), PDS_OK);
    for (int i = 0; i < n; i++) cr_assert_leq(a[i].prompt_tokens + a[i].output_tokens, 300);
    free(a), free(b);
}

Test(slo, length_scale_shrinks_lengths_before_the_context_clip)
{
    pds_slo_workload_t w;
    cr_assert_eq(pds_slo_workload_builtin("summarization", &w), PDS_OK);
    enum { N = 200 };
    pds_slo_req_t a[N], b[N];
    cr_assert_eq(pds_slo_workload_generate(&w, 2.0, N, 9, 0, a), PDS_OK);
    w.length_scale = 0.25;
    cr_assert_eq(pds_slo_workload_generate(&w, 2.0, N, 9, 2048, b), PDS_OK);
    for (int i = 0; i < N; i++) {
        cr_expect_eq(b[i].arrival_ms, a[i].arrival_ms, "request %d keeps its arrival", i);
        int32_t p = (int32_t)floor(a[i].prompt_tokens * 0.25 + 0.5);
        int32_t o = (int32_t)PDS_MAX(1.0, floor(a[i].output_tokens * 0.25 + 0.5));
        if (p > 2047) p = 2047;
        if (p + o > 2048) o = 2048 - p;
        cr_expect_eq(b[i].prompt_tokens, p, "request %d prompt", i);
        cr_expect_eq(b[i].output_tokens, o, "request %d output", i);
    }
    w.length_scale = -1;
    cr_expect_eq(pds_slo_workload_generate(&w, 2.0, N, 9, 0, b), PDS_ERR_INVALID_ARG);
}

Test(slo, trace_replay_keeps_the_trace_pattern_scaled_to_the_rate)
{
    const char *csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,1\n1,20,2\n3,30,3\n";
    pds_slo_trace_t *t;
    cr_assert_eq(pds_slo_trace_parse(csv, strlen(csv), "t", &t), PDS_OK);
    pds_slo_workload_t w = {.name = "t", .arrival = PDS_SLO_ARRIVAL_TRACE, .trace = t};
    pds_slo_req_t r[4];
    /* the trace runs at 1 req per 1.5 s; at 2 req/s it is compressed by 3 */
    cr_assert_eq(pds_slo_workload_generate(&w, 2, 4, 1, 0, r), PDS_OK);
    cr_expect_float_eq(r[1].arrival_ms, 1000.0 / 3, 1e-9);
    cr_expect_float_eq(r[2].arrival_ms, 1000.0, 1e-9);
    cr_expect_float_eq(r[3].arrival_ms, (3000.0 + 1500.0) / 3, 1e-9); /* wrapped after one gap */
    cr_expect_eq(r[3].prompt_tokens, 10);
    cr_expect_eq(r[2].output_tokens, 3);
    /* two requests of it: their own gap (1 s) sets the scale, so 2 req/s puts them 0.5 s apart */
    cr_assert_eq(pds_slo_workload_generate(&w, 2, 2, 1, 0, r), PDS_OK);
    cr_expect_float_eq(r[1].arrival_ms, 500.0, 1e-9);
    pds_slo_trace_destroy(t);
}

/* ---- online refit ------------------------------------------------------------------------------
 */
Test(slo, refit_converges_to_new_timings_and_keeps_what_it_cannot_see)
{
    pds_slo_refit_t *r;
    cr_assert_eq(pds_slo_refit_create(64, 1.0, &r), PDS_OK);
    pds_slo_model_t m = truth;
    /* the node got 30% slower at prefill: feed varied samples of the new truth */
    pds_slo_model_t slow = truth;
    slow.prefill_a *= 1.3, slow.prefill_b *= 1.3, slow.prefill_c *= 1.3;
    for (int i = 0; i < 200; i++) {
        double T = 16 << (i % 10);
        pds_slo_refit_add_prefill(r, T, pds_slo_prefill_ms(&slow, T));
    }
    cr_expect_eq(pds_slo_refit_count(r, false), 64); /* bounded window */
    /* decode samples all at one point (batch 8, context 4096), 10% slower there */
    double y = 1.1 * pds_slo_decode_step_ms(&truth, 8, 4096);
    for (int i = 0; i < 20; i++) pds_slo_refit_add_decode(r, 8, 4096, y);
    pds_slo_fit_t pf, df;
    cr_assert_eq(pds_slo_refit_update(r, &m, &pf, &df), PDS_OK);
    for (double T = 64; T <= 8192; T *= 2)
        cr_expect_lt(REL(pds_slo_prefill_ms(&m, T), pds_slo_prefill_ms(&slow, T)), 0.02, "T %g", T);
    cr_expect_lt(REL(pds_slo_decode_step_ms(&m, 8, 4096), y), 0.02);
    /* far from the observed point the prior still shapes the line: it did not go wild */
    double far = pds_slo_decode_step_ms(&m, 128, 128 * 2048),
           before = pds_slo_decode_step_ms(&truth, 128, 128 * 2048);
    cr_expect_lt(REL(far, before), 0.3, "far %g before %g", far, before);
    cr_expect_eq(pds_slo_refit_create(1, 1.0, &(pds_slo_refit_t *){NULL}), PDS_ERR_INVALID_ARG);
    pds_slo_refit_destroy(r);
    pds_slo_refit_destroy(NULL);
}

Test(slo, constructors_survive_every_allocation_failure)
{
    pds_alloc_stats_t before, after;
    pds_alloc_stats(&before);
    for (int64_t k = 1;; k++) {
        pds_slo_refit_t *r = NULL;
        pds_alloc_fail_nth(k);
        pds_status_t s = pds_slo_refit_create(16, 1, &r);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        if (!hit) {
            cr_assert_eq(s, PDS_OK);
            pds_slo_refit_destroy(r);
            break;
        }
        cr_expect_eq(s, PDS_ERR_NO_MEMORY);
    }
    for (int64_t k = 1;; k++) {
        pds_slo_req_t q[3] = {{0, 10, 3}, {1, 20, 2}, {2, 30, 1}};
        pds_slo_sim_config_t c = pds_slo_sim_default_config();
        c.prefill_model = pm, c.decode_model = pm;
        pds_slo_sim_result_t res;
        pds_alloc_fail_nth(k);
        pds_status_t s = pds_slo_sim_run(&c, q, 3, &res, NULL, NULL);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        if (!hit) {
            cr_assert_eq(s, PDS_OK);
            cr_expect_eq(res.n_finished, 3);
            break;
        }
        cr_expect_eq(s, PDS_ERR_NO_MEMORY);
    }
    pds_alloc_stats(&after);
    cr_expect_eq(after.live_blocks, before.live_blocks);
}

/* Tests of common/sample: greedy and ties, (seed, position) determinism, the exact draw rule,
 * sampled distributions against the softmax, top-k / top-p / temperature, parameter validation. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "sample/sample.h"

static pds_sample_params_t params(float t, int k, float p, uint64_t seed)
{
    pds_sample_params_t s = pds_sample_default_params();
    s.temperature = t;
    s.top_k = k;
    s.top_p = p;
    s.seed = seed;
    return s;
}

/* probs 0.1 0.2 0.3 0.4 at T = 1 */
static const float four[4] = {-2.302585093f, -1.609437912f, -1.203972804f, -0.916290732f};

Test(sample, default_params_are_greedy_and_valid)
{
    pds_sample_params_t p = pds_sample_default_params();
    cr_expect_eq(p.temperature, 0.0f);
    cr_expect_eq(p.top_k, 0);
    cr_expect_eq(p.top_p, 1.0f);
    cr_expect_eq(p.seed, 0);
    cr_expect_eq(pds_sample_params_validate(&p), PDS_OK);
}

Test(sample, greedy_is_argmax_with_lowest_id_on_ties)
{
    pds_sample_params_t p = pds_sample_default_params();
    float l[6] = {1, 5, 3, 5, -2, 5};
    cr_expect_eq(pds_sample_token(&p, l, 6, 0, NULL), 1);
    float n[3] = {NAN, 2, 2};
    cr_expect_eq(pds_sample_token(&p, n, 3, 0, NULL), 1);
    cr_expect_eq(pds_sample_token(&p, four, 4, 123, NULL), 3);
}

Test(sample, uniform_is_a_pure_function_in_zero_one)
{
    cr_expect_eq(pds_sample_uniform(42, 7), pds_sample_uniform(42, 7));
    cr_expect_neq(pds_sample_uniform(42, 7), pds_sample_uniform(43, 7));
    cr_expect_neq(pds_sample_uniform(42, 7), pds_sample_uniform(42, 8));
    double sum = 0;
    for (int i = 0; i < 10000; i++) {
        double u = pds_sample_uniform(9, i);
        cr_assert(u >= 0 && u < 1);
        sum += u;
    }
    /* mean of 10000 U(0,1): sd 0.0029; 5 sigma */
    cr_expect(fabs(sum / 10000 - 0.5) < 0.015, "mean %f", sum / 10000);
}

Test(sample, draw_walks_ids_in_order_against_u)
{
    /* Exact rule: the first id whose cumulative probability exceeds u. */
    pds_sample_params_t p = params(1.0f, 0, 1.0f, 77);
    const double edges[4] = {0.1, 0.3, 0.6, 1.0};
    int checked = 0;
    for (int pos = 0; pos < 500; pos++) {
        double u = pds_sample_uniform(77, pos);
        int want = 0;
        while (u >= edges[want]) want++;
        bool near_edge = false;
        for (int j = 0; j < 3; j++) near_edge |= fabs(u - edges[j]) < 1e-6;
        if (near_edge) continue;
        cr_assert_eq(pds_sample_token(&p, four, 4, pos, NULL), want, "pos %d u %f", pos, u);
        checked++;
    }
    cr_expect_gt(checked, 490);
}

Test(sample, same_seed_and_position_give_the_same_token)
{
    float l[64];
    for (int i = 0; i < 64; i++) l[i] = (float)sin(i * 0.7);
    pds_sample_params_t a = params(0.8f, 20, 0.9f, 1234);
    char scratch[64 * 8];
    cr_assert_geq(sizeof(scratch), pds_sample_scratch_bytes(64));
    int differs_seed = 0, differs_pos = 0;
    int32_t first = pds_sample_token(&a, l, 64, 0, NULL);
    bool all_same = true;
    for (int pos = 0; pos < 1000; pos++) {
        int32_t t1 = pds_sample_token(&a, l, 64, pos, NULL);
        int32_t t2 = pds_sample_token(&a, l, 64, pos, scratch);
        cr_assert_eq(t1, t2);
        cr_assert(t1 >= 0 && t1 < 64);
        pds_sample_params_t b = a;
        b.seed = 999;
        differs_seed += pds_sample_token(&b, l, 64, pos, scratch) != t1;
        differs_pos += pds_sample_token(&a, l, 64, pos + 1, scratch) != t1;
        all_same &= t1 == first;
    }
    cr_expect(!all_same);
    cr_expect_gt(differs_seed, 500);
    cr_expect_gt(differs_pos, 500);
}

/* Draws n tokens at positions 0..n and checks each id's count against want[] within 5 sigma. */
static void check_distribution(const pds_sample_params_t *p, const float *l, int vocab,
                               const double *want, int n)
{
    int counts[16] = {0};
    for (int pos = 0; pos < n; pos++) {
        int32_t t = pds_sample_token(p, l, vocab, pos, NULL);
        cr_assert(t >= 0 && t < vocab);
        counts[t]++;
    }
    for (int i = 0; i < vocab; i++) {
        double mean = n * want[i], sd = sqrt(n * want[i] * (1 - want[i]));
        if (want[i] == 0) {
            cr_expect_eq(counts[i], 0, "token %d drawn %d times but has no mass", i, counts[i]);
        } else {
            cr_expect(fabs(counts[i] - mean) <= 5 * sd + 1, "token %d: %d draws, expected %.1f", i,
                      counts[i], mean);
        }
    }
}

Test(sample, draws_follow_the_softmax)
{
    pds_sample_params_t p = params(1.0f, 0, 1.0f, 5);
    check_distribution(&p, four, 4, (double[]){0.1, 0.2, 0.3, 0.4}, 20000);
}

Test(sample, temperature_scales_the_logits)
{
    /* T = 2: p ~ sqrt(q); T = 0.5: p ~ q^2. */
    double s2[4], s5[4], z2 = 0, z5 = 0, q[4] = {0.1, 0.2, 0.3, 0.4};
    for (int i = 0; i < 4; i++) z2 += s2[i] = sqrt(q[i]), z5 += s5[i] = q[i] * q[i];
    for (int i = 0; i < 4; i++) s2[i] /= z2, s5[i] /= z5;
    pds_sample_params_t p = params(2.0f, 0, 1.0f, 6);
    check_distribution(&p, four, 4, s2, 20000);
    p.temperature = 0.5f;
    check_distribution(&p, four, 4, s5, 20000);
}

Test(sample, top_k_keeps_the_k_most_probable_and_renormalises)
{
    pds_sample_params_t p = params(1.0f, 2, 1.0f, 8);
    check_distribution(&p, four, 4, (double[]){0, 0, 0.3 / 0.7, 0.4 / 0.7}, 20000);
    /* Ties at the cut go to the lower id. */
    float tied[4] = {1, 1, 1, 0};
    p.top_k = 2;
    check_distribution(&p, tied, 4, (double[]){0.5, 0.5, 0, 0}, 4000);
}

Test(sample, top_p_keeps_the_smallest_prefix_reaching_the_mass)
{
    pds_sample_params_t p = params(1.0f, 0, 0.41f, 9); /* 0.4 < 0.41 <= 0.7: ids 3, 2 */
    check_distribution(&p, four, 4, (double[]){0, 0, 0.3 / 0.7, 0.4 / 0.7}, 20000);
    p.top_p = 0.75f; /* 0.4 + 0.3 < 0.75: ids 3, 2, 1 */
    check_distribution(&p, four, 4, (double[]){0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9}, 20000);
    /* Mass is against the full softmax, not the top-k set: k = 2 keeps {3, 2} (0.7 of the mass);
     * top_p 0.5 still needs both. */
    p.top_k = 2;
    p.top_p = 0.5f;
    check_distribution(&p, four, 4, (double[]){0, 0, 0.3 / 0.7, 0.4 / 0.7}, 20000);
}

Test(sample, top_k_one_and_tiny_top_p_equal_greedy)
{
    float l[300];
    for (int i = 0; i < 300; i++) l[i] = (float)cos(i * 1.3) * 3;
    pds_sample_params_t g = pds_sample_default_params();
    int32_t greedy = pds_sample_token(&g, l, 300, 0, NULL);
    pds_sample_params_t k1 = params(1.5f, 1, 1.0f, 3);
    pds_sample_params_t p0 = params(1.5f, 0, 1e-6f, 3);
    pds_sample_params_t both = params(1.5f, 5, 1e-6f, 3);
    for (int pos = 0; pos < 200; pos++) {
        cr_assert_eq(pds_sample_token(&k1, l, 300, pos, NULL), greedy);
        cr_assert_eq(pds_sample_token(&p0, l, 300, pos, NULL), greedy);
        cr_assert_eq(pds_sample_token(&both, l, 300, pos, NULL), greedy);
    }
    /* With a tie at the top, every sampler agrees on the lower id. */
    float tie[3] = {0, 4, 4};
    cr_expect_eq(pds_sample_token(&g, tie, 3, 0, NULL), 1);
    cr_expect_eq(pds_sample_token(&k1, tie, 3, 0, NULL), 1);
    cr_expect_eq(pds_sample_token(&p0, tie, 3, 0, NULL), 1);
}

Test(sample, top_k_larger_than_vocab_means_no_limit)
{
    pds_sample_params_t a = params(1.0f, 0, 1.0f, 11), b = params(1.0f, 100, 1.0f, 11);
    for (int pos = 0; pos < 300; pos++)
        cr_assert_eq(pds_sample_token(&a, four, 4, pos, NULL),
                     pds_sample_token(&b, four, 4, pos, NULL));
}

Test(sample, filtered_and_unfiltered_paths_agree_when_the_filter_keeps_everything)
{
    /* top_k = 4 of 5 (the heap path) drops only an id of zero weight, so the filtered walk sees
     * the same weights as the unfiltered one and must give the same token. */
    float l[5] = {0.3f, -1.0f, 2.0f, 0.5f, -INFINITY};
    pds_sample_params_t a = params(0.9f, 0, 1.0f, 21), b = params(0.9f, 4, 1.0f, 21);
    for (int pos = 0; pos < 500; pos++)
        cr_assert_eq(pds_sample_token(&a, l, 5, pos, NULL), pds_sample_token(&b, l, 5, pos, NULL));
}

Test(sample, non_finite_logits_fall_back_to_greedy_or_are_skipped)
{
    pds_sample_params_t p = params(1.0f, 0, 1.0f, 1);
    float all_nan[3] = {NAN, NAN, NAN};
    cr_expect_eq(pds_sample_token(&p, all_nan, 3, 0, NULL), 0);
    float inf[3] = {0, INFINITY, 1};
    cr_expect_eq(pds_sample_token(&p, inf, 3, 0, NULL), 1);
    float some_nan[3] = {NAN, 0, NAN};
    for (int pos = 0; pos < 50; pos++)
        cr_assert_eq(pds_sample_token(&p, some_nan, 3, pos, NULL), 1);
}

Test(sample, validation_rejects_bad_fields_by_name)
{
    struct {
        pds_sample_params_t p;
        const char *field;
    } bad[] = {
        {params(NAN, 0, 1, 0), "temperature"},
        {params(-0.5f, 0, 1, 0), "temperature"},
        {params(INFINITY, 0, 1, 0), "temperature"},
        {params(1, 0, 0, 0), "top_p"},
        {params(1, 0, -0.1f, 0), "top_p"},
        {params(1, 0, 1.01f, 0), "top_p"},
        {params(1, 0, NAN, 0), "top_p"},
        {params(1, -1, 1, 0), "top_k"},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(bad); i++) {
        pds_err_clear();
        cr_expect_eq(pds_sample_params_validate(&bad[i].p), PDS_ERR_INVALID_ARG, "case %zu", i);
        cr_expect(strstr(pds_err_detail(), bad[i].field) != NULL, "case %zu: detail '%s'", i,
                  pds_err_detail());
        cr_expect_eq(pds_sample_token(&bad[i].p, four, 4, 0, NULL), -1);
    }
    pds_sample_params_t ok = params(0.7f, 40, 1.0f, 3);
    cr_expect_eq(pds_sample_params_validate(&ok), PDS_OK);
    cr_expect_eq(pds_sample_token(&ok, NULL, 4, 0, NULL), -1);
    cr_expect_eq(pds_sample_token(&ok, four, 0, 0, NULL), -1);
}

Test(sample, scratch_null_path_allocates_and_reports_failure)
{
    pds_sample_params_t p = params(1.0f, 2, 1.0f, 4);
    cr_expect_eq(pds_sample_scratch_bytes(100), 800);
    cr_expect_eq(pds_sample_scratch_bytes(0), 0);
    pds_alloc_stats_t a, b;
    pds_alloc_stats(&a);
    int32_t t = pds_sample_token(&p, four, 4, 0, NULL);
    pds_alloc_stats(&b);
    cr_expect(t == 2 || t == 3);
    cr_expect_eq(b.live_blocks, a.live_blocks);
    pds_alloc_fail_nth(1);
    cr_expect_eq(pds_sample_token(&p, four, 4, 0, NULL), -1);
    pds_alloc_fail_nth(0);
    char scratch[32];
    pds_alloc_fail_nth(1);
    cr_expect_eq(pds_sample_token(&p, four, 4, 0, scratch), t); /* no allocation with scratch */
    pds_alloc_fail_nth(0);
}

Test(sample, stop_set_membership)
{
    int32_t stop[3] = {257, 10, 0};
    cr_expect(pds_sample_is_stop(10, stop, 3));
    cr_expect(pds_sample_is_stop(0, stop, 3));
    cr_expect(!pds_sample_is_stop(11, stop, 3));
    cr_expect(!pds_sample_is_stop(10, stop, 0));
}

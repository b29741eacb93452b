/* Tests of common/kv: layout arithmetic, the block manager against a shadow model under random
 * operations, best-fit contiguity, exhaustion and bad-id handling, reservations, block tables. */
#include <criterion/criterion.h>
#include <string.h>

#include "kv/kv.h"

static int64_t live_blocks(void)
{
    pds_alloc_stats_t st;
    pds_alloc_stats(&st);
    return st.live_blocks;
}

static pds_kv_pool_t *make_pool(int n)
{
    pds_kv_pool_t *p = NULL;
    cr_assert_eq(pds_kv_pool_create(n, &p), PDS_OK);
    return p;
}

Test(kv, layout_offset_matches_hand_computed_example)
{
    pds_kv_layout_t l = {.n_layers = 2,
                         .n_blocks = 4,
                         .block_size = 16,
                         .n_kv_heads = 2,
                         .head_dim = 8,
                         .elem_size = 2};
    cr_expect_eq(pds_kv_block_elems(&l), 512);
    cr_expect_eq(pds_kv_block_bytes(&l), 1024);
    cr_expect_eq(pds_kv_layer_bytes(&l), 4096);
    /* block 3, V, slot 5, head 1, d 7: ((3*2+1)*16+5)*(2*8) + 1*8 + 7 = 117*16 + 15 = 1887 */
    cr_expect_eq(pds_kv_layout_offset(&l, 3, 1, 5, 1, 7), 1887);
    cr_expect_eq(pds_kv_layout_offset(&l, 2, 0, 0, 0, 0), 2 * 512);
    cr_expect_eq(pds_kv_layout_offset(&l, 0, 1, 0, 0, 0), 256); /* V follows K's 16*2*8 */
    cr_expect_eq(pds_kv_layout_offset(&l, 3, 1, 15, 1, 7), 4 * 512 - 1);
}

Test(kv, fresh_pool_gives_one_run_and_counts_add_up)
{
    pds_kv_pool_t *p = make_pool(1000);
    cr_expect_eq(pds_kv_pool_total(p), 1000);
    cr_expect_eq(pds_kv_pool_free_count(p), 1000);
    cr_expect_eq(pds_kv_pool_reserved_count(p), 0);
    int32_t ids[300];
    cr_assert_eq(pds_kv_pool_alloc(p, 300, NULL, ids), PDS_OK);
    cr_expect_eq(pds_kv_ids_runs(300, ids), 1);
    for (int i = 0; i < 300; i++) cr_expect_eq(pds_kv_pool_refcount(p, ids[i]), 1);
    cr_expect_eq(pds_kv_pool_free_count(p), 700);
    cr_expect_eq(pds_kv_pool_free(p, 300, ids), PDS_OK);
    cr_expect_eq(pds_kv_pool_free_count(p), 1000);
    cr_expect_eq(pds_kv_pool_refcount(p, ids[0]), 0);
    cr_expect_eq(pds_kv_pool_refcount(p, 1000), -1);
    pds_kv_pool_destroy(p);
}

Test(kv, allocation_best_fits_the_smallest_hole_that_holds_it)
{
    /* Layout after setup (A = allocated): [0,10) A, [10,13) free(3), [13,20) A, [20,25) free(5),
     * [25,30) A, [30,40) free(10), [40,64) A. */
    pds_kv_pool_t *p = make_pool(64);
    int32_t all[64];
    cr_assert_eq(pds_kv_pool_alloc(p, 64, NULL, all), PDS_OK);
    cr_assert_eq(pds_kv_ids_runs(64, all), 1);
    cr_assert_eq(pds_kv_pool_free(p, 3, (int32_t[]){10, 11, 12}), PDS_OK);
    cr_assert_eq(pds_kv_pool_free(p, 5, (int32_t[]){20, 21, 22, 23, 24}), PDS_OK);
    int32_t ten[10];
    for (int i = 0; i < 10; i++) ten[i] = 30 + i;
    cr_assert_eq(pds_kv_pool_free(p, 10, ten), PDS_OK);

    int32_t ids[16];
    cr_assert_eq(pds_kv_pool_alloc(p, 4, NULL, ids), PDS_OK); /* 5-hole, not the 10-hole */
    cr_expect_eq(ids[0], 20);
    cr_expect_eq(pds_kv_ids_runs(4, ids), 1);
    cr_assert_eq(pds_kv_pool_alloc(p, 3, NULL, ids), PDS_OK); /* exact fit */
    cr_expect_eq(ids[0], 10);
    cr_expect_eq(pds_kv_ids_runs(3, ids), 1);
    /* Free now: {24} and [30,40). 11 blocks do not fit one run: largest run whole, then 1 more. */
    cr_assert_eq(pds_kv_pool_alloc(p, 11, NULL, ids), PDS_OK);
    for (int i = 0; i < 10; i++) cr_expect_eq(ids[i], 30 + i);
    cr_expect_eq(ids[10], 24);
    cr_expect_eq(pds_kv_ids_runs(11, ids), 2);
    cr_expect_eq(pds_kv_pool_free_count(p), 0);
    pds_kv_pool_destroy(p);
}

Test(kv, exhaustion_fails_and_changes_nothing)
{
    pds_kv_pool_t *p = make_pool(10);
    int32_t ids[16];
    cr_assert_eq(pds_kv_pool_alloc(p, 7, NULL, ids), PDS_OK);
    int32_t more[16];
    for (int i = 0; i < 16; i++) more[i] = -7;
    cr_expect_eq(pds_kv_pool_alloc(p, 4, NULL, more), PDS_ERR_EXHAUSTED);
    cr_expect(strstr(pds_err_detail(), "4 blocks wanted") != NULL, "detail: %s", pds_err_detail());
    cr_expect_eq(more[0], -7);
    cr_expect_eq(pds_kv_pool_free_count(p), 3);
    for (int i = 7; i < 10; i++) cr_expect_eq(pds_kv_pool_refcount(p, i), 0);
    cr_expect_eq(pds_kv_pool_alloc(p, 11, NULL, more), PDS_ERR_EXHAUSTED);
    pds_kv_resv_t *r = NULL;
    cr_expect_eq(pds_kv_pool_reserve(p, 4, &r), PDS_ERR_EXHAUSTED);
    cr_expect_null(r);
    cr_expect_eq(pds_kv_pool_reserved_count(p), 0);
    cr_expect_eq(pds_kv_pool_alloc(p, 3, NULL, more), PDS_OK);
    cr_expect_eq(pds_kv_pool_free_count(p), 0);
    pds_kv_pool_destroy(p);
}

Test(kv, freeing_unallocated_or_out_of_range_ids_is_rejected_without_change)
{
    pds_kv_pool_t *p = make_pool(8);
    int32_t ids[4];
    cr_assert_eq(pds_kv_pool_alloc(p, 4, NULL, ids), PDS_OK); /* 0..3 */
    cr_expect_eq(pds_kv_pool_free(p, 2, (int32_t[]){0, 5}), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "ids[1] = 5 is not allocated") != NULL, "detail: %s",
              pds_err_detail());
    cr_expect_eq(pds_kv_pool_free(p, 2, (int32_t[]){1, 8}), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "outside pool of 8") != NULL);
    cr_expect_eq(pds_kv_pool_free(p, 2, (int32_t[]){2, -1}), PDS_ERR_INVALID_ARG);
    /* The same id twice with one reference: the second drop is invalid; the first is undone. */
    cr_expect_eq(pds_kv_pool_free(p, 2, (int32_t[]){3, 3}), PDS_ERR_INVALID_ARG);
    for (int i = 0; i < 4; i++) cr_expect_eq(pds_kv_pool_refcount(p, i), 1);
    cr_expect_eq(pds_kv_pool_free_count(p), 4);
    cr_expect_eq(pds_kv_pool_ref(p, 1, (int32_t[]){6}), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kv_pool_refcount(p, 6), 0);
    cr_expect_eq(pds_kv_pool_free(p, -1, ids), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kv_pool_alloc(p, -1, NULL, ids), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kv_pool_free(p, 4, ids), PDS_OK);
    cr_expect_eq(pds_kv_pool_free_count(p), 8);
    pds_kv_pool_destroy(p);
}

Test(kv, references_keep_a_block_until_the_last_free)
{
    pds_kv_pool_t *p = make_pool(4);
    int32_t ids[2];
    cr_assert_eq(pds_kv_pool_alloc(p, 2, NULL, ids), PDS_OK);
    cr_assert_eq(pds_kv_pool_ref(p, 2, ids), PDS_OK);
    cr_expect_eq(pds_kv_pool_refcount(p, ids[0]), 2);
    cr_assert_eq(pds_kv_pool_free(p, 2, ids), PDS_OK);
    cr_expect_eq(pds_kv_pool_refcount(p, ids[1]), 1);
    cr_expect_eq(pds_kv_pool_free_count(p), 2);
    cr_assert_eq(pds_kv_pool_free(p, 2, ids), PDS_OK);
    cr_expect_eq(pds_kv_pool_free_count(p), 4);
    pds_kv_pool_destroy(p);
}

Test(kv, reservation_guarantees_its_count_against_unreserved_allocation)
{
    pds_kv_pool_t *p = make_pool(10);
    pds_kv_resv_t *r = NULL;
    cr_assert_eq(pds_kv_pool_reserve(p, 6, &r), PDS_OK);
    cr_expect_eq(pds_kv_resv_remaining(r), 6);
    cr_expect_eq(pds_kv_pool_reserved_count(p), 6);
    cr_expect_eq(pds_kv_pool_free_count(p), 4);
    int32_t a[10], b[10];
    cr_expect_eq(pds_kv_pool_alloc(p, 5, NULL, a), PDS_ERR_EXHAUSTED);
    cr_assert_eq(pds_kv_pool_alloc(p, 4, NULL, a), PDS_OK);
    cr_expect_eq(pds_kv_pool_free_count(p), 0);
    /* The reservation still delivers all 6, drawn down as it goes. */
    cr_assert_eq(pds_kv_pool_alloc(p, 2, r, b), PDS_OK);
    cr_expect_eq(pds_kv_resv_remaining(r), 4);
    cr_expect_eq(pds_kv_pool_reserved_count(p), 4);
    cr_assert_eq(pds_kv_pool_alloc(p, 4, r, b + 2), PDS_OK);
    cr_expect_eq(pds_kv_resv_remaining(r), 0);
    /* Beyond the reservation with no unreserved room left: exhausted, nothing drawn. */
    cr_expect_eq(pds_kv_pool_alloc(p, 1, r, b + 6), PDS_ERR_EXHAUSTED);
    pds_kv_pool_release(p, r);
    cr_expect_eq(pds_kv_pool_reserved_count(p), 0);
    cr_expect_eq(pds_kv_pool_free(p, 4, a), PDS_OK);
    cr_expect_eq(pds_kv_pool_free(p, 6, b), PDS_OK);
    cr_expect_eq(pds_kv_pool_free_count(p), 10);
    pds_kv_pool_destroy(p);
}

Test(kv, reservation_overflow_draws_from_unreserved_and_release_returns_the_rest)
{
    pds_kv_pool_t *p = make_pool(10);
    pds_kv_resv_t *r = NULL;
    cr_assert_eq(pds_kv_pool_reserve(p, 3, &r), PDS_OK);
    int32_t ids[5];
    cr_assert_eq(pds_kv_pool_alloc(p, 5, r, ids), PDS_OK); /* 3 from r, 2 unreserved */
    cr_expect_eq(pds_kv_resv_remaining(r), 0);
    cr_expect_eq(pds_kv_pool_free_count(p), 5);
    pds_kv_pool_release(p, r);
    cr_assert_eq(pds_kv_pool_reserve(p, 4, &r), PDS_OK);
    cr_assert_eq(pds_kv_pool_alloc(p, 1, r, ids), PDS_OK);
    pds_kv_pool_release(p, r); /* 3 unused return */
    cr_expect_eq(pds_kv_pool_reserved_count(p), 0);
    cr_expect_eq(pds_kv_pool_free_count(p), 4);
    pds_kv_pool_release(p, NULL);
    pds_kv_pool_destroy(p);
}

Test(kv, reservation_of_another_pool_is_rejected)
{
    pds_kv_pool_t *p = make_pool(4), *q = make_pool(4);
    pds_kv_resv_t *r = NULL;
    cr_assert_eq(pds_kv_pool_reserve(q, 2, &r), PDS_OK);
    int32_t ids[2];
    cr_expect_eq(pds_kv_pool_alloc(p, 2, r, ids), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kv_pool_free_count(p), 4);
    cr_expect_eq(pds_kv_resv_remaining(r), 2);
    pds_kv_pool_destroy(p);
    pds_kv_pool_destroy(q); /* frees the outstanding reservation too (LSan checks) */
}

/* ---- random operations against a shadow model -------------------------------------------------
 */
typedef struct {
    int n;
    int32_t ids[40];
} owner_t;

static uint64_t rng_next(uint64_t *s)
{
    *s += 1;
    return pds_mix64(*s);
}

Test(kv, random_operations_match_a_shadow_model_and_leave_the_pool_free)
{
    enum { N = 300, MAX_OWNERS = 200, MAX_RESV = 16, OPS = 20000 };
    for (uint64_t seed = 1; seed <= 4; seed++) {
        pds_kv_pool_t *p = make_pool(N);
        static int shadow[N];
        static owner_t owners[MAX_OWNERS];
        pds_kv_resv_t *resv[MAX_RESV];
        int resv_left[MAX_RESV];
        int n_owners = 0, n_resv = 0;
        memset(shadow, 0, sizeof(shadow));
        uint64_t rng = seed * 1000003;
        int n_alloc_ok = 0, n_exhausted = 0;
        for (int op = 0; op < OPS; op++) {
            int kind = (int)(rng_next(&rng) % 10);
            if (kind <= 3 && n_owners < MAX_OWNERS) { /* alloc, maybe from a reservation */
                owner_t *o = &owners[n_owners];
                o->n = 1 + (int)(rng_next(&rng) % 40);
                int ri = (n_resv > 0 && rng_next(&rng) % 2) ? (int)(rng_next(&rng) % n_resv) : -1;
                int free_phys = 0, reserved = 0;
                for (int i = 0; i < N; i++) free_phys += shadow[i] == 0;
                for (int i = 0; i < n_resv; i++) reserved += resv_left[i];
                int from_r = ri >= 0 ? PDS_MIN(o->n, resv_left[ri]) : 0;
                bool expect_ok = o->n - from_r <= free_phys - reserved;
                pds_status_t s = pds_kv_pool_alloc(p, o->n, ri >= 0 ? resv[ri] : NULL, o->ids);
                if (!expect_ok) {
                    cr_assert_eq(s, PDS_ERR_EXHAUSTED);
                    n_exhausted++;
                    if (ri >= 0) cr_assert_eq(pds_kv_resv_remaining(resv[ri]), resv_left[ri]);
                } else {
                    cr_assert_eq(s, PDS_OK, "op %d: %s", op, pds_err_detail());
                    for (int i = 0; i < o->n; i++) {
                        cr_assert(o->ids[i] >= 0 && o->ids[i] < N);
                        cr_assert_eq(shadow[o->ids[i]], 0, "block %d handed out twice", o->ids[i]);
                        shadow[o->ids[i]] = 1;
                    }
                    if (ri >= 0) resv_left[ri] -= from_r;
                    n_owners++;
                    n_alloc_ok++;
                }
            } else if (kind == 4 && n_owners > 0 && n_owners < MAX_OWNERS) { /* share an owner */
                owner_t *src = &owners[rng_next(&rng) % n_owners];
                cr_assert_eq(pds_kv_pool_ref(p, src->n, src->ids), PDS_OK);
                owners[n_owners] = *src;
                for (int i = 0; i < src->n; i++) shadow[src->ids[i]]++;
                n_owners++;
            } else if (kind <= 6 && n_owners > 0) { /* free an owner */
                int oi = (int)(rng_next(&rng) % n_owners);
                cr_assert_eq(pds_kv_pool_free(p, owners[oi].n, owners[oi].ids), PDS_OK);
                for (int i = 0; i < owners[oi].n; i++) shadow[owners[oi].ids[i]]--;
                owners[oi] = owners[--n_owners];
            } else if (kind == 7 && n_resv < MAX_RESV) { /* reserve */
                int n = (int)(rng_next(&rng) % 60);
                int expect_free = pds_kv_pool_free_count(p);
                pds_status_t s = pds_kv_pool_reserve(p, n, &resv[n_resv]);
                if (n <= expect_free) {
                    cr_assert_eq(s, PDS_OK);
                    resv_left[n_resv++] = n;
                } else {
                    cr_assert_eq(s, PDS_ERR_EXHAUSTED);
                }
            } else if (kind == 8 && n_resv > 0) { /* release */
                int ri = (int)(rng_next(&rng) % n_resv);
                pds_kv_pool_release(p, resv[ri]);
                resv[ri] = resv[n_resv - 1];
                resv_left[ri] = resv_left[n_resv - 1];
                n_resv--;
            } else { /* an invalid free changes nothing */
                int32_t id = (int32_t)(rng_next(&rng) % (N + 20)) - 10;
                if (id >= 0 && id < N && shadow[id] > 0) continue;
                cr_assert_eq(pds_kv_pool_free(p, 1, &id), PDS_ERR_INVALID_ARG);
            }
            /* Counts always agree with the model. */
            int free_phys = 0, reserved = 0;
            for (int i = 0; i < N; i++) {
                cr_assert_eq(pds_kv_pool_refcount(p, i), shadow[i], "op %d block %d", op, i);
                free_phys += shadow[i] == 0;
            }
            for (int i = 0; i < n_resv; i++) {
                cr_assert_eq(pds_kv_resv_remaining(resv[i]), resv_left[i]);
                reserved += resv_left[i];
            }
            cr_assert_eq(pds_kv_pool_reserved_count(p), reserved);
            cr_assert_eq(pds_kv_pool_free_count(p), free_phys - reserved, "op %d", op);
        }
        cr_expect_gt(n_alloc_ok, 1000);
        cr_expect_gt(n_exhausted, 10); /* the run did reach exhaustion */
        while (n_owners > 0) {
            owner_t *o = &owners[--n_owners];
            cr_assert_eq(pds_kv_pool_free(p, o->n, o->ids), PDS_OK);
        }
        while (n_resv > 0) pds_kv_pool_release(p, resv[--n_resv]);
        cr_expect_eq(pds_kv_pool_free_count(p), N);
        cr_expect_eq(pds_kv_pool_reserved_count(p), 0);
        /* Fully free again means fully contiguous again. */
        int32_t all[N];
        cr_assert_eq(pds_kv_pool_alloc(p, N, NULL, all), PDS_OK);
        cr_expect_eq(pds_kv_ids_runs(N, all), 1);
        pds_kv_pool_destroy(p);
    }
}

Test(kv, create_under_allocation_failure_leaks_nothing)
{
    cr_expect_eq(pds_kv_pool_create(0, &(pds_kv_pool_t *){NULL}), PDS_ERR_INVALID_ARG);
    int64_t before = live_blocks();
    int failures = 0;
    for (int64_t n = 1; n < 20; n++) {
        pds_kv_pool_t *p = NULL;
        pds_alloc_fail_nth(n);
        pds_status_t s = pds_kv_pool_create(100, &p);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        if (!hit) {
            cr_assert_eq(s, PDS_OK);
            pds_kv_pool_t *q = p;
            pds_kv_resv_t *r = NULL;
            pds_alloc_fail_nth(1);
            cr_expect_eq(pds_kv_pool_reserve(q, 1, &r), PDS_ERR_NO_MEMORY);
            pds_alloc_fail_nth(0);
            cr_expect_eq(pds_kv_pool_reserved_count(q), 0);
            pds_kv_pool_destroy(p);
            break;
        }
        failures++;
        cr_expect_eq(s, PDS_ERR_NO_MEMORY);
        cr_expect_null(p);
        cr_expect_eq(live_blocks(), before);
    }
    cr_expect_eq(failures, 3);
    cr_expect_eq(live_blocks(), before);
}

Test(kv, seq_grow_allocates_whole_blocks_contiguously)
{
    pds_kv_pool_t *p = make_pool(16);
    pds_kv_seq_t s;
    pds_kv_seq_init(&s);
    cr_assert_eq(pds_kv_seq_grow(&s, p, 4, 5, NULL), PDS_OK);
    cr_expect_eq(s.n_tokens, 5);
    cr_expect_eq(s.n_blocks, 2);
    cr_assert_eq(pds_kv_seq_grow(&s, p, 4, 3, NULL), PDS_OK);
    cr_expect_eq(s.n_tokens, 8);
    cr_expect_eq(s.n_blocks, 2);
    /* Another sequence takes a block elsewhere; s still extends in place. */
    int32_t other;
    cr_assert_eq(pds_kv_pool_alloc(p, 1, NULL, &other), PDS_OK);
    for (int i = 0; i < 5; i++) cr_assert_eq(pds_kv_seq_grow(&s, p, 4, 4, NULL), PDS_OK);
    cr_expect_eq(s.n_tokens, 28);
    cr_expect_eq(s.n_blocks, 7);
    cr_expect_eq(other, 2);
    cr_expect_eq(s.blocks[2], 3);
    cr_expect_eq(pds_kv_ids_runs(s.n_blocks, s.blocks), 2);
    cr_expect_eq(pds_kv_pool_free_count(p), 16 - 7 - 1);
    /* Failure changes nothing. */
    cr_expect_eq(pds_kv_seq_grow(&s, p, 4, 4 * 9, NULL), PDS_ERR_EXHAUSTED);
    cr_expect_eq(s.n_tokens, 28);
    cr_expect_eq(s.n_blocks, 7);
    cr_expect_eq(pds_kv_pool_free_count(p), 8);
    cr_expect_eq(pds_kv_seq_grow(&s, p, 0, 1, NULL), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kv_seq_grow(&s, p, 4, -1, NULL), PDS_ERR_INVALID_ARG);
    pds_kv_seq_release(&s, p);
    cr_expect_eq(s.n_tokens, 0);
    cr_expect_eq(s.n_blocks, 0);
    cr_expect_eq(pds_kv_pool_free_count(p), 15);
    /* Still usable after release. */
    cr_assert_eq(pds_kv_seq_grow(&s, p, 4, 1, NULL), PDS_OK);
    cr_expect_eq(s.n_blocks, 1);
    pds_kv_seq_release(&s, p);
    pds_kv_seq_fini(&s);
    cr_expect_null(s.blocks);
    pds_kv_pool_destroy(p);
}

Test(kv, seq_grow_draws_from_a_reservation)
{
    pds_kv_pool_t *p = make_pool(8);
    pds_kv_resv_t *r = NULL;
    cr_assert_eq(pds_kv_pool_reserve(p, 8, &r), PDS_OK);
    pds_kv_seq_t s;
    pds_kv_seq_init(&s);
    cr_expect_eq(pds_kv_seq_grow(&s, p, 16, 1, NULL), PDS_ERR_EXHAUSTED);
    cr_assert_eq(pds_kv_seq_grow(&s, p, 16, 40, r), PDS_OK);
    cr_expect_eq(s.n_blocks, 3);
    cr_expect_eq(pds_kv_resv_remaining(r), 5);
    cr_expect_eq(pds_kv_ids_runs(s.n_blocks, s.blocks), 1);
    pds_kv_seq_release(&s, p);
    pds_kv_pool_release(p, r);
    cr_expect_eq(pds_kv_pool_free_count(p), 8);
    pds_kv_seq_fini(&s);
    pds_kv_pool_destroy(p);
}

Test(kv, seq_adopt_takes_the_given_ids_and_release_frees_them)
{
    pds_kv_pool_t *p = make_pool(8);
    int32_t ids[3];
    cr_assert_eq(pds_kv_pool_alloc(p, 3, NULL, ids), PDS_OK);
    pds_kv_seq_t s;
    pds_kv_seq_init(&s);
    cr_assert_eq(pds_kv_seq_adopt(&s, 3, ids, 40), PDS_OK);
    cr_expect_eq(s.n_tokens, 40);
    cr_expect_eq(s.n_blocks, 3);
    cr_expect_arr_eq(s.blocks, ids, sizeof(ids));
    cr_expect_eq(pds_kv_seq_adopt(&s, 3, ids, 40), PDS_ERR_FAILED_PRECONDITION);
    /* Growing continues after the adopted blocks. */
    cr_assert_eq(pds_kv_seq_grow(&s, p, 16, 9, NULL), PDS_OK);
    cr_expect_eq(s.n_blocks, 4);
    cr_expect_eq(s.blocks[3], ids[2] + 1);
    pds_kv_seq_release(&s, p);
    cr_expect_eq(pds_kv_pool_free_count(p), 8);
    for (int i = 0; i < 3; i++) cr_expect_eq(pds_kv_pool_refcount(p, ids[i]), 0);
    pds_kv_seq_fini(&s);
    pds_kv_pool_destroy(p);
}

Test(kv, ids_runs_counts_maximal_consecutive_ranges)
{
    cr_expect_eq(pds_kv_ids_runs(0, NULL), 0);
    cr_expect_eq(pds_kv_ids_runs(4, (int32_t[]){5, 6, 7, 8}), 1);
    cr_expect_eq(pds_kv_ids_runs(4, (int32_t[]){5, 6, 9, 10}), 2);
    cr_expect_eq(pds_kv_ids_runs(3, (int32_t[]){3, 2, 1}), 3);
}

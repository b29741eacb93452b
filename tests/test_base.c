/* Tests of common/base: status names, error detail, allocation accounting and injection, arena. */
#include <criterion/criterion.h>
#include <string.h>

#include "base/base.h"

Test(base, status_names_and_texts_come_from_one_list)
{
    cr_expect_str_eq(pds_status_name(PDS_ERR_NO_MEMORY), "PDS_ERR_NO_MEMORY");
    cr_expect_str_eq(pds_status_text(PDS_ERR_TIMEOUT), "timed out");
    cr_expect_str_eq(pds_status_name(PDS_OK), "PDS_OK");
    cr_expect_str_eq(pds_status_name((pds_status_t)-999), "PDS_STATUS_UNKNOWN");
    cr_expect(PDS_AGAIN > 0 && PDS_ERR_INTERNAL < 0);
}

Test(base, error_detail_records_message_and_origin)
{
    pds_err_clear();
    pds_status_t s = PDS_ERR(PDS_ERR_PARSE, "bad header length %d", 7);
    cr_expect_eq(s, PDS_ERR_PARSE);
    cr_expect_eq(pds_err_status(), PDS_ERR_PARSE);
    cr_expect_str_eq(pds_err_detail(), "bad header length 7");
    cr_expect(strstr(pds_err_where(), "test_base.c:") != NULL);
}

Test(base, allocation_is_counted_and_aligned)
{
    pds_alloc_stats_t a, b;
    pds_alloc_stats(&a);
    char *p = pds_malloc(1000);
    cr_assert_not_null(p);
    cr_expect_eq((uintptr_t)p % 64, 0);
    p = pds_realloc(p, 3000);
    cr_assert_not_null(p);
    pds_alloc_stats(&b);
    cr_expect_eq(b.live_bytes - a.live_bytes, 3000);
    cr_expect_eq(b.live_blocks - a.live_blocks, 1);
    pds_free(p);
    pds_alloc_stats(&b);
    cr_expect_eq(b.live_bytes, a.live_bytes);
}

Test(base, fail_nth_fails_exactly_that_allocation)
{
    pds_alloc_fail_nth(3);
    void *a = pds_malloc(8), *b = pds_malloc(8), *c = pds_malloc(8), *d = pds_malloc(8);
    pds_alloc_fail_nth(0);
    cr_expect_not_null(a);
    cr_expect_not_null(b);
    cr_expect_null(c);
    cr_expect_not_null(d);
    pds_free(a);
    pds_free(b);
    pds_free(d);
}

Test(base, arena_allocates_aligned_and_frees_everything)
{
    pds_alloc_stats_t before, after;
    pds_alloc_stats(&before);
    pds_arena_t *a;
    cr_assert_eq(pds_arena_create(128, &a), PDS_OK);
    for (int i = 0; i < 100; i++) {
        char *p = pds_arena_alloc(a, (size_t)(i * 7 + 1));
        cr_assert_not_null(p);
        cr_expect_eq((uintptr_t)p % 16, 0);
        memset(p, 0xab, (size_t)(i * 7 + 1));
    }
    cr_expect_str_eq(pds_arena_strdup(a, "req-1"), "req-1");
    pds_arena_reset(a);
    pds_arena_destroy(a);
    pds_arena_destroy(NULL);
    pds_alloc_stats(&after);
    cr_expect_eq(after.live_bytes, before.live_bytes);
}

Test(base, arena_create_fails_cleanly_under_injection)
{
    pds_alloc_stats_t before, after;
    pds_alloc_stats(&before);
    for (int n = 1; n <= 3; n++) {
        pds_arena_t *a = NULL;
        pds_alloc_fail_nth(n);
        pds_status_t s = pds_arena_create(0, &a);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        if (hit) {
            cr_expect_eq(s, PDS_ERR_NO_MEMORY);
        } else {
            cr_expect_eq(s, PDS_OK);
            pds_arena_destroy(a);
        }
    }
    pds_alloc_stats(&after);
    cr_expect_eq(after.live_bytes, before.live_bytes);
}

Test(base, log_level_parses_known_names_only)
{
    pds_log_level_t l;
    cr_expect_eq(pds_log_level_parse("warn", &l), PDS_OK);
    cr_expect_eq(l, PDS_LOG_WARN);
    cr_expect_eq(pds_log_level_parse("loud", &l), PDS_ERR_INVALID_ARG);
}

#include <pthread.h>

static void *pusher(void *arg)
{
    pds_queue_t *q = arg;
    for (intptr_t i = 1; i <= 1000; i++) pds_queue_push(q, (void *)i);
    return NULL;
}

Test(base, queue_hands_items_across_threads_in_order)
{
    pds_queue_t *q;
    cr_assert_eq(pds_queue_create(&q), PDS_OK);
    void *item;
    cr_expect_eq(pds_queue_pop(q, 0, &item), PDS_AGAIN);
    cr_expect_eq(pds_queue_pop(q, 5, &item), PDS_AGAIN);
    pthread_t t;
    pthread_create(&t, NULL, pusher, q);
    for (intptr_t i = 1; i <= 1000; i++) {
        cr_assert_eq(pds_queue_pop(q, -1, &item), PDS_OK);
        cr_assert_eq((intptr_t)item, i);
    }
    pthread_join(t, NULL);
    pds_queue_push(q, (void *)7);
    pds_queue_close(q);
    cr_expect_eq(pds_queue_push(q, (void *)8), PDS_ERR_CANCELLED);
    cr_expect_eq(pds_queue_pop(q, -1, &item), PDS_OK);
    cr_expect_eq((intptr_t)item, 7);
    cr_expect_eq(pds_queue_pop(q, -1, &item), PDS_ERR_CANCELLED);
    pds_queue_destroy(q);
}

Test(base, queue_create_fails_cleanly_under_injection)
{
    pds_alloc_stats_t before, after;
    pds_alloc_stats(&before);
    int failures = 0;
    for (int n = 1;; n++) {
        pds_queue_t *q = NULL;
        pds_alloc_fail_nth(n);
        pds_status_t s = pds_queue_create(&q);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        if (!hit) {
            cr_assert_eq(s, PDS_OK);
            pds_queue_destroy(q);
            break;
        }
        cr_expect_eq(s, PDS_ERR_NO_MEMORY);
        failures++;
    }
    cr_expect_eq(failures, 2, "queue create makes two allocations, each must fail cleanly");
    pds_alloc_stats(&after);
    cr_expect_eq(after.live_bytes, before.live_bytes);
    cr_expect_eq(after.live_blocks, before.live_blocks);
}

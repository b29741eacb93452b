/* alloc.c: counted allocation. Each block carries a 64-byte header holding its size, which keeps
 * the payload 64-byte aligned (SIMD loads, cache lines) and lets free/realloc keep the byte count
 * exact. Failure injection fails exactly the armed Nth allocation so constructors' unwinding can
 * be swept one allocation at a time under LeakSanitizer. */
#include "base/base.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HDR 64

static atomic_llong live_bytes, live_blocks, peak_bytes, total_allocs;
static atomic_llong fail_nth;   /* 0: disarmed */
static atomic_llong fail_count; /* allocations seen since arming */
static atomic_bool fail_hit;

static bool should_fail(void)
{
    long long n = atomic_load(&fail_nth);
    if (n <= 0) return false;
    long long c = atomic_fetch_add(&fail_count, 1) + 1;
    if (c == n) {
        atomic_store(&fail_hit, true);
        return true;
    }
    return false;
}

static void account(long long delta_bytes, long long delta_blocks)
{
    long long now = atomic_fetch_add(&live_bytes, delta_bytes) + delta_bytes;
    atomic_fetch_add(&live_blocks, delta_blocks);
    long long peak = atomic_load(&peak_bytes);
    while (now > peak && !atomic_compare_exchange_weak(&peak_bytes, &peak, now)) {
    }
}

void *pds_malloc(size_t size)
{
    if (should_fail()) return NULL;
    if (size > SIZE_MAX - HDR) return NULL;
    void *raw = NULL;
    if (posix_memalign(&raw, HDR, size + HDR) != 0) return NULL;
    *(size_t *)raw = size;
    account((long long)size, 1);
    atomic_fetch_add(&total_allocs, 1);
    return (char *)raw + HDR;
}

void *pds_calloc(size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) return NULL;
    void *p = pds_malloc(n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

void pds_free(void *p)
{
    if (!p) return;
    char *raw = (char *)p - HDR;
    account(-(long long)*(size_t *)raw, -1);
    free(raw);
}

void *pds_realloc(void *p, size_t size)
{
    if (!p) return pds_malloc(size);
    size_t old = *(size_t *)((char *)p - HDR);
    void *q = pds_malloc(size);
    if (!q) return NULL;
    memcpy(q, p, old < size ? old : size);
    pds_free(p);
    return q;
}

char *pds_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = pds_malloc(len + 1);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *pds_strdup(const char *s)
{
    return pds_strndup(s, SIZE_MAX);
}

char *pds_asprintf(const char *fmt, ...)
{
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *s = n < 0 ? NULL : pds_malloc((size_t)n + 1);
    if (s) vsnprintf(s, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    return s;
}

void pds_alloc_stats(pds_alloc_stats_t *out)
{
    out->live_bytes = atomic_load(&live_bytes);
    out->live_blocks = atomic_load(&live_blocks);
    out->peak_bytes = atomic_load(&peak_bytes);
    out->total_allocs = atomic_load(&total_allocs);
}

void pds_alloc_fail_nth(int64_t n)
{
    atomic_store(&fail_count, 0);
    atomic_store(&fail_hit, false);
    atomic_store(&fail_nth, (long long)n);
}

int64_t pds_alloc_fail_count(void)
{
    return atomic_load(&fail_count);
}

bool pds_alloc_fail_triggered(void)
{
    return atomic_load(&fail_hit);
}

/* ---- arena ------------------------------------------------------------------------------------
 */
typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t size, used;
    _Alignas(16) unsigned char data[];
} arena_chunk_t;

struct pds_arena {
    arena_chunk_t *head;
    size_t chunk_size;
};

static arena_chunk_t *chunk_new(size_t size)
{
    arena_chunk_t *c = pds_malloc(sizeof *c + size);
    if (!c) return NULL;
    c->next = NULL;
    c->size = size;
    c->used = 0;
    return c;
}

pds_status_t pds_arena_create(size_t chunk_size, pds_arena_t **out)
{
    pds_arena_t *a = pds_malloc(sizeof *a);
    if (!a) return PDS_ERR(PDS_ERR_NO_MEMORY, "arena");
    a->chunk_size = chunk_size ? chunk_size : 16384;
    a->head = chunk_new(a->chunk_size);
    if (!a->head) {
        pds_free(a);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "arena chunk of %zu bytes", chunk_size);
    }
    *out = a;
    return PDS_OK;
}

void pds_arena_destroy(pds_arena_t *a)
{
    if (!a) return;
    for (arena_chunk_t *c = a->head, *n; c; c = n) {
        n = c->next;
        pds_free(c);
    }
    pds_free(a);
}

void *pds_arena_alloc(pds_arena_t *a, size_t size)
{
    size = (size + 15) & ~(size_t)15;
    if (a->head->used + size > a->head->size) {
        arena_chunk_t *c = chunk_new(size > a->chunk_size ? size : a->chunk_size);
        if (!c) return NULL;
        c->next = a->head;
        a->head = c;
    }
    void *p = a->head->data + a->head->used;
    a->head->used += size;
    return p;
}

char *pds_arena_strdup(pds_arena_t *a, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = pds_arena_alloc(a, n);
    if (d) memcpy(d, s, n);
    return d;
}

void pds_arena_reset(pds_arena_t *a)
{
    while (a->head->next) {
        arena_chunk_t *n = a->head->next;
        pds_free(a->head);
        a->head = n;
    }
    a->head->used = 0;
}

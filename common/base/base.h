/* base: what every pdserve module shares — the one status enum, error detail, leveled logging,
 * counted allocation with failure injection, monotonic time, and a small arena.
 *
 * Status: 0 ok, negative errors, positive "again / in progress" (libuv/UCX style), generated from
 * the single X-macro list below so names and texts never drift apart. A function that fails calls
 * PDS_ERR(status, fmt, ...) once, where the failure is first detected: that records a detail
 * message (with file:line) in a thread-local slot which callers up the stack read with
 * pds_err_detail() to report it (to a log line, a gRPC status message, a CLI error) without
 * logging it again.
 *
 * Allocation: every heap allocation in pdserve goes through pds_malloc & co. They keep a byte and
 * block count (pds_alloc_stats) and let tests fail the Nth allocation (pds_alloc_fail_nth), so that
 * every constructor's error path can be exercised under ASan/LSan. Memory is 64-byte aligned.
 *
 * Thread safety: all functions here are thread-safe. The logger level and the allocation counters
 * are the only mutable globals in the project (atomics).
 */
#ifndef PDS_BASE_H
#define PDS_BASE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- status ---------------------------------------------------------------------------------- */
#define PDS_STATUS_LIST(X)                                     \
    X(PDS_OK, 0, "ok")                                         \
    X(PDS_AGAIN, 1, "try again")                               \
    X(PDS_IN_PROGRESS, 2, "in progress")                       \
    X(PDS_ERR_INVALID_ARG, -1, "invalid argument")             \
    X(PDS_ERR_NO_MEMORY, -2, "out of memory")                  \
    X(PDS_ERR_IO, -3, "I/O error")                             \
    X(PDS_ERR_PARSE, -4, "malformed input")                    \
    X(PDS_ERR_NOT_FOUND, -5, "not found")                      \
    X(PDS_ERR_EXHAUSTED, -6, "resource exhausted")             \
    X(PDS_ERR_UNSUPPORTED, -7, "unsupported")                  \
    X(PDS_ERR_TIMEOUT, -8, "timed out")                        \
    X(PDS_ERR_CANCELLED, -9, "cancelled")                      \
    X(PDS_ERR_UNAVAILABLE, -10, "unavailable")                 \
    X(PDS_ERR_CORRUPT, -11, "data corrupt")                    \
    X(PDS_ERR_OUT_OF_RANGE, -12, "out of range")               \
    X(PDS_ERR_ALREADY_EXISTS, -13, "already exists")           \
    X(PDS_ERR_FAILED_PRECONDITION, -14, "failed precondition") \
    X(PDS_ERR_TRANSPORT, -15, "transport error")               \
    X(PDS_ERR_DEVICE, -16, "device error")                     \
    X(PDS_ERR_INTERNAL, -17, "internal error")

typedef enum {
#define PDS_STATUS_ENUM_(name, value, text) name = value,
    PDS_STATUS_LIST(PDS_STATUS_ENUM_)
#undef PDS_STATUS_ENUM_
} pds_status_t;

/* "PDS_ERR_NO_MEMORY"; "PDS_STATUS_UNKNOWN" for values not in the list. Never NULL. */
const char *pds_status_name(pds_status_t s);
/* "out of memory"; never NULL. */
const char *pds_status_text(pds_status_t s);

/* ---- error detail (thread-local, set once where an error is detected) ------------------------ */
/* Records "file:line: message" as this thread's last error detail and returns `s`, so that
 * `return PDS_ERR(PDS_ERR_PARSE, "bad header length %zu", n);` reads naturally. Logs at debug. */
#define PDS_ERR(s, ...) pds_err_set((s), __FILE__, __LINE__, __VA_ARGS__)
pds_status_t pds_err_set(pds_status_t s, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The message of the last PDS_ERR on this thread ("" if none), without the file:line prefix. */
const char *pds_err_detail(void);
/* "file:line" where the last PDS_ERR on this thread was raised ("" if none). */
const char *pds_err_where(void);
/* The status of the last PDS_ERR on this thread (PDS_OK if none). */
pds_status_t pds_err_status(void);
void pds_err_clear(void);

/* ---- logging --------------------------------------------------------------------------------- */
typedef enum {
    PDS_LOG_TRACE = 0,
    PDS_LOG_DEBUG,
    PDS_LOG_INFO,
    PDS_LOG_WARN,
    PDS_LOG_ERROR,
    PDS_LOG_OFF
} pds_log_level_t;

/* Lines look like: `ts=2026-11-24T10:00:00.123Z level=info mod=router msg="..." key=value`.
 * The caller writes the key=value part: PDS_LOG_INFO("router", "placed req=%s p=%d", id, p). The
 * first word of the formatted text becomes msg=; the rest is appended as is. */
#define PDS_LOG(lvl, mod, ...)  pds_log_write((lvl), (mod), __FILE__, __LINE__, __VA_ARGS__)
#define PDS_LOG_TRACE(mod, ...) PDS_LOG(PDS_LOG_TRACE, mod, __VA_ARGS__)
#define PDS_LOG_DEBUG(mod, ...) PDS_LOG(PDS_LOG_DEBUG, mod, __VA_ARGS__)
#define PDS_LOG_INFO(mod, ...)  PDS_LOG(PDS_LOG_INFO, mod, __VA_ARGS__)
#define PDS_LOG_WARN(mod, ...)  PDS_LOG(PDS_LOG_WARN, mod, __VA_ARGS__)
#define PDS_LOG_ERROR(mod, ...) PDS_LOG(PDS_LOG_ERROR, mod, __VA_ARGS__)

void pds_log_write(pds_log_level_t lvl, const char *mod, const char *file, int line,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Initial level comes from $PDS_LOG_LEVEL (trace|debug|info|warn|error|off), default info. */
void pds_log_set_level(pds_log_level_t lvl);
pds_log_level_t pds_log_get_level(void);
bool pds_log_enabled(pds_log_level_t lvl);
/* Parses "info" etc.; PDS_ERR_INVALID_ARG for anything else. */
pds_status_t pds_log_level_parse(const char *s, pds_log_level_t *out);

/* ---- assertions (internal invariants only; never for input from users or the network) -------- */
#define PDS_ASSERT(cond)                                         \
    do {                                                         \
        if (!(cond)) pds_assert_fail(#cond, __FILE__, __LINE__); \
    } while (0)
_Noreturn void pds_assert_fail(const char *expr, const char *file, int line);

/* ---- allocation -------------------------------------------------------------------------------
 * pds_malloc(0) returns a valid unique pointer. pds_free(NULL) is a no-op. All return NULL on
 * failure (real or injected); callers turn that into PDS_ERR_NO_MEMORY. */
void *pds_malloc(size_t size);
void *pds_calloc(size_t n, size_t size);
void *pds_realloc(void *p, size_t size);
void pds_free(void *p);
char *pds_strdup(const char *s);
char *pds_strndup(const char *s, size_t n);
/* printf into a fresh pds_malloc'ed string; NULL on failure. */
char *pds_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

typedef struct {
    int64_t live_bytes;   /* bytes currently allocated through pds_malloc & co */
    int64_t live_blocks;  /* allocations not yet freed */
    int64_t peak_bytes;   /* high-water mark of live_bytes */
    int64_t total_allocs; /* successful allocations since start */
} pds_alloc_stats_t;
void pds_alloc_stats(pds_alloc_stats_t *out);

/* Test hook: the nth allocation from now (1 = the next one) fails, and only that one; 0 disarms.
 * pds_alloc_fail_count() says how many allocations have been made since arming, so a test can
 * sweep n = 1.. until a constructor succeeds without hitting the failure. */
void pds_alloc_fail_nth(int64_t n);
int64_t pds_alloc_fail_count(void);
/* True if the armed failure was triggered since the last pds_alloc_fail_nth(). */
bool pds_alloc_fail_triggered(void);

/* ---- arena: per-request memory freed in one go ----------------------------------------------- */
typedef struct pds_arena pds_arena_t;
/* chunk_size: bytes per backing chunk (0 = 16 KiB). Owner: one thread at a time. */
pds_status_t pds_arena_create(size_t chunk_size, pds_arena_t **out);
void pds_arena_destroy(pds_arena_t *a); /* accepts NULL */
/* 16-byte aligned; NULL on allocation failure. Memory lives until destroy or reset. */
void *pds_arena_alloc(pds_arena_t *a, size_t size);
char *pds_arena_strdup(pds_arena_t *a, const char *s);
void pds_arena_reset(pds_arena_t *a); /* frees all but the first chunk */

/* ---- queue: hand work from any thread to an owner thread, with wake-up ----------------------
 * A FIFO of pointers guarded by a mutex + condition variable. Any thread pushes; usually one
 * owner thread pops. Closing wakes every waiter; pops then drain what is left and finally return
 * PDS_ERR_CANCELLED. The queue never owns the items. */
typedef struct pds_queue pds_queue_t;
pds_status_t pds_queue_create(pds_queue_t **out);
void pds_queue_destroy(pds_queue_t *q); /* accepts NULL; items still queued are dropped */
/* PDS_ERR_NO_MEMORY, or PDS_ERR_CANCELLED after close (the item is not queued). */
pds_status_t pds_queue_push(pds_queue_t *q, void *item);
/* Waits up to timeout_ms (< 0: forever, 0: poll). PDS_OK with *item, PDS_AGAIN on timeout,
 * PDS_ERR_CANCELLED when closed and empty. */
pds_status_t pds_queue_pop(pds_queue_t *q, double timeout_ms, void **item);
size_t pds_queue_len(pds_queue_t *q);
void pds_queue_close(pds_queue_t *q);

/* ---- time --------------------------------------------------------------------------------------
 */
int64_t pds_time_now_ns(void);  /* CLOCK_MONOTONIC */
double pds_time_now_ms(void);   /* CLOCK_MONOTONIC, milliseconds as double */
int64_t pds_time_wall_ns(void); /* CLOCK_REALTIME */
void pds_time_sleep_ms(double ms);

/* ---- small helpers ----------------------------------------------------------------------------
 */
#define PDS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define PDS_MIN(a, b)    ((a) < (b) ? (a) : (b))
#define PDS_MAX(a, b)    ((a) > (b) ? (a) : (b))
#define PDS_DIV_UP(a, b) (((a) + (b)-1) / (b))
/* Propagate a non-OK status (errors and "again"): `PDS_TRY(pds_x(...));` */
#define PDS_TRY(expr)                                \
    do {                                             \
        pds_status_t pds_try_s_ = (expr);            \
        if (pds_try_s_ != PDS_OK) return pds_try_s_; \
    } while (0)

/* 64-bit mixing (splitmix64 finaliser): the project's one hash for seeds and checksums. */
static inline uint64_t pds_mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

#endif /* PDS_BASE_H */

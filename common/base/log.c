/* log.c: one-line key=value logs to stderr. Each line is formatted into a stack buffer and written
 * with a single write(2), so lines from different threads never interleave. */
#include "base/base.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *const level_names[] = {"trace", "debug", "info", "warn", "error", "off"};
static atomic_int log_level = -1; /* -1: not yet read from the environment */

pds_status_t pds_log_level_parse(const char *s, pds_log_level_t *out)
{
    for (int i = 0; i <= PDS_LOG_OFF; i++) {
        if (s && strcmp(s, level_names[i]) == 0) {
            *out = (pds_log_level_t)i;
            return PDS_OK;
        }
    }
    return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown log level '%s' (trace|debug|info|warn|error|off)",
                   s ? s : "(null)");
}

pds_log_level_t pds_log_get_level(void)
{
    int lvl = atomic_load(&log_level);
    if (lvl < 0) {
        pds_log_level_t parsed = PDS_LOG_INFO;
        const char *env = getenv("PDS_LOG_LEVEL");
        if (env && *env) {
            /* Parse without PDS_ERR: it would recurse into the logger. */
            for (int i = 0; i <= PDS_LOG_OFF; i++)
                if (strcmp(env, level_names[i]) == 0) parsed = (pds_log_level_t)i;
        }
        int expected = -1;
        atomic_compare_exchange_strong(&log_level, &expected, (int)parsed);
        lvl = atomic_load(&log_level);
    }
    return (pds_log_level_t)lvl;
}

void pds_log_set_level(pds_log_level_t lvl)
{
    atomic_store(&log_level, (int)lvl);
}

bool pds_log_enabled(pds_log_level_t lvl)
{
    return lvl >= pds_log_get_level() && lvl < PDS_LOG_OFF;
}

void pds_log_write(pds_log_level_t lvl, const char *mod, const char *file, int line,
                   const char *fmt, ...)
{
    if (!pds_log_enabled(lvl)) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;

    /* msg="first word" rest... */
    size_t first = strcspn(msg, " ");
    const char *rest = msg[first] ? msg + first + 1 : "";
    char buf[1400];
    int n =
        snprintf(buf, sizeof buf,
                 "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s mod=%s msg=%.*s%s%s at=%s:%d\n",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 ts.tv_nsec / 1000000, level_names[lvl], mod, (int)first, msg, *rest ? " " : "",
                 rest, base, line);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) {
        n = sizeof buf - 1;
        buf[n - 1] = '\n';
    }
    ssize_t w = write(STDERR_FILENO, buf, (size_t)n);
    (void)w;
}

_Noreturn void pds_assert_fail(const char *expr, const char *file, int line)
{
    pds_log_write(PDS_LOG_ERROR, "assert", file, line, "assertion_failed expr=\"%s\"", expr);
    abort();
}

/* status.c: names and texts of pds_status_t, and the thread-local error detail slot that
 * PDS_ERR fills once where an error is detected. */
#include "base/base.h"

#include <stdio.h>
#include <string.h>

const char *pds_status_name(pds_status_t s)
{
    switch (s) {
#define PDS_STATUS_NAME_(name, value, text) \
    case name:                              \
        return #name;
        PDS_STATUS_LIST(PDS_STATUS_NAME_)
#undef PDS_STATUS_NAME_
    }
    return "PDS_STATUS_UNKNOWN";
}

const char *pds_status_text(pds_status_t s)
{
    switch (s) {
#define PDS_STATUS_TEXT_(name, value, text) \
    case name:                              \
        return text;
        PDS_STATUS_LIST(PDS_STATUS_TEXT_)
#undef PDS_STATUS_TEXT_
    }
    return "unknown status";
}

static _Thread_local struct {
    pds_status_t status;
    char where[96];
    char detail[512];
} last_err;

pds_status_t pds_err_set(pds_status_t s, const char *file, int line, const char *fmt, ...)
{
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    last_err.status = s;
    snprintf(last_err.where, sizeof last_err.where, "%s:%d", base, line);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_err.detail, sizeof last_err.detail, fmt, ap);
    va_end(ap);
    if (pds_log_enabled(PDS_LOG_DEBUG))
        pds_log_write(PDS_LOG_DEBUG, "err", file, line, "error status=%s detail=\"%s\"",
                      pds_status_name(s), last_err.detail);
    return s;
}

const char *pds_err_detail(void)
{
    return last_err.detail;
}

const char *pds_err_where(void)
{
    return last_err.where;
}

pds_status_t pds_err_status(void)
{
    return last_err.status;
}

void pds_err_clear(void)
{
    last_err.status = PDS_OK;
    last_err.where[0] = '\0';
    last_err.detail[0] = '\0';
}

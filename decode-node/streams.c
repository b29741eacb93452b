/* streams.c: per-router TokenStream calls and their pending tokens (see streams.h).
 *
 * A router is a small record found by a linear search over a handful of routers; its pending list
 * holds one entry per (request, run of contiguous indices), so in the usual case — stream open,
 * every step flushed — an entry is one token that lives from add to flush. A send that fails
 * keeps the entries (EXHAUSTED: the router reads too slowly, we try again next step; CANCELLED:
 * the router is gone, the next stream it opens gets them), so a flush never loses tokens; only
 * the bound does, loudly.
 */
#include "decode-node/streams.h"

#include <string.h>

#define MOD "decode"

typedef struct {
    char *request_id;
    int32_t *tokens; /* (n) output tokens, positions index.. */
    int n, cap;
    uint32_t index;
    bool finished;
    int reason;
    char *error;
    Pdserve__V1__SeqTimings timings;
} pend_t;

typedef struct {
    char *router_id;
    void *call; /* NULL = no open stream */
    uint64_t stream_id;
    pend_t *pend;
    int n_pend, cap_pend;
    int64_t pend_units; /* tokens + finish-only entries */
    bool warned_no_stream;
} router_t;

struct pds_decode_streams {
    char *node_id;
    pds_decode_calls_t calls;
    int64_t max_units;
    router_t *routers;
    int n_routers, cap_routers;
};

pds_status_t pds_decode_streams_create(const char *node_id, const pds_decode_calls_t *calls,
                                       int64_t max_buffered_tokens, pds_decode_streams_t **out)
{
    if (!node_id || !calls || !calls->send || !calls->finish || max_buffered_tokens <= 0 || !out)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "streams: bad arguments");
    pds_decode_streams_t *st = pds_calloc(1, sizeof *st);
    if (!st) return PDS_ERR(PDS_ERR_NO_MEMORY, "streams");
    st->node_id = pds_strdup(node_id);
    if (!st->node_id) {
        pds_free(st);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "streams node id");
    }
    st->calls = *calls;
    st->max_units = max_buffered_tokens;
    *out = st;
    return PDS_OK;
}

static void pend_free(pend_t *p)
{
    pds_free(p->request_id);
    pds_free(p->tokens);
    pds_free(p->error);
}

static void router_clear(router_t *r)
{
    for (int i = 0; i < r->n_pend; i++) pend_free(&r->pend[i]);
    r->n_pend = 0;
    r->pend_units = 0;
}

void pds_decode_streams_destroy(pds_decode_streams_t *st)
{
    if (!st) return;
    for (int i = 0; i < st->n_routers; i++) {
        router_clear(&st->routers[i]);
        pds_free(st->routers[i].pend);
        pds_free(st->routers[i].router_id);
    }
    pds_free(st->routers);
    pds_free(st->node_id);
    pds_free(st);
}

static router_t *router_find(pds_decode_streams_t *st, const char *router_id, bool create)
{
    for (int i = 0; i < st->n_routers; i++)
        if (strcmp(st->routers[i].router_id, router_id) == 0) return &st->routers[i];
    if (!create) return NULL;
    if (st->n_routers == st->cap_routers) {
        int cap = st->cap_routers ? 2 * st->cap_routers : 4;
        router_t *n = pds_realloc(st->routers, (size_t)cap * sizeof *n);
        if (!n) return NULL;
        st->routers = n;
        st->cap_routers = cap;
    }
    router_t *r = &st->routers[st->n_routers];
    memset(r, 0, sizeof *r);
    r->router_id = pds_strdup(router_id);
    if (!r->router_id) return NULL;
    st->n_routers++;
    return r;
}

void pds_decode_streams_attach(pds_decode_streams_t *st, const char *router_id, void *call,
                               uint64_t stream_id)
{
    router_t *r = router_find(st, router_id, true);
    if (!r) {
        PDS_LOG_ERROR(MOD, "stream_attach_failed router=%s reason=no_memory", router_id);
        st->calls.finish(call, PDS_ERR_EXHAUSTED, "decode node out of memory for a TokenStream");
        return;
    }
    if (r->call) {
        PDS_LOG_INFO(MOD, "stream_replaced router=%s old=%llu new=%llu", router_id,
                     (unsigned long long)r->stream_id, (unsigned long long)stream_id);
        st->calls.finish(r->call, PDS_OK, "replaced by a newer TokenStream");
    } else {
        PDS_LOG_INFO(MOD, "stream_open router=%s stream=%llu pending=%lld", router_id,
                     (unsigned long long)stream_id, (long long)r->pend_units);
    }
    r->call = call;
    r->stream_id = stream_id;
    r->warned_no_stream = false;
}

void pds_decode_streams_gone(pds_decode_streams_t *st, uint64_t stream_id)
{
    for (int i = 0; i < st->n_routers; i++) {
        router_t *r = &st->routers[i];
        if (r->call && r->stream_id == stream_id) {
            PDS_LOG_INFO(MOD, "stream_closed router=%s stream=%llu by=client", r->router_id,
                         (unsigned long long)stream_id);
            st->calls.finish(r->call, PDS_ERR_CANCELLED, "TokenStream cancelled by the router");
            r->call = NULL;
            return;
        }
    }
}

/* The entry the next tokens of request_id go to: the last one of that request if it is still
 * open and ends right before index; otherwise a fresh one. NULL on allocation failure. */
static pend_t *pend_for(router_t *r, const char *request_id, uint32_t index)
{
    for (int i = r->n_pend - 1; i >= 0; i--) {
        pend_t *p = &r->pend[i];
        if (strcmp(p->request_id, request_id) != 0) continue;
        if (!p->finished && p->index + (uint32_t)p->n == index) return p;
        break;
    }
    if (r->n_pend == r->cap_pend) {
        int cap = r->cap_pend ? 2 * r->cap_pend : 8;
        pend_t *n = pds_realloc(r->pend, (size_t)cap * sizeof *n);
        if (!n) return NULL;
        r->pend = n;
        r->cap_pend = cap;
    }
    pend_t *p = &r->pend[r->n_pend];
    memset(p, 0, sizeof *p);
    p->request_id = pds_strdup(request_id);
    if (!p->request_id) return NULL;
    p->index = index;
    r->n_pend++;
    return p;
}

void pds_decode_streams_add(pds_decode_streams_t *st, const char *router_id, const char *request_id,
                            const int32_t *tokens, int n, uint32_t index,
                            const pds_decode_finish_t *fin)
{
    router_t *r = router_find(st, router_id, true);
    pend_t *p = r ? pend_for(r, request_id, index) : NULL;
    if (p && n > 0 && p->n + n > p->cap) {
        int cap = PDS_MAX(p->n + n, p->cap ? 2 * p->cap : 4);
        int32_t *t = pds_realloc(p->tokens, (size_t)cap * sizeof *t);
        if (!t)
            p = NULL;
        else {
            p->tokens = t;
            p->cap = cap;
        }
    }
    if (p && fin && fin->error && !(p->error = pds_strdup(fin->error))) p = NULL;
    if (!p) {
        PDS_LOG_ERROR(MOD, "tokens_dropped router=%s req=%s index=%u n=%d reason=no_memory",
                      router_id, request_id, index, n);
        return;
    }
    if (n > 0) memcpy(p->tokens + p->n, tokens, (size_t)n * sizeof *tokens);
    p->n += n;
    r->pend_units += n > 0 ? n : 1;
    if (fin) {
        p->finished = true;
        p->reason = fin->reason;
        pdserve__v1__seq_timings__init(&p->timings);
        p->timings.queue_ms = fin->queue_ms;
        p->timings.tpot_mean_ms = fin->tpot_mean_ms;
        p->timings.tpot_p90_ms = fin->tpot_p90_ms;
        p->timings.decode_steps = fin->decode_steps;
    }
    if (!r->call && !r->warned_no_stream) {
        PDS_LOG_WARN(MOD, "buffering router=%s reason=no_stream (tokens wait for its TokenStream)",
                     router_id);
        r->warned_no_stream = true;
    }
    if (r->pend_units > st->max_units) {
        PDS_LOG_ERROR(MOD,
                      "tokens_dropped router=%s buffered=%lld limit=%lld reason=no_stream_too_long "
                      "(the router must re-place these requests)",
                      router_id, (long long)r->pend_units, (long long)st->max_units);
        router_clear(r);
    }
}

/* Sends r's pending entries as one TokenBatch; clears them on success. */
static void router_flush(pds_decode_streams_t *st, router_t *r, uint64_t step, float step_ms)
{
    Pdserve__V1__SeqTokens *seqs = pds_calloc((size_t)r->n_pend, sizeof *seqs);
    Pdserve__V1__SeqTokens **ptrs = pds_calloc((size_t)r->n_pend, sizeof *ptrs);
    if (!seqs || !ptrs) {
        pds_free(seqs);
        pds_free(ptrs);
        PDS_LOG_ERROR(MOD, "flush_failed router=%s reason=no_memory (retried next step)",
                      r->router_id);
        return;
    }
    for (int i = 0; i < r->n_pend; i++) {
        pend_t *p = &r->pend[i];
        Pdserve__V1__SeqTokens *s = &seqs[i];
        pdserve__v1__seq_tokens__init(s);
        s->request_id = p->request_id;
        s->n_token_ids = (size_t)p->n;
        s->token_ids = p->tokens;
        s->index = p->index;
        s->finished = p->finished;
        if (p->finished) {
            s->finish_reason = (Pdserve__V1__FinishReason)p->reason;
            if (p->error) s->error = p->error;
            s->timings = &p->timings;
        }
        ptrs[i] = s;
    }
    Pdserve__V1__TokenBatch b = PDSERVE__V1__TOKEN_BATCH__INIT;
    b.decode_node_id = st->node_id;
    b.step = step;
    b.step_ms = step_ms;
    b.n_seqs = (size_t)r->n_pend;
    b.seqs = ptrs;
    pds_status_t s = st->calls.send(r->call, &b.base);
    pds_free(ptrs);
    pds_free(seqs);
    if (s == PDS_OK) {
        router_clear(r);
    } else if (s == PDS_ERR_CANCELLED) {
        PDS_LOG_WARN(MOD,
                     "stream_lost router=%s stream=%llu pending=%lld (kept for its next "
                     "TokenStream)",
                     r->router_id, (unsigned long long)r->stream_id, (long long)r->pend_units);
        st->calls.finish(r->call, PDS_ERR_CANCELLED, "TokenStream gone");
        r->call = NULL;
    } else if (s == PDS_ERR_EXHAUSTED) {
        PDS_LOG_ERROR(
            MOD,
            "stream_backlog router=%s stream=%llu pending=%lld: the router is not reading "
            "its TokenStream; tokens are held and retried every step",
            r->router_id, (unsigned long long)r->stream_id, (long long)r->pend_units);
    } else {
        PDS_LOG_ERROR(MOD, "stream_send_failed router=%s status=%s detail=\"%s\"", r->router_id,
                      pds_status_name(s), pds_err_detail());
    }
}

void pds_decode_streams_flush(pds_decode_streams_t *st, uint64_t step, float step_ms)
{
    for (int i = 0; i < st->n_routers; i++) {
        router_t *r = &st->routers[i];
        if (r->call && r->n_pend > 0) router_flush(st, r, step, step_ms);
    }
}

void pds_decode_streams_finish_all(pds_decode_streams_t *st, pds_status_t s, const char *message)
{
    pds_decode_streams_flush(st, 0, 0.0f);
    for (int i = 0; i < st->n_routers; i++) {
        router_t *r = &st->routers[i];
        if (!r->call) continue;
        st->calls.finish(r->call, s, message);
        r->call = NULL;
    }
}

int pds_decode_streams_open_count(const pds_decode_streams_t *st)
{
    int n = 0;
    for (int i = 0; i < st->n_routers; i++) n += st->routers[i].call != NULL;
    return n;
}

int64_t pds_decode_streams_pending(const pds_decode_streams_t *st)
{
    int64_t n = 0;
    for (int i = 0; i < st->n_routers; i++) n += st->routers[i].pend_units;
    return n;
}

/* requests.c: the life of one request in the router.
 *
 *   Generate (RPC thread) -> validate -> request_t in the map -> JOB_PREFILL on the worker queue
 *   worker: place (P, D) (slo.c; it may say "wait" under the queue policy: the worker asks again)
 *           -> Prefill on P (blocking; P opens the transfer to D) -> first token; or, placed on a
 *           colocated node's local prefill, PrefillLocal on D (answered at admission; every
 *           token, the first included, comes on D's TokenStream)
 *   TokenStream readers: SeqTokens of D -> the request's token buffer
 *   every arrival: flush the tokens that are now contiguous to the client, in output order, then
 *   the Summary when the final token is in.
 *
 * Output tokens are kept (the budget is known), so a request whose decode node dies is re-placed
 * with `generated_ids` = the tokens the client already has; sampling keyed by (seed, position)
 * makes the continuation identical. Tokens from a decode node that is no longer the request's are
 * dropped. A request is freed when its last reference (map, queued jobs) goes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router/router.h"
#include "tok/tok.h"

typedef enum { REQ_PLACING = 0, REQ_PREFILLING, REQ_DECODING, REQ_DONE } req_state_t;

struct request {
    request_t *hnext;
    char id[96];
    router_t *r;
    pthread_mutex_t mu;
    int refs;             /* map + queued jobs; under mu */
    pds_rpc_call_t *call; /* NULL once the client call is finished */
    req_state_t state;
    /* what to compute (immutable after create) */
    int32_t *prompt; /* (n_prompt) */
    int n_prompt;
    float temperature, top_p;
    int top_k;
    uint64_t seed;
    uint32_t max_tokens;
    int32_t *stop; /* (n_stop) */
    int n_stop;
    bool ignore_eos;
    /* output */
    int32_t *out;    /* (max_tokens) token at each output index */
    int64_t *t_sent; /* (max_tokens) when each token was sent to the client */
    uint8_t *have;   /* (max_tokens) */
    int n_sent;      /* tokens [0, n_sent) sent to the client, in order */
    int final_count; /* -1 until the finishing token is known */
    int finish_reason;
    /* placement */
    node_t *p, *d;
    char avoid_p[64], avoid_d[64];
    int replacements;
    bool replace_pending; /* D died while the prefill was running */
    int64_t t_arrival, place_deadline, t_prefill_start;
    float queue_ms, kv_ms;
    uint64_t kv_bytes;
    /* SLO */
    double ttft_target, tpot_target; /* ms, <= 0 = none */
    char slo_class[32];
    router_choice_t place; /* current placement; its charges go back when it ends (slo.c) */
    bool local;            /* prefilled on its decode node (colocated) */
};

typedef enum { JOB_PREFILL, JOB_CANCEL } job_kind_t;
typedef struct {
    job_kind_t kind;
    request_t *req;     /* JOB_PREFILL (holds a reference) */
    node_t *node;       /* JOB_CANCEL */
    const char *method; /* JOB_CANCEL */
    char id[96];        /* JOB_CANCEL */
} job_t;

/* ---- map ----------------------------------------------------------------------------------------
 */
static size_t hash_id(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
    return (size_t)pds_mix64(h);
}

/* Router mu held. */
static request_t *map_find(router_t *r, const char *id)
{
    for (request_t *q = r->buckets[hash_id(id) % r->n_buckets]; q; q = q->hnext)
        if (strcmp(q->id, id) == 0) return q;
    return NULL;
}

/* Router mu held. Grows the table at load 1 (requests live seconds; a few thousand at most). */
static void map_insert(router_t *r, request_t *q)
{
    if (r->n_requests + 1 > r->n_buckets) {
        size_t nb = r->n_buckets * 2;
        request_t **b = pds_calloc(nb, sizeof *b);
        if (b) {
            for (size_t i = 0; i < r->n_buckets; i++) {
                for (request_t *x = r->buckets[i], *n; x; x = n) {
                    n = x->hnext;
                    x->hnext = b[hash_id(x->id) % nb];
                    b[hash_id(x->id) % nb] = x;
                }
            }
            pds_free(r->buckets);
            r->buckets = b;
            r->n_buckets = nb;
        }
    }
    request_t **slot = &r->buckets[hash_id(q->id) % r->n_buckets];
    q->hnext = *slot;
    *slot = q;
    r->n_requests++;
}

/* Router mu held. */
static bool map_remove(router_t *r, request_t *q)
{
    for (request_t **pp = &r->buckets[hash_id(q->id) % r->n_buckets]; *pp; pp = &(*pp)->hnext) {
        if (*pp == q) {
            *pp = q->hnext;
            r->n_requests--;
            return true;
        }
    }
    return false;
}

size_t router_active_requests(router_t *r)
{
    return r->n_requests;
}

/* ---- lifetime
 * ------------------------------------------------------------------------------------ */
static void req_free(request_t *q)
{
    pthread_mutex_destroy(&q->mu);
    pds_free(q->prompt);
    pds_free(q->stop);
    pds_free(q->out);
    pds_free(q->t_sent);
    pds_free(q->have);
    pds_free(q);
}

static void req_unref(request_t *q)
{
    pthread_mutex_lock(&q->mu);
    int left = --q->refs;
    pthread_mutex_unlock(&q->mu);
    if (left == 0) req_free(q);
}

/* Takes q's placement charges off it (q->mu held); the caller gives them back after unlocking. */
static router_choice_t req_take_charges(request_t *q)
{
    router_choice_t c = q->place;
    q->place.prefill_tokens = q->place.ctx_tokens = 0;
    return c;
}

/* Drops the map's reference once the request is DONE. Takes router mu (caller holds no locks). */
static void req_retire(request_t *q)
{
    router_t *r = q->r;
    pthread_mutex_lock(&q->mu);
    router_choice_t c = req_take_charges(q);
    pthread_mutex_unlock(&q->mu);
    router_unplace_decode(r, &c);
    pthread_mutex_lock(&r->mu);
    bool removed = map_remove(r, q);
    pthread_mutex_unlock(&r->mu);
    if (removed) req_unref(q);
}

static pds_status_t queue_job(router_t *r, job_kind_t kind, request_t *q, node_t *node,
                              const char *method, const char *id)
{
    job_t *j = pds_calloc(1, sizeof *j);
    if (!j) return PDS_ERR(PDS_ERR_NO_MEMORY, "job");
    j->kind = kind;
    j->node = node;
    j->method = method;
    if (id) snprintf(j->id, sizeof j->id, "%s", id);
    if (q) {
        pthread_mutex_lock(&q->mu);
        q->refs++;
        pthread_mutex_unlock(&q->mu);
        j->req = q;
    }
    pds_status_t s = pds_queue_push(r->work, j);
    if (s != PDS_OK) {
        if (q) req_unref(q);
        pds_free(j);
    }
    return s;
}

/* ---- client stream
 * --------------------------------------------------------------------------------- */
static float gap_p90(const int64_t *t, int n)
{
    if (n < 2) return 0;
    float *g = pds_malloc(sizeof(float) * (size_t)(n - 1));
    if (!g) return 0;
    for (int i = 1; i < n; i++) g[i - 1] = (float)(t[i] - t[i - 1]) / 1e6f;
    /* insertion sort: n is at most the output length and this runs once per request */
    for (int i = 1; i < n - 1; i++) {
        float v = g[i];
        int j = i - 1;
        while (j >= 0 && g[j] > v) g[j + 1] = g[j], j--;
        g[j + 1] = v;
    }
    int idx = (int)ceil(0.9 * (n - 1)) - 1;
    float v = g[idx < 0 ? 0 : idx];
    pds_free(g);
    return v;
}

/* q->mu held. Ends the client call with a status. Returns true if the caller must retire q. */
static bool req_fail_locked(request_t *q, pds_status_t s, const char *msg)
{
    if (q->state == REQ_DONE) return false;
    q->state = REQ_DONE;
    if (q->call) {
        pds_rpc_call_finish(q->call, s, msg);
        q->call = NULL;
    }
    atomic_fetch_add(&q->r->n_failed, 1);
    PDS_LOG_WARN("router", "request_failed req=%s status=%s detail=\"%s\"", q->id,
                 pds_status_name(s), msg);
    return true;
}

/* q->mu held. Sends every token now contiguous, and the summary when the last one is in.
 * Returns true if the request finished (the caller retires it after unlocking). */
static bool req_flush_locked(request_t *q)
{
    if (q->state == REQ_DONE || !q->call) return false;
    int end = q->n_sent;
    int limit = q->final_count >= 0 ? q->final_count : (int)q->max_tokens;
    while (end < limit && q->have[end]) end++;
    if (end > q->n_sent) {
        char text[1024];
        size_t text_len = 0;
        int n = end - q->n_sent;
        if (pds_tok_decode(q->out + q->n_sent, n, text, sizeof text, &text_len) != PDS_OK)
            text_len = 0;
        Pdserve__V1__TokenChunk chunk = PDSERVE__V1__TOKEN_CHUNK__INIT;
        chunk.ids = q->out + q->n_sent;
        chunk.n_ids = (size_t)n;
        chunk.text.data = (uint8_t *)text;
        chunk.text.len = text_len;
        chunk.index = (uint32_t)q->n_sent;
        Pdserve__V1__GenerateResponse resp = PDSERVE__V1__GENERATE_RESPONSE__INIT;
        resp.kind_case = PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK;
        resp.chunk = &chunk;
        pds_status_t s = pds_rpc_call_send(q->call, &resp.base);
        if (s != PDS_OK) {
            /* the client is gone or reads far too slowly: stop the request everywhere */
            return req_fail_locked(q, s, "client stream failed");
        }
        /* TTFT/TPOT are what the client sees: the time each token left the router */
        int64_t now = pds_time_now_ns();
        for (int k = q->n_sent; k < end; k++) q->t_sent[k] = now;
        q->n_sent = end;
    }
    if (q->final_count < 0 || q->n_sent < q->final_count) return false;

    router_t *r = q->r;
    Pdserve__V1__Summary sum = PDSERVE__V1__SUMMARY__INIT;
    sum.request_id = q->id;
    sum.finish_reason = (Pdserve__V1__FinishReason)q->finish_reason;
    sum.prompt_tokens = (uint32_t)q->n_prompt;
    sum.output_tokens = (uint32_t)q->n_sent;
    sum.ttft_ms = (float)(q->t_sent[0] - q->t_arrival) / 1e6f;
    if (q->n_sent > 1) {
        sum.tpot_mean_ms =
            (float)(q->t_sent[q->n_sent - 1] - q->t_sent[0]) / 1e6f / (float)(q->n_sent - 1);
        sum.tpot_p90_ms = gap_p90(q->t_sent, q->n_sent);
    }
    sum.queue_ms = q->queue_ms;
    sum.kv_transfer_bytes = q->kv_bytes;
    sum.kv_transfer_ms = q->kv_ms;
    sum.prefill_node = q->p ? q->p->id : (char *)"";
    sum.decode_node = q->d ? q->d->id : (char *)"";
    sum.seed = q->seed;
    sum.replacements = (uint32_t)q->replacements;
    Pdserve__V1__GenerateResponse resp = PDSERVE__V1__GENERATE_RESPONSE__INIT;
    resp.kind_case = PDSERVE__V1__GENERATE_RESPONSE__KIND_SUMMARY;
    resp.summary = &sum;
    pds_rpc_call_send(q->call, &resp.base);
    pds_rpc_call_finish(q->call, PDS_OK, NULL);
    q->call = NULL;
    q->state = REQ_DONE;
    atomic_fetch_add(&r->n_ok, 1);
    router_slo_outcome(r, q->id, &q->place, q->ttft_target, q->tpot_target, sum.ttft_ms,
                       sum.tpot_mean_ms, q->n_sent);
    PDS_LOG_DEBUG("router", "request_done req=%s tokens=%d ttft_ms=%.1f tpot_ms=%.2f p=%s d=%s",
                  q->id, q->n_sent, sum.ttft_ms, sum.tpot_mean_ms, sum.prefill_node,
                  sum.decode_node);
    return true;
}

/* q->mu held. Stores tokens [index, index + n); later duplicates are ignored. */
static void req_store_locked(request_t *q, uint32_t index, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t k = index + (uint32_t)i;
        if (k >= q->max_tokens || q->have[k]) continue;
        q->out[k] = ids[i];
        q->have[k] = 1;
    }
}

/* ---- Generate ----------------------------------------------------------------------------------
 */
static pds_status_t req_build(router_t *r, const Pdserve__V1__GenerateRequest *g, request_t *q)
{
    if (!r->have_model) return PDS_ERR(PDS_ERR_UNAVAILABLE, "no nodes have registered yet");
    int ctx = (int)r->max_context;
    if (g->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT) {
        size_t len = strlen(g->text);
        if (len == 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "prompt is empty");
        if (len + 1 > (size_t)ctx)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "prompt of %zu tokens does not fit the context of %d", len + 1, ctx);
        q->prompt = pds_malloc(sizeof(int32_t) * (len + 1));
        if (!q->prompt) return PDS_ERR(PDS_ERR_NO_MEMORY, "prompt");
        PDS_TRY(pds_tok_encode(g->text, len, r->bos, q->prompt, (int)len + 1, &q->n_prompt));
    } else if (g->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS && g->token_ids) {
        size_t n = g->token_ids->n_ids;
        if (n == 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "prompt is empty");
        if (n >= (size_t)ctx)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "prompt of %zu tokens does not fit the context of %d", n, ctx);
        if (pds_tok_validate(g->token_ids->ids, (int)n, (int)r->vocab) != PDS_OK)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "prompt %s", pds_err_detail());
        q->prompt = pds_malloc(sizeof(int32_t) * n);
        if (!q->prompt) return PDS_ERR(PDS_ERR_NO_MEMORY, "prompt");
        memcpy(q->prompt, g->token_ids->ids, sizeof(int32_t) * n);
        q->n_prompt = (int)n;
    } else {
        return PDS_ERR(PDS_ERR_INVALID_ARG, "prompt is empty (set text or token_ids)");
    }
    if (q->n_prompt >= ctx)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "prompt of %d tokens does not fit the context of %d",
                       q->n_prompt, ctx);
    if (g->max_tokens == 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "max_tokens must be at least 1");
    if ((int64_t)q->n_prompt + g->max_tokens > ctx)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "prompt (%d tokens) + max_tokens (%u) exceeds the context of %d tokens",
                       q->n_prompt, g->max_tokens, ctx);
    q->max_tokens = g->max_tokens;

    pds_sample_params_t sp = pds_sample_default_params();
    if (g->sampling) {
        sp.temperature = g->sampling->temperature;
        sp.top_k = g->sampling->top_k;
        sp.top_p = g->sampling->top_p == 0.0f ? 1.0f : g->sampling->top_p;
        if (g->sampling->seed_opt_case == PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED)
            sp.seed = g->sampling->seed;
        else
            sp.seed = pds_mix64((uint64_t)pds_time_wall_ns() ^ ++r->seed_counter);
    }
    PDS_TRY(pds_sample_params_validate(&sp));
    q->temperature = sp.temperature;
    q->top_k = sp.top_k;
    q->top_p = sp.top_p;
    q->seed = sp.seed;
    if (g->n_stop_token_ids > 0) {
        if (pds_tok_validate(g->stop_token_ids, (int)g->n_stop_token_ids, (int)r->vocab) != PDS_OK)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "stop_token_ids: %s", pds_err_detail());
        q->stop = pds_malloc(sizeof(int32_t) * g->n_stop_token_ids);
        if (!q->stop) return PDS_ERR(PDS_ERR_NO_MEMORY, "stop ids");
        memcpy(q->stop, g->stop_token_ids, sizeof(int32_t) * g->n_stop_token_ids);
        q->n_stop = (int)g->n_stop_token_ids;
    }
    q->ignore_eos = g->ignore_eos;
    router_slo_targets(r, g->slo, &q->ttft_target, &q->tpot_target, q->slo_class,
                       sizeof q->slo_class);
    q->out = pds_calloc(q->max_tokens, sizeof *q->out);
    q->t_sent = pds_calloc(q->max_tokens, sizeof *q->t_sent);
    q->have = pds_calloc(q->max_tokens, 1);
    if (!q->out || !q->t_sent || !q->have) return PDS_ERR(PDS_ERR_NO_MEMORY, "output buffers");
    return PDS_OK;
}

void router_generate(router_t *r, pds_rpc_call_t *call, const Pdserve__V1__GenerateRequest *g)
{
    request_t *q = pds_calloc(1, sizeof *q);
    if (!q) {
        pds_rpc_call_finish(call, PDS_ERR_NO_MEMORY, "router out of memory");
        return;
    }
    pthread_mutex_init(&q->mu, NULL);
    q->r = r;
    q->final_count = -1;
    q->t_arrival = pds_time_now_ns();
    q->place_deadline = q->t_arrival + r->cfg.place_timeout_ns;
    pthread_mutex_lock(&r->mu);
    pds_err_clear();
    pds_status_t s = req_build(r, g, q);
    if (s == PDS_OK) {
        if (g->request_id[0]) {
            snprintf(q->id, sizeof q->id, "%s", g->request_id);
            if (strlen(g->request_id) >= sizeof q->id)
                s = PDS_ERR(PDS_ERR_INVALID_ARG, "request_id longer than %zu bytes",
                            sizeof q->id - 1);
            else if (map_find(r, q->id))
                s = PDS_ERR(PDS_ERR_ALREADY_EXISTS, "request_id '%s' is already active", q->id);
        } else {
            snprintf(q->id, sizeof q->id, "%s-%llu", r->cfg.id, (unsigned long long)++r->next_req);
        }
    }
    if (s == PDS_OK) {
        q->call = call;
        q->refs = 1; /* the map's */
        map_insert(r, q);
    }
    pthread_mutex_unlock(&r->mu);
    if (s != PDS_OK) {
        pds_rpc_call_finish(call, s, pds_err_detail()[0] ? pds_err_detail() : pds_status_text(s));
        req_free(q);
        return;
    }
    pds_rpc_call_set_data(call, q);
    PDS_LOG_DEBUG("router", "request_in req=%s prompt=%d max_tokens=%u", q->id, q->n_prompt,
                  q->max_tokens);
    if (queue_job(r, JOB_PREFILL, q, NULL, NULL, NULL) != PDS_OK) {
        pthread_mutex_lock(&q->mu);
        bool retire = req_fail_locked(q, PDS_ERR_UNAVAILABLE, "router is shutting down");
        pthread_mutex_unlock(&q->mu);
        if (retire) req_retire(q);
    }
}

/* The client went away (cancel, deadline, disconnect): stop the request on both nodes. */
void router_generate_cancelled(router_t *r, pds_rpc_call_t *call)
{
    request_t *q = pds_rpc_call_data(call);
    if (!q) {
        pds_rpc_call_finish(call, PDS_ERR_CANCELLED, "cancelled");
        return;
    }
    pthread_mutex_lock(&q->mu);
    node_t *p = q->local ? NULL : q->p, *d = q->d; /* a local prefill has no prefill node */
    bool live = q->state != REQ_DONE;
    q->state = REQ_DONE;
    if (q->call) {
        pds_rpc_call_finish(q->call, PDS_ERR_CANCELLED, "cancelled by the client");
        q->call = NULL;
    }
    pthread_mutex_unlock(&q->mu);
    if (!live) return;
    atomic_fetch_add(&r->n_cancelled, 1);
    PDS_LOG_INFO("router", "request_cancelled req=%s", q->id);
    if (d) queue_job(r, JOB_CANCEL, NULL, d, "/pdserve.v1.DecodeNode/Cancel", q->id);
    if (p) queue_job(r, JOB_CANCEL, NULL, p, "/pdserve.v1.PrefillNode/Cancel", q->id);
    req_retire(q);
}

/* ---- tokens from decode nodes
 * -------------------------------------------------------------------- */
int64_t router_on_seq_tokens(router_t *r, const char *decode_id, const Pdserve__V1__SeqTokens *st)
{
    pthread_mutex_lock(&r->mu);
    request_t *q = map_find(r, st->request_id);
    if (q) {
        pthread_mutex_lock(&q->mu);
        q->refs++;
        pthread_mutex_unlock(&q->mu);
    }
    pthread_mutex_unlock(&r->mu);
    if (!q) return 0; /* finished or cancelled meanwhile */

    bool retire = false, replace = false;
    int64_t ctx = 0;
    router_choice_t first = {0}; /* a local prefill's charge, over with its first token */
    pthread_mutex_lock(&q->mu);
    if (q->state == REQ_DONE || !q->d || strcmp(q->d->id, decode_id) != 0) {
        /* stale: from a node this request has left */
    } else if (st->finished &&
               st->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_REASON_ABORTED) {
        PDS_LOG_WARN("router", "decode_aborted req=%s node=%s error=\"%s\"", q->id, decode_id,
                     st->error);
        req_store_locked(q, st->index, st->token_ids, st->n_token_ids);
        retire = req_flush_locked(q);
        if (!retire && q->state != REQ_DONE) {
            q->state = REQ_PLACING;
            snprintf(q->avoid_d, sizeof q->avoid_d, "%s", decode_id);
            replace = true;
        }
    } else {
        req_store_locked(q, st->index, st->token_ids, st->n_token_ids);
        if (st->finished) {
            q->final_count = (int)(st->index + st->n_token_ids);
            q->finish_reason = st->finish_reason;
        }
        if (q->local && q->place.prefill_tokens > 0) {
            first.p = q->place.p;
            first.prefill_tokens = q->place.prefill_tokens;
            q->place.prefill_tokens = 0;
        }
        ctx = (int64_t)q->n_prompt + st->index + (int64_t)st->n_token_ids;
        retire = req_flush_locked(q);
    }
    pthread_mutex_unlock(&q->mu);
    router_unplace_prefill(r, &first);
    if (replace) {
        q->replacements++;
        atomic_fetch_add(&r->n_replaced, 1);
        queue_job(r, JOB_PREFILL, q, NULL, NULL, NULL);
    }
    if (retire) req_retire(q);
    req_unref(q);
    return ctx;
}

void router_on_decode_down(router_t *r, node_t *d)
{
    /* Collect under the router lock, act outside it. */
    size_t cap = 0, n = 0;
    request_t **list = NULL;
    pthread_mutex_lock(&r->mu);
    cap = r->n_requests;
    list = cap ? pds_malloc(sizeof *list * cap) : NULL;
    for (size_t b = 0; list && b < r->n_buckets; b++) {
        for (request_t *q = r->buckets[b]; q; q = q->hnext) {
            pthread_mutex_lock(&q->mu);
            if (q->d == d && q->state != REQ_DONE && n < cap) {
                q->refs++;
                list[n++] = q;
            }
            pthread_mutex_unlock(&q->mu);
        }
    }
    pthread_mutex_unlock(&r->mu);
    for (size_t i = 0; i < n; i++) {
        request_t *q = list[i];
        bool replace = false;
        pthread_mutex_lock(&q->mu);
        if (q->state == REQ_DECODING) {
            q->state = REQ_PLACING;
            snprintf(q->avoid_d, sizeof q->avoid_d, "%s", d->id);
            replace = true;
        } else if (q->state == REQ_PREFILLING) {
            q->replace_pending = true; /* the worker re-places once its Prefill returns */
        }
        pthread_mutex_unlock(&q->mu);
        if (replace) {
            q->replacements++;
            atomic_fetch_add(&r->n_replaced, 1);
            PDS_LOG_WARN("router", "replacing req=%s from=%s sent=%d", q->id, d->id, q->n_sent);
            queue_job(r, JOB_PREFILL, q, NULL, NULL, NULL);
        }
        req_unref(q);
    }
    pds_free(list);
}

/* ---- worker: placement and the Prefill call
 * --------------------------------------------------------- */
static bool retriable(pds_status_t s)
{
    return s == PDS_ERR_EXHAUSTED || s == PDS_ERR_UNAVAILABLE || s == PDS_ERR_TIMEOUT ||
           s == PDS_ERR_CORRUPT || s == PDS_ERR_CANCELLED || s == PDS_ERR_NOT_FOUND ||
           s == PDS_ERR_INTERNAL || s == PDS_ERR_TRANSPORT;
}

/* Fails q with s (placement gave up); the caller returns. */
static void req_fail_placement(request_t *q, pds_status_t s, const char *msg)
{
    pthread_mutex_lock(&q->mu);
    bool retire = req_fail_locked(q, s, msg);
    pthread_mutex_unlock(&q->mu);
    if (retire) req_retire(q);
}

static void run_prefill(router_t *r, request_t *q)
{
    bool waiting = false, ever_waited = false; /* counted in r->n_waiting while waiting */
    for (int attempt = 0;; attempt++) {
        pthread_mutex_lock(&q->mu);
        if (q->state == REQ_DONE) {
            pthread_mutex_unlock(&q->mu);
            break;
        }
        int g = q->n_sent; /* re-placement resumes after what the client already has */
        char avoid_p[64], avoid_d[64];
        snprintf(avoid_p, sizeof avoid_p, "%s", q->avoid_p);
        snprintf(avoid_d, sizeof avoid_d, "%s", q->avoid_d);
        router_choice_t old = req_take_charges(q); /* a re-placement leaves its old nodes */
        pthread_mutex_unlock(&q->mu);
        router_unplace_decode(r, &old);

        int64_t now = pds_time_now_ns();
        router_place_in_t in = {
            .n_tokens = q->n_prompt + g,
            .outputs = (int64_t)q->max_tokens - g,
            /* once a token went out, TTFT is history: only TPOT matters for the new pair */
            .ttft_ms = g > 0 ? 0 : q->ttft_target,
            .tpot_ms = q->tpot_target,
            .waited_ms = g > 0 ? 0 : (double)(now - q->t_arrival) / 1e6,
            .avoid_p = avoid_p[0] ? avoid_p : NULL,
            .avoid_d = avoid_d[0] ? avoid_d : NULL,
            .request_id = q->id,
            .first_try = !ever_waited,
        };
        router_choice_t ch;
        pds_status_t s = router_place_request(r, &in, &ch);
        if (s == PDS_AGAIN || s == PDS_ERR_UNAVAILABLE) {
            /* queue policy (nothing meets yet) or no node up: ask again until place_timeout */
            if (!waiting) atomic_fetch_add(&r->n_waiting, 1);
            waiting = ever_waited = true;
            if (now < q->place_deadline && !atomic_load(&r->stopping)) {
                pds_time_sleep_ms(s == PDS_AGAIN ? 10 : 50);
                continue;
            }
            if (s == PDS_AGAIN)
                s = PDS_ERR(PDS_ERR_EXHAUSTED,
                            "no node pair was predicted to meet the SLO within place_timeout");
            req_fail_placement(q, s, pds_err_detail());
            break;
        }
        if (waiting) atomic_fetch_sub(&r->n_waiting, 1);
        waiting = false;
        if (s != PDS_OK) { /* reject policy, queue deadline, no memory */
            req_fail_placement(q, s, pds_err_detail());
            break;
        }
        node_t *p = ch.p, *d = ch.d;

        Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
        sp.temperature = q->temperature;
        sp.top_k = q->top_k;
        sp.top_p = q->top_p;
        sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        sp.seed = q->seed;
        Pdserve__V1__Slo slo = PDSERVE__V1__SLO__INIT;
        slo.ttft_ms = (float)q->ttft_target;
        slo.tpot_ms = (float)q->tpot_target;
        slo.class_name = q->slo_class;
        Pdserve__V1__PrefillRequest pr = PDSERVE__V1__PREFILL_REQUEST__INIT;
        pr.request_id = q->id;
        pr.prompt_ids = q->prompt;
        pr.n_prompt_ids = (size_t)q->n_prompt;
        pr.generated_ids = q->out;
        pr.n_generated_ids = (size_t)g;
        pr.sampling = &sp;
        pr.max_tokens = q->max_tokens;
        pr.stop_token_ids = q->stop;
        pr.n_stop_token_ids = (size_t)q->n_stop;
        pr.ignore_eos = q->ignore_eos;
        pr.router_id = r->cfg.id;
        pr.decode_node_id = d->id;
        pr.decode_address = d->address;
        pr.slo = &slo;
        pthread_mutex_lock(&r->mu);
        ProtobufCBinaryData kvx_addr = d->info->kvx_address; /* info replaced only on re-register */
        pthread_mutex_unlock(&r->mu);
        pr.decode_kvx_address = kvx_addr;

        pthread_mutex_lock(&q->mu);
        if (q->state == REQ_DONE) {
            pthread_mutex_unlock(&q->mu);
            router_unplace_decode(r, &ch);
            break;
        }
        q->state = REQ_PREFILLING;
        q->p = p;
        q->d = d;
        q->local = ch.local;
        q->place = ch;
        q->replace_pending = false;
        if (!q->t_prefill_start) q->t_prefill_start = pds_time_now_ns();
        pthread_mutex_unlock(&q->mu);

        ProtobufCMessage *reply = NULL;
        s = pds_rpc_channel_call(ch.local ? d->ch : p->ch,
                                 ch.local ? "/pdserve.v1.DecodeNode/PrefillLocal"
                                          : "/pdserve.v1.PrefillNode/Prefill",
                                 &pr.base, &pdserve__v1__prefill_reply__descriptor,
                                 (int)(r->cfg.prefill_timeout_ns / 1000000), &reply);
        char detail[512];
        snprintf(detail, sizeof detail, "%s", pds_err_detail());

        bool retire = false, again = false;
        router_choice_t done = {0}; /* the prefill charge, over with the reply */
        pthread_mutex_lock(&q->mu);
        if (q->state == REQ_DONE) {
            /* cancelled meanwhile: the cancel jobs already went to p and d */
        } else if (s == PDS_OK && ch.local) {
            /* admitted: the tokens, the first included, come on d's TokenStream */
            Pdserve__V1__PrefillReply *pre = (Pdserve__V1__PrefillReply *)reply;
            q->queue_ms = (float)(q->t_prefill_start - q->t_arrival) / 1e6f + pre->queue_ms;
            if (q->replace_pending) {
                q->state = REQ_PLACING;
                snprintf(q->avoid_d, sizeof q->avoid_d, "%s", d->id);
                again = true;
            } else if (q->final_count < 0) {
                q->state = REQ_DECODING;
            }
        } else if (s == PDS_OK) {
            Pdserve__V1__PrefillReply *pre = (Pdserve__V1__PrefillReply *)reply;
            int32_t first = pre->first_token;
            req_store_locked(q, (uint32_t)g, &first, 1);
            q->queue_ms = (float)(q->t_prefill_start - q->t_arrival) / 1e6f + pre->queue_ms;
            q->kv_bytes += pre->kv_transfer_bytes;
            q->kv_ms += pre->kv_transfer_ms;
            done.p = q->place.p;
            done.prefill_tokens = q->place.prefill_tokens;
            q->place.prefill_tokens = 0;
            if (pre->finished) {
                q->final_count = g + 1;
                q->finish_reason = pre->finish_reason;
            } else {
                q->state = REQ_DECODING;
            }
            if (q->replace_pending && !pre->finished) {
                q->state = REQ_PLACING;
                snprintf(q->avoid_d, sizeof q->avoid_d, "%s", d->id);
                again = true;
            }
            retire = req_flush_locked(q);
        } else if (retriable(s) && pds_time_now_ns() < q->place_deadline &&
                   !atomic_load(&r->stopping)) {
            PDS_LOG_INFO("router",
                         "prefill_retry req=%s p=%s d=%s local=%d status=%s detail=\"%s\"", q->id,
                         p->id, d->id, ch.local, pds_status_name(s), detail);
            q->state = REQ_PLACING;
            snprintf(q->avoid_p, sizeof q->avoid_p, "%s", ch.local ? "" : p->id);
            snprintf(q->avoid_d, sizeof q->avoid_d, "%s", d->id);
            again = true;
        } else {
            retire = req_fail_locked(q, s, detail);
        }
        pthread_mutex_unlock(&q->mu);
        if (s == PDS_OK && !ch.local) {
            const Pdserve__V1__PrefillReply *pre = (const Pdserve__V1__PrefillReply *)reply;
            if (pre->computed_tokens > 0 && pre->prefill_ms > 0)
                router_observe_prefill(r, p, pre->computed_tokens, pre->prefill_ms);
        }
        router_unplace_prefill(r, &done);
        pds_rpc_msg_free(reply);
        if (retire) req_retire(q);
        if (!again) break;
        if (s != PDS_OK) pds_time_sleep_ms(PDS_MIN(10.0 * (attempt + 1), 200.0));
    }
    if (waiting) atomic_fetch_sub(&r->n_waiting, 1);
}

void *router_worker_main(void *arg)
{
    router_t *r = arg;
    void *item;
    while (pds_queue_pop(r->work, -1, &item) == PDS_OK) {
        job_t *j = item;
        if (j->kind == JOB_PREFILL) {
            run_prefill(r, j->req);
            req_unref(j->req);
        } else {
            Pdserve__V1__CancelRequest c = PDSERVE__V1__CANCEL_REQUEST__INIT;
            c.request_id = j->id;
            c.reason = (char *)"client cancelled";
            ProtobufCMessage *reply = NULL;
            if (pds_rpc_channel_call(j->node->ch, j->method, &c.base,
                                     &pdserve__v1__cancel_reply__descriptor, 2000,
                                     &reply) == PDS_OK)
                pds_rpc_msg_free(reply);
        }
        pds_free(j);
    }
    return NULL;
}

void router_requests_destroy(router_t *r)
{
    for (size_t b = 0; b < r->n_buckets; b++) {
        for (request_t *q = r->buckets[b], *n; q; q = n) {
            n = q->hnext;
            pthread_mutex_lock(&q->mu);
            if (q->call) {
                pds_rpc_call_finish(q->call, PDS_ERR_UNAVAILABLE, "router shutting down");
                q->call = NULL;
            }
            pthread_mutex_unlock(&q->mu);
            req_free(q);
        }
    }
    pds_free(r->buckets);
    r->buckets = NULL;
}

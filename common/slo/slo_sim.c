/* slo_sim.c: a discrete-event simulator of a pdserve cluster — prefill nodes, KV transfers, decode
 * nodes with continuous batching, or colocated nodes — driven by the latency model and placing
 * every request with pds_slo_place, the function the router calls.
 *
 * Events live in a binary heap ordered by (time, insertion number), so equal times resolve in the
 * order they were scheduled and a run is a pure function of its inputs. Requests move through
 * intrusive index lists (one `next` per request: it is only ever in one FIFO at a time). The
 * trade-offs are the ones a planner can afford: KV for prompt + output is reserved at placement
 * (no preemption, no swap), links never contend, and a batch of prompts costs a + b*T + c*T^2 of
 * its total T. Requests the router holds back (QUEUE) are retried on every event that frees
 * capacity, looking at most RETRY_SCAN of them per event. The model's in-cluster terms enter here:
 * the control overhead delays each first token (and, disaggregated, the decode join), every token
 * gap carries the step overhead, and a step of one phase started while the other phase computes
 * (any prefill node busy / any decode node with a batch) is stretched by that phase's contention.
 * As in pdserve-decode, a decode node takes OpenTransfer and CommitTransfer between steps (its
 * engine loop owns the KV pool): a request placed while its decode node runs a step reaches the
 * prefill queue when that step ends, and its first token leaves when the step running at its
 * commit ends — up to two decode steps of TTFT that grow with the decode batch.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slo/slo.h"

#define RETRY_SCAN 64

enum { EV_ARRIVAL, EV_PREFILL_DONE, EV_JOIN, EV_ITER_DONE, EV_DEADLINE };
enum { RS_NEW, RS_WAITING, RS_PREFILL_Q, RS_PREFILLING, RS_TRANSFER, RS_DECODE, RS_DONE, RS_REJ };

typedef struct {
    double t;
    uint64_t seq;
    int type, arg;
} ev_t;

typedef struct {
    int32_t prompt, output;
    double arrival, t_first, t_last;
    int generated; /* output tokens produced (the first one included) */
    int prefilled; /* colocated chunked: prompt tokens done */
    int chunk_now; /* colocated chunked: tokens in the iteration in flight */
    int p, d, next, state;
    int64_t blocks;
} sreq_t;

typedef struct {
    int head, tail; /* FIFO of requests, -1 = empty */
} fifo_t;

typedef struct {
    fifo_t q; /* placed, not started */
    double queued_tokens;
    bool busy;
    double busy_until;
    fifo_t batch; /* in flight */
    double batch_ms;
} pnode_t;

typedef struct {
    int *run, n_run; /* (max requests) running sequences */
    fifo_t pending;  /* transferred, joining at the next step */
    fifo_t opening;  /* placed while a step ran: their OpenTransfer waits for its end */
    double run_ctx;  /* sum of running sequences' context */
    bool busy;
    double busy_until;
    int assigned; /* placed here and not finished (the placement's batch) */
    double ctx;   /* their context (prompt + generated) */
    int64_t used_blocks;
    /* colocated */
    fifo_t q; /* waiting for prefill */
    double queued_tokens;
    fifo_t batch;     /* prefill-first batch in flight */
    int iter_prefill; /* 1: the iteration in flight is a prefill batch / has chunks */
    int chunk_reqs;   /* chunked: FIFO prefix touched by the iteration in flight */
} dnode_t;

typedef struct {
    const pds_slo_sim_config_t *c;
    pds_slo_place_params_t place;
    sreq_t *r;
    int n;
    ev_t *heap;
    int n_ev, cap_ev;
    uint64_t seq;
    double now;
    pnode_t *P;
    dnode_t *D;
    int nP, nD;
    fifo_t wait;
    int n_waiting;
    pds_slo_prefill_load_t *pl;
    pds_slo_decode_load_t *dl;
    bool coloc;
} sim_t;

/* ---- small pieces -------------------------------------------------------------------------------
 */
static void fifo_push(sim_t *s, fifo_t *f, int i)
{
    s->r[i].next = -1;
    if (f->tail < 0)
        f->head = f->tail = i;
    else
        s->r[f->tail].next = i, f->tail = i;
}

static int fifo_pop(sim_t *s, fifo_t *f)
{
    int i = f->head;
    if (i >= 0) {
        f->head = s->r[i].next;
        if (f->head < 0) f->tail = -1;
    }
    return i;
}

static bool ev_less(const ev_t *a, const ev_t *b)
{
    return a->t < b->t || (a->t == b->t && a->seq < b->seq);
}

static pds_status_t ev_push(sim_t *s, double t, int type, int arg)
{
    if (s->n_ev == s->cap_ev) {
        int nc = s->cap_ev ? 2 * s->cap_ev : 1024;
        ev_t *nh = pds_realloc(s->heap, sizeof *nh * (size_t)nc);
        if (!nh) return PDS_ERR(PDS_ERR_NO_MEMORY, "simulator: %d events", nc);
        s->heap = nh, s->cap_ev = nc;
    }
    ev_t e = {t, s->seq++, type, arg};
    int i = s->n_ev++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!ev_less(&e, &s->heap[p])) break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = e;
    return PDS_OK;
}

static ev_t ev_pop(sim_t *s)
{
    ev_t top = s->heap[0], last = s->heap[--s->n_ev];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= s->n_ev) break;
        if (c + 1 < s->n_ev && ev_less(&s->heap[c + 1], &s->heap[c])) c++;
        if (!ev_less(&s->heap[c], &last)) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (s->n_ev > 0) s->heap[i] = last;
    return top;
}

/* ---- request life -------------------------------------------------------------------------------
 */
static void finish(sim_t *s, int i)
{
    sreq_t *q = &s->r[i];
    dnode_t *d = &s->D[q->d];
    q->state = RS_DONE;
    d->assigned--;
    d->ctx -= q->prompt + q->generated;
    d->used_blocks -= q->blocks;
}

/* The first token exists at time t: a one-token request is done, others start decoding. */
static pds_status_t first_token(sim_t *s, int i, double t, bool join_now)
{
    sreq_t *q = &s->r[i];
    q->t_first = q->t_last = t;
    q->generated = 1;
    s->D[q->d].ctx += 1;
    if (q->output <= 1) {
        finish(s, i);
        return PDS_OK;
    }
    if (join_now) {
        dnode_t *d = &s->D[q->d];
        q->state = RS_DECODE;
        d->run[d->n_run++] = i;
        d->run_ctx += q->prompt + q->generated;
        return PDS_OK;
    }
    q->state = RS_TRANSFER;
    return ev_push(s, t, EV_JOIN, i);
}

static pds_status_t prefill_start(sim_t *s, int p);
static pds_status_t iter_start(sim_t *s, int d);

/* The request's transfer is open at its decode node: into its prefill node's queue. */
static pds_status_t prefill_enqueue(sim_t *s, int i)
{
    sreq_t *q = &s->r[i];
    pnode_t *pn = &s->P[q->p];
    fifo_push(s, &pn->q, i);
    pn->queued_tokens += q->prompt;
    if (!pn->busy) return prefill_start(s, q->p);
    return PDS_OK;
}

/* One placement attempt; the request ends placed, waiting or rejected. */
static pds_status_t try_place(sim_t *s, int i, bool expire, bool *placed)
{
    const pds_slo_sim_config_t *c = s->c;
    sreq_t *q = &s->r[i];
    *placed = false;
    for (int p = 0; p < s->nP; p++) {
        double queued = s->coloc ? s->D[p].queued_tokens : s->P[p].queued_tokens;
        bool busy = s->coloc ? s->D[p].busy : s->P[p].busy;
        double until = s->coloc ? s->D[p].busy_until : s->P[p].busy_until;
        s->pl[p] = (pds_slo_prefill_load_t){.model = &c->prefill_model,
                                            .queued_tokens = queued,
                                            .busy_ms = busy ? until - s->now : 0,
                                            .max_batch_tokens = c->mode == PDS_SLO_SIM_COLOC_CHUNKED
                                                                    ? c->chunk_tokens
                                                                    : c->prefill_max_batch_tokens};
    }
    for (int d = 0; d < s->nD; d++) {
        dnode_t *dn = &s->D[d];
        s->dl[d] = (pds_slo_decode_load_t){
            .model = &c->decode_model,
            .batch = dn->assigned,
            .context_tokens = dn->ctx,
            .free_blocks = c->decode_kv_blocks > 0 ? c->decode_kv_blocks - dn->used_blocks : 0,
            .block_size = c->decode_kv_blocks > 0 ? c->block_size : 0,
            .max_batch_seqs = c->decode_max_batch_seqs};
    }
    pds_slo_request_t req = {.prompt_tokens = q->prompt,
                             .output_tokens = q->output,
                             .ttft_ms = c->ttft_ms,
                             .tpot_ms = c->tpot_ms,
                             .waited_ms = s->now - q->arrival};
    /* the deadline event fires at arrival + deadline; rounding must not make that look early */
    if (expire && req.waited_ms < s->place.queue_deadline_ms)
        req.waited_ms = s->place.queue_deadline_ms;
    pds_slo_decision_t dec;
    pds_status_t st = pds_slo_place(&s->place, &req, s->pl, s->nP, s->dl, s->nD, &dec);
    if (st == PDS_AGAIN) return PDS_OK;
    if (st != PDS_OK) {
        if (st != PDS_ERR_EXHAUSTED) return st;
        pds_err_clear();
        q->state = RS_REJ;
        *placed = true; /* out of the wait list */
        return PDS_OK;
    }
    *placed = true;
    q->p = dec.prefill, q->d = dec.decode;
    dnode_t *dn = &s->D[q->d];
    q->blocks = c->block_size > 0 ? PDS_DIV_UP((int64_t)q->prompt + q->output, c->block_size) : 0;
    dn->used_blocks += q->blocks;
    dn->assigned++;
    dn->ctx += q->prompt;
    q->state = RS_PREFILL_Q;
    if (s->coloc) {
        fifo_push(s, &dn->q, i);
        dn->queued_tokens += q->prompt;
        if (!dn->busy) return iter_start(s, q->d);
        return PDS_OK;
    }
    if (dn->busy) { /* the decode node takes OpenTransfer between steps */
        fifo_push(s, &dn->opening, i);
        return PDS_OK;
    }
    return prefill_enqueue(s, i);
}

static pds_status_t place_new(sim_t *s, int i)
{
    const pds_slo_sim_config_t *c = s->c;
    sreq_t *q = &s->r[i];
    if (c->decode_kv_blocks > 0 &&
        PDS_DIV_UP((int64_t)q->prompt + q->output, c->block_size) > c->decode_kv_blocks) {
        q->state = RS_REJ; /* can never fit */
        return PDS_OK;
    }
    bool placed;
    PDS_TRY(try_place(s, i, false, &placed));
    if (placed) return PDS_OK;
    q->state = RS_WAITING;
    fifo_push(s, &s->wait, i);
    s->n_waiting++;
    if (s->place.policy == PDS_SLO_POLICY_QUEUE && s->place.queue_deadline_ms >= 0)
        return ev_push(s, q->arrival + s->place.queue_deadline_ms, EV_DEADLINE, i);
    return PDS_OK;
}

/* Capacity changed: give waiting requests (oldest first) another chance. */
static pds_status_t retry_waiting(sim_t *s)
{
    int prev = -1, i = s->wait.head, scanned = 0;
    while (i >= 0 && scanned++ < RETRY_SCAN) {
        int nx = s->r[i].next;
        bool placed;
        PDS_TRY(try_place(s, i, false, &placed));
        if (placed) {
            /* unlink i (try_place may have pushed it onto a node FIFO, rewriting next) */
            if (prev < 0)
                s->wait.head = nx;
            else
                s->r[prev].next = nx;
            if (s->wait.tail == i) s->wait.tail = prev;
            s->n_waiting--;
        } else {
            prev = i;
        }
        i = nx;
    }
    return PDS_OK;
}

static pds_status_t unwait_one(sim_t *s, int i)
{
    if (s->r[i].state != RS_WAITING) return PDS_OK;
    int prev = -1;
    for (int j = s->wait.head; j >= 0 && j != i; j = s->r[j].next) prev = j;
    int nx = s->r[i].next;
    bool placed;
    PDS_TRY(try_place(s, i, true, &placed));
    if (!placed) { /* BEST_EFFORT still without room: it keeps waiting */
        s->r[i].state = RS_WAITING;
        return PDS_OK;
    }
    if (prev < 0)
        s->wait.head = nx;
    else
        s->r[prev].next = nx;
    if (s->wait.tail == i) s->wait.tail = prev;
    s->n_waiting--;
    return PDS_OK;
}

/* ---- disaggregated prefill nodes ----------------------------------------------------------------
 */
static pds_status_t prefill_start(sim_t *s, int p)
{
    pnode_t *pn = &s->P[p];
    if (pn->busy || pn->q.head < 0) return PDS_OK;
    int budget = s->c->prefill_max_batch_tokens;
    double tokens = 0, tokens_sq = 0;
    pn->batch.head = pn->batch.tail = -1;
    while (pn->q.head >= 0) {
        int i = pn->q.head;
        if (pn->batch.head >= 0 && budget > 0 && tokens + s->r[i].prompt > budget) break;
        fifo_pop(s, &pn->q);
        fifo_push(s, &pn->batch, i);
        s->r[i].state = RS_PREFILLING;
        tokens += s->r[i].prompt;
        tokens_sq += (double)s->r[i].prompt * s->r[i].prompt;
    }
    pn->queued_tokens -= tokens;
    pn->batch_ms = pds_slo_prefill_batch_ms(&s->c->prefill_model, tokens, tokens_sq);
    /* decode nodes running a batch share the host's cores (prefill_contention) */
    bool decode_busy = false;
    for (int d = 0; d < s->nD && !decode_busy; d++) decode_busy = s->D[d].n_run > 0;
    if (decode_busy && s->c->prefill_model.prefill_contention > 0)
        pn->batch_ms *= 1 + s->c->prefill_model.prefill_contention;
    pn->busy = true;
    pn->busy_until = s->now + pn->batch_ms;
    return ev_push(s, pn->busy_until, EV_PREFILL_DONE, p);
}

static pds_status_t prefill_done(sim_t *s, int p)
{
    pnode_t *pn = &s->P[p];
    pn->busy = false;
    for (int i = fifo_pop(s, &pn->batch); i >= 0; i = fifo_pop(s, &pn->batch)) {
        const pds_slo_model_t *m = &s->c->prefill_model;
        double exposed = pds_slo_transfer_exposed_ms(m, s->r[i].prompt, pn->batch_ms);
        /* the control path (commit, CommitTransfer, the token's way back) delays both the first
         * token and the request's join to its decode batch */
        double over = m->ttft_overhead_ms > 0 ? m->ttft_overhead_ms : 0;
        PDS_TRY(first_token(s, i, s->now + exposed + over, false));
    }
    PDS_TRY(prefill_start(s, p));
    return retry_waiting(s);
}

/* ---- decode and colocated nodes: one iteration at a time ----------------------------------------
 */
static pds_status_t iter_start(sim_t *s, int d)
{
    const pds_slo_sim_config_t *c = s->c;
    dnode_t *dn = &s->D[d];
    if (dn->busy) return PDS_OK;
    int max_seqs = c->decode_max_batch_seqs > 0 ? c->decode_max_batch_seqs : 1 << 30;
    while (dn->pending.head >= 0 && dn->n_run < max_seqs) {
        int i = fifo_pop(s, &dn->pending);
        /* the commit was taken between steps: the first token goes back from here */
        s->r[i].t_first = s->r[i].t_last = s->now;
        s->r[i].state = RS_DECODE;
        dn->run[dn->n_run++] = i;
        dn->run_ctx += s->r[i].prompt + s->r[i].generated;
    }
    double ms = 0;
    dn->iter_prefill = 0;
    if (c->mode == PDS_SLO_SIM_COLOC_PREFILL_FIRST && dn->q.head >= 0 && dn->n_run < max_seqs) {
        /* vLLM-style: a waiting prompt batch goes before the next decode step */
        int budget = c->prefill_max_batch_tokens, taken = 0;
        double tokens = 0, tokens_sq = 0;
        dn->batch.head = dn->batch.tail = -1;
        while (dn->q.head >= 0 && dn->n_run + taken < max_seqs) {
            int i = dn->q.head;
            if (taken > 0 && budget > 0 && tokens + s->r[i].prompt > budget) break;
            fifo_pop(s, &dn->q);
            fifo_push(s, &dn->batch, i);
            s->r[i].state = RS_PREFILLING;
            tokens += s->r[i].prompt;
            tokens_sq += (double)s->r[i].prompt * s->r[i].prompt;
            taken++;
        }
        dn->queued_tokens -= tokens;
        dn->iter_prefill = 1;
        ms = pds_slo_prefill_batch_ms(&c->prefill_model, tokens, tokens_sq);
    } else if (c->mode == PDS_SLO_SIM_COLOC_CHUNKED && dn->q.head >= 0) {
        /* Sarathi-style: decodes first, prompt chunks fill the rest of the token budget */
        const pds_slo_model_t *m = &c->prefill_model;
        int room = c->chunk_tokens - dn->n_run, touched = 0;
        double extra = 0;
        for (int i = dn->q.head; i >= 0 && room > 0 && dn->n_run + touched < max_seqs;
             i = s->r[i].next) {
            sreq_t *q = &s->r[i];
            int t = q->prompt - q->prefilled;
            if (t > room) t = room;
            double p0 = q->prefilled, p1 = p0 + t;
            extra += m->prefill_b * t + m->prefill_c * (p1 * p1 - p0 * p0);
            q->chunk_now = t;
            q->state = RS_PREFILLING;
            room -= t;
            touched++;
        }
        dn->chunk_reqs = touched;
        dn->iter_prefill = touched > 0;
        ms = pds_slo_decode_gap_ms(&c->decode_model, dn->n_run, dn->run_ctx, 0) +
             (dn->n_run == 0 ? m->prefill_a : 0) + (extra > 0 ? extra : 0);
    } else if (dn->n_run > 0) {
        /* disaggregated: prefill nodes share the host's cores (decode_contention) while the
         * batch they are computing lasts (a batch that starts later is not foreseen) */
        double prefill_ms = 0;
        for (int p = 0; p < s->nP && !s->coloc; p++)
            if (s->P[p].busy) prefill_ms = fmax(prefill_ms, s->P[p].busy_until - s->now);
        ms = pds_slo_decode_gap_ms(&c->decode_model, dn->n_run, dn->run_ctx, prefill_ms);
    } else {
        return PDS_OK; /* idle */
    }
    dn->busy = true;
    dn->busy_until = s->now + ms;
    return ev_push(s, dn->busy_until, EV_ITER_DONE, d);
}

static pds_status_t iter_done(sim_t *s, int d)
{
    const pds_slo_sim_config_t *c = s->c;
    dnode_t *dn = &s->D[d];
    bool freed = false;
    dn->busy = false;
    if (c->mode == PDS_SLO_SIM_COLOC_PREFILL_FIRST && dn->iter_prefill) {
        for (int i = fifo_pop(s, &dn->batch); i >= 0; i = fifo_pop(s, &dn->batch)) {
            PDS_TRY(first_token(s, i, s->now, true));
            freed |= s->r[i].state == RS_DONE;
        }
    } else {
        /* a decode step (possibly with chunks): every running sequence gains a token */
        for (int k = 0; k < dn->n_run;) {
            int i = dn->run[k];
            sreq_t *q = &s->r[i];
            q->generated++;
            q->t_last = s->now;
            dn->ctx += 1;
            dn->run_ctx += 1;
            if (q->generated >= q->output) {
                dn->run_ctx -= q->prompt + q->generated;
                dn->run[k] = dn->run[--dn->n_run];
                finish(s, i);
                freed = true;
            } else {
                k++;
            }
        }
        if (c->mode == PDS_SLO_SIM_COLOC_CHUNKED && dn->iter_prefill) {
            for (int k = 0; k < dn->chunk_reqs; k++) {
                int i = dn->q.head;
                sreq_t *q = &s->r[i];
                q->prefilled += q->chunk_now;
                dn->queued_tokens -= q->chunk_now;
                q->chunk_now = 0;
                if (q->prefilled < q->prompt) {
                    q->state = RS_PREFILL_Q;
                    break; /* only the last touched request can be partial */
                }
                fifo_pop(s, &dn->q);
                PDS_TRY(first_token(s, i, s->now, true));
                freed |= s->r[i].state == RS_DONE;
            }
        }
    }
    /* between steps: the OpenTransfers that waited for this one (their prompts can start) */
    for (int i = fifo_pop(s, &dn->opening); i >= 0; i = fifo_pop(s, &dn->opening))
        PDS_TRY(prefill_enqueue(s, i));
    PDS_TRY(iter_start(s, d));
    return freed ? retry_waiting(s) : PDS_OK;
}

/* ---- the run ------------------------------------------------------------------------------------
 */
pds_slo_sim_config_t pds_slo_sim_default_config(void)
{
    pds_slo_sim_config_t c;
    memset(&c, 0, sizeof c);
    c.mode = PDS_SLO_SIM_DISAGG;
    c.n_prefill = c.n_decode = 1;
    c.prefill_max_batch_tokens = 8192;
    c.chunk_tokens = 512;
    c.decode_max_batch_seqs = 256;
    c.block_size = 16;
    c.place = pds_slo_place_default_params();
    return c;
}

const char *pds_slo_sim_mode_name(pds_slo_sim_mode_t m)
{
    switch (m) {
    case PDS_SLO_SIM_DISAGG:
        return "disaggregated";
    case PDS_SLO_SIM_COLOC_PREFILL_FIRST:
        return "colocated-prefill-first";
    case PDS_SLO_SIM_COLOC_CHUNKED:
        return "colocated-chunked";
    }
    return "unknown";
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v (n > 0). */
static double pct(const double *v, int n, double p)
{
    int k = (int)ceil(p * n) - 1;
    return v[k < 0 ? 0 : (k >= n ? n - 1 : k)];
}

static pds_status_t check_config(const pds_slo_sim_config_t *c)
{
    if (c->mode != PDS_SLO_SIM_DISAGG && c->mode != PDS_SLO_SIM_COLOC_PREFILL_FIRST &&
        c->mode != PDS_SLO_SIM_COLOC_CHUNKED)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: mode %d unknown", (int)c->mode);
    if (c->n_decode < 1 || c->n_decode > 100000)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: n_decode %d not in 1..100000", c->n_decode);
    if (c->mode == PDS_SLO_SIM_DISAGG && (c->n_prefill < 1 || c->n_prefill > 100000))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: n_prefill %d not in 1..100000",
                       c->n_prefill);
    if (c->mode == PDS_SLO_SIM_COLOC_CHUNKED && c->chunk_tokens < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: chunk_tokens %d < 1", c->chunk_tokens);
    if (c->decode_kv_blocks < 0 || (c->decode_kv_blocks > 0 && c->block_size < 1))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: decode_kv_blocks needs block_size >= 1");
    if (c->prefill_max_batch_tokens < 0 || c->decode_max_batch_seqs < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: negative batch limit");
    if (pds_slo_prefill_ms(&c->prefill_model, 1e6) <= 0 &&
        pds_slo_decode_step_ms(&c->decode_model, 1, 1e6) <= 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: the models predict no time at all");
    return PDS_OK;
}

pds_status_t pds_slo_sim_run(const pds_slo_sim_config_t *c, const pds_slo_req_t *reqs, int n,
                             pds_slo_sim_result_t *res, double *ttft, double *tpot)
{
    PDS_TRY(check_config(c));
    if (n < 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "simulator: %d requests", n);
    for (int i = 0; i < n; i++)
        if (reqs[i].prompt_tokens < 1 || reqs[i].output_tokens < 1 ||
            (i > 0 && reqs[i].arrival_ms < reqs[i - 1].arrival_ms) || !isfinite(reqs[i].arrival_ms))
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "simulator: request %d has prompt %d, output %d, arrival %g (lengths "
                           ">= 1, arrivals sorted)",
                           i, reqs[i].prompt_tokens, reqs[i].output_tokens, reqs[i].arrival_ms);
    sim_t s;
    memset(&s, 0, sizeof s);
    s.c = c;
    s.place = c->place;
    s.coloc = c->mode != PDS_SLO_SIM_DISAGG;
    s.place.colocated = s.coloc;
    s.n = n;
    s.nD = c->n_decode;
    s.nP = s.coloc ? c->n_decode : c->n_prefill;
    s.wait.head = s.wait.tail = -1;
    pds_status_t st = PDS_OK;
    double *vt = NULL;
    s.r = pds_calloc((size_t)n + 1, sizeof *s.r);
    s.P = pds_calloc((size_t)s.nP, sizeof *s.P);
    s.D = pds_calloc((size_t)s.nD, sizeof *s.D);
    s.pl = pds_calloc((size_t)s.nP, sizeof *s.pl);
    s.dl = pds_calloc((size_t)s.nD, sizeof *s.dl);
    vt = pds_malloc(sizeof(double) * (size_t)(2 * n + 1));
    if (!s.r || !s.P || !s.D || !s.pl || !s.dl || !vt) {
        st = PDS_ERR(PDS_ERR_NO_MEMORY, "simulator: %d requests", n);
        goto out;
    }
    for (int p = 0; p < s.nP; p++)
        s.P[p].q.head = s.P[p].q.tail = s.P[p].batch.head = s.P[p].batch.tail = -1;
    for (int d = 0; d < s.nD; d++) {
        dnode_t *dn = &s.D[d];
        dn->pending.head = dn->pending.tail = dn->q.head = dn->q.tail = -1;
        dn->opening.head = dn->opening.tail = -1;
        dn->batch.head = dn->batch.tail = -1;
        int cap = c->decode_max_batch_seqs > 0 && c->decode_max_batch_seqs < n
                      ? c->decode_max_batch_seqs
                      : n;
        dn->run = pds_malloc(sizeof(int) * (size_t)(cap + 1));
        if (!dn->run) {
            st = PDS_ERR(PDS_ERR_NO_MEMORY, "simulator: batch of %d", cap);
            goto out;
        }
    }
    for (int i = 0; i < n; i++) {
        s.r[i] = (sreq_t){.prompt = reqs[i].prompt_tokens,
                          .output = reqs[i].output_tokens,
                          .arrival = reqs[i].arrival_ms,
                          .p = -1,
                          .d = -1,
                          .next = -1};
    }
    /* arrivals are pushed lazily, one ahead, so the heap stays as small as the cluster */
    if (n > 0 && (st = ev_push(&s, reqs[0].arrival_ms, EV_ARRIVAL, 0)) != PDS_OK) goto out;
    while (s.n_ev > 0) {
        ev_t e = ev_pop(&s);
        s.now = e.t;
        switch (e.type) {
        case EV_ARRIVAL:
            if (e.arg + 1 < n) st = ev_push(&s, reqs[e.arg + 1].arrival_ms, EV_ARRIVAL, e.arg + 1);
            if (st == PDS_OK) st = place_new(&s, e.arg);
            break;
        case EV_PREFILL_DONE:
            st = prefill_done(&s, e.arg);
            break;
        case EV_JOIN: {
            int d = s.r[e.arg].d;
            fifo_push(&s, &s.D[d].pending, e.arg);
            st = iter_start(&s, d);
            break;
        }
        case EV_ITER_DONE:
            st = iter_done(&s, e.arg);
            break;
        case EV_DEADLINE:
            st = unwait_one(&s, e.arg);
            break;
        }
        if (st != PDS_OK) goto out;
    }
    /* results */
    double coloc_over =
        c->prefill_model.ttft_overhead_ms > 0 ? c->prefill_model.ttft_overhead_ms : 0;
    memset(res, 0, sizeof *res);
    res->n = n;
    double *tt = vt, *tp = vt + n, sum_tt = 0, sum_tp = 0, last = 0;
    int n_tt = 0, n_tp = 0;
    for (int i = 0; i < n; i++) {
        sreq_t *q = &s.r[i];
        if (q->state != RS_DONE) {
            res->n_rejected++;
            if (ttft) ttft[i] = -1;
            if (tpot) tpot[i] = -1;
            continue;
        }
        res->n_finished++;
        /* colocated: the control path is a pure delay of the first token (the disaggregated
         * one is in t_first already: it also delays the decode join) */
        double a = q->t_first - q->arrival + (s.coloc ? coloc_over : 0);
        double b = q->output > 1 ? (q->t_last - q->t_first) / (q->output - 1) : 0;
        if (ttft) ttft[i] = a;
        if (tpot) tpot[i] = b;
        tt[n_tt++] = a, sum_tt += a;
        if (q->output > 1) tp[n_tp++] = b, sum_tp += b;
        if (q->t_last > last) last = q->t_last;
        bool ok_a = c->ttft_ms <= 0 || a <= c->ttft_ms;
        bool ok_b = c->tpot_ms <= 0 || q->output <= 1 || b <= c->tpot_ms;
        res->n_met += ok_a && ok_b;
    }
    res->attainment = n ? (double)res->n_met / n : 0;
    qsort(tt, (size_t)n_tt, sizeof *tt, cmp_double);
    qsort(tp, (size_t)n_tp, sizeof *tp, cmp_double);
    if (n_tt) {
        res->ttft_mean = sum_tt / n_tt;
        res->ttft_p50 = pct(tt, n_tt, 0.5), res->ttft_p90 = pct(tt, n_tt, 0.9);
        res->ttft_p99 = pct(tt, n_tt, 0.99);
    }
    if (n_tp) {
        res->tpot_mean = sum_tp / n_tp;
        res->tpot_p50 = pct(tp, n_tp, 0.5), res->tpot_p90 = pct(tp, n_tp, 0.9);
        res->tpot_p99 = pct(tp, n_tp, 0.99);
    }
    res->makespan_ms = n ? last - reqs[0].arrival_ms : 0;
    res->throughput_rps = res->makespan_ms > 0 ? res->n_finished / (res->makespan_ms / 1000) : 0;
out:
    if (s.D)
        for (int d = 0; d < s.nD; d++) pds_free(s.D[d].run);
    pds_free(s.r), pds_free(s.P), pds_free(s.D), pds_free(s.pl), pds_free(s.dl);
    pds_free(s.heap), pds_free(vt);
    return st;
}

/* ---- goodput ------------------------------------------------------------------------------------
 */
/* A probe must reach steady state: n requests at a high rate arrive in a fraction of a second
 * and all fit in the decode batches at once, so nothing ever queues and any rate "passes" (the
 * planner once reported 2,671 req/s for llama3-8b chatbot on 8 H100s). Each probe therefore covers
 * at least PROBE_MIN_SPAN_S seconds of arrivals (more requests at high rates), up to PROBE_MAX. */
#define PROBE_MIN_SPAN_S 120.0
#define PROBE_MAX        1000000

static int probe_count(int n, double rate)
{
    double want = ceil(rate * PROBE_MIN_SPAN_S);
    if (want > PROBE_MAX) want = PROBE_MAX;
    return want > n ? (int)want : n;
}

static pds_status_t probe(const pds_slo_sim_config_t *c, const pds_slo_workload_t *w, int n,
                          uint64_t seed, double rate, pds_slo_req_t **reqs, int *cap,
                          pds_slo_sim_result_t *r, pds_slo_progress_fn progress, void *ctx)
{
    n = probe_count(n, rate);
    if (n > *cap) {
        pds_slo_req_t *bigger = pds_malloc(sizeof *bigger * (size_t)n);
        if (!bigger) return PDS_ERR(PDS_ERR_NO_MEMORY, "goodput: %d requests", n);
        pds_free(*reqs);
        *reqs = bigger;
        *cap = n;
    }
    PDS_TRY(pds_slo_workload_generate(w, rate, n, seed, c->max_context, *reqs));
    PDS_TRY(pds_slo_sim_run(c, *reqs, n, r, NULL, NULL));
    if (progress) progress(ctx, rate, r);
    return PDS_OK;
}

pds_status_t pds_slo_goodput(const pds_slo_sim_config_t *c, const pds_slo_workload_t *w, int n,
                             uint64_t seed, double target, double lo_rate, double rel_tol,
                             double *rate_out, pds_slo_sim_result_t *at_rate,
                             pds_slo_progress_fn progress, void *ctx)
{
    if (n < 1 || !(target > 0 && target <= 1) || !(lo_rate > 0) || !(rel_tol > 0))
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "goodput: n %d >= 1, target %g in (0,1], lo_rate %g > 0, tol %g > 0", n,
                       target, lo_rate, rel_tol);
    int cap = n;
    pds_slo_req_t *reqs = pds_malloc(sizeof *reqs * (size_t)n);
    if (!reqs) return PDS_ERR(PDS_ERR_NO_MEMORY, "goodput: %d requests", n);
    pds_slo_sim_result_t r, best;
    memset(&best, 0, sizeof best);
    double lo = lo_rate, hi;
    pds_status_t s = probe(c, w, n, seed, lo, &reqs, &cap, &r, progress, ctx);
    if (s != PDS_OK) goto out;
    if (r.attainment < target) {
        *rate_out = 0;
        if (at_rate) *at_rate = r;
        goto out;
    }
    best = r;
    for (hi = lo * 2;; hi *= 2) {
        if ((s = probe(c, w, n, seed, hi, &reqs, &cap, &r, progress, ctx)) != PDS_OK) goto out;
        if (r.attainment < target) break;
        lo = hi, best = r;
        if (hi > 1e9) break; /* a model that never saturates: report what we reached */
    }
    while (hi - lo > rel_tol * lo) {
        double mid = 0.5 * (lo + hi);
        if ((s = probe(c, w, n, seed, mid, &reqs, &cap, &r, progress, ctx)) != PDS_OK) goto out;
        if (r.attainment >= target)
            lo = mid, best = r;
        else
            hi = mid;
    }
    *rate_out = lo;
    if (at_rate) *at_rate = best;
out:
    pds_free(reqs);
    return s;
}

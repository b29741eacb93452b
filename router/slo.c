/* slo.c: SLO-driven placement in the router ([slo] placement = slo) and the bookkeeping both
 * placement modes share.
 *
 * For each request the router predicts, with common/slo's latency model, the TTFT it would see on
 * every prefill node (the prompt tokens this router placed there and has not seen return, packed
 * into the node's batching budget, plus its own prefill and the exposed KV transfer) and the TPOT
 * of every decode node with it added (one step at batch + 1 over the context it would hold), and
 * hands those loads to pds_slo_place_cond (pds_slo_place, the function the capacity planner's
 * simulator uses, over two groups), which picks the pair with the most slack against the
 * request's targets. Colocated nodes are the second group (local prefill, no transfer): the better
 * of the best pair and the best local node wins, which is conditional disaggregation. When nothing
 * is predicted to meet the targets the configured policy decides: queue (ask again until
 * queue_deadline), best-effort (place on the best candidate anyway) or reject (RESOURCE_EXHAUSTED
 * with the predictions).
 *
 * Node models come from profiles ([slo] profile / prefill_profile / decode_profile /
 * colocated_profile, or NodeInfo.latency when a node sends one) and are refitted online from what
 * the router measures: each Prefill reply's compute time for its tokens, each TokenBatch's step
 * time with the batch and context of the sequences in it. The trade-off: the router's own view of
 * the load (what it placed, updated at once) instead of the nodes' reports (exact but up to one
 * report interval late) — a burst of arrivals would otherwise all see the same idle node. Where
 * both exist the larger is used, so several routers sharing nodes still see each other's work
 * through the reports.
 *
 * Every placement is logged (slo_place, slo_reject) and every finished request's predicted vs
 * measured TTFT/TPOT (slo_outcome) is logged and counted; ClusterStatus carries the counters.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router/router.h"

enum { PROF_PREFILL = 0, PROF_DECODE = 1, PROF_COLOCATED = 2 };
#define REFIT_EVERY 8 /* samples between two refits of a node's model */

static int role_prof(int role)
{
    return role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL     ? PROF_PREFILL
           : role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_COLOCATED ? PROF_COLOCATED
                                                                 : PROF_DECODE;
}

/* ---- configuration ------------------------------------------------------------------------------
 */
static pds_status_t parse_classes(router_t *r)
{
    char buf[sizeof r->cfg.classes];
    snprintf(buf, sizeof buf, "%s", r->cfg.classes);
    r->n_classes = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ", ", &save); tok;
         tok = strtok_r(NULL, ", ", &save)) {
        char name[64];
        double ttft, tpot;
        int used = 0;
        if (sscanf(tok, "%63[^:]:%lf:%lf%n", name, &ttft, &tpot, &used) != 3 ||
            used != (int)strlen(tok) || !(ttft >= 0) || !(tpot >= 0) || !isfinite(ttft) ||
            !isfinite(tpot))
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "[slo] classes: '%s' is not NAME:TTFT_MS:TPOT_MS (times >= 0)", tok);
        if (strlen(name) >= sizeof r->classes[0].name)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "[slo] classes: name '%s' longer than %zu bytes",
                           name, sizeof r->classes[0].name - 1);
        for (int i = 0; i < r->n_classes; i++)
            if (strcmp(r->classes[i].name, name) == 0)
                return PDS_ERR(PDS_ERR_INVALID_ARG, "[slo] classes: '%s' given twice", name);
        if (r->n_classes == ROUTER_MAX_CLASSES)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "[slo] classes: more than %d classes",
                           ROUTER_MAX_CLASSES);
        router_slo_class_t *c = &r->classes[r->n_classes++];
        snprintf(c->name, sizeof c->name, "%s", name);
        c->ttft_ms = ttft;
        c->tpot_ms = tpot;
    }
    r->default_class = -1;
    if (r->cfg.default_class[0]) {
        for (int i = 0; i < r->n_classes; i++)
            if (strcmp(r->classes[i].name, r->cfg.default_class) == 0) r->default_class = i;
        if (r->default_class < 0)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "[slo] default_class '%s' is not one of [slo] classes (%s)",
                           r->cfg.default_class, r->cfg.classes);
    }
    return PDS_OK;
}

static pds_status_t load_profile(router_t *r, const char *path, int which)
{
    if (!path[0]) return PDS_OK;
    PDS_TRY(pds_slo_profile_load(path, &r->prof[which]));
    r->have_prof[which] = true;
    return PDS_OK;
}

pds_status_t router_slo_setup(router_t *r)
{
    PDS_TRY(parse_classes(r));
    for (int i = 0; i < 3; i++) PDS_TRY(load_profile(r, r->cfg.profile, i));
    PDS_TRY(load_profile(r, r->cfg.prefill_profile, PROF_PREFILL));
    PDS_TRY(load_profile(r, r->cfg.decode_profile, PROF_DECODE));
    if (r->cfg.decode_profile[0] && !r->cfg.colocated_profile[0])
        PDS_TRY(load_profile(r, r->cfg.decode_profile, PROF_COLOCATED));
    PDS_TRY(load_profile(r, r->cfg.colocated_profile, PROF_COLOCATED));
    if (r->cfg.placement == ROUTER_PLACE_SLO && !r->have_prof[PROF_PREFILL] &&
        !r->have_prof[PROF_DECODE] && !r->have_prof[PROF_COLOCATED])
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "[slo] placement = slo needs latency models: set [slo] profile (or "
                       "prefill_profile and decode_profile) to a file made by `pdserve-plan "
                       "profile`");
    for (int i = 0; i < 3; i++) {
        /* a role without its own profile borrows one (a prefill profile also has decode
         * coefficients and vice versa: the profiler measures both) */
        if (r->have_prof[i]) continue;
        for (int j = 0; j < 3 && !r->have_prof[i]; j++)
            if (r->have_prof[j]) r->prof[i] = r->prof[j], r->have_prof[i] = true;
    }
    for (int i = 0; i < r->n_classes; i++)
        PDS_LOG_INFO("router", "slo_class name=%s ttft_ms=%.0f tpot_ms=%.1f%s", r->classes[i].name,
                     r->classes[i].ttft_ms, r->classes[i].tpot_ms,
                     i == r->default_class ? " default=1" : "");
    return PDS_OK;
}

void router_slo_targets(router_t *r, const Pdserve__V1__Slo *slo, double *ttft_ms, double *tpot_ms,
                        char *class_name, size_t cap)
{
    const router_slo_class_t *c = NULL;
    if (slo && slo->class_name && slo->class_name[0])
        for (int i = 0; i < r->n_classes && !c; i++)
            if (strcmp(r->classes[i].name, slo->class_name) == 0) c = &r->classes[i];
    /* an unknown class gets the default one (the proto's contract) */
    if (!c && r->default_class >= 0) c = &r->classes[r->default_class];
    *ttft_ms = slo && slo->ttft_ms > 0 ? slo->ttft_ms : c ? c->ttft_ms : 0;
    *tpot_ms = slo && slo->tpot_ms > 0 ? slo->tpot_ms : c ? c->tpot_ms : 0;
    snprintf(class_name, cap, "%s", c ? c->name : "");
}

/* ---- node models
 * ----------------------------------------------------------------------------------
 */
void router_model_from_proto(const Pdserve__V1__LatencyModel *lm, pds_slo_model_t *m)
{
    m->prefill_a = lm->prefill_a_ms;
    m->prefill_b = lm->prefill_b_ms_per_token;
    m->prefill_c = lm->prefill_c_ms_per_token2;
    m->decode_d = lm->decode_d_ms;
    m->decode_e = lm->decode_e_ms_per_seq;
    m->decode_f = lm->decode_f_ms_per_context_token;
    m->decode_split = 0; /* the wire model has one decode line */
    if (lm->transfer_gbytes_per_s > 0) {
        m->link_gbytes_per_s = lm->transfer_gbytes_per_s;
        m->link_msg_ms = lm->transfer_msg_ms;
    }
}

void router_node_model_init(router_t *r, node_t *n)
{
    const Pdserve__V1__NodeInfo *info = n->info;
    int pi = role_prof(n->role);
    n->have_model = r->have_prof[pi];
    if (n->have_model) n->model = r->prof[pi].m;
    const Pdserve__V1__LatencyModel *lm = info->latency;
    if (lm && (lm->prefill_b_ms_per_token > 0 || lm->decode_d_ms > 0)) {
        memset(&n->model, 0, sizeof n->model);
        router_model_from_proto(lm, &n->model);
        n->have_model = true;
    }
    /* the transfer term needs the KV geometry the node registered */
    if (info->kv) {
        int dt = info->kv->dtype == PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32 ? 4 : 2;
        n->model.kv_bytes_per_token =
            2LL * info->kv->n_layers * info->kv->n_kv_heads * info->kv->head_dim * dt;
        n->model.n_layers = (int)info->kv->n_layers;
    }
    n->max_batch_tokens = info->max_batch_tokens ? (int)info->max_batch_tokens
                          : r->have_prof[pi]     ? r->prof[pi].max_batch_tokens
                                                 : 8192;
    n->chunk_tokens = (int)info->colocated_chunk_tokens;
    pds_slo_refit_destroy(n->refit);
    n->refit = NULL;
    n->refit_new = 0;
    if (r->cfg.refit && n->have_model &&
        pds_slo_refit_create(r->cfg.refit_window, REFIT_EVERY, &n->refit) != PDS_OK)
        PDS_LOG_WARN("router", "refit_disabled node=%s detail=\"%s\"", n->id, pds_err_detail());
    if (n->have_model)
        PDS_LOG_INFO(
            "router",
            "node_model node=%s prefill_ms=%.3g+%.3g*T+%.3g*T^2 decode_ms=%.3g+%.3g*B+%.3g*C "
            "link_gbps=%.3g max_batch_tokens=%d chunk_tokens=%d",
            n->id, n->model.prefill_a, n->model.prefill_b, n->model.prefill_c, n->model.decode_d,
            n->model.decode_e, n->model.decode_f, n->model.link_gbytes_per_s, n->max_batch_tokens,
            n->chunk_tokens);
    else if (r->cfg.placement == ROUTER_PLACE_SLO)
        PDS_LOG_WARN("router", "node_without_model node=%s: not a candidate for SLO placement",
                     n->id);
}

/* Router mu held. */
static void maybe_refit(router_t *r, node_t *n)
{
    if (++n->refit_new < REFIT_EVERY) return;
    n->refit_new = 0;
    pds_slo_fit_t fp = {0}, fd = {0};
    if (pds_slo_refit_update(n->refit, &n->model, &fp, &fd) != PDS_OK) {
        PDS_LOG_WARN("router", "refit_failed node=%s detail=\"%s\"", n->id, pds_err_detail());
        return;
    }
    pthread_mutex_lock(&r->slo_mu);
    r->slo.refits++;
    pthread_mutex_unlock(&r->slo_mu);
    PDS_LOG_DEBUG("router",
                  "refit node=%s prefill_ms=%.3g+%.3g*T+%.3g*T^2 (n=%d err=%.1f%%) "
                  "decode_ms=%.3g+%.3g*B+%.3g*C (n=%d err=%.1f%%)",
                  n->id, n->model.prefill_a, n->model.prefill_b, n->model.prefill_c, fp.n,
                  100 * fp.rms_rel, n->model.decode_d, n->model.decode_e, n->model.decode_f, fd.n,
                  100 * fd.rms_rel);
}

void router_observe_prefill(router_t *r, node_t *p, double tokens, double ms)
{
    pthread_mutex_lock(&r->mu);
    if (p->refit && p->role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL) {
        pds_slo_refit_add_prefill(p->refit, tokens, ms);
        maybe_refit(r, p);
    }
    pthread_mutex_unlock(&r->mu);
}

void router_observe_step(router_t *r, node_t *d, double batch, double ctx, double ms)
{
    pthread_mutex_lock(&r->mu);
    /* a colocated node's steps carry prompt chunks too: they are not decode-step samples */
    if (d->refit && d->role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE) {
        pds_slo_refit_add_decode(d->refit, batch, ctx, ms);
        maybe_refit(r, d);
    }
    pthread_mutex_unlock(&r->mu);
}

/* ---- placement ----------------------------------------------------------------------------------
 */
/* Router mu held. Records the placement on the nodes (given back by router_unplace_*). */
static void charge(router_t *r, router_choice_t *c, const router_place_in_t *in, bool least)
{
    c->prefill_tokens = in->n_tokens;
    c->ctx_tokens = in->n_tokens + in->outputs / 2;
    c->p->out_prefill_tokens += c->prefill_tokens;
    c->d->active_seqs++;
    c->d->active_ctx += c->ctx_tokens;
    if (!least) { /* router_place did these for least-loaded */
        c->p->inflight_tokens += in->n_tokens;
        c->d->inflight_blocks +=
            r->block_size ? PDS_DIV_UP(in->n_tokens + in->outputs, (int64_t)r->block_size) : 1;
    }
}

void router_unplace_prefill(router_t *r, router_choice_t *c)
{
    if (!c->p || c->prefill_tokens <= 0) return;
    pthread_mutex_lock(&r->mu);
    c->p->out_prefill_tokens = PDS_MAX(c->p->out_prefill_tokens - c->prefill_tokens, 0);
    pthread_mutex_unlock(&r->mu);
    c->prefill_tokens = 0;
}

void router_unplace_decode(router_t *r, router_choice_t *c)
{
    router_unplace_prefill(r, c);
    if (!c->d || c->ctx_tokens <= 0) return;
    pthread_mutex_lock(&r->mu);
    c->d->active_seqs = PDS_MAX(c->d->active_seqs - 1, 0);
    c->d->active_ctx = PDS_MAX(c->d->active_ctx - c->ctx_tokens, 0);
    pthread_mutex_unlock(&r->mu);
    c->ctx_tokens = 0;
}

static bool candidate(const node_t *n)
{
    return n->state == PDSERVE__V1__NODE_STATE__NODE_STATE_UP && n->info && n->have_model;
}

/* Router mu held. The load a prefill node (or a colocated node prefilling locally) presents. */
static pds_slo_prefill_load_t prefill_load(const node_t *n)
{
    pds_slo_prefill_load_t l = {.model = &n->model, .max_batch_tokens = n->max_batch_tokens};
    l.queued_tokens = (double)PDS_MAX((int64_t)n->last.queued_prompt_tokens + n->inflight_tokens,
                                      n->out_prefill_tokens);
    return l;
}

static pds_slo_decode_load_t decode_load(const router_t *r, const node_t *n)
{
    pds_slo_decode_load_t l = {.model = &n->model,
                               .block_size = (int)r->block_size,
                               .max_batch_seqs = n->info ? (int)n->info->max_batch_seqs : 0};
    l.batch = PDS_MAX((int)n->last.running_seqs, n->active_seqs);
    l.context_tokens = (double)PDS_MAX((int64_t)n->last.context_tokens, n->active_ctx);
    l.free_blocks = (int64_t)n->last.free_kv_blocks - n->inflight_blocks;
    return l;
}

/* Nodes of one kind, excluding `avoid` unless nothing else is there. */
static int gather(router_t *r, bool (*want)(const node_t *), const char *avoid, node_t **out,
                  int cap)
{
    int n = 0;
    for (int pass = 0; pass < 2 && n == 0; pass++)
        for (node_t *x = r->nodes; x && n < cap; x = x->next)
            if (want(x) && (pass == 1 || !avoid || strcmp(avoid, x->id) != 0)) out[n++] = x;
    return n;
}

static bool want_prefill(const node_t *n)
{
    return candidate(n) && n->role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL;
}
static bool want_decode(const node_t *n)
{
    return candidate(n) && ROUTER_DECODES(n->role);
}
static bool want_colocated(const node_t *n)
{
    return candidate(n) && n->role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_COLOCATED;
}

#define MAX_CAND 256

typedef struct {
    node_t *pn[MAX_CAND], *dn[MAX_CAND], *cn[MAX_CAND];
    pds_slo_prefill_load_t pre[MAX_CAND], cpre[MAX_CAND];
    pds_slo_decode_load_t dec[MAX_CAND], cdec[MAX_CAND];
    int np, nd, nc;
} cands_t;

/* Router mu held. */
static void gather_all(router_t *r, const router_place_in_t *in, cands_t *k)
{
    k->np = gather(r, want_prefill, in->avoid_p, k->pn, MAX_CAND);
    k->nd = gather(r, want_decode, in->avoid_d, k->dn, MAX_CAND);
    k->nc = r->cfg.local_prefill ? gather(r, want_colocated, in->avoid_d, k->cn, MAX_CAND) : 0;
    for (int i = 0; i < k->np; i++) k->pre[i] = prefill_load(k->pn[i]);
    for (int i = 0; i < k->nd; i++) k->dec[i] = decode_load(r, k->dn[i]);
    for (int i = 0; i < k->nc; i++) {
        node_t *c = k->cn[i];
        k->cdec[i] = decode_load(r, c);
        k->cpre[i] = prefill_load(c);
        /* The local prefill shares the node with its decode batch. Prefill-first: it waits for
         * the step in flight. Chunked: each chunk of the queue and of the prompt rides on a
         * decode step. (Predicted TPOT ignores the stalls local prefills cause to the batch.) */
        double step = k->cdec[i].batch > 0 ? pds_slo_decode_step_ms(&c->model, k->cdec[i].batch,
                                                                    k->cdec[i].context_tokens)
                                           : 0;
        if (c->chunk_tokens > 0) {
            double chunks =
                ceil((k->cpre[i].queued_tokens + (double)in->n_tokens) / (double)c->chunk_tokens);
            k->cpre[i].busy_ms = chunks * step;
            k->cpre[i].max_batch_tokens = c->chunk_tokens;
        } else {
            k->cpre[i].busy_ms = step;
        }
    }
}

static void log_choice(const router_place_in_t *in, const router_choice_t *c, const char *how)
{
    PDS_LOG_INFO("router",
                 "slo_place req=%s p=%s d=%s local=%d pred_ttft_ms=%.1f pred_tpot_ms=%.2f "
                 "ttft_target_ms=%.0f tpot_target_ms=%.1f slack=%.3f meets=%d how=%s",
                 in->request_id ? in->request_id : "", c->p->id, c->d->id, c->local,
                 c->pred_ttft_ms, c->pred_tpot_ms, in->ttft_ms, in->tpot_ms, c->slack, c->meets,
                 how);
}

/* Router mu held. */
static pds_status_t place_slo(router_t *r, const router_place_in_t *in, router_choice_t *out)
{
    cands_t *k = pds_malloc(sizeof *k);
    if (!k) return PDS_ERR(PDS_ERR_NO_MEMORY, "placement candidates");
    gather_all(r, in, k);
    pds_status_t s;
    if ((k->np == 0 || k->nd == 0) && k->nc == 0) {
        s = PDS_ERR(PDS_ERR_UNAVAILABLE, "no %s node with a latency model is up",
                    k->nd == 0 ? "decode" : "prefill");
        goto out;
    }
    pds_slo_request_t req = {.prompt_tokens = in->n_tokens,
                             .output_tokens = PDS_MAX(in->outputs, 1),
                             .ttft_ms = in->ttft_ms,
                             .tpot_ms = in->tpot_ms,
                             .waited_ms = in->waited_ms};
    pds_slo_place_params_t pp = pds_slo_place_default_params();
    pp.policy = (pds_slo_policy_t)r->cfg.policy;
    pp.tpot_weight = r->cfg.tpot_weight;
    pp.queue_deadline_ms = (double)r->cfg.queue_deadline_ns / 1e6;
    pds_slo_decision_t dx;
    bool local = false;
    s = pds_slo_place_cond(&pp, &req, k->pre, k->np, k->dec, k->nd, k->cpre, k->cdec, k->nc, &dx,
                           &local);
    if (s == PDS_OK) {
        out->local = local;
        out->p = local ? k->cn[dx.prefill] : k->pn[dx.prefill];
        out->d = local ? k->cn[dx.decode] : k->dn[dx.decode];
        out->predicted = true;
        out->meets = dx.meets;
        out->pred_ttft_ms = dx.pred_ttft_ms;
        out->pred_tpot_ms = dx.pred_tpot_ms;
        out->slack = dx.slack;
        charge(r, out, in, false);
        log_choice(in, out, dx.meets ? "meets" : "best-effort");
        pthread_mutex_lock(&r->slo_mu);
        r->slo.placed++;
        r->slo.placed_meeting += dx.meets;
        r->slo.placed_best_effort += !dx.meets;
        r->slo.placed_local += local;
        pthread_mutex_unlock(&r->slo_mu);
        goto out;
    }
    pthread_mutex_lock(&r->slo_mu);
    if (s == PDS_AGAIN && in->first_try) r->slo.queued++;
    if (s == PDS_ERR_EXHAUSTED) r->slo.rejected++;
    pthread_mutex_unlock(&r->slo_mu);
    if (s == PDS_ERR_EXHAUSTED)
        PDS_LOG_INFO("router", "slo_reject req=%s waited_ms=%.0f why=\"%s\"",
                     in->request_id ? in->request_id : "", in->waited_ms, dx.why);
    else if (s == PDS_AGAIN && in->first_try)
        PDS_LOG_DEBUG("router", "slo_queue req=%s why=\"%s\"", in->request_id ? in->request_id : "",
                      dx.why);
out:
    pds_free(k);
    return s;
}

pds_status_t router_place_request(router_t *r, const router_place_in_t *in, router_choice_t *out)
{
    memset(out, 0, sizeof *out);
    if (r->cfg.placement == ROUTER_PLACE_SLO) {
        pthread_mutex_lock(&r->mu);
        pds_status_t s = place_slo(r, in, out);
        pthread_mutex_unlock(&r->mu);
        return s;
    }
    node_t *p = NULL, *d = NULL;
    bool local = false;
    PDS_TRY(router_place(r, in->n_tokens, in->avoid_p, in->avoid_d, &p, &d, &local));
    out->p = p;
    out->d = d;
    out->local = local;
    pthread_mutex_lock(&r->mu);
    charge(r, out, in, true);
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&r->slo_mu);
    r->slo.placed++;
    r->slo.placed_local += local;
    pthread_mutex_unlock(&r->slo_mu);
    return PDS_OK;
}

/* ---- outcomes -----------------------------------------------------------------------------------
 */
void router_slo_outcome(router_t *r, const char *req_id, const router_choice_t *c,
                        double ttft_target, double tpot_target, double ttft_ms, double tpot_ms,
                        int n_tokens)
{
    bool targets = ttft_target > 0 || tpot_target > 0;
    bool met = (ttft_target <= 0 || ttft_ms <= ttft_target) &&
               (tpot_target <= 0 || n_tokens <= 1 || tpot_ms <= tpot_target);
    pthread_mutex_lock(&r->slo_mu);
    if (targets) {
        r->slo.finished++;
        r->slo.met_actual += met;
        r->slo.met_predicted += c->predicted && c->meets;
    }
    if (c->predicted && ttft_ms > 0) {
        r->slo.n_pred++;
        r->slo.ttft_abs_err += fabs(c->pred_ttft_ms - ttft_ms) / ttft_ms;
        r->slo.ttft_err += (c->pred_ttft_ms - ttft_ms) / ttft_ms;
        if (n_tokens > 1 && tpot_ms > 0) {
            r->slo.n_tpot++;
            r->slo.tpot_abs_err += fabs(c->pred_tpot_ms - tpot_ms) / tpot_ms;
            r->slo.tpot_err += (c->pred_tpot_ms - tpot_ms) / tpot_ms;
        }
    }
    pthread_mutex_unlock(&r->slo_mu);
    if (c->predicted)
        PDS_LOG_INFO("router",
                     "slo_outcome req=%s pred_ttft_ms=%.1f ttft_ms=%.1f pred_tpot_ms=%.2f "
                     "tpot_ms=%.2f tokens=%d met=%d pred_met=%d",
                     req_id, c->pred_ttft_ms, ttft_ms, c->pred_tpot_ms, tpot_ms, n_tokens, met,
                     c->meets);
    else if (targets)
        PDS_LOG_DEBUG("router", "slo_outcome req=%s ttft_ms=%.1f tpot_ms=%.2f tokens=%d met=%d",
                      req_id, ttft_ms, tpot_ms, n_tokens, met);
}

void router_slo_fill_status(router_t *r, Pdserve__V1__SloStats *out)
{
    static const char *const placement[] = {"least-loaded", "slo"};
    out->placement = (char *)placement[r->cfg.placement == ROUTER_PLACE_SLO];
    out->policy = (char *)pds_slo_policy_name((pds_slo_policy_t)r->cfg.policy);
    pthread_mutex_lock(&r->slo_mu);
    out->placed = r->slo.placed;
    out->placed_meeting = r->slo.placed_meeting;
    out->placed_best_effort = r->slo.placed_best_effort;
    out->placed_local = r->slo.placed_local;
    out->queued = r->slo.queued;
    out->rejected = r->slo.rejected;
    out->finished = r->slo.finished;
    out->met_predicted = r->slo.met_predicted;
    out->met_actual = r->slo.met_actual;
    out->refits = r->slo.refits;
    /* means over the finished requests that had predictions */
    if (r->slo.n_pred) {
        out->ttft_mean_abs_err_pct = 100.0 * r->slo.ttft_abs_err / (double)r->slo.n_pred;
        out->ttft_mean_err_pct = 100.0 * r->slo.ttft_err / (double)r->slo.n_pred;
    }
    if (r->slo.n_tpot) {
        out->tpot_mean_abs_err_pct = 100.0 * r->slo.tpot_abs_err / (double)r->slo.n_tpot;
        out->tpot_mean_err_pct = 100.0 * r->slo.tpot_err / (double)r->slo.n_tpot;
    }
    pthread_mutex_unlock(&r->slo_mu);
}

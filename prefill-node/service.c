/* service.c: the PrefillNode handlers and the service's life cycle. Handlers run on the RPC thread
 * and never block: Prefill validates the request, copies it into a job and hands the job to a
 * worker (which opens the transfer at the decode node); Cancel only flags a job. Every job stays in
 * a table (by request id and by call) until its Prefill call is answered, so a Cancel or the
 * call's own on_cancel can reach it in whatever stage it is, and shutdown can cancel them all.
 */
#include "service_internal.h"

#include <stdio.h>
#include <string.h>

#define MOD "prefill"

/* ---- job table
 * ----------------------------------------------------------------------------------- */
static void track_locked(pf_service_t *svc, pf_job_t *j)
{
    j->tbl_prev = NULL;
    j->tbl_next = svc->tbl_head;
    if (svc->tbl_head) svc->tbl_head->tbl_prev = j;
    svc->tbl_head = j;
}

bool pf_service_untrack(pf_service_t *svc, pf_job_t *j)
{
    pthread_mutex_lock(&svc->mu);
    bool found = false;
    for (pf_job_t *c = svc->tbl_head; c; c = c->tbl_next)
        if (c == j) found = true;
    if (found) {
        if (j->tbl_prev)
            j->tbl_prev->tbl_next = j->tbl_next;
        else
            svc->tbl_head = j->tbl_next;
        if (j->tbl_next) j->tbl_next->tbl_prev = j->tbl_prev;
        j->tbl_prev = j->tbl_next = NULL;
    }
    pthread_mutex_unlock(&svc->mu);
    return found;
}

static pf_job_t *find_locked(pf_service_t *svc, const char *request_id, const pds_rpc_call_t *call)
{
    for (pf_job_t *c = svc->tbl_head; c; c = c->tbl_next)
        if ((request_id && strcmp(c->request_id, request_id) == 0) || (call && c->call == call))
            return c;
    return NULL;
}

void pf_service_job_end(pf_service_t *svc, pf_job_t *j)
{
    pf_job_free(j);
    pthread_mutex_lock(&svc->mu);
    if (--svc->live == 0) pthread_cond_broadcast(&svc->idle);
    pthread_mutex_unlock(&svc->mu);
}

void pf_service_uncount(pf_service_t *svc, pf_job_t *j)
{
    if (!j->counted) return;
    j->counted = false;
    atomic_fetch_sub(&svc->queued_tokens, (long long)j->n_tokens);
    atomic_fetch_sub(&svc->queued_reqs, 1);
}

/* Flags the job cancelled; the stage that holds it acts on it. Caller holds svc->mu. */
static void cancel_locked(pf_service_t *svc, pf_job_t *j, const char *why)
{
    if (!atomic_load(&j->cancelled)) {
        j->cancel_why = why;
        atomic_store(&j->cancelled, true);
    }
    pf_sched_kick(svc->sched);
}

/* ---- scheduler callbacks (engine thread) ------------------------------------------------------
 */
static void on_computed(void *ctx, pf_job_t *j)
{
    pf_service_t *svc = ctx;
    pf_service_uncount(svc, j);
    j->work = PF_WORK_FINISH;
    pf_fifo_push(&svc->work, j);
}

static void on_released(void *ctx, pf_job_t *j)
{
    pf_service_job_end(ctx, j);
}

/* ---- Prefill
 * ------------------------------------------------------------------------------------- */
/* Checks the request against the model; on failure writes the message for INVALID_ARGUMENT. */
static bool validate(const pf_service_t *svc, const Pdserve__V1__PrefillRequest *r,
                     pds_sample_params_t *sp, char *msg, size_t cap)
{
    const pds_model_config_t *m = &svc->info.model;
    if (!r->request_id || !r->request_id[0]) {
        snprintf(msg, cap, "request_id is empty");
        return false;
    }
    if (r->n_prompt_ids == 0) {
        snprintf(msg, cap, "prompt_ids is empty");
        return false;
    }
    size_t total = r->n_prompt_ids + r->n_generated_ids;
    if (total + 1 > (size_t)m->max_context) {
        snprintf(msg, cap,
                 "%zu prompt + %zu generated tokens leave no room for a new token in the context "
                 "of %d",
                 r->n_prompt_ids, r->n_generated_ids, m->max_context);
        return false;
    }
    for (size_t i = 0; i < total; i++) {
        bool gen = i >= r->n_prompt_ids;
        int32_t t = gen ? r->generated_ids[i - r->n_prompt_ids] : r->prompt_ids[i];
        if (t < 0 || t >= m->vocab) {
            snprintf(msg, cap, "%s_ids[%zu] = %d is outside the vocabulary of %d",
                     gen ? "generated" : "prompt", gen ? i - r->n_prompt_ids : i, t, m->vocab);
            return false;
        }
    }
    if (r->max_tokens <= r->n_generated_ids) {
        snprintf(msg, cap, "max_tokens %u must exceed the %zu tokens already generated",
                 r->max_tokens, r->n_generated_ids);
        return false;
    }
    *sp = pds_sample_default_params();
    if (r->sampling) {
        sp->temperature = r->sampling->temperature;
        sp->top_k = r->sampling->top_k;
        sp->top_p = r->sampling->top_p == 0.0f ? 1.0f : r->sampling->top_p;
        if (r->sampling->seed_opt_case == PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED)
            sp->seed = r->sampling->seed;
    }
    if (pds_sample_params_validate(sp) != PDS_OK) {
        snprintf(msg, cap, "sampling: %s", pds_err_detail());
        return false;
    }
    if (!r->decode_address || !r->decode_address[0]) {
        snprintf(msg, cap, "decode_address is empty");
        return false;
    }
    return true;
}

static void *dup_bytes(const void *src, size_t n)
{
    void *d = pds_malloc(n ? n : 1);
    if (d && n) memcpy(d, src, n);
    return d;
}

static char *dup_str(const char *s)
{
    return pds_strdup(s ? s : "");
}

/* Copies the request into a new job (the request dies with the call). NULL on no memory. */
static pf_job_t *job_new(const Pdserve__V1__PrefillRequest *r, const pds_sample_params_t *sp,
                         pds_rpc_call_t *call)
{
    pf_job_t *j = pds_calloc(1, sizeof *j);
    if (!j) return NULL;
    pds_kv_seq_init(&j->kv);
    j->n_prompt = (int)r->n_prompt_ids;
    j->n_generated = (int)r->n_generated_ids;
    j->n_tokens = j->n_prompt + j->n_generated;
    j->tokens = pds_malloc((size_t)j->n_tokens * sizeof *j->tokens);
    j->stop = dup_bytes(r->stop_token_ids, r->n_stop_token_ids * sizeof *r->stop_token_ids);
    j->request_id = dup_str(r->request_id);
    j->router_id = dup_str(r->router_id);
    j->decode_node_id = dup_str(r->decode_node_id);
    j->decode_address = dup_str(r->decode_address);
    j->decode_kvx_addr = dup_bytes(r->decode_kvx_address.data, r->decode_kvx_address.len);
    j->slo_class = dup_str(r->slo ? r->slo->class_name : NULL);
    if (!j->tokens || !j->stop || !j->request_id || !j->router_id || !j->decode_node_id ||
        !j->decode_address || !j->decode_kvx_addr || !j->slo_class) {
        pf_job_free(j);
        return NULL;
    }
    memcpy(j->tokens, r->prompt_ids, (size_t)j->n_prompt * sizeof *j->tokens);
    if (j->n_generated)
        memcpy(j->tokens + j->n_prompt, r->generated_ids,
               (size_t)j->n_generated * sizeof *j->tokens);
    j->n_stop = (int)r->n_stop_token_ids;
    j->decode_kvx_len = r->decode_kvx_address.len;
    j->sample = *sp;
    j->seed_set =
        r->sampling && r->sampling->seed_opt_case == PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    j->max_tokens = r->max_tokens;
    j->ignore_eos = r->ignore_eos;
    if (r->slo) {
        j->slo_ttft_ms = r->slo->ttft_ms;
        j->slo_tpot_ms = r->slo->tpot_ms;
    }
    j->call = call;
    j->t_arrive_ns = pds_time_now_ns();
    j->status = PDS_OK;
    j->first_token = -1;
    atomic_init(&j->cancelled, false);
    return j;
}

static void prefill_handler(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    pf_service_t *svc = arg;
    const Pdserve__V1__PrefillRequest *r = (const Pdserve__V1__PrefillRequest *)msg;
    char why[320];
    pds_sample_params_t sp;
    if (!validate(svc, r, &sp, why, sizeof why)) {
        PDS_LOG_INFO(MOD, "prefill_rejected req=%s detail=\"%s\"", r->request_id, why);
        pds_rpc_call_finish(call, PDS_ERR_INVALID_ARG, why);
        return;
    }
    pf_job_t *j = job_new(r, &sp, call);
    if (!j) {
        pds_rpc_call_finish(call, PDS_ERR_NO_MEMORY, "prefill node: no memory for the request");
        return;
    }
    pthread_mutex_lock(&svc->mu);
    if (find_locked(svc, j->request_id, NULL)) {
        pthread_mutex_unlock(&svc->mu);
        snprintf(why, sizeof why, "request %s is already being prefilled here", j->request_id);
        pf_job_free(j);
        pds_rpc_call_finish(call, PDS_ERR_ALREADY_EXISTS, why);
        return;
    }
    track_locked(svc, j);
    svc->live++;
    pthread_mutex_unlock(&svc->mu);
    j->counted = true;
    atomic_fetch_add(&svc->queued_tokens, (long long)j->n_tokens);
    atomic_fetch_add(&svc->queued_reqs, 1);
    PDS_LOG_DEBUG(MOD, "prefill_accepted req=%s tokens=%d decode=%s", j->request_id, j->n_tokens,
                  j->decode_address);
    j->work = PF_WORK_OPEN;
    pf_fifo_push(&svc->work, j);
}

static void prefill_on_cancel(pds_rpc_call_t *call, void *arg)
{
    pf_service_t *svc = arg;
    pthread_mutex_lock(&svc->mu);
    pf_job_t *j = find_locked(svc, NULL, call);
    if (j) cancel_locked(svc, j, "Prefill call cancelled");
    pthread_mutex_unlock(&svc->mu);
}

static void cancel_handler(pds_rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    pf_service_t *svc = arg;
    const Pdserve__V1__CancelRequest *r = (const Pdserve__V1__CancelRequest *)msg;
    Pdserve__V1__CancelReply rep = PDSERVE__V1__CANCEL_REPLY__INIT;
    pthread_mutex_lock(&svc->mu);
    pf_job_t *j = r->request_id && r->request_id[0] ? find_locked(svc, r->request_id, NULL) : NULL;
    if (j) cancel_locked(svc, j, "Cancel from the router");
    pthread_mutex_unlock(&svc->mu);
    rep.found = j != NULL;
    PDS_LOG_INFO(MOD, "cancel req=%s found=%d reason=\"%s\"", r->request_id, (int)rep.found,
                 r->reason ? r->reason : "");
    pds_rpc_call_reply(call, &rep.base);
}

pds_rpc_method_t pf_service_prefill_method(pf_service_t *svc)
{
    return (pds_rpc_method_t){"/pdserve.v1.PrefillNode/Prefill",
                              PDS_RPC_UNARY,
                              &pdserve__v1__prefill_request__descriptor,
                              prefill_handler,
                              prefill_on_cancel,
                              svc};
}

pds_rpc_method_t pf_service_cancel_method(pf_service_t *svc)
{
    return (pds_rpc_method_t){"/pdserve.v1.PrefillNode/Cancel",
                              PDS_RPC_UNARY,
                              &pdserve__v1__cancel_request__descriptor,
                              cancel_handler,
                              NULL,
                              svc};
}

void pf_service_load(void *arg, Pdserve__V1__LoadReport *r)
{
    pf_service_t *svc = arg;
    pf_sched_load_t l;
    pf_sched_load(svc->sched, &l);
    long long qt = atomic_load(&svc->queued_tokens);
    int qr = atomic_load(&svc->queued_reqs);
    r->state =
        svc->state ? (Pdserve__V1__NodeState)*svc->state : PDSERVE__V1__NODE_STATE__NODE_STATE_UP;
    r->queued_prompt_tokens = qt > 0 ? (uint64_t)qt : 0;
    r->queued_requests = qr > 0 ? (uint32_t)qr : 0;
    r->running_seqs = (uint32_t)l.running_seqs;
    r->free_kv_blocks = (uint32_t)l.free_blocks;
    r->total_kv_blocks = (uint32_t)l.total_blocks;
    r->recent_step_ms = l.recent_batch_ms;
}

/* ---- life cycle
 * ----------------------------------------------------------------------------------- */
pds_status_t pf_service_create(const pf_service_params_t *p, pf_service_t **out)
{
    pf_service_t *svc = pds_calloc(1, sizeof *svc);
    if (!svc) return PDS_ERR(PDS_ERR_NO_MEMORY, "prefill service");
    svc->cfg = *p->cfg;
    svc->kvx = p->kvx;
    svc->state = p->state;
    svc->rpc_timeout_ms = p->rpc_timeout_ms > 0 ? p->rpc_timeout_ms : 10000;
    svc->commit_timeout_ms = p->cfg->transfer_timeout_ns / 1000000;
    pds_engine_info(p->engine, &svc->info);
    atomic_init(&svc->queued_tokens, 0);
    atomic_init(&svc->queued_reqs, 0);
    pds_status_t s = pds_kvx_address(p->kvx, &svc->kvx_addr, &svc->kvx_addr_len);
    if (s != PDS_OK) goto undo_state;
    svc->n_workers = p->n_workers > 0 ? p->n_workers : 8;
    svc->workers = pds_calloc((size_t)svc->n_workers, sizeof *svc->workers);
    if (!svc->workers) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "worker table");
        goto undo_state;
    }
    pthread_mutex_init(&svc->mu, NULL);
    pthread_cond_init(&svc->idle, NULL);
    pf_fifo_init(&svc->work);
    pf_sched_params_t sp = {
        .max_batch_tokens = p->cfg->max_batch_tokens,
        .max_batch_seqs = p->cfg->max_batch_seqs,
        .done_fn = on_computed,
        .release_fn = on_released,
        .ctx = svc,
        .kvx = p->kvx,
    };
    s = pf_sched_create(p->engine, &sp, &svc->sched);
    if (s != PDS_OK) goto undo_sync;
    int started = 0;
    for (; started < svc->n_workers; started++)
        if (pthread_create(&svc->workers[started], NULL, pf_worker_main, svc) != 0) break;
    if (started < svc->n_workers) {
        s = PDS_ERR(PDS_ERR_INTERNAL, "cannot start worker thread %d", started);
        pf_fifo_close(&svc->work);
        for (int i = 0; i < started; i++) pthread_join(svc->workers[i], NULL);
        pf_sched_destroy(svc->sched);
        goto undo_sync;
    }
    *out = svc;
    return PDS_OK;
undo_sync:
    pf_fifo_fini(&svc->work);
    pthread_cond_destroy(&svc->idle);
    pthread_mutex_destroy(&svc->mu);
    pds_free(svc->workers);
undo_state:
    pds_free(svc);
    return s;
}

void pf_service_destroy(pf_service_t *svc)
{
    if (!svc) return;
    pthread_mutex_lock(&svc->mu);
    for (pf_job_t *j = svc->tbl_head; j; j = j->tbl_next)
        cancel_locked(svc, j, "prefill node shutting down");
    if (svc->live > 0) PDS_LOG_INFO(MOD, "draining jobs=%d", svc->live);
    while (svc->live > 0) pthread_cond_wait(&svc->idle, &svc->mu);
    pthread_mutex_unlock(&svc->mu);
    pf_fifo_close(&svc->work);
    for (int i = 0; i < svc->n_workers; i++) pthread_join(svc->workers[i], NULL);
    pf_sched_destroy(svc->sched);
    for (int i = 0; i < svc->n_chans; i++) {
        pds_rpc_channel_destroy(svc->chans[i].ch);
        pds_free(svc->chans[i].address);
    }
    pds_free(svc->chans);
    pf_fifo_fini(&svc->work);
    pthread_cond_destroy(&svc->idle);
    pthread_mutex_destroy(&svc->mu);
    pds_free(svc->workers);
    pds_free(svc);
}

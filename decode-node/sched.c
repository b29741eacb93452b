/* sched.c: the decode node's engine loop — commands in, continuous batching, preemption by
 * recompute, tokens out (see sched.h for the lifecycle).
 *
 * One forward per iteration carries every running sequence's next token (n_tokens = 1, sampled at
 * its absolute position, so the tokens equal pds_engine_generate's) plus, in the token budget
 * left, chunks of preempted sequences being recomputed: the engine takes mixed batches, so a
 * recompute never stalls the decode batch for more than its chunk. The trade-off of preemption by
 * recompute (vLLM's default) over swapping: no host copy of the KV to keep, at the price of
 * computing the tokens again — cheap next to the decode steps it unblocks.
 *
 * The victim of a preemption is the sequence committed last (its KV is the youngest investment;
 * earlier requests keep their TPOT). A preempted sequence comes back, oldest first, once its whole
 * KV fits with one block of growth room for each running sequence, so it does not push out the
 * sequences it would then need to preempt.
 */
#include "decode-node/sched_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- sequence table ----------------------------------------------------------------------------
 */
void seq_free(dseq_t *q)
{
    if (!q) return;
    pds_kv_seq_fini(&q->kv);
    pds_free(q->request_id);
    pds_free(q->router_id);
    pds_free(q->xfer_blocks);
    pds_free(q->tokens);
    pds_free(q->gaps);
    pds_free(q->stop);
    pds_free(q);
}

dseq_t *sched_find_request(pds_decode_sched_t *s, const char *request_id)
{
    for (int i = 0; i < s->n_seqs; i++)
        if (strcmp(s->seqs[i]->request_id, request_id) == 0) return s->seqs[i];
    return NULL;
}

dseq_t *sched_find_transfer(pds_decode_sched_t *s, uint64_t transfer_id)
{
    for (int i = 0; i < s->n_seqs; i++)
        if (s->seqs[i]->transfer_id == transfer_id) return s->seqs[i];
    return NULL;
}

pds_status_t sched_add_seq(pds_decode_sched_t *s, dseq_t *q)
{
    if (s->n_seqs == s->cap_seqs) {
        int cap = s->cap_seqs ? 2 * s->cap_seqs : 64;
        dseq_t **n = pds_realloc(s->seqs, (size_t)cap * sizeof *n);
        if (!n) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode node out of memory for a sequence");
        s->seqs = n;
        dseq_t **o = pds_realloc(s->order_buf, (size_t)cap * sizeof *o);
        if (!o) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode node out of memory for a sequence");
        s->order_buf = o;
        s->cap_seqs = cap;
    }
    s->seqs[s->n_seqs++] = q;
    return PDS_OK;
}

void sched_remove_seq(pds_decode_sched_t *s, dseq_t *q)
{
    for (int i = 0; i < s->n_seqs; i++)
        if (s->seqs[i] == q) {
            memmove(&s->seqs[i], &s->seqs[i + 1], (size_t)(s->n_seqs - i - 1) * sizeof *s->seqs);
            s->n_seqs--;
            break;
        }
    seq_free(q);
}

uint32_t seq_next_index(const dseq_t *q)
{
    return (uint32_t)(q->n_generated + (q->n_tok - q->n_xfer));
}

int seq_finish_reason(const pds_decode_sched_t *s, const dseq_t *q)
{
    int32_t t = q->tokens[q->n_tok - 1];
    if (pds_sample_is_stop(t, q->stop, q->n_stop))
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_STOP;
    if (!q->ignore_eos && t == s->info.model.eos_id)
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_EOS;
    if ((int)seq_next_index(q) >= q->max_tokens)
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    if (q->n_tok >= s->info.model.max_context || q->n_tok >= q->cap_tok)
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_CONTEXT;
    return 0;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Frees q's KV (and recompute reservation). */
static void seq_drop_kv(pds_decode_sched_t *s, dseq_t *q)
{
    if (q->resv) pds_kv_pool_release(s->pool, q->resv);
    q->resv = NULL;
    pds_kv_seq_release(&q->kv, s->pool);
}

/* Sends q's last n_new tokens (0 or 1) to its router, with the finish when reason != 0; a finished
 * sequence's KV is freed and the sequence dropped. */
static void seq_emit(pds_decode_sched_t *s, dseq_t *q, int n_new, int reason, const char *error)
{
    uint32_t index = seq_next_index(q) - (uint32_t)n_new;
    if (!reason) {
        pds_decode_streams_add(s->streams, q->router_id, q->request_id,
                               q->tokens + q->n_tok - n_new, n_new, index, NULL);
        return;
    }
    pds_decode_finish_t fin = {.reason = reason, .error = error, .decode_steps = q->steps};
    if (q->t_first_step_ns) fin.queue_ms = (float)((q->t_first_step_ns - q->t_commit_ns) / 1e6);
    if (q->n_gaps > 0) {
        double sum = 0;
        for (int i = 0; i < q->n_gaps; i++) sum += q->gaps[i];
        fin.tpot_mean_ms = (float)(sum / q->n_gaps);
        qsort(q->gaps, (size_t)q->n_gaps, sizeof *q->gaps, cmp_float);
        fin.tpot_p90_ms = q->gaps[(int)((q->n_gaps - 1) * 0.9 + 0.5)];
    }
    pds_decode_streams_add(s->streams, q->router_id, q->request_id, q->tokens + q->n_tok - n_new,
                           n_new, index, &fin);
    const ProtobufCEnumValue *rv =
        protobuf_c_enum_descriptor_get_value(&pdserve__v1__finish_reason__descriptor, reason);
    PDS_LOG_INFO(MOD, "finish req=%s reason=%s outputs=%u steps=%u tpot_ms=%.2f%s%s%s",
                 q->request_id, rv ? rv->name : "?", seq_next_index(q), q->steps,
                 (double)fin.tpot_mean_ms, error ? " error=\"" : "", error ? error : "",
                 error ? "\"" : "");
    seq_drop_kv(s, q);
    s->n_finished++;
    sched_remove_seq(s, q);
}

void sched_end_seq(pds_decode_sched_t *s, dseq_t *q, int reason, const char *error)
{
    seq_emit(s, q, 0, reason, error);
}

/* ---- batching ---------------------------------------------------------------------------------
 */
static int cmp_order(const void *a, const void *b)
{
    const dseq_t *x = *(dseq_t *const *)a, *y = *(dseq_t *const *)b;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Sequences whose state bit is in `mask`, sorted by commit order, into s->order_buf. */
static int collect(pds_decode_sched_t *s, unsigned mask)
{
    int n = 0;
    for (int i = 0; i < s->n_seqs; i++)
        if (mask & (1u << s->seqs[i]->state)) s->order_buf[n++] = s->seqs[i];
    qsort(s->order_buf, (size_t)n, sizeof *s->order_buf, cmp_order);
    return n;
}

#define ACTIVE   ((1u << SEQ_RUNNING) | (1u << SEQ_RECOMPUTE))
#define HOLDS_KV (ACTIVE | (1u << SEQ_WAITING))

static int count_state(const pds_decode_sched_t *s, unsigned mask)
{
    int n = 0;
    for (int i = 0; i < s->n_seqs; i++) n += (mask & (1u << s->seqs[i]->state)) != 0;
    return n;
}

static void preempt(pds_decode_sched_t *s, dseq_t *q)
{
    seq_drop_kv(s, q);
    q->state = SEQ_PREEMPTED;
    s->preemptions++;
    PDS_LOG_INFO(MOD, "preempt req=%s tokens=%d free_blocks=%d", q->request_id, q->n_tok,
                 pds_kv_pool_free_count(s->pool));
}

/* Tokens a RECOMPUTE sequence computes: all but the last (the next decode step feeds it), or, for
 * a local prompt, all of them (the last chunk samples its first output token). */
static int recompute_target(const dseq_t *q)
{
    return q->local_prefill ? q->n_tok : q->n_tok - 1;
}

/* Blocks a preempted sequence (or a local prompt) needs to be recomputed. */
static int recompute_blocks(const pds_decode_sched_t *s, const dseq_t *q)
{
    return PDS_DIV_UP(recompute_target(q), s->info.kv.block_size);
}

/* Moves committed sequences into the batch, then preempted ones whose KV fits again. */
static void admit(pds_decode_sched_t *s)
{
    int active = count_state(s, ACTIVE);
    int n = collect(s, (1u << SEQ_WAITING) | (1u << SEQ_PREEMPTED));
    for (int i = 0; i < n && active < s->max_seqs; i++) {
        dseq_t *q = s->order_buf[i];
        if (q->state == SEQ_WAITING) {
            q->state = SEQ_RUNNING;
            active++;
            continue;
        }
        int need = recompute_blocks(s, q);
        if (need + active > pds_kv_pool_free_count(s->pool)) {
            if (need + 1 > pds_kv_pool_total(s->pool)) {
                char msg[160];
                snprintf(msg, sizeof msg, "%d tokens need %d KV blocks, the pool has %d", q->n_tok,
                         need + 1, pds_kv_pool_total(s->pool));
                sched_end_seq(s, q, PDSERVE__V1__FINISH_REASON__FINISH_REASON_ABORTED, msg);
            }
            break; /* oldest first: the ones behind wait their turn */
        }
        if (pds_kv_pool_reserve(s->pool, need, &q->resv) != PDS_OK) break;
        q->state = SEQ_RECOMPUTE;
        active++;
        PDS_LOG_INFO(MOD, "%s req=%s tokens=%d blocks=%d",
                     q->local_prefill ? "local_prefill" : "recompute", q->request_id,
                     recompute_target(q), need);
    }
}

/* Grows q's KV by one token, preempting the most recently committed sequence that holds KV while
 * the pool is empty. False if q itself was preempted (or failed). */
static bool grow_one(pds_decode_sched_t *s, dseq_t *q)
{
    for (;;) {
        pds_status_t st = pds_kv_seq_grow(&q->kv, s->pool, s->info.kv.block_size, 1, NULL);
        if (st == PDS_OK) return true;
        if (st != PDS_ERR_EXHAUSTED) {
            /* no memory for the table itself: step back and try again as a recompute (ending
             * it here would free q under step()'s feet) */
            PDS_LOG_ERROR(MOD, "grow_failed req=%s status=%s detail=\"%s\"", q->request_id,
                          pds_status_name(st), pds_err_detail());
            preempt(s, q);
            return false;
        }
        dseq_t *victim = q;
        for (int i = 0; i < s->n_seqs; i++) {
            dseq_t *o = s->seqs[i];
            if ((HOLDS_KV & (1u << o->state)) && o->order > victim->order) victim = o;
        }
        preempt(s, victim);
        if (victim == q) return false;
    }
}

/* One forward over the running sequences (1 token each) and recompute chunks. Nothing is freed
 * before the forward (preemption only drops KV), so act[] stays valid until then. Colocated:
 * prefill-first leaves the decodes out while a local prompt is being computed; chunked bounds
 * the whole forward by chunk_tokens. */
static void step(pds_decode_sched_t *s)
{
    int n = collect(s, ACTIVE);
    if (n == 0) return;
    dseq_t **act = s->order_buf;
    int max_tokens = s->info.max_batch_tokens;
    if (s->p.local_mode == PDS_DECODE_LOCAL_CHUNKED)
        max_tokens = PDS_MIN(max_tokens, s->p.chunk_tokens);
    bool prefill_only = false;
    for (int i = 0; i < n && s->p.local_mode == PDS_DECODE_LOCAL_PREFILL_FIRST; i++)
        prefill_only |= act[i]->state == SEQ_RECOMPUTE && act[i]->local_prefill;
    int nb = 0, tokens = 0;
    for (int i = 0; i < n && nb < s->max_seqs && tokens < max_tokens && !prefill_only; i++) {
        dseq_t *q = act[i];
        if (q->state != SEQ_RUNNING || !grow_one(s, q)) continue;
        q->in_tok = q->tokens[q->n_tok - 1];
        s->batch[nb] = (pds_engine_seq_t){.tokens = &q->in_tok,
                                          .n_tokens = 1,
                                          .kv = &q->kv,
                                          .sample = &q->sample,
                                          .token_out = &q->out_tok};
        s->batch_seqs[nb++] = q;
        tokens++;
    }
    for (int i = 0; i < n && nb < s->max_seqs && tokens < max_tokens; i++) {
        dseq_t *q = act[i];
        if (q->state != SEQ_RECOMPUTE) continue;
        int chunk = PDS_MIN(recompute_target(q) - q->kv.n_tokens, max_tokens - tokens);
        if (pds_kv_seq_grow(&q->kv, s->pool, s->info.kv.block_size, chunk, q->resv) != PDS_OK) {
            preempt(s, q); /* the reservation covers it; only a bug lands here */
            continue;
        }
        /* a local prompt's last chunk samples its first token at position n_tok, as a prefill
         * node's forward would */
        bool first = q->local_prefill && q->kv.n_tokens == q->n_tok;
        s->batch[nb] = (pds_engine_seq_t){.tokens = q->tokens + q->kv.n_tokens - chunk,
                                          .n_tokens = chunk,
                                          .kv = &q->kv,
                                          .sample = first ? &q->sample : NULL,
                                          .token_out = first ? &q->out_tok : NULL};
        s->batch_seqs[nb++] = q;
        tokens += chunk;
    }
    if (nb == 0) return;

    int64_t t0 = pds_time_now_ns();
    pds_status_t st = pds_engine_forward(s->e, s->batch, nb, NULL, NULL);
    int64_t t1 = pds_time_now_ns();
    float step_ms = (float)((t1 - t0) / 1e6);
    s->step++;
    if (pds_log_enabled(PDS_LOG_DEBUG)) { /* the step trace latency models are checked against */
        int64_t ctx = 0;
        for (int i = 0; i < nb; i++) ctx += s->batch_seqs[i]->kv.n_tokens;
        PDS_LOG_DEBUG(
            MOD, "step n=%llu seqs=%d tokens=%d context=%lld forward_ms=%.3f since_last_ms=%.3f",
            (unsigned long long)s->step, nb, tokens, (long long)ctx, step_ms,
            s->t_step_end_ns ? (double)(t1 - s->t_step_end_ns) / 1e6 : 0.0);
    }
    s->t_step_end_ns = t1;
    if (st != PDS_OK) {
        char msg[320];
        snprintf(msg, sizeof msg, "decode step failed: %s", pds_err_detail());
        PDS_LOG_ERROR(MOD, "forward_failed seqs=%d tokens=%d status=%s detail=\"%s\"", nb, tokens,
                      pds_status_name(st), pds_err_detail());
        for (int i = 0; i < nb; i++)
            sched_end_seq(s, s->batch_seqs[i], PDSERVE__V1__FINISH_REASON__FINISH_REASON_ABORTED,
                          msg);
        pds_decode_streams_flush(s->streams, s->step, step_ms);
        return;
    }
    for (int i = 0; i < nb; i++) {
        dseq_t *q = s->batch_seqs[i];
        if (q->state == SEQ_RECOMPUTE) {
            if (q->kv.n_tokens == recompute_target(q)) {
                pds_kv_pool_release(s->pool, q->resv);
                q->resv = NULL;
                q->state = SEQ_RUNNING;
                if (q->local_prefill) {
                    /* the first output token: no gap before it; the next ones count from now */
                    q->local_prefill = false;
                    q->tokens[q->n_tok++] = q->out_tok;
                    q->t_first_step_ns = q->t_last_ns = t1;
                    seq_emit(s, q, 1, seq_finish_reason(s, q), NULL);
                }
            }
            continue;
        }
        q->tokens[q->n_tok++] = q->out_tok;
        if (!q->t_first_step_ns) q->t_first_step_ns = t0;
        if (q->n_gaps < q->cap_gaps) q->gaps[q->n_gaps++] = (float)((t1 - q->t_last_ns) / 1e6);
        q->t_last_ns = t1;
        q->steps++;
        seq_emit(s, q, 1, seq_finish_reason(s, q), NULL);
    }
    pds_decode_streams_flush(s->streams, s->step, step_ms);
    s->step_ema_ms = s->step_ema_ms == 0.0f ? step_ms : 0.8f * s->step_ema_ms + 0.2f * step_ms;
}

/* ---- PrefillLocal (colocated)
 * --------------------------------------------------------------------
 */

/* Everything about a local request that needs no free blocks; records the detail. */
static pds_status_t local_validate(const pds_decode_sched_t *s,
                                   const Pdserve__V1__PrefillRequest *r, pds_sample_params_t *sp)
{
    const pds_model_config_t *m = &s->info.model;
    if (s->p.local_mode == PDS_DECODE_LOCAL_OFF)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION,
                       "node %s is a decode node, not colocated: it prefills nothing locally "
                       "([node] role = colocated)",
                       s->node_id);
    if (!r->request_id || !r->request_id[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG, "PrefillLocal without request_id");
    if (!r->router_id || !r->router_id[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG, "PrefillLocal %s without router_id", r->request_id);
    if (r->n_prompt_ids < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "PrefillLocal %s: empty prompt", r->request_id);
    int64_t n = (int64_t)r->n_prompt_ids + (int64_t)r->n_generated_ids;
    if (n + 1 > m->max_context)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "PrefillLocal %s: %lld tokens leave no room for a token in the context "
                       "of %d",
                       r->request_id, (long long)n, m->max_context);
    if (r->max_tokens <= r->n_generated_ids)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "PrefillLocal %s: max_tokens %u must exceed the %zu generated ids",
                       r->request_id, r->max_tokens, r->n_generated_ids);
    for (size_t i = 0; i < (size_t)n; i++) {
        int32_t t = i < r->n_prompt_ids ? r->prompt_ids[i] : r->generated_ids[i - r->n_prompt_ids];
        if (t < 0 || t >= m->vocab)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "PrefillLocal %s: token %zu = %d outside the vocabulary of %d",
                           r->request_id, i, t, m->vocab);
    }
    *sp = pds_sample_default_params();
    if (r->sampling) {
        sp->temperature = r->sampling->temperature;
        sp->top_k = r->sampling->top_k;
        sp->top_p = r->sampling->top_p == 0.0f ? 1.0f : r->sampling->top_p;
        if (r->sampling->seed_opt_case == PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED)
            sp->seed = r->sampling->seed;
    }
    if (pds_sample_params_validate(sp) != PDS_OK)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "PrefillLocal %s: sampling: %s", r->request_id,
                       pds_err_detail());
    return PDS_OK;
}

/* Admits a local request: a sequence with its tokens and no KV, queued like a preempted one. */
static void local_admit(pds_decode_sched_t *s, void *call, const Pdserve__V1__PrefillRequest *r)
{
    pds_sample_params_t sp;
    pds_status_t st = local_validate(s, r, &sp);
    if (st != PDS_OK) {
        PDS_LOG_INFO(MOD, "local_refused req=%s status=%s detail=\"%s\"",
                     r->request_id ? r->request_id : "", pds_status_name(st), pds_err_detail());
        s->p.calls.finish(call, st, pds_err_detail());
        return;
    }
    /* a newer request with the same id supersedes the old one (the router re-placed it here) */
    dseq_t *old = sched_find_request(s, r->request_id);
    if (old) {
        PDS_LOG_WARN(MOD, "local_supersedes req=%s state=%d", r->request_id, (int)old->state);
        if (old->state == SEQ_OPEN || old->state == SEQ_FAILED) {
            xfer_abort(s, old, PDS_ERR_CANCELLED, "superseded by a PrefillLocal");
        } else {
            if (old->resv) pds_kv_pool_release(s->pool, old->resv);
            old->resv = NULL;
            pds_kv_seq_release(&old->kv, s->pool);
        }
        sched_remove_seq(s, old);
    }
    int n = (int)(r->n_prompt_ids + r->n_generated_ids);
    int outputs = (int)(r->max_tokens - r->n_generated_ids);
    dseq_t *q = pds_calloc(1, sizeof *q);
    if (q) {
        pds_kv_seq_init(&q->kv);
        q->cap_tok = (int)PDS_MIN((int64_t)n + outputs, (int64_t)s->info.model.max_context);
        q->cap_gaps = outputs;
        q->request_id = pds_strdup(r->request_id);
        q->router_id = pds_strdup(r->router_id);
        q->tokens = pds_malloc((size_t)q->cap_tok * sizeof *q->tokens);
        q->gaps = pds_malloc((size_t)q->cap_gaps * sizeof *q->gaps);
        q->stop = pds_malloc((r->n_stop_token_ids + 1) * sizeof *q->stop);
    }
    if (!q || !q->request_id || !q->router_id || !q->tokens || !q->gaps || !q->stop ||
        sched_add_seq(s, q) != PDS_OK) {
        seq_free(q);
        s->p.calls.finish(call, PDS_ERR_NO_MEMORY, "decode node out of memory for a sequence");
        return;
    }
    memcpy(q->tokens, r->prompt_ids, r->n_prompt_ids * sizeof *q->tokens);
    if (r->n_generated_ids)
        memcpy(q->tokens + r->n_prompt_ids, r->generated_ids,
               r->n_generated_ids * sizeof *q->tokens);
    q->n_tok = q->n_xfer = n;
    q->n_generated = (int)r->n_generated_ids;
    q->max_tokens = (int)r->max_tokens;
    if (r->n_stop_token_ids)
        memcpy(q->stop, r->stop_token_ids, r->n_stop_token_ids * sizeof *q->stop);
    q->n_stop = (int)r->n_stop_token_ids;
    q->ignore_eos = r->ignore_eos;
    q->sample = sp;
    q->local_prefill = true;
    q->state = SEQ_PREEMPTED; /* admit() starts it once its KV fits */
    q->order = ++s->next_order;
    q->t_commit_ns = q->t_last_ns = pds_time_now_ns();
    PDS_LOG_INFO(MOD, "local req=%s tokens=%d generated=%d max_tokens=%d router=%s", q->request_id,
                 n, q->n_generated, q->max_tokens, q->router_id);
    Pdserve__V1__PrefillReply rep = PDSERVE__V1__PREFILL_REPLY__INIT;
    rep.prefill_node_id = s->node_id;
    s->p.calls.reply(call, &rep.base);
}

/* ---- commands ---------------------------------------------------------------------------------
 */
static pds_status_t submit(pds_decode_sched_t *s, cmd_kind_t kind, void *call,
                           const ProtobufCMessage *req, uint64_t id)
{
    if (atomic_load(&s->stopping))
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "decode node %s is shutting down", s->node_id);
    cmd_t *c = pds_calloc(1, sizeof *c);
    if (!c) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode node out of memory for a command");
    c->kind = kind;
    c->call = call;
    c->req = req;
    c->id = id;
    pds_status_t st = pds_queue_push(s->q, c);
    if (st != PDS_OK) {
        pds_free(c);
        if (st == PDS_ERR_CANCELLED)
            return PDS_ERR(PDS_ERR_UNAVAILABLE, "decode node %s is shutting down", s->node_id);
    }
    return st;
}

pds_status_t pds_decode_sched_open(pds_decode_sched_t *s, void *call,
                                   const Pdserve__V1__OpenTransferRequest *req)
{
    return submit(s, CMD_OPEN, call, &req->base, 0);
}

pds_status_t pds_decode_sched_commit(pds_decode_sched_t *s, void *call,
                                     const Pdserve__V1__CommitTransferRequest *req)
{
    return submit(s, CMD_COMMIT, call, &req->base, 0);
}

pds_status_t pds_decode_sched_cancel(pds_decode_sched_t *s, void *call,
                                     const Pdserve__V1__CancelRequest *req)
{
    return submit(s, CMD_CANCEL, call, &req->base, 0);
}

pds_status_t pds_decode_sched_local(pds_decode_sched_t *s, void *call,
                                    const Pdserve__V1__PrefillRequest *req)
{
    return submit(s, CMD_LOCAL, call, &req->base, 0);
}

pds_status_t pds_decode_sched_stream(pds_decode_sched_t *s, void *call,
                                     const Pdserve__V1__TokenStreamRequest *req, uint64_t stream_id)
{
    if (!req->router_id || !req->router_id[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG, "TokenStream without router_id");
    return submit(s, CMD_STREAM, call, &req->base, stream_id);
}

void pds_decode_sched_stream_gone(pds_decode_sched_t *s, uint64_t stream_id)
{
    cmd_t *c = pds_calloc(1, sizeof *c);
    if (!c) return; /* the next send finds the call cancelled and drops it */
    c->kind = CMD_STREAM_GONE;
    c->id = stream_id;
    if (pds_queue_push(s->q, c) != PDS_OK) pds_free(c); /* stopping: finish_all releases it */
}

/* Runs one command; false for CMD_STOP. */
static bool handle(pds_decode_sched_t *s, cmd_t *c)
{
    bool go = true;
    switch (c->kind) {
    case CMD_OPEN:
        xfer_open(s, c->call, (const Pdserve__V1__OpenTransferRequest *)c->req);
        break;
    case CMD_COMMIT:
        xfer_commit(s, c->call, (const Pdserve__V1__CommitTransferRequest *)c->req);
        break;
    case CMD_CANCEL:
        xfer_cancel(s, c->call, (const Pdserve__V1__CancelRequest *)c->req);
        break;
    case CMD_STREAM:
        pds_decode_streams_attach(s->streams,
                                  ((const Pdserve__V1__TokenStreamRequest *)c->req)->router_id,
                                  c->call, c->id);
        pds_decode_streams_flush(s->streams, s->step, 0.0f);
        break;
    case CMD_STREAM_GONE:
        pds_decode_streams_gone(s->streams, c->id);
        break;
    case CMD_LOCAL:
        local_admit(s, c->call, (const Pdserve__V1__PrefillRequest *)c->req);
        break;
    case CMD_KVX_DONE:
        xfer_done(s, c->id);
        break;
    case CMD_STOP:
        go = false;
        break;
    }
    pds_free(c);
    return go;
}

/* Answers a command that arrived too late to run. */
static void refuse(pds_decode_sched_t *s, cmd_t *c)
{
    char msg[160];
    snprintf(msg, sizeof msg, "decode node %s is shutting down", s->node_id);
    switch (c->kind) {
    case CMD_OPEN:
    case CMD_COMMIT:
    case CMD_CANCEL:
    case CMD_STREAM:
    case CMD_LOCAL:
        s->p.calls.finish(c->call, PDS_ERR_UNAVAILABLE, msg);
        break;
    case CMD_STREAM_GONE:
        pds_decode_streams_gone(s->streams, c->id);
        break;
    default:
        break;
    }
    pds_free(c);
}

/* ---- loop -------------------------------------------------------------------------------------
 */
static void publish(pds_decode_sched_t *s, bool stopped)
{
    pds_decode_stats_t st = {0};
    for (int i = 0; i < s->n_seqs; i++) {
        const dseq_t *q = s->seqs[i];
        switch (q->state) {
        case SEQ_RUNNING:
        case SEQ_RECOMPUTE:
            st.running++;
            st.context_tokens += q->n_tok;
            if (q->local_prefill) st.queued_prompt_tokens += q->n_tok - q->kv.n_tokens;
            break;
        case SEQ_WAITING:
        case SEQ_PREEMPTED:
            st.waiting++;
            if (q->local_prefill) st.queued_prompt_tokens += q->n_tok;
            break;
        case SEQ_OPEN:
            st.open_transfers++;
            break;
        default:
            break;
        }
    }
    st.free_blocks = pds_kv_pool_free_count(s->pool);
    st.reserved_blocks = pds_kv_pool_reserved_count(s->pool);
    st.total_blocks = pds_kv_pool_total(s->pool);
    st.recent_step_ms = s->step_ema_ms;
    st.steps = s->step;
    st.preemptions = s->preemptions;
    st.finished = s->n_finished;
    st.streams = pds_decode_streams_open_count(s->streams);
    st.pending_tokens = pds_decode_streams_pending(s->streams);
    st.stopped = stopped;
    pthread_mutex_lock(&s->snap_mu);
    s->snap = st;
    pthread_mutex_unlock(&s->snap_mu);
}

/* One iteration; false once CMD_STOP was seen. may_block: wait on the queue when idle. */
static bool iterate(pds_decode_sched_t *s, bool may_block)
{
    admit(s);
    double wait_ms = 0;
    if (may_block && count_state(s, ACTIVE) == 0) {
        int64_t next = xfer_deadlines(s, pds_time_now_ns());
        wait_ms = next == INT64_MAX ? -1.0 : (double)next / 1e6 + 0.01;
        /* tokens held back by a router's full send queue: retry now and then */
        if (pds_decode_streams_pending(s->streams) > 0 &&
            pds_decode_streams_open_count(s->streams) > 0 && (wait_ms < 0 || wait_ms > 100))
            wait_ms = 100;
    }
    void *item = NULL;
    bool go = true;
    pds_status_t st = pds_queue_pop(s->q, wait_ms, &item);
    while (st == PDS_OK && go) {
        go = handle(s, item);
        if (go) st = pds_queue_pop(s->q, 0, &item);
    }
    if (!go || st == PDS_ERR_CANCELLED) return false;
    xfer_deadlines(s, pds_time_now_ns());
    admit(s);
    step(s);
    /* what commands produced outside a step (a cancel's finish, a finish at commit) */
    pds_decode_streams_flush(s->streams, s->step, 0.0f);
    publish(s, false);
    return true;
}

/* The end: see pds_decode_sched_stop. */
static void shutdown_all(pds_decode_sched_t *s)
{
    atomic_store(&s->stopping, true);
    pds_queue_close(s->q);
    void *item;
    while (pds_queue_pop(s->q, 0, &item) == PDS_OK) refuse(s, item);
    int aborted = 0;
    while (s->n_seqs > 0) {
        dseq_t *q = s->seqs[s->n_seqs - 1];
        if (q->state == SEQ_OPEN || q->state == SEQ_FAILED) {
            xfer_abort(s, q, PDS_ERR_UNAVAILABLE, "decode node is shutting down");
            sched_remove_seq(s, q);
        } else {
            sched_end_seq(s, q, PDSERVE__V1__FINISH_REASON__FINISH_REASON_ABORTED,
                          "decode node shutting down");
            aborted++;
        }
    }
    pds_decode_streams_finish_all(s->streams, PDS_OK, "decode node shutting down");
    PDS_LOG_INFO(MOD, "stopped node=%s aborted=%d free_blocks=%d total_blocks=%d", s->node_id,
                 aborted, pds_kv_pool_free_count(s->pool), pds_kv_pool_total(s->pool));
    publish(s, true);
}

static void *engine_main(void *arg)
{
    pds_decode_sched_t *s = arg;
    while (iterate(s, true)) {
    }
    shutdown_all(s);
    return NULL;
}

bool pds_decode_sched_run_once(pds_decode_sched_t *s)
{
    if (s->stopped) return false;
    if (!iterate(s, false)) {
        shutdown_all(s);
        s->stopped = true;
        return false;
    }
    return count_state(s, ACTIVE) > 0 || pds_queue_len(s->q) > 0;
}

/* ---- create / destroy -------------------------------------------------------------------------
 */
pds_status_t pds_decode_sched_create(const pds_decode_sched_params_t *p, pds_decode_sched_t **out)
{
    if (!p || !out || !p->engine || !p->kvx || !p->node_id || !p->kvx_backend || !p->kvx_address ||
        !p->pool_blob || p->transfer_timeout_ms <= 0 || !p->calls.send || !p->calls.reply ||
        !p->calls.finish)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "decode scheduler: missing parameters");
    if (p->local_mode < PDS_DECODE_LOCAL_OFF || p->local_mode > PDS_DECODE_LOCAL_CHUNKED ||
        (p->local_mode == PDS_DECODE_LOCAL_CHUNKED && p->chunk_tokens < 1))
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "decode scheduler: local mode %d with chunk_tokens %d (chunked needs >= 1)",
                       p->local_mode, p->chunk_tokens);
    pds_decode_sched_t *s = pds_calloc(1, sizeof *s);
    if (!s) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode scheduler");
    s->p = *p;
    if (s->p.commit_timeout_ms <= 0) s->p.commit_timeout_ms = p->transfer_timeout_ms;
    if (s->p.max_buffered_tokens <= 0) s->p.max_buffered_tokens = 65536;
    s->e = p->engine;
    s->pool = pds_engine_kv_pool(s->e);
    pds_engine_info(s->e, &s->info);
    s->max_seqs = s->info.max_batch_seqs;
    if (p->max_batch_seqs > 0 && p->max_batch_seqs < s->max_seqs) s->max_seqs = p->max_batch_seqs;
    /* Transfer ids differ across restarts of the node, so a commit meant for a previous life
     * of it is NOT_FOUND rather than adopting someone else's blocks. */
    s->next_transfer_id = (pds_mix64((uint64_t)pds_time_wall_ns()) >> 24) + 1;
    atomic_init(&s->stopping, false);
    pthread_mutex_init(&s->snap_mu, NULL);
    pds_status_t st = PDS_ERR(PDS_ERR_NO_MEMORY, "decode scheduler state");
    s->node_id = pds_strdup(p->node_id);
    s->kvx_backend = pds_strdup(p->kvx_backend);
    s->batch = pds_calloc((size_t)s->max_seqs, sizeof *s->batch);
    s->batch_seqs = pds_calloc((size_t)s->max_seqs, sizeof *s->batch_seqs);
    s->order_buf = pds_calloc(64, sizeof *s->order_buf);
    s->seqs = pds_calloc(64, sizeof *s->seqs);
    s->cap_seqs = 64;
    if (!s->node_id || !s->kvx_backend || !s->batch || !s->batch_seqs || !s->order_buf || !s->seqs)
        goto fail;
    st = pds_queue_create(&s->q);
    if (st != PDS_OK) goto fail;
    st = pds_decode_streams_create(s->node_id, &p->calls, s->p.max_buffered_tokens, &s->streams);
    if (st != PDS_OK) goto fail;
    s->p.node_id = s->node_id;
    s->p.kvx_backend = s->kvx_backend;
    publish(s, false);
    *out = s;
    return PDS_OK;
fail:
    pds_decode_sched_destroy(s);
    return st;
}

pds_status_t pds_decode_sched_start(pds_decode_sched_t *s)
{
    if (s->started || s->stopped)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "decode scheduler already started");
    if (pthread_create(&s->thread, NULL, engine_main, s) != 0)
        return PDS_ERR(PDS_ERR_INTERNAL, "cannot start the engine thread");
    s->started = true;
    PDS_LOG_INFO(MOD,
                 "engine_loop_started node=%s max_batch_seqs=%d max_batch_tokens=%d "
                 "blocks=%d block_size=%d",
                 s->node_id, s->max_seqs, s->info.max_batch_tokens, s->info.kv.n_blocks,
                 s->info.kv.block_size);
    return PDS_OK;
}

void pds_decode_sched_stop(pds_decode_sched_t *s)
{
    if (!s || s->stopped) return;
    atomic_store(&s->stopping, true);
    if (s->started) {
        /* CMD_STOP behind what is queued; without memory for it, closing the queue stops the
         * loop too (its pop reports CANCELLED once the queue is empty). */
        cmd_t *c = pds_calloc(1, sizeof *c);
        if (c) c->kind = CMD_STOP;
        if (!c || pds_queue_push(s->q, c) != PDS_OK) {
            pds_free(c);
            pds_queue_close(s->q);
        }
        pthread_join(s->thread, NULL);
    } else if (s->q && s->streams) {
        shutdown_all(s);
    }
    s->stopped = true;
}

void pds_decode_sched_destroy(pds_decode_sched_t *s)
{
    if (!s) return;
    if (s->q && s->streams) pds_decode_sched_stop(s);
    for (int i = 0; i < s->n_seqs; i++) seq_free(s->seqs[i]);
    pds_decode_streams_destroy(s->streams);
    pds_queue_destroy(s->q);
    pthread_mutex_destroy(&s->snap_mu);
    pds_free(s->seqs);
    pds_free(s->order_buf);
    pds_free(s->batch);
    pds_free(s->batch_seqs);
    pds_free(s->node_id);
    pds_free(s->kvx_backend);
    pds_free(s);
}

/* ---- load -------------------------------------------------------------------------------------
 */
void pds_decode_sched_snapshot(pds_decode_sched_t *s, pds_decode_stats_t *out)
{
    pthread_mutex_lock(&s->snap_mu);
    *out = s->snap;
    pthread_mutex_unlock(&s->snap_mu);
}

void pds_decode_sched_load(void *sched, Pdserve__V1__LoadReport *r)
{
    pds_decode_stats_t st;
    pds_decode_sched_snapshot(sched, &st);
    r->state = st.stopped || atomic_load(&((pds_decode_sched_t *)sched)->stopping)
                   ? PDSERVE__V1__NODE_STATE__NODE_STATE_DRAINING
                   : PDSERVE__V1__NODE_STATE__NODE_STATE_UP;
    r->queued_prompt_tokens = (uint64_t)st.queued_prompt_tokens;
    r->queued_requests = (uint32_t)st.waiting;
    r->running_seqs = (uint32_t)st.running;
    r->context_tokens = (uint64_t)st.context_tokens;
    r->free_kv_blocks = (uint32_t)st.free_blocks;
    r->reserved_kv_blocks = (uint32_t)st.reserved_blocks;
    r->total_kv_blocks = (uint32_t)st.total_blocks;
    r->recent_step_ms = st.recent_step_ms;
}

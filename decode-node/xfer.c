/* xfer.c: the receiving end of a KV transfer on the decode node — OpenTransfer (validate, allocate
 * blocks, pds_kvx_expect, reply where to write), CommitTransfer (adopt the blocks once kvx says
 * every layer arrived and verified; parked, never blocking, while the data is still in flight),
 * Cancel, kvx completion events and deadlines. Engine thread only.
 *
 * Blocks of a transfer belong to the transfer until commit adopts them into the sequence's KV
 * table; every other exit (kvx error, timeout, cancel, a newer OpenTransfer for the same request,
 * shutdown) closes the kvx recv handle first — so no late write can land in a block after it is
 * freed — and then frees them. A transfer that failed before its commit stays as a tombstone until
 * its commit deadline, so the prefill node's CommitTransfer learns the real error (DATA_LOSS,
 * DEADLINE_EXCEEDED, ...) instead of NOT_FOUND.
 */
#include "decode-node/sched_internal.h"

#include <stdio.h>
#include <string.h>

static int64_t ms_to_ns(int64_t ms)
{
    return ms * 1000000LL;
}

static Pdserve__V1__KvDtype kv_dtype_wire(pds_dtype_t d)
{
    switch (d) {
    case PDS_DTYPE_F32:
        return PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    case PDS_DTYPE_BF16:
        return PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16;
    case PDS_DTYPE_F16:
        return PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16;
    }
    return PDSERVE__V1__KV_DTYPE__KV_DTYPE_UNSPECIFIED;
}

static const char *kv_dtype_text(int d)
{
    switch (d) {
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32:
        return "f32";
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16:
        return "bf16";
    case PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16:
        return "f16";
    default:
        return "unspecified";
    }
}

/* ---- OpenTransfer -------------------------------------------------------------------------------
 */

/* Checks everything about the request that does not depend on free blocks. Records the detail. */
static pds_status_t open_validate(const pds_decode_sched_t *s,
                                  const Pdserve__V1__OpenTransferRequest *r,
                                  pds_sample_params_t *sp)
{
    const pds_model_config_t *m = &s->info.model;
    const pds_kv_layout_t *kv = &s->info.kv;
    if (!r->request_id || !r->request_id[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG, "OpenTransfer without request_id");
    if (!r->router_id || !r->router_id[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "OpenTransfer %s without router_id (whose "
                       "TokenStream gets the tokens?)",
                       r->request_id);
    if (!r->kv)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "OpenTransfer %s without KV geometry", r->request_id);
    Pdserve__V1__KvDtype dt = kv_dtype_wire(s->info.kv_dtype);
    if (r->kv->n_layers != (uint32_t)kv->n_layers ||
        r->kv->n_kv_heads != (uint32_t)kv->n_kv_heads ||
        r->kv->head_dim != (uint32_t)kv->head_dim ||
        r->kv->block_size != (uint32_t)kv->block_size || r->kv->dtype != dt)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION,
                       "KV geometry mismatch: sender has layers=%u kv_heads=%u head_dim=%u "
                       "block_size=%u dtype=%s, decode node %s has layers=%d kv_heads=%d "
                       "head_dim=%d block_size=%d dtype=%s",
                       r->kv->n_layers, r->kv->n_kv_heads, r->kv->head_dim, r->kv->block_size,
                       kv_dtype_text(r->kv->dtype), s->node_id, kv->n_layers, kv->n_kv_heads,
                       kv->head_dim, kv->block_size, kv_dtype_text(dt));
    if (!r->kvx_backend || strcmp(r->kvx_backend, s->kvx_backend) != 0)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION,
                       "kvx backend mismatch: sender uses '%s', decode node %s uses '%s'",
                       r->kvx_backend ? r->kvx_backend : "", s->node_id, s->kvx_backend);
    if (r->n_tokens < 1 || r->n_tokens != r->n_token_ids)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "OpenTransfer %s: n_tokens %u must be >= 1 and equal len(token_ids) %zu",
                       r->request_id, r->n_tokens, r->n_token_ids);
    if ((int64_t)r->n_tokens + 1 > m->max_context)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "OpenTransfer %s: %u tokens leave no room for a token in the context of %d",
                       r->request_id, r->n_tokens, m->max_context);
    for (size_t i = 0; i < r->n_token_ids; i++)
        if (r->token_ids[i] < 0 || r->token_ids[i] >= m->vocab)
            return PDS_ERR(PDS_ERR_INVALID_ARG,
                           "OpenTransfer %s: token_ids[%zu] = %d outside the vocabulary of %d",
                           r->request_id, i, r->token_ids[i], m->vocab);
    if (r->n_generated >= r->n_tokens)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "OpenTransfer %s: n_generated %u leaves no prompt in %u tokens",
                       r->request_id, r->n_generated, r->n_tokens);
    if (r->max_tokens <= r->n_generated)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "OpenTransfer %s: max_tokens %u must exceed n_generated %u", r->request_id,
                       r->max_tokens, r->n_generated);
    *sp = pds_sample_default_params();
    if (r->sampling) {
        sp->temperature = r->sampling->temperature;
        sp->top_k = r->sampling->top_k;
        sp->top_p = r->sampling->top_p == 0.0f ? 1.0f : r->sampling->top_p;
        if (r->sampling->seed_opt_case == PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED)
            sp->seed = r->sampling->seed;
    }
    if (pds_sample_params_validate(sp) != PDS_OK)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "OpenTransfer %s: sampling: %s", r->request_id,
                       pds_err_detail());
    return PDS_OK;
}

/* The sequence record of a validated request (no blocks yet). */
static dseq_t *seq_new(const pds_decode_sched_t *s, const Pdserve__V1__OpenTransferRequest *r,
                       const pds_sample_params_t *sp)
{
    dseq_t *q = pds_calloc(1, sizeof *q);
    if (!q) return NULL;
    pds_kv_seq_init(&q->kv);
    int outputs = (int)(r->max_tokens - r->n_generated);
    q->cap_tok = (int)PDS_MIN((int64_t)r->n_tokens + outputs, (int64_t)s->info.model.max_context);
    q->cap_gaps = outputs;
    q->request_id = pds_strdup(r->request_id);
    q->router_id = pds_strdup(r->router_id);
    q->tokens = pds_malloc((size_t)q->cap_tok * sizeof *q->tokens);
    q->gaps = pds_malloc((size_t)q->cap_gaps * sizeof *q->gaps);
    q->stop = pds_malloc((r->n_stop_token_ids + 1) * sizeof *q->stop);
    if (!q->request_id || !q->router_id || !q->tokens || !q->gaps || !q->stop) {
        seq_free(q);
        return NULL;
    }
    memcpy(q->tokens, r->token_ids, r->n_token_ids * sizeof *q->tokens);
    q->n_tok = q->n_xfer = (int)r->n_tokens;
    q->n_generated = (int)r->n_generated;
    q->max_tokens = (int)r->max_tokens;
    if (r->n_stop_token_ids)
        memcpy(q->stop, r->stop_token_ids, r->n_stop_token_ids * sizeof *q->stop);
    q->n_stop = (int)r->n_stop_token_ids;
    q->ignore_eos = r->ignore_eos;
    q->sample = *sp;
    q->state = SEQ_OPEN;
    return q;
}

/* Closes the recv handle (no late write can land after this) and frees the transfer's blocks. */
static void xfer_release(pds_decode_sched_t *s, dseq_t *q)
{
    pds_kvx_recv_close(q->recv);
    q->recv = NULL;
    if (q->n_xfer_blocks > 0 &&
        pds_kv_pool_free(s->pool, q->n_xfer_blocks, q->xfer_blocks) != PDS_OK)
        PDS_LOG_ERROR(MOD, "free_failed req=%s detail=\"%s\"", q->request_id, pds_err_detail());
    q->n_xfer_blocks = 0;
}

void xfer_abort(pds_decode_sched_t *s, dseq_t *q, pds_status_t st, const char *why)
{
    xfer_release(s, q);
    if (q->commit_call) {
        s->p.calls.finish(q->commit_call, st, why);
        q->commit_call = NULL;
    }
}

/* The transfer failed before its commit: free its blocks, answer a parked commit, or keep a
 * tombstone for the commit still to come. */
static void xfer_fail(pds_decode_sched_t *s, dseq_t *q, pds_status_t st, const char *detail)
{
    PDS_LOG_WARN(MOD, "transfer_failed req=%s transfer=%llu status=%s detail=\"%s\"", q->request_id,
                 (unsigned long long)q->transfer_id, pds_status_name(st), detail);
    snprintf(q->fail_detail, sizeof q->fail_detail, "%s", detail);
    q->fail_status = st;
    xfer_abort(s, q, st, q->fail_detail);
    q->state = SEQ_FAILED;
    q->deadline_ns = pds_time_now_ns() + ms_to_ns(s->p.commit_timeout_ms);
}

void xfer_open(pds_decode_sched_t *s, void *call, const Pdserve__V1__OpenTransferRequest *req)
{
    pds_sample_params_t sp;
    const void *pool_blob = NULL;
    size_t pool_blob_len = 0;
    pds_status_t st = open_validate(s, req, &sp);
    /* The pool blob for this sender (NCCL: names the pair's communicator, made on first use). */
    if (st == PDS_OK) {
        st = pds_kvx_pool_blob_for(s->p.kvx, req->kvx_sender_address.data,
                                   req->kvx_sender_address.len, &pool_blob, &pool_blob_len);
        if (st == PDS_ERR_PARSE || st == PDS_ERR_INVALID_ARG)
            st = PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "sender's kvx address: %s", pds_err_detail());
    }
    if (st != PDS_OK) {
        PDS_LOG_INFO(MOD, "open_refused req=%s status=%s detail=\"%s\"",
                     req->request_id ? req->request_id : "", pds_status_name(st), pds_err_detail());
        s->p.calls.finish(call, st, pds_err_detail());
        return;
    }
    /* A newer OpenTransfer for a request this node still holds supersedes it: the prefill node
     * retried, or the router re-placed the request here after losing the stream. Nothing is sent
     * for the old one (the router already moved on). */
    dseq_t *old = sched_find_request(s, req->request_id);
    if (old) {
        PDS_LOG_WARN(MOD, "open_supersedes req=%s old_transfer=%llu", req->request_id,
                     (unsigned long long)old->transfer_id);
        if (old->state == SEQ_OPEN || old->state == SEQ_FAILED)
            xfer_abort(s, old, PDS_ERR_CANCELLED, "superseded by a newer OpenTransfer");
        else {
            if (old->resv) pds_kv_pool_release(s->pool, old->resv);
            old->resv = NULL;
            pds_kv_seq_release(&old->kv, s->pool);
        }
        sched_remove_seq(s, old);
    }

    dseq_t *q = seq_new(s, req, &sp);
    if (!q) {
        s->p.calls.finish(call, PDS_ERR_NO_MEMORY, "decode node out of memory for a sequence");
        return;
    }
    int bs = s->info.kv.block_size;
    int nb = PDS_DIV_UP(q->n_xfer, bs);
    q->xfer_blocks = pds_malloc((size_t)nb * sizeof *q->xfer_blocks);
    if (!q->xfer_blocks) {
        seq_free(q);
        s->p.calls.finish(call, PDS_ERR_NO_MEMORY, "decode node out of memory for a block table");
        return;
    }
    int free_blocks = pds_kv_pool_free_count(s->pool);
    st = pds_kv_pool_alloc(s->pool, nb, NULL, q->xfer_blocks);
    if (st != PDS_OK) {
        char msg[256];
        snprintf(msg, sizeof msg, "decode node %s has %d free blocks, needs %d for %d tokens",
                 s->node_id, free_blocks, nb, q->n_xfer);
        PDS_LOG_INFO(MOD, "open_refused req=%s status=%s detail=\"%s\"", q->request_id,
                     pds_status_name(PDS_ERR_EXHAUSTED), msg);
        seq_free(q);
        s->p.calls.finish(call, PDS_ERR_EXHAUSTED, msg);
        return;
    }
    q->n_xfer_blocks = nb;
    q->transfer_id = s->next_transfer_id++;
    st = pds_kvx_expect(s->p.kvx, q->transfer_id, nb, q->xfer_blocks, s->p.transfer_timeout_ms,
                        xfer_notify, s, &q->recv);
    if (st == PDS_OK) st = sched_add_seq(s, q);
    if (st != PDS_OK) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", pds_err_detail());
        xfer_release(s, q);
        seq_free(q);
        s->p.calls.finish(call, st, msg);
        return;
    }
    q->deadline_ns = pds_time_now_ns() + ms_to_ns(s->p.transfer_timeout_ms);

    /* (n_layers) base address of each layer's block array, for RMA senders */
    uint64_t *layer_addrs = pds_malloc((size_t)s->info.kv.n_layers * sizeof *layer_addrs);
    size_t n_addrs = 0;
    for (int l = 0; layer_addrs && l < s->info.kv.n_layers; l++) {
        void *base;
        size_t bytes;
        bool dev;
        if (pds_engine_kv_layer_memory(s->e, l, &base, &bytes, &dev) != PDS_OK) break;
        layer_addrs[n_addrs++] = (uint64_t)(uintptr_t)base;
    }
    Pdserve__V1__OpenTransferReply rep = PDSERVE__V1__OPEN_TRANSFER_REPLY__INIT;
    rep.transfer_id = q->transfer_id;
    rep.n_block_ids = (size_t)nb;
    rep.block_ids = q->xfer_blocks;
    rep.kvx_receiver_address.data = (uint8_t *)s->p.kvx_address;
    rep.kvx_receiver_address.len = s->p.kvx_address_len;
    rep.kvx_rkey.data = (uint8_t *)pool_blob;
    rep.kvx_rkey.len = pool_blob_len;
    rep.n_kvx_layer_addrs = n_addrs;
    rep.kvx_layer_addrs = layer_addrs;
    rep.block_size = (uint32_t)bs;
    rep.kv_dtype = kv_dtype_wire(s->info.kv_dtype);
    PDS_LOG_INFO(MOD, "open req=%s transfer=%llu tokens=%d blocks=%d runs=%d router=%s prefill=%s",
                 q->request_id, (unsigned long long)q->transfer_id, q->n_xfer, nb,
                 pds_kv_ids_runs(nb, q->xfer_blocks), q->router_id,
                 req->prefill_node_id ? req->prefill_node_id : "");
    s->p.calls.reply(call, &rep.base);
    pds_free(layer_addrs);
}

/* ---- CommitTransfer ----------------------------------------------------------------------------
 */

/* The data is in place and a commit is parked: adopt the blocks, append the first token, queue the
 * sequence for the batch and answer the commit. */
static void commit_now(pds_decode_sched_t *s, dseq_t *q)
{
    void *call = q->commit_call;
    int32_t first = q->commit_req->first_token;
    q->commit_call = NULL;
    q->commit_req = NULL;
    pds_kvx_recv_close(q->recv);
    q->recv = NULL;
    pds_status_t st = pds_kv_seq_adopt(&q->kv, q->n_xfer_blocks, q->xfer_blocks, q->n_xfer);
    if (st != PDS_OK) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", pds_err_detail());
        xfer_release(s, q);
        sched_remove_seq(s, q);
        s->p.calls.finish(call, st, msg);
        return;
    }
    q->n_xfer_blocks = 0; /* the KV table owns them now */
    q->tokens[q->n_tok++] = first;
    q->state = SEQ_WAITING;
    q->order = ++s->next_order;
    q->t_commit_ns = q->t_last_ns = pds_time_now_ns();

    const pds_kv_layout_t *kv = &s->info.kv;
    Pdserve__V1__CommitReply rep = PDSERVE__V1__COMMIT_REPLY__INIT;
    rep.received_bytes =
        (uint64_t)kv->n_layers * (uint64_t)q->kv.n_blocks * (uint64_t)pds_kv_block_bytes(kv);
    PDS_LOG_INFO(MOD, "commit req=%s transfer=%llu first_token=%d index=%d", q->request_id,
                 (unsigned long long)q->transfer_id, first, q->n_generated);
    s->p.calls.reply(call, &rep.base);

    /* The prefill node normally sends Cancel instead when the first token already ends the
     * request; if it committed anyway, end it here (finished, no more tokens). */
    int reason = seq_finish_reason(s, q);
    if (reason) sched_end_seq(s, q, reason, NULL);
}

void xfer_commit(pds_decode_sched_t *s, void *call, const Pdserve__V1__CommitTransferRequest *req)
{
    char msg[320];
    dseq_t *q = sched_find_transfer(s, req->transfer_id);
    if (!q || (q->state != SEQ_OPEN && q->state != SEQ_FAILED)) {
        if (q)
            snprintf(msg, sizeof msg, "transfer %llu of request %s is already committed",
                     (unsigned long long)req->transfer_id, q->request_id);
        else
            snprintf(msg, sizeof msg,
                     "unknown transfer %llu on decode node %s (never opened, cancelled or expired)",
                     (unsigned long long)req->transfer_id, s->node_id);
        s->p.calls.finish(call, q ? PDS_ERR_FAILED_PRECONDITION : PDS_ERR_NOT_FOUND, msg);
        return;
    }
    if (req->request_id && req->request_id[0] && strcmp(req->request_id, q->request_id) != 0) {
        snprintf(msg, sizeof msg, "transfer %llu belongs to request %s, not %s",
                 (unsigned long long)req->transfer_id, q->request_id, req->request_id);
        s->p.calls.finish(call, PDS_ERR_INVALID_ARG, msg);
        return;
    }
    if (q->state == SEQ_FAILED) {
        s->p.calls.finish(call, q->fail_status, q->fail_detail);
        sched_remove_seq(s, q);
        return;
    }
    if (q->commit_call) {
        snprintf(msg, sizeof msg, "a CommitTransfer for transfer %llu is already pending",
                 (unsigned long long)req->transfer_id);
        s->p.calls.finish(call, PDS_ERR_FAILED_PRECONDITION, msg);
        return;
    }
    if (req->first_token < 0 || req->first_token >= s->info.model.vocab) {
        snprintf(msg, sizeof msg, "CommitTransfer %s: first_token %d outside the vocabulary of %d",
                 q->request_id, req->first_token, s->info.model.vocab);
        xfer_abort(s, q, PDS_ERR_INVALID_ARG, msg);
        sched_remove_seq(s, q);
        s->p.calls.finish(call, PDS_ERR_INVALID_ARG, msg);
        return;
    }
    q->commit_call = call;
    q->commit_req = req;
    pds_status_t st = q->data_ok ? PDS_OK : pds_kvx_recv_poll(q->recv);
    if (st == PDS_OK) {
        q->data_ok = true;
        commit_now(s, q);
    } else if (st == PDS_IN_PROGRESS) {
        PDS_LOG_DEBUG(MOD, "commit_parked req=%s transfer=%llu", q->request_id,
                      (unsigned long long)q->transfer_id);
    } else {
        xfer_fail(s, q, st, pds_err_detail()); /* answers the parked commit */
        sched_remove_seq(s, q);
    }
}

/* ---- Cancel ---------------------------------------------------------------------------------- */
void xfer_cancel(pds_decode_sched_t *s, void *call, const Pdserve__V1__CancelRequest *req)
{
    Pdserve__V1__CancelReply rep = PDSERVE__V1__CANCEL_REPLY__INIT;
    dseq_t *q = req->request_id ? sched_find_request(s, req->request_id) : NULL;
    if (q) {
        rep.found = true;
        PDS_LOG_INFO(MOD, "cancel req=%s state=%d reason=\"%s\"", q->request_id, (int)q->state,
                     req->reason ? req->reason : "");
        if (q->state == SEQ_OPEN || q->state == SEQ_FAILED) {
            xfer_abort(s, q, PDS_ERR_CANCELLED, "request cancelled");
            sched_remove_seq(s, q);
        } else {
            sched_end_seq(s, q, PDSERVE__V1__FINISH_REASON__FINISH_REASON_CANCELLED, NULL);
        }
    }
    s->p.calls.reply(call, &rep.base);
}

/* ---- kvx events and deadlines -----------------------------------------------------------------
 */
void xfer_notify(void *ctx, uint64_t transfer_id, pds_status_t status)
{
    pds_decode_sched_t *s = ctx;
    cmd_t *c = pds_calloc(1, sizeof *c);
    if (!c) return; /* the transfer's deadline makes the loop poll it anyway */
    c->kind = CMD_KVX_DONE;
    c->id = transfer_id;
    c->status = status;
    if (pds_queue_push(s->q, c) != PDS_OK) pds_free(c);
}

/* Reads q's recv state; acts on a final one. */
static void xfer_check(pds_decode_sched_t *s, dseq_t *q, int64_t now)
{
    pds_status_t st = pds_kvx_recv_poll(q->recv);
    if (st == PDS_IN_PROGRESS) return;
    if (st == PDS_OK) {
        q->data_ok = true;
        q->deadline_ns = now + ms_to_ns(s->p.commit_timeout_ms);
        if (q->commit_call) commit_now(s, q);
        return;
    }
    bool parked = q->commit_call != NULL;
    xfer_fail(s, q, st, pds_err_detail());
    if (parked) sched_remove_seq(s, q);
}

void xfer_done(pds_decode_sched_t *s, uint64_t transfer_id)
{
    dseq_t *q = sched_find_transfer(s, transfer_id);
    if (!q || q->state != SEQ_OPEN || q->data_ok) return; /* cancelled or already handled */
    xfer_check(s, q, pds_time_now_ns());
}

int64_t xfer_deadlines(pds_decode_sched_t *s, int64_t now)
{
    int64_t next = INT64_MAX;
    for (int i = s->n_seqs - 1; i >= 0; i--) {
        dseq_t *q = s->seqs[i];
        if (q->state != SEQ_OPEN && q->state != SEQ_FAILED) continue;
        if (q->deadline_ns <= now) {
            if (q->state == SEQ_FAILED) {
                sched_remove_seq(s, q);
                continue;
            }
            if (!q->data_ok) {
                xfer_check(s, q, now);
                /* still verifying: look again shortly */
                if (q->state == SEQ_OPEN && !q->data_ok) q->deadline_ns = now + ms_to_ns(10);
            } else {
                char msg[200];
                snprintf(msg, sizeof msg, "no CommitTransfer within %lld ms after the KV arrived",
                         (long long)s->p.commit_timeout_ms);
                xfer_fail(s, q, PDS_ERR_TIMEOUT, msg);
            }
            if (i >= s->n_seqs || s->seqs[i] != q) continue;              /* removed */
            if (q->state != SEQ_OPEN && q->state != SEQ_FAILED) continue; /* committed */
        }
        if (q->deadline_ns - now < next) next = PDS_MAX(q->deadline_ns - now, 0);
    }
    return next;
}

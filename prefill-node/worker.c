/* worker.c: the worker threads of pdserve-prefill — everything that blocks on a decode node.
 *
 * OPEN:   OpenTransfer at the decode node (D reserves blocks for all tokens, expects the transfer),
 *         then kvx send_open into those blocks, then the job goes to the engine loop. D's status
 *         comes back to the router unchanged (RESOURCE_EXHAUSTED, UNAVAILABLE: it tries another D).
 * FINISH: after compute. If the first token already ends the request (stop id, EOS, max_tokens,
 *         context), the transfer is closed (D aborts it) and D gets Cancel instead of a commit.
 *         Otherwise kvx commit (data in place and verified at D), then CommitTransfer with the
 *         first token. Any failure: close the send handle, Cancel at D (best effort), fail the
 *         Prefill call with a status and a message naming the decode node.
 * Either way the job's KV blocks go back to the engine loop to be freed only after commit or
 * close returned, since the transport reads them until then.
 *
 * Channels to decode nodes are cached per address for the life of the node (gRPC channels are
 * thread-safe and reconnect by themselves; a cluster has a handful of decode nodes).
 */
#include "service_internal.h"

#include <stdio.h>
#include <string.h>

#define MOD               "prefill"
#define CANCEL_TIMEOUT_MS 2000

/* ---- channels
 * ------------------------------------------------------------------------------------- */
static pds_status_t channel_get(pf_service_t *svc, const char *address, pds_rpc_channel_t **out)
{
    pds_status_t s = PDS_OK;
    pthread_mutex_lock(&svc->mu);
    for (int i = 0; i < svc->n_chans; i++)
        if (strcmp(svc->chans[i].address, address) == 0) {
            *out = svc->chans[i].ch;
            goto done;
        }
    if (svc->n_chans == svc->cap_chans) {
        int cap = svc->cap_chans ? 2 * svc->cap_chans : 8;
        pf_channel_t *n = pds_realloc(svc->chans, (size_t)cap * sizeof *n);
        if (!n) {
            s = PDS_ERR(PDS_ERR_NO_MEMORY, "channel cache");
            goto done;
        }
        svc->chans = n;
        svc->cap_chans = cap;
    }
    pf_channel_t c = {pds_strdup(address), NULL};
    if (!c.address) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "channel cache");
        goto done;
    }
    s = pds_rpc_channel_create(address, &c.ch);
    if (s != PDS_OK) {
        pds_free(c.address);
        goto done;
    }
    svc->chans[svc->n_chans++] = c;
    *out = c.ch;
done:
    pthread_mutex_unlock(&svc->mu);
    return s;
}

/* Deadline for a call to D: the service's limit, or less if the Prefill call expires sooner. */
static int call_timeout_ms(const pf_service_t *svc, const pf_job_t *j)
{
    int64_t dl = pds_rpc_call_deadline_ns(j->call);
    int ms = svc->rpc_timeout_ms;
    if (dl != INT64_MAX) {
        int64_t left = (dl - pds_time_now_ns()) / 1000000;
        if (left < ms) ms = left > 1 ? (int)left : 1;
    }
    return ms;
}

static Pdserve__V1__KvDtype kv_dtype(pds_dtype_t d)
{
    return d == PDS_DTYPE_F32    ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32
           : d == PDS_DTYPE_BF16 ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16
                                 : PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16;
}

/* ---- OPEN
 * ------------------------------------------------------------------------------------------ */
static void transfer_open(pf_service_t *svc, pf_job_t *j, pds_rpc_channel_t *ch)
{
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = j->sample.temperature;
    sp.top_k = j->sample.top_k;
    sp.top_p = j->sample.top_p;
    if (j->seed_set) {
        sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        sp.seed = j->sample.seed;
    }
    Pdserve__V1__KvGeometry geo = PDSERVE__V1__KV_GEOMETRY__INIT;
    geo.n_layers = (uint32_t)svc->info.kv.n_layers;
    geo.n_kv_heads = (uint32_t)svc->info.kv.n_kv_heads;
    geo.head_dim = (uint32_t)svc->info.kv.head_dim;
    geo.block_size = (uint32_t)svc->info.kv.block_size;
    geo.dtype = kv_dtype(svc->info.kv_dtype);
    Pdserve__V1__Slo slo = PDSERVE__V1__SLO__INIT;
    slo.ttft_ms = j->slo_ttft_ms;
    slo.tpot_ms = j->slo_tpot_ms;
    slo.class_name = j->slo_class;

    Pdserve__V1__OpenTransferRequest rq = PDSERVE__V1__OPEN_TRANSFER_REQUEST__INIT;
    rq.request_id = j->request_id;
    rq.n_tokens = (uint32_t)j->n_tokens;
    rq.n_token_ids = (size_t)j->n_tokens;
    rq.token_ids = j->tokens;
    rq.n_generated = (uint32_t)j->n_generated;
    rq.sampling = &sp;
    rq.max_tokens = j->max_tokens;
    rq.n_stop_token_ids = (size_t)j->n_stop;
    rq.stop_token_ids = j->stop;
    rq.ignore_eos = j->ignore_eos;
    rq.router_id = j->router_id;
    rq.prefill_node_id = svc->cfg.id;
    rq.kvx_backend = (char *)pds_kvx_backend_name((pds_kvx_backend_t)svc->cfg.kvx_backend);
    rq.kvx_sender_address.data = (uint8_t *)svc->kvx_addr;
    rq.kvx_sender_address.len = svc->kvx_addr_len;
    rq.kv = &geo;
    rq.slo = &slo;

    ProtobufCMessage *msg = NULL;
    pds_status_t s = pds_rpc_channel_call(ch, "/pdserve.v1.DecodeNode/OpenTransfer", &rq.base,
                                          &pdserve__v1__open_transfer_reply__descriptor,
                                          call_timeout_ms(svc, j), &msg);
    if (s != PDS_OK) {
        pf_job_fail(j, s, "decode node %s (%s): OpenTransfer failed: %s", j->decode_node_id,
                    j->decode_address, pds_err_detail());
        return;
    }
    Pdserve__V1__OpenTransferReply *rep = (Pdserve__V1__OpenTransferReply *)msg;
    j->opened = true;
    j->transfer_id = rep->transfer_id;
    j->n_xfer_blocks = PDS_DIV_UP(j->n_tokens, svc->info.kv.block_size);
    const void *addr = rep->kvx_receiver_address.len ? rep->kvx_receiver_address.data
                                                     : (const void *)j->decode_kvx_addr;
    size_t addr_len =
        rep->kvx_receiver_address.len ? rep->kvx_receiver_address.len : j->decode_kvx_len;
    if (rep->n_block_ids != (size_t)j->n_xfer_blocks) {
        pf_job_fail(j, PDS_ERR_FAILED_PRECONDITION,
                    "decode node %s (%s) reserved %zu KV blocks for %d tokens; %d expected "
                    "(block size %d)",
                    j->decode_node_id, j->decode_address, rep->n_block_ids, j->n_tokens,
                    j->n_xfer_blocks, svc->info.kv.block_size);
    } else if (!addr_len || !rep->kvx_rkey.len) {
        pf_job_fail(j, PDS_ERR_FAILED_PRECONDITION,
                    "decode node %s (%s) gave no kvx %s for the transfer", j->decode_node_id,
                    j->decode_address, addr_len ? "pool blob (kvx_rkey)" : "address");
    } else {
        s = pds_kvx_send_open(svc->kvx, addr, addr_len, rep->kvx_rkey.data, rep->kvx_rkey.len,
                              &svc->info.kv, j->transfer_id, j->n_xfer_blocks, rep->block_ids,
                              &j->send);
        /* A blob or layout this node cannot use is the pairing's fault, not the request's. */
        if (s == PDS_ERR_PARSE || s == PDS_ERR_INVALID_ARG) s = PDS_ERR_FAILED_PRECONDITION;
        if (s != PDS_OK)
            pf_job_fail(j, s, "KV transfer to decode node %s (%s) cannot open: %s",
                        j->decode_node_id, j->decode_address, pds_err_detail());
    }
    pds_rpc_msg_free(msg);
}

/* ---- FINISH
 * ---------------------------------------------------------------------------------------- */
/* Does the first token end the request? (Order as pds_engine_generate: stop, length, context.) */
static Pdserve__V1__FinishReason first_token_ends(const pf_service_t *svc, const pf_job_t *j)
{
    int32_t t = j->first_token;
    if (pds_sample_is_stop(t, j->stop, j->n_stop))
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_STOP;
    if (!j->ignore_eos && t == svc->info.model.eos_id)
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_EOS;
    if ((uint32_t)j->n_generated + 1 >= j->max_tokens)
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    if (j->n_tokens + 1 >= svc->info.model.max_context)
        return PDSERVE__V1__FINISH_REASON__FINISH_REASON_CONTEXT;
    return PDSERVE__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
}

static void cancel_at_decode(pds_rpc_channel_t *ch, const pf_job_t *j, const char *reason)
{
    if (!ch || !j->opened) return;
    Pdserve__V1__CancelRequest rq = PDSERVE__V1__CANCEL_REQUEST__INIT;
    rq.request_id = j->request_id;
    rq.reason = (char *)reason;
    ProtobufCMessage *rep = NULL;
    pds_status_t s =
        pds_rpc_channel_call(ch, "/pdserve.v1.DecodeNode/Cancel", &rq.base,
                             &pdserve__v1__cancel_reply__descriptor, CANCEL_TIMEOUT_MS, &rep);
    if (s != PDS_OK)
        PDS_LOG_WARN(MOD, "decode_cancel_failed req=%s decode=%s status=%s detail=\"%s\"",
                     j->request_id, j->decode_address, pds_status_name(s), pds_err_detail());
    pds_rpc_msg_free(rep);
}

/* kvx commit, then CommitTransfer. Fills the reply's transfer figures. */
static void transfer_commit(pf_service_t *svc, pf_job_t *j, pds_rpc_channel_t *ch,
                            Pdserve__V1__PrefillReply *rep)
{
    uint64_t bytes = (uint64_t)svc->info.kv.n_layers * (uint64_t)j->n_xfer_blocks *
                     (uint64_t)pds_kv_block_bytes(&svc->info.kv);
    pds_status_t s = pds_kvx_send_commit(j->send, svc->commit_timeout_ms);
    int64_t t_commit = pds_time_now_ns();
    if (s != PDS_OK) {
        pf_job_fail(j, s, "KV transfer to decode node %s (%s) failed: %s", j->decode_node_id,
                    j->decode_address, pds_err_detail());
        return;
    }
    /* The hand-off as measured here: the transfer runs from its first layer moving to commit;
     * what is left after the last layer's compute (t_end) is exposed in the TTFT. */
    int64_t t_first = 0;
    pds_kvx_send_times(j->send, &t_first, NULL);
    double move_ms = t_first ? (double)(t_commit - t_first) / 1e6 : 0.0;
    PDS_LOG_INFO(MOD,
                 "handoff req=%s tokens=%d bytes=%llu prefill_ms=%.3f transfer_ms=%.3f "
                 "exposed_ms=%.3f gbps=%.2f",
                 j->request_id, j->n_tokens, (unsigned long long)bytes,
                 (double)(j->t_end_ns - j->t_start_ns) / 1e6, move_ms,
                 (double)(t_commit - j->t_end_ns) / 1e6,
                 move_ms > 0 ? (double)bytes / (move_ms * 1e6) : 0.0);
    pds_kvx_send_close(j->send);
    j->send = NULL;
    float prefill_ms = (float)((j->t_end_ns - j->t_start_ns) / 1e6);
    float xfer_ms = (float)((t_commit - j->t_end_ns) / 1e6);

    Pdserve__V1__CommitTransferRequest rq = PDSERVE__V1__COMMIT_TRANSFER_REQUEST__INIT;
    rq.transfer_id = j->transfer_id;
    rq.request_id = j->request_id;
    rq.first_token = j->first_token;
    rq.sent_bytes = bytes;
    rq.prefill_ms = prefill_ms;
    rq.transfer_ms = xfer_ms;
    ProtobufCMessage *msg = NULL;
    s = pds_rpc_channel_call(ch, "/pdserve.v1.DecodeNode/CommitTransfer", &rq.base,
                             &pdserve__v1__commit_reply__descriptor, call_timeout_ms(svc, j), &msg);
    if (s != PDS_OK) {
        pf_job_fail(j, s, "decode node %s (%s): CommitTransfer failed: %s", j->decode_node_id,
                    j->decode_address, pds_err_detail());
        return;
    }
    pds_rpc_msg_free(msg);
    rep->kv_transfer_bytes = bytes;
    rep->kv_transfer_ms = xfer_ms;
    rep->transfer_id = j->transfer_id;
}

/* Ends the job's call (ok or with its error) and sends its blocks back to be freed. */
static void job_answer(pf_service_t *svc, pf_job_t *j, const Pdserve__V1__PrefillReply *rep)
{
    pds_kvx_send_close(j->send); /* aborts the receiver if not committed; no reads after this */
    j->send = NULL;
    pf_service_uncount(svc, j);
    pf_service_untrack(svc, j); /* no Cancel / on_cancel can reach the call from here on */
    if (j->status == PDS_OK) {
        pds_rpc_call_reply(j->call, &rep->base);
        PDS_LOG_DEBUG(MOD, "prefill_done req=%s first=%d finished=%d", j->request_id,
                      rep->first_token, (int)rep->finished);
    } else {
        PDS_LOG_INFO(MOD, "prefill_failed req=%s status=%s detail=\"%s\"", j->request_id,
                     pds_status_name(j->status), j->err);
        pds_rpc_call_finish(j->call, j->status, j->err);
    }
    j->call = NULL;
    if (j->has_kv)
        pf_sched_release(svc->sched, j);
    else
        pf_service_job_end(svc, j);
}

static void job_finish(pf_service_t *svc, pf_job_t *j, pds_rpc_channel_t *ch)
{
    Pdserve__V1__PrefillReply rep = PDSERVE__V1__PREFILL_REPLY__INIT;
    if (j->status == PDS_OK && atomic_load(&j->cancelled))
        pf_job_fail(j, PDS_ERR_CANCELLED, "cancelled (%s)", j->cancel_why);
    if (j->status == PDS_OK) {
        rep.first_token = j->first_token;
        rep.prefill_node_id = svc->cfg.id;
        rep.computed_tokens = (uint32_t)j->n_tokens;
        rep.queue_ms = (float)((j->t_start_ns - j->t_arrive_ns) / 1e6);
        rep.prefill_ms = (float)((j->t_end_ns - j->t_start_ns) / 1e6);
        Pdserve__V1__FinishReason fin = first_token_ends(svc, j);
        if (fin != PDSERVE__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED) {
            rep.finished = true;
            rep.finish_reason = fin;
            pds_kvx_send_close(j->send); /* D aborts the receive; then Cancel frees its blocks */
            j->send = NULL;
            cancel_at_decode(ch, j, "finished on the prefill node's first token");
        } else {
            transfer_commit(svc, j, ch, &rep);
        }
    }
    if (j->status != PDS_OK) {
        pds_kvx_send_close(j->send);
        j->send = NULL;
        cancel_at_decode(ch, j, j->err);
    }
    job_answer(svc, j, &rep);
}

static void work_open(pf_service_t *svc, pf_job_t *j)
{
    pds_rpc_channel_t *ch = NULL;
    if (atomic_load(&j->cancelled))
        pf_job_fail(j, PDS_ERR_CANCELLED, "cancelled (%s) before the transfer opened",
                    j->cancel_why);
    pds_status_t s = j->status == PDS_OK ? channel_get(svc, j->decode_address, &ch) : j->status;
    if (s != PDS_OK)
        pf_job_fail(j, s, "decode node %s (%s): %s", j->decode_node_id, j->decode_address,
                    pds_err_detail());
    if (j->status == PDS_OK) transfer_open(svc, j, ch);
    if (j->status == PDS_OK && atomic_load(&j->cancelled))
        pf_job_fail(j, PDS_ERR_CANCELLED, "cancelled (%s) while opening the transfer",
                    j->cancel_why);
    if (j->status == PDS_OK) {
        pf_sched_submit(svc->sched, j);
        return;
    }
    job_finish(svc, j, ch);
}

void *pf_worker_main(void *arg)
{
    pf_service_t *svc = arg;
    for (;;) {
        bool closed = false;
        pf_job_t *j = pf_fifo_pop(&svc->work, true, &closed);
        if (!j) {
            if (closed) break;
            continue;
        }
        if (j->work == PF_WORK_OPEN) {
            work_open(svc, j);
        } else {
            pds_rpc_channel_t *ch = NULL;
            if (channel_get(svc, j->decode_address, &ch) != PDS_OK) ch = NULL;
            job_finish(svc, j, ch);
        }
    }
    return NULL;
}

/* nodes.c: the router's node table. Nodes come from registration (and, optionally, from the
 * config's list, shown DOWN until they register). A node is never freed before shutdown — a
 * restarted node re-registers into its old entry — so requests may keep node pointers.
 *
 * Placement here is the simple baseline of the cluster issue ([slo] placement = least-loaded): the
 * prefill node with the fewest queued prompt tokens, the decode (or colocated) node with the most
 * free KV blocks, both corrected by what this router placed since the node's last report (so a
 * burst does not pile onto one node); with no prefill node up, a colocated node prefills the
 * request itself. SLO-driven placement is slo.c. */
#include <stdio.h>
#include <string.h>

#include "router/router.h"

node_t *router_node_find(router_t *r, const char *id)
{
    for (node_t *n = r->nodes; n; n = n->next)
        if (strcmp(n->id, id) == 0) return n;
    return NULL;
}

static node_t *node_new(router_t *r, const char *id, const char *address)
{
    node_t *n = pds_calloc(1, sizeof *n);
    if (!n) return NULL;
    snprintf(n->id, sizeof n->id, "%s", id);
    snprintf(n->address, sizeof n->address, "%s", address);
    n->state = PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN;
    n->next = r->nodes;
    r->nodes = n;
    return n;
}

pds_status_t router_node_register(router_t *r, const Pdserve__V1__NodeInfo *info)
{
    if (info->magic != PDS_RPC_PROTOCOL_MAGIC)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "bad magic 0x%x: not a pdserve node",
                       info->magic);
    if (info->protocol_version != PDS_RPC_PROTOCOL_VERSION)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "protocol version %u, router speaks %u",
                       info->protocol_version, PDS_RPC_PROTOCOL_VERSION);
    if (!info->node_id[0] || !info->address[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG, "node_id and address are required");
    if (info->role != PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL && !ROUTER_DECODES(info->role))
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "node %s: role %d is not served yet", info->node_id,
                       info->role);
    if (!info->kv || info->vocab_size == 0 || info->max_context_tokens == 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "node %s: kv geometry, vocab and context required",
                       info->node_id);

    /* Deep copy through pack/unpack: the request dies with the call. */
    size_t len = protobuf_c_message_get_packed_size(&info->base);
    uint8_t *buf = pds_malloc(len ? len : 1);
    if (!buf) return PDS_ERR(PDS_ERR_NO_MEMORY, "register");
    protobuf_c_message_pack(&info->base, buf);
    Pdserve__V1__NodeInfo *copy = pdserve__v1__node_info__unpack(NULL, len, buf);
    pds_free(buf);
    if (!copy) return PDS_ERR(PDS_ERR_NO_MEMORY, "register copy");

    pds_status_t s = PDS_OK;
    pthread_mutex_lock(&r->mu);
    if (r->have_model) {
        if (info->model_fingerprint != r->model_fingerprint || info->vocab_size != r->vocab ||
            info->kv->block_size != r->block_size) {
            s = PDS_ERR(PDS_ERR_FAILED_PRECONDITION,
                        "node %s serves model %s (fingerprint %016llx), the cluster serves %016llx",
                        info->node_id, info->model_name,
                        (unsigned long long)info->model_fingerprint,
                        (unsigned long long)r->model_fingerprint);
            goto out;
        }
    } else {
        r->have_model = true;
        r->model_fingerprint = info->model_fingerprint;
        r->vocab = info->vocab_size;
        r->max_context = info->max_context_tokens;
        r->block_size = info->kv->block_size;
        r->bos = info->bos_token_id;
        r->eos = info->eos_token_id;
    }
    if (info->max_context_tokens < r->max_context) r->max_context = info->max_context_tokens;
    node_t *n = router_node_find(r, info->node_id);
    if (!n) {
        /* a config-listed node known only by address takes the registered id */
        for (node_t *m = r->nodes; m; m = m->next)
            if (!m->info && strcmp(m->address, info->address) == 0) n = m;
        if (n) snprintf(n->id, sizeof n->id, "%s", info->node_id);
    }
    if (!n) n = node_new(r, info->node_id, info->address);
    if (!n) {
        s = PDS_ERR(PDS_ERR_NO_MEMORY, "node");
        goto out;
    }
    if (n->info && strcmp(n->address, info->address) != 0) {
        pds_rpc_channel_destroy(n->ch); /* moved: new channel (no call runs under mu) */
        n->ch = NULL;
    }
    if (n->info) pdserve__v1__node_info__free_unpacked(n->info, NULL);
    n->info = copy;
    copy = NULL;
    snprintf(n->address, sizeof n->address, "%s", info->address);
    if (!n->ch && (s = pds_rpc_channel_create(n->address, &n->ch)) != PDS_OK) goto out;
    n->role = info->role;
    n->state = PDSERVE__V1__NODE_STATE__NODE_STATE_UP;
    n->last_report_ns = pds_time_now_ns();
    n->last_seq = 0;
    memset(&n->last, 0, sizeof n->last);
    n->last.total_kv_blocks = info->total_kv_blocks;
    n->last.free_kv_blocks = info->total_kv_blocks;
    n->inflight_tokens = n->inflight_blocks = 0;
    n->generation++;
    router_node_model_init(r, n);
    if (ROUTER_DECODES(n->role)) router_stream_start(r, n);
    PDS_LOG_INFO("router", "node_up node=%s role=%d address=%s blocks=%u", n->id, n->role,
                 n->address, info->total_kv_blocks);
out:
    pthread_mutex_unlock(&r->mu);
    if (copy) pdserve__v1__node_info__free_unpacked(copy, NULL);
    return s;
}

pds_status_t router_node_report(router_t *r, const Pdserve__V1__LoadReport *rep, bool *reregister)
{
    *reregister = false;
    pthread_mutex_lock(&r->mu);
    node_t *n = router_node_find(r, rep->node_id);
    if (!n || !n->info) {
        *reregister = true;
    } else if (rep->seq > n->last_seq) {
        n->last_seq = rep->seq;
        n->last = *rep;
        n->last.base =
            (ProtobufCMessage)PROTOBUF_C_MESSAGE_INIT(&pdserve__v1__load_report__descriptor);
        n->last.node_id = NULL;
        n->last.latency = NULL;
        const Pdserve__V1__LatencyModel *lm = rep->latency;
        if (lm && n->have_model && (lm->prefill_b_ms_per_token > 0 || lm->decode_d_ms > 0)) {
            /* the node's own current fit replaces ours */
            router_model_from_proto(lm, &n->model);
        }
        n->last_report_ns = pds_time_now_ns();
        n->inflight_tokens = n->inflight_blocks = 0; /* the report now counts them */
        if (n->state == PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN) {
            n->state = PDSERVE__V1__NODE_STATE__NODE_STATE_UP;
            PDS_LOG_INFO("router", "node_back node=%s", n->id);
            if (ROUTER_DECODES(n->role)) router_stream_start(r, n);
        } else if (rep->state == PDSERVE__V1__NODE_STATE__NODE_STATE_DRAINING) {
            n->state = rep->state;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return PDS_OK;
}

pds_status_t router_place(router_t *r, int64_t n_tokens, const char *avoid_p, const char *avoid_d,
                          node_t **p, node_t **d, bool *local)
{
    int64_t blocks = r->block_size ? PDS_DIV_UP(n_tokens + 1, r->block_size) : 1;
    node_t *bp = NULL, *bd = NULL;
    int64_t bp_load = 0, bd_free = 0;
    bool bp_avoid = true, bd_avoid = true;
    pthread_mutex_lock(&r->mu);
    for (node_t *n = r->nodes; n; n = n->next) {
        if (n->state != PDSERVE__V1__NODE_STATE__NODE_STATE_UP || !n->info) continue;
        if (n->role == PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL) {
            bool avoid = avoid_p && strcmp(avoid_p, n->id) == 0;
            int64_t load = (int64_t)n->last.queued_prompt_tokens + n->inflight_tokens;
            if (!bp || (bp_avoid && !avoid) || (avoid == bp_avoid && load < bp_load)) {
                bp = n, bp_load = load, bp_avoid = avoid;
            }
        } else if (ROUTER_DECODES(n->role)) {
            bool avoid = avoid_d && strcmp(avoid_d, n->id) == 0;
            int64_t free_blocks = (int64_t)n->last.free_kv_blocks - n->inflight_blocks;
            if (!bd || (bd_avoid && !avoid) || (avoid == bd_avoid && free_blocks > bd_free)) {
                bd = n, bd_free = free_blocks, bd_avoid = avoid;
            }
        }
    }
    /* no prefill node: a colocated node does the whole request (the most free KV among them) */
    bool loc = false;
    if (!bp && r->cfg.local_prefill) {
        node_t *bc = NULL;
        int64_t bc_free = 0;
        bool bc_avoid = true;
        for (node_t *n = r->nodes; n; n = n->next) {
            if (n->state != PDSERVE__V1__NODE_STATE__NODE_STATE_UP || !n->info ||
                n->role != PDSERVE__V1__NODE_ROLE__NODE_ROLE_COLOCATED)
                continue;
            bool avoid = avoid_d && strcmp(avoid_d, n->id) == 0;
            int64_t free_blocks = (int64_t)n->last.free_kv_blocks - n->inflight_blocks;
            if (!bc || (bc_avoid && !avoid) || (avoid == bc_avoid && free_blocks > bc_free))
                bc = n, bc_free = free_blocks, bc_avoid = avoid;
        }
        if (bc) bp = bd = bc, loc = true;
    }
    if (bp && bd) {
        bp->inflight_tokens += n_tokens;
        bd->inflight_blocks += blocks;
    }
    pthread_mutex_unlock(&r->mu);
    if (!bp || !bd)
        return PDS_ERR(PDS_ERR_UNAVAILABLE, "no %s node is up", !bp ? "prefill" : "decode");
    *p = bp;
    *d = bd;
    *local = loc;
    return PDS_OK;
}

/* Router mu held. */
void router_node_mark_down(router_t *r, node_t *n, const char *why)
{
    if (n->state == PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN) return;
    n->state = PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN;
    PDS_LOG_WARN("router", "node_down node=%s why=\"%s\"", n->id, why);
}

void router_nodes_fill_status(router_t *r, Pdserve__V1__ClusterStatusReply *reply,
                              Pdserve__V1__NodeStatus *store, Pdserve__V1__NodeStatus **ptrs,
                              Pdserve__V1__LatencyModel *lat_store, size_t cap)
{
    int64_t now = pds_time_now_ns();
    size_t i = 0;
    for (node_t *n = r->nodes; n && i < cap; n = n->next, i++) {
        Pdserve__V1__NodeStatus *s = &store[i];
        pdserve__v1__node_status__init(s);
        s->node_id = n->id;
        s->address = n->address;
        s->role = (Pdserve__V1__NodeRole)n->role;
        s->state = (Pdserve__V1__NodeState)n->state;
        s->queued_prompt_tokens = n->last.queued_prompt_tokens;
        s->running_seqs = n->last.running_seqs;
        s->context_tokens = n->last.context_tokens;
        s->free_kv_blocks = n->last.free_kv_blocks;
        s->total_kv_blocks = n->last.total_kv_blocks;
        s->last_report_age_ms =
            n->last_report_ns ? (uint32_t)((now - n->last_report_ns) / 1000000) : 0;
        if (n->have_model && lat_store) {
            Pdserve__V1__LatencyModel *lm = &lat_store[i];
            pdserve__v1__latency_model__init(lm);
            lm->prefill_a_ms = n->model.prefill_a;
            lm->prefill_b_ms_per_token = n->model.prefill_b;
            lm->prefill_c_ms_per_token2 = n->model.prefill_c;
            lm->decode_d_ms = n->model.decode_d;
            lm->decode_e_ms_per_seq = n->model.decode_e;
            lm->decode_f_ms_per_context_token = n->model.decode_f;
            lm->transfer_gbytes_per_s = n->model.link_gbytes_per_s;
            lm->transfer_msg_ms = n->model.link_msg_ms;
            s->latency = lm;
        }
        ptrs[i] = s;
    }
    reply->nodes = ptrs;
    reply->n_nodes = i;
}

void *router_monitor_main(void *arg)
{
    router_t *r = arg;
    while (!atomic_load(&r->stopping)) {
        pds_time_sleep_ms(50);
        int64_t now = pds_time_now_ns();
        node_t *down[64];
        int n_down = 0;
        pthread_mutex_lock(&r->mu);
        for (node_t *n = r->nodes; n; n = n->next) {
            if (n->state == PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN || !n->info) continue;
            if (now - n->last_report_ns > r->cfg.node_timeout_ns) {
                router_node_mark_down(r, n, "no load report within node_timeout");
                if (ROUTER_DECODES(n->role) && n_down < 64) down[n_down++] = n;
            }
        }
        pthread_mutex_unlock(&r->mu);
        for (int i = 0; i < n_down; i++) router_on_decode_down(r, down[i]);
    }
    return NULL;
}

void router_nodes_destroy(router_t *r)
{
    for (node_t *n = r->nodes, *next; n; n = next) {
        next = n->next;
        pds_rpc_channel_destroy(n->ch);
        if (n->info) pdserve__v1__node_info__free_unpacked(n->info, NULL);
        pds_slo_refit_destroy(n->refit);
        pds_free(n);
    }
    r->nodes = NULL;
}

/* service.c: the router's gRPC methods. Handlers run on the RPC thread and never block: they
 * either answer from the node table (Health, ClusterStatus, RegisterNode, ReportLoad — short
 * critical sections) or hand the request to requests.c, which queues the blocking work. */
#include <string.h>

#include "router/router.h"

static void on_generate(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    router_generate(arg, call, (const Pdserve__V1__GenerateRequest *)req);
}

static void on_generate_cancel(pds_rpc_call_t *call, void *arg)
{
    router_generate_cancelled(arg, call);
}

static void on_health(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    router_t *r = arg;
    Pdserve__V1__HealthReply h = PDSERVE__V1__HEALTH_REPLY__INIT;
    h.state = atomic_load(&r->stopping) ? PDSERVE__V1__NODE_STATE__NODE_STATE_DRAINING
                                        : PDSERVE__V1__NODE_STATE__NODE_STATE_UP;
    h.node_id = r->cfg.id;
    h.protocol_version = PDS_RPC_PROTOCOL_VERSION;
    h.build = (char *)"pdserve-router 0.1.0";
    h.uptime_ms = (uint64_t)((pds_time_now_ns() - r->start_ns) / 1000000);
    pds_rpc_call_reply(call, &h.base);
}

static void on_status(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    router_t *r = arg;
    enum { CAP = 256 };
    Pdserve__V1__NodeStatus *store = pds_malloc(sizeof *store * CAP);
    Pdserve__V1__NodeStatus **ptrs = pds_malloc(sizeof *ptrs * CAP);
    Pdserve__V1__LatencyModel *lat = pds_malloc(sizeof *lat * CAP);
    if (!store || !ptrs || !lat) {
        pds_free(store);
        pds_free(ptrs);
        pds_free(lat);
        pds_rpc_call_finish(call, PDS_ERR_NO_MEMORY, "router out of memory");
        return;
    }
    Pdserve__V1__ClusterStatusReply reply = PDSERVE__V1__CLUSTER_STATUS_REPLY__INIT;
    reply.router_id = r->cfg.id;
    Pdserve__V1__SloStats slo = PDSERVE__V1__SLO_STATS__INIT;
    router_slo_fill_status(r, &slo);
    reply.slo = &slo;
    pthread_mutex_lock(&r->mu);
    router_nodes_fill_status(r, &reply, store, ptrs, lat, CAP);
    int waiting = atomic_load(&r->n_waiting);
    reply.queued_requests = waiting > 0 ? (uint32_t)waiting : 0;
    reply.active_requests = (uint32_t)router_active_requests(r);
    /* packed inside the lock: the strings point into the node table */
    pds_rpc_call_reply(call, &reply.base);
    pthread_mutex_unlock(&r->mu);
    pds_free(store);
    pds_free(ptrs);
    pds_free(lat);
}

static void on_register(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    router_t *r = arg;
    pds_err_clear();
    pds_status_t s = router_node_register(r, (const Pdserve__V1__NodeInfo *)req);
    if (s != PDS_OK) {
        PDS_LOG_WARN("router", "register_refused detail=\"%s\"", pds_err_detail());
        pds_rpc_call_finish(call, s, pds_err_detail());
        return;
    }
    Pdserve__V1__RegisterReply reply = PDSERVE__V1__REGISTER_REPLY__INIT;
    reply.router_id = r->cfg.id;
    reply.router_epoch = r->epoch;
    reply.report_interval_ms = (uint32_t)(r->cfg.report_interval_ns / 1000000);
    pds_rpc_call_reply(call, &reply.base);
}

static void on_report(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    router_t *r = arg;
    bool reregister = false;
    router_node_report(r, (const Pdserve__V1__LoadReport *)req, &reregister);
    Pdserve__V1__ReportReply reply = PDSERVE__V1__REPORT_REPLY__INIT;
    reply.reregister = reregister;
    reply.report_interval_ms = (uint32_t)(r->cfg.report_interval_ns / 1000000);
    pds_rpc_call_reply(call, &reply.base);
}

pds_status_t router_service_add(router_t *r, pds_rpc_server_t *srv)
{
    const pds_rpc_method_t methods[] = {
        {"/pdserve.v1.Pdserve/Generate", PDS_RPC_SERVER_STREAM,
         &pdserve__v1__generate_request__descriptor, on_generate, on_generate_cancel, r},
        {"/pdserve.v1.Pdserve/Health", PDS_RPC_UNARY, &pdserve__v1__health_request__descriptor,
         on_health, NULL, r},
        {"/pdserve.v1.Pdserve/ClusterStatus", PDS_RPC_UNARY,
         &pdserve__v1__cluster_status_request__descriptor, on_status, NULL, r},
        {"/pdserve.v1.RouterInternal/RegisterNode", PDS_RPC_UNARY,
         &pdserve__v1__node_info__descriptor, on_register, NULL, r},
        {"/pdserve.v1.RouterInternal/ReportLoad", PDS_RPC_UNARY,
         &pdserve__v1__load_report__descriptor, on_report, NULL, r},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(methods); i++)
        PDS_TRY(pds_rpc_server_add_method(srv, &methods[i]));
    return PDS_OK;
}

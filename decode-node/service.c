/* service.c: DecodeNode RPC handlers (PrefillLocal included: a decode node refuses it from the
 * engine thread, which knows the node's mode) — thin: check what needs no node state, hand the call
 * to the engine thread, answer only when that is refused. A TokenStream call carries its stream id
 * in the call's data slot so that its on_cancel names it without touching the engine's state. */
#include "decode-node/service.h"

#include <stdatomic.h>

struct pds_decode_service {
    pds_decode_sched_t *sched;
    atomic_uint_fast64_t next_stream_id;
};

static pds_status_t rpc_send(void *call, const ProtobufCMessage *msg)
{
    return pds_rpc_call_send(call, msg);
}

static void rpc_reply(void *call, const ProtobufCMessage *msg)
{
    pds_rpc_call_reply(call, msg);
}

static void rpc_finish(void *call, pds_status_t s, const char *message)
{
    pds_rpc_call_finish(call, s, message);
}

pds_decode_calls_t pds_decode_calls_rpc(void)
{
    return (pds_decode_calls_t){rpc_send, rpc_reply, rpc_finish};
}

/* The scheduler did not take the call: answer it here with the reason it gave. */
static void refused(pds_rpc_call_t *call, pds_status_t s)
{
    pds_rpc_call_finish(call, s, pds_err_detail());
}

static void on_open(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pds_decode_service_t *svc = arg;
    pds_status_t s =
        pds_decode_sched_open(svc->sched, call, (const Pdserve__V1__OpenTransferRequest *)req);
    if (s != PDS_OK) refused(call, s);
}

static void on_commit(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pds_decode_service_t *svc = arg;
    pds_status_t s =
        pds_decode_sched_commit(svc->sched, call, (const Pdserve__V1__CommitTransferRequest *)req);
    if (s != PDS_OK) refused(call, s);
}

static void on_cancel_request(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pds_decode_service_t *svc = arg;
    pds_status_t s =
        pds_decode_sched_cancel(svc->sched, call, (const Pdserve__V1__CancelRequest *)req);
    if (s != PDS_OK) refused(call, s);
}

static void on_local(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pds_decode_service_t *svc = arg;
    pds_status_t s =
        pds_decode_sched_local(svc->sched, call, (const Pdserve__V1__PrefillRequest *)req);
    if (s != PDS_OK) refused(call, s);
}

static void on_stream(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pds_decode_service_t *svc = arg;
    uint64_t id = atomic_fetch_add(&svc->next_stream_id, 1);
    pds_rpc_call_set_data(call, (void *)(uintptr_t)id);
    pds_status_t s =
        pds_decode_sched_stream(svc->sched, call, (const Pdserve__V1__TokenStreamRequest *)req, id);
    if (s != PDS_OK) refused(call, s);
}

static void on_stream_cancel(pds_rpc_call_t *call, void *arg)
{
    pds_decode_service_t *svc = arg;
    pds_decode_sched_stream_gone(svc->sched, (uint64_t)(uintptr_t)pds_rpc_call_data(call));
}

pds_status_t pds_decode_service_create(pds_rpc_server_t *srv, pds_decode_sched_t *sched,
                                       pds_decode_service_t **out)
{
    pds_decode_service_t *svc = pds_calloc(1, sizeof *svc);
    if (!svc) return PDS_ERR(PDS_ERR_NO_MEMORY, "decode service");
    svc->sched = sched;
    atomic_init(&svc->next_stream_id, 1);
    const pds_rpc_method_t methods[] = {
        {PDS_DECODE_M_OPEN, PDS_RPC_UNARY, &pdserve__v1__open_transfer_request__descriptor, on_open,
         NULL, svc},
        {PDS_DECODE_M_COMMIT, PDS_RPC_UNARY, &pdserve__v1__commit_transfer_request__descriptor,
         on_commit, NULL, svc},
        {PDS_DECODE_M_CANCEL, PDS_RPC_UNARY, &pdserve__v1__cancel_request__descriptor,
         on_cancel_request, NULL, svc},
        {PDS_DECODE_M_STREAM, PDS_RPC_SERVER_STREAM, &pdserve__v1__token_stream_request__descriptor,
         on_stream, on_stream_cancel, svc},
        {PDS_DECODE_M_LOCAL, PDS_RPC_UNARY, &pdserve__v1__prefill_request__descriptor, on_local,
         NULL, svc},
    };
    for (size_t i = 0; i < PDS_ARRAY_LEN(methods); i++) {
        pds_status_t s = pds_rpc_server_add_method(srv, &methods[i]);
        if (s != PDS_OK) {
            pds_free(svc);
            return s;
        }
    }
    *out = svc;
    return PDS_OK;
}

void pds_decode_service_destroy(pds_decode_service_t *svc)
{
    pds_free(svc);
}

/* service.h: the PrefillNode gRPC service of pdserve-prefill — the Prefill and Cancel handlers (RPC
 * thread, never blocking), a pool of worker threads that make the blocking calls to decode nodes
 * (OpenTransfer, CommitTransfer, Cancel; one cached channel per decode address) and commit KV
 * transfers, and the engine loop (scheduler.h) it feeds.
 *
 * Ownership: the service owns the scheduler, which owns the engine from create to destroy; the kvx
 * and the engine must outlive the service. Thread-safe: the methods run on the RPC thread, the
 * load callback on the reporter thread.
 */
#ifndef PF_SERVICE_H
#define PF_SERVICE_H

#include "engine/engine.h"
#include "kvx/kvx.h"
#include "node/node.h"
#include "rpc/rpc.h"

typedef struct pf_service pf_service_t;

typedef struct {
    const pds_node_config_t *cfg; /* copied */
    pds_engine_t *engine;         /* handed to the engine loop */
    pds_kvx_t *kvx;
    int n_workers;       /* threads for blocking calls to decode nodes; 0 = 8 */
    int rpc_timeout_ms;  /* deadline of each call to a decode node; 0 = 10000 */
    volatile int *state; /* Pdserve__V1__NodeState for load reports (the Health state) */
} pf_service_params_t;

pds_status_t pf_service_create(const pf_service_params_t *p, pf_service_t **out);
/* Cancels every job still live (their Prefill calls end CANCELLED, their transfers are cancelled
 * at the decode nodes), waits until all are gone, stops the workers and the engine loop. Call
 * after the RPC server stopped taking calls. Accepts NULL. */
void pf_service_destroy(pf_service_t *svc);

/* PrefillNode/Prefill and PrefillNode/Cancel, to add to the node's server. */
pds_rpc_method_t pf_service_prefill_method(pf_service_t *svc);
pds_rpc_method_t pf_service_cancel_method(pf_service_t *svc);

/* pds_node_load_fn for the reporter: queued prompt tokens and requests, free blocks, batch ms. */
void pf_service_load(void *svc, Pdserve__V1__LoadReport *r);

#endif /* PF_SERVICE_H */

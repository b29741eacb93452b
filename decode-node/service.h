/* service: the DecodeNode gRPC methods of pdserve-decode (OpenTransfer, CommitTransfer, Cancel,
 * TokenStream). Handlers run on the RPC thread and never block: each hands its call to the
 * scheduler's queue (sched.h), which answers it from the engine thread; when the scheduler cannot
 * take it (shutting down) the handler answers UNAVAILABLE itself. Also the pds_decode_calls_t
 * that routes the scheduler's answers to pds_rpc_call_*. */
#ifndef PDS_DECODE_SERVICE_H
#define PDS_DECODE_SERVICE_H

#include "decode-node/sched.h"
#include "rpc/rpc.h"

#define PDS_DECODE_M_OPEN   "/pdserve.v1.DecodeNode/OpenTransfer"
#define PDS_DECODE_M_COMMIT "/pdserve.v1.DecodeNode/CommitTransfer"
#define PDS_DECODE_M_CANCEL "/pdserve.v1.DecodeNode/Cancel"
#define PDS_DECODE_M_STREAM "/pdserve.v1.DecodeNode/TokenStream"
#define PDS_DECODE_M_LOCAL  "/pdserve.v1.DecodeNode/PrefillLocal"

/* pds_rpc_call_send / _reply / _finish behind the scheduler's call interface. */
pds_decode_calls_t pds_decode_calls_rpc(void);

typedef struct pds_decode_service pds_decode_service_t;
/* Adds the five DecodeNode methods to srv (before pds_rpc_server_start). The service must outlive
 * the server (destroy it after pds_rpc_server_destroy); `sched` likewise. */
pds_status_t pds_decode_service_create(pds_rpc_server_t *srv, pds_decode_sched_t *sched,
                                       pds_decode_service_t **out);
void pds_decode_service_destroy(pds_decode_service_t *svc); /* accepts NULL */

#endif /* PDS_DECODE_SERVICE_H */

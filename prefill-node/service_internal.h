/* service_internal.h: the service's state, shared by service.c (RPC handlers, job table, life
 * cycle) and worker.c (the worker threads and their calls to decode nodes). */
#ifndef PF_SERVICE_INTERNAL_H
#define PF_SERVICE_INTERNAL_H

#include <stdatomic.h>

#include "job.h"
#include "scheduler.h"
#include "service.h"

typedef struct {
    char *address;
    pds_rpc_channel_t *ch;
} pf_channel_t;

struct pf_service {
    pds_node_config_t cfg;
    pds_engine_info_t info;
    pds_kvx_t *kvx;
    const void *kvx_addr; /* this node's kvx address blob (owned by the kvx) */
    size_t kvx_addr_len;
    int rpc_timeout_ms;
    int64_t commit_timeout_ms;
    volatile int *state;
    pf_sched_t *sched;

    /* workers */
    pf_fifo_t work;
    pthread_t *workers;
    int n_workers;

    pthread_mutex_t mu;  /* the job table, the channel cache, `live` */
    pthread_cond_t idle; /* signalled when `live` drops to 0 */
    pf_job_t *tbl_head;  /* jobs whose Prefill call is not answered yet */
    int live;            /* jobs not yet freed */
    pf_channel_t *chans;
    int n_chans, cap_chans;

    atomic_llong queued_tokens; /* tokens of accepted jobs not computed yet */
    atomic_int queued_reqs;
};

/* worker.c */
void *pf_worker_main(void *svc);
/* Takes the job out of the table (it can no longer be cancelled by id or by its call). Returns
 * false if it was not there. */
bool pf_service_untrack(pf_service_t *svc, pf_job_t *j);
/* Last step of every job: counts it gone and frees it (after its blocks were released). */
void pf_service_job_end(pf_service_t *svc, pf_job_t *j);
/* Takes the job out of the queued-work figures (once). */
void pf_service_uncount(pf_service_t *svc, pf_job_t *j);

#endif /* PF_SERVICE_INTERNAL_H */

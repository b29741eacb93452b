/* job.h: one Prefill request inside pdserve-prefill, and the intrusive FIFO that hands jobs from
 * thread to thread without allocating.
 *
 * A job lives through four owners in turn, never two at once (each hand-over goes through a FIFO
 * whose mutex orders the memory): the RPC thread accepts it; a worker opens the transfer at the
 * decode node; the engine loop computes it and sends its KV layer by layer; a worker commits (or
 * aborts) and answers the router; the engine loop frees its KV blocks and then the job. The only
 * field touched from outside the current owner is `cancelled` (atomic; set by Cancel/on_cancel).
 */
#ifndef PF_JOB_H
#define PF_JOB_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"
#include "kv/kv.h"
#include "kvx/kvx.h"
#include "rpc/rpc.h"
#include "sample/sample.h"

/* What a worker does with a job it pops. */
typedef enum {
    PF_WORK_OPEN = 0, /* OpenTransfer at the decode node, kvx send_open, then to the engine */
    PF_WORK_FINISH,   /* after compute (or a drop): commit or abort, answer the router */
} pf_work_t;

/* What the engine loop does with a job it pops. */
typedef enum {
    PF_SCHED_SUBMIT = 0, /* queue for compute */
    PF_SCHED_RELEASE,    /* free its KV blocks, then hand it back through release_fn */
} pf_sched_cmd_t;

typedef struct pf_job pf_job_t;
struct pf_job {
    /* ---- the request, fixed at accept (RPC thread), read by everyone after ---- */
    char *request_id;
    int32_t *tokens; /* (n_tokens) prompt followed by the already generated ids */
    int n_tokens, n_prompt, n_generated;
    pds_sample_params_t sample;
    bool seed_set;
    uint32_t max_tokens; /* total output budget, n_generated included */
    int32_t *stop;       /* (n_stop) */
    int n_stop;
    bool ignore_eos;
    char *router_id, *decode_node_id, *decode_address;
    uint8_t *decode_kvx_addr; /* (decode_kvx_len) the request's copy of D's kvx address */
    size_t decode_kvx_len;
    float slo_ttft_ms, slo_tpot_ms;
    char *slo_class;
    pds_rpc_call_t *call; /* the Prefill call; answered exactly once, by a worker */
    int64_t t_arrive_ns;

    atomic_bool cancelled; /* Cancel RPC or the call's on_cancel; any thread */
    const char *cancel_why;

    /* ---- transfer: worker (open), engine loop (send_layer), worker (commit / close) ---- */
    uint64_t transfer_id;
    bool opened;          /* OpenTransfer succeeded: D holds blocks until Commit or Cancel */
    pds_kvx_send_t *send; /* NULL until send_open succeeded and after close */
    int n_xfer_blocks;    /* blocks on each side */

    /* ---- compute: engine loop ---- */
    pds_kv_seq_t kv; /* this node's blocks; all allocated at once before the first chunk */
    bool has_kv;
    int done_tokens; /* tokens computed so far (chunked prefill) */
    bool counted;    /* still in the queued-tokens load figures */
    int64_t t_start_ns, t_end_ns;
    int32_t first_token;
    pds_status_t status; /* first error on the job (compute, send_layer, ...); PDS_OK otherwise */
    char err[320];       /* its message for the router */

    /* ---- hand-over ---- */
    pf_work_t work;
    pf_sched_cmd_t cmd;
    pf_job_t *fifo_next;           /* link in whichever FIFO holds the job */
    pf_job_t *tbl_prev, *tbl_next; /* service's table of live jobs (under its mutex) */
    pf_job_t *wait_next;           /* engine loop's FCFS wait list */
};

/* Frees the job's own memory (not its KV blocks: the engine loop releases those first; not its
 * send handle: closed by the worker). Accepts NULL. */
void pf_job_free(pf_job_t *j);
/* Records the job's first error (later ones are dropped): status and "context: detail". */
void pf_job_fail(pf_job_t *j, pds_status_t s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- FIFO of jobs: many producers, one or more consumers, no allocation --------------------- */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pf_job_t *head, *tail;
    bool closed;
    bool kicked; /* a wake-up without a job (the engine loop re-checks cancellations) */
} pf_fifo_t;

void pf_fifo_init(pf_fifo_t *f);
void pf_fifo_fini(pf_fifo_t *f);
void pf_fifo_push(pf_fifo_t *f, pf_job_t *j);
void pf_fifo_kick(pf_fifo_t *f);
/* Pops the oldest job. wait: block until a job, a kick or close. Returns NULL on a kick, on close
 * with nothing left, or when not waiting and empty; *closed says whether the FIFO is closed. */
pf_job_t *pf_fifo_pop(pf_fifo_t *f, bool wait, bool *closed);
void pf_fifo_close(pf_fifo_t *f);

#endif /* PF_JOB_H */

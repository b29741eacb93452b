/* sched_internal.h: the scheduler's state, shared by sched.c (loop, batching, preemption) and
 * xfer.c (OpenTransfer / CommitTransfer / Cancel and the kvx side). Engine thread only, except
 * where a field says otherwise. */
#ifndef PDS_DECODE_SCHED_INTERNAL_H
#define PDS_DECODE_SCHED_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "decode-node/sched.h"

#define MOD "decode"

typedef enum {
    SEQ_OPEN = 0,
    SEQ_FAILED,
    SEQ_WAITING,
    SEQ_RUNNING,
    SEQ_PREEMPTED,
    SEQ_RECOMPUTE,
} seq_state_t;

typedef struct {
    char *request_id;
    char *router_id;
    seq_state_t state;

    /* transfer (OPEN / FAILED) */
    uint64_t transfer_id;
    pds_kvx_recv_t *recv; /* OPEN; closed before its blocks are freed or adopted */
    int32_t *xfer_blocks; /* (n_xfer_blocks) block ids allocated at OpenTransfer */
    int n_xfer_blocks;
    bool data_ok;        /* every layer arrived and verified */
    int64_t deadline_ns; /* OPEN: data (then commit) deadline; FAILED: forget after */
    void *commit_call;   /* a CommitTransfer parked until the data is final */
    const Pdserve__V1__CommitTransferRequest *commit_req;
    pds_status_t fail_status; /* FAILED */
    char fail_detail[256];

    /* tokens: (n_tok) transferred prompt+generated ids, then this sequence's outputs */
    int32_t *tokens;
    int n_tok, cap_tok;
    int n_xfer;      /* tokens whose KV came over (n_tokens of OpenTransfer) */
    int n_generated; /* outputs already sent before this node (re-placement) */
    int max_tokens;  /* total output budget, n_generated included */
    int32_t *stop;
    int n_stop;
    bool ignore_eos;
    pds_sample_params_t sample;

    /* KV (engine thread's pool) */
    pds_kv_seq_t kv;     /* covers tokens[0 .. kv.n_tokens) */
    pds_kv_resv_t *resv; /* RECOMPUTE: blocks set aside for the rest of the recompute */
    bool local_prefill;  /* PrefillLocal not computed yet: recompute ALL tokens and sample */
    uint64_t order;      /* commit order: the preemption victim is the largest */

    /* per step */
    int32_t in_tok, out_tok;

    /* timings */
    int64_t t_commit_ns, t_first_step_ns, t_last_ns;
    float *gaps; /* (n_gaps) ms between consecutive output tokens of this node */
    int n_gaps, cap_gaps;
    uint32_t steps;
} dseq_t;

typedef enum {
    CMD_OPEN,
    CMD_COMMIT,
    CMD_CANCEL,
    CMD_STREAM,
    CMD_STREAM_GONE,
    CMD_LOCAL,
    CMD_KVX_DONE,
    CMD_STOP,
} cmd_kind_t;

typedef struct {
    cmd_kind_t kind;
    void *call;
    const ProtobufCMessage *req;
    uint64_t id; /* stream id / transfer id */
    pds_status_t status;
} cmd_t;

struct pds_decode_sched {
    char *node_id;
    char *kvx_backend;
    pds_decode_sched_params_t p; /* strings above replace p's */
    pds_engine_t *e;
    pds_kv_pool_t *pool;
    pds_engine_info_t info;
    int max_seqs;

    pds_queue_t *q;
    pthread_t thread;
    bool started, stopped;
    atomic_bool stopping; /* any thread: refuse new commands early */

    dseq_t **seqs; /* every known request, in arrival order */
    int n_seqs, cap_seqs;
    pds_decode_streams_t *streams;

    uint64_t next_transfer_id;
    uint64_t next_order;
    uint64_t step;

    /* forward scratch, max_seqs entries */
    pds_engine_seq_t *batch;
    dseq_t **batch_seqs;
    dseq_t **order_buf; /* active sequences sorted by order */

    /* counters (engine thread), published through snap */
    uint64_t preemptions, n_finished;
    float step_ema_ms;
    int64_t t_step_end_ns; /* end of the last forward (the debug step trace) */
    pthread_mutex_t snap_mu;
    pds_decode_stats_t snap;
};

/* sched.c */
dseq_t *sched_find_request(pds_decode_sched_t *s, const char *request_id);
dseq_t *sched_find_transfer(pds_decode_sched_t *s, uint64_t transfer_id);
pds_status_t sched_add_seq(pds_decode_sched_t *s, dseq_t *q);
/* Unlinks and frees q (blocks must already be freed / adopted). */
void sched_remove_seq(pds_decode_sched_t *s, dseq_t *q);
void seq_free(dseq_t *q);
/* The next output position of q (index of its next token). */
uint32_t seq_next_index(const dseq_t *q);
/* Ends a committed sequence: tells its router (finished, reason, error), frees its KV, drops it. */
void sched_end_seq(pds_decode_sched_t *s, dseq_t *q, int reason, const char *error);
/* Checks whether q's last token ends it; returns the FinishReason or 0. */
int seq_finish_reason(const pds_decode_sched_t *s, const dseq_t *q);

/* xfer.c */
void xfer_open(pds_decode_sched_t *s, void *call, const Pdserve__V1__OpenTransferRequest *req);
void xfer_commit(pds_decode_sched_t *s, void *call, const Pdserve__V1__CommitTransferRequest *req);
void xfer_cancel(pds_decode_sched_t *s, void *call, const Pdserve__V1__CancelRequest *req);
/* The kvx notify for transfer id reached its final state. */
void xfer_done(pds_decode_sched_t *s, uint64_t transfer_id);
/* Fails/forgets transfers past their deadlines; returns ns until the next deadline (INT64_MAX). */
int64_t xfer_deadlines(pds_decode_sched_t *s, int64_t now_ns);
/* Shutdown: cancels q's transfer (if OPEN), answers a parked commit, frees its blocks. */
void xfer_abort(pds_decode_sched_t *s, dseq_t *q, pds_status_t st, const char *why);
/* kvx notify callback (kvx progress / sender thread): queues CMD_KVX_DONE. */
void xfer_notify(void *ctx, uint64_t transfer_id, pds_status_t status);

#endif /* PDS_DECODE_SCHED_INTERNAL_H */

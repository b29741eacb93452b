/* scheduler.h: the prefill node's engine loop — one thread that owns the engine and its KV block
 * manager, computes queued prompts in first-come-first-served batches under a token budget, and
 * sends each job's KV to its decode node layer by layer from the engine's per-layer hook.
 *
 * Every entry point except create/destroy is thread-safe and non-blocking: they only push onto the
 * loop's FIFO. Jobs come back to the caller through two callbacks, both run on the engine thread:
 * done_fn once per submitted job when its compute ended (job->status PDS_OK with first_token set,
 * or an error / a drop after a cancel), and release_fn once per released job after its blocks were
 * freed (the job may then be freed).
 */
#ifndef PF_SCHEDULER_H
#define PF_SCHEDULER_H

#include "engine/engine.h"
#include "job.h"

typedef struct pf_sched pf_sched_t;

typedef void (*pf_sched_job_fn)(void *ctx, pf_job_t *job);

typedef struct {
    int max_batch_tokens; /* new tokens per forward; longer prompts are computed in chunks */
    int max_batch_seqs;
    pf_sched_job_fn done_fn;
    pf_sched_job_fn release_fn;
    void *ctx;
    pds_kvx_t *kvx; /* device pools: the engine's pool is registered with it as the KV source */
} pf_sched_params_t;

/* Load figures for the router (read under the scheduler's mutex). */
typedef struct {
    int free_blocks;
    int total_blocks;
    int running_seqs;      /* sequences in the forward now running (0 when idle) */
    float recent_batch_ms; /* exponential mean of forward durations */
} pf_sched_load_t;

/* Starts the engine loop on `e` (which it then owns until destroy). */
pds_status_t pf_sched_create(pds_engine_t *e, const pf_sched_params_t *p, pf_sched_t **out);
/* Stops and joins the loop. Every job must have been released before. Accepts NULL. */
void pf_sched_destroy(pf_sched_t *s);

/* Queues a job for compute; job->send is open (or the job is already failed/cancelled). */
void pf_sched_submit(pf_sched_t *s, pf_job_t *job);
/* Frees the job's KV blocks on the engine thread, then calls release_fn. Only after the KV
 * transfer is committed or closed: the sender may read the blocks until then. */
void pf_sched_release(pf_sched_t *s, pf_job_t *job);
/* Makes the loop drop queued jobs whose `cancelled` flag is set. */
void pf_sched_kick(pf_sched_t *s);
void pf_sched_load(pf_sched_t *s, pf_sched_load_t *out);

#endif /* PF_SCHEDULER_H */

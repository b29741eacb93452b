/* scheduler.c: the engine loop of pdserve-prefill. FCFS: jobs are computed in arrival order; a
 * batch takes jobs from the head of the wait list while their tokens fit max_batch_tokens (and
 * max_batch_seqs), stopping at the first that does not fit, so a long prompt is never starved by
 * short ones behind it. A job longer than the budget runs alone, in chunks of the budget (chunked
 * prefill through n_past).
 *
 * KV blocks: a job gets all its blocks at once, before its first chunk, so a job that started can
 * always finish. When the pool is full the head job waits for blocks that earlier jobs give back
 * once their transfer committed (FCFS: nothing behind it jumps ahead). A job's blocks stay
 * allocated until the worker's commit (or close) returned, because the transport reads them until
 * then; the worker sends the job back here (PF_SCHED_RELEASE) to free them.
 *
 * KV transfer: each layer is sent once (kvx's rule). The engine's per-layer hook sends layer l of
 * every job whose *last* chunk is in the forward: at that point layer l holds the KV of all the
 * job's tokens (earlier chunks wrote theirs in earlier forwards), so l travels while l+1 computes.
 * Jobs in an earlier chunk send nothing yet. On a device pool (CUDA) the pool is registered with
 * kvx as the transfer source at create, with pds_engine_layer_wait as its per-layer ready
 * callback: the hook only queues the layer (it never blocks the engine thread), and kvx's staging
 * thread waits for the layer's event, then copies it to pinned host memory and sends it (UCX) or
 * sends it from the device (NCCL), so layer l moves while l+1 computes on the GPU too.
 */
#include "scheduler.h"

#include <string.h>

#define MOD "prefill"

struct pf_sched {
    pds_engine_t *e;
    pf_sched_params_t p;
    pds_kv_pool_t *pool;
    pds_engine_info_t info;
    void **layer_base; /* (n_layers) base of each layer's block array */
    bool on_device;
    pthread_t thread;
    pf_fifo_t in;

    /* engine thread only */
    pf_job_t *wait_head, *wait_tail; /* FCFS wait list */

    pthread_mutex_t mu; /* load figures */
    pf_sched_load_t load;

    /* the loop's batch arrays (max_batch_seqs each), allocated at create */
    pf_job_t **b_jobs;
    int *b_chunk;
    bool *b_last;
    pds_engine_seq_t *b_seqs;
};

/* One forward: the jobs and how much of each. */
typedef struct {
    pf_sched_t *s;
    pf_job_t **jobs;
    int *chunk;
    bool *last;
    int n;
} batch_t;

/* ---- wait list ----------------------------------------------------------------------------------
 */
static void wait_append(pf_sched_t *s, pf_job_t *j)
{
    j->wait_next = NULL;
    if (s->wait_tail)
        s->wait_tail->wait_next = j;
    else
        s->wait_head = j;
    s->wait_tail = j;
}

static void wait_remove(pf_sched_t *s, pf_job_t *j)
{
    pf_job_t *prev = NULL;
    for (pf_job_t *c = s->wait_head; c; prev = c, c = c->wait_next) {
        if (c != j) continue;
        if (prev)
            prev->wait_next = c->wait_next;
        else
            s->wait_head = c->wait_next;
        if (s->wait_tail == c) s->wait_tail = prev;
        c->wait_next = NULL;
        return;
    }
}

/* The job leaves the loop: its compute is over (ok or not). */
static void job_done(pf_sched_t *s, pf_job_t *j)
{
    wait_remove(s, j);
    s->p.done_fn(s->p.ctx, j);
}

/* ---- inbox --------------------------------------------------------------------------------------
 */
static void release_job(pf_sched_t *s, pf_job_t *j)
{
    if (j->has_kv) {
        pds_kv_seq_release(&j->kv, s->pool);
        j->has_kv = false;
    }
    s->p.release_fn(s->p.ctx, j);
}

/* Takes everything in the FIFO; waits first when `wait`. False once closed and drained. */
static bool take_inbox(pf_sched_t *s, bool wait)
{
    bool closed = false;
    for (;;) {
        pf_job_t *j = pf_fifo_pop(&s->in, wait, &closed);
        wait = false;
        if (!j) break;
        if (j->cmd == PF_SCHED_RELEASE)
            release_job(s, j);
        else
            wait_append(s, j);
    }
    return !closed;
}

/* ---- batch formation
 * ----------------------------------------------------------------------------- */
/* Drops cancelled or failed queued jobs (a running chunked job stops between chunks). */
static void drop_dead(pf_sched_t *s)
{
    pf_job_t *next;
    for (pf_job_t *j = s->wait_head; j; j = next) {
        next = j->wait_next;
        if (atomic_load(&j->cancelled))
            pf_job_fail(j, PDS_ERR_CANCELLED, "cancelled (%s) while queued for prefill",
                        j->cancel_why ? j->cancel_why : "cancel");
        if (j->status != PDS_OK) job_done(s, j);
    }
}

/* Gives the job all its blocks. PDS_AGAIN when the pool is full for now. */
static pds_status_t job_alloc(pf_sched_t *s, pf_job_t *j)
{
    if (j->has_kv) return PDS_OK;
    int need = PDS_DIV_UP(j->n_tokens, s->info.kv.block_size);
    if (need > s->info.kv.n_blocks) {
        pf_job_fail(j, PDS_ERR_EXHAUSTED,
                    "prompt of %d tokens needs %d KV blocks; this prefill node's pool has %d",
                    j->n_tokens, need, s->info.kv.n_blocks);
        return PDS_ERR_EXHAUSTED;
    }
    pds_status_t st = pds_kv_seq_grow(&j->kv, s->pool, s->info.kv.block_size, j->n_tokens, NULL);
    if (st == PDS_ERR_EXHAUSTED) return PDS_AGAIN;
    if (st != PDS_OK) {
        pf_job_fail(j, st, "KV blocks: %s", pds_err_detail());
        return st;
    }
    j->has_kv = true;
    return PDS_OK;
}

/* Fills b from the head of the wait list; b->n == 0 when nothing can run now. */
static void form_batch(pf_sched_t *s, batch_t *b)
{
    int budget = s->p.max_batch_tokens, tokens = 0;
    b->n = 0;
    pf_job_t *next;
    for (pf_job_t *j = s->wait_head; j && b->n < s->p.max_batch_seqs; j = next) {
        next = j->wait_next;
        int remaining = j->n_tokens - j->done_tokens;
        if (b->n > 0 && tokens + remaining > budget) break;
        pds_status_t st = job_alloc(s, j);
        if (st == PDS_AGAIN) break; /* the pool is full: wait for releases, keep the order */
        if (st != PDS_OK) {
            job_done(s, j);
            continue;
        }
        int chunk = PDS_MIN(remaining, budget);
        b->jobs[b->n] = j;
        b->chunk[b->n] = chunk;
        b->last[b->n] = chunk == remaining;
        b->n++;
        tokens += chunk;
        if (chunk < remaining) break; /* a chunked job runs alone */
    }
}

/* ---- forward
 * ------------------------------------------------------------------------------------- */
static void send_layer(pf_job_t *j, int layer, const void *base, const int32_t *ids)
{
    if (j->status != PDS_OK || !j->send) return;
    pds_status_t st = pds_kvx_send_layer(j->send, layer, base, ids);
    if (st != PDS_OK)
        pf_job_fail(j, st, "KV transfer to decode node %s failed at layer %d: %s",
                    j->decode_node_id, layer, pds_err_detail());
}

static void on_layer(void *ctx, int layer)
{
    batch_t *b = ctx;
    for (int i = 0; i < b->n; i++)
        if (b->last[i])
            send_layer(b->jobs[i], layer, b->s->layer_base[layer], b->jobs[i]->kv.blocks);
}

/* kvx's ready callback for a device pool (its staging thread): layer done on the GPU. */
static pds_status_t layer_ready(void *ctx, int layer)
{
    pf_sched_t *s = ctx;
    return pds_engine_layer_wait(s->e, layer);
}

static void run_batch(pf_sched_t *s, batch_t *b, pds_engine_seq_t *seqs)
{
    int64_t t0 = pds_time_now_ns();
    for (int i = 0; i < b->n; i++) {
        pf_job_t *j = b->jobs[i];
        if (j->done_tokens == 0) j->t_start_ns = t0;
        j->kv.n_tokens = j->done_tokens + b->chunk[i]; /* blocks for all tokens are allocated */
        seqs[i] = (pds_engine_seq_t){
            .tokens = j->tokens + j->done_tokens,
            .n_tokens = b->chunk[i],
            .kv = &j->kv,
            .sample = b->last[i] ? &j->sample : NULL,
            .token_out = b->last[i] ? &j->first_token : NULL,
        };
    }
    pthread_mutex_lock(&s->mu);
    s->load.running_seqs = b->n;
    pthread_mutex_unlock(&s->mu);

    pds_status_t st = pds_engine_forward(s->e, seqs, b->n, on_layer, b);
    int64_t t1 = pds_time_now_ns();
    if (st != PDS_OK)
        PDS_LOG_ERROR(MOD, "forward_failed seqs=%d status=%s detail=\"%s\"", b->n,
                      pds_status_name(st), pds_err_detail());
    for (int i = 0; i < b->n; i++) {
        pf_job_t *j = b->jobs[i];
        if (st != PDS_OK) {
            /* requests were validated on arrival: a refusal here is this node's fault */
            pf_job_fail(j, st == PDS_ERR_INVALID_ARG ? PDS_ERR_INTERNAL : st,
                        "prefill compute failed: %s", pds_err_detail());
            job_done(s, j);
            continue;
        }
        j->done_tokens += b->chunk[i];
        if (!b->last[i]) continue;
        j->t_end_ns = pds_time_now_ns();
        job_done(s, j);
    }
    float ms = (float)((t1 - t0) / 1e6);
    pthread_mutex_lock(&s->mu);
    s->load.running_seqs = 0;
    s->load.recent_batch_ms =
        s->load.recent_batch_ms == 0.0f ? ms : 0.8f * s->load.recent_batch_ms + 0.2f * ms;
    pthread_mutex_unlock(&s->mu);
    if (pds_log_enabled(PDS_LOG_DEBUG)) { /* the trace the SLO calibration reads (ended: ms ago) */
        int tokens = 0;
        for (int i = 0; i < b->n; i++) tokens += b->chunk[i];
        PDS_LOG_DEBUG(MOD, "batch seqs=%d tokens=%d ms=%.3f ended_ms_ago=%.3f status=%s", b->n,
                      tokens, (double)ms, (double)(pds_time_now_ns() - t1) / 1e6,
                      pds_status_name(st));
    }
}

static void update_load(pf_sched_t *s)
{
    pthread_mutex_lock(&s->mu);
    s->load.free_blocks = pds_kv_pool_free_count(s->pool);
    pthread_mutex_unlock(&s->mu);
}

static void *sched_main(void *arg)
{
    pf_sched_t *s = arg;
    batch_t b = {.s = s, .jobs = s->b_jobs, .chunk = s->b_chunk, .last = s->b_last};
    bool runnable = false;
    for (;;) {
        /* Block only when nothing can run: an empty list or a head waiting for blocks. */
        bool open = take_inbox(s, !runnable);
        drop_dead(s);
        update_load(s);
        if (!open && !s->wait_head) break;
        form_batch(s, &b);
        runnable = b.n > 0;
        if (runnable) {
            run_batch(s, &b, s->b_seqs);
            update_load(s);
            runnable = s->wait_head != NULL; /* more may run at once; re-check after the inbox */
        } else if (!open) {
            /* Closing with jobs still waiting for blocks that nobody will release: a caller bug
             * (destroy before every job was released). Leave them rather than spin. */
            PDS_LOG_ERROR(MOD, "engine_loop_stopped_with_jobs");
            break;
        }
    }
    return NULL;
}

static void free_tables(pf_sched_t *s)
{
    pds_free(s->layer_base);
    pds_free(s->b_jobs);
    pds_free(s->b_chunk);
    pds_free(s->b_last);
    pds_free(s->b_seqs);
    pds_free(s);
}

/* ---- public -------------------------------------------------------------------------------------
 */
pds_status_t pf_sched_create(pds_engine_t *e, const pf_sched_params_t *p, pf_sched_t **out)
{
    if (!e || !p || !p->done_fn || !p->release_fn || p->max_batch_tokens < 1 ||
        p->max_batch_seqs < 1)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "scheduler: bad parameters");
    pf_sched_t *s = pds_calloc(1, sizeof *s);
    if (!s) return PDS_ERR(PDS_ERR_NO_MEMORY, "scheduler");
    s->e = e;
    s->p = *p;
    s->pool = pds_engine_kv_pool(e);
    pds_engine_info(e, &s->info);
    s->p.max_batch_tokens = PDS_MIN(p->max_batch_tokens, s->info.max_batch_tokens);
    s->p.max_batch_seqs = PDS_MIN(p->max_batch_seqs, s->info.max_batch_seqs);
    pds_status_t st = PDS_OK;
    size_t cap = (size_t)s->p.max_batch_seqs;
    s->layer_base = pds_calloc((size_t)s->info.kv.n_layers, sizeof *s->layer_base);
    s->b_jobs = pds_malloc(cap * sizeof *s->b_jobs);
    s->b_chunk = pds_malloc(cap * sizeof *s->b_chunk);
    s->b_last = pds_malloc(cap * sizeof *s->b_last);
    s->b_seqs = pds_malloc(cap * sizeof *s->b_seqs);
    if (!s->layer_base || !s->b_jobs || !s->b_chunk || !s->b_last || !s->b_seqs) {
        st = PDS_ERR(PDS_ERR_NO_MEMORY, "scheduler tables for %zu sequences", cap);
        goto undo_state;
    }
    for (int l = 0; l < s->info.kv.n_layers; l++) {
        size_t bytes;
        st = pds_engine_kv_layer_memory(e, l, &s->layer_base[l], &bytes, &s->on_device);
        if (st != PDS_OK) goto undo_state;
    }
    /* The pool is the transfer source (a host pool too: that is how NCCL + a CPU engine is
     * refused at start-up rather than at the first request). */
    if (p->kvx)
        st = pds_kvx_register_source(p->kvx, &s->info.kv, s->layer_base,
                                     s->on_device ? PDS_KVX_MEM_CUDA : PDS_KVX_MEM_HOST,
                                     layer_ready, s);
    else if (s->on_device)
        st = PDS_ERR(PDS_ERR_INVALID_ARG, "scheduler: a device pool needs params.kvx");
    if (st != PDS_OK) goto undo_state;
    s->load.total_blocks = s->info.kv.n_blocks;
    s->load.free_blocks = pds_kv_pool_free_count(s->pool);
    pf_fifo_init(&s->in);
    pthread_mutex_init(&s->mu, NULL);
    if (pthread_create(&s->thread, NULL, sched_main, s) != 0) {
        st = PDS_ERR(PDS_ERR_INTERNAL, "scheduler: cannot start the engine loop thread");
        goto undo_sync;
    }
    *out = s;
    return PDS_OK;
undo_sync:
    pthread_mutex_destroy(&s->mu);
    pf_fifo_fini(&s->in);
undo_state:
    free_tables(s);
    return st;
}

void pf_sched_destroy(pf_sched_t *s)
{
    if (!s) return;
    pf_fifo_close(&s->in);
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->mu);
    pf_fifo_fini(&s->in);
    free_tables(s);
}

void pf_sched_submit(pf_sched_t *s, pf_job_t *job)
{
    job->cmd = PF_SCHED_SUBMIT;
    pf_fifo_push(&s->in, job);
}

void pf_sched_release(pf_sched_t *s, pf_job_t *job)
{
    job->cmd = PF_SCHED_RELEASE;
    pf_fifo_push(&s->in, job);
}

void pf_sched_kick(pf_sched_t *s)
{
    pf_fifo_kick(&s->in);
}

void pf_sched_load(pf_sched_t *s, pf_sched_load_t *out)
{
    pthread_mutex_lock(&s->mu);
    *out = s->load;
    pthread_mutex_unlock(&s->mu);
}

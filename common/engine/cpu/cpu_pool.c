/* cpu_pool.c: the CPU backend's worker threads — a fork/join "parallel for" over item indices.
 *
 * The backend calls it a few times per layer (each linear layer split by output columns, attention
 * split by (sequence, KV head), row-wise norms), so the hand-off must cost microseconds: workers
 * spin on a generation counter for a short while before sleeping on a condition variable, and the
 * calling thread works as thread 0 instead of waiting idle. Items are claimed from an atomic
 * counter, which balances sequences of different lengths. OpenBLAS runs single-threaded inside the
 * items (the backend sets it so): one level of parallelism, owned here, with no second pool of
 * spinning BLAS threads competing for the same cores.
 */
#include "engine/cpu/cpu_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#define SPIN_ITERS 20000 /* ~tens of microseconds of polling before sleeping */
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

struct cpu_pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    int n_started;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    atomic_uint_fast64_t gen;
    atomic_int next;
    int n_items;
    int running; /* workers still inside the current generation (under mu) */
    bool stop;
    cpu_pool_fn fn;
    void *arg;
};

typedef struct {
    cpu_pool_t *p;
    int tid;
} worker_arg_t;

static void run_items(cpu_pool_t *p, int tid)
{
    for (;;) {
        int i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (i >= p->n_items) break;
        p->fn(p->arg, i, tid);
    }
}

static void *worker(void *argp)
{
    worker_arg_t a = *(worker_arg_t *)argp;
    pds_free(argp);
    cpu_pool_t *p = a.p;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = atomic_load_explicit(&p->gen, memory_order_acquire);
        for (int s = 0; g == seen && s < SPIN_ITERS; s++) {
            CPU_RELAX();
            g = atomic_load_explicit(&p->gen, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen && !p->stop)
                pthread_cond_wait(&p->cv_work, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (p->stop) return NULL;
        seen = g;
        run_items(p, a.tid);
        pthread_mutex_lock(&p->mu);
        if (--p->running == 0) pthread_cond_signal(&p->cv_done);
        pthread_mutex_unlock(&p->mu);
    }
}

pds_status_t pds_engine_cpu_pool_create(int n_threads, cpu_pool_t **out)
{
    cpu_pool_t *p = pds_calloc(1, sizeof *p);
    if (!p) return PDS_ERR(PDS_ERR_NO_MEMORY, "cpu pool");
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->next, 0);
    pds_status_t s = PDS_OK;
    if (p->n_threads > 1) {
        p->threads = pds_calloc((size_t)p->n_threads - 1, sizeof(pthread_t));
        if (!p->threads) {
            s = PDS_ERR(PDS_ERR_NO_MEMORY, "cpu pool: %d threads", p->n_threads);
            goto fail;
        }
    }
    for (int t = 1; t < p->n_threads; t++) {
        worker_arg_t *a = pds_malloc(sizeof *a);
        if (!a) {
            s = PDS_ERR(PDS_ERR_NO_MEMORY, "cpu pool: thread argument");
            goto fail;
        }
        *a = (worker_arg_t){p, t};
        int rc = pthread_create(&p->threads[t - 1], NULL, worker, a);
        if (rc != 0) {
            pds_free(a);
            s = PDS_ERR(PDS_ERR_INTERNAL, "cpu pool: pthread_create: %s", strerror(rc));
            goto fail;
        }
        p->n_started++;
    }
    *out = p;
    return PDS_OK;
fail:
    pds_engine_cpu_pool_destroy(p);
    return s;
}

void pds_engine_cpu_pool_destroy(cpu_pool_t *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int t = 0; t < p->n_started; t++) pthread_join(p->threads[t], NULL);
    pthread_cond_destroy(&p->cv_done);
    pthread_cond_destroy(&p->cv_work);
    pthread_mutex_destroy(&p->mu);
    pds_free(p->threads);
    pds_free(p);
}

void pds_engine_cpu_pool_run(cpu_pool_t *p, int n_items, cpu_pool_fn fn, void *arg)
{
    if (n_items <= 0) return;
    if (p->n_started == 0 || n_items == 1) {
        for (int i = 0; i < n_items; i++) fn(arg, i, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_items = n_items;
    atomic_store(&p->next, 0);
    p->running = p->n_started;
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    run_items(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->running > 0) pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

/* queue.c: the hand-over queue between a node's threads (RPC thread -> engine loop, engine loop
 * -> stream senders). A growable ring buffer under one mutex; the condition variable is signalled
 * on every push so an idle owner wakes at once. Contention is low (one push per request event). */
#include "base/base.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

struct pds_queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    void **items;
    size_t cap, head, len;
    bool closed;
};

pds_status_t pds_queue_create(pds_queue_t **out)
{
    pds_queue_t *q = pds_calloc(1, sizeof *q);
    if (!q) return PDS_ERR(PDS_ERR_NO_MEMORY, "queue");
    q->cap = 16;
    q->items = pds_malloc(q->cap * sizeof *q->items);
    if (!q->items) {
        pds_free(q);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "queue items");
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, &ca);
    pthread_condattr_destroy(&ca);
    *out = q;
    return PDS_OK;
}

void pds_queue_destroy(pds_queue_t *q)
{
    if (!q) return;
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    pds_free(q->items);
    pds_free(q);
}

pds_status_t pds_queue_push(pds_queue_t *q, void *item)
{
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        return PDS_ERR(PDS_ERR_CANCELLED, "queue closed");
    }
    if (q->len == q->cap) {
        void **n = pds_malloc(2 * q->cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&q->mu);
            return PDS_ERR(PDS_ERR_NO_MEMORY, "queue grow to %zu", 2 * q->cap);
        }
        for (size_t i = 0; i < q->len; i++) n[i] = q->items[(q->head + i) % q->cap];
        pds_free(q->items);
        q->items = n;
        q->head = 0;
        q->cap *= 2;
    }
    q->items[(q->head + q->len) % q->cap] = item;
    q->len++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    return PDS_OK;
}

pds_status_t pds_queue_pop(pds_queue_t *q, double timeout_ms, void **item)
{
    struct timespec deadline;
    if (timeout_ms > 0) {
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        long long ns = deadline.tv_nsec + (long long)(timeout_ms * 1e6);
        deadline.tv_sec += (time_t)(ns / 1000000000LL);
        deadline.tv_nsec = (long)(ns % 1000000000LL);
    }
    pthread_mutex_lock(&q->mu);
    while (q->len == 0 && !q->closed) {
        if (timeout_ms == 0) break;
        if (timeout_ms < 0) {
            pthread_cond_wait(&q->cv, &q->mu);
        } else if (pthread_cond_timedwait(&q->cv, &q->mu, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    pds_status_t s;
    if (q->len > 0) {
        *item = q->items[q->head];
        q->head = (q->head + 1) % q->cap;
        q->len--;
        s = PDS_OK;
    } else {
        s = q->closed ? PDS_ERR_CANCELLED : PDS_AGAIN;
    }
    pthread_mutex_unlock(&q->mu);
    return s;
}

size_t pds_queue_len(pds_queue_t *q)
{
    pthread_mutex_lock(&q->mu);
    size_t n = q->len;
    pthread_mutex_unlock(&q->mu);
    return n;
}

void pds_queue_close(pds_queue_t *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = true;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

/* job.c: the job's memory and the intrusive FIFO. The FIFO links jobs through job->fifo_next, so
 * handing a job to another thread can never fail for lack of memory — which matters on the paths
 * that give KV blocks back. */
#include "job.h"

#include <stdarg.h>
#include <stdio.h>

void pf_job_free(pf_job_t *j)
{
    if (!j) return;
    pds_free(j->request_id);
    pds_free(j->tokens);
    pds_free(j->stop);
    pds_free(j->router_id);
    pds_free(j->decode_node_id);
    pds_free(j->decode_address);
    pds_free(j->decode_kvx_addr);
    pds_free(j->slo_class);
    pds_kv_seq_fini(&j->kv);
    pds_free(j);
}

void pf_job_fail(pf_job_t *j, pds_status_t s, const char *fmt, ...)
{
    if (j->status != PDS_OK) return;
    j->status = s;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->err, sizeof j->err, fmt, ap);
    va_end(ap);
}

void pf_fifo_init(pf_fifo_t *f)
{
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    f->head = f->tail = NULL;
    f->closed = f->kicked = false;
}

void pf_fifo_fini(pf_fifo_t *f)
{
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cv);
}

void pf_fifo_push(pf_fifo_t *f, pf_job_t *j)
{
    j->fifo_next = NULL;
    pthread_mutex_lock(&f->mu);
    if (f->tail)
        f->tail->fifo_next = j;
    else
        f->head = j;
    f->tail = j;
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

void pf_fifo_kick(pf_fifo_t *f)
{
    pthread_mutex_lock(&f->mu);
    f->kicked = true;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

pf_job_t *pf_fifo_pop(pf_fifo_t *f, bool wait, bool *closed)
{
    pthread_mutex_lock(&f->mu);
    while (wait && !f->head && !f->kicked && !f->closed) pthread_cond_wait(&f->cv, &f->mu);
    pf_job_t *j = f->head;
    if (j) {
        f->head = j->fifo_next;
        if (!f->head) f->tail = NULL;
        j->fifo_next = NULL;
    } else {
        f->kicked = false;
    }
    if (closed) *closed = f->closed;
    pthread_mutex_unlock(&f->mu);
    return j;
}

void pf_fifo_close(pf_fifo_t *f)
{
    pthread_mutex_lock(&f->mu);
    f->closed = true;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

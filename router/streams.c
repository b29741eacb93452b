/* streams.c: one TokenStream per decode node. A reader thread opens DecodeNode/TokenStream with
 * this router's id and hands every SeqTokens of every TokenBatch to requests.c. One message per
 * decode step carries all of this router's sequences on that node, so the per-token cost is one
 * hash lookup, independent of the number of streams.
 *
 * When the stream breaks the reader re-opens it once; if that fails too (or the node stopped
 * reporting) the node is marked DOWN and its requests are re-placed. A reader belongs to one
 * registration `generation`: a node that re-registers gets a fresh reader and the old one exits. */
#include <stdio.h>
#include <string.h>

#include "router/router.h"

typedef struct {
    router_t *r;
    node_t *d;
    uint64_t generation;
} reader_arg_t;

static bool reader_current(router_t *r, node_t *d, uint64_t gen)
{
    pthread_mutex_lock(&r->mu);
    bool cur = d->generation == gen && !atomic_load(&d->reader_stop) && !atomic_load(&r->stopping);
    pthread_mutex_unlock(&r->mu);
    return cur;
}

static void *reader_main(void *arg)
{
    reader_arg_t a = *(reader_arg_t *)arg;
    pds_free(arg);
    router_t *r = a.r;
    node_t *d = a.d;
    int failures = 0;
    while (reader_current(r, d, a.generation)) {
        Pdserve__V1__TokenStreamRequest req = PDSERVE__V1__TOKEN_STREAM_REQUEST__INIT;
        req.router_id = r->cfg.id;
        req.router_epoch = r->epoch;
        pds_rpc_stream_t *st = NULL;
        pds_status_t s = pds_rpc_stream_open(d->ch, "/pdserve.v1.DecodeNode/TokenStream", &req.base,
                                             &pdserve__v1__token_batch__descriptor, 0, &st);
        if (s == PDS_OK) {
            pthread_mutex_lock(&r->mu);
            d->stream = st;
            pthread_mutex_unlock(&r->mu);
            ProtobufCMessage *m = NULL;
            while ((s = pds_rpc_stream_next(st, &m)) == PDS_OK && m) {
                failures = 0;
                Pdserve__V1__TokenBatch *b = (Pdserve__V1__TokenBatch *)m;
                int64_t ctx = 0;
                int known = 0;
                for (size_t i = 0; i < b->n_seqs; i++) {
                    int64_t c = router_on_seq_tokens(r, d->id, b->seqs[i]);
                    ctx += c;
                    known += c > 0;
                }
                /* a step of `known` sequences over ctx tokens took step_ms: a refit sample
                 * (batches that also carry unknown sequences would mislead it) */
                if (b->step_ms > 0 && known > 0 && (size_t)known == b->n_seqs)
                    router_observe_step(r, d, known, (double)ctx, b->step_ms);
                pds_rpc_msg_free(m);
            }
            pthread_mutex_lock(&r->mu);
            d->stream = NULL;
            pthread_mutex_unlock(&r->mu);
            pds_rpc_stream_destroy(st);
        }
        if (!reader_current(r, d, a.generation)) break;
        PDS_LOG_WARN("router", "token_stream_broken node=%s status=%s detail=\"%s\"", d->id,
                     pds_status_name(s), pds_err_detail());
        if (++failures >= 2) {
            pthread_mutex_lock(&r->mu);
            bool cur = d->generation == a.generation;
            if (cur) router_node_mark_down(r, d, "token stream lost");
            pthread_mutex_unlock(&r->mu);
            if (cur) router_on_decode_down(r, d);
            break;
        }
        pds_time_sleep_ms(20);
    }
    return NULL;
}

/* Router mu held. Starts (or restarts) the reader of decode node d for its current generation. */
void router_stream_start(router_t *r, node_t *d)
{
    if (d->reader_running) {
        /* the old reader exits once it sees the new generation; cancel its stream to wake it */
        if (d->stream) pds_rpc_stream_cancel(d->stream);
        pthread_mutex_unlock(&r->mu);
        pthread_join(d->reader, NULL);
        pthread_mutex_lock(&r->mu);
        d->reader_running = false;
    }
    reader_arg_t *a = pds_malloc(sizeof *a);
    if (!a) {
        PDS_LOG_ERROR("router", "no_memory for token stream reader node=%s", d->id);
        return;
    }
    a->r = r;
    a->d = d;
    a->generation = d->generation;
    atomic_store(&d->reader_stop, false);
    if (pthread_create(&d->reader, NULL, reader_main, a) != 0) {
        pds_free(a);
        PDS_LOG_ERROR("router", "thread_create failed for token stream reader node=%s", d->id);
        return;
    }
    d->reader_running = true;
}

void router_streams_stop(router_t *r)
{
    pthread_mutex_lock(&r->mu);
    for (node_t *n = r->nodes; n; n = n->next) {
        atomic_store(&n->reader_stop, true);
        if (n->stream) pds_rpc_stream_cancel(n->stream);
    }
    pthread_mutex_unlock(&r->mu);
    for (node_t *n = r->nodes; n; n = n->next) {
        if (n->reader_running) pthread_join(n->reader, NULL);
        n->reader_running = false;
    }
}

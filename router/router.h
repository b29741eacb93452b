/* router.h: internals of pdserve-router, shared by its files.
 *
 *   main.c      configuration, wiring, shutdown
 *   nodes.c     the node table: registration, load reports, liveness, placement choice
 *   requests.c  one request's life: validation, placement attempts, the prefill call, relaying
 *               tokens in order to the client, summary, cancellation, re-placement on failure
 *   streams.c   one TokenStream reader thread per decode node, dispatching TokenBatches
 *   service.c   the gRPC handlers (Pdserve + RouterInternal)
 *
 * Locking: one router mutex `mu` guards the node table and the request map (short critical
 * sections, no RPC under it). Each request has its own mutex for its token buffer and client
 * stream. Lock order: router mu, then a request's mu. Blocking RPCs (Prefill, Cancel) run on the
 * worker pool, never on the RPC thread.
 */
#ifndef PDS_ROUTER_H
#define PDS_ROUTER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"
#include "config/config.h"
#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"
#include "sample/sample.h"

typedef struct {
    char id[64];
    char listen[128];
    char port_file[256];
    int workers;
    int64_t report_interval_ns;
    int64_t node_timeout_ns;
    int64_t prefill_timeout_ns;
    int64_t place_timeout_ns;
    char nodes[1024]; /* comma-separated host:port of nodes expected (shown DOWN until they
                         register) */
    int log_level;
} router_config_t;

typedef struct router router_t;
typedef struct request request_t;

typedef struct node {
    struct node *next;
    char id[64];
    char address[128];
    int role;                     /* Pdserve__V1__NodeRole */
    int state;                    /* Pdserve__V1__NodeState */
    Pdserve__V1__NodeInfo *info;  /* as registered (unpacked copy; NULL for config-only nodes) */
    Pdserve__V1__LoadReport last; /* scalar fields of the latest report */
    uint64_t last_seq;
    int64_t last_report_ns;
    /* placed by us since the last report: keeps a burst of requests from all picking one node */
    int64_t inflight_tokens;
    int64_t inflight_blocks;
    pds_rpc_channel_t *ch;
    /* decode nodes: the TokenStream reader */
    pthread_t reader;
    bool reader_running;
    pds_rpc_stream_t *stream;
    atomic_bool reader_stop;
    uint64_t generation; /* bumps at each (re-)registration; stale readers exit */
} node_t;

struct router {
    router_config_t cfg;
    pthread_mutex_t mu;
    node_t *nodes;
    uint64_t epoch;
    int64_t start_ns;
    /* model facts, from the first registered node; later nodes must match */
    bool have_model;
    uint64_t model_fingerprint;
    uint32_t vocab, max_context, block_size;
    int32_t bos, eos;
    /* requests by id: chained hash table */
    request_t **buckets;
    size_t n_buckets, n_requests;
    uint64_t next_req;
    uint64_t seed_counter;
    pds_queue_t *work; /* jobs for the worker pool */
    pthread_t *workers;
    int n_workers;
    pthread_t monitor;
    atomic_bool stopping;
    pds_rpc_server_t *server;
    /* counters */
    atomic_llong n_ok, n_failed, n_cancelled, n_replaced;
};

/* ---- nodes.c ---- */
pds_status_t router_node_register(router_t *r, const Pdserve__V1__NodeInfo *info);
pds_status_t router_node_report(router_t *r, const Pdserve__V1__LoadReport *rep, bool *reregister);
/* Picks a prefill and a decode node for a request of n_tokens, preferring nodes not in the
 * avoid lists. Takes router mu. PDS_ERR_UNAVAILABLE when no node of a role is UP. The returned
 * nodes stay valid for the router's life (nodes are never freed before shutdown). */
pds_status_t router_place(router_t *r, int64_t n_tokens, const char *avoid_p, const char *avoid_d,
                          node_t **p, node_t **d);
void router_node_release(router_t *r, node_t *p, node_t *d, int64_t n_tokens);
node_t *router_node_find(router_t *r, const char *id); /* router mu held */
void router_node_mark_down(router_t *r, node_t *n, const char *why);
void router_nodes_fill_status(router_t *r, Pdserve__V1__ClusterStatusReply *reply,
                              Pdserve__V1__NodeStatus *store, Pdserve__V1__NodeStatus **ptrs,
                              size_t cap);
void *router_monitor_main(void *arg);
void router_nodes_destroy(router_t *r);

/* ---- streams.c ---- */
void router_stream_start(router_t *r, node_t *d); /* router mu held */
void router_streams_stop(router_t *r);

/* ---- requests.c ---- */
/* Handles a Generate call (RPC thread): validates, creates the request, queues its placement. */
void router_generate(router_t *r, pds_rpc_call_t *call, const Pdserve__V1__GenerateRequest *req);
void router_generate_cancelled(router_t *r, pds_rpc_call_t *call);
/* Tokens from a decode node's TokenStream. */
void router_on_seq_tokens(router_t *r, const char *decode_id, const Pdserve__V1__SeqTokens *st);
/* A decode node died: re-place its requests. */
void router_on_decode_down(router_t *r, node_t *d);
size_t router_active_requests(router_t *r); /* router mu held */
void *router_worker_main(void *arg);
void router_requests_destroy(router_t *r);

/* ---- service.c ---- */
pds_status_t router_service_add(router_t *r, pds_rpc_server_t *srv);

#endif /* PDS_ROUTER_H */

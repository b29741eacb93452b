/* router.h: internals of pdserve-router, shared by its files.
 *
 *   main.c      configuration, wiring, shutdown
 *   nodes.c     the node table: registration, load reports, liveness, placement choice
 *   requests.c  one request's life: validation, placement attempts, the prefill call, relaying
 *               tokens in order to the client, summary, cancellation, re-placement on failure
 *   streams.c   one TokenStream reader thread per decode node, dispatching TokenBatches
 *   slo.c       SLO placement: classes, node latency models (profiles, online refit), the choice
 *               of a (prefill, decode) pair or a colocated node's local prefill, and the counters
 *               of predicted vs actual latencies
 *   service.c   the gRPC handlers (Pdserve + RouterInternal)
 *
 * Locking: one router mutex `mu` guards the node table and the request map (short critical
 * sections, no RPC under it). Each request has its own mutex for its token buffer and client
 * stream. Lock order: router mu, then a request's mu; `slo_mu` (the SLO counters) is a leaf.
 * Blocking RPCs (Prefill, Cancel) run on the worker pool, never on the RPC thread.
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
#include "slo/slo.h"

#define ROUTER_MAX_CLASSES 16

typedef enum { ROUTER_PLACE_LEAST_LOADED = 0, ROUTER_PLACE_SLO } router_placement_t;

/* A named SLO class from [slo] classes. */
typedef struct {
    char name[32];
    double ttft_ms, tpot_ms;
} router_slo_class_t;

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
    /* [slo] */
    int placement; /* router_placement_t */
    int policy;    /* pds_slo_policy_t */
    int64_t queue_deadline_ns;
    char classes[1024];     /* name:ttft_ms:tpot_ms,... */
    char default_class[32]; /* "" = no targets unless the request gives them */
    double tpot_weight;
    char profile[512], prefill_profile[512], decode_profile[512], colocated_profile[512];
    bool refit;
    int refit_window;
    bool local_prefill; /* may prefill on a colocated node instead of transferring */
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
    /* what this router placed and has not seen end (slo.c): prompt tokens whose prefill has not
     * returned, and sequences decoding here with their expected mean context */
    int64_t out_prefill_tokens;
    int active_seqs;
    int64_t active_ctx;
    /* latency model (slo.c); valid when have_model */
    bool have_model;
    pds_slo_model_t model;
    pds_slo_refit_t *refit;
    int refit_new; /* samples since the last refit */
    int max_batch_tokens;
    int chunk_tokens; /* colocated: step budget when chunked; 0 = prefill-first */
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
    atomic_int n_waiting; /* requests waiting for a placement */
    /* SLO placement (slo.c): immutable after startup */
    router_slo_class_t classes[ROUTER_MAX_CLASSES];
    int n_classes;
    int default_class;         /* index, -1 = none */
    pds_slo_profile_t prof[3]; /* by role: prefill, decode, colocated */
    bool have_prof[3];
    /* SLO counters, under slo_mu */
    pthread_mutex_t slo_mu;
    struct {
        uint64_t placed, placed_meeting, placed_best_effort, placed_local, queued, rejected;
        uint64_t finished, met_predicted, met_actual, n_pred, n_tpot, refits;
        double ttft_abs_err, tpot_abs_err, ttft_err, tpot_err; /* sums of relative errors */
    } slo;
};

/* What a placement decided (nodes.c / slo.c). */
typedef struct {
    node_t *p, *d; /* p == d: local prefill on the colocated node d */
    bool local;
    bool predicted; /* SLO placement: the predictions below are set */
    bool meets;
    double pred_ttft_ms, pred_tpot_ms, slack;
    /* what the placement charged to the nodes (given back by router_unplace) */
    int64_t prefill_tokens, ctx_tokens;
} router_choice_t;

/* One request as placement sees it. */
typedef struct {
    int64_t n_tokens;        /* prompt + already generated */
    int64_t outputs;         /* output tokens still to come (expected) */
    double ttft_ms, tpot_ms; /* targets, <= 0 = none */
    double waited_ms;
    const char *avoid_p, *avoid_d;
    const char *request_id; /* for the decision log */
    bool first_try;         /* count a queued request once */
} router_place_in_t;

/* Roles that decode (take KV transfers and run a decode batch): decode and colocated. */
#define ROUTER_DECODES(role)                               \
    ((role) == PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE || \
     (role) == PDSERVE__V1__NODE_ROLE__NODE_ROLE_COLOCATED)

/* ---- nodes.c ---- */
pds_status_t router_node_register(router_t *r, const Pdserve__V1__NodeInfo *info);
pds_status_t router_node_report(router_t *r, const Pdserve__V1__LoadReport *rep, bool *reregister);
/* Picks a prefill and a decode node for a request of n_tokens, preferring nodes not in the
 * avoid lists. Takes router mu. PDS_ERR_UNAVAILABLE when no node of a role is UP. The returned
 * nodes stay valid for the router's life (nodes are never freed before shutdown). */
pds_status_t router_place(router_t *r, int64_t n_tokens, const char *avoid_p, const char *avoid_d,
                          node_t **p, node_t **d, bool *local);
node_t *router_node_find(router_t *r, const char *id); /* router mu held */
void router_node_mark_down(router_t *r, node_t *n, const char *why);
void router_nodes_fill_status(router_t *r, Pdserve__V1__ClusterStatusReply *reply,
                              Pdserve__V1__NodeStatus *store, Pdserve__V1__NodeStatus **ptrs,
                              Pdserve__V1__LatencyModel *lat_store, size_t cap);
void *router_monitor_main(void *arg);
void router_nodes_destroy(router_t *r);

/* ---- slo.c ---- */
/* Parses [slo] (classes, profiles) into r; an error message names the key. */
pds_status_t router_slo_setup(router_t *r);
/* Targets of a request: its own, else its class's, else the default class's. */
void router_slo_targets(router_t *r, const Pdserve__V1__Slo *slo, double *ttft_ms, double *tpot_ms,
                        char *class_name, size_t cap);
/* Router mu held. The latency model of a (re-)registered node: its NodeInfo.latency when set,
 * else the profile of its role. */
/* Copies the latency coefficients of a wire LatencyModel into m (the link terms only when the
 * node measured them; decode as one line). Other fields of m are left as they are. */
void router_model_from_proto(const Pdserve__V1__LatencyModel *lm, pds_slo_model_t *m);
void router_node_model_init(router_t *r, node_t *n);
/* Places a request (either placement mode): PDS_OK with *out filled and charged to the nodes;
 * PDS_AGAIN (wait and ask again), PDS_ERR_EXHAUSTED (reject; message with the predictions),
 * PDS_ERR_UNAVAILABLE (no node of a needed role). Takes router mu. */
pds_status_t router_place_request(router_t *r, const router_place_in_t *in, router_choice_t *out);
/* The prefill part of a placement is over (reply, failure or first local token). */
void router_unplace_prefill(router_t *r, router_choice_t *c);
/* The request left its decode node (finished, failed, re-placed). */
void router_unplace_decode(router_t *r, router_choice_t *c);
/* Timings for the online refit: a prefill of `tokens` took ms; a decode step of `batch`
 * sequences with `ctx` context tokens took ms. Take router mu. */
void router_observe_prefill(router_t *r, node_t *p, double tokens, double ms);
void router_observe_step(router_t *r, node_t *d, double batch, double ctx, double ms);
/* A finished request's predicted vs measured latencies (logged and counted). */
void router_slo_outcome(router_t *r, const char *req_id, const router_choice_t *c,
                        double ttft_target, double tpot_target, double ttft_ms, double tpot_ms,
                        int n_tokens);
void router_slo_fill_status(router_t *r, Pdserve__V1__SloStats *out);

/* ---- streams.c ---- */
void router_stream_start(router_t *r, node_t *d); /* router mu held */
void router_streams_stop(router_t *r);

/* ---- requests.c ---- */
/* Handles a Generate call (RPC thread): validates, creates the request, queues its placement. */
void router_generate(router_t *r, pds_rpc_call_t *call, const Pdserve__V1__GenerateRequest *req);
void router_generate_cancelled(router_t *r, pds_rpc_call_t *call);
/* Tokens from a decode node's TokenStream. Returns the request's context in tokens (prompt +
 * outputs so far), 0 when the request is unknown: the reader sums it for the decode refit. */
int64_t router_on_seq_tokens(router_t *r, const char *decode_id, const Pdserve__V1__SeqTokens *st);
/* A decode node died: re-place its requests. */
void router_on_decode_down(router_t *r, node_t *d);
size_t router_active_requests(router_t *r); /* router mu held */
void *router_worker_main(void *arg);
void router_requests_destroy(router_t *r);

/* ---- service.c ---- */
pds_status_t router_service_add(router_t *r, pds_rpc_server_t *srv);

#endif /* PDS_ROUTER_H */

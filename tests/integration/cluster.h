/* cluster: the harness of the multi-process integration tests — starts a router and prefill and
 * decode nodes as real processes on loopback, waits for them, drives them through the public API
 * and computes the single-process reference the cluster must reproduce token for token.
 *
 * Processes. Each child is fork+exec'ed from the calling (test main) thread with its stdout and
 * stderr in files under $PDS_TEST_TMP/integ/<name>-<pid>-<n>/ (<id>.out, <id>.log); the READY
 * line is read back from <id>.out. Children get PR_SET_PDEATHSIG(SIGKILL), so a test process
 * that dies (failed assertion, Criterion timeout, crash) takes its cluster with it;
 * pdt_cluster_destroy stops everything in order (SIGTERM, then SIGKILL after a grace period) and
 * is what a test's .fini calls. Every failure message names the child and carries the tail of its
 * log.
 *
 * Functions returning bool write what went wrong into pdt_cluster_error(c) (thread-unsafe: call
 * them from the test thread); the client helpers (pdt_generate*) are thread-safe.
 */
#ifndef PDT_CLUSTER_H
#define PDT_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "base/base.h"
#include "engine/engine.h"
#include "rpc/rpc.h"

#define PDT_MAX_PROCS  16
#define PDT_MAX_PROMPT 1024
#define PDT_MAX_OUT    1024

typedef enum { PDT_ROUTER = 0, PDT_PREFILL, PDT_DECODE } pdt_role_t;

typedef struct pdt_cluster pdt_cluster_t;

/* A fresh cluster (no process yet) whose children run with UCX_TLS=ucx_tls (NULL = "tcp") and
 * UCX_NET_DEVICES=lo. NULL if the log directory cannot be made. */
pdt_cluster_t *pdt_cluster_create(const char *name, const char *ucx_tls);
/* Stops every child (SIGTERM, up to 5 s, then SIGKILL) and frees. Children that had died on
 * their own are reported on stderr with their log tail. Accepts NULL. */
void pdt_cluster_destroy(pdt_cluster_t *c);
/* Model preset of the nodes spawned from now on (default "tiny"). */
void pdt_cluster_set_preset(pdt_cluster_t *c, const char *preset);
const char *pdt_cluster_error(const pdt_cluster_t *c);
const char *pdt_cluster_dir(const pdt_cluster_t *c);

/* Starts pdserve-router and waits for its READY line (timeout 20 s). extra: NULL-terminated list
 * of more flags, or NULL. */
bool pdt_cluster_start_router(pdt_cluster_t *c, const char *const *extra);
/* Starts a node (the cluster's preset, model seed 1, one engine thread, kvx ucx, registered with
 * the router) without waiting; kv_tokens 0 = 4096. */
bool pdt_cluster_spawn_node(pdt_cluster_t *c, pdt_role_t role, const char *id, int64_t kv_tokens,
                            const char *const *extra);
/* Waits for the READY line of every spawned child that has not printed it yet. */
bool pdt_cluster_wait_ready(pdt_cluster_t *c, int timeout_ms);
/* Router + n_prefill "p0".. + n_decode "d0".. (all with the given pools), READY, and all UP in
 * ClusterStatus. */
bool pdt_cluster_start(pdt_cluster_t *c, int n_prefill, int n_decode, int64_t prefill_kv_tokens,
                       int64_t decode_kv_tokens);

const char *pdt_cluster_router(const pdt_cluster_t *c); /* host:port of the router */
/* Address from the READY line of a child by id ("router" for the router); NULL if unknown. */
const char *pdt_cluster_addr(const pdt_cluster_t *c, const char *id);
/* Sends `sig` to a child; with SIGKILL also reaps it (it is then expected to be dead). */
bool pdt_cluster_kill(pdt_cluster_t *c, const char *id, int sig);
/* Lines of child `id`'s log containing `needle` (-1 if there is no log): what a test uses to
 * check that a path it means to exercise (a refusal, a preemption) was taken. */
int pdt_cluster_log_count(pdt_cluster_t *c, const char *id, const char *needle);
/* False (error names it, with its log tail) if a child we did not stop has exited. */
bool pdt_cluster_check_alive(pdt_cluster_t *c);

/* ClusterStatusReply.active_requests now; -1 if the call fails. */
int pdt_cluster_active(pdt_cluster_t *c);
/* ClusterStatus polling (every 50 ms, up to timeout_ms). */
/* Every started, not killed node is listed UP. */
bool pdt_cluster_wait_up(pdt_cluster_t *c, int timeout_ms);
/* Node `id` is listed with state (Pdserve__V1__NodeState), or, for DOWN, no longer listed. */
bool pdt_cluster_wait_state(pdt_cluster_t *c, const char *id, int state, int timeout_ms);
/* Node `id` reports at least min_seqs running sequences. */
bool pdt_cluster_wait_running(pdt_cluster_t *c, const char *id, int min_seqs, int timeout_ms);
/* Every node listed UP has free_kv_blocks == total_kv_blocks > 0, and the router has no active
 * or queued request. */
bool pdt_cluster_wait_idle(pdt_cluster_t *c, int timeout_ms);

/* ---- requests -------------------------------------------------------------------------------- */
typedef struct {
    char id[48];
    const char *text; /* text prompt, or NULL for prompt[] */
    int32_t prompt[PDT_MAX_PROMPT];
    int n_prompt;
    uint32_t max_tokens;
    float temperature, top_p;
    int32_t top_k;
    bool has_seed;
    uint64_t seed;
    int32_t stop[8];
    int n_stop;
    bool ignore_eos;
    const char *slo_class;  /* GenerateRequest.slo when any of these is set */
    float ttft_ms, tpot_ms; /* 0 = the class's (or the router's default) */
} pdt_req_t;

typedef struct {
    pds_status_t status; /* of the stream: PDS_OK when it ended OK */
    char message[512];   /* the server's status message when not OK */
    int32_t tokens[PDT_MAX_OUT];
    int n_tokens;
    bool in_order;     /* every chunk's index == tokens received before it */
    bool text_matches; /* every chunk's text == the byte decoding of its ids */
    int n_chunks;
    bool has_summary;
    bool summary_last;   /* exactly one summary, and nothing came after it */
    int n_after_summary; /* messages after the first summary */
    /* Summary */
    char request_id[64], prefill_node[64], decode_node[64];
    int finish_reason; /* Pdserve__V1__FinishReason */
    uint32_t prompt_tokens, output_tokens, replacements;
    uint64_t seed;
    float ttft_ms, tpot_mean_ms;
} pdt_res_t;

/* One Generate call, collecting everything. Returns res->status. */
pds_status_t pdt_generate(const char *router, const pdt_req_t *req, pdt_res_t *res, int timeout_ms);
/* n calls at once, one thread each. */
void pdt_generate_many(const char *router, const pdt_req_t *reqs, pdt_res_t *res, int n,
                       int timeout_ms);
/* Opens a Generate stream and returns once `n_tokens` tokens arrived (or the stream ended);
 * *st stays open for the caller to cancel/destroy. Tokens so far in *got. */
pds_status_t pdt_generate_open(const char *router, const pdt_req_t *req, int n_tokens,
                               pds_rpc_channel_t **ch, pds_rpc_stream_t **st, int *got,
                               int timeout_ms);
/* Cancels the stream, then destroys it and the channel. */
void pdt_generate_cancel(pds_rpc_channel_t *ch, pds_rpc_stream_t *st);
/* A raw call of a Pdserve method with arbitrary bytes; status + message (the server's). */
pds_status_t pdt_call_raw(const char *router, const char *method, const void *bytes, size_t n,
                          char *message, size_t cap);

/* ---- the reference ------------------------------------------------------------------------- */
typedef struct pdt_ref pdt_ref_t;
/* The preset with model seed 1 on the CPU backend, as the test nodes run it. */
pdt_ref_t *pdt_ref_create(const char *preset);
void pdt_ref_destroy(pdt_ref_t *r);
int pdt_ref_vocab(const pdt_ref_t *r);
int pdt_ref_context(const pdt_ref_t *r);
/* pds_engine_generate for the request (text gets BOS; `seed` overrides req->seed when the
 * request has none, i.e. the router picked it). finish: a Pdserve__V1__FinishReason. */
pds_status_t pdt_ref_generate(pdt_ref_t *r, const pdt_req_t *req, uint64_t seed, int32_t *out,
                              int *n_out, int *finish, int *n_prompt);

/* "d0 (tokens 5 vs 7 at index 3)" style diff of two token lists; "" when equal. */
void pdt_diff_tokens(const int32_t *a, int na, const int32_t *b, int nb, char *buf, size_t cap);
/* A deterministic token-id prompt of n tokens in [0, 256) from `salt`. */
void pdt_fill_prompt(pdt_req_t *req, int n, uint64_t salt);

#endif /* PDT_CLUSTER_H */

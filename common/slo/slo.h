/* slo: the latency model behind SLO-driven placement and capacity planning — fitting, profiles,
 * TTFT/TPOT prediction, online refit, the placement choice the router makes, and a discrete-event
 * simulator of a whole cluster that makes the same choice.
 *
 * The model (DESIGN.md "SLO model"), all times in milliseconds:
 *   prefill batch   = a + b*T + c*T^2          T = new tokens in the batch
 *   decode step     = d + e*B + f*C            B = sequences in the batch, C = their context tokens
 *                     (optionally a second (d2, e2, f2) for B > split when one line does not fit,
 *                     or a table of per-batch lines base_i + f_i*C at the profiled batch sizes,
 *                     interpolated linearly in B, when the step time is not linear in B at all:
 *                     a CPU BLAS's step grows in steps with the batch)
 *   KV transfer     = msgs * msg_ms + bytes / bandwidth
 * The quadratic term is attention over the prompt; with several prompts in one batch c*T^2
 * overestimates (attention is per sequence), which errs on the safe side for placement.
 *
 * Fitting minimises squared *relative* error (weights 1/y^2): timings span three orders of
 * magnitude between a 16-token and an 8k-token prefill, and a plain least-squares fit would ignore
 * the short ones that TTFT targets care about. Solved by Householder QR on unit-scaled columns (k
 * <= 4), which stays accurate where the normal equations of (1, T, T^2) would lose all digits.
 *
 * Everything here is a pure function of its arguments (no globals, no I/O) except the profile
 * load/save and the trace loader. The refit window and the simulator are objects owned by one
 * thread.
 */
#ifndef PDS_SLO_H
#define PDS_SLO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

/* ---- the model --------------------------------------------------------------------------------
 */
#define PDS_SLO_MAX_KNOTS 16

typedef struct {
    double prefill_a, prefill_b, prefill_c; /* ms, ms/token, ms/token^2 */
    double decode_d, decode_e, decode_f;    /* ms, ms/seq, ms/context token */
    int decode_split;                       /* 0: one line; else B > split uses (d2, e2, f2) */
    double decode_d2, decode_e2, decode_f2;
    /* Knots (0 or 2..PDS_SLO_MAX_KNOTS, batches strictly increasing): when present they define
     * the step, and (d, e, f[, split]) remain the best line(s) as a summary (ClusterStatus). Step
     * at batch B between knots i and i+1 = the two knots' lines at C, mixed linearly in B; outside
     * the knots the nearest segment extends. */
    int decode_knots;
    double decode_knot_batch[PDS_SLO_MAX_KNOTS];
    double decode_knot_base[PDS_SLO_MAX_KNOTS]; /* ms */
    double decode_knot_f[PDS_SLO_MAX_KNOTS];    /* ms per context token */
    double link_gbytes_per_s; /* KV link out of a prefill node (GB/s = 1e9 B/s); 0 = no transfer */
    double link_msg_ms;       /* per-message cost of that link */
    int64_t kv_bytes_per_token; /* K+V of one token over all layers */
    int n_layers;               /* transfer goes one message per layer */
    /* In-cluster terms (profile section "cluster"; 0 = an isolated engine), measured on a running
     * cluster by `bench/run_slo_cpu.sh calibrate`, not fitted to the runs they predict:
     *   ttft_overhead_ms         control path per request outside compute and transfer (router
     *                            hop, Prefill / OpenTransfer / CommitTransfer RPCs, kvx commit,
     *                            the first token's way back): added to every TTFT;
     *   decode_step_overhead_ms  per decode step outside the engine's forward (token streaming
     *                            through the router, the decode loop): added to every token gap;
     *   decode_contention        a decode step started while a prefill batch runs on a node that
     *                            shares the host's cores takes (1 + this) x its time (simulator;
     *                            the router's per-request prediction has no view of it);
     *   prefill_contention       likewise, a prefill batch started while a decode node is
     *                            running a batch on the same host. */
    double ttft_overhead_ms;
    double decode_step_overhead_ms;
    double decode_contention;
    double prefill_contention;
} pds_slo_model_t;

/* Each prediction is clamped at 0 (a fit may have a slightly negative intercept). */
double pds_slo_prefill_ms(const pds_slo_model_t *m, double tokens);
/* A batch of several prompts: the quadratic (attention) term is per sequence, so it takes the sum
 * of the prompts' squared lengths; pds_slo_prefill_ms(m, T) is one prompt of T tokens. */
double pds_slo_prefill_batch_ms(const pds_slo_model_t *m, double tokens, double tokens_sq);
double pds_slo_decode_step_ms(const pds_slo_model_t *m, double batch, double context);
/* The gap between two tokens of a sequence in the cluster: the engine step at (batch, context),
 * slowed by decode_contention for as long as a prefill keeps running beside it (prefill_ms from
 * the step's start: 0 none, >= the step's whole length all of it; during the overlap the step
 * progresses at 1 / (1 + decode_contention) of its speed), + decode_step_overhead_ms; 0 for
 * batch <= 0. */
double pds_slo_decode_gap_ms(const pds_slo_model_t *m, double batch, double context,
                             double prefill_ms);
/* Whole transfer of `tokens` tokens' KV: n_layers messages (1 if n_layers is 0). */
double pds_slo_transfer_ms(const pds_slo_model_t *m, double tokens);
/* The part of a layer-by-layer transfer not hidden behind a prefill of compute_ms: with per-layer
 * send time t and compute time c = compute_ms / L, the last send ends t + (L-1)*max(0, t-c) after
 * the compute. 0 when the link is unset (colocated). */
double pds_slo_transfer_exposed_ms(const pds_slo_model_t *m, double tokens, double compute_ms);

/* ---- fitting -----------------------------------------------------------------------------------
 */
typedef struct {
    int n;          /* samples used */
    double rms_rel; /* sqrt(mean(((pred - y) / y)^2)) */
    double r2;      /* 1 - SS_res / SS_tot (unweighted, on ms) */
} pds_slo_fit_t;

typedef struct {
    double tokens, ms;
} pds_slo_prefill_sample_t;
typedef struct {
    double batch, context, ms;
} pds_slo_decode_sample_t;

/* Weighted least squares: minimises sum w_i (y_i - x_i . beta)^2 over X (n, k) row-major, k <= 8,
 * w NULL = all 1. PDS_ERR_INVALID_ARG when n < k or the columns are (numerically) dependent: the
 * message says which column. beta: (k). */
pds_status_t pds_slo_lstsq(const double *X, const double *y, const double *w, int n, int k,
                           double *beta);
/* Fit (a, b, c) into m->prefill_*; other fields of m untouched. Needs >= 3 distinct token counts
 * and positive times. `fit` optional. */
pds_status_t pds_slo_fit_prefill(const pds_slo_prefill_sample_t *s, int n, pds_slo_model_t *m,
                                 pds_slo_fit_t *fit);
/* Fit (d, e, f) into m->decode_*; needs samples varying in both batch and context. With
 * allow_split, also tries every batch breakpoint with >= 6 samples each side and keeps the best
 * split when it cuts the RMS relative error by at least a third (m->decode_split = breakpoint);
 * otherwise decode_split = 0. Then, also with allow_split, when 3..PDS_SLO_MAX_KNOTS distinct
 * integer batches each have >= 2 distinct contexts, fits one line per batch (the knots) and keeps
 * them when they cut the RMS relative error of the line(s) by at least a third again
 * (m->decode_knots; else 0). */
pds_status_t pds_slo_fit_decode(const pds_slo_decode_sample_t *s, int n, bool allow_split,
                                pds_slo_model_t *m, pds_slo_fit_t *fit);
/* Error of a model on samples (no fitting). */
void pds_slo_eval_prefill(const pds_slo_model_t *m, const pds_slo_prefill_sample_t *s, int n,
                          pds_slo_fit_t *out);
void pds_slo_eval_decode(const pds_slo_model_t *m, const pds_slo_decode_sample_t *s, int n,
                         pds_slo_fit_t *out);

/* ---- online refit -----------------------------------------------------------------------------
 * A ring buffer of the last `window` observations per phase. An update refits with a prior: each
 * coefficient is pulled toward its current value with the weight of `prior_weight` samples, so a
 * window that lacks variety (every step at batch 8) moves the coefficients it can see and keeps
 * the rest. Owner: one thread. */
typedef struct pds_slo_refit pds_slo_refit_t;
pds_status_t pds_slo_refit_create(int window, double prior_weight, pds_slo_refit_t **out);
void pds_slo_refit_destroy(pds_slo_refit_t *r); /* accepts NULL */
void pds_slo_refit_add_prefill(pds_slo_refit_t *r, double tokens, double ms);
void pds_slo_refit_add_decode(pds_slo_refit_t *r, double batch, double context, double ms);
int pds_slo_refit_count(const pds_slo_refit_t *r, bool decode);
/* Refits m in place from the window (prefill needs >= 3 samples, decode >= 3; a phase with fewer is
 * left alone; each side of a decode split refits its own line). A knot table keeps its shape and
 * is scaled by the window's observed / predicted time, pulled toward 1 by prior_weight samples.
 * Fit errors over the window are written when the pointers are non-NULL. */
pds_status_t pds_slo_refit_update(pds_slo_refit_t *r, pds_slo_model_t *m, pds_slo_fit_t *prefill,
                                  pds_slo_fit_t *decode);

/* ---- profile files ------------------------------------------------------------------------------
 * JSON: {"magic": "pdserve-profile", "version": 1, "model": ..., "device": ..., "backend": ...,
 * "tp": 1, "pp": 1, "threads": 2, "prefill": {"a_ms", "b_ms_per_token", "c_ms_per_token2",
 * "rms_rel_err", "r2", "samples"}, "decode": {"d_ms", "e_ms_per_seq", "f_ms_per_context_token",
 * "split_batch", "d2_ms", "e2_ms_per_seq", "f2_ms_per_context_token", "rms_rel_err", "r2",
 * "samples", optional "knots": [{"batch", "base_ms", "ms_per_context_token"}, ...]},
 * "transfer": {"gbytes_per_s", "msg_ms"}, "kv": {"bytes_per_token", "n_layers",
 * "block_size", "blocks"}, "limits": {"max_batch_tokens", "max_batch_seqs"}, "created": "...",
 * optional "cluster": {"ttft_overhead_ms", "decode_step_overhead_ms", "decode_contention",
 * "prefill_contention", "calibration"}} (in-cluster terms, all >= 0; absent = 0; "calibration" says
 * how they were measured and is kept in pds_slo_profile_t.calibration). */
#define PDS_SLO_PROFILE_MAGIC   "pdserve-profile"
#define PDS_SLO_PROFILE_VERSION 1

typedef struct {
    char model_name[64];
    char device[96];  /* "NVIDIA H100 80GB HBM3", "cpu x2 threads", ... */
    char backend[16]; /* "cpu" | "cuda" */
    int tp, pp, threads;
    pds_slo_model_t m;
    pds_slo_fit_t prefill_fit, decode_fit;
    int block_size;       /* KV tokens per block */
    int64_t kv_blocks;    /* KV capacity of one node (instance) */
    int max_batch_tokens; /* prefill token budget */
    int max_batch_seqs;
    char created[32];      /* ISO time, informational */
    char calibration[256]; /* "cluster" section's note: how its terms were measured ("" = none) */
} pds_slo_profile_t;

/* Defaults for fields a profile may omit (tp = pp = 1, block 16, budgets 8192/256). */
void pds_slo_profile_init(pds_slo_profile_t *p);
/* PDS_ERR_IO (cannot open/read/write), PDS_ERR_PARSE (not JSON, wrong magic, missing or mistyped
 * field: the message names the file and the field), PDS_ERR_UNSUPPORTED (newer version),
 * PDS_ERR_INVALID_ARG (values out of range, e.g. a negative bandwidth). */
pds_status_t pds_slo_profile_load(const char *path, pds_slo_profile_t *out);
pds_status_t pds_slo_profile_parse(const char *json, const char *name, pds_slo_profile_t *out);
pds_status_t pds_slo_profile_save(const pds_slo_profile_t *p, const char *path);

/* ---- prediction and placement -------------------------------------------------------------------
 * A prefill node's load as the router sees it (its reports plus what it placed since), and a
 * decode node's. Models are borrowed. */
typedef struct {
    const pds_slo_model_t *model;
    double queued_tokens; /* prompt tokens waiting to start */
    double busy_ms;       /* remaining time of the batch in flight (0 = idle or unknown) */
    int max_batch_tokens; /* FCFS batching budget; 0 = unlimited */
} pds_slo_prefill_load_t;

typedef struct {
    const pds_slo_model_t *model;
    int batch;             /* running sequences */
    double context_tokens; /* their total context */
    int64_t free_blocks;   /* KV blocks neither used nor reserved */
    int block_size;        /* 0 = KV room not checked */
    int max_batch_seqs;    /* 0 = unlimited */
} pds_slo_decode_load_t;

typedef struct {
    int64_t prompt_tokens;
    int64_t output_tokens; /* expected (max_tokens if nothing better is known); >= 1 */
    double ttft_ms;        /* targets; <= 0 = none */
    double tpot_ms;
    double waited_ms; /* already spent queued at the router (added to predicted TTFT) */
} pds_slo_request_t;

/* TTFT on a prefill node: busy + the FCFS batches of the queue ahead (in max_batch_tokens chunks)
 * + its own batch (sharing the last one when it fits) + the exposed transfer over the prefill
 * model's link + its ttft_overhead_ms. */
double pds_slo_predict_ttft(const pds_slo_prefill_load_t *p, int64_t prompt_tokens);
/* TPOT on a decode node with the request added: one token gap (pds_slo_decode_gap_ms, no
 * contention) at batch + 1 and context + prompt + output / 2 (its mean context while it
 * generates). */
double pds_slo_predict_tpot(const pds_slo_decode_load_t *d, int64_t prompt_tokens,
                            int64_t output_tokens);

typedef enum {
    PDS_SLO_POLICY_QUEUE = 0,   /* wait (PDS_AGAIN) until it fits or the deadline passes */
    PDS_SLO_POLICY_BEST_EFFORT, /* place on the best pair anyway */
    PDS_SLO_POLICY_REJECT       /* PDS_ERR_EXHAUSTED with the predictions */
} pds_slo_policy_t;
const char *pds_slo_policy_name(pds_slo_policy_t p); /* "queue", "best-effort", "reject" */
pds_status_t pds_slo_policy_parse(const char *s, pds_slo_policy_t *out);

typedef struct {
    pds_slo_policy_t policy;
    double tpot_weight;       /* k in the slack formula; default 1 */
    double queue_deadline_ms; /* QUEUE: give up (as REJECT) once waited_ms >= this; default 10000 */
    bool colocated;           /* only pairs p == d (prefill on the decode node; no transfer) */
} pds_slo_place_params_t;
pds_slo_place_params_t pds_slo_place_default_params(void);

typedef struct {
    int prefill, decode; /* chosen (or, when not placed, best predicted) pair; -1 = none */
    bool placed;         /* PDS_OK returned: run it on (prefill, decode) */
    bool meets;          /* predictions meet both targets */
    double pred_ttft_ms, pred_tpot_ms;
    double slack;  /* min((T_ttft - ttft)/T_ttft, k*(T_tpot - tpot)/T_tpot); larger is better */
    char why[256]; /* one line for logs and error messages */
} pds_slo_decision_t;

/* Picks the (prefill, decode) pair with the most slack among decode nodes with KV room for
 * prompt + output and a free batch slot. Ties go to the lower index, so the choice is
 * deterministic. Returns:
 *   PDS_OK               placed (meets, or BEST_EFFORT);
 *   PDS_AGAIN            QUEUE policy and nothing meets yet (or no decode node has room) and the
 *                        deadline is not reached; BEST_EFFORT and no node has room;
 *   PDS_ERR_EXHAUSTED    REJECT (or QUEUE past its deadline): the message (pds_err_detail and
 *                        out->why) carries the best pair's predicted TTFT/TPOT and the targets;
 *   PDS_ERR_UNAVAILABLE  no prefill or no decode candidates at all;
 *   PDS_ERR_INVALID_ARG  bad request (prompt < 1, output < 1, colocated with n_prefill !=
 * n_decode). `out` is filled in every case except INVALID_ARG. */
pds_status_t pds_slo_place(const pds_slo_place_params_t *pp, const pds_slo_request_t *req,
                           const pds_slo_prefill_load_t *pre, int n_prefill,
                           const pds_slo_decode_load_t *dec, int n_decode, pds_slo_decision_t *out);

/* Conditional disaggregation: the better of the best (prefill, decode) pair (pre x dec) and the
 * best colocated node prefilling locally (cpre[i] with cdec[i]: the node's local prefill queue and
 * its own decode batch; no transfer). A candidate predicted to meet both targets beats one that
 * does not, then the larger slack wins; a tie goes to the pair (no prefill interference on the
 * decode batch). *local says which group `out` indexes (for a local choice prefill == decode).
 * Either group may be empty (n = 0). Status and policy as pds_slo_place; when nothing meets, the
 * policy's answer and message come from the group that came closest. pp->colocated is ignored. */
pds_status_t pds_slo_place_cond(const pds_slo_place_params_t *pp, const pds_slo_request_t *req,
                                const pds_slo_prefill_load_t *pre, int n_prefill,
                                const pds_slo_decode_load_t *dec, int n_decode,
                                const pds_slo_prefill_load_t *cpre,
                                const pds_slo_decode_load_t *cdec, int n_coloc,
                                pds_slo_decision_t *out, bool *local);

/* ---- workloads and traces -----------------------------------------------------------------------
 */
typedef struct {
    double arrival_ms;
    int32_t prompt_tokens, output_tokens;
} pds_slo_req_t;

/* A request trace in the Azure LLM inference trace CSV format: a header line naming
 * TIMESTAMP,ContextTokens,GeneratedTokens, then one request a line; TIMESTAMP is
 * "YYYY-MM-DD HH:MM:SS[.fraction]" or plain seconds. Arrivals are made relative to the earliest
 * and sorted. Blank lines are skipped; anything else malformed is PDS_ERR_PARSE naming the line. */
typedef struct {
    pds_slo_req_t *reqs; /* (n) sorted by arrival */
    int n;
    double duration_ms; /* last arrival */
} pds_slo_trace_t;
pds_status_t pds_slo_trace_parse(const char *text, size_t len, const char *name,
                                 pds_slo_trace_t **out);
pds_status_t pds_slo_trace_load(const char *path, pds_slo_trace_t **out);
void pds_slo_trace_destroy(pds_slo_trace_t *t); /* accepts NULL */

typedef enum {
    PDS_SLO_ARRIVAL_POISSON = 0,
    PDS_SLO_ARRIVAL_GAMMA, /* gamma inter-arrivals with coefficient of variation cv (bursty > 1) */
    PDS_SLO_ARRIVAL_TRACE  /* the trace's own arrival times, time-scaled so that the requests
                              generated (the first n, or the whole trace) arrive at the rate */
} pds_slo_arrival_t;

/* Lengths: from a lognormal (median, sigma of ln) clipped to [min, max], or drawn from a trace's
 * requests (`trace` non-NULL), in order when the arrivals are the trace's, else at random. */
typedef struct {
    const char *name;
    pds_slo_arrival_t arrival;
    double cv; /* gamma */
    double prompt_median, prompt_sigma;
    int32_t prompt_min, prompt_max;
    double output_median, output_sigma;
    int32_t output_min, output_max;
    const pds_slo_trace_t *trace;
    double length_scale; /* prompt and output lengths x this (rounded, >= 1) before the
                            max_context clip; 0 = 1 (e.g. a long-context trace on a small model) */
} pds_slo_workload_t;

/* "chatbot" (ShareGPT-like), "code" (HumanEval-like), "summarization" (LongBench-like); sources in
 * slo_workload.c. PDS_ERR_NOT_FOUND for other names. */
pds_status_t pds_slo_workload_builtin(const char *name, pds_slo_workload_t *out);
/* n requests at `rate_per_s`, deterministic for (workload, seed); the same seed at another rate
 * gives the same lengths and the same arrival pattern stretched in time (common random numbers, so
 * a rate bisection compares like with like). Lengths are scaled by w->length_scale, then clipped
 * to max_context - 1 prompt and max_context - prompt outputs when max_context > 0. out: (n). */
pds_status_t pds_slo_workload_generate(const pds_slo_workload_t *w, double rate_per_s, int n,
                                       uint64_t seed, int32_t max_context, pds_slo_req_t *out);

/* ---- the cluster simulator ----------------------------------------------------------------------
 * Disaggregated: n_prefill nodes, each FCFS batching up to max_batch_tokens (at least one request)
 * with service time from its model; the first token leaves after the exposed KV transfer and the
 * request joins its decode node between steps; n_decode nodes run continuous batching, each step
 * timed by the decode model at the current batch and context; KV for prompt + output is reserved
 * at placement (so decode never preempts) and placement is pds_slo_place itself, retried on every
 * node event while requests wait (QUEUE). Links are not shared (no contention). A decode node
 * takes OpenTransfer and CommitTransfer between steps, as pdserve-decode's engine loop does: a
 * request placed during a step enters its prefill queue when the step ends, and its first token
 * leaves when the step running at its commit ends (one-token outputs do not wait: no commit).
 * Colocated: n_decode nodes that also prefill (n_prefill ignored): prefill-first runs a waiting
 * prefill batch before the next decode step (vLLM); chunked fills each step's token budget with
 * the running decodes plus prompt chunks (Sarathi-Serve), a chunk of t tokens after p done costing
 * b*t + c*((p+t)^2 - p^2) on top of the decode step, so whole prompts cost what prefill does.
 * The models' in-cluster terms apply as pds_slo_model_t describes (contention only between the
 * prefill and decode nodes of a disaggregated cluster). Deterministic for its inputs. */
typedef enum {
    PDS_SLO_SIM_DISAGG = 0,
    PDS_SLO_SIM_COLOC_PREFILL_FIRST,
    PDS_SLO_SIM_COLOC_CHUNKED
} pds_slo_sim_mode_t;
const char *pds_slo_sim_mode_name(pds_slo_sim_mode_t m);

typedef struct {
    pds_slo_sim_mode_t mode;
    int n_prefill, n_decode;
    pds_slo_model_t prefill_model, decode_model; /* colocated nodes use both */
    int prefill_max_batch_tokens;                /* and colocated prefill-first budget */
    int chunk_tokens;                            /* colocated chunked: tokens per step */
    int decode_max_batch_seqs;
    int64_t decode_kv_blocks; /* per decode (or colocated) node; 0 = unlimited */
    int block_size;
    double ttft_ms, tpot_ms; /* the targets of every request */
    int32_t max_context;     /* goodput: generated lengths are clipped to it; 0 = no clip */
    pds_slo_place_params_t place;
} pds_slo_sim_config_t;
pds_slo_sim_config_t pds_slo_sim_default_config(void);

typedef struct {
    int n, n_finished, n_rejected, n_met; /* met: finished with TTFT and TPOT within target */
    double attainment;                    /* n_met / n */
    double ttft_mean, ttft_p50, ttft_p90, ttft_p99; /* over finished requests, ms */
    double tpot_mean, tpot_p50, tpot_p90, tpot_p99; /* over finished requests with output > 1 */
    double makespan_ms;
    double throughput_rps; /* finished / makespan */
} pds_slo_sim_result_t;

/* Runs reqs (sorted by arrival) to completion. ttft / tpot: optional (n) per-request outputs, -1
 * for rejected requests (tpot 0 for one-token outputs). PDS_ERR_INVALID_ARG for a bad config
 * (message names the field); PDS_ERR_NO_MEMORY. */
pds_status_t pds_slo_sim_run(const pds_slo_sim_config_t *c, const pds_slo_req_t *reqs, int n,
                             pds_slo_sim_result_t *res, double *ttft, double *tpot);

/* The highest rate (req/s, within rel_tol) whose attainment is >= target, by doubling then
 * bisection, simulating n requests of w at each probe with the same seed — or more: each probe
 * covers at least 120 s of arrivals (at most 1M requests) so that it reaches steady state.
 * *rate_out = 0 when even lo_rate fails; at_rate (optional) gets the result at *rate_out. progress
 * (optional) is called after each probe. */
typedef void (*pds_slo_progress_fn)(void *ctx, double rate, const pds_slo_sim_result_t *r);
pds_status_t pds_slo_goodput(const pds_slo_sim_config_t *c, const pds_slo_workload_t *w, int n,
                             uint64_t seed, double target, double lo_rate, double rel_tol,
                             double *rate_out, pds_slo_sim_result_t *at_rate,
                             pds_slo_progress_fn progress, void *ctx);

#endif /* PDS_SLO_H */

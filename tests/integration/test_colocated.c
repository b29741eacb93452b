/* Integration tests of colocated nodes and SLO placement: real pdserve-router and pdserve-decode
 * processes with [node] role = colocated (prefill-first and chunked prefill), driven through the
 * public API, against the in-process reference (pds_engine_generate, tiny preset, model seed 1).
 *   - two colocated nodes, no prefill node: every request is prefilled and decoded on one node
 *     (one prefill-first, one chunked, pools smaller than the burst) and streams exactly the
 *     reference tokens, greedy and seeded;
 *   - SLO placement over prefill + decode + colocated nodes (conditional disaggregation): both
 *     paths are taken under a burst and both give the reference tokens; the counters in
 *     ClusterStatus add up; a request whose targets no candidate can meet is rejected
 *     RESOURCE_EXHAUSTED with the predicted latencies in the message (reject policy).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "proto/pdserve.pb-c.h"

static pdt_cluster_t *g_cl;
static pdt_ref_t *g_rf;

static void teardown(void)
{
    pdt_cluster_destroy(g_cl);
    g_cl = NULL;
    pdt_ref_destroy(g_rf);
    g_rf = NULL;
}

/* Request i of a mix: prompts around block (16) and chunk (16) boundaries up to 130 tokens,
 * greedy and seeded sampling, max_tokens 8..40. */
static void coloc_request(pdt_req_t *q, int i)
{
    static const int lens[] = {1, 15, 16, 17, 33, 47, 64, 100, 130};
    memset(q, 0, sizeof *q);
    snprintf(q->id, sizeof q->id, "col-%02d", i);
    pdt_fill_prompt(q, lens[i % 9], 900 + (uint64_t)i);
    q->max_tokens = (uint32_t)(8 + (i * 11) % 33);
    q->ignore_eos = true;
    if (i % 2 == 1) {
        q->temperature = 0.8f;
        q->top_k = 40;
        q->top_p = 0.9f;
        q->has_seed = true;
        q->seed = 31 + (uint64_t)i * 7;
    }
}

/* Tokens and summary of one finished request against the reference. */
static void check(const pdt_req_t *q, const pdt_res_t *res)
{
    cr_assert_eq(res->status, PDS_OK, "%s failed: %s: %s", q->id, pds_status_name(res->status),
                 res->message);
    int32_t ref[PDT_MAX_OUT];
    int n = 0, finish = 0, n_prompt = 0;
    cr_assert_eq(pdt_ref_generate(g_rf, q, res->seed, ref, &n, &finish, &n_prompt), PDS_OK,
                 "reference for %s: %s", q->id, pds_err_detail());
    char diff[160];
    pdt_diff_tokens(res->tokens, res->n_tokens, ref, n, diff, sizeof diff);
    cr_assert_str_empty(diff, "%s (prefill %s, decode %s): cluster vs reference: %s", q->id,
                        res->prefill_node, res->decode_node, diff);
    cr_assert(res->in_order && res->has_summary && res->summary_last, "%s: stream shape", q->id);
    cr_assert_eq(res->finish_reason, finish, "%s: finish %d, reference %d", q->id,
                 res->finish_reason, finish);
    cr_assert_eq(res->output_tokens, (uint32_t)n, "%s: output_tokens", q->id);
}

/* The router's SLO counters (ClusterStatus). */
static void slo_stats(Pdserve__V1__SloStats *out, char *placement, size_t cap)
{
    pds_rpc_channel_t *ch = NULL;
    cr_assert_eq(pds_rpc_channel_create(pdt_cluster_router(g_cl), &ch), PDS_OK);
    Pdserve__V1__ClusterStatusRequest rq = PDSERVE__V1__CLUSTER_STATUS_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    pds_status_t s = pds_rpc_channel_call(ch, "/pdserve.v1.Pdserve/ClusterStatus", &rq.base,
                                          &pdserve__v1__cluster_status_reply__descriptor, 5000, &m);
    cr_assert_eq(s, PDS_OK, "ClusterStatus: %s", pds_err_detail());
    const Pdserve__V1__ClusterStatusReply *r = (const Pdserve__V1__ClusterStatusReply *)m;
    cr_assert(r->slo, "ClusterStatus without slo stats");
    *out = *r->slo;
    snprintf(placement, cap, "%s", r->slo->placement ? r->slo->placement : "");
    out->placement = out->policy = NULL; /* they die with the message */
    pds_rpc_msg_free(m);
    pds_rpc_channel_destroy(ch);
}

Test(colocated, two_colocated_nodes_reproduce_the_reference_tokens, .fini = teardown,
     .timeout = 120)
{
    g_rf = pdt_ref_create("tiny");
    cr_assert(g_rf, "reference engine");
    g_cl = pdt_cluster_create("colocated-two", "tcp");
    cr_assert(g_cl);
    pdt_cluster_set_preset(g_cl, "tiny");
    cr_assert(pdt_cluster_start_router(g_cl, NULL), "%s", pdt_cluster_error(g_cl));
    static const char *const first[] = {"--node.role=colocated", "--colocated.mode=prefill_first",
                                        NULL};
    static const char *const chunked[] = {"--node.role=colocated", "--colocated.mode=chunked",
                                          "--colocated.chunk_tokens=16", NULL};
    /* pools of 64 blocks do not hold every request of the burst at once: local prompts also wait
     * for blocks (and growing sequences may preempt them) */
    cr_assert(pdt_cluster_spawn_node(g_cl, PDT_DECODE, "c0", 1024, first), "%s",
              pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_spawn_node(g_cl, PDT_DECODE, "c1", 1024, chunked), "%s",
              pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_wait_ready(g_cl, 20000), "%s", pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_wait_up(g_cl, 20000), "%s", pdt_cluster_error(g_cl));

    enum { N = 36 };
    pdt_req_t *reqs = pds_calloc(N, sizeof *reqs);
    pdt_res_t *res = pds_calloc(N, sizeof *res);
    cr_assert(reqs && res);
    for (int i = 0; i < N; i++) coloc_request(&reqs[i], i);
    pdt_generate_many(pdt_cluster_router(g_cl), reqs, res, N, 60000);
    int on[2] = {0, 0};
    for (int i = 0; i < N; i++) {
        check(&reqs[i], &res[i]);
        cr_assert_str_eq(res[i].prefill_node, res[i].decode_node,
                         "%s: a colocated request is prefilled where it decodes", reqs[i].id);
        cr_assert_eq(res[i].replacements, 0, "%s: re-placed", reqs[i].id);
        on[0] += strcmp(res[i].decode_node, "c0") == 0;
        on[1] += strcmp(res[i].decode_node, "c1") == 0;
    }
    cr_assert(on[0] > 0 && on[1] > 0, "both colocated nodes serve (c0 %d, c1 %d)", on[0], on[1]);
    cr_assert_eq(on[0] + on[1], N);
    cr_assert_geq(pdt_cluster_log_count(g_cl, "c1", "msg=local_prefill"), 1);
    cr_assert(pdt_cluster_wait_idle(g_cl, 10000), "%s", pdt_cluster_error(g_cl));
    Pdserve__V1__SloStats st;
    char placement[32];
    slo_stats(&st, placement, sizeof placement);
    cr_assert_str_eq(placement, "least-loaded");
    cr_assert_eq(st.placed_local, st.placed, "every placement local (%llu of %llu)",
                 (unsigned long long)st.placed_local, (unsigned long long)st.placed);
    cr_assert(pdt_cluster_check_alive(g_cl), "%s", pdt_cluster_error(g_cl));
    pds_free(reqs);
    pds_free(res);
}

Test(colocated, slo_placement_prefills_locally_or_transfers_and_rejects_the_impossible,
     .fini = teardown, .timeout = 120)
{
    g_rf = pdt_ref_create("tiny");
    cr_assert(g_rf, "reference engine");
    g_cl = pdt_cluster_create("colocated-slo", "tcp");
    cr_assert(g_cl);
    pdt_cluster_set_preset(g_cl, "tiny");
    const char *src = getenv("PDS_SOURCE_DIR");
    char profile[1024];
    snprintf(profile, sizeof profile, "--slo.profile=%s/bench/profiles/cpu-small.json",
             src ? src : ".");
    const char *const router[] = {"--slo.placement=slo",
                                  "--slo.policy=reject",
                                  profile,
                                  "--slo.classes=any:0:0,impossible:0.001:0.001",
                                  "--slo.default_class=any",
                                  NULL};
    cr_assert(pdt_cluster_start_router(g_cl, router), "%s", pdt_cluster_error(g_cl));
    static const char *const chunked[] = {"--node.role=colocated", "--colocated.mode=chunked",
                                          "--colocated.chunk_tokens=16", NULL};
    cr_assert(pdt_cluster_spawn_node(g_cl, PDT_PREFILL, "p0", 0, NULL), "%s",
              pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_spawn_node(g_cl, PDT_DECODE, "d0", 0, NULL), "%s",
              pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_spawn_node(g_cl, PDT_DECODE, "c0", 0, chunked), "%s",
              pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_wait_ready(g_cl, 20000), "%s", pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_wait_up(g_cl, 20000), "%s", pdt_cluster_error(g_cl));

    /* a burst: the prefill node's queue grows with every placement, so later requests are
     * predicted faster when c0 prefills them itself */
    enum { N = 32 };
    pdt_req_t *reqs = pds_calloc(N, sizeof *reqs);
    pdt_res_t *res = pds_calloc(N, sizeof *res);
    cr_assert(reqs && res);
    for (int i = 0; i < N; i++) coloc_request(&reqs[i], i);
    pdt_generate_many(pdt_cluster_router(g_cl), reqs, res, N, 60000);
    int local = 0;
    for (int i = 0; i < N; i++) {
        check(&reqs[i], &res[i]);
        bool loc = strcmp(res[i].prefill_node, "c0") == 0;
        if (loc) cr_assert_str_eq(res[i].decode_node, "c0", "%s: local prefill", reqs[i].id);
        local += loc;
    }
    Pdserve__V1__SloStats st;
    char placement[32];
    slo_stats(&st, placement, sizeof placement);
    cr_assert_str_eq(placement, "slo");
    cr_assert_eq(st.placed, (uint64_t)N);
    cr_assert_eq(st.placed_local, (uint64_t)local);
    cr_assert(local > 0 && local < N, "conditional disaggregation: %d of %d prefilled locally",
              local, N);
    cr_assert_eq(st.rejected, 0);

    pdt_req_t q;
    coloc_request(&q, 0);
    snprintf(q.id, sizeof q.id, "impossible");
    q.slo_class = "impossible";
    pdt_res_t r;
    pds_status_t s = pdt_generate(pdt_cluster_router(g_cl), &q, &r, 20000);
    cr_assert_eq(s, PDS_ERR_EXHAUSTED, "impossible targets: %s (%s)", pds_status_name(s),
                 r.message);
    cr_assert(strstr(r.message, "predicts TTFT") && strstr(r.message, "target 0.0"),
              "the message carries predictions and targets: %s", r.message);
    slo_stats(&st, placement, sizeof placement);
    cr_assert_eq(st.rejected, 1);
    cr_assert(pdt_cluster_wait_idle(g_cl, 10000), "%s", pdt_cluster_error(g_cl));
    cr_assert(pdt_cluster_check_alive(g_cl), "%s", pdt_cluster_error(g_cl));
    pds_free(reqs);
    pds_free(res);
}

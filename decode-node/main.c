/* pdserve-decode: the decode node. Receives a request's KV cache from a prefill node straight into
 * reserved blocks of its pool (kvx), runs the continuous decode batch (sched.c) and streams each
 * step's tokens to the routers (streams.c), registering with its router and reporting load. With
 * [node] role = colocated it also takes whole requests (PrefillLocal) and prefills them itself,
 * prefill-first or chunked ([colocated] mode): the colocated baseline and conditional
 * disaggregation.
 *
 * This file is wiring only: configuration, engine, kvx + pool registration, scheduler, gRPC server
 * (DecodeNode methods + Health), reporter, and the shutdown order that lets each part finish what
 * the next one still needs: reporter, then the engine loop (answers every call it holds, aborts
 * its sequences, finishes the streams, frees all blocks), then the server, then kvx and the
 * engine. Once serving it prints exactly one line `READY host:port` on stdout (what the tests and
 * scripts wait for).
 */
#include <stdio.h>
#include <string.h>

#include "base/base.h"
#include "decode-node/sched.h"
#include "decode-node/service.h"
#include "kvx/kvx.h"
#include "node/node.h"
#include "rpc/rpc.h"

#define MOD "decode"

typedef struct {
    pds_node_config_t cfg;
    pds_engine_t *engine;
    pds_engine_info_t info;
    pds_kvx_t *kvx;
    const void *kvx_addr, *pool_blob;
    size_t kvx_addr_len, pool_blob_len;
    pds_decode_sched_t *sched;
    pds_rpc_server_t *srv;
    pds_decode_service_t *svc;
    pds_node_reporter_t *reporter;
    pds_node_health_t health;
    char address[160];
} node_t;

static int fail(const char *what, pds_status_t s)
{
    PDS_LOG_ERROR(MOD, "startup_failed step=%s status=%s detail=\"%s\"", what, pds_status_name(s),
                  pds_err_detail());
    fprintf(stderr, "pdserve-decode: %s: %s\n", what,
            pds_err_detail()[0] ? pds_err_detail() : pds_status_text(s));
    return 1;
}

/* kvx with the engine's pool registered (a device pool: UCX stages it through a pinned host
 * mirror, NCCL receives into it directly). */
static pds_status_t kvx_setup(node_t *n)
{
    if (n->cfg.kvx_backend == PDS_KVX_LOOPBACK)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "[kvx] backend loopback works only inside one process (tests); use ucx");
    pds_kvx_params_t kp = pds_kvx_default_params();
    kp.backend = (pds_kvx_backend_t)n->cfg.kvx_backend;
    kp.path = (pds_kvx_path_t)n->cfg.kvx_path;
    kp.checksum = n->cfg.kvx_checksum;
    kp.device = n->cfg.device;
    kp.init_timeout_ms = PDS_MAX(n->cfg.transfer_timeout_ns / 1000000, 1);
    PDS_TRY(pds_kvx_create(&kp, &n->kvx));
    int L = n->info.kv.n_layers;
    void **bases = pds_calloc((size_t)L, sizeof *bases);
    if (!bases) return PDS_ERR(PDS_ERR_NO_MEMORY, "layer table");
    bool on_device = false;
    pds_status_t s = PDS_OK;
    for (int l = 0; l < L && s == PDS_OK; l++) {
        size_t bytes;
        s = pds_engine_kv_layer_memory(n->engine, l, &bases[l], &bytes, &on_device);
    }
    if (s == PDS_OK)
        s = pds_kvx_register_pool(n->kvx, &n->info.kv, bases,
                                  on_device ? PDS_KVX_MEM_CUDA : PDS_KVX_MEM_HOST, &n->pool_blob,
                                  &n->pool_blob_len);
    pds_free(bases);
    if (s != PDS_OK && on_device)
        return PDS_ERR(s, "registering the engine's GPU KV pool with kvx (%s): %s",
                       pds_kvx_backend_name(kp.backend), pds_err_detail());
    if (s != PDS_OK) return s;
    return pds_kvx_address(n->kvx, &n->kvx_addr, &n->kvx_addr_len);
}

/* The address others reach this node at: [node] advertise, else the listen host + bound port. */
static void node_address(node_t *n)
{
    int port = pds_rpc_server_port(n->srv);
    if (n->cfg.advertise[0]) {
        snprintf(n->address, sizeof n->address, "%s", n->cfg.advertise);
        return;
    }
    char host[128];
    snprintf(host, sizeof host, "%s", n->cfg.listen);
    char *colon = strrchr(host, ':');
    if (colon) *colon = '\0';
    if (!host[0] || strcmp(host, "0.0.0.0") == 0 || strcmp(host, "[::]") == 0) {
        PDS_LOG_WARN(MOD,
                     "advertise_guess listen=%s using=127.0.0.1 (set [node] advertise for "
                     "other machines)",
                     n->cfg.listen);
        snprintf(host, sizeof host, "127.0.0.1");
    }
    snprintf(n->address, sizeof n->address, "%s:%d", host, port);
}

static pds_status_t reporter_start(node_t *n)
{
    const pds_model_config_t *m = &n->info.model;
    Pdserve__V1__KvGeometry kv = PDSERVE__V1__KV_GEOMETRY__INIT;
    kv.n_layers = (uint32_t)n->info.kv.n_layers;
    kv.n_kv_heads = (uint32_t)n->info.kv.n_kv_heads;
    kv.head_dim = (uint32_t)n->info.kv.head_dim;
    kv.block_size = (uint32_t)n->info.kv.block_size;
    kv.dtype = n->info.kv_dtype == PDS_DTYPE_BF16  ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16
               : n->info.kv_dtype == PDS_DTYPE_F16 ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16
                                                   : PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    Pdserve__V1__NodeInfo ni = PDSERVE__V1__NODE_INFO__INIT;
    ni.magic = PDS_RPC_PROTOCOL_MAGIC;
    ni.protocol_version = PDS_RPC_PROTOCOL_VERSION;
    ni.node_id = n->cfg.id;
    ni.role = n->cfg.role == PDS_NODE_COLOCATED ? PDSERVE__V1__NODE_ROLE__NODE_ROLE_COLOCATED
                                                : PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE;
    ni.address = n->address;
    ni.kvx_backend = (char *)pds_kvx_backend_name((pds_kvx_backend_t)n->cfg.kvx_backend);
    ni.kvx_address.data = (uint8_t *)n->kvx_addr;
    ni.kvx_address.len = n->kvx_addr_len;
    ni.kv = &kv;
    ni.total_kv_blocks = (uint32_t)n->info.kv.n_blocks;
    ni.model_name = (char *)m->name;
    ni.model_fingerprint = pds_node_model_fingerprint(&n->cfg, m);
    ni.max_batch_seqs = (uint32_t)n->info.max_batch_seqs;
    ni.max_context_tokens = (uint32_t)m->max_context;
    ni.vocab_size = (uint32_t)m->vocab;
    ni.bos_token_id = m->bos_id;
    ni.eos_token_id = m->eos_id;
    ni.max_batch_tokens = (uint32_t)n->info.max_batch_tokens;
    if (n->cfg.role == PDS_NODE_COLOCATED && n->cfg.coloc_mode == 1)
        ni.colocated_chunk_tokens = (uint32_t)n->cfg.coloc_chunk_tokens;
    return pds_node_reporter_start(n->cfg.router, &ni, pds_decode_sched_load, n->sched,
                                   &n->reporter);
}

static int run(node_t *n)
{
    pds_status_t s;
    if ((s = pds_node_engine_create(&n->cfg, &n->engine)) != PDS_OK) return fail("engine", s);
    pds_engine_info(n->engine, &n->info);
    if ((s = kvx_setup(n)) != PDS_OK) return fail("kvx", s);

    pds_decode_sched_params_t sp = {
        .node_id = n->cfg.id,
        .engine = n->engine,
        .kvx = n->kvx,
        .kvx_backend = pds_kvx_backend_name((pds_kvx_backend_t)n->cfg.kvx_backend),
        .kvx_address = n->kvx_addr,
        .kvx_address_len = n->kvx_addr_len,
        .pool_blob = n->pool_blob,
        .pool_blob_len = n->pool_blob_len,
        .transfer_timeout_ms = PDS_MAX(n->cfg.transfer_timeout_ns / 1000000, 1),
        .max_batch_seqs = n->cfg.max_batch_seqs,
        .local_mode = n->cfg.role != PDS_NODE_COLOCATED ? PDS_DECODE_LOCAL_OFF
                      : n->cfg.coloc_mode == 1          ? PDS_DECODE_LOCAL_CHUNKED
                                                        : PDS_DECODE_LOCAL_PREFILL_FIRST,
        .chunk_tokens = n->cfg.coloc_chunk_tokens,
        .calls = pds_decode_calls_rpc(),
    };
    if ((s = pds_decode_sched_create(&sp, &n->sched)) != PDS_OK) return fail("scheduler", s);

    pds_rpc_server_params_t rp = pds_rpc_server_default_params();
    rp.address = n->cfg.listen;
    if ((s = pds_rpc_server_create(&rp, &n->srv)) != PDS_OK) return fail("listen", s);
    if ((s = pds_decode_service_create(n->srv, n->sched, &n->svc)) != PDS_OK)
        return fail("methods", s);
    n->health = (pds_node_health_t){.node_id = n->cfg.id,
                                    .role = n->cfg.role == PDS_NODE_COLOCATED
                                                ? PDSERVE__V1__NODE_ROLE__NODE_ROLE_COLOCATED
                                                : PDSERVE__V1__NODE_ROLE__NODE_ROLE_DECODE,
                                    .start_ns = pds_time_now_ns(),
                                    .state = PDSERVE__V1__NODE_STATE__NODE_STATE_UP};
    pds_rpc_method_t hm = pds_node_health_method(&n->health);
    if ((s = pds_rpc_server_add_method(n->srv, &hm)) != PDS_OK) return fail("methods", s);
    if ((s = pds_decode_sched_start(n->sched)) != PDS_OK) return fail("engine loop", s);
    if ((s = pds_rpc_server_start(n->srv)) != PDS_OK) return fail("serve", s);
    node_address(n);
    if ((s = reporter_start(n)) != PDS_OK) return fail("reporter", s);

    PDS_LOG_INFO(MOD,
                 "listening node=%s role=%s port=%d address=%s model=%s blocks=%d block_size=%d "
                 "kvx=%s router=%s",
                 n->cfg.id,
                 n->cfg.role != PDS_NODE_COLOCATED ? "decode"
                 : n->cfg.coloc_mode == 1          ? "colocated-chunked"
                                                   : "colocated-prefill-first",
                 pds_rpc_server_port(n->srv), n->address, n->info.model.name, n->info.kv.n_blocks,
                 n->info.kv.block_size, pds_kvx_backend_name((pds_kvx_backend_t)n->cfg.kvx_backend),
                 n->cfg.router[0] ? n->cfg.router : "(none)");
    printf("READY %s\n", n->address);
    fflush(stdout);

    while (!pds_node_should_stop()) pds_time_sleep_ms(50);
    PDS_LOG_INFO(MOD, "stopping node=%s", n->cfg.id);
    return 0;
}

/* Tears down whatever run() built, in the order the file comment gives. */
static void teardown(node_t *n)
{
    n->health.state = PDSERVE__V1__NODE_STATE__NODE_STATE_DRAINING;
    pds_node_reporter_stop(n->reporter);
    pds_decode_sched_stop(n->sched);
    pds_rpc_server_destroy(n->srv);
    pds_decode_service_destroy(n->svc);
    pds_decode_sched_destroy(n->sched);
    pds_kvx_destroy(n->kvx);
    pds_engine_destroy(n->engine);
}

int main(int argc, char **argv)
{
    static node_t node; /* zeroed; lives for the whole process */
    pds_status_t s = pds_node_config_parse(argc, argv, PDS_NODE_DECODE, &node.cfg);
    if (s == PDS_AGAIN) return 0; /* --help */
    if (s != PDS_OK) return fail("config", s);
    if (node.cfg.role != PDS_NODE_DECODE && node.cfg.role != PDS_NODE_COLOCATED) {
        s = PDS_ERR(PDS_ERR_INVALID_ARG,
                    "[node] role must be decode or colocated for pdserve-decode");
        return fail("config", s);
    }
    pds_node_signals_install();
    int rc = run(&node);
    teardown(&node);
    pds_alloc_stats_t st;
    pds_alloc_stats(&st);
    PDS_LOG_INFO(MOD, "exit node=%s rc=%d live_blocks=%lld live_bytes=%lld", node.cfg.id, rc,
                 (long long)st.live_blocks, (long long)st.live_bytes);
    return rc;
}

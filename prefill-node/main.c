/* main.c: pdserve-prefill — a prefill node. It reads the node configuration, builds the engine and
 * the KV transfer (kvx), serves PrefillNode/Prefill, PrefillNode/Cancel and Pdserve/Health, and
 * registers with the router (unless [node] router is empty). It prints one line `READY host:port`
 * on stdout once serving (tests and scripts wait for it) and shuts down cleanly on SIGINT/SIGTERM:
 * the server stops taking calls, live jobs are cancelled and drained (their decode nodes get
 * Cancel), then everything is freed in reverse order.
 *
 * Usage: pdserve-prefill [--config FILE] [--section.key=value ...]   (see --help)
 */
#include <stdio.h>
#include <string.h>

#include "base/base.h"
#include "engine/engine.h"
#include "kvx/kvx.h"
#include "node/node.h"
#include "rpc/rpc.h"
#include "service.h"

#define MOD "prefill"

typedef struct {
    pds_node_config_t cfg;
    pds_engine_t *engine;
    pds_engine_info_t info;
    pds_kvx_t *kvx;
    pds_rpc_server_t *server;
    pf_service_t *svc;
    pds_node_reporter_t *reporter;
    pds_node_health_t health;
    char address[160]; /* what others dial */
} node_t;

static pds_status_t kvx_start(node_t *n)
{
    if (n->cfg.kvx_backend == PDS_KVX_LOOPBACK)
        return PDS_ERR(PDS_ERR_INVALID_ARG,
                       "[kvx] backend loopback works only inside one process; a prefill node "
                       "needs ucx or nccl");
    pds_kvx_params_t kp = pds_kvx_default_params();
    kp.backend = (pds_kvx_backend_t)n->cfg.kvx_backend;
    kp.device = n->cfg.device;
    kp.init_timeout_ms = PDS_MAX(n->cfg.transfer_timeout_ns / 1000000, 1);
    kp.path = (pds_kvx_path_t)n->cfg.kvx_path;
    kp.checksum = n->cfg.kvx_checksum;
    return pds_kvx_create(&kp, &n->kvx);
}

/* host:port others use: [node] advertise, else the listen host with the bound port. */
static void advertise_address(node_t *n)
{
    if (n->cfg.advertise[0]) {
        snprintf(n->address, sizeof n->address, "%s", n->cfg.advertise);
        return;
    }
    const char *colon = strrchr(n->cfg.listen, ':');
    int host_len = colon ? (int)(colon - n->cfg.listen) : (int)strlen(n->cfg.listen);
    snprintf(n->address, sizeof n->address, "%.*s:%d", host_len, n->cfg.listen,
             pds_rpc_server_port(n->server));
}

static pds_status_t server_start(node_t *n)
{
    pds_rpc_server_params_t sp = pds_rpc_server_default_params();
    sp.address = n->cfg.listen;
    PDS_TRY(pds_rpc_server_create(&sp, &n->server));
    pds_rpc_method_t m[3] = {pf_service_prefill_method(n->svc), pf_service_cancel_method(n->svc),
                             pds_node_health_method(&n->health)};
    for (size_t i = 0; i < PDS_ARRAY_LEN(m); i++)
        PDS_TRY(pds_rpc_server_add_method(n->server, &m[i]));
    advertise_address(n);
    return pds_rpc_server_start(n->server);
}

static Pdserve__V1__KvDtype geometry_dtype(pds_dtype_t d)
{
    return d == PDS_DTYPE_F32    ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32
           : d == PDS_DTYPE_BF16 ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16
                                 : PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16;
}

static pds_status_t reporter_start(node_t *n)
{
    const void *addr;
    size_t addr_len;
    PDS_TRY(pds_kvx_address(n->kvx, &addr, &addr_len));
    const pds_model_config_t *m = &n->info.model;
    Pdserve__V1__KvGeometry geo = PDSERVE__V1__KV_GEOMETRY__INIT;
    geo.n_layers = (uint32_t)n->info.kv.n_layers;
    geo.n_kv_heads = (uint32_t)n->info.kv.n_kv_heads;
    geo.head_dim = (uint32_t)n->info.kv.head_dim;
    geo.block_size = (uint32_t)n->info.kv.block_size;
    geo.dtype = geometry_dtype(n->info.kv_dtype);
    Pdserve__V1__NodeInfo ni = PDSERVE__V1__NODE_INFO__INIT;
    ni.magic = PDS_RPC_PROTOCOL_MAGIC;
    ni.protocol_version = PDS_RPC_PROTOCOL_VERSION;
    ni.node_id = n->cfg.id;
    ni.role = PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL;
    ni.address = n->address;
    ni.kvx_backend = (char *)pds_kvx_backend_name((pds_kvx_backend_t)n->cfg.kvx_backend);
    ni.kvx_address.data = (uint8_t *)addr;
    ni.kvx_address.len = addr_len;
    ni.kv = &geo;
    ni.total_kv_blocks = (uint32_t)n->info.kv.n_blocks;
    ni.model_name = (char *)m->name;
    ni.model_fingerprint = pds_node_model_fingerprint(&n->cfg, m);
    ni.max_batch_seqs = (uint32_t)n->info.max_batch_seqs;
    ni.max_context_tokens = (uint32_t)m->max_context;
    ni.vocab_size = (uint32_t)m->vocab;
    ni.bos_token_id = m->bos_id;
    ni.eos_token_id = m->eos_id;
    ni.max_batch_tokens = (uint32_t)PDS_MIN(n->cfg.max_batch_tokens, n->info.max_batch_tokens);
    return pds_node_reporter_start(n->cfg.router, &ni, pf_service_load, n->svc, &n->reporter);
}

/* Stops in reverse order of start; every step accepts what was never started. */
static void node_stop(node_t *n)
{
    n->health.state = PDSERVE__V1__NODE_STATE__NODE_STATE_DRAINING;
    pds_node_reporter_stop(n->reporter);
    if (n->server) pds_rpc_server_shutdown(n->server, 1000);
    pf_service_destroy(n->svc); /* cancels and drains live jobs, stops the engine loop */
    pds_rpc_server_destroy(n->server);
    pds_kvx_destroy(n->kvx);
    pds_engine_destroy(n->engine);
}

int main(int argc, char **argv)
{
    node_t n;
    memset(&n, 0, sizeof n);
    pds_status_t s = pds_node_config_parse(argc, argv, PDS_NODE_PREFILL, &n.cfg);
    if (s == PDS_AGAIN) return 0; /* --help */
    if (s == PDS_OK && n.cfg.role != PDS_NODE_PREFILL)
        s = PDS_ERR(PDS_ERR_INVALID_ARG, "pdserve-prefill runs [node] role prefill only");
    if (s != PDS_OK) {
        fprintf(stderr, "pdserve-prefill: %s\n", pds_err_detail());
        return 2;
    }
    pds_node_signals_install();
    n.health = (pds_node_health_t){.node_id = n.cfg.id,
                                   .role = PDSERVE__V1__NODE_ROLE__NODE_ROLE_PREFILL,
                                   .start_ns = pds_time_now_ns(),
                                   .state = PDSERVE__V1__NODE_STATE__NODE_STATE_UP};
    const char *step = "engine";
    s = pds_node_engine_create(&n.cfg, &n.engine);
    if (s == PDS_OK) {
        pds_engine_info(n.engine, &n.info);
        step = "kvx";
        s = kvx_start(&n);
    }
    if (s == PDS_OK) {
        step = "service";
        pf_service_params_t sp = {
            .cfg = &n.cfg, .engine = n.engine, .kvx = n.kvx, .state = &n.health.state};
        s = pf_service_create(&sp, &n.svc);
    }
    if (s == PDS_OK) {
        step = "server";
        s = server_start(&n);
    }
    if (s == PDS_OK) {
        step = "reporter";
        s = reporter_start(&n);
    }
    if (s != PDS_OK) {
        fprintf(stderr, "pdserve-prefill: %s: %s\n", step, pds_err_detail());
        node_stop(&n);
        return 1;
    }
    PDS_LOG_INFO(MOD, "serving node=%s address=%s model=%s kv_blocks=%d block_size=%d router=%s",
                 n.cfg.id, n.address, n.info.model.name, n.info.kv.n_blocks, n.info.kv.block_size,
                 n.cfg.router[0] ? n.cfg.router : "none");
    printf("READY %s\n", n.address);
    fflush(stdout);
    while (!pds_node_should_stop()) pds_time_sleep_ms(50);
    PDS_LOG_INFO(MOD, "stopping node=%s", n.cfg.id);
    node_stop(&n);
    return 0;
}

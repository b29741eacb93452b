/* node: what the prefill and decode programs share — their configuration schema, building the
 * engine from it, the Health method, and the agent that registers the node with its router and
 * sends periodic load reports.
 *
 * Configuration: an INI file (--config FILE) then `--section.key=value` flags, against
 * pds_node_config_schema(). The model is either a directory (config.json + safetensors) or a
 * built-in preset with synthetic weights from a seed; every node of a cluster (and the reference
 * generator) must use the same one — the fingerprint sent at registration lets the router refuse a
 * node that does not.
 *
 * Reporter: one thread per node. It calls Register until the router accepts (retrying every
 * 500 ms while the router is unreachable), then Report every report interval with the load the
 * node's callback fills in, and registers again when the router says it forgot the node (router
 * restart). The callback runs on the reporter thread: it must read the node's state in a
 * thread-safe way (the nodes keep atomics / a mutex-protected snapshot).
 */
#ifndef PDS_NODE_H
#define PDS_NODE_H

#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"
#include "config/config.h"
#include "engine/engine.h"
#include "proto/pdserve.pb-c.h"
#include "rpc/rpc.h"

typedef enum { PDS_NODE_PREFILL = 0, PDS_NODE_DECODE, PDS_NODE_COLOCATED } pds_node_role_t;

typedef struct {
    /* [node] */
    char id[64];
    int role;            /* pds_node_role_t */
    char listen[128];    /* host:port of the node service; port 0 = ephemeral */
    char advertise[128]; /* host:port others use; "" = listen host + bound port */
    char router[128];    /* router's host:port; "" = run without a router (tests) */
    int64_t report_interval_ns;
    /* [model] */
    char model_dir[512]; /* "" = preset */
    char preset[32];
    int64_t seed;
    /* [engine] */
    int backend; /* pds_engine_backend_t */
    int threads;
    int device;
    int block_size;
    int64_t kv_tokens; /* 0 = backend default */
    double kv_mem_fraction;
    int max_batch_tokens;
    int max_batch_seqs;
    /* [kvx] */
    int kvx_backend; /* pds_kvx_backend_t: 0 ucx, 1 loopback, 2 nccl */
    int kvx_path;    /* pds_kvx_path_t: 0 am, 1 put */
    bool kvx_checksum;
    int64_t transfer_timeout_ns;
    /* [colocated] (role colocated only) */
    int coloc_mode;         /* 0 prefill_first (vLLM), 1 chunked (Sarathi-Serve) */
    int coloc_chunk_tokens; /* chunked: tokens per step (decodes + prompt chunks) */
    /* [log] */
    int log_level; /* pds_log_level_t */
} pds_node_config_t;

const pds_config_schema_t *pds_node_config_schema(void);
/* Defaults, then --config FILE (if among the args), then the remaining --section.key flags.
 * `--help` prints the schema's help and returns PDS_AGAIN (the caller exits 0). Unknown arguments
 * are an error naming them. Also applies [log] level. */
pds_status_t pds_node_config_parse(int argc, char **argv, pds_node_role_t default_role,
                                   pds_node_config_t *out);

/* Builds the engine the config names: [model] dir loaded from files, else the preset with
 * synthetic weights from [model] seed. */
pds_status_t pds_node_engine_create(const pds_node_config_t *cfg, pds_engine_t **out);
/* 64-bit fingerprint of the model: config fields + weights identity (preset+seed or dir path). */
uint64_t pds_node_model_fingerprint(const pds_node_config_t *cfg, const pds_model_config_t *m);

/* Health handler any node can register: arg is a pds_node_health_t the node keeps updated. */
typedef struct {
    const char *node_id;
    int role; /* Pdserve__V1__NodeRole */
    int64_t start_ns;
    volatile int state; /* Pdserve__V1__NodeState */
} pds_node_health_t;
pds_rpc_method_t pds_node_health_method(pds_node_health_t *h);

/* ---- reporter ----------------------------------------------------------------------------------
 */
typedef struct pds_node_reporter pds_node_reporter_t;
/* Fills the load fields of `r` (node_id and seq are set by the reporter). Reporter thread. */
typedef void (*pds_node_load_fn)(void *ctx, Pdserve__V1__LoadReport *r);

/* Starts the reporter thread. `info` is copied (deeply): it is the NodeInfo to register with.
 * With an empty router address, starts nothing and returns PDS_OK. */
pds_status_t pds_node_reporter_start(const char *router, const Pdserve__V1__NodeInfo *info,
                                     pds_node_load_fn load, void *ctx, pds_node_reporter_t **out);
/* True once the router accepted the registration. */
bool pds_node_reporter_registered(pds_node_reporter_t *r);
/* Sends one report now (e.g. right after a big change in free blocks). Non-blocking. */
void pds_node_reporter_kick(pds_node_reporter_t *r);
void pds_node_reporter_stop(pds_node_reporter_t *r); /* joins the thread; accepts NULL */

/* Installs SIGINT/SIGTERM handlers that set a flag; pds_node_should_stop() reads it. */
void pds_node_signals_install(void);
bool pds_node_should_stop(void);

#endif /* PDS_NODE_H */

/* node.c: configuration schema and engine setup shared by the node programs, the Health method,
 * and the registration/report agent (one thread, blocking unary calls with short deadlines: a
 * router that is down costs the node nothing but a retry every 500 ms). */
#include "node/node.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#define T pds_node_config_t
static const char *const role_names[] = {"prefill", "decode", "colocated", NULL};
static const char *const backend_names[] = {"cpu", "cuda", NULL};
static const char *const kvx_names[] = {"ucx", "loopback", "nccl", NULL}; /* pds_kvx_backend_t */
static const char *const path_names[] = {"am", "put", NULL};
static const char *const level_names[] = {"trace", "debug", "info", "warn", "error", "off", NULL};
static const char *const coloc_names[] = {"prefill_first", "chunked", NULL};

static const pds_config_field_t node_fields[] = {
    {"node", "id", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, id), .def = "node-0",
     .help = "unique node id in the cluster"},
    {"node", "role", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, role), .def = "prefill",
     .choices = role_names, .help = "prefill | decode | colocated"},
    {"node", "listen", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, listen), .def = "127.0.0.1:0",
     .help = "host:port of this node's gRPC service (port 0 = any free port)"},
    {"node", "advertise", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, advertise), .def = "",
     .help = "host:port other nodes use to reach this one (empty = listen host + bound port)"},
    {"node", "router", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, router), .def = "127.0.0.1:7100",
     .help = "router host:port to register with (empty = no router)"},
    {"node", "report_interval", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, report_interval_ns),
     .def = "200ms", .min = "10ms", .max = "60s", .help = "load report period"},
    {"model", "dir", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, model_dir), .def = "",
     .help = "model directory (config.json + safetensors); empty = the preset below"},
    {"model", "preset", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, preset), .def = "small",
     .help =
         "built-in preset with synthetic weights: tiny, small, llama3-8b, llama2-7b, llama3-70b"},
    {"model", "seed", PDS_CONFIG_INT64, PDS_CONFIG_MEMBER(T, seed), .def = "1", .min = "0",
     .help = "seed of the preset's synthetic weights"},
    {"engine", "backend", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, backend), .def = "cpu",
     .choices = backend_names, .help = "cpu | cuda"},
    {"engine", "threads", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, threads), .def = "0", .min = "0",
     .max = "1024", .help = "CPU worker threads (0 = all cores)"},
    {"engine", "device", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, device), .def = "0", .min = "0",
     .max = "64", .help = "CUDA device ordinal"},
    {"engine", "block_size", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, block_size), .def = "16",
     .min = "1", .max = "1024", .help = "tokens per KV block (must match across the cluster)"},
    {"engine", "kv_tokens", PDS_CONFIG_INT64, PDS_CONFIG_MEMBER(T, kv_tokens), .def = "0",
     .min = "0", .help = "KV pool size in tokens (0 = backend default)"},
    {"engine", "kv_mem_fraction", PDS_CONFIG_DOUBLE, PDS_CONFIG_MEMBER(T, kv_mem_fraction),
     .def = "0.9", .min = "0.01", .max = "1", .help = "CUDA: share of free GPU memory for KV"},
    {"engine", "max_batch_tokens", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, max_batch_tokens),
     .def = "8192", .min = "1", .help = "most new tokens in one forward (prefill token budget)"},
    {"engine", "max_batch_seqs", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, max_batch_seqs), .def = "256",
     .min = "1", .help = "most sequences in one forward"},
    {"kvx", "backend", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, kvx_backend), .def = "ucx",
     .choices = kvx_names,
     .help = "KV transfer backend: ucx | nccl (GPU pools) | loopback (tests)"},
    {"kvx", "path", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, kvx_path), .def = "am",
     .choices = path_names, .help = "UCX data path: am (active messages) | put (RMA)"},
    {"kvx", "checksum", PDS_CONFIG_BOOL, PDS_CONFIG_MEMBER(T, kvx_checksum), .def = "true",
     .help = "verify a checksum per (layer, block) before decoding"},
    {"kvx", "timeout", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, transfer_timeout_ns), .def = "30s",
     .min = "10ms", .help = "a transfer not complete by then fails"},
    {"colocated", "mode", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, coloc_mode), .def = "prefill_first",
     .choices = coloc_names,
     .help = "role colocated: prefill_first (a prompt batch runs before the next decode step, "
             "vLLM) | chunked (each step: decodes + prompt chunks within chunk_tokens, Sarathi)"},
    {"colocated", "chunk_tokens", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, coloc_chunk_tokens),
     .def = "512", .min = "16", .help = "role colocated, chunked: token budget of one step"},
    {"log", "level", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, log_level), .def = "info",
     .choices = level_names, .help = "trace | debug | info | warn | error | off"},
};
#undef T

static const pds_config_schema_t node_schema = {node_fields, (int)PDS_ARRAY_LEN(node_fields),
                                                sizeof(pds_node_config_t)};

const pds_config_schema_t *pds_node_config_schema(void)
{
    return &node_schema;
}

pds_status_t pds_node_config_parse(int argc, char **argv, pds_node_role_t default_role,
                                   pds_node_config_t *out)
{
    pds_node_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    PDS_TRY(pds_config_defaults(&node_schema, &cfg));
    cfg.role = (int)default_role;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("usage: %s [--config FILE] [--section.key=value ...]\n\n", argv[0]);
            pds_config_help(&node_schema, stdout);
            return PDS_AGAIN;
        }
    }
    /* --config FILE / --config=FILE first, whatever its position: flags override the file. */
    char **rest = pds_malloc(sizeof(char *) * (size_t)(argc > 0 ? argc : 1));
    if (!rest) return PDS_ERR(PDS_ERR_NO_MEMORY, "args");
    int n = 0;
    pds_status_t s = PDS_OK;
    for (int i = 1; i < argc && s == PDS_OK; i++) {
        const char *file = NULL;
        if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc) {
                s = PDS_ERR(PDS_ERR_INVALID_ARG, "--config needs a file name");
                break;
            }
            file = argv[++i];
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            file = argv[i] + 9;
        }
        if (file) {
            s = pds_config_load_file(&node_schema, &cfg, file);
        } else {
            rest[n++] = argv[i];
        }
    }
    int n_rest = 0;
    if (s == PDS_OK) s = pds_config_apply_args(&node_schema, &cfg, n, rest, &n_rest);
    if (s == PDS_OK && n_rest > 0)
        s = PDS_ERR(PDS_ERR_INVALID_ARG, "unknown argument '%s' (see --help)", rest[0]);
    pds_free(rest);
    if (s != PDS_OK) return s;
    if (!cfg.model_dir[0] && !cfg.preset[0])
        return PDS_ERR(PDS_ERR_INVALID_ARG, "[model] needs dir or preset");
    pds_log_set_level((pds_log_level_t)cfg.log_level);
    *out = cfg;
    return PDS_OK;
}

pds_status_t pds_node_engine_create(const pds_node_config_t *cfg, pds_engine_t **out)
{
    pds_engine_params_t p = pds_engine_default_params();
    p.backend = (pds_engine_backend_t)cfg->backend;
    p.n_threads = cfg->threads;
    p.device = cfg->device;
    p.block_size = cfg->block_size;
    p.kv_tokens = cfg->kv_tokens;
    p.kv_mem_fraction = (float)cfg->kv_mem_fraction;
    p.max_batch_tokens = cfg->max_batch_tokens;
    p.max_batch_seqs = cfg->max_batch_seqs;
    if (cfg->model_dir[0]) {
        pds_model_t *m = NULL;
        PDS_TRY(pds_model_load(cfg->model_dir, &m));
        pds_status_t s = pds_engine_create(m, &p, out);
        pds_model_destroy(m);
        return s;
    }
    pds_model_config_t mc;
    PDS_TRY(pds_model_preset(cfg->preset, &mc));
    return pds_engine_create_synth(&mc, (uint64_t)cfg->seed, &p, out);
}

uint64_t pds_node_model_fingerprint(const pds_node_config_t *cfg, const pds_model_config_t *m)
{
    const int32_t dims[] = {m->n_layers, m->hidden, m->n_heads,     m->n_kv_heads, m->head_dim,
                            m->ffn,      m->vocab,  m->max_context, m->bos_id,     m->eos_id};
    uint64_t h = 0x70647376;
    for (size_t i = 0; i < PDS_ARRAY_LEN(dims); i++) h = pds_mix64(h ^ (uint64_t)(uint32_t)dims[i]);
    const char *id = cfg->model_dir[0] ? cfg->model_dir : cfg->preset;
    for (const char *c = id; *c; c++) h = pds_mix64(h ^ (uint8_t)*c);
    if (!cfg->model_dir[0]) h = pds_mix64(h ^ (uint64_t)cfg->seed);
    return h;
}

/* ---- Health ------------------------------------------------------------------------------------
 */
static void health_handler(pds_rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    pds_node_health_t *h = arg;
    Pdserve__V1__HealthReply r = PDSERVE__V1__HEALTH_REPLY__INIT;
    r.state = (Pdserve__V1__NodeState)h->state;
    r.node_id = (char *)h->node_id;
    r.role = (Pdserve__V1__NodeRole)h->role;
    r.protocol_version = PDS_RPC_PROTOCOL_VERSION;
    r.build = (char *)"pdserve 0.1.0";
    r.uptime_ms = (uint64_t)((pds_time_now_ns() - h->start_ns) / 1000000);
    pds_rpc_call_reply(call, &r.base);
}

pds_rpc_method_t pds_node_health_method(pds_node_health_t *h)
{
    pds_rpc_method_t m = {"/pdserve.v1.Pdserve/Health",
                          PDS_RPC_UNARY,
                          &pdserve__v1__health_request__descriptor,
                          health_handler,
                          NULL,
                          h};
    return m;
}

/* ---- reporter ----------------------------------------------------------------------------------
 */
struct pds_node_reporter {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop, kick;
    atomic_bool registered;
    pds_rpc_channel_t *ch;
    uint8_t *info_buf; /* packed NodeInfo: a deep copy that needs no ownership rules */
    size_t info_len;
    int64_t interval_ns;
    uint64_t seq;
    char node_id[64];
    pds_node_load_fn load;
    void *ctx;
};

/* Sleeps until the deadline, a kick or stop. Returns false when stopping. */
static bool reporter_wait(pds_node_reporter_t *r, int64_t ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t t = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + ns;
    ts.tv_sec = t / 1000000000LL;
    ts.tv_nsec = t % 1000000000LL;
    pthread_mutex_lock(&r->mu);
    while (!r->stop && !r->kick)
        if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) != 0) break;
    r->kick = false;
    bool go = !r->stop;
    pthread_mutex_unlock(&r->mu);
    return go;
}

static bool reporter_register(pds_node_reporter_t *r)
{
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call_raw(
        r->ch, "/pdserve.v1.RouterInternal/RegisterNode", r->info_buf, r->info_len,
        &pdserve__v1__register_reply__descriptor, 2000, &reply);
    if (s != PDS_OK) {
        PDS_LOG_DEBUG("node", "register_failed node=%s status=%s detail=\"%s\"", r->node_id,
                      pds_status_name(s), pds_err_detail());
        if (s == PDS_ERR_FAILED_PRECONDITION || s == PDS_ERR_INVALID_ARG)
            PDS_LOG_ERROR("node", "router_refused node=%s detail=\"%s\"", r->node_id,
                          pds_err_detail());
        return false;
    }
    Pdserve__V1__RegisterReply *rr = (Pdserve__V1__RegisterReply *)reply;
    if (rr->report_interval_ms > 0) r->interval_ns = (int64_t)rr->report_interval_ms * 1000000;
    PDS_LOG_INFO("node", "registered node=%s router=%s", r->node_id, rr->router_id);
    pds_rpc_msg_free(reply);
    atomic_store(&r->registered, true);
    return true;
}

static void reporter_report(pds_node_reporter_t *r)
{
    Pdserve__V1__LoadReport rep = PDSERVE__V1__LOAD_REPORT__INIT;
    r->load(r->ctx, &rep);
    rep.node_id = r->node_id;
    rep.seq = ++r->seq;
    ProtobufCMessage *reply = NULL;
    pds_status_t s = pds_rpc_channel_call(r->ch, "/pdserve.v1.RouterInternal/ReportLoad", &rep.base,
                                          &pdserve__v1__report_reply__descriptor, 2000, &reply);
    if (s == PDS_ERR_NOT_FOUND) {
        atomic_store(&r->registered, false);
    } else if (s == PDS_OK) {
        Pdserve__V1__ReportReply *rr = (Pdserve__V1__ReportReply *)reply;
        if (rr->reregister) atomic_store(&r->registered, false);
        if (rr->report_interval_ms > 0) r->interval_ns = (int64_t)rr->report_interval_ms * 1000000;
        pds_rpc_msg_free(reply);
    } else {
        PDS_LOG_DEBUG("node", "report_failed node=%s status=%s", r->node_id, pds_status_name(s));
    }
}

static void *reporter_main(void *arg)
{
    pds_node_reporter_t *r = arg;
    for (;;) {
        if (!atomic_load(&r->registered)) {
            if (!reporter_register(r)) {
                if (!reporter_wait(r, 500000000LL)) break;
                continue;
            }
        }
        reporter_report(r);
        if (!reporter_wait(r, r->interval_ns)) break;
    }
    return NULL;
}

pds_status_t pds_node_reporter_start(const char *router, const Pdserve__V1__NodeInfo *info,
                                     pds_node_load_fn load, void *ctx, pds_node_reporter_t **out)
{
    *out = NULL;
    if (!router || !router[0]) return PDS_OK;
    pds_node_reporter_t *r = pds_calloc(1, sizeof *r);
    if (!r) return PDS_ERR(PDS_ERR_NO_MEMORY, "reporter");
    r->info_len = protobuf_c_message_get_packed_size(&info->base);
    r->info_buf = pds_malloc(r->info_len);
    if (!r->info_buf) {
        pds_free(r);
        return PDS_ERR(PDS_ERR_NO_MEMORY, "reporter info");
    }
    protobuf_c_message_pack(&info->base, r->info_buf);
    snprintf(r->node_id, sizeof r->node_id, "%s", info->node_id);
    r->interval_ns = 200000000LL;
    r->load = load;
    r->ctx = ctx;
    pds_status_t s = pds_rpc_channel_create(router, &r->ch);
    if (s != PDS_OK) goto undo_buf;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    if (pthread_create(&r->thread, NULL, reporter_main, r) != 0) {
        s = PDS_ERR(PDS_ERR_INTERNAL, "reporter thread");
        goto undo_channel;
    }
    *out = r;
    return PDS_OK;
undo_channel:
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    pds_rpc_channel_destroy(r->ch);
undo_buf:
    pds_free(r->info_buf);
    pds_free(r);
    return s;
}

bool pds_node_reporter_registered(pds_node_reporter_t *r)
{
    return r && atomic_load(&r->registered);
}

void pds_node_reporter_kick(pds_node_reporter_t *r)
{
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    r->kick = true;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

void pds_node_reporter_stop(pds_node_reporter_t *r)
{
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    pds_rpc_channel_destroy(r->ch);
    pds_free(r->info_buf);
    pds_free(r);
}

/* ---- signals: the one process-wide flag, set from a signal handler ----------------------------
 */
static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

void pds_node_signals_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

bool pds_node_should_stop(void)
{
    return stop_requested != 0;
}

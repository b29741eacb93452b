/* main.c: pdserve-router — serves the public Pdserve API and RouterInternal on one port, places
 * each request on a (prefill, decode) pair (or a colocated node) and relays its tokens.
 * Configuration: INI file
 * (--config FILE) and --router.key=value flags. Prints `READY host:port` once serving. */
#include <stdio.h>
#include <string.h>

#include "router/router.h"
#include "node/node.h"

#define T router_config_t
static const char *const level_names[] = {"trace", "debug", "info", "warn", "error", "off", NULL};
static const char *const placement_names[] = {"least-loaded", "slo", NULL};
static const char *const policy_names[] = {"queue", "best-effort", "reject",
                                           NULL}; /* slo.h order */
static const pds_config_field_t fields[] = {
    {"router", "id", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, id), .def = "router-0",
     .help = "router id (nodes address their token streams to it)"},
    {"router", "listen", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, listen), .def = "127.0.0.1:7100",
     .help = "host:port for clients and nodes (port 0 = any free port)"},
    {"router", "port_file", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, port_file), .def = "",
     .help = "write the bound port to this file once serving"},
    {"router", "workers", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, workers), .def = "64", .min = "1",
     .max = "4096", .help = "threads making prefill calls (concurrent prefills in flight)"},
    {"router", "report_interval", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, report_interval_ns),
     .def = "200ms", .min = "10ms", .max = "60s", .help = "load report period asked of nodes"},
    {"router", "node_timeout", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, node_timeout_ns),
     .def = "2s", .min = "50ms", .help = "a node silent this long is DOWN (requests re-placed)"},
    {"router", "prefill_timeout", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, prefill_timeout_ns),
     .def = "120s", .min = "10ms", .help = "deadline of one Prefill call"},
    {"router", "place_timeout", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, place_timeout_ns),
     .def = "60s", .min = "0", .help = "how long a request may wait for a node pair"},
    {"router", "nodes", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, nodes), .def = "",
     .help = "comma-separated node addresses expected (listed DOWN until they register)"},
    {"slo", "placement", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, placement), .def = "least-loaded",
     .choices = placement_names,
     .help = "least-loaded (fewest queued prompt tokens x most free KV) | slo (predicted TTFT and "
             "TPOT against each request's targets; needs a profile)"},
    {"slo", "policy", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, policy), .def = "queue",
     .choices = policy_names,
     .help = "slo placement when no pair is predicted to meet the targets: queue (wait up to "
             "queue_deadline) | best-effort (place on the best pair) | reject "
             "(RESOURCE_EXHAUSTED with the predictions)"},
    {"slo", "queue_deadline", PDS_CONFIG_DURATION, PDS_CONFIG_MEMBER(T, queue_deadline_ns),
     .def = "10s", .min = "0", .help = "queue policy: reject a request that waited this long"},
    {"slo", "classes", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, classes),
     .def = "interactive:250:50,batch:5000:500",
     .help = "named SLO classes NAME:TTFT_MS:TPOT_MS,... (0 = no target)"},
    {"slo", "default_class", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, default_class), .def = "",
     .help = "class of requests that name none (and give no targets); empty = no targets"},
    {"slo", "tpot_weight", PDS_CONFIG_DOUBLE, PDS_CONFIG_MEMBER(T, tpot_weight), .def = "1",
     .min = "0.01", .max = "100", .help = "weight of TPOT slack against TTFT slack"},
    {"slo", "profile", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, profile), .def = "",
     .help = "latency profile (pdserve-plan profile) for nodes of every role"},
    {"slo", "prefill_profile", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, prefill_profile), .def = "",
     .help = "profile of prefill nodes (overrides profile)"},
    {"slo", "decode_profile", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, decode_profile), .def = "",
     .help = "profile of decode nodes (overrides profile)"},
    {"slo", "colocated_profile", PDS_CONFIG_STRING, PDS_CONFIG_MEMBER(T, colocated_profile),
     .def = "", .help = "profile of colocated nodes (overrides decode_profile and profile)"},
    {"slo", "refit", PDS_CONFIG_BOOL, PDS_CONFIG_MEMBER(T, refit), .def = "true",
     .help = "refit node models online from measured prefill and decode-step times"},
    {"slo", "refit_window", PDS_CONFIG_INT, PDS_CONFIG_MEMBER(T, refit_window), .def = "64",
     .min = "8", .max = "4096", .help = "samples per phase and node the refit sees"},
    {"slo", "local_prefill", PDS_CONFIG_BOOL, PDS_CONFIG_MEMBER(T, local_prefill), .def = "true",
     .help = "let colocated nodes prefill requests themselves when predicted better than a "
             "transfer (least-loaded: only when no prefill node is up)"},
    {"log", "level", PDS_CONFIG_ENUM, PDS_CONFIG_MEMBER(T, log_level), .def = "info",
     .choices = level_names, .help = "trace | debug | info | warn | error | off"},
};
#undef T
static const pds_config_schema_t schema = {fields, (int)PDS_ARRAY_LEN(fields),
                                           sizeof(router_config_t)};

static pds_status_t parse_args(int argc, char **argv, router_config_t *cfg)
{
    PDS_TRY(pds_config_defaults(&schema, cfg));
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("usage: %s [--config FILE] [--section.key=value ...]\n\n", argv[0]);
            pds_config_help(&schema, stdout);
            return PDS_AGAIN;
        }
    }
    char **rest = pds_malloc(sizeof(char *) * (size_t)argc);
    if (!rest) return PDS_ERR(PDS_ERR_NO_MEMORY, "args");
    int n = 0;
    pds_status_t s = PDS_OK;
    for (int i = 1; i < argc && s == PDS_OK; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            s = pds_config_load_file(&schema, cfg, argv[++i]);
        else if (strncmp(argv[i], "--config=", 9) == 0)
            s = pds_config_load_file(&schema, cfg, argv[i] + 9);
        else
            rest[n++] = argv[i];
    }
    int n_rest = 0;
    if (s == PDS_OK) s = pds_config_apply_args(&schema, cfg, n, rest, &n_rest);
    if (s == PDS_OK && n_rest > 0)
        s = PDS_ERR(PDS_ERR_INVALID_ARG, "unknown argument '%s' (see --help)", rest[0]);
    pds_free(rest);
    if (s == PDS_OK) pds_log_set_level((pds_log_level_t)cfg->log_level);
    return s;
}

static void add_config_nodes(router_t *r)
{
    char list[sizeof r->cfg.nodes];
    snprintf(list, sizeof list, "%s", r->cfg.nodes);
    char *save = NULL;
    for (char *a = strtok_r(list, ", ", &save); a; a = strtok_r(NULL, ", ", &save)) {
        node_t *n = pds_calloc(1, sizeof *n);
        if (!n) return;
        snprintf(n->id, sizeof n->id, "%s", a);
        snprintf(n->address, sizeof n->address, "%s", a);
        n->state = PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN;
        n->next = r->nodes;
        r->nodes = n;
    }
}

int main(int argc, char **argv)
{
    router_t *r = pds_calloc(1, sizeof *r);
    if (!r) return 1;
    pds_status_t s = parse_args(argc, argv, &r->cfg);
    if (s == PDS_AGAIN) {
        pds_free(r);
        return 0;
    }
    if (s != PDS_OK) {
        fprintf(stderr, "pdserve-router: %s\n", pds_err_detail());
        pds_free(r);
        return 2;
    }
    pthread_mutex_init(&r->slo_mu, NULL);
    if ((s = router_slo_setup(r)) != PDS_OK) {
        fprintf(stderr, "pdserve-router: %s\n", pds_err_detail());
        pthread_mutex_destroy(&r->slo_mu);
        pds_free(r);
        return 2;
    }
    pds_node_signals_install();
    pthread_mutex_init(&r->mu, NULL);
    r->start_ns = pds_time_now_ns();
    r->epoch = (uint64_t)pds_time_wall_ns();
    r->n_buckets = 256;
    r->buckets = pds_calloc(r->n_buckets, sizeof *r->buckets);
    add_config_nodes(r);
    int rc = 1;
    if (!r->buckets || pds_queue_create(&r->work) != PDS_OK) goto undo_base;

    pds_rpc_server_params_t sp = pds_rpc_server_default_params();
    sp.address = r->cfg.listen;
    if ((s = pds_rpc_server_create(&sp, &r->server)) != PDS_OK ||
        (s = router_service_add(r, r->server)) != PDS_OK) {
        fprintf(stderr, "pdserve-router: cannot serve on %s: %s\n", r->cfg.listen,
                pds_err_detail());
        goto undo_server;
    }
    r->workers = pds_calloc((size_t)r->cfg.workers, sizeof *r->workers);
    if (!r->workers) goto undo_server;
    for (; r->n_workers < r->cfg.workers; r->n_workers++)
        if (pthread_create(&r->workers[r->n_workers], NULL, router_worker_main, r) != 0) break;
    if (pthread_create(&r->monitor, NULL, router_monitor_main, r) != 0) goto undo_workers;
    if ((s = pds_rpc_server_start(r->server)) != PDS_OK) {
        fprintf(stderr, "pdserve-router: %s\n", pds_err_detail());
        goto undo_monitor;
    }

    char host[128];
    snprintf(host, sizeof host, "%s", r->cfg.listen);
    char *colon = strrchr(host, ':');
    if (colon) *colon = '\0';
    int port = pds_rpc_server_port(r->server);
    PDS_LOG_INFO("router", "listening router=%s port=%d workers=%d placement=%s policy=%s",
                 r->cfg.id, port, r->n_workers, placement_names[r->cfg.placement],
                 pds_slo_policy_name((pds_slo_policy_t)r->cfg.policy));
    if (r->cfg.port_file[0]) {
        FILE *f = fopen(r->cfg.port_file, "w");
        if (f) {
            fprintf(f, "%d\n", port);
            fclose(f);
        }
    }
    printf("READY %s:%d\n", host, port);
    fflush(stdout);

    while (!pds_node_should_stop()) pds_time_sleep_ms(50);
    PDS_LOG_INFO("router", "stopping router=%s ok=%lld failed=%lld cancelled=%lld replaced=%lld",
                 r->cfg.id, (long long)atomic_load(&r->n_ok), (long long)atomic_load(&r->n_failed),
                 (long long)atomic_load(&r->n_cancelled), (long long)atomic_load(&r->n_replaced));
    rc = 0;
    atomic_store(&r->stopping, true);
    pds_rpc_server_shutdown(r->server, 500);
undo_monitor:
    atomic_store(&r->stopping, true);
    pthread_join(r->monitor, NULL);
undo_workers:
    pds_queue_close(r->work);
    for (int i = 0; i < r->n_workers; i++) pthread_join(r->workers[i], NULL);
    pds_free(r->workers);
    router_streams_stop(r);
undo_server:
    pds_rpc_server_destroy(r->server);
    /* drain jobs a closed queue still holds */
    for (void *item; pds_queue_pop(r->work, 0, &item) == PDS_OK;) pds_free(item);
    pds_queue_destroy(r->work);
undo_base:
    router_requests_destroy(r);
    router_nodes_destroy(r);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->slo_mu);
    pds_free(r);
    return rc;
}

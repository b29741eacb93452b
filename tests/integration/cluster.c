/* cluster.c: process management, ClusterStatus polling, Generate client and reference for the
 * integration tests (see cluster.h). Children are plain fork+exec with PR_SET_PDEATHSIG so that
 * no failure path of a test (assertion, timeout, crash) can leave a node running; output goes to
 * files rather than pipes so a chatty child can never block on a full pipe. */
#include "cluster.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proto/pdserve.pb-c.h"
#include "tok/tok.h"

extern char **environ;

typedef struct {
    char id[64];
    pdt_role_t role;
    pid_t pid;
    bool ready;
    bool stopped; /* we signalled it to die: its exit is expected */
    bool reaped;
    int wstatus;
    char addr[512];
    char out_path[600], log_path[600];
} proc_t;

struct pdt_cluster {
    char dir[512];
    char bin[512];
    char tls[64];
    char preset[32];
    proc_t procs[PDT_MAX_PROCS];
    int n;
    pds_rpc_channel_t *ch; /* to the router */
    char err[6144];
};

/* ---- small helpers ----------------------------------------------------------------------------
 */
static bool set_err(pdt_cluster_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool set_err(pdt_cluster_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return false;
}

/* Appends the last ~2.5 KiB of a file to c->err. */
static void append_tail(pdt_cluster_t *c, const char *path)
{
    size_t len = strlen(c->err);
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(c->err + len, sizeof c->err - len, "\n(no log at %s)", path);
        return;
    }
    char buf[2560];
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    long from = size > (long)sizeof buf - 1 ? size - (long)sizeof buf + 1 : 0;
    fseek(f, from, SEEK_SET);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    snprintf(c->err + len, sizeof c->err - len, "\n---- tail of %s ----\n%s----", path, buf);
}

static const char *role_flag(pdt_role_t r)
{
    return r == PDT_PREFILL ? "pdserve-prefill" : r == PDT_DECODE ? "pdserve-decode" : "router";
}

static proc_t *find_proc(pdt_cluster_t *c, const char *id)
{
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->procs[i].id, id) == 0) return &c->procs[i];
    return NULL;
}

static void describe_exit(int ws, char *buf, size_t cap)
{
    if (WIFEXITED(ws))
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(ws));
    else if (WIFSIGNALED(ws))
        snprintf(buf, cap, "killed by signal %d (%s)", WTERMSIG(ws), strsignal(WTERMSIG(ws)));
    else
        snprintf(buf, cap, "ended (wait status 0x%x)", ws);
}

/* Reaps p if it has exited; true if it is (now) gone. */
static bool proc_gone(proc_t *p)
{
    if (p->reaped) return true;
    pid_t r = waitpid(p->pid, &p->wstatus, WNOHANG);
    if (r == p->pid) p->reaped = true;
    return p->reaped;
}

/* ---- create / destroy -------------------------------------------------------------------------
 */
static int mkdir_p(const char *path)
{
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(tmp, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

pdt_cluster_t *pdt_cluster_create(const char *name, const char *ucx_tls)
{
    static int counter;
    pdt_cluster_t *c = pds_calloc(1, sizeof *c);
    if (!c) return NULL;
    const char *tmp = getenv("PDS_TEST_TMP");
    const char *build = getenv("PDS_BUILD_DIR");
    snprintf(c->dir, sizeof c->dir, "%s/integ/%s-%d-%d", tmp && *tmp ? tmp : "/tmp/pds-test", name,
             (int)getpid(), counter++);
    snprintf(c->bin, sizeof c->bin, "%s/bin", build && *build ? build : ".");
    snprintf(c->tls, sizeof c->tls, "%s", ucx_tls ? ucx_tls : "tcp");
    snprintf(c->preset, sizeof c->preset, "tiny");
    if (mkdir_p(c->dir) != 0) {
        fprintf(stderr, "cluster: cannot create %s: %s\n", c->dir, strerror(errno));
        pds_free(c);
        return NULL;
    }
    return c;
}

void pdt_cluster_destroy(pdt_cluster_t *c)
{
    if (!c) return;
    pds_rpc_channel_destroy(c->ch);
    c->ch = NULL;
    /* Who died on its own? Say so: that is a bug in that program (or an intended kill). */
    for (int i = 0; i < c->n; i++) {
        proc_t *p = &c->procs[i];
        if (!p->stopped && proc_gone(p)) {
            char how[96];
            describe_exit(p->wstatus, how, sizeof how);
            set_err(c, "cluster: %s (pid %d) %s before teardown", p->id, (int)p->pid, how);
            append_tail(c, p->log_path);
            fprintf(stderr, "%s\n", c->err);
        }
    }
    /* Nodes first, then the router, so nodes do not spend their exit retrying registration. */
    for (int pass = 0; pass < 2; pass++) {
        bool want_router = pass == 1;
        for (int i = 0; i < c->n; i++) {
            proc_t *p = &c->procs[i];
            if ((p->role == PDT_ROUTER) != want_router || proc_gone(p)) continue;
            p->stopped = true;
            kill(p->pid, SIGTERM);
        }
        int64_t deadline = pds_time_now_ns() + 5000000000LL;
        for (;;) {
            bool all = true;
            for (int i = 0; i < c->n; i++) {
                proc_t *p = &c->procs[i];
                if ((p->role == PDT_ROUTER) == want_router && !proc_gone(p)) all = false;
            }
            if (all || pds_time_now_ns() > deadline) break;
            pds_time_sleep_ms(10);
        }
        for (int i = 0; i < c->n; i++) {
            proc_t *p = &c->procs[i];
            if ((p->role == PDT_ROUTER) != want_router || proc_gone(p)) continue;
            fprintf(stderr, "cluster: %s (pid %d) ignored SIGTERM for 5 s; SIGKILL\n", p->id,
                    (int)p->pid);
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &p->wstatus, 0);
            p->reaped = true;
        }
    }
    pds_free(c);
}

void pdt_cluster_set_preset(pdt_cluster_t *c, const char *preset)
{
    snprintf(c->preset, sizeof c->preset, "%s", preset);
}

const char *pdt_cluster_error(const pdt_cluster_t *c)
{
    return c ? c->err : "no cluster";
}

const char *pdt_cluster_dir(const pdt_cluster_t *c)
{
    return c->dir;
}

/* ---- spawning ---------------------------------------------------------------------------------
 */
/* Environment of the children: ours, with the UCX selection replaced. */
static char **child_env(pdt_cluster_t *c, char *tls_var, size_t tls_cap)
{
    size_t n = 0;
    while (environ[n]) n++;
    char **env = pds_calloc(n + 4, sizeof(char *));
    if (!env) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "UCX_TLS=", 8) == 0 ||
            strncmp(environ[i], "UCX_NET_DEVICES=", 16) == 0 ||
            strncmp(environ[i], "UCX_WARN_UNUSED_ENV_VARS=", 25) == 0)
            continue;
        env[k++] = environ[i];
    }
    snprintf(tls_var, tls_cap, "UCX_TLS=%s", c->tls);
    env[k++] = tls_var;
    env[k++] = (char *)"UCX_NET_DEVICES=lo";
    env[k++] = (char *)"UCX_WARN_UNUSED_ENV_VARS=n";
    env[k] = NULL;
    return env;
}

static bool spawn(pdt_cluster_t *c, pdt_role_t role, const char *id, char **argv)
{
    if (c->n >= PDT_MAX_PROCS) return set_err(c, "cluster: too many processes");
    if (find_proc(c, id)) return set_err(c, "cluster: id %s used twice", id);
    proc_t *p = &c->procs[c->n];
    memset(p, 0, sizeof *p);
    snprintf(p->id, sizeof p->id, "%s", id);
    p->role = role;
    char dir[sizeof c->dir];
    memcpy(dir, c->dir, sizeof dir);
    snprintf(p->out_path, sizeof p->out_path, "%s/%s.out", dir, id);
    snprintf(p->log_path, sizeof p->log_path, "%s/%s.log", dir, id);
    if (access(argv[0], X_OK) != 0)
        return set_err(c, "cluster: %s is not built (%s): build the target first", argv[0],
                       strerror(errno));
    char tls_var[96];
    char **env = child_env(c, tls_var, sizeof tls_var);
    if (!env) return set_err(c, "cluster: out of memory");
    int out = open(p->out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int log = open(p->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (out < 0 || log < 0 || in < 0) {
        if (out >= 0) close(out);
        if (log >= 0) close(log);
        if (in >= 0) close(in);
        pds_free(env);
        return set_err(c, "cluster: cannot open the logs of %s in %s", id, c->dir);
    }
    /* The command line, first in the log, so a failing test shows how to re-run it by hand. */
    FILE *lf = fdopen(dup(log), "w");
    if (lf) {
        fprintf(lf, "# UCX_TLS=%s UCX_NET_DEVICES=lo", c->tls);
        for (char **a = argv; *a; a++) fprintf(lf, " %s", *a);
        fprintf(lf, "\n");
        fclose(lf);
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* Only async-signal-safe calls from here to exec. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        dup2(in, 0);
        dup2(out, 1);
        dup2(log, 2);
        execve(argv[0], argv, env);
        static const char msg[] = "cluster: execve failed\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
        _exit(127);
    }
    close(out);
    close(log);
    close(in);
    pds_free(env);
    if (pid < 0) return set_err(c, "cluster: fork: %s", strerror(errno));
    p->pid = pid;
    c->n++;
    return true;
}

/* Looks for "READY host:port" at the start of a line of p's stdout. */
static bool read_ready(proc_t *p)
{
    FILE *f = fopen(p->out_path, "r");
    if (!f) return false;
    char line[512];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        if (strncmp(line, "READY ", 6) != 0 || !strchr(line, '\n')) continue;
        line[strcspn(line, "\r\n")] = '\0';
        snprintf(p->addr, sizeof p->addr, "%s", line + 6);
        found = p->addr[0] != '\0';
    }
    fclose(f);
    return found;
}

bool pdt_cluster_wait_ready(pdt_cluster_t *c, int timeout_ms)
{
    int64_t deadline = pds_time_now_ns() + (int64_t)timeout_ms * 1000000;
    for (;;) {
        bool all = true;
        for (int i = 0; i < c->n; i++) {
            proc_t *p = &c->procs[i];
            if (p->ready || p->stopped) continue;
            if (read_ready(p)) {
                p->ready = true;
                continue;
            }
            if (proc_gone(p)) {
                char how[96];
                describe_exit(p->wstatus, how, sizeof how);
                set_err(c, "cluster: %s %s before printing READY", p->id, how);
                append_tail(c, p->log_path);
                return false;
            }
            all = false;
        }
        if (all) return true;
        if (pds_time_now_ns() > deadline) {
            for (int i = 0; i < c->n; i++) {
                proc_t *p = &c->procs[i];
                if (p->ready || p->stopped) continue;
                set_err(c, "cluster: %s printed no READY line within %d ms", p->id, timeout_ms);
                append_tail(c, p->log_path);
                return false;
            }
        }
        pds_time_sleep_ms(10);
    }
}

bool pdt_cluster_start_router(pdt_cluster_t *c, const char *const *extra)
{
    char *argv[32];
    int n = 0;
    char path[600];
    snprintf(path, sizeof path, "%s/pdserve-router", c->bin);
    argv[n++] = path;
    argv[n++] = (char *)"--router.listen=127.0.0.1:0";
    argv[n++] = (char *)"--router.id=r0";
    argv[n++] = (char *)"--router.report_interval=100ms";
    argv[n++] = (char *)"--router.node_timeout=1s";
    for (int i = 0; extra && extra[i] && n < 30; i++) argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    if (!spawn(c, PDT_ROUTER, "router", argv)) return false;
    if (!pdt_cluster_wait_ready(c, 20000)) return false;
    return pds_rpc_channel_create(pdt_cluster_router(c), &c->ch) == PDS_OK ||
           set_err(c, "cluster: channel to the router: %s", pds_err_detail());
}

bool pdt_cluster_spawn_node(pdt_cluster_t *c, pdt_role_t role, const char *id, int64_t kv_tokens,
                            const char *const *extra)
{
    const char *router = pdt_cluster_router(c);
    if (!router) return set_err(c, "cluster: start the router before the nodes");
    char path[600], a_id[96], a_router[160], a_kv[64], a_preset[64];
    snprintf(path, sizeof path, "%s/%s", c->bin, role_flag(role));
    snprintf(a_id, sizeof a_id, "--node.id=%s", id);
    snprintf(a_router, sizeof a_router, "--node.router=%s", router);
    snprintf(a_preset, sizeof a_preset, "--model.preset=%s", c->preset);
    snprintf(a_kv, sizeof a_kv, "--engine.kv_tokens=%lld",
             (long long)(kv_tokens > 0 ? kv_tokens : 4096));
    char *argv[40];
    int n = 0;
    argv[n++] = path;
    argv[n++] = a_id;
    argv[n++] = a_router;
    argv[n++] = (char *)"--node.listen=127.0.0.1:0";
    argv[n++] = (char *)"--node.report_interval=100ms";
    argv[n++] = a_preset;
    argv[n++] = (char *)"--model.seed=1";
    argv[n++] = (char *)"--engine.threads=1";
    argv[n++] = a_kv;
    argv[n++] = (char *)"--kvx.backend=ucx";
    for (int i = 0; extra && extra[i] && n < 38; i++) argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    return spawn(c, role, id, argv);
}

bool pdt_cluster_start(pdt_cluster_t *c, int n_prefill, int n_decode, int64_t prefill_kv_tokens,
                       int64_t decode_kv_tokens)
{
    if (!pdt_cluster_start_router(c, NULL)) return false;
    char id[16];
    for (int i = 0; i < n_prefill; i++) {
        snprintf(id, sizeof id, "p%d", i);
        if (!pdt_cluster_spawn_node(c, PDT_PREFILL, id, prefill_kv_tokens, NULL)) return false;
    }
    for (int i = 0; i < n_decode; i++) {
        snprintf(id, sizeof id, "d%d", i);
        if (!pdt_cluster_spawn_node(c, PDT_DECODE, id, decode_kv_tokens, NULL)) return false;
    }
    return pdt_cluster_wait_ready(c, 30000) && pdt_cluster_wait_up(c, 20000);
}

const char *pdt_cluster_router(const pdt_cluster_t *c)
{
    return pdt_cluster_addr(c, "router");
}

const char *pdt_cluster_addr(const pdt_cluster_t *c, const char *id)
{
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->procs[i].id, id) == 0 && c->procs[i].ready) return c->procs[i].addr;
    return NULL;
}

bool pdt_cluster_kill(pdt_cluster_t *c, const char *id, int sig)
{
    proc_t *p = find_proc(c, id);
    if (!p) return set_err(c, "cluster: no process %s", id);
    if (proc_gone(p)) return set_err(c, "cluster: %s is already gone", id);
    p->stopped = true;
    if (kill(p->pid, sig) != 0) return set_err(c, "cluster: kill %s: %s", id, strerror(errno));
    if (sig == SIGKILL) {
        waitpid(p->pid, &p->wstatus, 0);
        p->reaped = true;
    }
    return true;
}

int pdt_cluster_log_count(pdt_cluster_t *c, const char *id, const char *needle)
{
    proc_t *p = find_proc(c, id);
    FILE *f = p ? fopen(p->log_path, "r") : NULL;
    if (!f) return -1;
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle)) n++;
    fclose(f);
    return n;
}

bool pdt_cluster_check_alive(pdt_cluster_t *c)
{
    for (int i = 0; i < c->n; i++) {
        proc_t *p = &c->procs[i];
        if (p->stopped || !proc_gone(p)) continue;
        char how[96];
        describe_exit(p->wstatus, how, sizeof how);
        set_err(c, "cluster: %s (pid %d) %s", p->id, (int)p->pid, how);
        append_tail(c, p->log_path);
        return false;
    }
    return true;
}

/* ---- ClusterStatus ----------------------------------------------------------------------------
 */
typedef enum { COND_UP, COND_STATE, COND_IDLE, COND_RUNNING } cond_t;

/* Evaluates the condition on one status reply; writes why not into why. */
static bool cond_holds(pdt_cluster_t *c, const Pdserve__V1__ClusterStatusReply *r, cond_t cond,
                       const char *id, int state, char *why, size_t cap)
{
    if (cond == COND_UP) {
        for (int i = 0; i < c->n; i++) {
            proc_t *p = &c->procs[i];
            if (p->role == PDT_ROUTER || p->stopped) continue;
            const Pdserve__V1__NodeStatus *ns = NULL;
            for (size_t k = 0; k < r->n_nodes; k++)
                if (strcmp(r->nodes[k]->node_id, p->id) == 0) ns = r->nodes[k];
            if (!ns) {
                snprintf(why, cap, "%s not listed", p->id);
                return false;
            }
            if (ns->state != PDSERVE__V1__NODE_STATE__NODE_STATE_UP) {
                snprintf(why, cap, "%s in state %d", p->id, ns->state);
                return false;
            }
        }
        return true;
    }
    if (cond == COND_RUNNING) {
        for (size_t k = 0; k < r->n_nodes; k++) {
            if (strcmp(r->nodes[k]->node_id, id) != 0) continue;
            snprintf(why, cap, "%s runs %u sequences", id, r->nodes[k]->running_seqs);
            return r->nodes[k]->running_seqs >= (uint32_t)state;
        }
        snprintf(why, cap, "%s not listed", id);
        return false;
    }
    if (cond == COND_STATE) {
        for (size_t k = 0; k < r->n_nodes; k++) {
            if (strcmp(r->nodes[k]->node_id, id) != 0) continue;
            snprintf(why, cap, "%s in state %d", id, r->nodes[k]->state);
            return (int)r->nodes[k]->state == state;
        }
        snprintf(why, cap, "%s not listed", id);
        return state == PDSERVE__V1__NODE_STATE__NODE_STATE_DOWN;
    }
    if (r->active_requests || r->queued_requests) {
        snprintf(why, cap, "router has %u active and %u queued requests", r->active_requests,
                 r->queued_requests);
        return false;
    }
    for (size_t k = 0; k < r->n_nodes; k++) {
        const Pdserve__V1__NodeStatus *ns = r->nodes[k];
        if (ns->state != PDSERVE__V1__NODE_STATE__NODE_STATE_UP) continue;
        if (ns->total_kv_blocks == 0 || ns->free_kv_blocks != ns->total_kv_blocks ||
            ns->running_seqs != 0) {
            snprintf(why, cap, "%s: %u of %u KV blocks free, %u running", ns->node_id,
                     ns->free_kv_blocks, ns->total_kv_blocks, ns->running_seqs);
            return false;
        }
    }
    return true;
}

static bool wait_cond(pdt_cluster_t *c, cond_t cond, const char *id, int state, int timeout_ms)
{
    if (!c->ch) return set_err(c, "cluster: no router");
    int64_t deadline = pds_time_now_ns() + (int64_t)timeout_ms * 1000000;
    char why[256] = "no answer";
    for (;;) {
        Pdserve__V1__ClusterStatusRequest req = PDSERVE__V1__CLUSTER_STATUS_REQUEST__INIT;
        Pdserve__V1__ClusterStatusReply *r = NULL;
        pds_status_t s = pds_rpc_channel_call(c->ch, "/pdserve.v1.Pdserve/ClusterStatus", &req.base,
                                              &pdserve__v1__cluster_status_reply__descriptor, 2000,
                                              (ProtobufCMessage **)&r);
        if (s == PDS_OK) {
            bool ok = cond_holds(c, r, cond, id, state, why, sizeof why);
            pds_rpc_msg_free(&r->base);
            if (ok) return true;
        } else {
            snprintf(why, sizeof why, "ClusterStatus failed: %s: %s", pds_status_name(s),
                     pds_err_detail());
        }
        if (pds_time_now_ns() > deadline) break;
        pds_time_sleep_ms(50);
    }
    set_err(c, "cluster: not %s after %d ms: %s",
            cond == COND_UP     ? "all up"
            : cond == COND_IDLE ? "idle"
                                : "in the wanted state",
            timeout_ms, why);
    proc_t *rp = find_proc(c, "router");
    if (rp) append_tail(c, rp->log_path);
    return false;
}

int pdt_cluster_active(pdt_cluster_t *c)
{
    Pdserve__V1__ClusterStatusRequest req = PDSERVE__V1__CLUSTER_STATUS_REQUEST__INIT;
    Pdserve__V1__ClusterStatusReply *r = NULL;
    if (!c->ch || pds_rpc_channel_call(c->ch, "/pdserve.v1.Pdserve/ClusterStatus", &req.base,
                                       &pdserve__v1__cluster_status_reply__descriptor, 2000,
                                       (ProtobufCMessage **)&r) != PDS_OK)
        return -1;
    int n = (int)r->active_requests;
    pds_rpc_msg_free(&r->base);
    return n;
}

bool pdt_cluster_wait_up(pdt_cluster_t *c, int timeout_ms)
{
    return wait_cond(c, COND_UP, NULL, 0, timeout_ms);
}

bool pdt_cluster_wait_state(pdt_cluster_t *c, const char *id, int state, int timeout_ms)
{
    return wait_cond(c, COND_STATE, id, state, timeout_ms);
}

bool pdt_cluster_wait_running(pdt_cluster_t *c, const char *id, int min_seqs, int timeout_ms)
{
    return wait_cond(c, COND_RUNNING, id, min_seqs, timeout_ms);
}

bool pdt_cluster_wait_idle(pdt_cluster_t *c, int timeout_ms)
{
    return wait_cond(c, COND_IDLE, NULL, 0, timeout_ms);
}

/* ---- Generate client --------------------------------------------------------------------------
 */
typedef struct {
    Pdserve__V1__GenerateRequest r;
    Pdserve__V1__SamplingParams sp;
    Pdserve__V1__TokenIds tid;
    Pdserve__V1__Slo slo;
} wire_req_t;

static void to_wire(const pdt_req_t *q, wire_req_t *w)
{
    pdserve__v1__generate_request__init(&w->r);
    pdserve__v1__sampling_params__init(&w->sp);
    pdserve__v1__token_ids__init(&w->tid);
    w->r.request_id = (char *)q->id;
    if (q->text) {
        w->r.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
        w->r.text = (char *)q->text;
    } else {
        w->tid.n_ids = (size_t)q->n_prompt;
        w->tid.ids = (int32_t *)q->prompt;
        w->r.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
        w->r.token_ids = &w->tid;
    }
    w->sp.temperature = q->temperature;
    w->sp.top_k = q->top_k;
    w->sp.top_p = q->top_p;
    if (q->has_seed) {
        w->sp.seed_opt_case = PDSERVE__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        w->sp.seed = q->seed;
    }
    w->r.sampling = &w->sp;
    w->r.max_tokens = q->max_tokens;
    w->r.n_stop_token_ids = (size_t)q->n_stop;
    w->r.stop_token_ids = (int32_t *)q->stop;
    w->r.ignore_eos = q->ignore_eos;
    if (q->slo_class || q->ttft_ms > 0 || q->tpot_ms > 0) {
        pdserve__v1__slo__init(&w->slo);
        w->slo.class_name = (char *)(q->slo_class ? q->slo_class : "");
        w->slo.ttft_ms = q->ttft_ms;
        w->slo.tpot_ms = q->tpot_ms;
        w->r.slo = &w->slo;
    }
}

static void copy_str(char *dst, size_t cap, const char *s)
{
    snprintf(dst, cap, "%s", s ? s : "");
}

/* Takes one message of the stream into res. */
static void absorb(pdt_res_t *res, const Pdserve__V1__GenerateResponse *m)
{
    if (res->has_summary) res->n_after_summary++;
    if (m->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK && m->chunk) {
        const Pdserve__V1__TokenChunk *ch = m->chunk;
        res->n_chunks++;
        if (ch->index != (uint32_t)res->n_tokens) res->in_order = false;
        char text[PDT_MAX_OUT + 1];
        size_t tlen = 0;
        int n_ids = (int)ch->n_ids;
        if (pds_tok_decode(ch->ids, n_ids, text, sizeof text, &tlen) != PDS_OK ||
            tlen != ch->text.len || (tlen && memcmp(text, ch->text.data, tlen) != 0))
            res->text_matches = false;
        for (int i = 0; i < n_ids && res->n_tokens < PDT_MAX_OUT; i++)
            res->tokens[res->n_tokens++] = ch->ids[i];
    } else if (m->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_SUMMARY && m->summary) {
        const Pdserve__V1__Summary *s = m->summary;
        res->has_summary = true;
        copy_str(res->request_id, sizeof res->request_id, s->request_id);
        copy_str(res->prefill_node, sizeof res->prefill_node, s->prefill_node);
        copy_str(res->decode_node, sizeof res->decode_node, s->decode_node);
        res->finish_reason = s->finish_reason;
        res->prompt_tokens = s->prompt_tokens;
        res->output_tokens = s->output_tokens;
        res->replacements = s->replacements;
        res->seed = s->seed;
        res->ttft_ms = s->ttft_ms;
        res->tpot_mean_ms = s->tpot_mean_ms;
    }
}

static void res_init(pdt_res_t *res)
{
    memset(res, 0, sizeof *res);
    res->in_order = true;
    res->text_matches = true;
}

pds_status_t pdt_generate(const char *router, const pdt_req_t *req, pdt_res_t *res, int timeout_ms)
{
    res_init(res);
    wire_req_t w;
    to_wire(req, &w);
    pds_rpc_channel_t *ch = NULL;
    pds_rpc_stream_t *st = NULL;
    pds_status_t s = pds_rpc_channel_create(router, &ch);
    if (s == PDS_OK)
        s = pds_rpc_stream_open(ch, "/pdserve.v1.Pdserve/Generate", &w.r.base,
                                &pdserve__v1__generate_response__descriptor, timeout_ms, &st);
    while (s == PDS_OK) {
        ProtobufCMessage *m = NULL;
        s = pds_rpc_stream_next(st, &m);
        if (s != PDS_OK || !m) break;
        absorb(res, (const Pdserve__V1__GenerateResponse *)m);
        pds_rpc_msg_free(m);
    }
    if (s != PDS_OK) copy_str(res->message, sizeof res->message, pds_err_detail());
    res->summary_last = res->has_summary && res->n_after_summary == 0;
    pds_rpc_stream_destroy(st);
    pds_rpc_channel_destroy(ch);
    res->status = s;
    return s;
}

typedef struct {
    const char *router;
    const pdt_req_t *req;
    pdt_res_t *res;
    int timeout_ms;
} gen_job_t;

static void *gen_thread(void *arg)
{
    gen_job_t *j = arg;
    pdt_generate(j->router, j->req, j->res, j->timeout_ms);
    return NULL;
}

void pdt_generate_many(const char *router, const pdt_req_t *reqs, pdt_res_t *res, int n,
                       int timeout_ms)
{
    pthread_t *th = pds_calloc((size_t)n, sizeof *th);
    gen_job_t *jobs = pds_calloc((size_t)n, sizeof *jobs);
    bool *started = pds_calloc((size_t)n, sizeof *started);
    PDS_ASSERT(th && jobs && started);
    for (int i = 0; i < n; i++) {
        jobs[i] = (gen_job_t){router, &reqs[i], &res[i], timeout_ms};
        started[i] = pthread_create(&th[i], NULL, gen_thread, &jobs[i]) == 0;
        if (!started[i]) {
            res_init(&res[i]);
            res[i].status = PDS_ERR_INTERNAL;
            copy_str(res[i].message, sizeof res[i].message, "pthread_create failed");
        }
    }
    for (int i = 0; i < n; i++)
        if (started[i]) pthread_join(th[i], NULL);
    pds_free(started);
    pds_free(jobs);
    pds_free(th);
}

pds_status_t pdt_generate_open(const char *router, const pdt_req_t *req, int n_tokens,
                               pds_rpc_channel_t **ch_out, pds_rpc_stream_t **st_out, int *got,
                               int timeout_ms)
{
    wire_req_t w;
    to_wire(req, &w);
    pds_rpc_channel_t *ch = NULL;
    pds_rpc_stream_t *st = NULL;
    *got = 0;
    pds_status_t s = pds_rpc_channel_create(router, &ch);
    if (s == PDS_OK)
        s = pds_rpc_stream_open(ch, "/pdserve.v1.Pdserve/Generate", &w.r.base,
                                &pdserve__v1__generate_response__descriptor, timeout_ms, &st);
    while (s == PDS_OK && *got < n_tokens) {
        ProtobufCMessage *m = NULL;
        s = pds_rpc_stream_next(st, &m);
        if (s != PDS_OK) break;
        if (!m) {
            s = PDS_ERR(PDS_ERR_INTERNAL, "stream ended after %d tokens", *got);
            break;
        }
        const Pdserve__V1__GenerateResponse *r = (const Pdserve__V1__GenerateResponse *)m;
        if (r->kind_case == PDSERVE__V1__GENERATE_RESPONSE__KIND_CHUNK && r->chunk)
            *got += (int)r->chunk->n_ids;
        pds_rpc_msg_free(m);
    }
    if (s != PDS_OK) {
        pds_rpc_stream_destroy(st);
        pds_rpc_channel_destroy(ch);
        return s;
    }
    *ch_out = ch;
    *st_out = st;
    return PDS_OK;
}

void pdt_generate_cancel(pds_rpc_channel_t *ch, pds_rpc_stream_t *st)
{
    if (st) pds_rpc_stream_cancel(st);
    pds_rpc_stream_destroy(st);
    pds_rpc_channel_destroy(ch);
}

pds_status_t pdt_call_raw(const char *router, const char *method, const void *bytes, size_t n,
                          char *message, size_t cap)
{
    pds_rpc_channel_t *ch = NULL;
    pds_status_t s = pds_rpc_channel_create(router, &ch);
    ProtobufCMessage *reply = NULL;
    if (s == PDS_OK)
        s = pds_rpc_channel_call_raw(ch, method, bytes, n,
                                     &pdserve__v1__generate_response__descriptor, 10000, &reply);
    if (s != PDS_OK) snprintf(message, cap, "%s", pds_err_detail());
    pds_rpc_msg_free(reply);
    pds_rpc_channel_destroy(ch);
    return s;
}

/* ---- reference --------------------------------------------------------------------------------
 */
struct pdt_ref {
    pds_engine_t *e;
    pds_model_config_t cfg;
};

pdt_ref_t *pdt_ref_create(const char *preset)
{
    pdt_ref_t *r = pds_calloc(1, sizeof *r);
    if (!r) return NULL;
    pds_engine_params_t p = pds_engine_default_params();
    p.backend = PDS_ENGINE_CPU;
    p.n_threads = 1;
    p.kv_tokens = 1024;
    if (pds_model_preset(preset, &r->cfg) != PDS_OK ||
        pds_engine_create_synth(&r->cfg, 1, &p, &r->e) != PDS_OK) {
        fprintf(stderr, "reference engine: %s\n", pds_err_detail());
        pds_free(r);
        return NULL;
    }
    return r;
}

void pdt_ref_destroy(pdt_ref_t *r)
{
    if (!r) return;
    pds_engine_destroy(r->e);
    pds_free(r);
}

int pdt_ref_vocab(const pdt_ref_t *r)
{
    return r->cfg.vocab;
}

int pdt_ref_context(const pdt_ref_t *r)
{
    return r->cfg.max_context;
}

pds_status_t pdt_ref_generate(pdt_ref_t *r, const pdt_req_t *req, uint64_t seed, int32_t *out,
                              int *n_out, int *finish, int *n_prompt)
{
    int32_t ids[PDT_MAX_PROMPT + 1];
    int n = 0;
    if (req->text) {
        PDS_TRY(pds_tok_encode(req->text, strlen(req->text), r->cfg.bos_id, ids,
                               (int)PDS_ARRAY_LEN(ids), &n));
    } else {
        memcpy(ids, req->prompt, sizeof(int32_t) * (size_t)req->n_prompt);
        n = req->n_prompt;
    }
    pds_gen_request_t g = {0};
    g.prompt = ids;
    g.n_prompt = n;
    g.max_new_tokens = (int)req->max_tokens;
    g.sample = pds_sample_default_params();
    g.sample.temperature = req->temperature;
    g.sample.top_k = req->top_k;
    g.sample.top_p = req->top_p > 0 ? req->top_p : 1.0f;
    g.sample.seed = req->has_seed ? req->seed : seed;
    g.stop = req->stop;
    g.n_stop = req->n_stop;
    g.ignore_eos = req->ignore_eos;
    pds_finish_reason_t why = PDS_FINISH_NONE;
    PDS_TRY(pds_engine_generate(r->e, &g, out, n_out, &why, NULL, NULL));
    int last = *n_out > 0 ? out[*n_out - 1] : -1;
    switch (why) {
    case PDS_FINISH_LENGTH:
        *finish = PDSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH;
        break;
    case PDS_FINISH_STOP:
        *finish = pds_sample_is_stop(last, req->stop, req->n_stop)
                      ? PDSERVE__V1__FINISH_REASON__FINISH_REASON_STOP
                      : PDSERVE__V1__FINISH_REASON__FINISH_REASON_EOS;
        break;
    case PDS_FINISH_CONTEXT:
        *finish = PDSERVE__V1__FINISH_REASON__FINISH_REASON_CONTEXT;
        break;
    default:
        *finish = PDSERVE__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
        break;
    }
    if (n_prompt) *n_prompt = n;
    return PDS_OK;
}

void pdt_diff_tokens(const int32_t *a, int na, const int32_t *b, int nb, char *buf, size_t cap)
{
    buf[0] = '\0';
    int i = 0;
    while (i < na && i < nb && a[i] == b[i]) i++;
    if (i == na && i == nb) return;
    snprintf(buf, cap, "lengths %d vs %d, first difference at index %d (%d vs %d)", na, nb, i,
             i < na ? a[i] : -1, i < nb ? b[i] : -1);
}

void pdt_fill_prompt(pdt_req_t *req, int n, uint64_t salt)
{
    req->text = NULL;
    req->n_prompt = n;
    for (int i = 0; i < n; i++) req->prompt[i] = (int32_t)(pds_mix64(salt * 1000003u + i) % 256);
}

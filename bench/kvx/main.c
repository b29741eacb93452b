/* pdserve-kvx-bench: how fast kvx moves a prompt's KV cache between two processes on this machine,
 * per UCX transport (tcp over lo, shared memory) and data path (active messages, RMA put), against
 * a floor measured in the same run: memcpy of the same bytes in one process.
 *
 * A forked child plays the decode node (registers a pool, expects each transfer into reserved
 * blocks, verifies); the parent plays the prefill node and sends layer by layer, back to back (no
 * compute between layers, so this is the transport's own rate). Shapes default to the `small`
 * preset: 8 layers, 4 KV heads, head_dim 64, block 16; fp32 (CPU engine) and bf16 (GPU) element
 * sizes; 1k and 4k-token prompts. Destination ids are either consecutive (one message per layer:
 * the common case, the pool hands out runs) or scattered (every other block: one message per
 * block, which shows the per-message cost). Time = send_open .. commit returned (includes DONE,
 * the receiver's verdict and, with --checksum, hashing on both sides). JSON to --out (default
 * stdout; UCX writes its own log lines to stdout too, so prefer --out).
 *
 * usage: pdserve-kvx-bench [--reps N] [--transports tcp,shm] [--paths am,put] [--tokens 1024,4096]
 *                          [--dtypes fp32,bf16] [--layers 8] [--kv-heads 4] [--head-dim 64]
 *                          [--block 16] [--checksum] [--out FILE]
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvx/kvx.h"

#define MAX_LIST 8

typedef struct {
    int reps, layers, kv_heads, head_dim, block;
    bool checksum;
    const char *out;
    int n_transports, n_paths, n_tokens, n_dtypes;
    const char *transports[MAX_LIST];
    const char *paths[MAX_LIST];
    int tokens[MAX_LIST];
    int dtypes[MAX_LIST]; /* element bytes */
} opts_t;

static int split(char *s, const char **out)
{
    int n = 0;
    for (char *tok = strtok(s, ","); tok && n < MAX_LIST; tok = strtok(NULL, ",")) out[n++] = tok;
    return n;
}

static bool parse(int argc, char **argv, opts_t *o)
{
    *o = (opts_t){.reps = 10, .layers = 8, .kv_heads = 4, .head_dim = 64, .block = 16};
    static char tr[] = "tcp,shm", pa[] = "am,put", tk[] = "1024,4096", dt[] = "fp32,bf16";
    char *t_arg = tr, *p_arg = pa, *k_arg = tk, *d_arg = dt;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--checksum")) {
            o->checksum = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "kvx-bench: %s needs a value\n", a);
            return false;
        }
        i++;
        if (!strcmp(a, "--reps"))
            o->reps = atoi(v);
        else if (!strcmp(a, "--layers"))
            o->layers = atoi(v);
        else if (!strcmp(a, "--kv-heads"))
            o->kv_heads = atoi(v);
        else if (!strcmp(a, "--head-dim"))
            o->head_dim = atoi(v);
        else if (!strcmp(a, "--block"))
            o->block = atoi(v);
        else if (!strcmp(a, "--transports"))
            t_arg = argv[i];
        else if (!strcmp(a, "--paths"))
            p_arg = argv[i];
        else if (!strcmp(a, "--tokens"))
            k_arg = argv[i];
        else if (!strcmp(a, "--dtypes"))
            d_arg = argv[i];
        else if (!strcmp(a, "--out"))
            o->out = v;
        else {
            fprintf(stderr, "kvx-bench: unknown option %s\n", a);
            return false;
        }
    }
    o->n_transports = split(t_arg, o->transports);
    o->n_paths = split(p_arg, o->paths);
    const char *tmp[MAX_LIST];
    o->n_tokens = split(k_arg, tmp);
    for (int i = 0; i < o->n_tokens; i++) o->tokens[i] = atoi(tmp[i]);
    o->n_dtypes = split(d_arg, tmp);
    for (int i = 0; i < o->n_dtypes; i++) {
        if (!strcmp(tmp[i], "fp32"))
            o->dtypes[i] = 4;
        else if (!strcmp(tmp[i], "bf16"))
            o->dtypes[i] = 2;
        else {
            fprintf(stderr, "kvx-bench: dtype %s (want fp32 or bf16)\n", tmp[i]);
            return false;
        }
    }
    for (int i = 0; i < o->n_tokens; i++)
        if (o->tokens[i] <= 0) return false;
    return o->reps > 0 && o->layers > 0 && o->kv_heads > 0 && o->head_dim > 0 && o->block > 0;
}

static bool set_transport(const char *t)
{
    if (!strcmp(t, "tcp")) {
        setenv("UCX_TLS", "tcp", 1);
        setenv("UCX_NET_DEVICES", "lo", 1);
    } else if (!strcmp(t, "shm")) {
        setenv("UCX_TLS", "posix,cma", 1);
        unsetenv("UCX_NET_DEVICES");
    } else {
        fprintf(stderr, "kvx-bench: transport %s (want tcp or shm)\n", t);
        return false;
    }
    return true;
}

/* ---- pipes ------------------------------------------------------------------------------------
 */
static bool wr(int fd, const void *p, size_t n)
{
    const char *b = p;
    while (n) {
        ssize_t k = write(fd, b, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        b += k;
        n -= (size_t)k;
    }
    return true;
}

static bool rd(int fd, void *p, size_t n)
{
    char *b = p;
    while (n) {
        ssize_t k = read(fd, b, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        b += k;
        n -= (size_t)k;
    }
    return true;
}

typedef struct {
    uint64_t id;
    int32_t n_blocks, stride; /* n_blocks 0: quit */
} cmd_t;

static pds_kv_layout_t layout_of(const opts_t *o, int elem, int n_blocks)
{
    return (pds_kv_layout_t){.n_layers = o->layers,
                             .n_blocks = n_blocks,
                             .block_size = o->block,
                             .n_kv_heads = o->kv_heads,
                             .head_dim = o->head_dim,
                             .elem_size = elem};
}

static uint8_t *pool_alloc(const pds_kv_layout_t *l, void **layer)
{
    size_t lb = (size_t)pds_kv_layer_bytes(l);
    uint8_t *m = NULL;
    if (posix_memalign((void **)&m, 4096, lb * (size_t)l->n_layers) != 0) return NULL;
    for (size_t i = 0; i < lb * (size_t)l->n_layers; i += 8) {
        uint64_t v = pds_mix64(i);
        memcpy(m + i, &v, 8);
    }
    for (int i = 0; i < l->n_layers; i++) layer[i] = m + (size_t)i * lb;
    return m;
}

/* The decode node: registers a pool, then serves expect commands until told to quit. */
_Noreturn static void child_main(const opts_t *o, int elem, int max_blocks, int rfd, int wfd)
{
    pds_kvx_params_t prm = pds_kvx_default_params();
    prm.checksum = o->checksum;
    pds_kvx_t *x = NULL;
    pds_kv_layout_t lay = layout_of(o, elem, max_blocks);
    void *layer[64];
    uint8_t *mem = o->layers <= 64 ? pool_alloc(&lay, layer) : NULL;
    const void *addr, *pool;
    size_t addr_len, pool_len;
    if (!mem || pds_kvx_create(&prm, &x) != PDS_OK ||
        pds_kvx_register_pool(x, &lay, layer, PDS_KVX_MEM_HOST, &pool, &pool_len) != PDS_OK ||
        pds_kvx_address(x, &addr, &addr_len) != PDS_OK) {
        fprintf(stderr, "kvx-bench child: setup failed: %s\n", pds_err_detail());
        _exit(1);
    }
    uint32_t a = (uint32_t)addr_len, p = (uint32_t)pool_len;
    wr(wfd, &a, 4);
    wr(wfd, addr, addr_len);
    wr(wfd, &p, 4);
    wr(wfd, pool, pool_len);
    int32_t *ids = malloc((size_t)max_blocks * sizeof *ids);
    cmd_t c;
    while (rd(rfd, &c, sizeof c) && c.n_blocks > 0) {
        for (int i = 0; i < c.n_blocks; i++) ids[i] = i * c.stride;
        pds_kvx_recv_t *r = NULL;
        int32_t st = pds_kvx_expect(x, c.id, c.n_blocks, ids, 30000, NULL, NULL, &r);
        wr(wfd, &st, 4); /* ready (or not) */
        if (st == PDS_OK) {
            st = pds_kvx_recv_wait(r, 31000);
            wr(wfd, &st, 4);
        }
        pds_kvx_recv_close(r);
    }
    pds_kvx_destroy(x);
    free(ids);
    free(mem);
    _exit(0);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* memcpy of the same bytes in one process: per layer one range (consecutive) or one block per
 * copy (scattered), into a separate pool. Median seconds over reps. */
static double memcpy_floor(const opts_t *o, const pds_kv_layout_t *l, void **src, void **dst, int n,
                           int stride)
{
    int64_t bb = pds_kv_block_bytes(l);
    double t[64];
    int reps = PDS_MIN(o->reps, 64);
    for (int r = -1; r < reps; r++) {
        int64_t t0 = pds_time_now_ns();
        for (int layer = 0; layer < l->n_layers; layer++) {
            if (stride == 1) {
                memcpy(dst[layer], src[layer], (size_t)(n * bb));
            } else {
                for (int i = 0; i < n; i++)
                    memcpy((uint8_t *)dst[layer] + (int64_t)i * stride * bb,
                           (uint8_t *)src[layer] + (int64_t)i * bb, (size_t)bb);
            }
        }
        if (r >= 0) t[r] = (double)(pds_time_now_ns() - t0) / 1e9;
    }
    qsort(t, (size_t)reps, sizeof *t, cmp_d);
    return t[reps / 2];
}

static int run_group(const opts_t *o, const char *transport, const char *path, int elem, FILE *out,
                     bool *first)
{
    int max_tokens = 0;
    for (int i = 0; i < o->n_tokens; i++) max_tokens = PDS_MAX(max_tokens, o->tokens[i]);
    int max_seq = PDS_DIV_UP(max_tokens, o->block);
    int max_blocks = 2 * max_seq; /* room for the scattered pattern */
    if (!set_transport(transport)) return 1;
    int p2c[2], c2p[2];
    if (pipe(p2c) || pipe(c2p)) return 1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(p2c[1]);
        close(c2p[0]);
        child_main(o, elem, max_blocks, p2c[0], c2p[1]);
    }
    close(p2c[0]);
    close(c2p[1]);
    int rfd = c2p[0], wfd = p2c[1];
    uint32_t al = 0, pl = 0;
    void *addr = NULL, *pool = NULL;
    int rc = 1;
    if (!rd(rfd, &al, 4) || !(addr = malloc(al)) || !rd(rfd, addr, al) || !rd(rfd, &pl, 4) ||
        !(pool = malloc(pl)) || !rd(rfd, pool, pl)) {
        fprintf(stderr, "kvx-bench: receiver did not start (%s)\n", transport);
        goto out_child;
    }
    pds_kvx_params_t prm = pds_kvx_default_params();
    prm.path = !strcmp(path, "put") ? PDS_KVX_PATH_PUT : PDS_KVX_PATH_AM;
    prm.checksum = o->checksum;
    pds_kvx_t *x = NULL;
    if (pds_kvx_create(&prm, &x) != PDS_OK) {
        fprintf(stderr, "kvx-bench: %s\n", pds_err_detail());
        goto out_child;
    }
    pds_kv_layout_t src_lay = layout_of(o, elem, max_blocks);
    void *src[64], *dst[64];
    uint8_t *src_mem = pool_alloc(&src_lay, src), *dst_mem = pool_alloc(&src_lay, dst);
    int32_t *src_ids = malloc((size_t)max_blocks * sizeof *src_ids);
    int32_t *dst_ids = malloc((size_t)max_blocks * sizeof *dst_ids);
    double *times = malloc((size_t)o->reps * sizeof *times);
    static uint64_t next_id = 1;
    rc = 0;
    for (int ti = 0; ti < o->n_tokens && rc == 0; ti++)
        for (int stride = 1; stride <= 2 && rc == 0; stride++) {
            int n = PDS_DIV_UP(o->tokens[ti], o->block);
            for (int i = 0; i < n; i++) {
                src_ids[i] = i;
                dst_ids[i] = i * stride;
            }
            pds_kvx_stats_t s0, s1;
            pds_kvx_stats(x, &s0);
            for (int r = -1; r < o->reps && rc == 0; r++) { /* r = -1: warm-up */
                cmd_t c = {next_id++, n, stride};
                int32_t st = -1;
                if (!wr(wfd, &c, sizeof c) || !rd(rfd, &st, 4) || st != PDS_OK) {
                    fprintf(stderr, "kvx-bench: receiver not ready: %s\n",
                            pds_status_name((pds_status_t)st));
                    rc = 1;
                    break;
                }
                int64_t t0 = pds_time_now_ns();
                pds_kvx_send_t *t = NULL;
                pds_status_t s =
                    pds_kvx_send_open(x, addr, al, pool, pl, &src_lay, c.id, n, dst_ids, &t);
                for (int l = 0; l < o->layers && s == PDS_OK; l++)
                    s = pds_kvx_send_layer(t, l, src[l], src_ids);
                if (s == PDS_OK) s = pds_kvx_send_commit(t, 30000);
                int64_t t1 = pds_time_now_ns();
                pds_kvx_send_close(t);
                if (s != PDS_OK || !rd(rfd, &st, 4) || st != PDS_OK) {
                    fprintf(stderr, "kvx-bench: transfer failed: %s (%s), receiver %s\n",
                            pds_status_name(s), pds_err_detail(),
                            pds_status_name((pds_status_t)st));
                    rc = 1;
                    break;
                }
                if (r == -1) pds_kvx_stats(x, &s0);
                if (r >= 0) times[r] = (double)(t1 - t0) / 1e9;
            }
            if (rc) break;
            pds_kvx_stats(x, &s1);
            qsort(times, (size_t)o->reps, sizeof *times, cmp_d);
            double med = times[o->reps / 2], best = times[0];
            int64_t bytes = (int64_t)o->layers * n * pds_kv_block_bytes(&src_lay);
            double floor_s = memcpy_floor(o, &src_lay, src, dst, n, stride);
            fprintf(out,
                    "%s    {\"transport\": \"%s\", \"path\": \"%s\", \"dtype\": \"%s\", "
                    "\"tokens\": %d, \"dst_ids\": \"%s\", \"checksum\": %s, \"bytes\": %lld, "
                    "\"msgs_per_transfer\": %lld, \"reps\": %d, \"time_ms_median\": %.3f, "
                    "\"time_ms_min\": %.3f, \"gbps_median\": %.3f, \"memcpy_gbps\": %.3f, "
                    "\"fraction_of_memcpy\": %.3f}",
                    *first ? "" : ",\n", transport, path, elem == 4 ? "fp32" : "bf16",
                    o->tokens[ti], stride == 1 ? "consecutive" : "scattered",
                    o->checksum ? "true" : "false", (long long)bytes,
                    (long long)((s1.msgs_sent - s0.msgs_sent) / o->reps), o->reps, med * 1e3,
                    best * 1e3, (double)bytes / med / 1e9, (double)bytes / floor_s / 1e9,
                    floor_s / med);
            fflush(out);
            *first = false;
        }
    free(times);
    free(src_ids);
    free(dst_ids);
    free(src_mem);
    free(dst_mem);
    pds_kvx_destroy(x);
out_child:;
    cmd_t quit = {0, 0, 0};
    wr(wfd, &quit, sizeof quit);
    close(wfd);
    close(rfd);
    waitpid(pid, NULL, 0);
    free(addr);
    free(pool);
    return rc;
}

int main(int argc, char **argv)
{
    opts_t o;
    if (!parse(argc, argv, &o)) {
        fprintf(stderr, "usage: pdserve-kvx-bench [--reps N] [--transports tcp,shm] "
                        "[--paths am,put] [--tokens 1024,4096] [--dtypes fp32,bf16] "
                        "[--layers 8] [--kv-heads 4] [--head-dim 64] [--block 16] "
                        "[--checksum] [--out FILE]\n");
        return 2;
    }
    if (o.layers > 64) {
        fprintf(stderr, "kvx-bench: at most 64 layers\n");
        return 2;
    }
    pds_log_set_level(PDS_LOG_ERROR);
    struct utsname u;
    uname(&u);
    char cpu[128] = "unknown";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "model name", 10)) {
                char *c = strchr(line, ':');
                if (c) snprintf(cpu, sizeof cpu, "%s", c + 2);
                cpu[strcspn(cpu, "\n")] = 0;
                break;
            }
        fclose(f);
    }
    double load = -1;
    f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &load) != 1) load = -1;
        fclose(f);
    }
    char ucp_version[64];
    pds_kvx_transport_version(ucp_version, sizeof ucp_version);
    FILE *out = o.out ? fopen(o.out, "w") : stdout;
    if (!out) {
        fprintf(stderr, "kvx-bench: cannot write %s\n", o.out);
        return 2;
    }
    fprintf(out,
            "{\n  \"bench\": \"kvx\",\n  \"machine\": {\"cpu\": \"%s\", \"online_cpus\": %ld, "
            "\"kernel\": \"%s %s\", \"loadavg_1m_at_start\": %.2f, \"ucx\": \"%s\"},\n",
            cpu, sysconf(_SC_NPROCESSORS_ONLN), u.sysname, u.release, load, ucp_version);
    fprintf(out,
            "  \"shape\": {\"layers\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"block\": %d},\n",
            o.layers, o.kv_heads, o.head_dim, o.block);
    fprintf(out,
            "  \"time\": \"send_open .. commit returned (DONE + receiver verdict included)\",\n");
    fprintf(out, "  \"results\": [\n");
    bool first = true;
    int rc = 0;
    for (int t = 0; t < o.n_transports && !rc; t++)
        for (int p = 0; p < o.n_paths && !rc; p++)
            for (int d = 0; d < o.n_dtypes && !rc; d++)
                rc = run_group(&o, o.transports[t], o.paths[p], o.dtypes[d], out, &first);
    fprintf(out, "\n  ]\n}\n");
    if (out != stdout) fclose(out);
    return rc;
}

/* Tests of common/kvx: KV transfer between two processes over UCX (tcp on lo, shared memory), with
 * both data paths (AM rendezvous, RMA put), integrity (checksum mismatch -> PDS_ERR_CORRUPT), a
 * receiver killed mid-transfer, expect() timing out, the loopback backend against the same
 * expectations, bad input, and allocation-failure sweeps that must leak nothing.
 *
 * Geometry: 4 layers of blocks (2, 16 tokens, 2 heads, 32 dims) fp32 = 8 KiB per block. A 12-block
 * sequence sits at source ids {0,1,2,3,10..17} and goes to destination ids {3,4,5,9,20..27} of a
 * 40-block pool: three runs per layer (3, 1 and 8 blocks; the last is 64 KiB, rendezvous size).
 * The receiver pool starts filled with its own pattern, so untouched blocks are checked too.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <sys/prctl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvx/kvx_internal.h" /* white-box: the NCCL wire formats */

#define NL        4
#define RX_BLOCKS 40
#define TX_BLOCKS 24
#define NSEQ      12

static const int32_t SRC[NSEQ] = {0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17};
static const int32_t DST[NSEQ] = {3, 4, 5, 9, 20, 21, 22, 23, 24, 25, 26, 27};
#define RUNS_PER_LAYER 3
#define TX_SEED        0x1234
#define RX_SEED        0xabcd

static pds_kv_layout_t layout_of(int n_blocks)
{
    return (pds_kv_layout_t){.n_layers = NL,
                             .n_blocks = n_blocks,
                             .block_size = 16,
                             .n_kv_heads = 2,
                             .head_dim = 32,
                             .elem_size = 4};
}

typedef struct {
    pds_kv_layout_t lay;
    size_t layer_bytes, bytes;
    uint8_t *mem; /* (NL, n_blocks, 2, 16, 2, 32) fp32 as bytes */
    void *layer[NL];
} pool_t;

static void pool_init(pool_t *p, int n_blocks, uint64_t seed)
{
    p->lay = layout_of(n_blocks);
    p->layer_bytes = (size_t)pds_kv_layer_bytes(&p->lay);
    p->bytes = p->layer_bytes * NL;
    p->mem = malloc(p->bytes);
    cr_assert_not_null(p->mem);
    for (size_t i = 0; i < p->bytes / 8; i++) {
        uint64_t v = pds_mix64(seed * 0x100000001ULL + i);
        memcpy(p->mem + 8 * i, &v, 8);
    }
    for (int l = 0; l < NL; l++) p->layer[l] = p->mem + l * p->layer_bytes;
}

static void pool_fini(pool_t *p)
{
    free(p->mem);
}

/* The receiver pool after a correct transfer of the test sequence. */
static uint8_t *expected_rx(void)
{
    pool_t rx, tx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    pool_init(&tx, TX_BLOCKS, TX_SEED);
    int64_t bb = pds_kv_block_bytes(&rx.lay);
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NSEQ; i++)
            memcpy((uint8_t *)rx.layer[l] + DST[i] * bb, (uint8_t *)tx.layer[l] + SRC[i] * bb,
                   (size_t)bb);
    pool_fini(&tx);
    return rx.mem;
}

static void set_tls(const char *tls)
{
    setenv("UCX_TLS", tls, 1);
    if (strstr(tls, "tcp"))
        setenv("UCX_NET_DEVICES", "lo", 1);
    else
        unsetenv("UCX_NET_DEVICES");
}

/* ---- pipe helpers ---------------------------------------------------------------------------- */
static bool write_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t k = write(fd, b, n);
        if (k <= 0) return false;
        b += k;
        n -= (size_t)k;
    }
    return true;
}

static bool read_all(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        ssize_t k = read(fd, b, n);
        if (k <= 0) return false;
        b += k;
        n -= (size_t)k;
    }
    return true;
}

static bool write_blob(int fd, const void *p, size_t n)
{
    uint32_t len = (uint32_t)n;
    return write_all(fd, &len, 4) && write_all(fd, p, n);
}

static void *read_blob(int fd, size_t *n)
{
    uint32_t len;
    if (!read_all(fd, &len, 4)) return NULL;
    void *p = malloc(len ? len : 1);
    if (!read_all(fd, p, len)) {
        free(p);
        return NULL;
    }
    *n = len;
    return p;
}

/* ---- the receiving child ------------------------------------------------------------------------
 */
typedef struct {
    bool corrupt; /* flip a byte of (layer 2, block index 5) before verification */
    bool linger;  /* after sending the blobs, just wait to be killed */
    int64_t timeout_ms;
} child_cfg_t;

#define TID 0x5eed0001ULL

_Noreturn static void child_main(int rfd, int wfd, child_cfg_t cfg)
{
    pds_kvx_t *x = NULL;
    pds_kvx_params_t prm = pds_kvx_default_params();
    int32_t st = pds_kvx_create(&prm, &x);
    pool_t rx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    const void *addr = NULL, *pool = NULL;
    size_t addr_len = 0, pool_len = 0;
    pds_kvx_recv_t *r = NULL;
    if (st == PDS_OK)
        st = pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pool, &pool_len);
    if (st == PDS_OK) st = pds_kvx_address(x, &addr, &addr_len);
    if (st == PDS_OK && cfg.corrupt) pds_kvx_test_corrupt_next(x, 2, 5, 100);
    if (st == PDS_OK) st = pds_kvx_expect(x, TID, NSEQ, DST, cfg.timeout_ms, NULL, NULL, &r);
    if (st != PDS_OK) {
        write_blob(wfd, "", 0);
        write_all(wfd, &st, 4);
        _exit(1);
    }
    write_blob(wfd, addr, addr_len);
    write_blob(wfd, pool, pool_len);
    if (cfg.linger) {
        for (;;) pause();
    }
    st = pds_kvx_recv_wait(r, cfg.timeout_ms + 1000);
    write_all(wfd, &st, 4);
    write_all(wfd, rx.mem, rx.bytes);
    char bye;
    (void)read_all(rfd, &bye, 1); /* stay alive until the sender has its verdict */
    pds_kvx_recv_close(r);
    pds_kvx_destroy(x);
    _exit(0);
}

typedef struct {
    pid_t pid;
    int rfd, wfd; /* parent's ends */
    void *addr, *pool;
    size_t addr_len, pool_len;
} child_t;

static void child_start(child_t *c, child_cfg_t cfg)
{
    int p2c[2], c2p[2];
    cr_assert_eq(pipe(p2c), 0);
    cr_assert_eq(pipe(c2p), 0);
    fflush(NULL);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a failed test */
        if (getppid() == 1) _exit(1);
        close(p2c[1]);
        close(c2p[0]);
        child_main(p2c[0], c2p[1], cfg);
    }
    close(p2c[0]);
    close(c2p[1]);
    c->pid = pid;
    c->rfd = c2p[0];
    c->wfd = p2c[1];
    c->addr = read_blob(c->rfd, &c->addr_len);
    cr_assert_not_null(c->addr, "child died before sending its address");
    if (c->addr_len == 0) {
        int32_t st = 0;
        read_all(c->rfd, &st, 4);
        cr_assert_fail("child setup failed: %s", pds_status_name(st));
    }
    c->pool = read_blob(c->rfd, &c->pool_len);
    cr_assert_not_null(c->pool);
}

static void child_finish(child_t *c)
{
    char bye = 1;
    (void)write_all(c->wfd, &bye, 1);
    close(c->wfd);
    close(c->rfd);
    int ws = 0;
    waitpid(c->pid, &ws, 0);
    free(c->addr);
    free(c->pool);
}

/* Sends the test sequence from this process to the child; returns commit's status. */
static pds_status_t send_sequence(pds_kvx_t *x, const child_t *c, pds_kvx_stats_t *stats)
{
    pool_t tx;
    pool_init(&tx, TX_BLOCKS, TX_SEED);
    pds_kvx_send_t *t = NULL;
    pds_status_t s = pds_kvx_send_open(x, c->addr, c->addr_len, c->pool, c->pool_len, &tx.lay, TID,
                                       NSEQ, DST, &t);
    cr_assert_eq(s, PDS_OK, "open: %s %s", pds_status_name(s), pds_err_detail());
    for (int l = 0; l < NL; l++) {
        s = pds_kvx_send_layer(t, l, tx.layer[l], SRC);
        cr_assert_eq(s, PDS_OK, "send_layer %d: %s %s", l, pds_status_name(s), pds_err_detail());
    }
    s = pds_kvx_send_commit(t, 10000);
    pds_kvx_send_close(t);
    if (stats) pds_kvx_stats(x, stats);
    pool_fini(&tx);
    return s;
}

static void two_process_transfer(const char *tls, pds_kvx_path_t path)
{
    set_tls(tls);
    child_t c;
    child_start(&c, (child_cfg_t){.timeout_ms = 10000});
    pds_kvx_params_t prm = pds_kvx_default_params();
    prm.path = path;
    pds_kvx_t *x = NULL;
    cr_assert_eq(pds_kvx_create(&prm, &x), PDS_OK, "%s", pds_err_detail());
    pds_kvx_stats_t st;
    pds_status_t s = send_sequence(x, &c, &st);
    cr_expect_eq(s, PDS_OK, "commit over %s/%s: %s %s", tls, pds_kvx_path_name(path),
                 pds_status_name(s), pds_err_detail());

    int32_t rs = 0;
    cr_assert(read_all(c.rfd, &rs, 4));
    cr_expect_eq(rs, PDS_OK, "receiver: %s", pds_status_name(rs));
    uint8_t *want = expected_rx();
    pool_t got;
    pool_init(&got, RX_BLOCKS, 0);
    cr_assert(read_all(c.rfd, got.mem, got.bytes));
    /* Exact bytes everywhere: reserved blocks hold the sender's blocks, the rest is untouched. */
    int64_t bb = pds_kv_block_bytes(&got.lay);
    for (int l = 0; l < NL; l++)
        for (int b = 0; b < RX_BLOCKS; b++)
            cr_expect(memcmp((uint8_t *)got.layer[l] + b * bb, want + l * got.layer_bytes + b * bb,
                             (size_t)bb) == 0,
                      "layer %d block %d differs", l, b);
    cr_expect_eq(st.bytes_sent, (int64_t)NL * NSEQ * bb);
    cr_expect_eq(st.msgs_sent, NL * RUNS_PER_LAYER, "runs merged: %lld messages",
                 (long long)st.msgs_sent);
    cr_expect_eq(st.transfers_sent, 1);
    free(want);
    pool_fini(&got);
    child_finish(&c);
    pds_kvx_destroy(x);
}

Test(kvx, transfers_into_reserved_blocks_over_tcp_with_active_messages, .timeout = 30)
{
    two_process_transfer("tcp", PDS_KVX_PATH_AM);
}

Test(kvx, transfers_into_reserved_blocks_over_tcp_with_put, .timeout = 30)
{
    two_process_transfer("tcp", PDS_KVX_PATH_PUT);
}

Test(kvx, transfers_into_reserved_blocks_over_shared_memory_with_active_messages, .timeout = 30)
{
    two_process_transfer("posix,cma", PDS_KVX_PATH_AM);
}

Test(kvx, transfers_into_reserved_blocks_over_shared_memory_with_put, .timeout = 30)
{
    two_process_transfer("posix,cma", PDS_KVX_PATH_PUT);
}

Test(kvx, corrupted_block_is_reported_to_both_sides, .timeout = 30)
{
    set_tls("tcp");
    child_t c;
    child_start(&c, (child_cfg_t){.corrupt = true, .timeout_ms = 10000});
    pds_kvx_t *x = NULL;
    cr_assert_eq(pds_kvx_create(NULL, &x), PDS_OK);
    pds_status_t s = send_sequence(x, &c, NULL);
    cr_expect_eq(s, PDS_ERR_CORRUPT, "sender got %s", pds_status_name(s));
    int32_t rs = 0;
    cr_assert(read_all(c.rfd, &rs, 4));
    cr_expect_eq(rs, PDS_ERR_CORRUPT, "receiver got %s", pds_status_name(rs));
    child_finish(&c);
    pds_kvx_destroy(x);
}

static void receiver_killed(const char *tls)
{
    set_tls(tls);
    child_t c;
    child_start(&c, (child_cfg_t){.linger = true, .timeout_ms = 60000});
    pds_kvx_t *x = NULL;
    cr_assert_eq(pds_kvx_create(NULL, &x), PDS_OK);
    pool_t tx;
    pool_init(&tx, TX_BLOCKS, TX_SEED);
    pds_kvx_send_t *t = NULL;
    cr_assert_eq(
        pds_kvx_send_open(x, c.addr, c.addr_len, c.pool, c.pool_len, &tx.lay, TID, NSEQ, DST, &t),
        PDS_OK);
    pds_status_t s = pds_kvx_send_layer(t, 0, tx.layer[0], SRC);
    cr_expect(s == PDS_OK, "first layer: %s", pds_status_name(s));
    kill(c.pid, SIGKILL);
    waitpid(c.pid, NULL, 0);
    for (int l = 1; l < NL; l++) {
        s = pds_kvx_send_layer(t, l, tx.layer[l], SRC);
        cr_expect(s == PDS_OK || s == PDS_ERR_UNAVAILABLE, "layer %d: %s", l, pds_status_name(s));
    }
    s = pds_kvx_send_commit(t, 2000);
    cr_expect(s == PDS_ERR_UNAVAILABLE || s == PDS_ERR_TIMEOUT, "commit to a dead peer: %s (%s)",
              pds_status_name(s), pds_err_detail());
    pds_kvx_send_close(t);
    pds_kvx_stats_t st;
    pds_kvx_stats(x, &st);
    cr_expect_eq(st.transfers_failed, 1);
    pds_kvx_destroy(x);
    pool_fini(&tx);
    close(c.rfd);
    close(c.wfd);
    free(c.addr);
    free(c.pool);
}

Test(kvx, sender_gets_an_error_when_the_receiver_is_killed_over_tcp, .timeout = 30)
{
    receiver_killed("tcp");
}

Test(kvx, sender_gets_an_error_when_the_receiver_is_killed_over_shared_memory, .timeout = 30)
{
    receiver_killed("posix,cma");
}

/* ---- in-process -------------------------------------------------------------------------------
 */
static atomic_int notified;
static atomic_int notified_status;
static void on_notify(void *ctx, uint64_t id, pds_status_t s)
{
    cr_expect_eq(id, (uint64_t)(uintptr_t)ctx);
    atomic_store(&notified_status, s);
    atomic_fetch_add(&notified, 1);
}

static void expect_times_out(pds_kvx_params_t prm)
{
    atomic_store(&notified, 0);
    pds_kvx_t *x = NULL;
    cr_assert_eq(pds_kvx_create(&prm, &x), PDS_OK, "%s", pds_err_detail());
    pool_t rx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    const void *pb;
    size_t pl;
    cr_assert_eq(pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pb, &pl), PDS_OK);
    pds_kvx_recv_t *r = NULL;
    cr_assert_eq(pds_kvx_expect(x, 77, NSEQ, DST, 150, on_notify, (void *)(uintptr_t)77, &r),
                 PDS_OK);
    cr_expect_eq(pds_kvx_recv_poll(r), PDS_IN_PROGRESS);
    pds_status_t s = pds_kvx_recv_wait(r, 20000);
    cr_expect_eq(s, PDS_ERR_TIMEOUT, "got %s", pds_status_name(s));
    cr_expect(strstr(pds_err_detail(), "deadline") != NULL, "detail: %s", pds_err_detail());
    /* The notification may come from the progress thread; give it a moment, bounded. */
    for (int i = 0; i < 200 && atomic_load(&notified) == 0; i++) pds_time_sleep_ms(5);
    cr_expect_eq(atomic_load(&notified), 1);
    cr_expect_eq(atomic_load(&notified_status), PDS_ERR_TIMEOUT);
    pds_kvx_recv_close(r);
    pds_kvx_stats_t st;
    pds_kvx_stats(x, &st);
    cr_expect_eq(st.recv_failed, 1);
    pds_kvx_destroy(x);
    pool_fini(&rx);
}

Test(kvx, expect_times_out_without_a_sender_on_ucx, .timeout = 30)
{
    set_tls("tcp");
    expect_times_out(pds_kvx_default_params());
}

Test(kvx, expect_times_out_without_a_sender_on_loopback)
{
    pds_kvx_hub_t *h = NULL;
    cr_assert_eq(pds_kvx_hub_create(&h), PDS_OK);
    pds_kvx_params_t prm = pds_kvx_default_params();
    prm.backend = PDS_KVX_LOOPBACK;
    prm.hub = h;
    expect_times_out(prm);
    pds_kvx_hub_destroy(h);
}

/* One in-process transfer between two kvx objects of the same backend; returns the receiver's
 * pool (malloc'ed) and both statuses. corrupt / abort exercise the failure paths. */
typedef struct {
    pds_status_t commit, recv;
    uint8_t *rx_mem;
    pds_kvx_stats_t tx_stats, rx_stats;
} local_result_t;

static local_result_t local_transfer(pds_kvx_params_t prm, bool corrupt, bool abort_early)
{
    local_result_t res = {0};
    pds_kvx_t *rxk = NULL, *txk = NULL;
    cr_assert_eq(pds_kvx_create(&prm, &rxk), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_create(&prm, &txk), PDS_OK, "%s", pds_err_detail());
    pool_t rx, tx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    pool_init(&tx, TX_BLOCKS, TX_SEED);
    const void *pb, *ab;
    size_t pl, al;
    cr_assert_eq(pds_kvx_register_pool(rxk, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pb, &pl), PDS_OK);
    cr_assert_eq(pds_kvx_address(rxk, &ab, &al), PDS_OK);
    if (corrupt) pds_kvx_test_corrupt_next(rxk, 1, 0, 7);
    pds_kvx_recv_t *r = NULL;
    cr_assert_eq(pds_kvx_expect(rxk, 9, NSEQ, DST, 10000, NULL, NULL, &r), PDS_OK);
    pds_kvx_send_t *t = NULL;
    cr_assert_eq(pds_kvx_send_open(txk, ab, al, pb, pl, &tx.lay, 9, NSEQ, DST, &t), PDS_OK, "%s",
                 pds_err_detail());
    for (int l = 0; l < NL; l++) {
        cr_assert_eq(pds_kvx_send_layer(t, l, tx.layer[l], SRC), PDS_OK, "%s", pds_err_detail());
        if (abort_early) break;
    }
    res.commit = abort_early ? PDS_ERR_CANCELLED : pds_kvx_send_commit(t, 10000);
    pds_kvx_send_close(t);
    res.recv = pds_kvx_recv_wait(r, 10000);
    pds_kvx_recv_close(r);
    pds_kvx_stats(txk, &res.tx_stats);
    pds_kvx_stats(rxk, &res.rx_stats);
    pds_kvx_destroy(txk);
    pds_kvx_destroy(rxk);
    pool_fini(&tx);
    res.rx_mem = rx.mem;
    return res;
}

Test(kvx, loopback_and_ucx_deliver_the_same_bytes, .timeout = 30)
{
    pds_kvx_hub_t *h = NULL;
    cr_assert_eq(pds_kvx_hub_create(&h), PDS_OK);
    pds_kvx_params_t lp = pds_kvx_default_params();
    lp.backend = PDS_KVX_LOOPBACK;
    lp.hub = h;
    local_result_t a = local_transfer(lp, false, false);
    set_tls("tcp");
    local_result_t b = local_transfer(pds_kvx_default_params(), false, false);
    uint8_t *want = expected_rx();
    size_t bytes = (size_t)pds_kv_layer_bytes(&(pds_kv_layout_t){NL, RX_BLOCKS, 16, 2, 32, 4}) * NL;
    cr_expect_eq(a.commit, PDS_OK);
    cr_expect_eq(a.recv, PDS_OK);
    cr_expect_eq(b.commit, PDS_OK, "%s", pds_err_detail());
    cr_expect_eq(b.recv, PDS_OK);
    cr_expect(memcmp(a.rx_mem, want, bytes) == 0, "loopback result differs from expected");
    cr_expect(memcmp(b.rx_mem, want, bytes) == 0, "ucx result differs from expected");
    cr_expect_eq(a.tx_stats.msgs_sent, b.tx_stats.msgs_sent);
    cr_expect_eq(a.tx_stats.bytes_sent, b.tx_stats.bytes_sent);
    cr_expect_eq(a.rx_stats.bytes_received, a.tx_stats.bytes_sent);
    cr_expect_eq(b.rx_stats.bytes_received, b.tx_stats.bytes_sent);
    free(want);
    free(a.rx_mem);
    free(b.rx_mem);
    pds_kvx_hub_destroy(h);
}

Test(kvx, loopback_reports_corruption_and_sender_abort)
{
    pds_kvx_hub_t *h = NULL;
    cr_assert_eq(pds_kvx_hub_create(&h), PDS_OK);
    pds_kvx_params_t lp = pds_kvx_default_params();
    lp.backend = PDS_KVX_LOOPBACK;
    lp.hub = h;
    local_result_t c = local_transfer(lp, true, false);
    cr_expect_eq(c.commit, PDS_ERR_CORRUPT);
    cr_expect_eq(c.recv, PDS_ERR_CORRUPT);
    local_result_t d = local_transfer(lp, false, true);
    cr_expect_eq(d.recv, PDS_ERR_CANCELLED, "got %s", pds_status_name(d.recv));
    /* With checksums off the same flipped byte goes unnoticed: the checksum is what caught it. */
    lp.checksum = false;
    local_result_t e = local_transfer(lp, true, false);
    cr_expect_eq(e.commit, PDS_OK);
    free(c.rx_mem);
    free(d.rx_mem);
    free(e.rx_mem);
    pds_kvx_hub_destroy(h);
}

Test(kvx, ucx_sender_abort_cancels_the_receiver, .timeout = 30)
{
    set_tls("tcp");
    local_result_t d = local_transfer(pds_kvx_default_params(), false, true);
    cr_expect_eq(d.recv, PDS_ERR_CANCELLED, "got %s", pds_status_name(d.recv));
    free(d.rx_mem);
}

Test(kvx, checksum_sees_every_byte_and_the_length)
{
    uint8_t buf[203];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)(i * 7 + 1);
    uint64_t h = pds_kvx_checksum(buf, sizeof buf);
    cr_expect_eq(h, pds_kvx_checksum(buf, sizeof buf));
    for (size_t i = 0; i < sizeof buf; i++) {
        buf[i] ^= 0x10;
        cr_expect_neq(pds_kvx_checksum(buf, sizeof buf), h, "flip at byte %zu unnoticed", i);
        buf[i] ^= 0x10;
    }
    cr_expect_neq(pds_kvx_checksum(buf, sizeof buf - 1), h);
    uint8_t zeros[64] = {0};
    cr_expect_neq(pds_kvx_checksum(zeros, 32), pds_kvx_checksum(zeros, 64));
}

Test(kvx, bad_input_gets_a_status_not_a_crash)
{
    pds_kvx_hub_t *h = NULL;
    cr_assert_eq(pds_kvx_hub_create(&h), PDS_OK);
    pds_kvx_params_t lp = pds_kvx_default_params();
    lp.backend = PDS_KVX_LOOPBACK;
    pds_kvx_t *x = NULL, *y = NULL;
    cr_expect_eq(pds_kvx_create(&lp, &x), PDS_ERR_INVALID_ARG); /* no hub */
    lp.hub = h;
    cr_assert_eq(pds_kvx_create(&lp, &x), PDS_OK);
    cr_assert_eq(pds_kvx_create(&lp, &y), PDS_OK);
    pool_t rx, tx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    pool_init(&tx, TX_BLOCKS, TX_SEED);
    pds_kvx_recv_t *r = NULL;
    cr_expect_eq(pds_kvx_expect(x, 1, NSEQ, DST, 1000, NULL, NULL, &r),
                 PDS_ERR_FAILED_PRECONDITION);
    const void *pb, *ab;
    size_t pl, al;
    cr_expect_eq(pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_CUDA, &pb, &pl),
                 PDS_ERR_UNSUPPORTED);
    cr_assert_eq(pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pb, &pl), PDS_OK);
    cr_expect_eq(pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pb, &pl),
                 PDS_ERR_ALREADY_EXISTS);
    cr_assert_eq(pds_kvx_address(x, &ab, &al), PDS_OK);
    int32_t rep[3] = {1, 2, 1}, oob[2] = {1, RX_BLOCKS};
    cr_expect_eq(pds_kvx_expect(x, 1, 3, rep, 1000, NULL, NULL, &r), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kvx_expect(x, 1, 2, oob, 1000, NULL, NULL, &r), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kvx_expect(x, 1, NSEQ, DST, 0, NULL, NULL, &r), PDS_ERR_INVALID_ARG);
    cr_assert_eq(pds_kvx_expect(x, 1, NSEQ, DST, 5000, NULL, NULL, &r), PDS_OK);
    pds_kvx_recv_t *r2 = NULL;
    cr_expect_eq(pds_kvx_expect(x, 1, NSEQ, DST, 1000, NULL, NULL, &r2), PDS_ERR_ALREADY_EXISTS);

    pds_kvx_send_t *t = NULL;
    uint8_t junk[64];
    memset(junk, 0x5a, sizeof junk);
    cr_expect_eq(pds_kvx_send_open(y, junk, sizeof junk, pb, pl, &tx.lay, 1, NSEQ, DST, &t),
                 PDS_ERR_PARSE);
    cr_expect_eq(pds_kvx_send_open(y, ab, al, junk, sizeof junk, &tx.lay, 1, NSEQ, DST, &t),
                 PDS_ERR_PARSE);
    cr_expect_eq(pds_kvx_send_open(y, ab, al - 1, pb, pl, &tx.lay, 1, NSEQ, DST, &t),
                 PDS_ERR_PARSE);
    pds_kv_layout_t other = tx.lay;
    other.head_dim = 64;
    cr_expect_eq(pds_kvx_send_open(y, ab, al, pb, pl, &other, 1, NSEQ, DST, &t),
                 PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "layout mismatch") != NULL);
    cr_expect_eq(pds_kvx_send_open(y, ab, al, pb, pl, &tx.lay, 1, 2, oob, &t), PDS_ERR_INVALID_ARG);
    cr_assert_eq(pds_kvx_send_open(y, ab, al, pb, pl, &tx.lay, 1, NSEQ, DST, &t), PDS_OK);
    int32_t bad_src[NSEQ];
    memcpy(bad_src, SRC, sizeof bad_src);
    bad_src[4] = TX_BLOCKS;
    cr_expect_eq(pds_kvx_send_layer(t, 0, tx.layer[0], bad_src), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kvx_send_layer(t, NL, tx.layer[0], SRC), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kvx_send_layer(t, 0, tx.layer[0], SRC), PDS_OK);
    cr_expect_eq(pds_kvx_send_layer(t, 0, tx.layer[0], SRC), PDS_ERR_INVALID_ARG);
    cr_expect_eq(pds_kvx_send_commit(t, 1000), PDS_ERR_FAILED_PRECONDITION);
    pds_kvx_send_close(t);
    cr_expect_eq(pds_kvx_recv_poll(r), PDS_ERR_CANCELLED); /* the sender aborted */
    pds_kvx_recv_close(r);

    /* A detached peer is unavailable (its blobs die with it: keep copies). */
    uint8_t ab_copy[256], pb_copy[1024];
    cr_assert(al <= sizeof ab_copy && pl <= sizeof pb_copy);
    memcpy(ab_copy, ab, al);
    memcpy(pb_copy, pb, pl);
    pds_kvx_destroy(x);
    cr_expect_eq(pds_kvx_send_open(y, ab_copy, al, pb_copy, pl, &tx.lay, 1, NSEQ, DST, &t),
                 PDS_ERR_UNAVAILABLE);
    pds_kvx_destroy(y);
    pds_kvx_destroy(NULL);
    pds_kvx_recv_close(NULL);
    pds_kvx_send_close(NULL);
    pds_kvx_hub_destroy(h);
    pool_fini(&rx);
    pool_fini(&tx);
}

/* ---- NCCL backend and device pools, without a GPU ------------------------------------------
 * What CI can check of the NCCL backend and the staging path: names, the error a node gets where
 * the build or the machine cannot do it, and every parser a receiver trusts before posting NCCL
 * receives into its pool. (tests/test_kvx_cuda.c has the GPU half.) */
static bool gpu_present(void)
{
    return pds_kvx_has_cuda() && kvx_gpu_check_device(0) == PDS_OK;
}

Test(kvx, backend_names_round_trip_and_unknown_names_are_refused)
{
    pds_kvx_backend_t b = PDS_KVX_UCX;
    cr_expect_eq(pds_kvx_backend_parse("nccl", &b), PDS_OK);
    cr_expect_eq(b, PDS_KVX_NCCL);
    cr_expect_str_eq(pds_kvx_backend_name(PDS_KVX_NCCL), "nccl");
    for (int i = PDS_KVX_UCX; i <= PDS_KVX_NCCL; i++) {
        cr_expect_eq(pds_kvx_backend_parse(pds_kvx_backend_name((pds_kvx_backend_t)i), &b), PDS_OK);
        cr_expect_eq((int)b, i);
    }
    cr_expect_eq(pds_kvx_backend_parse("rdma", &b), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "ucx, loopback or nccl") != NULL, "%s", pds_err_detail());
    cr_expect_eq(pds_kvx_backend_parse(NULL, &b), PDS_ERR_INVALID_ARG);
    /* NCCL is built exactly when CUDA is (and nccl.h was found): a CPU build has neither. */
    if (!pds_kvx_has_cuda()) cr_expect(!pds_kvx_has_nccl());
}

Test(kvx, nccl_without_a_gpu_or_the_library_says_why)
{
    if (gpu_present()) cr_skip_test("a GPU is present: tests/test_kvx_cuda.c covers this machine");
    pds_kvx_params_t p = pds_kvx_default_params();
    p.backend = PDS_KVX_NCCL;
    pds_kvx_t *x = NULL;
    pds_status_t s = pds_kvx_create(&p, &x);
    cr_expect_null(x);
    if (pds_kvx_has_nccl()) {
        cr_expect_eq(s, PDS_ERR_DEVICE, "%s", pds_status_name(s));
        cr_expect(strstr(pds_err_detail(), "NCCL backend needs a GPU") != NULL, "%s",
                  pds_err_detail());
    } else {
        cr_expect_eq(s, PDS_ERR_UNSUPPORTED, "%s", pds_status_name(s));
        cr_expect(strstr(pds_err_detail(), "no NCCL backend") != NULL, "%s", pds_err_detail());
    }
}

static pds_status_t never_ready(void *ctx, int layer)
{
    return PDS_ERR_INTERNAL; /* no layer is ever staged in these tests */
}

Test(kvx, device_pool_or_source_without_a_gpu_is_refused_cleanly, .timeout = 30)
{
    if (gpu_present()) cr_skip_test("a GPU is present: tests/test_kvx_cuda.c covers this machine");
    pds_kvx_params_t p = pds_kvx_default_params();
    pds_kvx_t *x = NULL;
    cr_assert_eq(pds_kvx_create(&p, &x), PDS_OK, "%s", pds_err_detail());
    pool_t rx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    const void *pb = NULL;
    size_t pl = 0;
    /* Host memory claimed to be device memory: no CUDA build -> UNSUPPORTED; no GPU -> DEVICE. */
    pds_status_t want = pds_kvx_has_cuda() ? PDS_ERR_DEVICE : PDS_ERR_UNSUPPORTED;
    pds_status_t s = pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_CUDA, &pb, &pl);
    cr_expect_eq(s, want, "register_pool(CUDA): %s %s", pds_status_name(s), pds_err_detail());
    /* ... and nothing half-registered: the same kvx still takes a host pool. */
    cr_expect_eq(pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pb, &pl), PDS_OK);
    const void *pb2 = NULL;
    size_t pl2 = 0;
    cr_expect_eq(pds_kvx_pool_blob_for(x, NULL, 0, &pb2, &pl2), PDS_OK);
    cr_expect(pb2 == pb && pl2 == pl, "UCX hands every sender the registered pool blob");

    pds_kvx_t *y = NULL;
    cr_assert_eq(pds_kvx_create(&p, &y), PDS_OK);
    cr_expect_eq(pds_kvx_pool_blob_for(y, NULL, 0, &pb2, &pl2), PDS_ERR_FAILED_PRECONDITION);
    cr_expect_eq(pds_kvx_register_source(y, &rx.lay, rx.layer, PDS_KVX_MEM_CUDA, NULL, NULL),
                 PDS_ERR_INVALID_ARG, "a device source needs a ready callback");
    s = pds_kvx_register_source(y, &rx.lay, rx.layer, PDS_KVX_MEM_CUDA, never_ready, NULL);
    cr_expect_eq(s, want, "register_source(CUDA): %s %s", pds_status_name(s), pds_err_detail());
    cr_expect_eq(pds_kvx_register_source(y, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, NULL, NULL),
                 PDS_OK);
    cr_expect_eq(pds_kvx_register_source(y, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, NULL, NULL),
                 PDS_ERR_ALREADY_EXISTS);
    pds_kvx_destroy(y);
    pds_kvx_destroy(x);

    pds_kvx_hub_t *h = NULL;
    cr_assert_eq(pds_kvx_hub_create(&h), PDS_OK);
    p.backend = PDS_KVX_LOOPBACK;
    p.hub = h;
    cr_assert_eq(pds_kvx_create(&p, &x), PDS_OK);
    cr_expect_eq(pds_kvx_register_source(x, &rx.lay, rx.layer, PDS_KVX_MEM_CUDA, never_ready, NULL),
                 PDS_ERR_UNSUPPORTED);
    pds_kvx_destroy(x);
    pds_kvx_hub_destroy(h);
    pool_fini(&rx);
}

/* A kvx object that exists only for the blob builders (no backend, no threads). */
static pds_kvx_t *fake_kvx(pds_kvx_backend_t b, pool_t *pool)
{
    pds_kvx_t *x = calloc(1, sizeof *x);
    cr_assert_not_null(x);
    x->p.backend = b;
    if (pool) {
        x->layout = pool->lay;
        x->block_bytes = pds_kv_block_bytes(&pool->lay);
        x->pool_base = (uint8_t **)pool->layer;
    }
    return x;
}

Test(kvx, nccl_address_blob_parses_and_bad_ones_are_refused)
{
    pds_kvx_t *x = fake_kvx(PDS_KVX_NCCL, NULL);
    kvx_naddr_t a = {.instance = 0x1122334455667788ULL, .device = 3, .pid = 4242};
    snprintf(a.host, sizeof a.host, "gpu-node-7");
    cr_assert_eq(kvx_addr_build(x, &a, sizeof a), PDS_OK);
    kvx_naddr_t got;
    cr_assert_eq(kvx_nccl_addr_parse(x->addr, x->addr_len, &got), PDS_OK);
    cr_expect_eq(got.instance, a.instance);
    cr_expect_eq(got.device, 3);
    cr_expect_eq(got.pid, 4242);
    cr_expect_str_eq(got.host, "gpu-node-7");

    uint8_t bad[512];
    memcpy(bad, x->addr, x->addr_len);
    cr_expect_eq(kvx_nccl_addr_parse(bad, x->addr_len - 1, &got), PDS_ERR_PARSE);
    bad[0] ^= 1; /* magic */
    cr_expect_eq(kvx_nccl_addr_parse(bad, x->addr_len, &got), PDS_ERR_PARSE);
    cr_expect_eq(kvx_nccl_addr_parse(NULL, 0, &got), PDS_ERR_PARSE);
    pds_free(x->addr);
    x->addr = NULL;

    a.instance = 0; /* every live kvx has a non-zero instance */
    cr_assert_eq(kvx_addr_build(x, &a, sizeof a), PDS_OK);
    cr_expect_eq(kvx_nccl_addr_parse(x->addr, x->addr_len, &got), PDS_ERR_PARSE);
    pds_free(x->addr);
    x->addr = NULL;
    cr_assert_eq(kvx_addr_build(x, &a, sizeof a - 8), PDS_OK); /* short payload */
    cr_expect_eq(kvx_nccl_addr_parse(x->addr, x->addr_len, &got), PDS_ERR_PARSE);
    pds_free(x->addr);
    x->p.backend = PDS_KVX_UCX; /* a UCX address handed to an NCCL node */
    a.instance = 9;
    cr_assert_eq(kvx_addr_build(x, &a, sizeof a), PDS_OK);
    cr_expect_eq(kvx_nccl_addr_parse(x->addr, x->addr_len, &got), PDS_ERR_INVALID_ARG);
    cr_expect(strstr(pds_err_detail(), "backend ucx") != NULL, "%s", pds_err_detail());
    pds_free(x->addr);
    free(x);
}

Test(kvx, nccl_pool_blob_carries_the_pair_key_and_plain_blobs_are_refused)
{
    pool_t rx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    pds_kvx_t *x = fake_kvx(PDS_KVX_NCCL, &rx);
    kvx_nkey_t key = {.receiver = 7, .sender = 9, .epoch = 2};
    for (int i = 0; i < KVX_NCCL_ID_BYTES; i++) key.id[i] = (uint8_t)(i * 13 + 5);
    const void *rk[NL] = {&key};
    size_t rl[NL] = {sizeof key};
    void *blob = NULL;
    size_t len = 0;
    cr_assert_eq(kvx_pool_blob_make(x, rk, rl, &blob, &len), PDS_OK);
    kvx_pool_hdr_t h;
    kvx_nkey_t got;
    cr_assert_eq(kvx_nccl_pool_key(blob, len, &h, &got), PDS_OK, "%s", pds_err_detail());
    cr_expect(memcmp(&got, &key, sizeof key) == 0, "the key travels byte for byte");
    cr_expect_eq(h.n_layers, NL);
    cr_expect_eq(h.n_blocks, RX_BLOCKS);
    cr_expect_eq(h.block_bytes, pds_kv_block_bytes(&rx.lay));
    cr_expect_eq(kvx_nccl_pool_key(blob, len - 8, &h, &got), PDS_ERR_PARSE);
    uint8_t *b = blob;
    b[4] ^= 0xff; /* version */
    cr_expect_eq(kvx_nccl_pool_key(blob, len, &h, &got), PDS_ERR_PARSE);
    pds_free(blob);

    /* The registered pool blob has no key: it is not for senders. */
    cr_assert_eq(kvx_pool_blob_make(x, NULL, NULL, &blob, &len), PDS_OK);
    cr_expect_eq(kvx_nccl_pool_key(blob, len, &h, &got), PDS_ERR_PARSE);
    cr_expect(strstr(pds_err_detail(), "pds_kvx_pool_blob_for") != NULL, "%s", pds_err_detail());
    pds_free(blob);
    /* A key without both instances. */
    key.sender = 0;
    cr_assert_eq(kvx_pool_blob_make(x, rk, rl, &blob, &len), PDS_OK);
    cr_expect_eq(kvx_nccl_pool_key(blob, len, &h, &got), PDS_ERR_PARSE);
    pds_free(blob);
    /* A UCX pool blob. */
    x->p.backend = PDS_KVX_UCX;
    key.sender = 9;
    cr_assert_eq(kvx_pool_blob_make(x, rk, rl, &blob, &len), PDS_OK);
    cr_expect_eq(kvx_nccl_pool_key(blob, len, &h, &got), PDS_ERR_INVALID_ARG);
    pds_free(blob);
    free(x);
    pool_fini(&rx);
}

/* A DATA header of the test sequence's layer 1, as a sender builds it. */
static void data_header(kvx_nhdr_t *h, int64_t bb)
{
    memset(h, 0, sizeof *h);
    kvx_wire_init(&h->w, KVX_MSG_DATA, TID);
    h->w.layer = 1;
    h->n_runs = (uint32_t)kvx_nccl_runs(NSEQ, SRC, DST, h->runs);
    h->w.n_blocks = NSEQ;
    h->w.bytes = (uint64_t)NSEQ * (uint64_t)bb;
}

Test(kvx, nccl_runs_merge_source_and_destination_runs)
{
    kvx_nrun_t runs[NSEQ];
    int n = kvx_nccl_runs(NSEQ, SRC, DST, runs);
    cr_assert_eq(n, RUNS_PER_LAYER);
    /* {0,1,2}->{3,4,5}, {3}->{9}, {10..17}->{20..27} */
    cr_expect(runs[0].index == 0 && runs[0].dst_first == 3 && runs[0].n == 3);
    cr_expect(runs[1].index == 3 && runs[1].dst_first == 9 && runs[1].n == 1);
    cr_expect(runs[2].index == 4 && runs[2].dst_first == 20 && runs[2].n == 8);
    int32_t scattered[4] = {8, 6, 4, 2}, seq[4] = {0, 1, 2, 3};
    cr_expect_eq(kvx_nccl_runs(4, seq, scattered, runs), 4);
    cr_expect_eq(kvx_nccl_runs(4, seq, seq, runs), 1);
    cr_expect_eq(runs[0].n, 4u);
}

Test(kvx, nccl_header_check_refuses_everything_it_cannot_follow)
{
    pool_t rx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    int64_t bb = pds_kv_block_bytes(&rx.lay);
    kvx_nhdr_t *h = calloc(1, sizeof *h), *out = calloc(1, sizeof *out);
    cr_assert(h && out);
    data_header(h, bb);
    cr_assert_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_OK, "%s", pds_err_detail());
    cr_expect_eq(out->n_runs, (uint32_t)RUNS_PER_LAYER);
    cr_expect_eq(out->w.transfer_id, TID);
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h - 1, bb, NL, out), PDS_ERR_PARSE);

    data_header(h, bb);
    h->w.magic ^= 1;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_PARSE, "bad magic");
    data_header(h, bb);
    h->w.kind = 77;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_PARSE, "unknown kind");
    data_header(h, bb);
    h->n_runs = 0;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "no runs");
    data_header(h, bb);
    h->n_runs = (uint32_t)KVX_NCCL_MAX_RUNS + 1;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "too many runs");
    data_header(h, bb);
    h->runs[1].n = 0;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "empty run");
    data_header(h, bb);
    h->runs[2].n = 9; /* runs add up to 13, header says 12 */
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "sum");
    cr_expect(strstr(pds_err_detail(), "add up to 13 blocks") != NULL, "%s", pds_err_detail());
    data_header(h, bb);
    h->w.bytes -= 1;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "bytes");
    data_header(h, bb);
    h->w.layer = NL;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "layer");
    data_header(h, bb);
    h->runs[0].index = 0x80000000u;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_CORRUPT, "index");
    /* DONE and ABORT carry no runs. */
    memset(h, 0, sizeof *h);
    kvx_wire_init(&h->w, KVX_MSG_DONE, TID);
    h->w.n_layers = NL;
    h->w.n_blocks = NSEQ;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_OK);
    h->n_runs = 1;
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_ERR_PARSE);
    memset(h, 0, sizeof *h);
    kvx_wire_init(&h->w, KVX_MSG_ABORT, TID);
    cr_expect_eq(kvx_nccl_hdr_check(h, sizeof *h, bb, NL, out), PDS_OK);
    cr_expect_eq(out->w.kind, KVX_MSG_ABORT);
    free(h);
    free(out);
    pool_fini(&rx);
}

/* ---- allocation failure ------------------------------------------------------------------------
 */
/* A whole loopback transfer with the nth allocation failing: every step either works or returns a
 * clean status, and everything is released. */
static pds_status_t loop_scenario(pool_t *rx, pool_t *tx)
{
    pds_kvx_hub_t *h = NULL;
    pds_kvx_t *rxk = NULL, *txk = NULL;
    pds_kvx_recv_t *r = NULL;
    pds_kvx_send_t *t = NULL;
    const void *pb, *ab;
    size_t pl, al;
    pds_status_t s = pds_kvx_hub_create(&h);
    if (s != PDS_OK) return s;
    pds_kvx_params_t prm = pds_kvx_default_params();
    prm.backend = PDS_KVX_LOOPBACK;
    prm.hub = h;
    if ((s = pds_kvx_create(&prm, &rxk)) != PDS_OK) goto out;
    if ((s = pds_kvx_create(&prm, &txk)) != PDS_OK) goto out;
    if ((s = pds_kvx_register_pool(rxk, &rx->lay, rx->layer, PDS_KVX_MEM_HOST, &pb, &pl)) != PDS_OK)
        goto out;
    pds_kvx_address(rxk, &ab, &al);
    if ((s = pds_kvx_expect(rxk, 3, NSEQ, DST, 10000, NULL, NULL, &r)) != PDS_OK) goto out;
    if ((s = pds_kvx_send_open(txk, ab, al, pb, pl, &tx->lay, 3, NSEQ, DST, &t)) != PDS_OK)
        goto out;
    for (int l = 0; l < NL; l++)
        if ((s = pds_kvx_send_layer(t, l, tx->layer[l], SRC)) != PDS_OK) goto out;
    if ((s = pds_kvx_send_commit(t, 10000)) != PDS_OK) goto out;
    s = pds_kvx_recv_poll(r);
out:
    pds_kvx_send_close(t);
    pds_kvx_recv_close(r);
    pds_kvx_destroy(txk);
    pds_kvx_destroy(rxk);
    pds_kvx_hub_destroy(h);
    return s;
}

Test(kvx, loopback_transfer_under_allocation_failure_leaks_nothing)
{
    pool_t rx, tx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    pool_init(&tx, TX_BLOCKS, TX_SEED);
    pds_alloc_stats_t before, after;
    pds_alloc_stats(&before);
    int n;
    for (n = 1; n < 200; n++) {
        pds_alloc_fail_nth(n);
        pds_status_t s = loop_scenario(&rx, &tx);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        pds_alloc_stats(&after);
        cr_expect_eq(after.live_blocks, before.live_blocks, "n=%d leaked %lld blocks", n,
                     (long long)(after.live_blocks - before.live_blocks));
        if (!hit) {
            cr_expect_eq(s, PDS_OK, "n=%d: %s", n, pds_status_name(s));
            break;
        }
        cr_expect_neq(s, PDS_OK, "n=%d: failure injected but the scenario reported ok", n);
    }
    cr_expect(n > 5 && n < 200, "swept %d allocations", n);
    pool_fini(&rx);
    pool_fini(&tx);
}

Test(kvx, ucx_create_register_expect_under_allocation_failure_leaks_nothing, .timeout = 60)
{
    set_tls("tcp");
    pool_t rx;
    pool_init(&rx, RX_BLOCKS, RX_SEED);
    pds_alloc_stats_t before, after;
    pds_alloc_stats(&before);
    int n;
    for (n = 1; n < 100; n++) {
        pds_kvx_t *x = NULL;
        pds_kvx_recv_t *r = NULL;
        const void *pb;
        size_t pl;
        pds_alloc_fail_nth(n);
        pds_status_t s = pds_kvx_create(NULL, &x);
        if (s == PDS_OK)
            s = pds_kvx_register_pool(x, &rx.lay, rx.layer, PDS_KVX_MEM_HOST, &pb, &pl);
        if (s == PDS_OK) s = pds_kvx_expect(x, 5, NSEQ, DST, 1000, NULL, NULL, &r);
        bool hit = pds_alloc_fail_triggered();
        pds_alloc_fail_nth(0);
        pds_kvx_recv_close(r);
        pds_kvx_destroy(x);
        pds_alloc_stats(&after);
        cr_expect_eq(after.live_blocks, before.live_blocks, "n=%d leaked", n);
        if (!hit) {
            cr_expect_eq(s, PDS_OK);
            break;
        }
        cr_expect_eq(s, PDS_ERR_NO_MEMORY, "n=%d: %s", n, pds_status_name(s));
    }
    cr_expect(n > 3 && n < 100, "swept %d allocations", n);
    pool_fini(&rx);
}

Test(kvx, reports_the_ucx_version_it_runs_with)
{
    char v[64] = "";
    pds_kvx_transport_version(v, sizeof v);
    cr_expect(strncmp(v, "ucx 1.", 6) == 0, "version text: %s", v);
}

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

#include "kvx/kvx.h"

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

/* GPU tests of common/kvx (built with CUDA; each skips with a message where no GPU exists):
 *   - the checksum kernel equals pds_kvx_checksum (its CPU reference) on aligned and odd blocks;
 *   - a device pool to a device pool over UCX, staged through pinned mirrors: exact bytes in the
 *     reserved blocks, the rest untouched, every layer's ready() awaited, one staged copy per
 *     layer each side;
 *   - a bit flipped in the receiver's mirror is caught (verification runs on the device, after
 *     the copy) and the transfer fails; only its own reserved blocks were written;
 *   - send_layer refuses a base other than the registered device base;
 *   - NCCL: two ranks on one GPU cannot form a pair; the transfer fails with a status within the
 *     set-up deadline and every handle closes (no hang, no leak);
 *   - NCCL on two GPUs (skips with fewer): exact bytes device to device, checksums verified on the
 *     receiving GPU, a second transfer reusing the pair, and a corrupted block caught.
 * Same geometry as tests/test_kvx.c: 4 layers, 8 KiB blocks, a 12-block sequence in 3 runs.
 */
#include <criterion/criterion.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kvx/kvx_internal.h"

#define NL        4
#define RX_BLOCKS 40
#define TX_BLOCKS 24
#define NSEQ      12
#define TID       0x6e7f0001ULL

static const int32_t SRC[NSEQ] = {0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17};
static const int32_t DST[NSEQ] = {3, 4, 5, 9, 20, 21, 22, 23, 24, 25, 26, 27};

static void need_gpu(void)
{
    if (kvx_gpu_check_device(0) != PDS_OK) cr_skip_test("no GPU: %s", pds_err_detail());
}

static pds_kv_layout_t layout_of(int n_blocks)
{
    return (pds_kv_layout_t){.n_layers = NL,
                             .n_blocks = n_blocks,
                             .block_size = 16,
                             .n_kv_heads = 2,
                             .head_dim = 32,
                             .elem_size = 4};
}

/* A pool in device memory with a host copy of what it should hold. */
typedef struct {
    pds_kv_layout_t lay;
    size_t layer_bytes, bytes;
    uint8_t *host; /* (NL, n_blocks, ...) */
    uint8_t *dev;
    void *layer[NL]; /* device layer bases */
} dpool_t;

static void dpool_init_on(dpool_t *p, int n_blocks, uint64_t seed, int device)
{
    p->lay = layout_of(n_blocks);
    p->layer_bytes = (size_t)pds_kv_layer_bytes(&p->lay);
    p->bytes = p->layer_bytes * NL;
    p->host = malloc(p->bytes);
    cr_assert_not_null(p->host);
    for (size_t i = 0; i < p->bytes / 8; i++) {
        uint64_t v = pds_mix64(seed * 0x100000001ULL + i);
        memcpy(p->host + 8 * i, &v, 8);
    }
    void *d = NULL;
    cr_assert_eq(kvx_gpu_dev_alloc(device, p->bytes, &d), PDS_OK, "%s", pds_err_detail());
    p->dev = d;
    cr_assert_eq(kvx_gpu_memcpy(p->dev, p->host, p->bytes), PDS_OK);
    for (int l = 0; l < NL; l++) p->layer[l] = p->dev + l * p->layer_bytes;
}

static void dpool_init(dpool_t *p, int n_blocks, uint64_t seed)
{
    dpool_init_on(p, n_blocks, seed, 0);
}

static void dpool_fini(dpool_t *p)
{
    kvx_gpu_dev_free(p->dev);
    free(p->host);
}

Test(kvx_cuda, checksum_kernel_matches_the_cpu_reference)
{
    need_gpu();
    kvx_gpu_t *g = NULL;
    cr_assert_eq(kvx_gpu_create(0, &g), PDS_OK, "%s", pds_err_detail());
    const int64_t sizes[] = {8192, 65536, 1003, 40, 7};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int64_t bb = sizes[k];
        int nb = 9;
        uint8_t *h = malloc((size_t)(bb * nb));
        for (int64_t i = 0; i < bb * nb; i++) h[i] = (uint8_t)pds_mix64((uint64_t)(i + 31 * k));
        void *d = NULL;
        cr_assert_eq(kvx_gpu_dev_alloc(0, (size_t)(bb * nb), &d), PDS_OK);
        cr_assert_eq(kvx_gpu_memcpy(d, h, (size_t)(bb * nb)), PDS_OK);
        int32_t ids[4] = {8, 0, 3, 4};
        uint64_t got[4];
        cr_assert_eq(kvx_gpu_block_sums(g, d, bb, 4, ids, got), PDS_OK, "%s", pds_err_detail());
        for (int i = 0; i < 4; i++)
            cr_expect_eq(got[i], pds_kvx_checksum(h + ids[i] * bb, (size_t)bb),
                         "block %d of %lld bytes", ids[i], (long long)bb);
        kvx_gpu_dev_free(d);
        free(h);
    }
    kvx_gpu_destroy(g);
}

static atomic_int ready_calls;
static pds_status_t count_ready(void *ctx, int layer)
{
    atomic_fetch_add(&ready_calls, 1);
    return layer >= 0 && layer < NL ? PDS_OK : PDS_ERR_INTERNAL;
}

/* Receiver and sender kvx (UCX) in this process, device pools on both sides. */
typedef struct {
    pds_kvx_t *rx, *tx;
    dpool_t rxp, txp;
    const void *addr, *pool;
    size_t addr_len, pool_len;
} staged_t;

static void staged_init(staged_t *s)
{
    setenv("UCX_TLS", "tcp", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    pds_kvx_params_t p = pds_kvx_default_params();
    cr_assert_eq(pds_kvx_create(&p, &s->rx), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_create(&p, &s->tx), PDS_OK, "%s", pds_err_detail());
    dpool_init(&s->rxp, RX_BLOCKS, 0xabcd);
    dpool_init(&s->txp, TX_BLOCKS, 0x1234);
    cr_assert_eq(pds_kvx_register_pool(s->rx, &s->rxp.lay, s->rxp.layer, PDS_KVX_MEM_CUDA, &s->pool,
                                       &s->pool_len),
                 PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_address(s->rx, &s->addr, &s->addr_len), PDS_OK);
    cr_assert_eq(pds_kvx_register_source(s->tx, &s->txp.lay, s->txp.layer, PDS_KVX_MEM_CUDA,
                                         count_ready, NULL),
                 PDS_OK, "%s", pds_err_detail());
}

static void staged_fini(staged_t *s)
{
    pds_kvx_destroy(s->tx);
    pds_kvx_destroy(s->rx);
    dpool_fini(&s->rxp);
    dpool_fini(&s->txp);
}

/* One transfer of the test sequence; returns the receiver's final status. */
static pds_status_t staged_transfer(staged_t *s, pds_status_t *commit)
{
    pds_kvx_recv_t *r = NULL;
    cr_assert_eq(pds_kvx_expect(s->rx, TID, NSEQ, DST, 10000, NULL, NULL, &r), PDS_OK);
    pds_kvx_send_t *t = NULL;
    cr_assert_eq(pds_kvx_send_open(s->tx, s->addr, s->addr_len, s->pool, s->pool_len, &s->txp.lay,
                                   TID, NSEQ, DST, &t),
                 PDS_OK, "%s", pds_err_detail());
    for (int l = 0; l < NL; l++)
        cr_assert_eq(pds_kvx_send_layer(t, l, s->txp.layer[l], SRC), PDS_OK, "layer %d: %s", l,
                     pds_err_detail());
    *commit = pds_kvx_send_commit(t, 10000);
    pds_kvx_send_close(t);
    pds_status_t rs = pds_kvx_recv_wait(r, 10000);
    pds_kvx_recv_close(r);
    return rs;
}

Test(kvx_cuda, staged_ucx_moves_device_blocks_into_the_reserved_device_blocks, .timeout = 60)
{
    need_gpu();
    staged_t s = {0};
    staged_init(&s);
    atomic_store(&ready_calls, 0);
    pds_status_t cs;
    pds_status_t rs = staged_transfer(&s, &cs);
    cr_expect_eq(cs, PDS_OK, "commit: %s %s", pds_status_name(cs), pds_err_detail());
    cr_expect_eq(rs, PDS_OK, "receiver: %s %s", pds_status_name(rs), pds_err_detail());
    cr_expect_eq(atomic_load(&ready_calls), NL, "ready() awaited once per layer");

    uint8_t *got = malloc(s.rxp.bytes);
    cr_assert_eq(kvx_gpu_memcpy(got, s.rxp.dev, s.rxp.bytes), PDS_OK);
    int64_t bb = pds_kv_block_bytes(&s.rxp.lay);
    int moved[RX_BLOCKS] = {0};
    for (int i = 0; i < NSEQ; i++) moved[DST[i]] = SRC[i] + 1;
    for (int l = 0; l < NL; l++)
        for (int b = 0; b < RX_BLOCKS; b++) {
            const uint8_t *want = moved[b]
                                      ? s.txp.host + l * s.txp.layer_bytes + (moved[b] - 1) * bb
                                      : s.rxp.host + l * s.rxp.layer_bytes + b * bb;
            cr_expect(memcmp(got + l * s.rxp.layer_bytes + b * bb, want, (size_t)bb) == 0,
                      "layer %d block %d (%s)", l, b, moved[b] ? "moved" : "untouched");
        }
    pds_kvx_stats_t st, rt;
    pds_kvx_stats(s.tx, &st);
    pds_kvx_stats(s.rx, &rt);
    cr_expect_eq(st.staged_bytes, (int64_t)NL * NSEQ * bb, "sender staged every block once");
    cr_expect_eq(rt.staged_bytes, (int64_t)NL * NSEQ * bb, "receiver landed every block once");
    cr_expect_eq(st.msgs_sent, NL * 3, "runs merged");
    free(got);
    staged_fini(&s);
}

Test(kvx_cuda, staged_corruption_is_caught_on_the_device, .timeout = 60)
{
    need_gpu();
    staged_t s = {0};
    staged_init(&s);
    pds_kvx_test_corrupt_next(s.rx, 2, 5, 100);
    pds_status_t cs;
    pds_status_t rs = staged_transfer(&s, &cs);
    cr_expect_eq(rs, PDS_ERR_CORRUPT, "receiver: %s", pds_status_name(rs));
    cr_expect_eq(cs, PDS_ERR_CORRUPT, "sender hears the verdict: %s", pds_status_name(cs));
    uint8_t *got = malloc(s.rxp.bytes);
    cr_assert_eq(kvx_gpu_memcpy(got, s.rxp.dev, s.rxp.bytes), PDS_OK);
    int64_t bb = pds_kv_block_bytes(&s.rxp.lay);
    bool reserved[RX_BLOCKS] = {0};
    for (int i = 0; i < NSEQ; i++) reserved[DST[i]] = true;
    for (int l = 0; l < NL; l++)
        for (int b = 0; b < RX_BLOCKS; b++)
            if (!reserved[b])
                cr_expect(memcmp(got + l * s.rxp.layer_bytes + b * bb,
                                 s.rxp.host + l * s.rxp.layer_bytes + b * bb, (size_t)bb) == 0,
                          "layer %d block %d is not the transfer's and changed", l, b);
    free(got);
    staged_fini(&s);
}

Test(kvx_cuda, device_source_refuses_another_base, .timeout = 60)
{
    need_gpu();
    staged_t s = {0};
    staged_init(&s);
    pds_kvx_recv_t *r = NULL;
    cr_assert_eq(pds_kvx_expect(s.rx, TID, NSEQ, DST, 10000, NULL, NULL, &r), PDS_OK);
    pds_kvx_send_t *t = NULL;
    cr_assert_eq(pds_kvx_send_open(s.tx, s.addr, s.addr_len, s.pool, s.pool_len, &s.txp.lay, TID,
                                   NSEQ, DST, &t),
                 PDS_OK);
    cr_expect_eq(pds_kvx_send_layer(t, 0, s.txp.layer[1], SRC), PDS_ERR_INVALID_ARG);
    pds_kvx_send_close(t);
    cr_expect_eq(pds_kvx_recv_wait(r, 5000), PDS_ERR_CANCELLED, "the sender aborted");
    pds_kvx_recv_close(r);
    staged_fini(&s);
}

Test(kvx_cuda, nccl_pair_on_one_gpu_fails_with_a_status_not_a_hang, .timeout = 90)
{
    need_gpu();
    pds_kvx_params_t p = pds_kvx_default_params();
    p.backend = PDS_KVX_NCCL;
    p.init_timeout_ms = 20000;
    pds_kvx_t *rx = NULL, *tx = NULL;
    cr_assert_eq(pds_kvx_create(&p, &rx), PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_create(&p, &tx), PDS_OK, "%s", pds_err_detail());
    dpool_t rxp, txp;
    dpool_init(&rxp, RX_BLOCKS, 0xabcd);
    dpool_init(&txp, TX_BLOCKS, 0x1234);
    const void *pool, *addr, *txaddr, *peer_pool;
    size_t pool_len, addr_len, txaddr_len, peer_pool_len;
    cr_assert_eq(pds_kvx_register_pool(rx, &rxp.lay, rxp.layer, PDS_KVX_MEM_CUDA, &pool, &pool_len),
                 PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_address(rx, &addr, &addr_len), PDS_OK);
    cr_assert_eq(pds_kvx_address(tx, &txaddr, &txaddr_len), PDS_OK);
    cr_assert_eq(
        pds_kvx_register_source(tx, &txp.lay, txp.layer, PDS_KVX_MEM_CUDA, count_ready, NULL),
        PDS_OK, "%s", pds_err_detail());
    /* The registered blob has no pair key; the per-sender one does. */
    pds_kvx_send_t *t = NULL;
    cr_expect_eq(
        pds_kvx_send_open(tx, addr, addr_len, pool, pool_len, &txp.lay, TID, NSEQ, DST, &t),
        PDS_ERR_PARSE);
    cr_assert_eq(pds_kvx_pool_blob_for(rx, txaddr, txaddr_len, &peer_pool, &peer_pool_len), PDS_OK,
                 "%s", pds_err_detail());
    pds_kvx_recv_t *r = NULL;
    cr_assert_eq(pds_kvx_expect(rx, TID, NSEQ, DST, 30000, NULL, NULL, &r), PDS_OK);
    pds_status_t s = pds_kvx_send_open(tx, addr, addr_len, peer_pool, peer_pool_len, &txp.lay, TID,
                                       NSEQ, DST, &t);
    if (s == PDS_OK) {
        for (int l = 0; l < NL; l++) (void)pds_kvx_send_layer(t, l, txp.layer[l], SRC);
        s = pds_kvx_send_commit(t, 30000);
        pds_kvx_send_close(t);
    }
    /* NCCL refuses two ranks on one device: whichever step notices, it is a status. */
    cr_expect_neq(s, PDS_OK, "two ranks on one GPU cannot have worked");
    cr_log_info("nccl on one GPU: %s (%s)", pds_status_name(s), pds_err_detail());
    pds_kvx_recv_cancel(r);
    pds_kvx_recv_close(r);
    pds_kvx_destroy(tx);
    pds_kvx_destroy(rx);
    dpool_fini(&rxp);
    dpool_fini(&txp);
}

/* Receiver on GPU 1, sender on GPU 0; two transfers over one pair, the second corrupted. */
Test(kvx_cuda, nccl_moves_device_blocks_between_two_gpus, .timeout = 120)
{
    need_gpu();
    if (kvx_gpu_check_device(1) != PDS_OK) cr_skip_test("one GPU: the NCCL pair needs two");
    pds_kvx_params_t p = pds_kvx_default_params();
    p.backend = PDS_KVX_NCCL;
    p.init_timeout_ms = 60000;
    p.device = 1;
    pds_kvx_t *rx = NULL, *tx = NULL;
    cr_assert_eq(pds_kvx_create(&p, &rx), PDS_OK, "%s", pds_err_detail());
    p.device = 0;
    cr_assert_eq(pds_kvx_create(&p, &tx), PDS_OK, "%s", pds_err_detail());
    dpool_t rxp, txp;
    dpool_init_on(&rxp, RX_BLOCKS, 0xabcd, 1);
    dpool_init_on(&txp, TX_BLOCKS, 0x1234, 0);
    const void *pool, *addr, *txaddr, *peer_pool;
    size_t pool_len, addr_len, txaddr_len, peer_pool_len;
    cr_assert_eq(pds_kvx_register_pool(rx, &rxp.lay, rxp.layer, PDS_KVX_MEM_CUDA, &pool, &pool_len),
                 PDS_OK, "%s", pds_err_detail());
    cr_assert_eq(pds_kvx_address(rx, &addr, &addr_len), PDS_OK);
    cr_assert_eq(pds_kvx_address(tx, &txaddr, &txaddr_len), PDS_OK);
    cr_assert_eq(
        pds_kvx_register_source(tx, &txp.lay, txp.layer, PDS_KVX_MEM_CUDA, count_ready, NULL),
        PDS_OK, "%s", pds_err_detail());
    int64_t bb = pds_kv_block_bytes(&rxp.lay);
    for (int round = 0; round < 2; round++) {
        bool corrupt = round == 1;
        uint64_t id = TID + (uint64_t)round;
        cr_assert_eq(pds_kvx_pool_blob_for(rx, txaddr, txaddr_len, &peer_pool, &peer_pool_len),
                     PDS_OK, "%s", pds_err_detail());
        if (corrupt) pds_kvx_test_corrupt_next(rx, 1, 4, 7);
        pds_kvx_recv_t *r = NULL;
        cr_assert_eq(pds_kvx_expect(rx, id, NSEQ, DST, 60000, NULL, NULL, &r), PDS_OK);
        pds_kvx_send_t *t = NULL;
        cr_assert_eq(pds_kvx_send_open(tx, addr, addr_len, peer_pool, peer_pool_len, &txp.lay, id,
                                       NSEQ, DST, &t),
                     PDS_OK, "%s", pds_err_detail());
        for (int l = 0; l < NL; l++)
            cr_assert_eq(pds_kvx_send_layer(t, l, txp.layer[l], SRC), PDS_OK, "%s",
                         pds_err_detail());
        pds_status_t cs = pds_kvx_send_commit(t, 60000);
        cr_expect_eq(cs, PDS_OK, "round %d commit: %s %s", round, pds_status_name(cs),
                     pds_err_detail());
        pds_kvx_send_close(t);
        pds_status_t rs = pds_kvx_recv_wait(r, 60000);
        cr_expect_eq(rs, corrupt ? PDS_ERR_CORRUPT : PDS_OK, "round %d receiver: %s %s", round,
                     pds_status_name(rs), pds_err_detail());
        pds_kvx_recv_close(r);
        if (corrupt) break;
        uint8_t *got = malloc(rxp.bytes);
        cr_assert_eq(kvx_gpu_memcpy(got, rxp.dev, rxp.bytes), PDS_OK);
        int moved[RX_BLOCKS] = {0};
        for (int i = 0; i < NSEQ; i++) moved[DST[i]] = SRC[i] + 1;
        for (int l = 0; l < NL; l++)
            for (int b = 0; b < RX_BLOCKS; b++) {
                const uint8_t *want = moved[b]
                                          ? txp.host + l * txp.layer_bytes + (moved[b] - 1) * bb
                                          : rxp.host + l * rxp.layer_bytes + b * bb;
                cr_expect(memcmp(got + l * rxp.layer_bytes + b * bb, want, (size_t)bb) == 0,
                          "layer %d block %d", l, b);
            }
        free(got);
    }
    pds_kvx_stats_t st;
    pds_kvx_stats(tx, &st);
    cr_expect_eq(st.msgs_sent, 2 * NL * 3, "runs merged: %lld", (long long)st.msgs_sent);
    pds_kvx_destroy(tx);
    pds_kvx_destroy(rx);
    dpool_fini(&rxp);
    dpool_fini(&txp);
}

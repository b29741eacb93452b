/* kvx_stage.c: KV pools in GPU memory. UCX here moves host memory only, so a device pool travels
 * through pinned host mirrors as large as the pool; NCCL reads and writes the pools themselves.
 *
 * Receiver (register_pool with PDS_KVX_MEM_CUDA): UCX registers the mirror, so data lands there
 * by the ordinary receive path; once everything arrived, the progress thread copies the transfer's
 * blocks mirror -> device (one cudaMemcpyAsync per run of consecutive ids) and verifies them there
 * with the checksum kernel, before the handle reports PDS_OK. NCCL lands in the device pool and
 * verifies the same way. Blocks are exclusive to their transfer, so the mirror needs no allocator:
 * block b of layer l always lives at the same offset in both; a transfer that fails verification
 * has only written its own reserved blocks, which are freed, never adopted.
 *
 * Sender (register_source with PDS_KVX_MEM_CUDA): send_layer only queues the layer; one staging
 * thread per kvx takes layers in order, waits ready(layer) (the engine's per-layer event),
 * checksums the layer's blocks on the GPU, then UCX: copies them device -> mirror and starts the
 * sends from the mirror; NCCL: enqueues header + runs on the pair's stream. The engine thread never
 * blocks, and layer l's copy and send overlap layer l+1's compute. The checksums cover the whole
 * path, device to device, copies included.
 *
 * Trade-offs: the mirror costs pinned host memory equal to the pool, and one thread serialises the
 * copies (~55 GB/s each way on an H100 host, ahead of what UCX moves between processes). Hashing
 * on the GPU rather than in the mirror matters: one host core hashes a few GB/s, which measured as
 * most of the exposed hand-off of a 16k-token llama3-8b prompt (bench/results/gpu-handoff-1gpu.md),
 * while the kernel takes a fraction of the copy time.
 */
#include "kvx/kvx_internal.h"

#include <stdio.h>
#include <string.h>

#define MOD "kvx"

typedef struct stage_job {
    struct stage_job *next;
    pds_kvx_send_t *t;
    int layer;
    int32_t *ids; /* (t->n_blocks) source ids */
} stage_job_t;

struct kvx_stage {
    pthread_t thread;
    bool started, stop;
    pthread_cond_t cv; /* with x->mu: work queued / stop */
    stage_job_t *head, *tail;
    kvx_gpu_t *gpu;
};

/* ---- receiver -------------------------------------------------------------------------------- */
pds_status_t kvx_stage_rx_register(pds_kvx_t *x, void *const *layer_base)
{
    int L = x->layout.n_layers;
    int device = 0;
    PDS_TRY(kvx_gpu_device_of(layer_base[0], &device));
    PDS_TRY(kvx_gpu_create(device, &x->rx_gpu));
    if (x->p.backend == PDS_KVX_NCCL) {
        x->pool_on_gpu = true; /* pool_base already holds the device bases */
        return PDS_OK;
    }
    size_t layer_bytes = (size_t)pds_kv_layer_bytes(&x->layout);
    x->rx_dev = pds_calloc((size_t)L, sizeof *x->rx_dev);
    if (!x->rx_dev) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx device layer table");
    PDS_TRY(kvx_gpu_host_alloc(layer_bytes * (size_t)L, &x->rx_mirror));
    for (int l = 0; l < L; l++) {
        x->rx_dev[l] = layer_base[l];
        x->pool_base[l] = (uint8_t *)x->rx_mirror + (size_t)l * layer_bytes;
    }
    PDS_LOG_INFO(MOD, "staged_pool role=receiver device=%d mirror_bytes=%zu layers=%d", device,
                 layer_bytes * (size_t)L, L);
    return PDS_OK;
}

pds_status_t kvx_stage_rx_verify(pds_kvx_t *x, pds_kvx_recv_t *r, int *bad_layer, int *bad_index,
                                 uint64_t *got)
{
    int64_t bb = x->block_bytes;
    uint64_t *h = pds_malloc((size_t)r->n_blocks * sizeof *h);
    if (!h) return PDS_ERR(PDS_ERR_NO_MEMORY, "checksums of %d blocks", r->n_blocks);
    pds_status_t s = PDS_OK;
    for (int l = 0; l < r->n_layers && *bad_layer < 0 && s == PDS_OK; l++) {
        if (x->pool_on_gpu) /* NCCL: in the pool */
            s = kvx_gpu_block_sums(x->rx_gpu, x->pool_base[l], bb, r->n_blocks, r->dst_ids, h);
        else if (x->rx_mirror) /* UCX staged: in the pool, after kvx_stage_rx_land */
            s = kvx_gpu_block_sums(x->rx_gpu, x->rx_dev[l], bb, r->n_blocks, r->dst_ids, h);
        else
            kvx_layer_sums(x->pool_base[l], bb, r->n_blocks, r->dst_ids, h);
        for (int i = 0; s == PDS_OK && i < r->n_blocks; i++)
            if (h[i] != r->sums[(int64_t)l * r->n_blocks + i]) {
                *bad_layer = l;
                *bad_index = i;
                *got = h[i];
                break;
            }
    }
    pds_free(h);
    return s;
}

pds_status_t kvx_stage_rx_land(pds_kvx_t *x, pds_kvx_recv_t *r)
{
    for (int l = 0; l < r->n_layers; l++)
        PDS_TRY(kvx_gpu_copy_blocks(x->rx_gpu, x->rx_dev[l], x->pool_base[l], x->block_bytes,
                                    r->n_blocks, r->dst_ids));
    return PDS_OK;
}

/* ---- sender ---------------------------------------------------------------------------------- */
/* One staged layer (staging thread, no lock held on entry or exit). */
static void stage_one(pds_kvx_t *x, kvx_stage_t *st, stage_job_t *j)
{
    pds_kvx_send_t *t = j->t;
    int l = j->layer;
    int64_t bb = t->block_bytes;
    pds_status_t s = t->status; /* read without the lock: only a hint to skip dead work */
    if (s == PDS_OK) s = x->ready(x->ready_ctx, l);
    int64_t t0 = pds_time_now_ns();
    if (!t->t_first_ns) t->t_first_ns = t0; /* only this thread writes it */
    if (s == PDS_OK && x->p.checksum)
        s = kvx_gpu_block_sums(st->gpu, x->src_base[l], bb, t->n_blocks, j->ids,
                               t->sums + (int64_t)l * t->n_blocks);
    if (s == PDS_OK && x->p.backend == PDS_KVX_UCX)
        s = kvx_gpu_copy_blocks(st->gpu, x->src_mirror[l], x->src_base[l], bb, t->n_blocks, j->ids);
    int64_t dt = pds_time_now_ns() - t0;
    char detail[200];
    snprintf(detail, sizeof detail, "%s", s == PDS_OK ? "" : pds_err_detail());

    pthread_mutex_lock(&x->mu);
    if (s == PDS_OK) s = t->status;
    if (s == PDS_OK && x->p.backend == PDS_KVX_UCX) {
        x->stats.stage_ns += dt;
        x->stats.staged_bytes += t->n_blocks * bb;
        const uint8_t *src = x->src_mirror[l];
        for (int i = 0; i < t->n_blocks && s == PDS_OK;) {
            int n = 1;
            while (i + n < t->n_blocks && j->ids[i + n] == j->ids[i] + n &&
                   t->dst_ids[i + n] == t->dst_ids[i] + n)
                n++;
            s = kvx_ucx_send_run(t, l, i, src + (int64_t)j->ids[i] * bb, n);
            i += n;
        }
        kvx_ucx_wake(x);
        if (s != PDS_OK) snprintf(detail, sizeof detail, "%s", pds_err_detail());
    } else if (s == PDS_OK) {
        s = kvx_nccl_send_layer(t, l, x->src_base[l], j->ids);
        if (s != PDS_OK) snprintf(detail, sizeof detail, "%s", pds_err_detail());
    }
    if (s != PDS_OK && t->status == PDS_OK) {
        t->status = s;
        PDS_LOG_WARN(MOD, "stage_failed transfer=%llu layer=%d status=%s detail=\"%s\"",
                     (unsigned long long)t->id, l, pds_status_name(s), detail);
    }
    t->staging--;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

static void *stage_main(void *arg)
{
    pds_kvx_t *x = arg;
    kvx_stage_t *st = x->stage;
    if (kvx_gpu_use(st->gpu) != PDS_OK)
        PDS_LOG_ERROR(MOD, "stage_thread_device detail=\"%s\"", pds_err_detail());
    pthread_mutex_lock(&x->mu);
    for (;;) {
        while (!st->head && !st->stop) pthread_cond_wait(&st->cv, &x->mu);
        if (!st->head) break; /* stop, and nothing left */
        stage_job_t *j = st->head;
        st->head = j->next;
        if (!st->head) st->tail = NULL;
        pthread_mutex_unlock(&x->mu);
        stage_one(x, st, j);
        pds_free(j->ids);
        pds_free(j);
        pthread_mutex_lock(&x->mu);
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

pds_status_t pds_kvx_register_source(pds_kvx_t *x, const pds_kv_layout_t *layout,
                                     void *const *layer_base, pds_kvx_mem_t mem,
                                     pds_kvx_ready_fn ready, void *ctx)
{
    if (!x || !layout || !layer_base) return PDS_ERR(PDS_ERR_INVALID_ARG, "NULL argument");
    if (layout->n_layers <= 0 || layout->n_blocks <= 0 || pds_kv_block_bytes(layout) <= 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "bad source KV layout");
    for (int l = 0; l < layout->n_layers; l++)
        if (!layer_base[l]) return PDS_ERR(PDS_ERR_INVALID_ARG, "layer %d base is NULL", l);
    if (mem != PDS_KVX_MEM_HOST && mem != PDS_KVX_MEM_CUDA)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "unknown memory kind %d", (int)mem);
    if (mem == PDS_KVX_MEM_CUDA && x->p.backend == PDS_KVX_LOOPBACK)
        return PDS_ERR(PDS_ERR_UNSUPPORTED, "loopback kvx moves host memory only");
    if (mem == PDS_KVX_MEM_HOST && x->p.backend == PDS_KVX_NCCL)
        return PDS_ERR(PDS_ERR_UNSUPPORTED,
                       "NCCL sends device memory only; use [kvx] backend = ucx for a host pool");
    if (mem == PDS_KVX_MEM_CUDA && !ready)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "a device source needs a ready callback");
    pthread_mutex_lock(&x->mu);
    bool again = x->have_source;
    pthread_mutex_unlock(&x->mu);
    if (again) return PDS_ERR(PDS_ERR_ALREADY_EXISTS, "kvx already has a registered source");

    int L = layout->n_layers;
    size_t layer_bytes = (size_t)pds_kv_layer_bytes(layout);
    pds_status_t s = PDS_OK;
    kvx_stage_t *st = NULL;
    uint8_t **base = pds_calloc((size_t)L, sizeof *base);
    uint8_t **mirror = NULL;
    void *mirror_mem = NULL;
    if (!base) return PDS_ERR(PDS_ERR_NO_MEMORY, "kvx source table");
    for (int l = 0; l < L; l++) base[l] = layer_base[l];
    if (mem == PDS_KVX_MEM_CUDA) {
        int device = 0;
        st = pds_calloc(1, sizeof *st);
        if (!st) {
            s = PDS_ERR(PDS_ERR_NO_MEMORY, "kvx staging state");
            goto fail;
        }
        if ((s = kvx_gpu_device_of(layer_base[0], &device)) != PDS_OK) goto fail;
        if ((s = kvx_gpu_create(device, &st->gpu)) != PDS_OK) goto fail;
        if (x->p.backend == PDS_KVX_UCX) {
            mirror = pds_calloc((size_t)L, sizeof *mirror);
            if (!mirror) {
                s = PDS_ERR(PDS_ERR_NO_MEMORY, "kvx mirror table");
                goto fail;
            }
            if ((s = kvx_gpu_host_alloc(layer_bytes * (size_t)L, &mirror_mem)) != PDS_OK) goto fail;
            for (int l = 0; l < L; l++) mirror[l] = (uint8_t *)mirror_mem + (size_t)l * layer_bytes;
        }
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_cond_init(&st->cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    pthread_mutex_lock(&x->mu);
    x->have_source = true;
    x->src_mem = mem;
    x->src_layout = *layout;
    x->src_base = base;
    x->src_mirror = mirror;
    x->src_mirror_mem = mirror_mem;
    x->ready = ready;
    x->ready_ctx = ctx;
    x->stage = st;
    pthread_mutex_unlock(&x->mu);
    if (st) {
        if (pthread_create(&st->thread, NULL, stage_main, x) != 0) {
            /* Leave the source registered but unusable: every staged layer fails. */
            return PDS_ERR(PDS_ERR_INTERNAL, "cannot start the kvx staging thread");
        }
        st->started = true;
        PDS_LOG_INFO(MOD, "staged_source backend=%s device=%d mirror_bytes=%zu layers=%d",
                     pds_kvx_backend_name(x->p.backend), kvx_gpu_device(st->gpu),
                     mirror_mem ? layer_bytes * (size_t)L : (size_t)0, L);
    }
    return PDS_OK;

fail:
    kvx_gpu_host_free(mirror_mem);
    pds_free(mirror);
    if (st) kvx_gpu_destroy(st->gpu);
    pds_free(st);
    pds_free(base);
    return s;
}

pds_status_t kvx_stage_send_layer(pds_kvx_send_t *t, int layer, const int32_t *src_ids)
{
    pds_kvx_t *x = t->x;
    kvx_stage_t *st = x->stage;
    stage_job_t *j = pds_calloc(1, sizeof *j);
    int32_t *ids = pds_malloc((size_t)t->n_blocks * sizeof *ids);
    if (!j || !ids || !st || !st->started) {
        pds_free(j);
        pds_free(ids);
        pthread_mutex_lock(&x->mu);
        pds_status_t s = !st || !st->started
                             ? PDS_ERR(PDS_ERR_INTERNAL, "kvx staging thread not running")
                             : PDS_ERR(PDS_ERR_NO_MEMORY, "staging layer %d", layer);
        if (t->status == PDS_OK) t->status = s;
        pthread_mutex_unlock(&x->mu);
        return s;
    }
    memcpy(ids, src_ids, (size_t)t->n_blocks * sizeof *ids);
    j->t = t;
    j->layer = layer;
    j->ids = ids;
    pthread_mutex_lock(&x->mu);
    t->staging++;
    if (st->tail)
        st->tail->next = j;
    else
        st->head = j;
    st->tail = j;
    pthread_cond_signal(&st->cv);
    pds_status_t s = t->status;
    pthread_mutex_unlock(&x->mu);
    return s == PDS_OK ? PDS_OK
                       : PDS_ERR(s, "transfer %llu already failed", (unsigned long long)t->id);
}

pds_status_t kvx_stage_drain(pds_kvx_send_t *t, int64_t deadline_ns)
{
    pds_kvx_t *x = t->x;
    while (t->staging > 0) {
        if (pds_time_now_ns() >= deadline_ns)
            return PDS_ERR(PDS_ERR_TIMEOUT,
                           "transfer %llu: %d layers still staging at the deadline",
                           (unsigned long long)t->id, t->staging);
        kvx_cv_wait_until(x, PDS_MIN(deadline_ns, pds_time_now_ns() + 50000000LL));
    }
    return PDS_OK;
}

void kvx_stage_destroy(pds_kvx_t *x)
{
    kvx_stage_t *st = x->stage;
    if (st && st->started) {
        pthread_mutex_lock(&x->mu);
        st->stop = true;
        pthread_cond_broadcast(&st->cv);
        pthread_mutex_unlock(&x->mu);
        pthread_join(st->thread, NULL);
    }
    if (st) {
        if (st->gpu) pthread_cond_destroy(&st->cv);
        kvx_gpu_destroy(st->gpu);
        pds_free(st);
    }
    x->stage = NULL;
    kvx_gpu_host_free(x->src_mirror_mem);
    x->src_mirror_mem = NULL;
    pds_free(x->src_mirror);
    x->src_mirror = NULL;
    pds_free(x->src_base);
    x->src_base = NULL;
}

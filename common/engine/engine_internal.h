/* engine_internal.h: the backend interface behind engine.h. engine.c (backend-neutral) owns
 * parameter defaults, input validation, the KV block manager, export sizing and the reference
 * generator; a backend (cpu/, cuda/) owns weights, the KV pool memory and the forward pass.
 *
 * A backend's init fills e->ops and e->impl, sets e->info fields it knows (device_name, kv
 * elem_size/dtype, weight/kv/workspace bytes) and e->kv.n_blocks if the pool size is derived from
 * memory (engine.c then creates the block manager). Weights come from `model` if non-NULL, else
 * synthetically from (e->cfg, seed) via pds_model_synth_value rounded to e->cfg.dtype.
 */
#ifndef PDS_ENGINE_INTERNAL_H
#define PDS_ENGINE_INTERNAL_H

#include "engine/engine.h"

typedef struct {
    const char *name;
    void (*destroy)(pds_engine_t *e); /* frees e->impl and everything it owns */
    /* Inputs already validated by engine.c: ids in range, tables grown, limits respected. */
    pds_status_t (*forward)(pds_engine_t *e, pds_engine_seq_t *seqs, int n_seqs,
                            pds_engine_layer_fn on_layer, void *ctx);
    pds_status_t (*layer_wait)(pds_engine_t *e, int layer);
    /* Copy n block ids of one layer between the pool and host memory laid out as consecutive
     * blocks in `dtype` (conversion done by the backend). */
    pds_status_t (*kv_copy_out)(pds_engine_t *e, int layer, int n, const int32_t *ids,
                                pds_dtype_t dtype, void *dst);
    pds_status_t (*kv_copy_in)(pds_engine_t *e, int layer, int n, const int32_t *ids,
                               pds_dtype_t dtype, const void *src);
    pds_status_t (*kv_layer_memory)(pds_engine_t *e, int layer, void **base, size_t *bytes,
                                    bool *on_device);
} pds_engine_ops_t;

struct pds_engine {
    const pds_engine_ops_t *ops;
    void *impl;
    pds_engine_params_t params;
    pds_model_config_t cfg;
    pds_kv_layout_t kv; /* n_blocks set before or by the backend's init */
    pds_kv_pool_t *pool;
    pds_engine_info_t info;
};

/* Backend constructors, called by engine.c with e->params, e->cfg and e->kv (n_blocks may be 0 =
 * "size it from memory") filled in. On failure they free what they made and leave e->impl NULL. */
pds_status_t pds_engine_cpu_init(pds_engine_t *e, const pds_model_t *model, uint64_t seed);
#ifdef PDS_HAVE_CUDA
pds_status_t pds_engine_cuda_init(pds_engine_t *e, const pds_model_t *model, uint64_t seed);
bool pds_engine_cuda_probe(char *why, size_t why_cap);
#endif

#endif /* PDS_ENGINE_INTERNAL_H */

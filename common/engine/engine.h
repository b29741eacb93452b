/* engine: runs the model — batched prefill and decode over sequences whose KV cache lives in the
 * engine's paged pool — behind one API with two backends: CPU (the fp32 reference that every test
 * trusts) and CUDA (bf16, kernels in engine/cuda/). A forward over a batch mixes sequences of any
 * lengths: each entry computes `n_tokens` new tokens after the ones already in its KV (chunked
 * prefill, recompute and decode are all the same call); decode is the n_tokens == 1 case.
 *
 * The disaggregation seams: a per-layer hook during forward (the KV transfer sends layer l while
 * l+1 computes), and export/import of a sequence's KV blocks in the layout of kv/kv.h.
 *
 * Threads: an engine is owned by one thread (a node's engine loop); every call except
 * pds_engine_layer_wait comes from it. The caller owns the block tables (pds_kv_seq_t) and grows
 * them with pds_kv_seq_grow(pds_engine_kv_pool(e), ...) before a forward.
 */
#ifndef PDS_ENGINE_H
#define PDS_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "kv/kv.h"
#include "model/model.h"
#include "sample/sample.h"

typedef enum { PDS_ENGINE_CPU = 0, PDS_ENGINE_CUDA } pds_engine_backend_t;

typedef struct {
    pds_engine_backend_t backend;
    int block_size;        /* tokens per KV block; default 16 */
    int n_kv_blocks;       /* pool size in blocks; 0 = from kv_tokens, else from memory */
    int64_t kv_tokens;     /* pool size in tokens when n_kv_blocks == 0; 0 = derive from memory */
    float kv_mem_fraction; /* CUDA: fraction of free GPU memory after weights for the pool (0.9) */
    int max_batch_tokens;  /* most new tokens in one forward (default 8192) */
    int max_batch_seqs;    /* most sequences in one forward (default 256) */
    int n_threads;         /* CPU: worker threads, 0 = online cores */
    int device;            /* CUDA: device ordinal */
} pds_engine_params_t;

pds_engine_params_t pds_engine_default_params(void);
/* True if this build has the CUDA backend and a usable GPU is present (reason written if not). */
bool pds_engine_cuda_available(char *why, size_t why_cap);

typedef struct pds_engine pds_engine_t;

/* Weights from a loaded model (which must outlive the engine only during create: the engine keeps
 * its own converted copy). */
pds_status_t pds_engine_create(const pds_model_t *model, const pds_engine_params_t *p,
                               pds_engine_t **out);
/* Synthetic weights from (cfg, seed), bit-identical to pds_model_synth_write + load with the same
 * cfg->dtype rounding: the GPU path generates them on the device (no file for 8B/70B shapes). */
pds_status_t pds_engine_create_synth(const pds_model_config_t *cfg, uint64_t seed,
                                     const pds_engine_params_t *p, pds_engine_t **out);
void pds_engine_destroy(pds_engine_t *e); /* accepts NULL */

typedef struct {
    pds_engine_backend_t backend;
    char device_name[96];
    pds_model_config_t model;
    pds_kv_layout_t kv; /* elem_size 4 on CPU (fp32), 2 on CUDA (bf16) */
    pds_dtype_t kv_dtype;
    int64_t kv_tokens;    /* n_blocks * block_size */
    int64_t weight_bytes; /* in the backend's memory */
    int64_t kv_bytes;     /* whole pool */
    int64_t workspace_bytes;
    int max_batch_tokens, max_batch_seqs;
} pds_engine_info_t;
void pds_engine_info(const pds_engine_t *e, pds_engine_info_t *out);
pds_kv_pool_t *pds_engine_kv_pool(pds_engine_t *e);

/* One sequence of a forward batch. On entry kv->n_tokens counts the tokens already cached plus the
 * n_tokens new ones (the caller grew it), so positions run n_past = kv->n_tokens - n_tokens ..
 * kv->n_tokens - 1. Outputs, each optional (NULL = not wanted), are for the last new token:
 * logits [vocab] fp32, and, if `sample` is set, the token sampled at position kv->n_tokens. */
typedef struct {
    const int32_t *tokens;
    int n_tokens;
    pds_kv_seq_t *kv;
    float *logits;
    const pds_sample_params_t *sample;
    int32_t *token_out;
} pds_engine_seq_t;

/* Called once per layer after that layer's K/V of every batch sequence has been written to the
 * pool (CPU: synchronously; CUDA: after the layer's work is enqueued and its event recorded —
 * call pds_engine_layer_wait before reading the KV from another thread or stream). */
typedef void (*pds_engine_layer_fn)(void *ctx, int layer);

/* Runs the batch. PDS_ERR_INVALID_ARG (nothing computed) for bad token ids, empty entries, a KV
 * table too small, context beyond max_context, or more than max_batch_tokens / _seqs. */
pds_status_t pds_engine_forward(pds_engine_t *e, pds_engine_seq_t *seqs, int n_seqs,
                                pds_engine_layer_fn on_layer, void *ctx);
/* Blocks until `layer` of the latest forward has finished on the device (no-op on CPU).
 * Thread-safe. */
pds_status_t pds_engine_layer_wait(pds_engine_t *e, int layer);

/* ---- KV export/import: the disaggregation seam --------------------------------------------------
 * A sequence's KV as bytes, layer-major: for layer 0..L-1, its blocks in table order, each block
 * in the layout of kv/kv.h, elements converted to `dtype` (F32 or BF16). Only the first n_tokens'
 * slots are meaningful. The same bytes imported into another engine's freshly grown table (same
 * model, block size and n_tokens) continue the sequence identically. */
size_t pds_engine_kv_export_bytes(const pds_engine_t *e, int n_blocks, pds_dtype_t dtype);
pds_status_t pds_engine_kv_export(pds_engine_t *e, const pds_kv_seq_t *seq, pds_dtype_t dtype,
                                  void *dst, size_t cap);
pds_status_t pds_engine_kv_import(pds_engine_t *e, const pds_kv_seq_t *seq, pds_dtype_t dtype,
                                  const void *src, size_t size);
/* Base address and byte size of one layer's block array in the pool (host memory on CPU, device
 * memory on CUDA) — what a transport registers to put KV straight into reserved blocks. */
pds_status_t pds_engine_kv_layer_memory(pds_engine_t *e, int layer, void **base, size_t *bytes,
                                        bool *on_device);

/* ---- the single-process reference generator ----------------------------------------------------
 */
typedef enum {
    PDS_FINISH_NONE = 0,
    PDS_FINISH_LENGTH, /* max_new_tokens reached */
    PDS_FINISH_STOP,   /* a stop token (or EOS) was produced; it is included in the output */
    PDS_FINISH_CONTEXT /* the model's context is full */
} pds_finish_reason_t;
const char *pds_finish_reason_name(pds_finish_reason_t r); /* "length", "stop", "context" */

typedef struct {
    const int32_t *prompt;
    int n_prompt;
    int max_new_tokens;
    pds_sample_params_t sample;
    const int32_t *stop; /* extra stop ids */
    int n_stop;
    bool ignore_eos; /* keep going past EOS (load replay forces output lengths) */
} pds_gen_request_t;

/* Prefills the prompt, then decodes one token per step, sampling the token at absolute position
 * n_prompt + k for output k, until a stop/EOS, max_new_tokens or the context limit. Writes up to
 * max_new_tokens ids to out. Frees its KV blocks before returning. on_token (optional) sees each
 * token as it is produced. */
typedef void (*pds_engine_token_fn)(void *ctx, int32_t token, int index);
pds_status_t pds_engine_generate(pds_engine_t *e, const pds_gen_request_t *req, int32_t *out,
                                 int *n_out, pds_finish_reason_t *why, pds_engine_token_fn on_token,
                                 void *ctx);

#endif /* PDS_ENGINE_H */

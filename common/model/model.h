/* model: a Llama-family model — its configuration (Hugging Face config.json), its weights
 * (.safetensors, mmap'ed, bf16/fp16/fp32, single file or sharded with
 * model.safetensors.index.json), the built-in presets, and a seeded synthetic-weight generator.
 *
 * Synthetic weights are a pure function of (seed, tensor index, element index) — see
 * pds_model_synth_value() — so the CPU generator that writes files, and a GPU kernel that fills
 * device memory for the 8B/70B shapes without any file, produce the same numbers.
 *
 * Ownership: pds_model_t owns its mappings; tensor views point into them and live as long as the
 * model. A model is immutable after load and may be read from any thread.
 */
#ifndef PDS_MODEL_H
#define PDS_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

typedef enum { PDS_DTYPE_F32 = 0, PDS_DTYPE_F16, PDS_DTYPE_BF16 } pds_dtype_t;
size_t pds_dtype_size(pds_dtype_t t);
const char *pds_dtype_name(pds_dtype_t t); /* "F32", "F16", "BF16" (safetensors spelling) */

typedef enum { PDS_ROPE_SCALING_NONE = 0, PDS_ROPE_SCALING_LLAMA3 } pds_rope_scaling_t;

typedef struct {
    char name[64];    /* preset or directory name, informational */
    int n_layers;     /* num_hidden_layers */
    int hidden;       /* hidden_size */
    int n_heads;      /* num_attention_heads */
    int n_kv_heads;   /* num_key_value_heads (GQA) */
    int head_dim;     /* head_dim, default hidden / n_heads */
    int ffn;          /* intermediate_size */
    int vocab;        /* vocab_size */
    int max_context;  /* max_position_embeddings */
    float rope_theta; /* rope_theta */
    pds_rope_scaling_t rope_scaling;
    float rope_factor;           /* rope_scaling.factor */
    float rope_low_freq_factor;  /* rope_scaling.low_freq_factor */
    float rope_high_freq_factor; /* rope_scaling.high_freq_factor */
    int rope_original_max_pos;   /* rope_scaling.original_max_position_embeddings */
    float norm_eps;              /* rms_norm_eps */
    bool tied_embeddings;        /* tie_word_embeddings */
    int bos_id, eos_id;          /* bos_token_id, eos_token_id */
    pds_dtype_t dtype;           /* torch_dtype: dtype of the stored weights */
} pds_model_config_t;

/* Presets: "tiny" (tests), "small" (~25M parameters, CPU demo), and the real shapes of
 * "llama3-8b", "llama2-7b", "llama3-70b". PDS_ERR_NOT_FOUND for any other name. */
pds_status_t pds_model_preset(const char *name, pds_model_config_t *out);
/* NULL-terminated list of preset names. */
const char *const *pds_model_preset_names(void);
/* Checks internal consistency (positive sizes, heads divisible, ...); else PDS_ERR_INVALID_ARG. */
pds_status_t pds_model_config_validate(const pds_model_config_t *cfg);
/* Parameter count of the model the config describes. */
int64_t pds_model_config_param_count(const pds_model_config_t *cfg);

/* RoPE inverse frequencies for the head_dim/2 rotary pairs, with Llama-3 frequency scaling when
 * configured (transformers' _compute_llama3_parameters, in fp32). Every backend uses this one
 * definition so that CPU and GPU rotate identically. inv_freq: (head_dim / 2) floats. */
void pds_model_rope_inv_freq(const pds_model_config_t *cfg, float *inv_freq);

/* config.json <-> struct. Parse errors name the file and the key (PDS_ERR_PARSE / _INVALID_ARG;
 * PDS_ERR_UNSUPPORTED for rope scaling other than llama3, activations other than silu, biases, or a
 * torch_dtype other than bfloat16/float16/float32). Hugging Face defaults apply to absent optional
 * keys (num_key_value_heads = heads, head_dim = hidden/heads, rope_theta 10000, rms_norm_eps 1e-6,
 * untied, bos 1, eos 2, max_position_embeddings 2048); absent torch_dtype means bfloat16;
 * eos_token_id may be a list (the first is taken); a null token id becomes -1. cfg->name is the
 * config's directory name. Save then load gives back the same struct, name aside. */
pds_status_t pds_model_config_load(const char *path, pds_model_config_t *out);
pds_status_t pds_model_config_save(const pds_model_config_t *cfg, const char *path);

/* A tensor as stored: shape is row-major, shape[0] outermost; data points into the mapping. */
typedef struct {
    const void *data;
    pds_dtype_t dtype;
    int ndim;
    int64_t shape[4];
    int64_t numel;
} pds_tensor_view_t;

/* The weights of one decoder layer, HF Llama names and shapes ([out, in] for linear layers):
 * model.layers.N.input_layernorm.weight [hidden], self_attn.{q,k,v,o}_proj.weight,
 * post_attention_layernorm.weight, mlp.{gate,up,down}_proj.weight. */
typedef struct {
    pds_tensor_view_t attn_norm; /* [hidden] */
    pds_tensor_view_t wq;        /* [n_heads*head_dim, hidden] */
    pds_tensor_view_t wk;        /* [n_kv_heads*head_dim, hidden] */
    pds_tensor_view_t wv;        /* [n_kv_heads*head_dim, hidden] */
    pds_tensor_view_t wo;        /* [hidden, n_heads*head_dim] */
    pds_tensor_view_t ffn_norm;  /* [hidden] */
    pds_tensor_view_t w_gate;    /* [ffn, hidden] */
    pds_tensor_view_t w_up;      /* [ffn, hidden] */
    pds_tensor_view_t w_down;    /* [hidden, ffn] */
} pds_layer_weights_t;

typedef struct pds_model pds_model_t;

/* Loads dir/config.json and dir/model.safetensors (or the shards listed in
 * dir/model.safetensors.index.json). Every malformed case is its own clear error naming the file
 * (and tensor): bad header length, bad header JSON, missing tensor, wrong shape, wrong/unknown
 * dtype, offsets past the end of the file or overlapping. model.safetensors wins if both exist.
 * Each bound tensor may be BF16, F16 or F32 independently of cfg.dtype (consumers convert, e.g.
 * with pds_tensor_to_f32); other dtypes are PDS_ERR_UNSUPPORTED for tensors the config needs and
 * ignored elsewhere. Bound views are aligned to their element size. Statuses: PDS_ERR_PARSE for a
 * malformed file, PDS_ERR_NOT_FOUND for a missing file or tensor, PDS_ERR_INVALID_ARG for a shape
 * that disagrees with the config, PDS_ERR_UNSUPPORTED, PDS_ERR_IO, PDS_ERR_NO_MEMORY. */
pds_status_t pds_model_load(const char *dir, pds_model_t **out);
void pds_model_destroy(pds_model_t *m); /* accepts NULL */

const pds_model_config_t *pds_model_config(const pds_model_t *m);
const pds_tensor_view_t *pds_model_embed(const pds_model_t *m);      /* [vocab, hidden] */
const pds_tensor_view_t *pds_model_final_norm(const pds_model_t *m); /* [hidden] */
/* [vocab, hidden]; the embedding itself (same data pointer) if tied */
const pds_tensor_view_t *pds_model_lm_head(const pds_model_t *m);
const pds_layer_weights_t *pds_model_layer(const pds_model_t *m, int layer);
/* Any tensor by its safetensors name; PDS_ERR_NOT_FOUND if absent. */
pds_status_t pds_model_tensor(const pds_model_t *m, const char *name, pds_tensor_view_t *out);

/* Converts n elements of a view to fp32 (bf16/fp16 widened exactly). */
void pds_tensor_to_f32(const pds_tensor_view_t *t, int64_t offset, int64_t n, float *dst);
float pds_bf16_to_f32(uint16_t h);
uint16_t pds_f32_to_bf16(float f); /* round to nearest even; NaN stays NaN */
float pds_f16_to_f32(uint16_t h);
uint16_t pds_f32_to_f16(float f);

/* ---- synthetic weights ------------------------------------------------------------------------
 * Tensor indices: 0 embed, 1 final norm, 2 lm_head, then 3 + 9*layer + k with k in the order of
 * pds_layer_weights_t. Indices are stable whatever the config: the count is always 3 + 9*layers,
 * and when embeddings are tied index 2 stays unused (info(2) returns PDS_ERR_NOT_FOUND). Norm
 * weights are 1 + small noise; matrices are uniform in ±scale with scale = 1/sqrt(fan_in) where
 * fan_in = shape[1], so activations stay O(1) through any depth; the embedding (looked up, not
 * multiplied) uses scale 1. Values written to a file are pds_model_synth_value rounded to the
 * file's dtype (pds_f32_to_bf16 / pds_f32_to_f16, i.e. round to nearest even). Inline and free
 * of globals so a CUDA kernel can include it (compile with __CUDACC__ defining PDS_HD). */
#ifndef PDS_HD
#ifdef __CUDACC__
#define PDS_HD __host__ __device__
#else
#define PDS_HD
#endif
#endif
static inline PDS_HD float pds_model_synth_value(uint64_t seed, int tensor, int64_t i, float scale,
                                                 int is_norm)
{
    uint64_t x =
        seed * 0x9e3779b97f4a7c15ULL + (uint64_t)tensor * 0xd1b54a32d192ed03ULL + (uint64_t)i;
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    x ^= x >> 31;
    float u = (float)(x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f; /* [-1, 1) */
    return is_norm ? 1.0f + 0.1f * u : scale * u;
}
/* Tensor count (3 + 9*layers) and, for tensor index t, its HF name (written into name), shape
 * (ndim 1 for norms with shape[1] = 0, else 2), scale and norm flag; outputs are written only on
 * success. PDS_ERR_NOT_FOUND for t == 2 with tied embeddings, PDS_ERR_OUT_OF_RANGE outside
 * [0, count), PDS_ERR_INVALID_ARG if name_cap is too small. The loader binds against this list. */
int pds_model_synth_tensor_count(const pds_model_config_t *cfg);
pds_status_t pds_model_synth_tensor_info(const pds_model_config_t *cfg, int t, char *name,
                                         size_t name_cap, int64_t shape[2], int *ndim, float *scale,
                                         int *is_norm);
/* Writes dir/config.json + dir/model.safetensors (cfg->dtype) with synthetic weights from seed.
 * Creates dir if needed. Values are rounded to the file's dtype. */
pds_status_t pds_model_synth_write(const pds_model_config_t *cfg, uint64_t seed, const char *dir);

#endif /* PDS_MODEL_H */

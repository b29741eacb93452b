/* kv: the paged KV cache's block manager and the one definition of its memory layout.
 *
 * Layout (shared by the CPU engine, the CUDA kernels, the KV transfer and the tests): one pool per
 * node; for each layer a contiguous array of n_blocks blocks; a block holds K then V for
 * block_size tokens of all KV heads:
 *     pool[layer] : (n_blocks, 2, block_size, n_kv_heads, head_dim)  elem = fp32 (CPU) / bf16 (GPU)
 * so element (layer, block, kv, slot, head, d) sits at pds_kv_layout_offset(). A sequence whose
 * blocks are consecutive ids has, per layer, one contiguous byte range: the transfer sends it as
 * one message. The pool therefore hands out consecutive runs when it can (best-fit over free runs).
 *
 * The block manager holds only ids, reference counts and reservations; the memory itself belongs
 * to the engine backend (host or device). Not thread-safe: its owner (the engine loop thread of a
 * node) is the only caller.
 */
#ifndef PDS_KV_H
#define PDS_KV_H

#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

#define PDS_KV_DEFAULT_BLOCK_SIZE 16

typedef struct {
    int n_layers;
    int n_blocks;   /* blocks per layer (the pool size) */
    int block_size; /* tokens per block */
    int n_kv_heads;
    int head_dim;
    int elem_size; /* bytes per element: 4 (fp32) or 2 (bf16) */
} pds_kv_layout_t;

/* Elements in one (layer, block): 2 * block_size * n_kv_heads * head_dim. */
static inline int64_t pds_kv_block_elems(const pds_kv_layout_t *l)
{
    return 2LL * l->block_size * l->n_kv_heads * l->head_dim;
}
static inline int64_t pds_kv_block_bytes(const pds_kv_layout_t *l)
{
    return pds_kv_block_elems(l) * l->elem_size;
}
static inline int64_t pds_kv_layer_bytes(const pds_kv_layout_t *l)
{
    return pds_kv_block_bytes(l) * l->n_blocks;
}
/* Element offset within one layer's array; kv: 0 = K, 1 = V; slot: token index in the block. */
static inline int64_t pds_kv_layout_offset(const pds_kv_layout_t *l, int block, int kv, int slot,
                                           int head, int d)
{
    return (((int64_t)block * 2 + kv) * l->block_size + slot) *
               ((int64_t)l->n_kv_heads * l->head_dim) +
           (int64_t)head * l->head_dim + d;
}

/* ---- block manager ----------------------------------------------------------------------------
 */
typedef struct pds_kv_pool pds_kv_pool_t;

pds_status_t pds_kv_pool_create(int n_blocks, pds_kv_pool_t **out);
void pds_kv_pool_destroy(pds_kv_pool_t *p); /* accepts NULL */

int pds_kv_pool_total(const pds_kv_pool_t *p);
/* Blocks neither allocated nor reserved. */
int pds_kv_pool_free_count(const pds_kv_pool_t *p);
/* Blocks held back by reservations (not yet allocated from them). */
int pds_kv_pool_reserved_count(const pds_kv_pool_t *p);

/* Allocates n blocks (refcount 1) into ids[0..n), consecutive where possible. On failure nothing
 * is allocated and PDS_ERR_EXHAUSTED is returned. If `resv` is non-NULL the blocks come out of that
 * reservation first (it must hold at least n), so a reservation made at admission always succeeds.
 */
typedef struct pds_kv_resv pds_kv_resv_t;
pds_status_t pds_kv_pool_alloc(pds_kv_pool_t *p, int n, pds_kv_resv_t *resv, int32_t *ids);
/* Adds a reference to each block (prefix sharing). */
pds_status_t pds_kv_pool_ref(pds_kv_pool_t *p, int n, const int32_t *ids);
/* Drops one reference from each block; a block at zero becomes free. PDS_ERR_INVALID_ARG (and no
 * change at all) if any id is out of range or not allocated. */
pds_status_t pds_kv_pool_free(pds_kv_pool_t *p, int n, const int32_t *ids);
int pds_kv_pool_refcount(const pds_kv_pool_t *p, int32_t id);

/* Reservations set aside a count of blocks without choosing them yet (a decode node reserves the
 * growth room of a sequence when it admits it). Releasing returns what was not allocated. */
pds_status_t pds_kv_pool_reserve(pds_kv_pool_t *p, int n, pds_kv_resv_t **out);
int pds_kv_resv_remaining(const pds_kv_resv_t *r);
void pds_kv_pool_release(pds_kv_pool_t *p, pds_kv_resv_t *r); /* accepts NULL */

/* ---- per-sequence block table ------------------------------------------------------------------
 */
typedef struct {
    int n_tokens; /* tokens whose K/V are (or are about to be) in the blocks */
    int n_blocks;
    int cap;
    int32_t *blocks; /* block ids in token order; token t lives in blocks[t / block_size] */
} pds_kv_seq_t;

void pds_kv_seq_init(pds_kv_seq_t *s);
/* Grows the table so that n_tokens + n_new tokens fit, allocating blocks from the pool (from resv
 * first if given) and then sets n_tokens += n_new. On failure nothing changes. */
pds_status_t pds_kv_seq_grow(pds_kv_seq_t *s, pds_kv_pool_t *p, int block_size, int n_new,
                             pds_kv_resv_t *resv);
/* Uses exactly the given ids (e.g. blocks reserved by a transfer) for a sequence of n_tokens;
 * takes ownership of one reference of each. */
pds_status_t pds_kv_seq_adopt(pds_kv_seq_t *s, int n_ids, const int32_t *ids, int n_tokens);
/* Frees all blocks back to the pool and empties the table (keeps it usable). */
void pds_kv_seq_release(pds_kv_seq_t *s, pds_kv_pool_t *p);
/* Releases the table's own memory (call after pds_kv_seq_release). */
void pds_kv_seq_fini(pds_kv_seq_t *s);

/* Number of maximal runs of consecutive ids in ids[0..n) (1 = one contiguous range per layer). */
int pds_kv_ids_runs(int n, const int32_t *ids);

#endif /* PDS_KV_H */

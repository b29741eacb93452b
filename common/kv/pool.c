/* pool.c: the KV block manager — ids, reference counts and reservations over a fixed pool.
 *
 * Free blocks are a bitmap (bit set = free), scanned a 64-bit word at a time with ctz, so finding
 * the free runs of a 100k-block pool costs ~1.6k word reads and no allocation. An allocation of n
 * blocks takes the smallest free run that holds all n (best fit, which keeps the large runs for
 * large prompts); when no single run is large enough it takes the largest runs whole, then
 * best-fits the rest, so the result has as few runs as a greedy choice can give. The trade-off is
 * a scan per allocation instead of a run tree: O(n_blocks / 64) words, cheap next to a forward
 * pass, and the bitmap is trivially consistent with the refcounts.
 *
 * Reservations are only counts: they hold blocks back from unreserved allocation without choosing
 * which, so a reservation never fragments the pool. The invariant is
 *     free_bits == n_free,   n_free >= reserved,   free_count() == n_free - reserved.
 * Each live reservation is on a list owned by the pool, so destroying the pool frees any left.
 */
#include "kv/kv.h"

#include <string.h>

struct pds_kv_resv {
    pds_kv_pool_t *pool;
    int remaining;
    pds_kv_resv_t *prev, *next;
};

struct pds_kv_pool {
    int n_blocks;
    int n_free;          /* blocks with refcount 0 (bits set) */
    int reserved;        /* sum of live reservations' remaining */
    int32_t *refs;       /* (n_blocks) refcount per block */
    uint64_t *free_bits; /* (DIV_UP(n_blocks, 64)) bit set = free; bits past n_blocks are 0 */
    pds_kv_resv_t *resv_head;
};

pds_status_t pds_kv_pool_create(int n_blocks, pds_kv_pool_t **out)
{
    if (n_blocks <= 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv pool: n_blocks %d <= 0", n_blocks);
    pds_kv_pool_t *p = pds_calloc(1, sizeof(*p));
    if (!p) goto fail_pool;
    int n_words = PDS_DIV_UP(n_blocks, 64);
    p->refs = pds_calloc((size_t)n_blocks, sizeof(*p->refs));
    if (!p->refs) goto fail_refs;
    p->free_bits = pds_calloc((size_t)n_words, sizeof(*p->free_bits));
    if (!p->free_bits) goto fail_bits;
    for (int w = 0; w < n_words; w++) {
        int bits = PDS_MIN(64, n_blocks - w * 64);
        p->free_bits[w] = bits == 64 ? ~0ULL : (1ULL << bits) - 1;
    }
    p->n_blocks = n_blocks;
    p->n_free = n_blocks;
    *out = p;
    return PDS_OK;

fail_bits:
    pds_free(p->refs);
fail_refs:
    pds_free(p);
fail_pool:
    return PDS_ERR(PDS_ERR_NO_MEMORY, "kv pool: cannot allocate %d blocks' bookkeeping", n_blocks);
}

void pds_kv_pool_destroy(pds_kv_pool_t *p)
{
    if (!p) return;
    for (pds_kv_resv_t *r = p->resv_head, *next; r; r = next) {
        next = r->next;
        pds_free(r);
    }
    pds_free(p->free_bits);
    pds_free(p->refs);
    pds_free(p);
}

int pds_kv_pool_total(const pds_kv_pool_t *p)
{
    return p->n_blocks;
}

int pds_kv_pool_free_count(const pds_kv_pool_t *p)
{
    return p->n_free - p->reserved;
}

int pds_kv_pool_reserved_count(const pds_kv_pool_t *p)
{
    return p->reserved;
}

/* Refcount of id; 0 for a free block, -1 for an id outside the pool. */
int pds_kv_pool_refcount(const pds_kv_pool_t *p, int32_t id)
{
    if (id < 0 || id >= p->n_blocks) return -1;
    return p->refs[id];
}

/* ---- bitmap scanning --------------------------------------------------------------------------
 */
static bool bit_get(const uint64_t *bm, int i)
{
    return (bm[i >> 6] >> (i & 63)) & 1;
}

/* First index >= from whose bit equals `want`, or n if none. */
static int bit_next(const uint64_t *bm, int from, int n, bool want)
{
    if (from >= n) return n;
    int w = from >> 6;
    uint64_t word = want ? bm[w] : ~bm[w];
    word &= ~0ULL << (from & 63);
    int n_words = PDS_DIV_UP(n, 64);
    while (!word) {
        if (++w >= n_words) return n;
        word = want ? bm[w] : ~bm[w];
    }
    int i = (w << 6) + __builtin_ctzll(word);
    return PDS_MIN(i, n);
}

/* Marks [start, start+len) allocated with refcount 1 and appends the ids to out. */
static void take_run(pds_kv_pool_t *p, int start, int len, int32_t *out)
{
    for (int i = 0; i < len; i++) {
        int id = start + i;
        PDS_ASSERT(bit_get(p->free_bits, id) && p->refs[id] == 0);
        p->free_bits[id >> 6] &= ~(1ULL << (id & 63));
        p->refs[id] = 1;
        out[i] = id;
    }
    p->n_free -= len;
}

/* Fills ids[0..n) from free blocks; the caller has checked n <= n_free. hint >= 0: if the n blocks
 * starting at hint are all free, take exactly those (a growing sequence stays one run). */
static void alloc_ids(pds_kv_pool_t *p, int n, int hint, int32_t *ids)
{
    if (hint >= 0 && hint + n <= p->n_blocks &&
        bit_next(p->free_bits, hint, p->n_blocks, false) >= hint + n) {
        take_run(p, hint, n, ids);
        return;
    }
    int done = 0;
    while (done < n) {
        int need = n - done;
        int best_start = -1, best_len = 0;       /* smallest run >= need */
        int largest_start = -1, largest_len = 0; /* largest run overall */
        for (int s = bit_next(p->free_bits, 0, p->n_blocks, true); s < p->n_blocks;) {
            int e = bit_next(p->free_bits, s, p->n_blocks, false);
            int len = e - s;
            if (len >= need && (best_start < 0 || len < best_len)) {
                best_start = s;
                best_len = len;
                if (len == need) break; /* exact fit: nothing beats it */
            }
            if (len > largest_len) {
                largest_start = s;
                largest_len = len;
            }
            s = bit_next(p->free_bits, e, p->n_blocks, true);
        }
        if (best_start >= 0) {
            take_run(p, best_start, need, ids + done);
            done += need;
        } else {
            PDS_ASSERT(largest_len > 0); /* the caller checked n <= n_free */
            take_run(p, largest_start, largest_len, ids + done);
            done += largest_len;
        }
    }
}

static pds_status_t pool_alloc(pds_kv_pool_t *p, int n, pds_kv_resv_t *resv, int hint, int32_t *ids)
{
    if (n < 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv alloc: n %d < 0", n);
    if (n > 0 && !ids) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv alloc: ids is NULL");
    if (resv && resv->pool != p)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv alloc: reservation belongs to another pool");
    /* From the reservation first, the rest from unreserved free blocks. */
    int from_resv = resv ? PDS_MIN(n, resv->remaining) : 0;
    int from_free = n - from_resv;
    if (from_free > p->n_free - p->reserved)
        return PDS_ERR(PDS_ERR_EXHAUSTED,
                       "kv alloc: %d blocks wanted, %d from reservation, %d free unreserved", n,
                       from_resv, p->n_free - p->reserved);
    if (n == 0) return PDS_OK;
    if (resv) {
        resv->remaining -= from_resv;
        p->reserved -= from_resv;
    }
    alloc_ids(p, n, hint, ids);
    return PDS_OK;
}

pds_status_t pds_kv_pool_alloc(pds_kv_pool_t *p, int n, pds_kv_resv_t *resv, int32_t *ids)
{
    return pool_alloc(p, n, resv, -1, ids);
}

pds_status_t pds_kv_pool_ref(pds_kv_pool_t *p, int n, const int32_t *ids)
{
    if (n < 0 || (n > 0 && !ids)) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv ref: bad n %d / ids", n);
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= p->n_blocks)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "kv ref: ids[%d] = %d outside pool of %d", i, id,
                           p->n_blocks);
        if (p->refs[id] == 0)
            return PDS_ERR(PDS_ERR_INVALID_ARG, "kv ref: ids[%d] = %d is not allocated", i, id);
    }
    /* Checked before any change; a duplicate id gets one reference per occurrence. */
    for (int i = 0; i < n; i++) {
        if (p->refs[ids[i]] == INT32_MAX) {
            for (int j = 0; j < i; j++) p->refs[ids[j]]--;
            return PDS_ERR(PDS_ERR_OUT_OF_RANGE, "kv ref: block %d refcount overflow", ids[i]);
        }
        p->refs[ids[i]]++;
    }
    return PDS_OK;
}

pds_status_t pds_kv_pool_free(pds_kv_pool_t *p, int n, const int32_t *ids)
{
    if (n < 0 || (n > 0 && !ids)) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv free: bad n %d / ids", n);
    /* Drop references first, undoing them if any id turns out invalid (including an id listed
     * more times than it has references), and only then return zeroed blocks to the bitmap. */
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        bool bad_range = id < 0 || id >= p->n_blocks;
        if (bad_range || p->refs[id] == 0) {
            for (int j = 0; j < i; j++) p->refs[ids[j]]++;
            if (bad_range)
                return PDS_ERR(PDS_ERR_INVALID_ARG, "kv free: ids[%d] = %d outside pool of %d", i,
                               id, p->n_blocks);
            return PDS_ERR(PDS_ERR_INVALID_ARG, "kv free: ids[%d] = %d is not allocated", i, id);
        }
        p->refs[id]--;
    }
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (p->refs[id] == 0 && !bit_get(p->free_bits, id)) {
            p->free_bits[id >> 6] |= 1ULL << (id & 63);
            p->n_free++;
        }
    }
    return PDS_OK;
}

pds_status_t pds_kv_pool_reserve(pds_kv_pool_t *p, int n, pds_kv_resv_t **out)
{
    if (n < 0) return PDS_ERR(PDS_ERR_INVALID_ARG, "kv reserve: n %d < 0", n);
    if (n > p->n_free - p->reserved)
        return PDS_ERR(PDS_ERR_EXHAUSTED, "kv reserve: %d blocks wanted, %d free unreserved", n,
                       p->n_free - p->reserved);
    pds_kv_resv_t *r = pds_calloc(1, sizeof(*r));
    if (!r) return PDS_ERR(PDS_ERR_NO_MEMORY, "kv reserve: no memory for the reservation");
    r->pool = p;
    r->remaining = n;
    r->next = p->resv_head;
    if (p->resv_head) p->resv_head->prev = r;
    p->resv_head = r;
    p->reserved += n;
    *out = r;
    return PDS_OK;
}

int pds_kv_resv_remaining(const pds_kv_resv_t *r)
{
    return r ? r->remaining : 0;
}

void pds_kv_pool_release(pds_kv_pool_t *p, pds_kv_resv_t *r)
{
    if (!r) return;
    PDS_ASSERT(r->pool == p);
    p->reserved -= r->remaining;
    if (r->prev)
        r->prev->next = r->next;
    else
        p->resv_head = r->next;
    if (r->next) r->next->prev = r->prev;
    pds_free(r);
}

/* ---- per-sequence block table -----------------------------------------------------------------
 */
void pds_kv_seq_init(pds_kv_seq_t *s)
{
    memset(s, 0, sizeof(*s));
}

static pds_status_t seq_reserve_cap(pds_kv_seq_t *s, int n_blocks)
{
    if (n_blocks <= s->cap) return PDS_OK;
    int cap = PDS_MAX(8, s->cap);
    while (cap < n_blocks) cap = cap > INT32_MAX / 2 ? n_blocks : cap * 2;
    int32_t *b = pds_realloc(s->blocks, (size_t)cap * sizeof(*b));
    if (!b) return PDS_ERR(PDS_ERR_NO_MEMORY, "kv seq: cannot grow table to %d blocks", cap);
    s->blocks = b;
    s->cap = cap;
    return PDS_OK;
}

pds_status_t pds_kv_seq_grow(pds_kv_seq_t *s, pds_kv_pool_t *p, int block_size, int n_new,
                             pds_kv_resv_t *resv)
{
    if (block_size <= 0 || n_new < 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv seq grow: block_size %d, n_new %d", block_size,
                       n_new);
    if (n_new > INT32_MAX - s->n_tokens)
        return PDS_ERR(PDS_ERR_OUT_OF_RANGE, "kv seq grow: %d + %d tokens overflow", s->n_tokens,
                       n_new);
    int64_t want = PDS_DIV_UP((int64_t)s->n_tokens + n_new, block_size);
    int need = (int)(want - s->n_blocks);
    if (need > 0) {
        PDS_TRY(seq_reserve_cap(s, (int)want));
        int hint = s->n_blocks > 0 ? s->blocks[s->n_blocks - 1] + 1 : -1;
        PDS_TRY(pool_alloc(p, need, resv, hint, s->blocks + s->n_blocks));
        s->n_blocks += need;
    }
    s->n_tokens += n_new;
    return PDS_OK;
}

pds_status_t pds_kv_seq_adopt(pds_kv_seq_t *s, int n_ids, const int32_t *ids, int n_tokens)
{
    if (s->n_blocks != 0)
        return PDS_ERR(PDS_ERR_FAILED_PRECONDITION, "kv seq adopt: table already holds %d blocks",
                       s->n_blocks);
    if (n_ids < 0 || n_tokens < 0 || (n_ids > 0 && !ids))
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv seq adopt: n_ids %d, n_tokens %d", n_ids, n_tokens);
    if (n_tokens > 0 && n_ids == 0)
        return PDS_ERR(PDS_ERR_INVALID_ARG, "kv seq adopt: %d tokens but no blocks", n_tokens);
    PDS_TRY(seq_reserve_cap(s, n_ids));
    if (n_ids > 0) memcpy(s->blocks, ids, (size_t)n_ids * sizeof(*ids));
    s->n_blocks = n_ids;
    s->n_tokens = n_tokens;
    return PDS_OK;
}

void pds_kv_seq_release(pds_kv_seq_t *s, pds_kv_pool_t *p)
{
    if (s->n_blocks > 0 && pds_kv_pool_free(p, s->n_blocks, s->blocks) != PDS_OK) {
        /* The table held ids the pool does not know as allocated: a bug in whoever filled it. */
        PDS_LOG_ERROR("kv", "seq_release_failed detail=\"%s\"", pds_err_detail());
    }
    s->n_blocks = 0;
    s->n_tokens = 0;
}

void pds_kv_seq_fini(pds_kv_seq_t *s)
{
    pds_free(s->blocks);
    memset(s, 0, sizeof(*s));
}

int pds_kv_ids_runs(int n, const int32_t *ids)
{
    int runs = 0;
    for (int i = 0; i < n; i++)
        if (i == 0 || ids[i] != ids[i - 1] + 1) runs++;
    return runs;
}

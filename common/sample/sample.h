/* sample: choosing the next token from logits — greedy, temperature, top-k, top-p — with all
 * randomness keyed by (request seed, token position). The draw for the token at absolute position
 * `pos` is pds_sample_uniform(seed, pos), a pure function: recomputing a prefix (after preemption,
 * or on another node after a failure) reproduces the continuation exactly, and the GPU sampler uses
 * the same function. No state is carried between steps.
 *
 * Algorithm (the GPU implements the same): temperature 0 -> argmax (lowest id on ties). Otherwise
 * p = softmax(logits / T); keep the top_k most probable (0 = all; ties by lower id); keep the
 * smallest prefix of those, by descending probability, whose mass reaches top_p; renormalise; pick
 * the first id whose cumulative probability exceeds u * total. Thread-safe, allocation-free when
 * given scratch.
 * Precisely (sample.c): top-p mass is measured against the full softmax (before top-k); the
 * final cumulative walk goes over the kept ids in ascending id order; weights are computed in
 * double as exp((l - max l) / T); NaN logits count as -inf.
 */
#ifndef PDS_SAMPLE_H
#define PDS_SAMPLE_H

#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"

typedef struct {
    float temperature; /* 0 = greedy; must be finite and >= 0 */
    int top_k;         /* 0 = no limit; >= 0 */
    float top_p;       /* (0, 1]; 1 = no limit */
    uint64_t seed;
} pds_sample_params_t;

pds_sample_params_t pds_sample_default_params(void); /* greedy, top_k 0, top_p 1, seed 0 */
/* PDS_ERR_INVALID_ARG with a detail naming the field for NaN/negative temperature, top_p outside
 * (0, 1], negative top_k. */
pds_status_t pds_sample_params_validate(const pds_sample_params_t *p);

/* Uniform in [0, 1) from (seed, position); 53 random bits. */
double pds_sample_uniform(uint64_t seed, int64_t position);

/* Scratch needed by pds_sample_token for a vocabulary of `vocab` entries, in bytes. */
size_t pds_sample_scratch_bytes(int vocab);
/* Samples the token at absolute position `position`. scratch: pds_sample_scratch_bytes(vocab)
 * bytes (4-byte aligned) or NULL (then it allocates; returns -1 if that allocation fails). Also
 * -1 for NULL logits, vocab <= 0 or parameters that fail pds_sample_params_validate. */
int32_t pds_sample_token(const pds_sample_params_t *p, const float *logits, int vocab,
                         int64_t position, void *scratch);

/* True if tok is in stop[0..n_stop). */
bool pds_sample_is_stop(int32_t tok, const int32_t *stop, int n_stop);

#endif /* PDS_SAMPLE_H */

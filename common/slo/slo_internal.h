/* slo_internal.h: what the files of common/slo share and nobody else sees — the seeded random
 * number generator (xoshiro256**: fast, 2^256 period, and the same numbers on every machine). */
#ifndef PDS_SLO_INTERNAL_H
#define PDS_SLO_INTERNAL_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} slo_rng_t;

void slo_rng_seed(slo_rng_t *r, uint64_t seed);
uint64_t slo_rng_next(slo_rng_t *r);
double slo_rng_uniform(slo_rng_t *r); /* in (0, 1) */
double slo_rng_normal(slo_rng_t *r);
double slo_rng_gamma(slo_rng_t *r, double shape); /* scale 1 */

#endif /* PDS_SLO_INTERNAL_H */

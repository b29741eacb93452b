/* plan.h: internals of pdserve-plan shared by its files (plan_main.c: the capacity planner;
 * plan_profile.c: the `profile` subcommand that measures an engine; plan_sim.c: the `simulate`
 * subcommand that predicts one cluster for comparison with a measured run). */
#ifndef PDS_PLAN_H
#define PDS_PLAN_H

#include "base/base.h"

/* Strict numeric option parsing: the whole string, within [lo, hi]; else PDS_ERR_INVALID_ARG naming
 * the option. */
pds_status_t plan_parse_int(const char *s, const char *opt, int lo, int hi, int *out);
pds_status_t plan_parse_double(const char *s, const char *opt, double lo, double hi, double *out);

/* `pdserve-plan profile ...` (argv[0] = "profile"); exit code. Absent when the build has no engine.
 */
int plan_profile_main(int argc, char **argv);

/* `pdserve-plan simulate ...` (plan_sim.c): one given cluster at given rates; exit code. */
int plan_simulate_main(int argc, char **argv);

#endif /* PDS_PLAN_H */

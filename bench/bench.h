/* bench.h: the subcommands of pdserve-bench and the helpers they share. Each subcommand lives in
 * its own bench_<name>.c and is listed in the table in bench_main.c; it gets argv with argv[0] set
 * to "pdserve-bench <name>" and returns the process exit code (0 ok, 1 failure, 2 usage). */
#ifndef PDS_BENCH_H
#define PDS_BENCH_H

#include <stdbool.h>
#include <stdint.h>

int pds_bench_engine_main(int argc, char **argv);
int pds_bench_load_main(int argc, char **argv); /* bench_load.c: Poisson load on a router */
#ifdef PDS_HAVE_CUDA
int pds_bench_engine_cuda_main(int argc, char **argv); /* bench_engine_cuda.c: vs GPU floors */
#endif

/* "128,512,1024" -> values in [lo, hi]; false on anything malformed or more than cap values. */
bool pds_bench_parse_list(const char *s, int lo, int hi, int *out, int cap, int *n);
/* Median of n values (sorts v in place). */
double pds_bench_median(double *v, int n);
/* "Intel(R) Xeon(R) ..." from /proc/cpuinfo, or "unknown". */
void pds_bench_cpu_name(char *buf, size_t cap);

#endif /* PDS_BENCH_H */

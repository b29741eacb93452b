/* pdserve-bench: micro- and load benchmarks of pdserve. `pdserve-bench <subcommand> [options]`
 * dispatches through one table to a subcommand file; adding one is a new bench_<name>.c plus a row
 * here. Shared helpers (list parsing, medians, machine description) live here too. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "bench.h"

typedef struct {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *help;
} subcommand_t;

static const subcommand_t subcommands[] = {
    {"engine", pds_bench_engine_main, "prefill tok/s (TTFT) and decode step time of one engine"},
    {"load", pds_bench_load_main, "open-loop Poisson load on a router: TTFT, TPOT, throughput"},
#ifdef PDS_HAVE_CUDA
    {"engine-cuda", pds_bench_engine_cuda_main,
     "CUDA engine vs the GPU's measured floors (HBM copy rate, bf16 GEMM rate)"},
#endif
};

static void usage(FILE *f)
{
    fprintf(f, "usage: pdserve-bench <subcommand> [options]   (<subcommand> --help for more)\n");
    for (size_t i = 0; i < PDS_ARRAY_LEN(subcommands); i++)
        fprintf(f, "  %-12s %s\n", subcommands[i].name, subcommands[i].help);
}

bool pds_bench_parse_list(const char *s, int lo, int hi, int *out, int cap, int *n)
{
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < lo || v > hi || *n >= cap) return false;
        out[(*n)++] = (int)v;
        if (*end == ',') {
            p = end + 1;
            if (!*p) return false;
        } else if (*end) {
            return false;
        } else {
            p = end;
        }
    }
    return *n > 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double pds_bench_median(double *v, int n)
{
    if (n <= 0) return 0.0;
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void pds_bench_cpu_name(char *buf, size_t cap)
{
    snprintf(buf, cap, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        char *c = strchr(line, ':');
        if (!c) break;
        c++;
        while (*c == ' ' || *c == '\t') c++;
        c[strcspn(c, "\n")] = '\0';
        snprintf(buf, cap, "%s", c);
        break;
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < PDS_ARRAY_LEN(subcommands); i++) {
        if (strcmp(argv[1], subcommands[i].name) != 0) continue;
        char name[64];
        snprintf(name, sizeof name, "pdserve-bench %s", subcommands[i].name);
        argv[1] = name;
        return subcommands[i].main(argc - 1, argv + 1);
    }
    fprintf(stderr, "pdserve-bench: unknown subcommand '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}

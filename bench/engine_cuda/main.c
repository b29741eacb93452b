/* pdserve-bench-cuda: bench_engine_cuda.c as its own program, until `pdserve-bench engine
 * --backend cuda` dispatches to it. */
int pds_bench_engine_cuda_main(int argc, char **argv);

int main(int argc, char **argv)
{
    return pds_bench_engine_cuda_main(argc, argv);
}

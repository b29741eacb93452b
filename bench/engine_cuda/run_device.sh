#!/usr/bin/env bash
# One device call: GPU tests, the CUDA engine bench (floors, TTFT, decode), the SLO profile
# (PLAN=1), the HF peer, then the short exploratory runs (EXPLORE=1), each under its own time limit so that one stage failing leaves the others' results. Run from the
# repository root on the GPU machine after the bundle was built here:
#   ../shared/device/bundle.sh .bundle build-cuda/bin/test_engine_cuda build-cuda/bin/pdserve-bench-cuda
#   device: carry [".bundle"], command "bash bench/engine_cuda/run_device.sh"
# Results under $OUT: tests.log (nvidia-smi first), bench.log, cuda.json, peer.log, peer.json;
# with EXPLORE=1 also explore.log: a per-op GPU time profile (PDS_ENGINE_CUDA_PROFILE=1) and short
# runs with one optimisation switched off or changed at a time, to see what each is worth; with
# NCU=1 also ncu.log (Nsight Compute sections for one prefill and one decode attention launch);
# with PLAN=1 (pdserve-plan in the bundle) the SLO latency profile: plan.txt (the sweep and the
# printed fit) and h100-llama3-8b.json.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .bundle/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  > "$OUT/tests.log" 2>&1
cat "$OUT/tests.log"
T_TESTS=${T_TESTS:-170} T_BENCH=${T_BENCH:-200} T_PEER=${T_PEER:-200}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "$T_TESTS" test_engine_cuda --jobs 1 --verbose >> "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "FAIL|Synthesis|PASS|CRASH|info" "$OUT/tests.log" | tail -40
  # variant_tests LABEL PREFIX FILTER LIST: the kernel test FILTER once per ';'-separated entry of
  # LIST, each entry's VAR=value words set as PDS_ENGINE_CUDA_<PREFIX>VAR
  variant_tests() {
    local v w envs variants
    IFS=';' read -ra variants <<< "$4"
    for v in "${variants[@]}"; do
      envs=()
      for w in $v; do envs+=("PDS_ENGINE_CUDA_$2$w"); done
      env "${envs[@]}" timeout 60 test_engine_cuda --jobs 1 --filter "$3" >> "$OUT/tests.log" 2>&1
      echo "$1 test, $v: rc=$?"
    done
  }
  # the other prefill attention kernels: the wgmma variants, then the mma.sync kernel's pipelines
  # and shapes (SM90=0), through the same kernel test (ATTN_VARIANTS overrides the list)
  variant_tests "prefill attention" ATTN_ 'engine_cuda/prefill_attention*' \
    "${ATTN_VARIANTS:-SM90=1;SM90=2;SM90=0 PIPE=1;SM90=0 PIPE=4;SM90=0 PIPE=64;SM90=0 PIPE=0 KEYS=32 MT=2}"
  # the other decode attention paths: the register-staged kernel (splits too long for the
  # whole-chunk one) and the scalar whole-chunk kernel (DEC_VARIANTS overrides the list)
  variant_tests "decode attention" "" 'engine_cuda/decode_attention_matches_cpu' \
    "${DEC_VARIANTS:-DEC_MMA=0;DEC_STAGED=0}"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "$T_BENCH" pdserve-bench-cuda --preset llama3-8b ${BENCH_ARGS:-} --out "$OUT/cuda.json" \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; cat "$OUT/bench.log"
fi
if [ "${PLAN:-0}" = 1 ] && command -v pdserve-plan > /dev/null; then
  timeout "${T_PLAN:-150}" pdserve-plan profile --preset llama3-8b --backend cuda \
    ${PLAN_ARGS:---max-prompt 8192 --batches 1,2,4,8,16,32,64,128 --contexts 128,512,1024,2048 --reps 5} \
    --out "$OUT/h100-llama3-8b.json" > "$OUT/plan.txt" 2>&1
  echo "plan rc=$?"; tail -12 "$OUT/plan.txt"
fi
if [ "${SKIP_PEER:-0}" != 1 ]; then
  PYTHONUNBUFFERED=1 timeout "$T_PEER" python3 bench/engine_cuda/peer_hf.py ${PEER_ARGS:-} \
    --out "$OUT/peer.json" > "$OUT/peer.log" 2>&1
  echo "peer rc=$?"; tail -30 "$OUT/peer.log"
fi
if [ "${EXPLORE:-0}" = 1 ]; then
  short() { # label, env..., then bench args after --
    local label=$1; shift
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
    echo "=== $label (${envs[*]:-defaults}) $*" >> "$OUT/explore.log"
    env "${envs[@]}" timeout 120 pdserve-bench-cuda --preset llama3-8b "$@" \
      >> "$OUT/explore.log" 2>&1
    echo "=== rc=$?" >> "$OUT/explore.log"
  }
  short profile PDS_ENGINE_CUDA_PROFILE=1 -- --prompt-lens 2048,4096 --decode-batches 1,32 \
    --decode-steps 4 --repeat 1
  # EXPLORE_RUNS: "label VAR=value [VAR=value...]" entries separated by ';', each run with
  # EXPLORE_ARGS (bench arguments)
  IFS=';' read -ra runs <<< "${EXPLORE_RUNS:-no_staged PDS_ENGINE_CUDA_DEC_STAGED=0;algos32 PDS_ENGINE_CUDA_TUNE_ALGOS=32}"
  for v in "${runs[@]}"; do
    set -- $v
    short "$@" -- ${EXPLORE_ARGS:---prompt-lens 2048 --decode-batches 1,8,32,128}
  done
  if [ "${NCU:-0}" = 1 ] && command -v ncu > /dev/null; then # where the time goes, per kernel
    sec="--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
    timeout 150 ncu --clock-control none $sec --kernel-name regex:attn_prefill_fa --launch-skip 40 \
      --launch-count 1 pdserve-bench-cuda --prompt-lens 4096 --decode-batches 1 --repeat 1 \
      --decode-steps 1 > "$OUT/ncu.log" 2>&1
    echo "ncu prefill rc=$?" >> "$OUT/explore.log"
    timeout 150 ncu --clock-control none $sec --kernel-name "regex:${NCU_DECODE:-attn_decode}" \
      --launch-skip 70 --launch-count 1 pdserve-bench-cuda --prompt-lens 128 \
      --decode-batches 32 --decode-steps 2 --repeat 1 >> "$OUT/ncu.log" 2>&1
    echo "ncu decode rc=$?" >> "$OUT/explore.log"
  fi
  grep -E "^===|^profile|^  |^[0-9]" "$OUT/explore.log"
fi

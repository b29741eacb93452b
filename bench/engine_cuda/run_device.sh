#!/usr/bin/env bash
# One device call: GPU tests, the CUDA engine bench (floors, TTFT, decode), then the HF peer, each
# under its own time limit so that one stage failing leaves the others' results. Run from the
# repository root on the GPU machine after the bundle was built here:
#   ../shared/device/bundle.sh .bundle build-cuda/bin/test_engine_cuda build-cuda/bin/pdserve-bench-cuda
#   device: carry [".bundle"], command "bash bench/engine_cuda/run_device.sh"
# Results under $OUT: gpu.txt, tests.log, bench.log, cuda.json, peer.log, peer.json.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .bundle/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
T_TESTS=${T_TESTS:-170} T_BENCH=${T_BENCH:-200} T_PEER=${T_PEER:-200}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "$T_TESTS" test_engine_cuda --jobs 1 --verbose > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "FAIL|Synthesis|PASS|CRASH|info" "$OUT/tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "$T_BENCH" pdserve-bench-cuda --preset llama3-8b ${BENCH_ARGS:-} --out "$OUT/cuda.json" \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; cat "$OUT/bench.log"
fi
if [ "${SKIP_PEER:-0}" != 1 ]; then
  PYTHONUNBUFFERED=1 timeout "$T_PEER" python3 bench/engine_cuda/peer_hf.py ${PEER_ARGS:-} \
    --out "$OUT/peer.json" > "$OUT/peer.log" 2>&1
  echo "peer rc=$?"; tail -30 "$OUT/peer.log"
fi

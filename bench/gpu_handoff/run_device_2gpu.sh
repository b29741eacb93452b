#!/usr/bin/env bash
# The GPU hand-off on TWO GPUs (nvidia-h200-x2), in one device call — the measurements issue 6
# asks for once the kind is lent (not run yet: two-GPU machines were withheld while this was
# written; bench/results/gpu-handoff-1gpu.* has what one GPU allows):
#   1. kvx's GPU tests, which then include nccl_moves_device_blocks_between_two_gpus;
#   2. hand-off, llama3-8b, prefill on GPU 0 -> decode on GPU 1, 1k / 4k / 16k prompts, tokens
#      against the single-process reference, NCCL and staged UCX side by side (run_device.sh with
#      KVX_LIST="nccl ucx");
#   3. Poisson load through the router (pdserve-bench load, fixed prompt/output lengths, several
#      rates, TTFT/TPOT targets): 1 prefill + 1 decode GPU (NCCL) versus 2 colocated nodes, one per
#      GPU (pdserve-decode --node.role=colocated; prefill_first unless COLOC_MODE=chunked), the
#      router placing requests over both. p50/p90 TTFT and TPOT and the share of requests meeting
#      the (TTFT, TPOT) pair per rate, one CSV line per (setup, rate).
#
# Here (build + bundle; the bundle is compressed to stay under the 64 MiB a call carries):
#   cmake --build build-i6-cuda -j2 --target test_kvx_cuda pdserve-router pdserve-prefill \
#       pdserve-decode pdserve-cli pdserve-gpu-handoff pdserve-bench
#   ../shared/device/bundle.sh .bundle-i6 build-i6-cuda/bin/{test_kvx_cuda,pdserve-router,...}
#   tar cf - .bundle-i6 | xz -T2 > .bundle-i6.tar.xz
# Device (nvidia-h200-x2, carry [".bundle-i6.tar.xz"]):
#   tar xJf .bundle-i6.tar.xz -C /tmp && BUNDLE=/tmp/.bundle-i6 bash bench/gpu_handoff/run_device_2gpu.sh
# Knobs: RATES ("1 2 4 8"), DURATION (s of arrivals per rate, 60), PROMPT_LEN (1024), OUTPUT_LEN
# (128), TTFT_MS (500), TPOT_MS (50), COLOC_MODE (prefill_first), SKIP_HANDOFF, SKIP_LOAD.
set -u
OUT=${OUT:-/tmp/gpu-handoff-2gpu}
mkdir -p "$OUT"
H=$(cd "$(dirname "$0")" && pwd)
source "${BUNDLE:-.bundle}/env.sh"
export NCCL_NVLS_ENABLE=0
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "GPUs: $ngpu"
[ "$ngpu" -ge 2 ] || { echo "run_device_2gpu.sh needs two GPUs" >&2; exit 2; }

if [ "${SKIP_HANDOFF:-0}" != 1 ]; then
  OUT="$OUT/handoff" PRESETS=${PRESETS:-llama3-8b} KVX_LIST="nccl ucx" PREFILL_DEVICE=0 \
    DECODE_DEVICE=1 TLS_LIST=${TLS_LIST:-"sm,self"} NOCSUM_PRESETS=none REPS=${REPS:-2} \
    bash "$H/run_device.sh"
fi
[ "${SKIP_LOAD:-0}" = 1 ] && exit 0

RATES=${RATES:-"1 2 4 8"}
DURATION=${DURATION:-60}
PROMPT_LEN=${PROMPT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-128}
TTFT_MS=${TTFT_MS:-500}
TPOT_MS=${TPOT_MS:-50}
COLOC_MODE=${COLOC_MODE:-prefill_first}
KV=${KV_TOKENS:-200000}
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  wait 2>/dev/null
  PIDS=()
}
trap stop_all EXIT
wait_ready() { # FILE PID -> address
  for _ in $(seq 1 1800); do
    grep -q '^READY ' "$1" 2>/dev/null && { sed -n 's/^READY //p' "$1" | head -1; return 0; }
    kill -0 "$2" 2>/dev/null || { echo "died: $1" >&2; return 1; }
    sleep 0.1
  done
  return 1
}

load() { # SETUP: disagg | coloc
  local setup=$1 dir="$OUT/load-$1"
  mkdir -p "$dir"
  local common=(--node.listen=127.0.0.1:0 --node.report_interval=100ms --model.preset=llama3-8b
                --model.seed=1 --engine.backend=cuda --engine.kv_tokens="$KV" --log.level=info)
  pdserve-router --router.listen=127.0.0.1:0 --router.id=r0 --router.report_interval=100ms \
    > "$dir/router.out" 2> "$dir/router.log" &
  PIDS+=($!)
  local r; r=$(wait_ready "$dir/router.out" "${PIDS[-1]}") || { stop_all; return 1; }
  local nodes=()
  if [ "$setup" = disagg ]; then
    pdserve-prefill --node.id=p0 --node.router="$r" "${common[@]}" --engine.device=0 \
      --kvx.backend=nccl > "$dir/p0.out" 2> "$dir/p0.log" &
    PIDS+=($!); nodes+=("p0:$!")
    pdserve-decode --node.id=d0 --node.router="$r" "${common[@]}" --engine.device=1 \
      --kvx.backend=nccl > "$dir/d0.out" 2> "$dir/d0.log" &
    PIDS+=($!); nodes+=("d0:$!")
  else
    for g in 0 1; do
      pdserve-decode --node.id=c$g --node.role=colocated --colocated.mode="$COLOC_MODE" \
        --node.router="$r" "${common[@]}" --engine.device=$g > "$dir/c$g.out" 2> "$dir/c$g.log" &
      PIDS+=($!); nodes+=("c$g:$!")
    done
  fi
  for n in "${nodes[@]}"; do
    wait_ready "$dir/${n%%:*}.out" "${n##*:}" > /dev/null || { stop_all; return 1; }
  done
  sleep 1
  local rates; rates=$(echo "$RATES" | tr ' ' ',')
  pdserve-bench load --router "$r" --rates "$rates" --duration "$DURATION" \
    --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --ttft-ms "$TTFT_MS" \
    --tpot-ms "$TPOT_MS" --label "$setup" --json "$dir/load.json" --csv "$OUT/load.csv" \
    --requests-csv "$dir/requests.csv" --no-progress 2>&1 | tee "$dir/load.txt"
  stop_all
}

load disagg
load coloc
echo "---- load: setup,rate,sent,ok,errors,met,attainment,ttft p50,p90,p99,mean,tpot p50,p90,p99,mean,rps"
cat "$OUT/load.csv"

#!/usr/bin/env bash
# The GPU hand-off on ONE GPU, in one device call: kvx's GPU tests, then for each preset the
# single-process reference (pdserve-gpu-handoff ref: pds_engine_generate on one CUDA engine) and a
# real cluster — pdserve-router + pdserve-prefill + pdserve-decode, both nodes with a CUDA engine on
# the same GPU, KV over UCX staged through pinned host mirrors (layer by layer on the prefill side)
# — over shared memory and over tcp. Each request's tokens must equal the reference; the prefill
# node's `handoff` log lines give bytes, transfer time (first layer moving -> commit), the part
# exposed after the last layer's compute, and the TTFT the client saw.
#
# Here (build + bundle):
#   cmake -B build-i6-cuda -DPDS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
#   cmake --build build-i6-cuda -j2 --target test_kvx_cuda pdserve-router pdserve-prefill \
#       pdserve-decode pdserve-cli pdserve-gpu-handoff
#   ../shared/device/bundle.sh .bundle build-i6-cuda/bin/{test_kvx_cuda,pdserve-router,...}
# Device (nvidia-h100-x1, carry [".bundle"]): bash bench/gpu_handoff/run_device.sh
# Knobs: PRESETS ("small llama3-8b"), KVX_LIST ("ucx"; "nccl ucx" on two GPUs), PREFILL_DEVICE /
# DECODE_DEVICE (0 / 0), TLS_LIST ("sm,self tcp"), LENS_<preset> (prompt lengths),
# REPS (timed requests per length after one warm-up), MAX_TOKENS, SKIP_TESTS, NOCSUM_PRESETS
# (presets also run with [kvx] checksum = false), BUNDLE (default .bundle), BIN (a directory of
# binaries instead of .bundle, e.g. build-i6/bin with BACKEND=cpu for a CPU dry run here).
# Results under $OUT: gpu.txt, tests.log, ref-<preset>-<mode>.json, <preset>-<tls>/ (node logs,
# one JSON per request), handoff.jsonl (one line per request), summary.txt (printed last).
set -u
OUT=${OUT:-/tmp/gpu-handoff}
mkdir -p "$OUT"
if [ -n "${BIN:-}" ]; then export PATH="$BIN:$PATH"; else source "${BUNDLE:-.bundle}/env.sh"; fi
BACKEND=${BACKEND:-cuda}
PRESETS=${PRESETS:-"small llama3-8b"}
TLS_LIST=${TLS_LIST:-"sm,self tcp"}
REPS=${REPS:-3}
KVX_LIST=${KVX_LIST:-ucx}
PREFILL_DEVICE=${PREFILL_DEVICE:-0}
DECODE_DEVICE=${DECODE_DEVICE:-0}
MAX_TOKENS=${MAX_TOKENS:-24}
LENS_tiny=${LENS_tiny:-"64 300"}
LENS_small=${LENS_small:-"1024 4096"}
LENS_llama3_8b=${LENS_llama3_8b:-"1024 4096 16384"}
PIDS=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${T_TESTS:-120}" test_kvx_cuda --jobs 1 --verbose > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"
  grep -E "^\[(PASS|FAIL|SKIP)\]|Synthesis|nccl on one GPU|Assert" "$OUT/tests.log" | head -20
fi

# spawn NAME LOGDIR CMD...: a background process; ready NAME LOGDIR PID: waits for its
# `READY host:port` line and prints the address.
spawn() {
  local name=$1 dir=$2; shift 2
  "$@" > "$dir/$name.out" 2> "$dir/$name.log" &
  PIDS+=($!)
}
ready() {
  local name=$1 dir=$2 pid=$3
  for _ in $(seq 1 1800); do
    if grep -q '^READY ' "$dir/$name.out" 2>/dev/null; then
      sed -n 's/^READY //p' "$dir/$name.out" | head -1
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name died:" >&2; tail -5 "$dir/$name.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "$name: no READY in 180 s" >&2
  return 1
}

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

# ref PRESET MODE LENS...: the reference tokens (MODE greedy | sampled).
ref() {
  local preset=$1 mode=$2; shift 2
  local lens; lens=$(echo "$@" | tr ' ' ',')
  local extra=""
  [ "$mode" = sampled ] && extra="--temperature 1 --sample-seed 99"
  timeout 300 pdserve-gpu-handoff ref --preset "$preset" --lens "$lens" --max-tokens "$MAX_TOKENS" \
    --backend "$BACKEND" $extra > "$OUT/ref-$preset-$mode.json" 2> "$OUT/ref-$preset-$mode.log"
  echo "ref $preset $mode rc=$?"
}

# cluster PRESET KVX TLS CHECKSUM LENS...
cluster() {
  local preset=$1 kvx=$2 tls=$3 csum=$4; shift 4
  local lens=("$@") longest=0
  for l in "${lens[@]}"; do [ "$l" -gt "$longest" ] && longest=$l; done
  local kv=$((longest + MAX_TOKENS + 1024))
  local dir="$OUT/$preset-$kvx-${tls%%,*}"
  [ "$kvx" = nccl ] && dir="$OUT/$preset-nccl"
  [ "$csum" = false ] && dir="$dir-nocsum"
  mkdir -p "$dir"
  export UCX_TLS=$tls
  if [ "$tls" = tcp ]; then export UCX_NET_DEVICES=lo; else unset UCX_NET_DEVICES; fi
  local common=(--node.listen=127.0.0.1:0 --node.report_interval=100ms --model.preset="$preset"
                --model.seed=1 --engine.backend="$BACKEND" --engine.kv_tokens="$kv"
                --kvx.backend="$kvx" --kvx.checksum="$csum" --log.level=info)
  local r t0=$SECONDS
  spawn router "$dir" pdserve-router --router.listen=127.0.0.1:0 --router.id=r0 \
    --router.report_interval=100ms --router.node_timeout=10s
  r=$(ready router "$dir" "${PIDS[-1]}") || { stop_all; return 1; }
  # both engines start at once on the one GPU
  spawn prefill "$dir" pdserve-prefill --node.id=p0 --node.router="$r" "${common[@]}" \
    --engine.device="$PREFILL_DEVICE"
  local pp=${PIDS[-1]}
  spawn decode "$dir" pdserve-decode --node.id=d0 --node.router="$r" "${common[@]}" \
    --engine.device="$DECODE_DEVICE"
  local dp=${PIDS[-1]}
  ready prefill "$dir" "$pp" > /dev/null && ready decode "$dir" "$dp" > /dev/null ||
    { stop_all; return 1; }
  echo "# $preset $kvx $tls: prefill GPU $PREFILL_DEVICE, decode GPU $DECODE_DEVICE, nodes up in $((SECONDS - t0)) s (kv_tokens $kv each)" >&2
  for _ in $(seq 1 100); do
    pdserve-cli status --router "$r" --json 2>/dev/null | grep -q '"d0"' &&
      pdserve-cli status --router "$r" --json 2>/dev/null | grep -q '"p0"' && break
    sleep 0.1
  done
  for len in "${lens[@]}"; do
    local toks; toks=$(pdserve-gpu-handoff prompt --preset "$preset" --len "$len" --seed 7)
    for mode in greedy sampled; do
      local extra="--temperature 0"
      [ "$mode" = sampled ] && extra="--temperature 1 --seed 99"
      # greedy: one warm-up + REPS timed; sampled: one (tokens only)
      local n=1
      [ "$mode" = greedy ] && n=$((REPS + 1))
      for i in $(seq 1 "$n"); do
        timeout 120 pdserve-cli generate --router "$r" --tokens "$toks" --max-tokens "$MAX_TOKENS" \
          $extra --ignore-eos --json > "$dir/gen-$len-$mode-$i.json" 2> "$dir/gen-$len-$mode-$i.err"
      done
    done
  done
  sleep 0.5
  stop_all
  python3 - "$OUT" "$preset" "$tls" "$dir" "$csum" "$kvx" "${lens[@]}" <<'PY'
import json, re, sys, glob, os
out, preset, tls, d, csum, kvx, lens = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
if kvx == "nccl": tls = "nvlink"  # whatever NCCL picked between the two GPUs
refs = {}
for mode in ("greedy", "sampled"):
    try:
        refs[mode] = {r["len"]: r["tokens"] for r in json.load(open(f"{out}/ref-{preset}-{mode}.json"))["runs"]}
    except Exception as e:
        refs[mode] = {}
hand = {}
for line in open(f"{d}/prefill.log", errors="replace"):
    if "msg=handoff" not in line: continue
    kv = dict(re.findall(r"(\w+)=([^\s\"]+)", line))
    hand[kv.get("req")] = kv
rows = []
for L in map(int, lens):
    for mode in ("greedy", "sampled"):
        for f in sorted(glob.glob(f"{d}/gen-{L}-{mode}-*.json"), key=lambda p: int(p.rsplit("-", 1)[1][:-5])):
            i = int(f.rsplit("-", 1)[1][:-5])
            try: g = json.load(open(f))
            except Exception: g = {"error": open(f.replace(".json", ".err")).read()[-300:]}
            h = hand.get(g.get("request_id"), {})
            ref = refs[mode].get(L)
            row = {"preset": preset, "kvx": kvx, "tls": tls, "checksum": csum == "true", "len": L, "mode": mode, "rep": i,
                   "tokens_equal": (g.get("tokens") == ref) if ref is not None and "tokens" in g else None,
                   "ttft_ms": g.get("ttft_ms"), "client_ttft_ms": (g.get("client") or {}).get("ttft_ms"),
                   "tpot_ms": g.get("tpot_mean_ms"), "kv_bytes": int(h.get("bytes", 0)),
                   "prefill_ms": float(h.get("prefill_ms", "nan")), "transfer_ms": float(h.get("transfer_ms", "nan")),
                   "exposed_ms": float(h.get("exposed_ms", "nan")), "gbps": float(h.get("gbps", "nan")),
                   "error": g.get("error")}
            rows.append(row)
with open(f"{out}/handoff.jsonl", "a") as fo:
    for r in rows: fo.write(json.dumps(r) + "\n")
for r in rows:
    if r["mode"] == "greedy" and r["rep"] == 1: continue  # warm-up
    print(f'{preset:10s} {kvx:4s} {tls + ("" if r["checksum"] else "/nocsum"):15s} {r["len"]:6d} {r["mode"]:7s} eq={r["tokens_equal"]!s:5s} '
          f'ttft={r["ttft_ms"]} prefill={r["prefill_ms"]:.1f} xfer={r["transfer_ms"]:.1f} '
          f'exposed={r["exposed_ms"]:.1f} GB/s={r["gbps"]:.2f} MiB={r["kv_bytes"]/2**20:.0f} '
          f'{r["error"] or ""}')
PY
}

rm -f "$OUT/handoff.jsonl"
for preset in $PRESETS; do
  var="LENS_${preset//-/_}"
  lens=${!var}
  ref "$preset" greedy $lens
  ref "$preset" sampled $lens
  for kvx in $KVX_LIST; do
    tl=$TLS_LIST
    [ "$kvx" = nccl ] && tl=tcp  # NCCL moves the data; UCX_TLS only matters to UCX
    for tls in $tl; do
      cluster "$preset" "$kvx" "$tls" true $lens 2>&1 | tee -a "$OUT/summary.txt"
    done
  done
  # staged UCX over the first transport without checksums (what verification costs)
  case " ${NOCSUM_PRESETS:-llama3-8b} " in
    *" $preset "*)
      cluster "$preset" ucx "${TLS_LIST%% *}" false $lens 2>&1 | tee -a "$OUT/summary.txt" ;;
  esac
done
echo "---- summary ----"
cat "$OUT/summary.txt"

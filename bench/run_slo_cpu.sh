#!/usr/bin/env bash
# run_slo_cpu.sh: the CPU benchmarks of SLO placement behind bench/results/cpu-small-slo-*.md.
# Each starts its own local cluster on loopback (router + nodes, preset small, one engine thread
# per node, KV over UCX tcp on lo), drives it with `pdserve-bench load` and stops it.
#
#   bash bench/run_slo_cpu.sh predict   [--build DIR] [--out DIR]
#       planner vs measured: 1 prefill + 1 decode, two workloads (code, Azure conv trace with
#       lengths x 1/8) at five and three rates; `pdserve-plan simulate` predicts the same requests
#       from bench/profiles/cpu-small-1t-cluster.json (engine profile + the in-cluster terms of
#       `calibrate`; $CLUSTER_PROFILE overrides) and, for comparison, from the isolated
#       cpu-small-1t.json. Writes OUT/cpu-small-slo-predict.json. PREDICT_REQUESTS=N: requests
#       per rate (default 40); AZURE_REQUESTS=N: the trace's, if other.
#   bash bench/run_slo_cpu.sh calibrate [--build DIR] [--out DIR]
#       measures the in-cluster terms of the latency model on 1 prefill + 1 decode with requests
#       the evaluation (predict) never sends: (A) isolated requests (fixed lengths, 0.5 req/s) ->
#       TTFT minus the prefill node's own batch time = per-request control overhead, TPOT minus
#       the decode node's own batch-1 step (the profile's, times the node's traced speed) =
#       per-step overhead; (B) one long decode (32 + 400 tokens) alone,
#       then again while 512-token prompts keep the prefill node busy -> decode contention;
#       (C) 384-token prompts while the decode node runs two long sequences -> prefill contention;
#       (D) 1, 4, 8 long decodes at once -> the in-cluster token gap vs batch (per-sequence cost).
#       Run it three times and take the median of each term (one disturbed run moves a term 3-9x).
#       Writes OUT/cpu-small-cluster-calibration.json; prints the "cluster" profile section.
#   bash bench/run_slo_cpu.sh evaluate  [--build DIR] [--out DIR]
#       the whole check on this machine, nothing carried over from another: calibrate
#       CALIBRATE_RUNS times (default 3), each against an engine profile made just before it,
#       take the median of each in-cluster term (OUT/cluster-terms.json), then predict one rate at
#       a time (code at CODE_RATES, default 1,2,3,4,6; Azure at AZURE_RATES, default 1,2,3), each
#       from the average of two engine profiles made just before and just after its run, plus
#       those terms (the run's own timings are not used). For a machine
#       with cores to spare, PDS_BENCH_PIN=1 gives the router, each node and the load generator
#       cores of their own (taskset), so that the nodes do not share cores (contention ~ 0).
#       To split it over several runs: WORKLOADS="code" or "azure" (default both), and
#       CLUSTER_TERMS=FILE (an earlier evaluate's cluster-terms.json from the same machine) skips
#       the calibrations. SLO_TTFT_MS / SLO_TPOT_MS (default 250 / 25) set the targets of
#       predict and evaluate, for a machine of another speed.
#   bash bench/run_slo_cpu.sh placement [--build DIR] [--out DIR]
#       least-loaded vs SLO placement (best-effort, reject) on 2 prefill + 1 decode with a tight
#       TTFT target and a mixed workload (Azure code trace, lengths x 1/4). OUT/slo-placement.json
#   bash bench/run_slo_cpu.sh coloc     [--build DIR] [--out DIR]
#       disaggregated (1P+1D) vs colocated (2 nodes, chunked) on the same load, rate sweep, with
#       plots (attainment vs rate, TTFT/TPOT CDFs) through bench/plot_load.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
[ $# -gt 0 ] && shift
build=build out=bench/results
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "run_slo_cpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
bin=$build/bin
# The cluster and the load generator run at a higher priority (nice -10 as root; PDS_BENCH_NICE=0
# turns it off) so that someone else's build on a shared machine disturbs the measurement less;
# children inherit it.
nice_to=${PDS_BENCH_NICE:--10}
if [ "$(id -u)" = 0 ] && [ "$nice_to" != 0 ]; then
  renice -n "$nice_to" -p $$ >/dev/null && echo "run_slo_cpu.sh: running at nice $nice_to"
fi
profile=${PROFILE:-bench/profiles/cpu-small-1t.json}
# the same engine coefficients plus the in-cluster terms measured by `calibrate`
cluster_profile=${CLUSTER_PROFILE:-bench/profiles/cpu-small-1t-cluster.json}
traces=${TRACES:-/work/shared/workloads}
# PDS_BENCH_PIN=1: each process on cores of its own (router 0, nodes 1.., the load generator the
# next two)
next_core=0 pfx=
pin() { # cores -> pfx: the command prefix for the next process (empty unless PDS_BENCH_PIN=1)
  pfx=
  if [ "${PDS_BENCH_PIN:-0}" = 1 ]; then
    pfx="taskset -c $next_core-$((next_core + $1 - 1))"
    next_core=$((next_core + $1))
  fi
}
export UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
dir=$(mktemp -d /tmp/pds-slo.XXXXXX)
pids=()

stop_cluster() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop_cluster EXIT

wait_ready() { # name -> address
  for _ in $(seq 1 300); do
    if grep -q '^READY ' "$dir/$1.out" 2>/dev/null; then sed -n 's/^READY //p' "$dir/$1.out"; return; fi
    sleep 0.1
  done
  echo "run_slo_cpu.sh: $1 not READY; log tail:" >&2; tail -n 20 "$dir/$1.log" >&2; exit 1
}

# start_cluster NAME "router flags" "node spec"... ; spec = role:id[:extra flags separated by ,]
# (role prefill | decode | colocated). Sets $router (not in a subshell: it keeps the pids).
start_cluster() {
  local name=$1 rflags=$2; shift 2
  mkdir -p "$dir/$name"
  next_core=0
  pin 1
  # shellcheck disable=SC2086
  $pfx "$bin/pdserve-router" --router.listen=127.0.0.1:0 --router.id=router-0 $rflags </dev/null \
    >"$dir/$name/router.out" 2>"$dir/$name/router.log" &
  pids+=($!)
  router=$(dir=$dir/$name wait_ready router)
  local n=0
  for spec in "$@"; do
    IFS=: read -r role id extra <<<"$spec"
    local prog=pdserve-decode; [ "$role" = prefill ] && prog=pdserve-prefill
    local flags=(--node.id="$id" --node.role="$role" --node.router="$router"
                 --node.listen=127.0.0.1:0 --model.preset=small --model.seed=1
                 --engine.threads=1 --kvx.backend=ucx --log.level=warn)
    [ -n "$extra" ] && IFS=, read -r -a more <<<"$extra" && flags+=("${more[@]}")
    pin 1
    $pfx "$bin/$prog" "${flags[@]}" </dev/null >"$dir/$name/$id.out" 2>"$dir/$name/$id.log" &
    pids+=($!)
    n=$((n + 1))
  done
  for spec in "$@"; do IFS=: read -r _ id _ <<<"$spec"; dir=$dir/$name wait_ready "$id" >/dev/null; done
  pin 2
  loadgen=$pfx # the prefix of every pdserve-bench / pdserve-cli against this cluster
  for _ in $(seq 1 100); do
    up=$("$bin/pdserve-cli" status --router "$router" --json 2>/dev/null | grep -o '"state":"UP"' | wc -l || true)
    [ "$up" -ge "$n" ] && break
    sleep 0.1
  done
}

# fresh_profile PREFIX: profile the engine now (about 20 s on one thread) -> PREFIX-profile.json.
# The engine's speed on a shared VM drifts by 10-20% within an hour (and its prefill slope moved
# 0.32-0.37 ms/token between profiles minutes apart), so `evaluate` brackets each measured run
# with a profile made just before and one made just after it (bracket_profile).
fresh_profile() {
  local pf=
  [ "${PDS_BENCH_PIN:-0}" = 1 ] && pf="taskset -c 1" # the core the prefill node gets
  $pf "$bin/pdserve-plan" profile --preset small --threads 1 --max-prompt 2048 \
    --batches 1,2,3,4,5,6,7,8,10,12,16 --contexts 64,128,256,512 --reps 5 \
    --out "$1-profile.json" >"$1-profile.txt"
}

# bracket_profile PREFIX: PREFIX-before-profile.json and PREFIX-after-profile.json (the same sweep
# on each side of a measured run) averaged number by number -> PREFIX-profile.json (each fit is
# linear in its timings, so this is the fit of the averaged timings: a drift of the engine's speed
# that is linear over the run cancels), plus $CLUSTER_TERMS -> PREFIX-cluster.json. Neither
# profile sees the run itself: the engine runs alone in both.
bracket_profile() {
  "${PYTHON:-/usr/bin/python3}" - "$1" "${CLUSTER_TERMS:-}" <<'EOF'
import json, sys
pre, terms = sys.argv[1], sys.argv[2]
a, b = (json.load(open(f"{pre}-{w}-profile.json")) for w in ("before", "after"))
def num(v): return isinstance(v, (int, float)) and not isinstance(v, bool)
def avg(x, y):
    if isinstance(x, dict) and isinstance(y, dict):
        return {k: avg(x[k], y[k]) if k in y else x[k] for k in x}
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [avg(u, v) for u, v in zip(x, y)]
    if num(x) and num(y) and not (isinstance(x, int) and isinstance(y, int)):
        return (x + y) / 2
    return x  # integers (sizes, counts, a fit's split batch) stay the first profile's
p = avg(a, b)
p["bracketed"] = {"before": f"{pre}-before-profile.json", "after": f"{pre}-after-profile.json"}
json.dump(p, open(f"{pre}-profile.json", "w"), indent=2)
if terms:
    p["cluster"] = json.load(open(terms))
    json.dump(p, open(f"{pre}-cluster.json", "w"), indent=2)
EOF
}

slo_status() { "$bin/pdserve-cli" status --router "$1" --json; }

case $what in
  predict)
    # lengths: code as built in; the Azure conversation trace scaled by 1/8 (its prompts have a
    # median of 1020 tokens: 0.6 s of prefill each on one CPU thread)
    results=()
    load_before=$(cat /proc/loadavg)
    # the 1-minute load average every 5 s while it runs (other people's builds show up here)
    (while :; do echo "$(date +%s) $(cut -d' ' -f1 /proc/loadavg)"; sleep 5; done) >"$dir/loadavg.log" &
    sampler=$!
    wls=()
    [[ " ${WORKLOADS:-code azure} " == *" code "* ]] && wls+=("code::1:${CODE_RATES:-1,2,3,4,6}")
    [[ " ${WORKLOADS:-code azure} " == *" azure "* ]] &&
      wls+=("trace:$traces/azure-llm-2023-conv.csv:0.125:${AZURE_RATES:-1,2,3}")
    for wl in "${wls[@]}"; do
      workload=${wl%%:*}; rest=${wl#*:}
      if [ "$workload" = trace ]; then workload="trace:${rest%%:*}"; fi
      rest=${rest#*:}; scale=${rest%%:*}; rates=${rest#*:}
      tag=$(echo "$workload" | sed 's|.*/||; s|\.csv||; s|[^a-z0-9-]|-|g')
      nreq=${PREDICT_REQUESTS:-40}
      # the trace's p90 TTFT hangs on its few long prompts: AZURE_REQUESTS=N measures more of them
      [ "$workload" != code ] && nreq=${AZURE_REQUESTS:-$nreq}
      common=(--workload "$workload" --length-scale "$scale" --max-context 8192
              --requests "$nreq" --seed 7 --ttft-ms "${SLO_TTFT_MS:-250}" --tpot-ms "${SLO_TPOT_MS:-25}")
      if [ -n "${CLUSTER_TERMS:-}" ]; then
        # one rate at a time, each predicted from an engine profile made just before it is
        # measured (the same requests as in a multi-rate run: the generator is per rate)
        parts=()
        for r in ${rates//,/ }; do
          fresh_profile "$dir/$tag-r$r-before"
          start_cluster "$tag-r$r" "--slo.placement=least-loaded" prefill:p0 decode:d0
          $loadgen "$bin/pdserve-bench" load --router "$router" "${common[@]}" --rates "$r" \
            --label "$tag" --json "$dir/$tag-r$r-measured.json" --csv "$dir/$tag-r$r-measured.csv" \
            --requests-csv "$dir/$tag-r$r-measured-req.csv" --no-progress | tee "$dir/$tag-r$r-measured.txt"
          stop_cluster
          fresh_profile "$dir/$tag-r$r-after"
          bracket_profile "$dir/$tag-r$r"
          "$bin/pdserve-plan" simulate --profile "$dir/$tag-r$r-cluster.json" "${common[@]}" --rates "$r" \
            --policy best-effort --link-gbps 20 --json "$dir/$tag-r$r-sim.json" >"$dir/$tag-r$r-sim.txt"
          "$bin/pdserve-plan" simulate --profile "$dir/$tag-r$r-profile.json" "${common[@]}" --rates "$r" \
            --policy best-effort --link-gbps 20 --json "$dir/$tag-r$r-sim0.json" >"$dir/$tag-r$r-sim0.txt"
          parts+=("$dir/$tag-r$r")
        done
        "${PYTHON:-/usr/bin/python3}" - "$dir/$tag" "${parts[@]}" <<'EOF'
import json, sys
out, parts = sys.argv[1], sys.argv[2:]
for kind in ("measured", "sim", "sim0"):
    js = [json.load(open(f"{p}-{kind}.json")) for p in parts]
    js[0]["runs"] = [r for j in js for r in j["runs"]]
    if kind == "sim":  # the profile (engine coefficients + terms) each rate was predicted with
        js[0]["profiles"] = [json.load(open(f"{p}-cluster.json")) for p in parts]
    json.dump(js[0], open(f"{out}-{kind}.json", "w"), indent=2)
EOF
      else
        start_cluster "$tag" "--slo.placement=least-loaded" prefill:p0 decode:d0
        $loadgen "$bin/pdserve-bench" load --router "$router" "${common[@]}" --rates "$rates" \
          --label "$tag" --json "$dir/$tag-measured.json" --csv "$dir/$tag-measured.csv" \
          --requests-csv "$dir/$tag-measured-req.csv" \
          --no-progress | tee "$dir/$tag-measured.txt"
        stop_cluster
        # after: the profile with the calibrated in-cluster terms; before: the isolated engine's
        "$bin/pdserve-plan" simulate --profile "$cluster_profile" "${common[@]}" --rates "$rates" \
          --policy best-effort --link-gbps 20 --json "$dir/$tag-sim.json" | tee "$dir/$tag-sim.txt"
        "$bin/pdserve-plan" simulate --profile "$profile" "${common[@]}" --rates "$rates" \
          --policy best-effort --link-gbps 20 --json "$dir/$tag-sim0.json" >"$dir/$tag-sim0.txt"
      fi
      results+=("$tag" "$dir/$tag-measured.json" "$dir/$tag-sim.json" "$dir/$tag-sim0.json")
    done
    kill "$sampler"
    mkdir -p "$out"
    load_max=$(sort -k2 -n -r "$dir/loadavg.log" | head -1 | cut -d' ' -f2)
    "${PYTHON:-/usr/bin/python3}" - "$out/cpu-small-slo-predict.json" "$load_before" \
      "$(cat /proc/loadavg) (max 1-min load while running: $load_max)" \
      "${results[@]}" <<'EOF'
import json, sys
out, load0, load1, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rows = []
def err(p, q): return 100.0 * (p - q) / q if q else None
def pick(r):
    return {"attainment": r["attainment"], "ttft_p90_ms": r["ttft_ms"]["p90"],
            "tpot_p90_ms": r["tpot_ms"]["p90"], "ttft_p50_ms": r["ttft_ms"]["p50"],
            "tpot_p50_ms": r["tpot_ms"]["p50"]}
def errs(rs, rm):
    e = {"ttft_p90": err(rs["ttft_ms"]["p90"], rm["ttft_ms"]["p90"]),
         "tpot_p90": err(rs["tpot_ms"]["p90"], rm["tpot_ms"]["p90"]),
         "attainment_rel": err(rs["attainment"], rm["attainment"]),
         "attainment_points": 100 * (rs["attainment"] - rm["attainment"])}
    e["within_10pct"] = all(abs(e[k]) <= 10 for k in ("ttft_p90", "tpot_p90", "attainment_rel"))
    return e
M, S, S0 = [], [], []
for i in range(0, len(rest), 4):
    tag = rest[i]
    m, s, s0 = (json.load(open(rest[i + k])) for k in (1, 2, 3))
    M.append(m), S.append(s), S0.append(s0)
    for rm, rs, r0 in zip(m["runs"], s["runs"], s0["runs"]):
        rows.append({"workload": tag, "rate": rm["rate"], "n": rm["sent"], "measured": pick(rm),
                     "predicted": pick(rs), "error_pct": errs(rs, rm),
                     "predicted_isolated_profile": pick(r0), "error_pct_isolated_profile": errs(r0, rm)})
json.dump({"bench": "slo-predict", "loadavg_before": load0, "loadavg_after": load1, "rows": rows,
           "measured": M, "simulated": S, "simulated_isolated_profile": S0},
          open(out, "w"), indent=2)
print(f"loadavg before {load0} / after {load1}")
print("| workload | rate | attainment meas / pred (err) | TTFT p90 meas / pred (err) | TPOT p90 meas / pred (err) | within 10% | before: TTFT / TPOT p90 err |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    m, p, e, e0 = r["measured"], r["predicted"], r["error_pct"], r["error_pct_isolated_profile"]
    print(f"| {r['workload']} | {r['rate']:g} | {100*m['attainment']:.0f}% / {100*p['attainment']:.0f}% ({e['attainment_rel']:+.0f}%) | "
          f"{m['ttft_p90_ms']:.0f} / {p['ttft_p90_ms']:.0f} ms ({e['ttft_p90']:+.0f}%) | "
          f"{m['tpot_p90_ms']:.1f} / {p['tpot_p90_ms']:.1f} ms ({e['tpot_p90']:+.0f}%) | "
          f"{'yes' if e['within_10pct'] else 'no'} | {e0['ttft_p90']:+.0f}% / {e0['tpot_p90']:+.0f}% |")
EOF
    ;;
  calibrate)
    bgpids=()
    # the prefill node at info level: its `handoff` lines carry each prompt's own batch time
    start_cluster calib "--slo.placement=least-loaded" prefill:p0:--log.level=debug decode:d0:--log.level=debug
    cal=(--ttft-ms 250 --tpot-ms 25 --no-progress --max-context 8192)
    # (A) isolated requests, three prompt lengths (2 s apart: each is done before the next)
    for len in 64 192 384; do
      $loadgen "$bin/pdserve-bench" load --router "$router" "${cal[@]}" --prompt-len "$len" --output-len 48 \
        --rate 0.5 --requests 6 --seed 11 --arrival gamma:0.01 --label "iso-$len" \
        --requests-csv "$dir/iso-$len.csv" >"$dir/iso-$len.txt"
    done
    # (B) a long decode alone, then beside a saturated prefill node (512-token prompts, 1 output
    # token: they never reach the decode batch; 30 at 6/s is ~7 s of prefill work)
    $loadgen "$bin/pdserve-bench" load --router "$router" "${cal[@]}" --prompt-len 32 --output-len 400 \
      --rate 1 --requests 1 --seed 12 --label long-alone --requests-csv "$dir/long-alone.csv" \
      >"$dir/long-alone.txt"
    $loadgen "$bin/pdserve-bench" load --router "$router" "${cal[@]}" --prompt-len 512 --output-len 1 \
      --rate 6 --requests 30 --seed 13 --arrival gamma:0.01 --label bg \
      --requests-csv "$dir/bg.csv" >"$dir/bg.txt" &
    bgpid=$!
    sleep 1.5
    $loadgen "$bin/pdserve-bench" load --router "$router" "${cal[@]}" --prompt-len 32 --output-len 400 \
      --rate 1 --requests 1 --seed 12 --label long-busy --requests-csv "$dir/long-busy.csv" \
      >"$dir/long-busy.txt"
    wait "$bgpid"
    # (C) eight 384-token prompts (1 output token, each its own batch) while the decode node runs
    # two long sequences (pdserve-cli, own request ids) -> prefill contention (from the nodes'
    # traces; without them, against the isolated 384-token TTFTs of (A))
    for k in 1 2; do
      $loadgen "$bin/pdserve-cli" generate --router "$router" --tokens 5,6,7,8,9,10,11,$k --max-tokens 1000 \
        --ignore-eos --quiet --json --request-id "calib-decode-$k" >"$dir/dec-bg-$k.json" &
      bgpids+=($!)
    done
    sleep 1
    $loadgen "$bin/pdserve-bench" load --router "$router" "${cal[@]}" --prompt-len 384 --output-len 1 \
      --rate 1.2 --requests 8 --seed 15 --arrival gamma:0.01 --label pre-busy \
      --requests-csv "$dir/pre-busy.csv" >"$dir/pre-busy.txt"
    wait "${bgpids[@]}"
    # (D) B long decodes at once (B = 1, 4, 8; 32 + 300 tokens): the in-cluster token gap vs batch
    for b in 1 4 8; do
      $loadgen "$bin/pdserve-bench" load --router "$router" "${cal[@]}" --prompt-len 32 --output-len 300 \
        --rate 1000 --requests "$b" --seed 16 --arrival gamma:0.01 --label "batch-$b" \
        --requests-csv "$dir/batch-$b.csv" >"$dir/batch-$b.txt"
    done
    stop_cluster
    mkdir -p "$out"
    "${PYTHON:-/usr/bin/python3}" bench/slo_calibrate.py --profile "$profile" --dir "$dir" \
      --loadavg "$(cat /proc/loadavg)" --out "$out/cpu-small-cluster-calibration.json"
    ;;
  evaluate)
    mkdir -p "$out"
    cals=()
    # CLUSTER_TERMS=FILE: terms of an earlier evaluate's calibrations (its cluster-terms.json, on
    # the same machine), so that one evaluation can be split over several shorter runs
    if [ -n "${CLUSTER_TERMS:-}" ]; then
      CALIBRATE_RUNS=0
      [ "$CLUSTER_TERMS" -ef "$out/cluster-terms.json" ] || cp "$CLUSTER_TERMS" "$out/cluster-terms.json"
    fi
    for i in $(seq 1 "${CALIBRATE_RUNS:-3}"); do
      mkdir -p "$out/cal$i"
      fresh_profile "$out/cal$i/engine"
      PROFILE=$out/cal$i/engine-profile.json bash "$0" calibrate --build "$build" --out "$out/cal$i" | tail -3
      cals+=("$out/cal$i/cpu-small-cluster-calibration.json")
    done
    [ ${#cals[@]} -gt 0 ] && "${PYTHON:-/usr/bin/python3}" - "$out/cluster-terms.json" "${cals[@]}" <<'EOF'
import json, statistics, sys
out, cals = sys.argv[1], sys.argv[2:]
runs = [json.load(open(c))["cluster"] for c in cals]
terms = {k: round(statistics.median(r[k] for r in runs), 3) for k in
         ("ttft_overhead_ms", "decode_step_overhead_ms", "decode_contention", "prefill_contention")}
terms["calibration"] = (f"median of {len(runs)} bench/run_slo_cpu.sh calibrate runs, each against "
                        "an engine profile made just before it")
json.dump(terms, open(out, "w"), indent=2)
print("cluster terms (median):", {k: v for k, v in terms.items() if k != "calibration"})
EOF
    CLUSTER_TERMS=$out/cluster-terms.json bash "$0" predict --build "$build" --out "$out"
    ;;
  placement)
    # a mixed workload: the Azure code trace (prompts p50 1469 / p90 5186 tokens) x 1/4, in its
    # own bursty arrival pattern; a tight TTFT target that short prompts can meet and long ones
    # cannot
    common=(--workload "trace:$traces/azure-llm-2023-code.csv" --length-scale 0.25
            --max-context 8192 --requests "${REQUESTS:-60}" --seed 3 --ttft-ms 400 --tpot-ms 100)
    rate=${RATE:-1.2}
    runs=()
    for cfg in "least-loaded:--slo.placement=least-loaded" \
               "slo-best-effort:--slo.placement=slo --slo.policy=best-effort --slo.profile=$profile" \
               "slo-reject:--slo.placement=slo --slo.policy=reject --slo.profile=$profile"; do
      tag=${cfg%%:*}; rflags=${cfg#*:}
      start_cluster "$tag" "$rflags" prefill:p0 prefill:p1 decode:d0
      $loadgen "$bin/pdserve-bench" load --router "$router" "${common[@]}" --rate "$rate" --label "$tag" \
        --json "$dir/$tag.json" --requests-csv "$dir/$tag-req.csv" --no-progress |
        tee "$dir/$tag.txt"
      slo_status "$router" >"$dir/$tag-status.json"
      stop_cluster
      runs+=("$tag" "$dir/$tag.json" "$dir/$tag-status.json")
    done
    mkdir -p "$out"
    "${PYTHON:-/usr/bin/python3}" - "$out/cpu-small-slo-placement.json" "$(cat /proc/loadavg)" "${runs[@]}" <<'EOF'
import json, sys
out, load, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
res = []
for i in range(0, len(rest), 3):
    j = json.load(open(rest[i + 1])); st = json.load(open(rest[i + 2]))
    res.append({"placement": rest[i], "load": j, "router_status": st})
json.dump({"bench": "slo-placement", "loadavg_after": load, "runs": res}, open(out, "w"), indent=2)
print("| placement | attainment | met / sent | rejected | TTFT p50 / p90 (ok) | TPOT p90 |")
print("|---|---|---|---|---|---|")
for r in res:
    x = r["load"]["runs"][0]
    print(f"| {r['placement']} | {100*x['attainment']:.1f}% | {x['met']} / {x['sent']} | {x['rejected']} | "
          f"{x['ttft_ms']['p50']:.0f} / {x['ttft_ms']['p90']:.0f} ms | {x['tpot_ms']['p90']:.1f} ms |")
EOF
    ;;
  coloc)
    common=(--workload code --max-context 8192 --requests 30 --seed 5 --ttft-ms 250 --tpot-ms 25)
    rates=${RATES:-1,2,4}
    csvs=()
    for cfg in "disaggregated:prefill:p0 decode:d0" \
               "colocated-chunked:colocated:c0:--colocated.mode=chunked,--colocated.chunk_tokens=256 colocated:c1:--colocated.mode=chunked,--colocated.chunk_tokens=256"; do
      tag=${cfg%%:*}; nodes=${cfg#*:}
      # shellcheck disable=SC2086
      start_cluster "$tag" "--slo.placement=least-loaded" $nodes
      $loadgen "$bin/pdserve-bench" load --router "$router" "${common[@]}" --rates "$rates" --label "$tag" \
        --json "$dir/$tag.json" --csv "$dir/$tag.csv" --requests-csv "$dir/$tag-req.csv" \
        --no-progress | tee "$dir/$tag.txt"
      stop_cluster
      csvs+=("$dir/$tag.csv" "$dir/$tag-req.csv")
      cp "$dir/$tag.json" "$out/cpu-small-coloc-$tag.json"
    done
    bash bench/plot_load.sh --out "$out/cpu-small-coloc" "${csvs[@]}"
    ;;
  *) echo "usage: bench/run_slo_cpu.sh calibrate|predict|evaluate|placement|coloc [--build DIR] [--out DIR]" >&2
     exit 2 ;;
esac
echo "logs in $dir"

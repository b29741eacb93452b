#!/usr/bin/env bash
# run_load_cpu.sh: the CPU load benchmark behind bench/results/cpu-small-load.{json,md}.
# Starts a local cluster (deploy/cluster.sh: router + 1 prefill + 1 decode, preset small, one
# engine thread per node), runs `pdserve-bench load` at each rate, and adds what the client cannot
# see: CPU time the router and the nodes spent per streamed token (from /proc/PID/stat) and the
# decode node's own TPOT (its `finish ... tpot_ms=` log lines), so the router's per-token cost can
# be read off next to the client's TPOT. Writes one JSON with all runs.
#
#   bash bench/run_load_cpu.sh [--build DIR] [--rates "0.5 1"] [--duration S] [--prompt-len L]
#                              [--output-len O] [--out FILE.json]
set -euo pipefail
cd "$(dirname "$0")/.."
build=build rates="0.5 1" duration=60 plen=128 olen=64 out=bench/results/cpu-small-load.json
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --prompt-len) plen=$2; shift 2 ;;
    --output-len) olen=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "run_load_cpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
dir=$(mktemp -d /tmp/pds-load.XXXXXX)
# In-process baseline (no cluster running yet): prefill of the prompt and the decode step at the
# batch sizes these rates produce, on one thread like each node.
"$build/bin/pdserve-bench" engine --preset small --seed 1 --threads 1 --prompt-lens "$plen" \
  --decode-batches 1,2,4 --context $((plen + olen / 2)) --json >"$dir/engine.json"
trap 'bash deploy/cluster.sh stop --dir "$dir"' EXIT
router=$(bash deploy/cluster.sh start --build "$build" --dir "$dir" --preset small --threads 1)
pid_of() { awk -v n="$1" '$1 == n {print $2}' "$dir/pids"; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) * 1000 / hz}' "/proc/$1/stat"; }
# Idle baseline: what each process burns per second with no request (reports, progress threads),
# subtracted from the per-token figures below.
idle_s=10
i_r0=$(cpu_ms "$(pid_of router)") i_p0=$(cpu_ms "$(pid_of p0)") i_d0=$(cpu_ms "$(pid_of d0)")
sleep $idle_s
i_r1=$(cpu_ms "$(pid_of router)") i_p1=$(cpu_ms "$(pid_of p0)") i_d1=$(cpu_ms "$(pid_of d0)")
idle="$(echo "$i_r0 $i_r1 $i_p0 $i_p1 $i_d0 $i_d1 $idle_s" |
        awk '{printf "%f %f %f", ($2-$1)/$7, ($4-$3)/$7, ($6-$5)/$7}')"
echo "idle CPU ms/s: router prefill decode = $idle"
runs=()
for rate in $rates; do
  r0=$(cpu_ms "$(pid_of router)") p0=$(cpu_ms "$(pid_of p0)") d0=$(cpu_ms "$(pid_of d0)")
  lines0=$(grep -c 'msg=finish' "$dir/d0.log" || true)
  t0=$(date +%s.%N)
  "$build/bin/pdserve-bench" load --router "$router" --rate "$rate" --duration "$duration" \
    --prompt-len "$plen" --output-len "$olen" --json "$dir/run-$rate.json"
  r1=$(cpu_ms "$(pid_of router)") p1=$(cpu_ms "$(pid_of p0)") d1=$(cpu_ms "$(pid_of d0)")
  # decode-side TPOT of this run's sequences
  dtpot=$(tail -n +"$((lines0 + 1))" <(grep 'msg=finish' "$dir/d0.log") |
          sed -n 's/.* tpot_ms=\([0-9.]*\).*/\1/p' | awk '{s+=$1; n++} END {print n ? s/n : 0}')
  t1=$(date +%s.%N)
  /usr/bin/python3 - "$dir/run-$rate.json" "$r0" "$r1" "$p0" "$p1" "$d0" "$d1" "$dtpot" \
    "$t0" "$t1" $idle <<'EOF'
import json, sys
f = sys.argv[1]
r0, r1, p0, p1, d0, d1, dtpot, t0, t1, ir, ip, idd = map(float, sys.argv[2:])
j = json.load(open(f))
secs = t1 - t0
run = j["runs"][0]  # pdserve-bench load JSON: one entry per rate
tokens = round(run["output_tokens_per_s"] * run["wall_s"])
j["cpu_ms"] = {"router": r1 - r0, "prefill": p1 - p0, "decode": d1 - d0, "over_s": secs}
j["idle_cpu_ms_per_s"] = {"router": ir, "prefill": ip, "decode": idd}
j["output_tokens"] = tokens
busy = (r1 - r0) - ir * secs
j["router_cpu_us_per_token"] = busy * 1000 / tokens if tokens else 0
j["decode_node_tpot_mean_ms"] = dtpot
json.dump(j, open(f, "w"), indent=2)
EOF
  runs+=("$dir/run-$rate.json")
done
/usr/bin/python3 - "$out" "$dir/engine.json" "$(cat /proc/loadavg)" "${runs[@]}" <<'EOF'
import json, sys
out, engine, loadavg, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
json.dump({"bench": "load", "cluster": "router + 1 prefill + 1 decode, preset small, CPU, "
           "1 engine thread per node, UCX tcp on lo",
           "loadavg_after": loadavg, "engine_baseline": json.load(open(engine)),
           "runs": [json.load(open(f)) for f in files]}, open(out, "w"), indent=2)
EOF
echo "wrote $out"

#!/usr/bin/env bash
# quickstart.sh: the README's first command. Installs what is missing, builds (Release) into
# build/, starts a router + N prefill + M decode nodes on this machine's CPU with the built-in
# `small` model (synthetic weights: its text is noise, but exactly reproducible), streams a few
# requests through it with pdserve-cli, checks one against the single-process reference, shows the
# cluster's status, then keeps the cluster up until Ctrl-C (or stops at once with --no-wait).
# The cluster always stops cleanly on exit (SIGTERM, wait, SIGKILL only for stragglers); logs are
# in .pds-cluster/.
#
#   bash deploy/quickstart.sh [--prefill N] [--decode M] [--no-wait] [--build DIR] [--no-deps]
set -euo pipefail
cd "$(dirname "$0")/.."

n_prefill=1 n_decode=1 wait=1 build=build deps=1 dir=.pds-cluster
while [ $# -gt 0 ]; do
  case $1 in
    --prefill) n_prefill=$2; shift 2 ;;
    --decode) n_decode=$2; shift 2 ;;
    --no-wait) wait=0; shift ;;
    --build) build=$2; shift 2 ;;
    --no-deps) deps=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "quickstart: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $n_prefill =~ ^[1-9][0-9]*$ && $n_decode =~ ^[1-9][0-9]*$ ]] ||
  { echo "quickstart: --prefill and --decode take a positive count" >&2; exit 2; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ $deps -eq 1 ]; then
  say "packages (deploy/deps.sh)"
  bash deploy/deps.sh
fi

say "build (Release) into $build/"
jobs=$(nproc)
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log" >&2; exit 1; }
rm -f "$build.configure.log"
cmake --build "$build" -j"$jobs" --target pdserve-router pdserve-prefill pdserve-decode \
  pdserve-cli pdserve-generate
cli=$build/bin/pdserve-cli

# Each node gets an equal share of the cores for its engine threads.
nodes=$((n_prefill + n_decode))
threads=$(( jobs / nodes )); [ $threads -ge 1 ] || threads=1

stop() {
  trap - EXIT INT TERM
  if [ -f "$dir/pids" ]; then
    say "stopping the cluster"
    bash deploy/cluster.sh stop --dir "$dir"
    echo "stopped; logs are in $dir/"
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

say "start: router + $n_prefill prefill + $n_decode decode (preset small, $threads engine thread(s) each)"
# A cluster left over from an interrupted run of this script goes first.
[ -f "$dir/pids" ] && bash deploy/cluster.sh stop --dir "$dir"
router=$(bash deploy/cluster.sh start --build "$build" --dir "$dir" --preset small \
  --prefill "$n_prefill" --decode "$n_decode" --threads "$threads")
echo "router listening on $router (pdserve.v1.Pdserve over gRPC)"
"$cli" status --router "$router"

say "requests (streamed text, then the router's summary and the client's own timings)"
echo "(the built-in model has synthetic weights: its text is noise, but every token is exactly"
echo " what one process running the same model produces; non-printable bytes show as \\xNN)"
prompts=("Once upon a time" "The capital of France is" "def fibonacci(n):")
for p in "${prompts[@]}"; do
  echo "-- prompt: \"$p\""
  "$cli" generate --router "$router" --prompt "$p" --max-tokens 48 --seed 7
done
echo "-- prompt: \"Sampling, too\" (temperature 0.8, top-k 40, top-p 0.9, seed 42)"
"$cli" generate --router "$router" --prompt "Sampling, too" --max-tokens 48 --temperature 0.8 \
  --top-k 40 --top-p 0.9 --seed 42

say "the cluster's tokens against one process running the same model (pdserve-generate)"
tokens_of() { sed -n 's/.*"tokens":\[\([^]]*\)\].*/\1/p'; }
got=$("$cli" generate --router "$router" --prompt "Sampling, too" --max-tokens 48 \
  --temperature 0.8 --top-k 40 --top-p 0.9 --seed 42 --json | tokens_of)
want=$("$build/bin/pdserve-generate" --preset small --seed 1 --threads "$threads" \
  --prompt "Sampling, too" --max-tokens 48 --temperature 0.8 --top-k 40 --top-p 0.9 \
  --sample-seed 42 --json | tokens_of)
if [ -n "$got" ] && [ "$got" = "$want" ]; then
  echo "identical: $(echo "$got" | tr ',' '\n' | wc -l) tokens"
else
  echo "DIFFERENT (a bug: please report it with the logs in $dir/)"
  echo "  cluster:   [$got]"
  echo "  reference: [$want]"
fi

say "cluster status"
"$cli" status --router "$router"

if [ $wait -eq 1 ]; then
  say "the cluster is up; Ctrl-C stops it"
  echo "try:  $cli generate --router $router --prompt 'Hello' --max-tokens 32"
  echo "      $cli status --router $router"
  echo "      /usr/bin/python3 deploy/python/pdserve_client.py generate --target $router --text 'Hello'"
  echo "logs: $dir/*.log"
  router_pid=$(awk '$1 == "router" {print $2}' "$dir/pids")
  # Ctrl-C reaches the nodes too (same process group); `wait` returns at once on the signal, so
  # the flag is set before the loop can mistake their exit for a crash.
  interrupted=0
  trap 'interrupted=1' INT TERM
  while [ $interrupted -eq 0 ] && kill -0 "$router_pid" 2>/dev/null; do
    sleep 1 &
    wait $! || true
  done
  [ $interrupted -eq 1 ] && exit 130
  echo "quickstart: the router exited on its own; see $dir/router.log" >&2
  exit 1
fi

#!/usr/bin/env bash
# cluster.sh: start and stop a local pdserve cluster (router + prefill + decode nodes) on loopback,
# each node a background process with its log under the cluster directory. The quickstart, the
# load benchmark and anyone trying things by hand use it.
#
#   deploy/cluster.sh start [--build DIR] [--dir DIR] [--preset NAME] [--prefill N] [--decode M]
#                           [--threads T] [--kv-tokens K] [--tls UCX_TLS] [--port P]
#                           [-- extra flags for every node]
#   deploy/cluster.sh stop   [--dir DIR]      SIGTERM everything, wait, SIGKILL what is left
#   deploy/cluster.sh status [--dir DIR]      pdserve-cli status
#
# `start` returns once every process printed READY and the router lists every node UP; it
# prints the router address (also in DIR/router.addr). Defaults: build/, .pds-cluster/, preset
# small, 1 prefill + 1 decode, KV over UCX tcp on lo.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
[ $# -gt 0 ] && shift
build=build dir=.pds-cluster preset=small n_prefill=1 n_decode=1 threads=0 kv_tokens=0
tls=${UCX_TLS:-tcp} port=0 extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --prefill) n_prefill=$2; shift 2 ;;
    --decode) n_decode=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --kv-tokens) kv_tokens=$2; shift 2 ;;
    --tls) tls=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

die() { echo "cluster.sh: $*" >&2; exit 1; }

# Waits until $1 has a READY line; prints the address. Fails with the log tail if the process died.
wait_ready() {
  local name=$1 pid=$2 i
  for i in $(seq 1 600); do
    if grep -q '^READY ' "$dir/$name.out" 2>/dev/null; then
      sed -n 's/^READY //p' "$dir/$name.out" | head -n1
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "cluster.sh: $name exited before READY; tail of $dir/$name.log:" >&2
      tail -n 20 "$dir/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "cluster.sh: $name printed no READY in 60 s; tail of $dir/$name.log:" >&2
  tail -n 20 "$dir/$name.log" >&2
  return 1
}

stop_all() {
  [ -f "$dir/pids" ] || return 0
  local pids=() name pid i
  # nodes first (they stop reporting), then the router (last line of the file is first started)
  while read -r name pid; do pids=("$pid" "${pids[@]}"); done <"$dir/pids"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 1 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "cluster.sh: pid $pid ignored SIGTERM for 5 s; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$dir/pids" "$dir/router.addr"
}

case $cmd in
  start)
    bin=$build/bin
    for p in pdserve-router pdserve-prefill pdserve-decode pdserve-cli; do
      [ -x "$bin/$p" ] || die "$bin/$p is not built (cmake --build $build)"
    done
    mkdir -p "$dir"
    [ -f "$dir/pids" ] && die "a cluster already runs from $dir (deploy/cluster.sh stop --dir $dir)"
    rm -f "$dir"/*.out "$dir"/*.log  # a previous cluster's, possibly with other node ids
    export UCX_TLS=$tls UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo} UCX_WARN_UNUSED_ENV_VARS=n
    "$bin/pdserve-router" --router.listen=127.0.0.1:$port --router.id=router-0 </dev/null \
      >"$dir/router.out" 2>"$dir/router.log" &
    echo "router $!" >"$dir/pids"
    router=$(wait_ready router $!) || { stop_all; exit 1; }
    echo "$router" >"$dir/router.addr"
    node_flags=(--node.router="$router" --node.listen=127.0.0.1:0 --model.preset="$preset"
                --model.seed=1 --engine.threads="$threads" --kvx.backend=ucx)
    [ "$kv_tokens" != 0 ] && node_flags+=(--engine.kv_tokens="$kv_tokens")
    started=()
    for i in $(seq 0 $((n_prefill - 1))); do
      "$bin/pdserve-prefill" --node.id="p$i" "${node_flags[@]}" "${extra[@]}" </dev/null \
        >"$dir/p$i.out" 2>"$dir/p$i.log" &
      echo "p$i $!" >>"$dir/pids"; started+=("p$i:$!")
    done
    for i in $(seq 0 $((n_decode - 1))); do
      "$bin/pdserve-decode" --node.id="d$i" "${node_flags[@]}" "${extra[@]}" </dev/null \
        >"$dir/d$i.out" 2>"$dir/d$i.log" &
      echo "d$i $!" >>"$dir/pids"; started+=("d$i:$!")
    done
    for s in "${started[@]}"; do
      wait_ready "${s%%:*}" "${s##*:}" >/dev/null || { stop_all; exit 1; }
    done
    # every node registered and UP
    want=$((n_prefill + n_decode))
    for i in $(seq 1 200); do
      up=$("$bin/pdserve-cli" status --router "$router" --json 2>/dev/null |
           grep -o '"state":"UP"' | wc -l || true)
      [ "$up" -ge "$want" ] && break
      sleep 0.1
    done
    [ "$up" -ge "$want" ] || { echo "cluster.sh: only $up of $want nodes UP" >&2; stop_all; exit 1; }
    echo "$router"
    ;;
  stop) stop_all ;;
  status)
    [ -f "$dir/router.addr" ] || die "no cluster runs from $dir"
    "$build/bin/pdserve-cli" status --router "$(cat "$dir/router.addr")"
    ;;
  *) echo "usage: deploy/cluster.sh start|stop|status [options] (see the header of this file)" >&2
     exit 2 ;;
esac

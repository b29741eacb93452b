#!/usr/bin/env bash
# Installs the Debian packages pdserve builds and runs with (only those missing). Needs root or sudo.
set -euo pipefail
pkgs=(build-essential cmake pkg-config git
      libjansson-dev libinih-dev libopenblas-dev
      libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
      libgrpc-dev protobuf-compiler-grpc python3-grpcio python3-protobuf
      libucx-dev ucx-utils
      libcriterion-dev clang libclang-rt-14-dev
      gnuplot-nox)  # bench/plot_load.sh (load-generator charts)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "pdserve: installing ${missing[*]}" >&2
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"

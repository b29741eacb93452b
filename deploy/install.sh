#!/usr/bin/env bash
# Installs pdserve's programs, systemd units and example configs on this machine (root).
#   bash deploy/install.sh [BUILD_DIR]      then: systemctl enable --now pdserve-router pdserve-prefill@p0 pdserve-decode@d0
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
[ -x "$build/bin/pdserve-router" ] || { echo "build first: cmake -B $build && cmake --build $build -j" >&2; exit 1; }
install -d /usr/local/bin /etc/pdserve /etc/systemd/system
for b in pdserve-router pdserve-prefill pdserve-decode pdserve-cli pdserve-model pdserve-generate pdserve-bench; do
  [ -x "$build/bin/$b" ] && install -m 0755 "$build/bin/$b" /usr/local/bin/
done
for f in deploy/config/*.ini; do
  [ -e "/etc/pdserve/$(basename "$f")" ] || install -m 0644 "$f" /etc/pdserve/
done
install -m 0644 deploy/systemd/*.service /etc/systemd/system/
id pdserve >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin pdserve
systemctl daemon-reload
echo "installed; start with: systemctl enable --now pdserve-router pdserve-prefill@p0 pdserve-decode@d0"

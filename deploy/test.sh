#!/usr/bin/env bash
# The README's test command: installs missing packages, builds everything (the CUDA backend too
# when nvcc is present), runs every test. GPU tests skip with a printed reason where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/deps.sh
build=${PDS_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo ${PDS_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)"
log="$build/ctest.log"
set +e
ctest --test-dir "$build" -V --timeout 900 ${PDS_CTEST_ARGS:-} >"$log" 2>&1
rc=$?
set -e
# Each binary's Criterion summary ("Synthesis: Tested: N | Passing: N | ..."), skips and the total.
grep -E 'Synthesis|\[SKIP\]|skipped|tests passed|tests failed|Total Test time' "$log" || true
# Criterion counts a test whose forked child leaked as passed: the sanitizers' own reports decide.
if grep -qE 'ERROR: (Leak|Address)Sanitizer|runtime error:' "$log"; then
  echo "---- sanitizer reports ----"
  grep -E -A12 'ERROR: (Leak|Address)Sanitizer|runtime error:' "$log" | head -120
  rc=1
fi
if [ $rc -ne 0 ]; then
  echo "---- failures (full log: $log) ----"
  grep -E '\[FAIL\]|\[----\]|\*\*\*Failed|Timeout|Exception' "$log" | head -80
fi
exit $rc

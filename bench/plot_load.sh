#!/usr/bin/env bash
# plot_load.sh: PNG charts from `pdserve-bench load` CSVs through gnuplot — SLO attainment vs rate
# and the TTFT / TPOT CDFs, one curve per label (e.g. disaggregated and colocated on one chart).
#
#   bash bench/plot_load.sh --out PREFIX [--cdf-rate R] FILE.csv ...
#
# Give the per-run CSVs (--csv: label,rate,...,attainment,...) and the per-request CSVs
# (--requests-csv: label,rate,index,...,ttft_ms,tpot_ms,...) in any order; each file's kind is read
# from its header. Writes PREFIX-attainment.png, PREFIX-ttft-cdf.png and PREFIX-tpot-cdf.png (the
# CDFs at --cdf-rate, default the highest rate every label ran). Needs gnuplot (deploy/deps.sh
# installs gnuplot-nox).
set -euo pipefail
out="" cdf_rate=""
files=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --cdf-rate) cdf_rate=$2; shift 2 ;;
    -*) echo "plot_load.sh: unknown option $1" >&2; exit 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
[ -n "$out" ] && [ ${#files[@]} -gt 0 ] || { echo "usage: plot_load.sh --out PREFIX FILE.csv ..." >&2; exit 2; }
command -v gnuplot >/dev/null || { echo "plot_load.sh: gnuplot not found (bash deploy/deps.sh)" >&2; exit 1; }
tmp=$(mktemp -d /tmp/pds-plot.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
# Split into one data file per label and kind; print the gnuplot plot clauses.
/usr/bin/python3 - "$tmp" "$cdf_rate" "${files[@]}" <<'EOF'
import csv, sys, os
tmp, cdf_rate, files = sys.argv[1], sys.argv[2], sys.argv[3:]
runs, reqs = {}, {}
for f in files:
    rows = list(csv.DictReader(open(f)))
    if not rows: continue
    if "attainment" in rows[0]:
        for r in rows: runs.setdefault(r["label"] or os.path.basename(f), []).append(r)
    elif "ttft_ms" in rows[0]:
        for r in rows: reqs.setdefault(r["label"] or os.path.basename(f), []).append(r)
labels = sorted(set(runs) | set(reqs))
with open(f"{tmp}/attain.plot", "w") as p:
    clauses = []
    for i, l in enumerate(sorted(runs)):
        pts = sorted((float(r["rate"]), 100 * float(r["attainment"])) for r in runs[l])
        with open(f"{tmp}/att{i}.dat", "w") as d:
            for x, y in pts: d.write(f"{x} {y}\n")
        clauses.append(f"'{tmp}/att{i}.dat' using 1:2 with linespoints lw 2 title '{l}'")
    p.write(", ".join(clauses))
rates = None
for l in reqs:
    rs = {float(r["rate"]) for r in reqs[l]}
    rates = rs if rates is None else rates & rs
rate = float(cdf_rate) if cdf_rate else (max(rates) if rates else None)
for kind in ("ttft", "tpot"):
    clauses = []
    for i, l in enumerate(sorted(reqs)):
        v = sorted(float(r[f"{kind}_ms"]) for r in reqs[l]
                   if r["status"] == "ok" and float(r["rate"]) == rate and float(r[f"{kind}_ms"]) >= 0)
        if not v: continue
        with open(f"{tmp}/{kind}{i}.dat", "w") as d:
            for k, x in enumerate(v): d.write(f"{x} {(k + 1) / len(v)}\n")
        clauses.append(f"'{tmp}/{kind}{i}.dat' using 1:2 with steps lw 2 title '{l}'")
    open(f"{tmp}/{kind}.plot", "w").write(", ".join(clauses))
open(f"{tmp}/rate", "w").write(f"{rate:g}" if rate is not None else "")
EOF
rate=$(cat "$tmp/rate")
common="set terminal pngcairo size 800,500 font 'sans,11'; set grid; set key bottom right"
if [ -s "$tmp/attain.plot" ]; then
  gnuplot -e "$common; set output '$out-attainment.png'; set xlabel 'request rate (req/s)';
    set ylabel 'SLO attainment (%)'; set yrange [0:105];
    set title 'requests meeting both TTFT and TPOT targets'; plot $(cat "$tmp/attain.plot")"
  echo "wrote $out-attainment.png"
fi
for kind in ttft tpot; do
  if [ -s "$tmp/$kind.plot" ]; then
    label=$([ $kind = ttft ] && echo "TTFT (ms)" || echo "TPOT (ms)")
    gnuplot -e "$common; set output '$out-$kind-cdf.png'; set xlabel '$label';
      set ylabel 'fraction of requests'; set yrange [0:1.02]; set key bottom right;
      set title '$label CDF at $rate req/s'; plot $(cat "$tmp/$kind.plot")"
    echo "wrote $out-$kind-cdf.png"
  fi
done

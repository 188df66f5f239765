#!/usr/bin/env bash
# Benchmark of distributed training (issue 3's figures), measured on this machine in one run:
#   1. step time of `coordinator train` vs `coordinator run --workers 1` at the same batch (mnist-small U-Net)
#   2. parameter + gradient exchange rate vs raw loopback TCP (`coordinator benchmark-exchange`)
#   3. throughput with 2 workers x 1 thread vs 1 worker x 1 thread
# Usage: scripts/bench-distributed.sh [OUT_DIR] [--steps N]   (default runs/bench-distributed, 12 steps)
# Rates exclude each run's first step (joining, loading, allocation).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/runs/bench-distributed"; steps=12
while [ $# -gt 0 ]; do case "$1" in --steps) steps="$2"; shift ;; *) out="$1" ;; esac; shift; done
"$here/scripts/setup.sh"
coord="$here/src/Coordinator/bin/Release/net10.0/coordinator"
mkdir -p "$out"
report="$out/report.txt"; : > "$report"
say() { printf '%s\n' "$*" | tee -a "$report"; }
rate() { sed -n 's/.*; \([0-9.e+-]*\) steps\/s.*/\1/p' | tail -1; }
common=(--recipe mnist-small --steps "$steps" --set checkpoint-every=0 --set sample-every=0)

say "# DistDiffusion distributed benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, mnist-small (batch 64), $steps steps per run"

rm -rf "$out/train" "$out/run1"
train=$("$coord" train "${common[@]}" --out "$out/train" 2>/dev/null | rate)
run1=$("$coord" run --workers 1 "${common[@]}" --out "$out/run1" 2>/dev/null | rate)
say "1. coordinator train: $train steps/s; coordinator run --workers 1 ($(nproc) threads): $run1 steps/s; step-time ratio run/train = $(awk "BEGIN{printf \"%.3f\", $train / $run1}") (goal <= 1.10)"

say "2. exchange rate vs raw loopback TCP, in the same run (mnist-small: 0.8 MiB each way per step; mnist-ddpm: 69 MiB):"
"$coord" benchmark-exchange --recipe mnist-small --steps 30 2>/dev/null | sed 's/^/   mnist-small: /' | tee -a "$report" >/dev/null
"$coord" benchmark-exchange --recipe mnist-ddpm --steps 5 2>/dev/null | sed 's/^/   mnist-ddpm:  /' | tee -a "$report" >/dev/null
grep -E '^\s+mnist' "$report" | tail -8

rm -rf "$out/w1" "$out/w2"
w1=$("$coord" run --workers 1 --worker-threads 1 "${common[@]}" --out "$out/w1" 2>/dev/null | rate)
w2=$("$coord" run --workers 2 --worker-threads 1 "${common[@]}" --out "$out/w2" 2>/dev/null | rate)
say "3. 1 worker x 1 thread: $w1 steps/s; 2 workers x 1 thread: $w2 steps/s; speed-up $(awk "BEGIN{printf \"%.2f\", $w2 / $w1}")x (goal >= 1.8x)"
say "report: $report"

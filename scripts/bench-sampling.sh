#!/usr/bin/env bash
# Benchmark of distributed sampling (issue 4's figures), measured on this machine in one run:
#   1. MNIST (mnist-small U-Net, DDPM, all T = 50 steps): samples/s with 1 and 2 workers of 1 thread each,
#      the ratio, and the time to the first result (`coordinator serve --sample-only` + `coordinator sample --address`)
#   2. swiss roll: DDIM with 50 steps vs DDPM with all T = 200 steps, in time and in the quality figure
#      (sliced Wasserstein distance vs its noise floor, `coordinator eval`)
# Usage: scripts/bench-sampling.sh [OUT_DIR] [--n N] [--mnist-checkpoint DIR]
#   Speed does not depend on how well the model is trained: without --mnist-checkpoint, a 20-step mnist-small run is made.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/runs/bench-sampling"; n=64; mnist=""
while [ $# -gt 0 ]; do
  case "$1" in --n) n="$2"; shift ;; --mnist-checkpoint) mnist="$2"; shift ;; *) out="$1" ;; esac; shift
done
"$here/scripts/setup.sh"
bin="$here/src/Coordinator/bin/Release/net10.0"
coord="$bin/coordinator"; worker="$bin/worker"
mkdir -p "$out"
report="$out/report.txt"; : > "$report"
say() { printf '%s\n' "$*" | tee -a "$report"; }
now() { date +%s.%N; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

say "# DistDiffusion sampling benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
if [ -z "$mnist" ]; then
  mnist="$out/mnist-small"; rm -rf "$mnist"
  "$coord" train --recipe mnist-small --steps 20 --out "$mnist" --set checkpoint-every=0 --set sample-every=0 >/dev/null 2>&1
fi
token="$out/token"; printf 'bench-%s\n' "$RANDOM$RANDOM" > "$token"; chmod 600 "$token"
port=$((20000 + RANDOM % 20000)); url="http://127.0.0.1:$port"
"$coord" serve --checkpoint "$mnist" --sample-only --listen "$url" --token-file "$token" --log-level warning >"$out/serve.log" 2>&1 &
pids+=($!)
start_worker() { "$worker" --coordinator "$url" --token-file "$token" --threads 1 --log-level warning >>"$out/workers.log" 2>&1 & pids+=($!); }
wait_workers() { for _ in $(seq 1 120); do [ "$("$coord" status --address "$url" --token-file "$token" --json 2>/dev/null | grep -o '"id"' | wc -l)" -ge "$1" ] && return 0; sleep 0.5; done; echo "workers did not join" >&2; exit 1; }
measure() {  # $1 label
  local t0 t1 line
  t0=$(now); line=$("$coord" sample --address "$url" --token-file "$token" --n "$n" --seed 1 --out "$out/mnist-$1.png" 2>/dev/null | tail -1); t1=$(now)
  local rate; rate=$(awk "BEGIN{printf \"%.3f\", $n / ($t1 - $t0)}")
  say "mnist-small, $1: $n samples (DDPM, all T steps) in $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s = $rate samples/s; $(sed -n 's/.*(\(first result after [0-9.]* s\)).*/\1/p' <<<"$line")"
  echo "$rate"
}
start_worker; wait_workers 1
r1=$(measure "1 worker x 1 thread" | tail -1)
start_worker; wait_workers 2
r2=$(measure "2 workers x 1 thread" | tail -1)
say "speed-up 2 vs 1 worker: $(awk "BEGIN{printf \"%.2f\", $r2 / $r1}")x (goal >= 1.8x)"
cleanup; pids=()

say ""
sw="$out/swissroll"; rm -rf "$sw"
"$coord" train --recipe swissroll --out "$sw" --set checkpoint-every=0 --set sample-every=0 >/dev/null 2>&1
for s in "ddpm" "ddim --steps 50"; do
  t0=$(now); line=$("$coord" eval --checkpoint "$sw" --sampler $s | grep sliced); t1=$(now)
  say "swissroll, $s: eval (2,000 samples + metric) $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s; $line"
done
say "report: $report"

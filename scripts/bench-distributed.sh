#!/usr/bin/env bash
# The distributed step's figures, measured on this machine in one run (README, "Distributed training and sampling"):
#   1. swissroll: `coordinator train` (all cores, and 1 thread) vs `coordinator run --workers 2` (three alternating
#      pairs, medians) and where a distributed step's time goes (`bench timeline`), next to PyTorch 1.13
#      on the same model and batch (one process; DistributedDataParallel/gloo with 2 processes x 1 thread), when
#      Debian's python3-torch is installed (scripts/peer/setup-peer.sh installs it);
#   2. parameter + gradient exchange vs raw loopback TCP (`bench exchange`), through the worker socket
#      (remote workers' default), the gRPC stream (their --transport grpc) and shared memory (workers under the
#      coordinator's kernel, what `run` uses);
#   3. mnist-small: `run --workers 1` step time vs `train`, and 2 workers x 1 thread vs 1 worker x 1 thread (three
#      alternating rounds, medians), next to
#      the machine's ceiling for that ratio (two independent one-thread `train` processes at once vs one alone);
#   4. memory: `bench soak` (RSS of the coordinator and each worker at the reference step and at the end);
#   5. what the bitwise guarantee costs: `train` with the recipe's micro-batches vs one backward over the whole batch;
#   6. stragglers: `bench straggler` (2 healthy workers vs the same plus one slowed tenfold, three
#      alternating rounds, medians);
#   7. faults: `bench chaos` (workers and the coordinator SIGKILLed; samples per epoch, bits, time lost).
# Usage: scripts/bench-distributed.sh [OUT_DIR] [--quick]   (default runs/bench-distributed; --quick: shorter runs)
# Rates exclude each run's first step (joining, loading, one-time set-up).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/runs/bench-distributed"; quick=0
while [ $# -gt 0 ]; do case "$1" in --quick) quick=1 ;; *) out="$1" ;; esac; shift; done
"$here/scripts/setup.sh"
coord="$here/src/Coordinator/bin/Release/net10.0/coordinator"
# The benchmarks: bench/ (its own project, with coordinator and worker beside it); the solution build of setup.sh builds it.
bench="$here/bench/bin/Release/net10.0/bench"
mkdir -p "$out"
report="$out/report.txt"; : > "$report"
say() { printf '%s\n' "$*" | tee -a "$report"; }
rate() { sed -n 's/.*; \([0-9.e+-]*\) steps\/s.*/\1/p' | tail -1; }
ratio() { awk "BEGIN{printf \"%.2f\", $1 / $2}"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
if [ "$quick" = 1 ]; then swiss=1500; mnist=12; soak=1200; soakref=200; mnistsoak=60; mnistref=20; chaos=600; strag=200
else swiss=3000; mnist=40; soak=3000; soakref=300; mnistsoak=300; mnistref=50; chaos=2000; strag=400; fi

say "# DistDiffusion distributed benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

say "1. swissroll (MLP, 477,442 parameters, batch 256), $swiss steps each:"
sw=(--recipe swissroll --steps "$swiss" --set checkpoint-every=0 --set sample-every=0)
# This VM's speed drifts by 10% from one minute to the next: train and run alternate three times, and the ratio is
# of the medians (each pair's own ratio printed too), so neither side is measured in a luckier minute.
t2s=(); r2s=(); pairs=()
for k in 1 2 3; do
  rm -rf "$out/s-train" "$out/s-run2"
  t=$("$coord" train "${sw[@]}" --out "$out/s-train" 2>/dev/null | rate)
  r=$("$coord" run --workers 2 "${sw[@]}" --out "$out/s-run2" 2>/dev/null | rate)
  t2s+=("$t"); r2s+=("$r"); pairs+=("$(ratio "$r" "$t")")
done
t2=$(median "${t2s[@]}"); r2=$(median "${r2s[@]}")
rm -rf "$out/s-train1"
t1=$("$coord" train "${sw[@]}" --threads 1 --out "$out/s-train1" 2>/dev/null | rate)
say "   coordinator train ($(nproc) threads): $t2 steps/s (median of ${t2s[*]}); train (1 thread): $t1 steps/s"
say "   coordinator run --workers 2: $r2 steps/s (median of ${r2s[*]}) = $(ratio "$r2" "$t2")x train (goal >= 1; run/train of each alternating pair: ${pairs[*]})"
peer="$here/scripts/peer/ddp_swissroll.py"
if /usr/bin/python3 -c 'import torch' >/dev/null 2>&1; then
  p1=$(/usr/bin/python3 "$peer" --mode single --threads 1 --steps "$swiss" 2>/dev/null | sed -n 's/.*: \([0-9.]*\) steps\/s.*/\1/p')
  p2=$(OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 "$peer" --mode single --threads 2 --steps "$swiss" 2>/dev/null | sed -n 's/.*: \([0-9.]*\) steps\/s.*/\1/p')
  pd=$(/usr/bin/python3 "$peer" --mode ddp --world 2 --steps "$swiss" 2>/dev/null | sed -n 's/.*: \([0-9.]*\) steps\/s.*/\1/p')
  say "   PyTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)') one process: $p1 steps/s (1 thread), $p2 steps/s (2 threads, OMP_WAIT_POLICY=PASSIVE)"
  say "   PyTorch DistributedDataParallel, gloo, 2 processes x 1 thread: $pd steps/s; run --workers 2 = $(ratio "$r2" "$pd")x DDP (goal >= 1)"
else
  say "   PyTorch peer: not installed (scripts/peer/setup-peer.sh installs Debian's python3-torch)"
fi

say "   where a run --workers 2 step goes (bench timeline, $swiss steps, the first 100 left out):"
"$bench" timeline --recipe swissroll --steps "$swiss" 2>/dev/null | sed 's/^/   /' | tee -a "$report" >/dev/null

say "2. exchange vs raw loopback TCP (a zero-compute worker, 1,000 steps after 100 of warm-up; the coordinator's own planning, sum, Adam and EMA time subtracted):"
for r in swissroll mnist-small; do
  for tr in socket grpc shared-memory; do
    "$bench" exchange --recipe "$r" --transport "$tr" 2>/dev/null | sed -n '2,4p' | tr '\n' ' ' \
      | sed "s/^/   $r: /; s/\$/\n/" | tee -a "$report"
  done
done

say "3. mnist-small (U-Net, batch 64), $mnist steps each:"
mn=(--recipe mnist-small --steps "$mnist" --set checkpoint-every=0 --set sample-every=0)
rm -rf "$out/m-train" "$out/m-run1" "$out/m-w1" "$out/m-w2"
mt=$("$coord" train "${mn[@]}" --out "$out/m-train" 2>/dev/null | rate)
m1=$("$coord" run --workers 1 "${mn[@]}" --out "$out/m-run1" 2>/dev/null | rate)
say "   train: $mt steps/s; run --workers 1 ($(nproc) threads): $m1 steps/s; step-time ratio run/train = $(ratio "$mt" "$m1") (goal <= 1.10)"
# One worker and two alternate three times (and so do the ceiling's one and two trainings): medians, as in section 1.
w1s=(); w2s=(); solos=(); duos=()
for k in 1 2 3; do
  rm -rf "$out/m-w1" "$out/m-w2" "$out/m-solo" "$out/m-pair-a" "$out/m-pair-b"
  w1s+=("$("$coord" run --workers 1 --worker-threads 1 "${mn[@]}" --out "$out/m-w1" 2>/dev/null | rate)")
  w2s+=("$("$coord" run --workers 2 --worker-threads 1 "${mn[@]}" --out "$out/m-w2" 2>/dev/null | rate)")
  # The machine's own ceiling for that speed-up: two independent one-thread trainings at once, no exchange at all.
  solos+=("$("$coord" train "${mn[@]}" --threads 1 --out "$out/m-solo" 2>/dev/null | rate)")
  ("$coord" train "${mn[@]}" --threads 1 --out "$out/m-pair-a" 2>/dev/null | rate > "$out/m-pair-a.rate") &
  pb=$("$coord" train "${mn[@]}" --threads 1 --out "$out/m-pair-b" 2>/dev/null | rate)
  wait
  duos+=("$(awk "BEGIN{print $(cat "$out/m-pair-a.rate") + $pb}")")
done
w1=$(median "${w1s[@]}"); w2=$(median "${w2s[@]}"); solo=$(median "${solos[@]}"); duo=$(median "${duos[@]}")
say "   1 worker x 1 thread: $w1 steps/s (median of ${w1s[*]}); 2 workers x 1 thread: $w2 steps/s (median of ${w2s[*]}); speed-up $(ratio "$w2" "$w1")x (goal >= 1.8x)"
say "   ceiling on this machine: train --threads 1 alone $solo steps/s (median of ${solos[*]}); two at once $duo steps/s together (median of ${duos[*]}) = $(ratio "$duo" "$solo")x one alone"

say "4. memory over a long run (RSS at the reference step and at the end, every process):"
"$bench" soak --recipe swissroll --steps "$soak" --reference-step "$soakref" 2>/dev/null | sed 's/^/   /' | tee -a "$report" >/dev/null
"$bench" soak --recipe mnist-small --steps "$mnistsoak" --reference-step "$mnistref" 2>/dev/null | sed 's/^/   /' | tee -a "$report" >/dev/null
say "5. cost of the micro-batch tree (bitwise-identical results): train with the recipe's micro-batches (swissroll 2, mnist-small 8) and 8 vs micro-batches=1:"
rm -rf "$out/c-s8" "$out/c-s1" "$out/c-m8" "$out/c-m1"
rm -rf "$out/c-s2"
c2=$("$coord" train "${sw[@]}" --out "$out/c-s2" 2>/dev/null | rate)
c8=$("$coord" train "${sw[@]}" --set micro-batches=8 --out "$out/c-s8" 2>/dev/null | rate)
c1=$("$coord" train "${sw[@]}" --set micro-batches=1 --out "$out/c-s1" 2>/dev/null | rate)
say "   swissroll: 2 micro-batches $c2 steps/s (step time x$(ratio "$c1" "$c2")), 8 micro-batches $c8 steps/s (x$(ratio "$c1" "$c8")), one backward $c1 steps/s"
d8=$("$coord" train "${mn[@]}" --out "$out/c-m8" 2>/dev/null | rate)
d1=$("$coord" train "${mn[@]}" --set micro-batches=1 --out "$out/c-m1" 2>/dev/null | rate)
say "   mnist-small: 8 micro-batches $d8 steps/s, one backward $d1 steps/s: step time x$(ratio "$d1" "$d8")"

say "6. stragglers:"
"$bench" straggler --steps "$strag" --set micro-batches=6 2>/dev/null | sed 's/^/   /' | tee -a "$report" >/dev/null

say "7. faults, $chaos steps:"
"$bench" chaos --steps "$chaos" --set micro-batches=6 2>/dev/null | sed 's/^/   /' | tee -a "$report" >/dev/null
tail -40 "$report"
say "report: $report"

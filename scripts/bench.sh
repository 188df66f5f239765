#!/usr/bin/env bash
# Benchmark: the figures the README reports, measured on this machine.
#   1. each 2-D recipe: full training (wall time), then the sliced Wasserstein distance of 2,000 samples vs its noise floor
#   2. mnist-small on the MNIST test set in data/mnist: training, a sample grid (docs/mnist-small-samples.png), bits/dim
#   3. training steps/s and peak memory of the image recipes at their default batch (a few timed steps each)
# Usage: scripts/bench.sh [OUT_DIR] [--quick]   (default OUT_DIR: runs/bench)
# --quick skips the long mnist-small training (part 2) and times only mnist-small in part 3 (the big
# U-Nets take minutes a step on 2 CPU cores).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/runs/bench"; quick=0
for a in "$@"; do case "$a" in --quick) quick=1 ;; *) out="$a" ;; esac; done
"$here/scripts/setup.sh"
coord="$here/src/Coordinator/bin/Release/net10.0/coordinator"
mkdir -p "$out"
report="$out/report.txt"; : > "$report"
say() { printf '%s\n' "$*" | tee -a "$report"; }
now() { date +%s.%N; }

say "# DistDiffusion benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
say ""
say "## 2-D recipes: sliced Wasserstein distance (2,000 samples, DDPM, EMA weights) vs noise floor"
for r in swissroll swissroll-ddpm swissroll-sohl2015; do
  rm -rf "$out/$r"
  t0=$(now)
  line=$("$coord" train --recipe "$r" --out "$out/$r" --set checkpoint-every=0 --set sample-every=0 2>/dev/null | tail -1)
  t1=$(now)
  ev=$("$coord" eval --checkpoint "$out/$r" --samples 2000 | grep 'sliced')
  "$coord" sample --checkpoint "$out/$r" --n 2000 --out "$out/$r/samples.png" >/dev/null
  say "$r: train $(awk "BEGIN{printf \"%.0f\", $t1 - $t0}") s wall; $ev"
  say "    $line"
done

if [ "$quick" = 0 ]; then
  say ""
  say "## mnist-small on the MNIST test set (data/mnist, 9,000 train / 1,000 held out)"
  rm -rf "$out/mnist-small"
  t0=$(now)
  line=$("$coord" train --recipe mnist-small --out "$out/mnist-small" --set checkpoint-every=0 --set sample-every=0 2>/dev/null | tail -1)
  t1=$(now)
  say "mnist-small: train $(awk "BEGIN{printf \"%.0f\", $t1 - $t0}") s wall"
  say "    $line"
  "$coord" sample --checkpoint "$out/mnist-small" --n 64 --out "$here/docs/mnist-small-samples.png" --trajectory-every 10 | tee -a "$report"
  "$coord" eval --checkpoint "$out/mnist-small" --bpd-images 256 | tee -a "$report"
fi

say ""
say "## Training speed and peak memory of the image recipes at their default batch (steps/s over the steps after the first)"
say "(2-D recipes and mnist-small: see their full runs above)"
# cifar10-ddpm reads an image folder; for timing only, 10 RGB PNGs (scatter plots of the swiss-roll model,
# resized to 32x32 by the reader) stand in for CIFAR-10, which needs a download.
imgdir="$out/cifar-stand-in"
if [ ! -f "$imgdir/img-10.png" ]; then
  mkdir -p "$imgdir"
  for k in $(seq 1 10); do "$coord" sample --checkpoint "$out/swissroll" --n 300 --seed "$k" --out "$imgdir/img-$k.png" >/dev/null; done
fi
specs=("mnist-small:8")
[ "$quick" = 0 ] && specs+=("mnist-ddpm:3" "fashion-mnist-annotated:3" "cifar10-ddpm:2")
for spec in "${specs[@]}"; do
  r=${spec%%:*}; n=${spec##*:}
  extra=()
  [ "$r" = fashion-mnist-annotated ] && extra=(--set data-path="$here/data/mnist")   # same shape; Fashion-MNIST needs a download
  [ "$r" = cifar10-ddpm ] && extra=(--set data-path="$imgdir")
  rm -rf "$out/speed-$r"
  line=$("$coord" train --recipe "$r" --out "$out/speed-$r" --steps "$n" --set checkpoint-every=0 --set sample-every=0 "${extra[@]}" 2>/dev/null | tail -1)
  say "$r ($n steps): $(printf '%s' "$line" | grep -o '[0-9.]* steps/s.* MiB')"
done
say ""
say "report: $report"

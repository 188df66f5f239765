#!/usr/bin/env bash
# Image quality, measured: train `mnist-cpu` with a coordinator and 2 worker processes (`coordinator run
# --workers 2`, about 20 minutes on a 2-core machine), then print the figures of `coordinator eval` for
# 1,000 samples with DDPM (all T = 100 steps) and with DDIM (50 steps): the data-set classifier's confident
# share, classes and classifier FID next to 1,000 held-out digits, bits/dim and the nearest-training-image
# distance. Writes the 64-sample grid and its denoising strip to OUT, and copies them to docs/ with --docs.
# Usage: scripts/mnist-quality.sh [OUT_DIR] [--docs] [--recipe NAME] [--steps N] [--set key=value]...
#   (default OUT_DIR: runs/<recipe>; replaced if it holds a run; --recipe: mnist-cpu (default) or mnist-cpu-guided (class-
#   conditional, sampled with the recipe's guidance; --docs then writes docs/mnist-cpu-guided-*.png); --steps and --set go to
#   `coordinator run`, e.g. --set learning-rate-decay=cosine --set loss-weighting=min-snr --steps 2400 for the README's ablation)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=""
recipe=mnist-cpu
docs=false
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --docs) docs=true ;;
    --recipe)
      [ $# -ge 2 ] || { echo "mnist-quality: --recipe needs a value" >&2; exit 2; }
      case "$2" in mnist-cpu|mnist-cpu-guided) recipe="$2" ;; *) echo "mnist-quality: --recipe $2: expected mnist-cpu or mnist-cpu-guided" >&2; exit 2 ;; esac
      shift ;;
    --steps|--set)
      [ $# -ge 2 ] || { echo "mnist-quality: $1 needs a value" >&2; exit 2; }
      extra+=("$1" "$2"); shift ;;
    -*) echo "mnist-quality: unknown option $1 (expected --docs, --recipe NAME, --steps N or --set key=value)" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
[ -n "$out" ] || out="$here/runs/$recipe"
. "$here/scripts/run-folder.sh"
fresh_run_folder mnist-quality "$out"
"$here/scripts/setup.sh"
coord="$here/src/Coordinator/bin/Release/net10.0/coordinator"
mkdir -p "$out"
start=$(date +%s)
"$coord" run --workers 2 --recipe "$recipe" --out "$out" ${extra[@]+"${extra[@]}"}
echo "training wall time: $(( $(date +%s) - start )) s" | tee "$out/wall-time.txt"
"$coord" classifier --data "$here/data/mnist"
"$coord" eval --checkpoint "$out" --classifier-samples 1000 > "$out/eval-ddpm.txt"
"$coord" eval --checkpoint "$out" --classifier-samples 1000 --sampler ddim --steps 50 > "$out/eval-ddim50.txt"
"$coord" sample --checkpoint "$out" --n 64 --trajectory-every 10 --out "$out/samples.png"
echo "== DDPM, 100 steps"; cat "$out/eval-ddpm.txt"
echo "== DDIM, 50 steps"; cat "$out/eval-ddim50.txt"
if $docs; then
  cp "$out/samples.png" "$here/docs/$recipe-samples.png"
  [ -f "$out/samples-trajectory.png" ] && cp "$out/samples-trajectory.png" "$here/docs/$recipe-samples-trajectory.png"
  echo "copied the grid to docs/$recipe-samples.png"
fi

#!/usr/bin/env bash
# The main job on the embedded default: train the `swissroll` recipe with a coordinator and 2 worker
# processes on this machine (real gRPC on loopback, `coordinator run`), sample 2,000 points with the EMA
# weights, write the picture and print the quality figure.
# Usage: scripts/demo.sh [OUT_DIR]   (default: runs/demo). An earlier run in OUT_DIR (a folder with
# recipe.json) is replaced; any other non-empty folder is refused.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/runs/demo}"
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/recipe.json" ]; then
  echo "demo: $out is not empty and holds no earlier run (no recipe.json): choose another folder" >&2
  exit 2
fi
"$here/scripts/setup.sh"
coord="$here/src/Coordinator/bin/Release/net10.0/coordinator"
rm -rf "$out"
"$coord" run --workers 2 --recipe swissroll --out "$out"
"$coord" sample --checkpoint "$out" --n 2000 --out "$out/samples.png"
"$coord" eval --checkpoint "$out"
echo "picture: $out/samples.png"

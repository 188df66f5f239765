#!/usr/bin/env bash
# The main job on the embedded default: train the `swissroll` recipe with a coordinator and 2 worker
# processes on this machine (real gRPC on loopback, `coordinator run`), sample 2,000 points with the EMA
# weights, write the picture and print the quality figure.
# Usage: scripts/demo.sh [OUT_DIR]   (default: runs/demo). An earlier run in OUT_DIR (a folder with
# recipe.json) is replaced; any other non-empty folder is refused.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/runs/demo}"
. "$here/scripts/run-folder.sh"
fresh_run_folder demo "$out"
"$here/scripts/setup.sh"
coord="$here/src/Coordinator/bin/Release/net10.0/coordinator"
"$coord" run --workers 2 --recipe swissroll --out "$out"
"$coord" sample --checkpoint "$out" --n 2000 --out "$out/samples.png"
"$coord" eval --checkpoint "$out"
echo "picture: $out/samples.png"

#!/usr/bin/env bash
# The main job on the embedded default: train the `swissroll` recipe in one process, sample 2,000
# points with the EMA weights, write the picture and print the quality figure.
# Usage: scripts/demo.sh [OUT_DIR]   (default: runs/demo; an existing run there is replaced)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/runs/demo}"
"$here/scripts/setup.sh"
coord=("$here/src/Coordinator/bin/Release/net10.0/coordinator")
rm -rf "$out"
"${coord[@]}" train --recipe swissroll --out "$out"
"${coord[@]}" sample --checkpoint "$out" --n 2000 --out "$out/samples.png"
"${coord[@]}" eval --checkpoint "$out"
echo "picture: $out/samples.png"

#!/usr/bin/env bash
# Set-up (idempotent), build, then the whole xunit suite. Extra arguments go to `dotnet test`
# (e.g. --filter "FullyQualifiedName~Diffusion").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
dotnet test "$here/tests/DistDiffusion.Tests.csproj" -c Release --no-build --nologo \
  --logger "console;verbosity=normal" "$@"

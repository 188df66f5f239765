#!/usr/bin/env bash
# Set-up (idempotent), build, then the whole xunit suite: both test projects (the model and cluster tests, and
# the deployment checks), one after the other. Extra arguments go to each `dotnet test`
# (e.g. --filter "FullyQualifiedName~Diffusion"). Exits non-zero when either project fails.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
status=0
for project in "$here/tests/DistDiffusion.Tests.csproj" "$here/tests/Deploy/DistDiffusion.Deploy.Tests.csproj"; do
  dotnet test "$project" -c Release --no-build --nologo \
    --logger "console;verbosity=normal" "$@" || status=$?
done
exit "$status"

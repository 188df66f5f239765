#!/usr/bin/env bash
# Fuzzes the parsers that take outside bytes (docs/fuzzing.md): scripts/fuzz.sh TARGET SECONDS, or `all SECONDS` for
# every target one after the other (SECONDS each). Builds fuzz/DistDiffusion.Fuzz.csproj, instruments the project's
# assemblies (and Google.Protobuf) with SharpFuzz, runs afl-fuzz on fuzz/corpus/TARGET for SECONDS, then adds the queue's
# new entries to fuzz/corpus/TARGET (minimised with afl-cmin, named by content hash), copies crashes and hangs to
# fuzz/crashes/TARGET/, and appends the run's executions and exec/s to fuzz/runs.tsv.
# Needs afl++ (apt-get install afl++) and the SharpFuzz.CommandLine dotnet tool (installed here on first use).
# Environment: FUZZ_NO_BUILD=1 (reuse the last instrumented build), FUZZ_WORK (scratch, default ~/.cache/dd-fuzz; not under /tmp, which afl-cmin refuses), FUZZ_TIMEOUT_MS (per input, default 10000).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
targets=(socket-coordinator socket-worker tensor step safetensors checkpoint-manifest idx png recipe)
usage() { echo "usage: scripts/fuzz.sh TARGET|all SECONDS   (targets: ${targets[*]})" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
target="$1"
seconds="$2"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 10 ]] || { echo "fuzz.sh: SECONDS '$seconds': expected an integer >= 10" >&2; exit 2; }
if [[ "$target" == all ]]; then
  status=0
  first=1
  for t in "${targets[@]}"; do
    if [[ "$first" == 1 ]]; then "$0" "$t" "$seconds" || status=1; else FUZZ_NO_BUILD=1 "$0" "$t" "$seconds" || status=1; fi
    first=0
  done
  exit "$status"
fi
printf '%s\n' "${targets[@]}" | grep -qx -- "$target" || { echo "fuzz.sh: unknown target '$target'" >&2; usage; }

# afl-cmin refuses to work under /tmp.
work="${FUZZ_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/dd-fuzz}"
timeout_ms="${FUZZ_TIMEOUT_MS:-10000}"
command -v afl-fuzz >/dev/null || { echo "fuzz.sh: afl-fuzz not found: apt-get install afl++" >&2; exit 1; }
tools="$work/tools"
if [[ ! -x "$tools/sharpfuzz" ]]; then
  dotnet tool install SharpFuzz.CommandLine --version 2.3.0 --tool-path "$tools" >/dev/null
fi

# Build once into a folder of its own, then an instrumented copy (hard links, except the assemblies instrumented).
build="$work/build"
inst="$work/instrumented"
# FUZZ_NO_BUILD=1 reuses the last instrumented build (`all` builds once, for every target).
if [[ "${FUZZ_NO_BUILD:-0}" != 1 || ! -f "$inst/DistDiffusion.Fuzz.dll" ]]; then
  dotnet build "$here/fuzz/DistDiffusion.Fuzz.csproj" -c Release -nologo -v q -clp:ErrorsOnly -o "$build" >/dev/null
  rm -rf "$inst"
  cp -al "$build" "$inst"
  for dll in DistDiffusion.Model.dll DistDiffusion.Protocol.dll coordinator.dll Google.Protobuf.dll; do
    cp --remove-destination "$build/$dll" "$inst/$dll"
    "$tools/sharpfuzz" "$inst/$dll" >/dev/null
  done
fi

corpus="$here/fuzz/corpus/$target"
crashes="$here/fuzz/crashes/$target"
mkdir -p "$corpus" "$crashes"
if [[ -z "$(ls -A "$corpus")" ]]; then
  dotnet "$build/DistDiffusion.Fuzz.dll" seeds "$target" "$corpus"
fi
findings="$work/findings/$target"
rm -rf "$findings"
mkdir -p "$findings"

# A shared machine: no CPU binding, no frequency check; dotnet is no AFL binary (SharpFuzz speaks the fork-server
# protocol from inside it); a crash is an exception SharpFuzz reports, not a core dump. The target starts what it reuses
# (a coordinator) before its loop: give the fork server a minute.
export AFL_SKIP_BIN_CHECK=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_FORKSRV_INIT_TMOUT=60000 AFL_SHUFFLE_QUEUE=0 FUZZ_DEATH_LOG="$work/findings/$target.death.log"
echo "fuzz.sh: $target for $seconds s (corpus $(ls "$corpus" | wc -l) files)"
afl-fuzz -i "$corpus" -o "$findings" -t "$timeout_ms" -m none -V "$seconds" -- dotnet "$inst/DistDiffusion.Fuzz.dll" "$target" \
  >"$findings/afl.log" 2>&1 || {
  # A lost fork server (the process died between inputs) still leaves the queue and the statistics: keep them.
  tail -5 "$findings/afl.log" >&2
  echo "fuzz.sh: afl-fuzz ended early ($findings/afl.log; $FUZZ_DEATH_LOG says why, if an exception did it)" >&2
  [[ -f "$findings/default/fuzzer_stats" ]] || exit 1
}

out="$findings/default"
stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$out/fuzzer_stats"; }
execs="$(stat execs_done)"
run_time="$(stat run_time)"
per_second="$(awk -v e="$execs" -v t="$run_time" 'BEGIN { printf "%.1f", (t > 0 ? e / t : 0) }')"

# New corpus entries: the queue minimised against the corpus (afl-cmin keeps the smallest input for each edge), named by hash.
added=0
if compgen -G "$out/queue/id:*" >/dev/null; then
  minimised="$findings/cmin"
  mkdir -p "$findings/all"
  cp "$corpus"/* "$out"/queue/id:* "$findings/all/"
  if afl-cmin -i "$findings/all" -o "$minimised" -t "$timeout_ms" -m none -- "$(command -v dotnet)" "$inst/DistDiffusion.Fuzz.dll" "$target" >"$findings/cmin.log" 2>&1; then
    source_dir="$minimised"
  else
    echo "fuzz.sh: afl-cmin failed ($findings/cmin.log); adding the whole queue" >&2
    source_dir="$out/queue"
  fi
  declare -A have=()
  for f in "$corpus"/*; do have["$(sha1sum "$f" | cut -c1-16)"]=1; done
  for f in "$source_dir"/*; do
    [[ -f "$f" ]] || continue
    name="$(sha1sum "$f" | cut -c1-16)"
    [[ -z "${have[$name]:-}" ]] || continue
    cp "$f" "$corpus/$name"
    have["$name"]=1
    added=$((added + 1))
  done
fi
found=0
for kind in crashes hangs; do
  for f in "$out/$kind"/id:*; do
    [[ -f "$f" ]] || continue
    prefix=crash; [[ "$kind" == hangs ]] && prefix=hang
    cp "$f" "$crashes/$prefix-$(sha1sum "$f" | cut -c1-16)"
    found=$((found + 1))
  done
done
commit="$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -f "$here/fuzz/runs.tsv" ]] || printf 'date\tcommit\ttarget\tseconds\texecutions\texec_per_s\tcorpus_added\tcrashes_and_hangs\n' >"$here/fuzz/runs.tsv"
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$commit" "$target" "$run_time" "$execs" "$per_second" "$added" "$found" >>"$here/fuzz/runs.tsv"
total="$(awk -F'\t' -v t="$target" '$3 == t { s += $5 } END { print s + 0 }' "$here/fuzz/runs.tsv")"
echo "fuzz.sh: $target: $execs executions in $run_time s ($per_second/s), $total in all runs so far; $added corpus entries added, $found crashes or hangs in fuzz/crashes/$target/"
[[ "$found" -eq 0 ]] || { echo "fuzz.sh: replay one: dotnet $build/DistDiffusion.Fuzz.dll replay $target FILE" >&2; exit 1; }

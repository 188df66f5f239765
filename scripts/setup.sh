#!/usr/bin/env bash
# Idempotent set-up for DistDiffusion. By default it changes nothing outside the repository:
#   1. dotnet restore + build of the solution (Release). NuGet packages go to the user's NuGet cache as with any
#      `dotnet build`; the build output gets a copy of TorchSharp's libLibTorchSharp.so whose one GLIBCXX_3.4.32
#      need is marked weak (Directory.Build.targets), so it loads on Debian 12's and Ubuntu 22.04's libstdc++.
#   2. A check that the built coordinator's and worker's native libraries load with this machine's libraries
#      (ldd: no missing library, no missing non-weak symbol version), and a summary of what was done.
# Nothing is installed unless --upgrade-libstdcxx is given: then, where libstdc++ lacks GLIBCXX_3.4.32, it first
# prints what `apt-get install libstdc++6` from Debian 13 ("trixie") would change (a simulation with a one-off
# source list and lists folder; the machine's apt sources are not touched) and installs it only with --yes.
# See docs/setup.md.
# Usage: scripts/setup.sh [--no-build] [--upgrade-libstdcxx [--yes]]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
need_symbol="GLIBCXX_3.4.32"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

usage="usage: scripts/setup.sh [--no-build] [--upgrade-libstdcxx [--yes]]"
build=1
upgrade=0
yes=0
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --upgrade-libstdcxx) upgrade=1 ;;
    --yes) yes=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "unknown argument '$arg': expected --no-build, --upgrade-libstdcxx or --yes ($usage)" ;;
  esac
done
[ "$yes" = 0 ] || [ "$upgrade" = 1 ] || die "--yes only confirms --upgrade-libstdcxx; give both, or neither ($usage)"

find_libstdcxx() {
  local p
  for p in /usr/lib/x86_64-linux-gnu/libstdc++.so.6 /usr/lib/aarch64-linux-gnu/libstdc++.so.6 \
           /usr/lib64/libstdc++.so.6 /usr/lib/libstdc++.so.6; do
    [ -e "$p" ] && { readlink -f "$p"; return 0; }
  done
  ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 /{print $NF; exit}'
}

has_symbol() {
  local lib; lib="$(find_libstdcxx)"
  [ -n "$lib" ] && grep -qa "$need_symbol" "$lib"
}

# "libstdc++6 12.2.0-14+deb12u1" where dpkg knows the file, else the file's path.
libstdcxx_description() {
  local lib; lib="$(find_libstdcxx)"
  [ -n "$lib" ] || { echo "no libstdc++.so.6"; return 0; }
  local pkg version
  if command -v dpkg-query >/dev/null && pkg="$(dpkg-query -S "$lib" 2>/dev/null | head -n1 | cut -d: -f1)" && [ -n "$pkg" ]; then
    version="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null | head -n1)"
    echo "$lib ($pkg $version)"
  else
    echo "$lib"
  fi
}

# The first Debian archive URI the machine's own apt sources use (deb822 *.sources or one-line lists),
# skipping the security archive.
debian_mirror_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk 'BEGIN{IGNORECASE=1} /^URIs:/{for(i=2;i<=NF;i++) if ($i !~ /security/) {print $i; exit}}' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri="$(awk '$1=="deb" { u=$2; if ($2 ~ /^\[/) { for(i=2;i<=NF;i++) if ($i ~ /\]$/) { u=$(i+1); break } } if (u ~ /debian/ && u !~ /security/) { print u; exit } }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  return 1
}

# --upgrade-libstdcxx: libstdc++6 from Debian 13 in a one-off apt call (own source list and lists folder). It first
# prints apt's simulation of the install with the same options; without --yes it stops there.
upgrade_libstdcxx() {
  [ -r /etc/debian_version ] || die "--upgrade-libstdcxx installs Debian 13's libstdc++6 and this is not a Debian host: install a libstdc++ from GCC >= 13 yourself (or leave it: the build's weak need makes it unnecessary)"
  command -v apt-get >/dev/null || die "--upgrade-libstdcxx needs apt-get, which is not on PATH"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "--upgrade-libstdcxx needs root (run this script as root or install sudo)"
    sudo="sudo"
  fi
  local uri; uri="$(debian_mirror_uri)" || die "could not find a Debian archive URI in /etc/apt/sources.list or /etc/apt/sources.list.d/"
  local work; work="$(mktemp -d /tmp/distdiffusion-trixie.XXXXXX)"
  # shellcheck disable=SC2064 # expand $work now
  trap "rm -rf '$work'" EXIT
  mkdir -p "$work/lists/partial"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  echo "deb [signed-by=$keyring] $uri trixie main" > "$work/trixie.list"
  local opts=(-o "Dir::Etc::sourcelist=$work/trixie.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::Lists=$work/lists" -o "APT::Get::List-Cleanup=0")
  log "--upgrade-libstdcxx: reading Debian 13's package list ($uri trixie main) into $work (the machine's apt sources are not touched)"
  $sudo apt-get "${opts[@]}" -q update >&2
  log "what 'apt-get install libstdc++6' from Debian 13 would change on this machine (apt-get -s, nothing installed yet):"
  $sudo apt-get "${opts[@]}" -s --no-install-recommends install libstdc++6 >&2
  if [ "$yes" != 1 ]; then
    log "stopped: nothing was installed. To install the packages listed above, rerun with --upgrade-libstdcxx --yes."
    log "(Not needed to run DistDiffusion: the build output's libLibTorchSharp.so has its $need_symbol need weak.)"
    exit 0
  fi
  log "--yes: installing libstdc++6 from Debian 13"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get "${opts[@]}" -q -y --no-install-recommends install libstdc++6 >&2
  rm -rf "$work"
  trap - EXIT
  has_symbol || die "libstdc++6 from Debian 13 was installed but $need_symbol is still missing from $(find_libstdcxx)"
  installed="libstdc++6 from Debian 13 (and what apt listed above)"
  log "libstdc++ now provides $need_symbol: $(libstdcxx_description)"
}

# The native libraries TorchSharp and SkiaSharp load, in the coordinator's and the worker's build output, checked with
# ldd: every library found and every non-weak symbol version present. Sets $load_note to what was seen.
check_native_libraries() {
  local config_dir="bin/Release/net10.0" project lib out failures=0 weak=""
  command -v ldd >/dev/null || die "ldd (libc-bin) is not on PATH: cannot check the native libraries"
  for project in src/Coordinator src/Worker; do
    for lib in libLibTorchSharp.so libSkiaSharp.so; do
      local path="$here/$project/$config_dir/runtimes/linux-x64/native/$lib"
      [ -f "$path" ] || die "$path is missing after the build"
      out="$(ldd "$path" 2>&1)" || { log "ldd $path failed:"; printf '%s\n' "$out" >&2; failures=$((failures + 1)); continue; }
      if grep -E "not found" <<<"$out" | grep -vE "weak version" | grep -q .; then
        log "$project's $lib will not load on this machine:"
        grep -E "not found" <<<"$out" | grep -vE "weak version" >&2
        failures=$((failures + 1))
      fi
      if grep -q "weak version \`$need_symbol' not found" <<<"$out"; then weak="$weak $project"; fi
    done
    # The need must be weak in the output whatever this machine's libstdc++ has, or the output would not run on
    # one without it (a build copied to another machine, a Docker layer).
    grep -qa "$need_symbol" "$here/$project/$config_dir/runtimes/linux-x64/native/libLibTorchSharp.so" || die "$project's libLibTorchSharp.so names no $need_symbol: not the TorchSharp build Directory.Build.targets expects"
  done
  [ "$failures" = 0 ] || die "$failures native librar$([ "$failures" = 1 ] && echo y || echo ies) of the build output cannot be loaded here (above); see docs/setup.md"
  if [ -n "$weak" ]; then
    load_note="libstdc++ lacks $need_symbol; the build output's libLibTorchSharp.so (${weak# }) has that need weak, and ldd finds every other library and version: TorchSharp loads with $(libstdcxx_description)"
  else
    load_note="libstdc++ provides $need_symbol, and ldd finds every library and version of the build output's native libraries: TorchSharp loads with $(libstdcxx_description)"
  fi
}

installed="nothing"
if has_symbol; then
  log "libstdc++ provides $need_symbol: $(libstdcxx_description)"
elif [ "$upgrade" = 1 ]; then
  upgrade_libstdcxx
else
  log "libstdc++ lacks $need_symbol ($(libstdcxx_description)): the build marks that one need of libLibTorchSharp.so weak in its output (Directory.Build.targets); nothing is installed"
fi

if [ "$build" = 1 ]; then
  command -v dotnet >/dev/null || die "the .NET 10 SDK (dotnet) is not on PATH (docs/setup.md lists the prerequisites)"
  log "restoring and building $here/DistDiffusion.sln (Release)"
  dotnet build "$here/DistDiffusion.sln" -c Release -nologo -v q -clp:ErrorsOnly >&2
  check_native_libraries
  packages="$(dotnet nuget locals global-packages --list 2>/dev/null | sed -n 's/^global-packages: //p')"
  log "done: installed $installed; restored NuGet packages into ${packages:-the NuGet package cache} and built the solution (Release) in $here; $load_note"
else
  log "done: installed $installed; no build (--no-build)"
fi

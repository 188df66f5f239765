#!/usr/bin/env bash
# One-time, idempotent set-up for DistDiffusion on a Debian host:
#   1. TorchSharp 0.107's native libLibTorchSharp.so needs GLIBCXX_3.4.32. Debian 12's libstdc++
#      stops at 3.4.30, so on such a host we install libstdc++6 from Debian 13 ("trixie") in a
#      one-off apt call with its own source list and lists folder; the machine's permanent apt
#      sources are not touched. Nothing is installed where the symbol is already present.
#   2. dotnet restore + build of the solution (Release).
# Usage: scripts/setup.sh [--no-build]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
need_symbol="GLIBCXX_3.4.32"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

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

install_trixie_libstdcxx() {
  [ -r /etc/debian_version ] || die "libstdc++ lacks $need_symbol (TorchSharp needs it) and this is not a Debian host: install a libstdc++ from GCC >= 13 (e.g. libstdc++6 from Debian 13 or Ubuntu 24.04) and rerun."
  command -v apt-get >/dev/null || die "libstdc++ lacks $need_symbol and apt-get is not available to install it."
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "libstdc++ lacks $need_symbol; installing it needs root (run this script as root or install sudo)."
    sudo="sudo"
  fi
  local uri; uri="$(debian_mirror_uri)" || die "could not find a Debian archive URI in /etc/apt/sources.list or /etc/apt/sources.list.d/"
  local work; work="$(mktemp -d /tmp/distdiffusion-trixie.XXXXXX)"
  mkdir -p "$work/lists/partial"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  echo "deb [signed-by=$keyring] $uri trixie main" > "$work/trixie.list"
  log "libstdc++ lacks $need_symbol: installing libstdc++6 from Debian 13 ($uri trixie), one-off"
  local opts=(-o "Dir::Etc::sourcelist=$work/trixie.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::Lists=$work/lists" -o "APT::Get::List-Cleanup=0")
  $sudo apt-get "${opts[@]}" -q update >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get "${opts[@]}" -q -y --no-install-recommends install libstdc++6 >&2
  rm -rf "$work"
  has_symbol || die "libstdc++6 from Debian 13 was installed but $need_symbol is still missing"
  log "libstdc++ now provides $need_symbol"
}

build=1
upgrade=0
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --upgrade-libstdcxx) upgrade=1 ;;
    *) die "unknown argument '$arg': expected --no-build or --upgrade-libstdcxx" ;;
  esac
done

if has_symbol; then
  log "libstdc++ provides $need_symbol"
elif [ "$upgrade" = 1 ]; then
  install_trixie_libstdcxx
else
  log "libstdc++ lacks $need_symbol: the build marks that one need of libLibTorchSharp.so weak in its output (Directory.Build.targets); nothing is installed"
fi

if [ "$build" = 1 ]; then
  command -v dotnet >/dev/null || die "the .NET 10 SDK (dotnet) is not on PATH"
  log "restoring and building (Release)"
  dotnet build "$here/DistDiffusion.sln" -c Release -nologo -v q -clp:ErrorsOnly >&2
fi

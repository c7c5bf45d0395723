#!/usr/bin/env bash
# A newer Neovim than Debian 12's 0.7.2, for testing the plugin against current APIs: Debian 13
# (trixie)'s Neovim 0.10, unpacked (not installed) under DIR with its own glibc, and run through
# its own dynamic loader. Prints the path of a wrapper that runs it.
#
#   VIST2_NVIM="$(bash scripts/nvim-trixie.sh /tmp/nvim-trixie)" python3 -m unittest test_nvim
#
# The trixie package list is added for the download only and removed again.
set -euo pipefail
DIR="${1:?usage: nvim-trixie.sh DIR}"
if [[ ! -x "$DIR/nvim" ]]; then
    SUDO=""
    [[ "$(id -u)" == 0 ]] || SUDO="sudo"
    LIST=/etc/apt/sources.list.d/vist2-trixie-download.list
    cleanup() { $SUDO rm -f "$LIST"; $SUDO apt-get update -qq >/dev/null 2>&1 || true; }
    trap cleanup EXIT
    echo "deb http://deb.debian.org/debian trixie main" | $SUDO tee "$LIST" >/dev/null
    $SUDO apt-get update -qq >&2
    mkdir -p "$DIR/debs" "$DIR/root"
    (cd "$DIR/debs" && apt-get download -t trixie neovim neovim-runtime libluajit-5.1-2 libluajit-5.1-common libmsgpack-c2 \
        libtree-sitter0.22 libunibilium4 libuv1t64 libvterm0 lua-lpeg lua-luv libc6 libgcc-s1 >&2)
    for d in "$DIR"/debs/*.deb; do dpkg -x "$d" "$DIR/root"; done
    cat > "$DIR/nvim" <<WRAP
#!/bin/sh
export VIMRUNTIME="$DIR/root/usr/share/nvim/runtime"
exec "$DIR/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$DIR/root/usr/lib/x86_64-linux-gnu" "$DIR/root/usr/bin/nvim" "\$@"
WRAP
    chmod +x "$DIR/nvim"
fi
"$DIR/nvim" --version | head -1 >&2
echo "$DIR/nvim"

#!/usr/bin/env bash
# Build vist2-render (the sketch renderer alone) for a machine without a Swift toolchain: the
# Swift standard library and Foundation linked statically (--static-swift-stdlib), and FreeType,
# libpng, zlib and Brotli from their static archives (Debian's -dev packages ship them), so the
# binary needs only the C library, libstdc++ and libgcc_s, which any Linux with Python has.
# The font is not inside: bring the config's font file and pass --font.
#
#   bash scripts/build-render-tool.sh [OUT]     # default: .build/render-tool/vist2-render
#
# It checks that no other shared library is needed (ldd) and that the binary runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/.build/render-tool/vist2-render}"
ARCH="$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
# A directory holding only static archives, searched before the system's (which also has the
# shared libraries): the linker takes each library from the first directory that has it.
STATIC="$ROOT/.build/render-tool/static-libs"
mkdir -p "$STATIC" "$(dirname "$OUT")"
for lib in freetype png16 z brotlidec brotlicommon; do
    src="/usr/lib/$ARCH/lib$lib.a"
    [[ -f "$src" ]] || { echo "build-render-tool.sh: $src missing (apt-get install libfreetype-dev: it brings the others)" >&2; exit 1; }
    ln -sf "$src" "$STATIC/lib$lib.a"
done
ln -sf "libpng16.a" "$STATIC/libpng.a"
# SwiftPM asks pkg-config for FreeType's flags; this freetype2.pc puts the static directory
# first and names the libraries the static archive needs (libpng's -lpng then also finds the
# archive there).
cat >"$STATIC/freetype2.pc" <<PC
Name: FreeType 2 (static)
Description: FreeType from its static archive, for vist2-render
Version: $(pkg-config --modversion freetype2)
Cflags: $(pkg-config --cflags freetype2)
Libs: -L$STATIC $(pkg-config --static --libs freetype2)
PC
cd "$ROOT"
SCRATCH="$ROOT/.build/render-tool/build"
PKG_CONFIG_PATH="$STATIC" swift build -c release --product vist2-render --static-swift-stdlib --scratch-path "$SCRATCH"
cp "$SCRATCH/release/vist2-render" "$OUT.tmp"
strip "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
# Only the C runtime may be left to the target machine.
extra="$(ldd "$OUT" | awk '{print $1}' | grep -vE '^(linux-vdso\.so|/lib64/ld-linux-x86-64\.so|/lib/ld-linux-aarch64\.so|ld-linux-(x86-64|aarch64)\.so|libc\.so|libm\.so|libstdc\+\+\.so|libgcc_s\.so|libdl\.so|libpthread\.so|librt\.so|libutil\.so)' || true)"
if [[ -n "$extra" ]]; then
    echo "build-render-tool.sh: $OUT still needs shared libraries: $extra" >&2
    exit 1
fi
"$OUT" --help >/dev/null
echo "$OUT ($(du -h "$OUT" | cut -f1), needs: $(ldd "$OUT" | awk '{print $1}' | tr '\n' ' '))"

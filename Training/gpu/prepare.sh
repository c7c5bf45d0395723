#!/usr/bin/env bash
# Prepare a training run for a borrowed GPU machine that has PyTorch and CUDA but no network and
# no Swift, and that receives at most 64 MiB of files per command (the repository included):
#
#   bash Training/gpu/prepare.sh WORK_DIR [--config FILE] [--adapter RANK:SCOPE] [--init MODEL_DIR]
#                                [--minutes N] [--max-chunks N] [--corpus DIR] [--head-steps N]
#
# writes .gpu/ in the repository (ignored by git) with one folder per device command:
#   .gpu/p1  the first part of the backbone GGUF            -> device.sh upload .gpu/p1
#   .gpu/p2  the rest of it                                  -> device.sh upload .gpu/p2
#   .gpu/p3  vist2-render (static, xz), the font, the corpus as text-only datasets (tar.xz),
#            and plan.json (the run: schedule, adapter, init, minutes, checksums)
#                                                            -> device.sh train .gpu/p3
# Each part is sized so that it and the repository stay under the limit (checked here). The
# machine keeps what the first commands stored (in $VIST2_GPU_STORE, default /tmp/vist2-gpu)
# while it stays up; the last command renders the corpus with vist2-render, trains with
# Training/train.py on every GPU it has (torchrun when there are several) and leaves the best
# model, the log and the checkpoint (in parts of at most 15 MiB) in $OUT.
# Training/gpu/collect.sh puts what came back into WORK_DIR so that a CPU run continues from it;
# Training/gpu/dry-run.sh runs the whole path on this CPU (CI does).
#
# The corpus: WORK_DIR/corpus (Training/run.sh builds it with Training/build_corpus.py), or
# --corpus DIR with train.jsonl and heldout.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:?usage: bash Training/gpu/prepare.sh WORK_DIR [--config FILE] [--adapter RANK:SCOPE] [--init MODEL_DIR] [--minutes N] [--max-chunks N] [--corpus DIR] [--head-steps N]}"
shift
CONFIG="Training/configs/vist2-smollm2-135m-flow.json"
ADAPTER="8:visual"
INIT="weights/vist2-smollm2-135m"
MINUTES=8
# With --init: the steps of the reading stage that fit only the fresh reading head.
HEAD_STEPS=80
MAXC=0
CORPUS=""
LIMIT=$((64 * 1024 * 1024))
while [[ $# -gt 0 ]]; do
    case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --adapter) ADAPTER="$2"; shift 2 ;;
    --init) INIT="$2"; shift 2 ;;
    --minutes) MINUTES="$2"; shift 2 ;;
    --max-chunks) MAXC="$2"; shift 2 ;;
    --head-steps) HEAD_STEPS="$2"; shift 2 ;;
    --corpus) CORPUS="$2"; shift 2 ;;
    --limit-bytes) LIMIT="$2"; shift 2 ;;  # the per-command limit (tests)
    *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
# The config and the init directory travel with the repository: they must be inside it.
for p in "$CONFIG" ${INIT:+"$INIT"}; do
    [[ -e "$p" && "$(realpath "$p")" == "$ROOT"/* ]] || { echo "prepare.sh: $p must be a path inside the repository" >&2; exit 2; }
done
CONFIG="$(realpath --relative-to="$ROOT" "$CONFIG")"
[[ -z "$INIT" ]] || INIT="$(realpath --relative-to="$ROOT" "$INIT")"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
CORPUS="${CORPUS:-$WORK/corpus}"
PY="$(bash Training/python.sh)"
CTL="$ROOT/.build/release/vist2ctl"
[[ -x "$CTL" ]] || swift build -c release --product vist2ctl
bash scripts/fetch-model.sh >/dev/null
# Where scripts/fetch-model.sh puts it (the model store).
GGUF="${VIST2_MODELS:-${XDG_DATA_HOME:-$HOME/.local/share}/vist2/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$GGUF" ]] || { echo "prepare.sh: the backbone GGUF is not at $GGUF" >&2; exit 1; }
if [[ ! -f "$CORPUS/train.jsonl" ]]; then
    "$PY" Training/build_corpus.py "$CORPUS" --install
fi

# The chunks, cut and tokenized by the engine for this geometry (rendered on the GPU machine).
GEOM="$WORK/gpu-geometry"
[[ -f "$GEOM/vision.safetensors" ]] || "$PY" Training/make_untrained.py "$GEOM" --config "$CONFIG" >/dev/null
OUTDIR="$ROOT/.gpu"
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/p1" "$OUTDIR/p2" "$OUTDIR/p3"
for split in train heldout; do
    rm -rf "$WORK/gpu-ds-$split"
    "$CTL" dataset --model "$GEOM" --text-only --max-chunks "$MAXC" --out "$WORK/gpu-ds-$split" "$CORPUS/$split.jsonl"
    tar -C "$WORK" -cf - "gpu-ds-$split" | xz -T0 -9 >"$OUTDIR/p3/ds-$split.tar.xz"
done

# The renderer without Swift, and the font it needs (its sha256 is the config's).
bash scripts/build-render-tool.sh "$WORK/vist2-render" >/dev/null
xz -T0 -9 -c "$WORK/vist2-render" >"$OUTDIR/p3/vist2-render.xz"
FONT="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["render"]["font"])' "$CONFIG")"
cp "$FONT" "$OUTDIR/p3/font.ttf"

# The backbone in two parts.
SIZE="$(stat -c %s "$GGUF")"
FIRST=$(((SIZE + 1) / 2))
head -c "$FIRST" "$GGUF" >"$OUTDIR/p1/backbone.gguf.part1"
tail -c +"$((FIRST + 1))" "$GGUF" >"$OUTDIR/p2/backbone.gguf.part2"

PROMPT="Transcribe:"
IDS="$("$CTL" tokenize --local --model smollm2-135m --no-special --json "$PROMPT")"
"$PY" - "$OUTDIR" "$GGUF" "$CONFIG" "$ADAPTER" "$INIT" "$MINUTES" "$PROMPT" "$IDS" "$HEAD_STEPS" <<'PYEOF'
import json, os, sys
sys.path.insert(0, "Training/gpu")
from files import sha256 as sha
out, gguf, config, adapter, init, minutes, prompt, ids, head_steps = sys.argv[1:]
p3 = os.path.join(out, "p3")
plan = {
    "backbone": {"parts": ["backbone.gguf.part1", "backbone.gguf.part2"], "size": os.path.getsize(gguf), "sha256": sha(gguf)},
    "files": {name: sha(os.path.join(p3, name)) for name in sorted(os.listdir(p3))},
    "model_config": config, "init": init or None, "minutes": float(minutes),
    "ocr_prompt": prompt, "ocr_prompt_ids": json.loads(ids)["ids"], "seed": 1,
    # From a trained encoder (--init): a short reading stage that fits only the fresh reading head
    # (head_only_A, Training/EXPERIMENTS.md section 10), then OCR and continuation, then OLM.
    # Batches come from the GPU's memory (train.py --batch auto); evaluations every 100 steps on 32
    # held-out chunks.
    "schedule": {"steps_A": int(head_steps) if init else 450, "head_only_A": bool(init), "steps_B": 300, "steps_C": 1000000, "batch_A": 8, "batch_B": 2, "batch_C": 2,
                 "eval_every": 100, "eval_chunks": 32, "lr_A": 1e-3, "lr_B": 3e-4, "lr_C": 2e-4, "warmup": 50,
                 "max_text": 400, "max_blocks": 3, "ocr_share_B": 0.7, "ocr_share_C": 0.3, "aux_weight": 0.1, "scale_weight": 0.0},
}
if adapter:
    rank, scope = adapter.split(":")
    # Exported in bf16: half the size (a shipped model directory stays small) and half the
    # engine's traffic for the factors.
    plan["adapter"] = {"rank": int(rank), "scope": scope, "dtype": "bfloat16"}
json.dump(plan, open(os.path.join(p3, "plan.json"), "w"), indent=1)
PYEOF

# What travels with each command: the repository's files (tracked, and untracked ones git does
# not ignore) plus one part.
REPO_BYTES="$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')"
for part in p1 p2 p3; do
    bytes=$((REPO_BYTES + $(du -sb "$OUTDIR/$part" | cut -f1)))
    echo "$part: $((bytes / 1048576)) MiB with the repository ($((REPO_BYTES / 1048576)) MiB)"
    if ((bytes > LIMIT)); then
        echo "prepare.sh: .gpu/$part and the repository are $bytes bytes, over the $LIMIT a command may carry" >&2
        exit 1
    fi
done
echo "device commands, one after another while the machine stays up (carry the folder named):"
echo "  bash Training/gpu/device.sh upload .gpu/p1"
echo "  bash Training/gpu/device.sh upload .gpu/p2"
echo "  bash Training/gpu/device.sh train .gpu/p3"

#!/usr/bin/env bash
# Train (or continue training) the default VIST2 model: every step from a fresh Debian machine.
#
#   bash Training/run.sh WORK_DIR [--minutes N] [--max-steps N] [--config FILE] [--init MODEL_DIR] [--adapter RANK:SCOPE]
#                        [--device cpu|cuda|auto] [--gpus G] [--batch N|auto] [--tiny]
#
# Each step is skipped when its output already exists, so running this again continues the run
# from its last checkpoint (Training/train.py resumes exactly):
#   1. Python with the pinned requirements (Training/python.sh), the release build of vist2ctl,
#      the backbone GGUF.
#   2. WORK_DIR/backbone: the backbone dequantized by the engine (`vist2ctl export-backbone`).
#   3. WORK_DIR/corpus: the corpus from named Debian packages (Training/build_corpus.py).
#   4. WORK_DIR/ds-{train,heldout}: chunks, token ids and sketch images made by the engine's own
#      chunker, tokenizer and renderer (`vist2ctl dataset`) with the geometry in
#      Training/configs/vist2-smollm2-135m-flow.json (the shipped model's: flowing layout), or
#      --config FILE (e.g. the page, Training/configs/vist2-smollm2-135m.json; see
#      Training/EXPERIMENTS.md).
#   5. WORK_DIR/run: run.json (paths, OCR prompt ids, schedule) and the training itself;
#      WORK_DIR/run/best is the best model directory so far, log.jsonl the loss curve.
#      --init MODEL_DIR starts a new run from a model directory's encoder and aligner (e.g.
#      weights/vist2-smollm2-135m; edit run.json's steps_A/steps_B to skip stages).
#
# Where it trains (Training/train.py): the CPU by default; --device cuda one GPU; --gpus G runs G
# processes with torchrun on this machine, one GPU each (DDP; with --device cpu, G CPU processes
# over Gloo). --batch is the per-process batch (auto: sized to the GPU's memory).
#
# --tiny is the smoke test CI runs: a corpus of this repository's own Markdown files, a handful
# of steps of every stage, minutes not hours. It exercises the same code.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:?usage: bash Training/run.sh WORK_DIR [--minutes N] [--max-steps N] [--config FILE] [--init MODEL_DIR] [--adapter RANK:SCOPE] [--device D] [--gpus G] [--batch N|auto] [--tiny]}"
shift
MINUTES=150
MAX_STEPS=0
TINY=0
CONFIG="$ROOT/Training/configs/vist2-smollm2-135m-flow.json"
INIT=()
ADAPTER=""
DEVICE=cpu
GPUS=1
BATCH=0
while [[ $# -gt 0 ]]; do
    case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --max-steps) MAX_STEPS="$2"; shift 2 ;;
    --config) CONFIG="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --init) INIT=(--init "$2"); shift 2 ;;
    --adapter) ADAPTER="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PY="$(bash "$ROOT/Training/python.sh")"
CTL="$ROOT/.build/release/vist2ctl"
[[ -x "$CTL" ]] || (cd "$ROOT" && swift build -c release --product vist2ctl)
bash "$ROOT/scripts/fetch-model.sh" >/dev/null

[[ -f "$WORK/backbone/model.safetensors" ]] || "$CTL" export-backbone --model smollm2-135m "$WORK/backbone"

if [[ ! -f "$WORK/geometry/vision.safetensors" ]]; then
    # The dataset command needs a model directory for the chunker and renderer; the vision
    # weights in it are never used (the geometry is all it reads).
    "$PY" "$ROOT/Training/make_untrained.py" "$WORK/geometry" --config "$CONFIG" >/dev/null
fi

if [[ $TINY == 1 ]]; then
    [[ -f "$WORK/corpus/train.jsonl" ]] || "$PY" "$ROOT/Training/tiny_corpus.py" "$WORK/corpus" "*.md" "Training/*.py"
    MAXC=12
else
    [[ -f "$WORK/corpus/train.jsonl" ]] || "$PY" "$ROOT/Training/build_corpus.py" "$WORK/corpus" --install
    MAXC=0
fi

for split in train heldout; do
    if [[ ! -f "$WORK/ds-$split/meta.json" ]]; then
        "$CTL" dataset --model "$WORK/geometry" --max-chunks "$MAXC" --out "$WORK/ds-$split.tmp" "$WORK/corpus/$split.jsonl"
        rm -rf "$WORK/ds-$split"
        mv "$WORK/ds-$split.tmp" "$WORK/ds-$split"
    fi
done

mkdir -p "$WORK/run"
if [[ ! -f "$WORK/run/run.json" ]]; then
    PROMPT="Transcribe:"
    IDS="$("$CTL" tokenize --local --model smollm2-135m --no-special --json "$PROMPT")"
    "$PY" - "$WORK" "$CONFIG" "$PROMPT" "$IDS" "$TINY" "$ADAPTER" "${INIT[1]:-}" <<'EOF'
import json, sys
work, config, prompt, ids, tiny = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])["ids"], sys.argv[5] == "1"
init = sys.argv[7]
# The backbone adapter (docs/MODEL.md section 6): --adapter RANK:SCOPE; the smoke test trains a rank-2
# visual one so that the path from training to the engine is exercised.
adapter = sys.argv[6] or ("2:visual" if tiny else "")
if tiny:
    schedule = {"steps_A": 4, "steps_B": 2, "steps_C": 2, "batch_A": 2, "batch_B": 1, "batch_C": 1, "eval_every": 4, "eval_chunks": 1}
else:
    # The lengths the shipped model was trained with: A ~25 min of reading; B OCR + continuation
    # through the backbone; C open-ended OLM, continued by later runs (a run stops after
    # --minutes and resumes from its checkpoint).
    schedule = {"steps_A": 450, "steps_B": 230, "steps_C": 1000000, "batch_A": 8, "batch_B": 2, "batch_C": 2,
                "eval_every": 200, "eval_chunks": 16}
schedule.update({"lr_A": 1e-3, "lr_B": 3e-4, "lr_C": 2e-4, "warmup": 100 if not tiny else 2, "max_text": 400, "max_blocks": 3,
                 "ocr_share_B": 0.7, "ocr_share_C": 0.3, "aux_weight": 0.1, "scale_weight": 0.0})
run = {"backbone": f"{work}/backbone", "train": f"{work}/ds-train", "heldout": f"{work}/ds-heldout", "model_config": config,
       "ocr_prompt": prompt, "ocr_prompt_ids": ids, "seed": 1, "schedule": schedule}
if adapter:
    rank, scope = adapter.split(":")
    run["adapter"] = {"rank": int(rank), "scope": scope}
if init:
    run["init"] = init  # where the run started (--init): the model card names it
json.dump(run, open(f"{work}/run/run.json", "w"), indent=1)
EOF
fi

if [[ ! "$GPUS" =~ ^[1-9][0-9]*$ ]]; then echo "run.sh: --gpus must be a positive number" >&2; exit 2; fi
TRAIN=("$PY")
[[ $GPUS == 1 ]] || TRAIN+=(-m torch.distributed.run --standalone --nproc_per_node "$GPUS")
exec "${TRAIN[@]}" "$ROOT/Training/train.py" --run-dir "$WORK/run" --minutes "$MINUTES" --max-steps "$MAX_STEPS" \
    --device "$DEVICE" --batch "$BATCH" "${INIT[@]}"

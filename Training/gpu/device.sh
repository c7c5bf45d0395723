#!/usr/bin/env bash
# The GPU machine's side of a prepared run (Training/gpu/prepare.sh writes the parts). Needs only
# bash, Python with PyTorch, numpy and safetensors, and the C library: no Swift, no network.
#
#   bash Training/gpu/device.sh upload .gpu/p1      # stores a part of the backbone GGUF
#   bash Training/gpu/device.sh upload .gpu/p2      # ... and, once all are there, joins and checks it
#   bash Training/gpu/device.sh train .gpu/p3 [--device cuda|cpu] [--minutes N] [--max-steps N]
#
# State between commands lives in $VIST2_GPU_STORE (default /tmp/vist2-gpu), which survives while
# the machine stays up. `train` renders the text-only corpus with the static vist2-render,
# writes run.json, trains with Training/train.py (torchrun over every GPU when there are
# several; --batch auto) and puts into $OUT one tar in parts of at most 15 MiB (results.tar.NNN,
# results.json): best/ (the model directory), log.jsonl, run.json, the GPU's name, the
# timings and weights.pt (the checkpoint without optimiser moments). Training/gpu/collect.sh
# unpacks it on the other side.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # the device tool returns the output's tail: print as it happens
STORE="${VIST2_GPU_STORE:-/tmp/vist2-gpu}"
cmd="${1:?usage: device.sh upload PART_DIR | train PART_DIR [--device D] [--minutes N] [--max-steps N]}"
part="${2:?usage: device.sh upload PART_DIR | train PART_DIR [...]}"
shift 2
mkdir -p "$STORE"
cd "$ROOT"

case "$cmd" in
upload)
    cp "$part"/backbone.gguf.part* "$STORE/"
    ls -la "$STORE"
    exit 0
    ;;
train) ;;
*) echo "device.sh: unknown command $cmd" >&2; exit 2 ;;
esac

DEVICE=cuda
MINUTES=""
MAX_STEPS=0
while [[ $# -gt 0 ]]; do
    case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --minutes) MINUTES="$2"; shift 2 ;;
    --max-steps) MAX_STEPS="$2"; shift 2 ;;
    *) echo "device.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
OUT="${OUT:?device.sh train writes its results to \$OUT}"
PLAN="$part/plan.json"
T0=$(date +%s)

# The backbone: the stored parts, joined and checked.
"$PY" - "$PLAN" "$STORE" <<'PYEOF'
import json, os, sys
sys.path.insert(0, "Training/gpu")
from files import sha256 as digest
plan, store = json.load(open(sys.argv[1])), sys.argv[2]
b = plan["backbone"]
target = os.path.join(store, "backbone.gguf")
if not (os.path.exists(target) and os.path.getsize(target) == b["size"] and digest(target) == b["sha256"]):
    missing = [p for p in b["parts"] if not os.path.exists(os.path.join(store, p))]
    if missing:
        sys.exit(f"device.sh: backbone parts missing in {store}: {missing} (run `device.sh upload` with each part first)")
    with open(target + ".tmp", "wb") as out:
        for p in b["parts"]:
            with open(os.path.join(store, p), "rb") as f:
                out.write(f.read())
    if digest(target + ".tmp") != b["sha256"]:
        sys.exit("device.sh: the joined backbone's sha256 differs from the plan's (a part is damaged)")
    os.replace(target + ".tmp", target)
for name, want in plan["files"].items():
    if name != "plan.json" and digest(os.path.join(os.path.dirname(sys.argv[1]), name)) != want:
        sys.exit(f"device.sh: {name}'s sha256 differs from the plan's")
print(f"backbone {target}: {b['size']} bytes, sha256 ok")
PYEOF

# The renderer and the corpus: text-only datasets rendered here by vist2-render.
"$PY" - "$part" "$STORE" <<'PYEOF'
import lzma, os, shutil, stat, sys, tarfile
part, store = sys.argv[1], sys.argv[2]
tool = os.path.join(store, "vist2-render")
with lzma.open(os.path.join(part, "vist2-render.xz")) as f, open(tool + ".tmp", "wb") as out:
    shutil.copyfileobj(f, out)
os.chmod(tool + ".tmp", stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)
os.replace(tool + ".tmp", tool)
for split in ("train", "heldout"):
    shutil.rmtree(os.path.join(store, f"gpu-ds-{split}"), ignore_errors=True)
    with tarfile.open(os.path.join(part, f"ds-{split}.tar.xz")) as t:
        t.extractall(store, filter="data")
PYEOF
CONFIG="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_config"])' "$PLAN")"
PIDS=()
for split in train heldout; do
    rm -rf "$STORE/ds-$split"
    "$STORE/vist2-render" dataset --config "$CONFIG" --font "$part/font.ttf" --out "$STORE/ds-$split" "$STORE/gpu-ds-$split" &
    PIDS+=($!)
done
for p in "${PIDS[@]}"; do wait "$p" || { echo "device.sh: rendering failed" >&2; exit 1; }; done
T_RENDER=$(date +%s)

# run.json from the plan; a new run each time (the store keeps no half-finished run).
rm -rf "$STORE/run"
mkdir -p "$STORE/run"
"$PY" - "$PLAN" "$STORE" "$ROOT" <<'PYEOF'
import json, os, sys
plan, store, root = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
run = {"backbone": os.path.join(store, "backbone.gguf"), "train": os.path.join(store, "ds-train"),
       "heldout": os.path.join(store, "ds-heldout"), "model_config": os.path.join(root, plan["model_config"]),
       "ocr_prompt": plan["ocr_prompt"], "ocr_prompt_ids": plan["ocr_prompt_ids"], "seed": plan["seed"],
       "schedule": plan["schedule"]}
if plan.get("adapter"):
    run["adapter"] = plan["adapter"]
json.dump(run, open(os.path.join(store, "run", "run.json"), "w"), indent=1)
PYEOF
MINUTES="${MINUTES:-$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["minutes"])' "$PLAN")}"
INIT="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("init") or "")' "$PLAN")"
GPUS=1
if [[ "$DEVICE" == cuda ]]; then
    GPUS="$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$OUT/gpus.txt" 2>/dev/null || rm -f "$OUT/gpus.txt"
fi
TRAIN=("$PY")
[[ "$GPUS" == 1 ]] || TRAIN+=(-m torch.distributed.run --standalone --nproc_per_node "$GPUS")
BATCH=auto
[[ "$DEVICE" == cuda ]] || BATCH=0
set +e
"${TRAIN[@]}" Training/train.py --run-dir "$STORE/run" --device "$DEVICE" --batch "$BATCH" --minutes "$MINUTES" \
    --max-steps "$MAX_STEPS" --checkpoint-minutes 3 ${INIT:+--init "$INIT"} 2>&1 | tee "$OUT/train.txt"
STATUS=${PIPESTATUS[0]}
set -e
T_TRAIN=$(date +%s)

# What comes back, within the device tool's limits (at most 8 files of 16 MiB, 64 MiB in all):
# one tar of best/ (the model directory), the log, run.json, the timings and weights.pt (the
# checkpoint without its optimiser moments: the trained weights in f32, step, best scores), cut
# into parts of 15 MiB, and results.json with their sha256. Without room for weights.pt, only
# the model directory and the log come back (results.json says so).
"$PY" - "$STORE/run" "$OUT" "$T0" "$T_RENDER" "$T_TRAIN" "$GPUS" "$DEVICE" "$STATUS" <<'PYEOF'
import hashlib, io, json, os, sys, tarfile
import torch
run, out, t0, tr, tt, gpus, device, status = sys.argv[1:]
timing = {"render_s": int(tr) - int(t0), "train_s": int(tt) - int(tr), "processes": int(gpus), "device": device,
          "train_status": int(status)}
PART, MAX_PARTS, MAX_TOTAL = 15 << 20, 7, 62 << 20

def pack(with_weights):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in ("best", "log.jsonl", "run.json"):
            if os.path.exists(os.path.join(run, name)):
                t.add(os.path.join(run, name), arcname=name)
        for name in ("train.txt", "gpus.txt"):
            if os.path.exists(os.path.join(out, name)):
                t.add(os.path.join(out, name), arcname=name)
        extra = {"device.json": json.dumps(timing).encode()}
        ck = os.path.join(run, "checkpoint.pt")
        if with_weights and os.path.exists(ck):
            st = torch.load(ck, map_location="cpu", weights_only=False)
            light = io.BytesIO()
            torch.save({k: st[k] for k in ("model", "step", "best", "elapsed", "run") if k in st}, light)
            extra["weights.pt"] = light.getvalue()
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

data = pack(True)
weights = True
if len(data) > min(MAX_TOTAL, MAX_PARTS * PART):
    data, weights = pack(False), False
if len(data) > min(MAX_TOTAL, MAX_PARTS * PART):
    sys.exit(f"device.sh: the results are {len(data)} bytes even without weights.pt, more than can come back")
for name in os.listdir(out):
    os.remove(os.path.join(out, name))  # only what is listed in results.json comes back
parts = []
for i in range(0, len(data), PART):
    parts.append(f"results.tar.{i // PART:03d}")
    with open(os.path.join(out, parts[-1]), "wb") as f:
        f.write(data[i:i + PART])
json.dump({"parts": parts, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "weights": weights, **timing},
          open(os.path.join(out, "results.json"), "w"), indent=1)
print(f"results: {len(data)} bytes in {len(parts)} parts" + ("" if weights else " (without weights.pt: too large)"))
PYEOF
ls -la "$OUT"
exit "$STATUS"

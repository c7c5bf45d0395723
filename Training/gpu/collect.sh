#!/usr/bin/env bash
# Put what a GPU run brought back (results.json and results.tar.NNN from `device.sh train`) into
# a work directory: the parts joined and checked, then WORK/run/best (the model directory),
# WORK/run/log.jsonl (appended), WORK/run/checkpoint.pt (weights.pt: the trained weights
# without optimiser moments; an existing checkpoint is kept as checkpoint.pt.before-gpu) and
# WORK/gpu-result (timings, the training output). A CPU run then continues from it
# (`bash Training/run.sh WORK`; the optimiser moments start afresh), and `bash
# Training/package.sh WORK DEST` packages the best model.
#
#   bash Training/gpu/collect.sh RESULT_DIR WORK_DIR
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
RESULT="${1:?usage: collect.sh RESULT_DIR WORK_DIR}"
WORK="${2:?usage: collect.sh RESULT_DIR WORK_DIR}"
PY="$(bash "$ROOT/Training/python.sh")"
mkdir -p "$WORK/run"
ROOT="$ROOT" "$PY" - "$RESULT" "$WORK" <<'PYEOF'
import hashlib, io, json, os, shutil, sys, tarfile
res, work = sys.argv[1], os.path.abspath(sys.argv[2])
run, root = os.path.join(work, "run"), os.environ["ROOT"]
meta = json.load(open(os.path.join(res, "results.json")))
data = b"".join(open(os.path.join(res, p), "rb").read() for p in meta["parts"])
if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
    sys.exit("collect.sh: the joined results differ from results.json (a part is missing or damaged)")
got = os.path.join(work, "gpu-result")
shutil.rmtree(got, ignore_errors=True)
with tarfile.open(fileobj=io.BytesIO(data)) as t:
    t.extractall(got, filter="data")
if os.path.isdir(os.path.join(got, "best")):
    shutil.rmtree(os.path.join(run, "best"), ignore_errors=True)
    shutil.copytree(os.path.join(got, "best"), os.path.join(run, "best"))
if os.path.exists(os.path.join(got, "log.jsonl")):
    with open(os.path.join(run, "log.jsonl"), "a") as log:
        log.write(open(os.path.join(got, "log.jsonl")).read())
if os.path.exists(os.path.join(got, "weights.pt")):
    ck = os.path.join(run, "checkpoint.pt")
    if os.path.exists(ck):
        os.replace(ck, ck + ".before-gpu")
    shutil.copyfile(os.path.join(got, "weights.pt"), ck)
# run.json for continuing here: the GPU run's schedule, adapter and prompt, with this machine's
# paths in Training/run.sh's layout (run.sh builds what is missing of it).
if not os.path.exists(os.path.join(run, "run.json")) and os.path.exists(os.path.join(got, "run.json")):
    r = json.load(open(os.path.join(got, "run.json")))
    r.update(backbone=os.path.join(work, "backbone"), train=os.path.join(work, "ds-train"), heldout=os.path.join(work, "ds-heldout"),
             model_config=os.path.join(root, "Training", r["model_config"].split("/Training/", 1)[1]))
    json.dump(r, open(os.path.join(run, "run.json"), "w"), indent=1)
print(f"{res}: {len(data)} bytes, sha256 ok -> {run}/best" + (", checkpoint.pt" if meta.get("weights") else " (no weights.pt)"))
PYEOF

#!/usr/bin/env bash
# VIST2 vs full-text on the same engine and backbone, side by side, in one run.
#
#   scripts/bench-vist2.sh [-t THREADS] [-n GENERATED] [--model DIR] [--doc FILE] [--keep-openblas-env]
#
# Model: SmolLM2-135M with the default VIST2 geometry and *untrained* vision weights
# (Training/make_untrained.py; costs do not depend on the weights), or --model (e.g. default, whose
# backbone adapter adds its cost to visual rows). Document: the longest prefix of Debian's GPL-3
# text (or --doc FILE, e.g. source code), cut at a line end, with which full-text mode (instruction + document +
# the N generated tokens) still fits SmolLM2's 8192-token context, so both modes do the same
# work; the script refuses to report if they did not generate the same number of tokens. Reports time to first token, peak and final KV bytes and
# FLOPs for both modes and their ratios; also the chunker's ratio and edit locality on a ~20k-token
# document (GPL-3 + GPL-2 + Apache-2.0 + LGPL-2.1).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=$(nproc)
N=1000
KEEP_ENV=0
MODEL=""
DOC=/usr/share/common-licenses/GPL-3
while (($#)); do
    case "$1" in
    -t) THREADS=$2; shift 2 ;;
    -n) N=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --doc) DOC=$2; shift 2 ;;
    --keep-openblas-env) KEEP_ENV=1; shift ;;
    *) echo "usage: $0 [-t threads] [-n generated] [--model DIR] [--doc FILE] [--keep-openblas-env]" >&2; exit 2 ;;
    esac
done
ENVCMD=(env)
((KEEP_ENV)) || ENVCMD=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)

bash scripts/fetch-model.sh >/dev/null
WORK="${XDG_CACHE_HOME:-$HOME/.cache}/vist2/bench"
mkdir -p "$WORK"
if [[ -z "$MODEL" ]]; then
    MODEL="$WORK/untrained-vist2"
    "$(bash Training/python.sh)" Training/make_untrained.py "$MODEL" >/dev/null
fi
swift build -c release --product vist2ctl >/dev/null
CTL=.build/release/vist2ctl

L=/usr/share/common-licenses
# Longest line-end prefix of the document whose full-text prompt leaves room for N tokens of generation
# (the prompt is the document plus the chat template around the instruction: 10 tokens here).
python3 - "$CTL" "$DOC" "$WORK/doc8k.txt" "$N" <<'PYEOF'
import json, subprocess, sys
ctl, src, dst, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
budget = 8192 - n - 10
lines = open(src).read().split("\n")
def tokens(text):
    return len(json.loads(subprocess.run([ctl, "tokenize", "--local", "--json", "--", text], capture_output=True, check=True, text=True).stdout)["ids"])
lo, hi = 1, len(lines)
while lo < hi:
    mid = (lo + hi + 1) // 2
    if tokens("\n".join(lines[:mid]) + "\n") <= budget:
        lo = mid
    else:
        hi = mid - 1
open(dst, "w").write("\n".join(lines[:lo]) + "\n")
PYEOF
cat "$L/GPL-3" "$L/GPL-2" "$L/Apache-2.0" "$L/LGPL-2.1" > "$WORK/doc20k.txt"
PROMPT="Summarize the following text."

run() {
    "${ENVCMD[@]}" "$CTL" generate --local --model "$MODEL" --threads "$THREADS" --doc "$WORK/doc8k.txt" \
        --max-tokens "$N" --ignore-eos --temperature 0 --json "$@" "$PROMPT"
}
echo "running full-text mode ..." >&2
FULL=$(run --full-text)
echo "running VIST2 mode ..." >&2
COMP=$(run)

"$CTL" render --local --model "$MODEL" --out "$WORK/render-a" --json "$WORK/doc20k.txt" > "$WORK/a.json"
python3 - "$WORK/doc20k.txt" "$WORK/doc20k-edit.txt" <<'PYEOF'
import sys
lines = open(sys.argv[1]).read().split("\n")
i = len(lines) // 2
while not lines[i].strip():
    i += 1
lines[i] += " (edited)"
open(sys.argv[2], "w").write("\n".join(lines))
PYEOF
"$CTL" render --local --model "$MODEL" --out "$WORK/render-b" --json "$WORK/doc20k-edit.txt" > "$WORK/b.json"

python3 - "$FULL" "$COMP" "$WORK/a.json" "$WORK/b.json" "$THREADS" "$KEEP_ENV" "$(basename "$DOC")" <<'PYEOF'
import json, sys
full, comp = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if full["generated_tokens"] != comp["generated_tokens"]:
    sys.exit("full-text generated %d tokens, VIST2 %d: not the same work, no comparison"
             % (full["generated_tokens"], comp["generated_tokens"]))
a, b = json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
print("== one run, %s threads, OpenBLAS env %s, %s on %d document tokens ==" % (sys.argv[5], "kept" if sys.argv[6] == "1" else "unset", sys.argv[7], full["prompt_tokens"]))
print("%-22s %14s %14s %10s" % ("", "full-text", "VIST2", "VIST2/full"))
def row(name, key, fmt="%14.1f"):
    f, c = full[key], comp[key]
    print(("%-22s " + fmt + " " + fmt + " %9.2fx") % (name, f, c, c / f if f else float("nan")))
row("prompt tokens", "prompt_tokens", "%14d")
row("generated tokens", "generated_tokens", "%14d")
row("TTFT (ms)", "ttft_ms")
row("KV peak (bytes)", "kv_bytes", "%14d")
row("KV final (bytes)", "kv_bytes_final", "%14d")
row("FLOPs", "flops", "%14.3g")
row("decode tokens/s", "decode_tokens_per_s")
print("VIST2: %d chunks as images (%d from generation swaps), compression ratio %.2f, render %.0f ms, vision %.0f ms"
      % (comp["chunks"], comp["swaps"], comp["compression_ratio"], comp["render_ms"], comp["vision_ms"]))
kv = 1 - comp["kv_bytes"] / full["kv_bytes"]
kvf = 1 - comp["kv_bytes_final"] / full["kv_bytes_final"]
fl = 1 - comp["flops"] / full["flops"]
tt = full["ttft_ms"] / comp["ttft_ms"]
print("targets: KV >= 70%% smaller: peak %.1f%%, final %.1f%%; FLOPs >= 65%% fewer: %.1f%%; TTFT >= 3x faster: %.2fx" % (100 * kv, 100 * kvf, 100 * fl, tt))
A = set(c["text"] for c in a["chunk_list"])
changed = sum(1 for c in b["chunk_list"] if c["text"] not in A)
print("chunker on a %d-token document: ratio %.2f (target >= 3.5 at r = 4), one-line edit changed %d chunk(s) (target <= 2)"
      % (a["tokens"], a["ratio"], changed))
print(json.dumps({"kv_peak_reduction": kv, "kv_final_reduction": kvf, "flops_reduction": fl, "ttft_speedup": tt,
                  "chunker_ratio": a["ratio"], "edit_changed_chunks": changed}))
PYEOF

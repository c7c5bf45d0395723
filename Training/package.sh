#!/usr/bin/env bash
# Package the best checkpoint of a training run as a model directory with its model card.
#
#   bash Training/package.sh WORK_DIR OUT_DIR [--chunks N]
#
# WORK_DIR/notes.md, when present, goes into the card as its "Findings" section.
# Copies WORK_DIR/run/best (config.json, vision.safetensors, adapter/ if any) to OUT_DIR, measures it with
# `vist2ctl eval` (the first N chunks, default 8, of held-out text of each kind and of a text
# outside the corpus), shows what it reads from one chunk of each held-out text, generates
# samples with and without visual context, and writes
# OUT_DIR/README.md and OUT_DIR/curves.png (Training/model_card.py). OUT_DIR is replaced only
# when everything succeeded.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:?usage: bash Training/package.sh WORK_DIR OUT_DIR [--chunks N]}"
OUT="${2:?usage: bash Training/package.sh WORK_DIR OUT_DIR [--chunks N]}"
CHUNKS=8
[[ "${3:-}" == "--chunks" ]] && CHUNKS="${4:?--chunks needs a number}"
PY="$(bash "$ROOT/Training/python.sh")"
CTL="$ROOT/.build/release/vist2ctl"
[[ -f "$WORK/run/best/vision.safetensors" ]] || { echo "package.sh: $WORK/run/best has no checkpoint yet" >&2; exit 1; }

STAGE="$(mktemp -d "${OUT%/}.tmp.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
cp "$WORK/run/best/config.json" "$WORK/run/best/vision.safetensors" "$STAGE/"
# The backbone adapter, when the run trained one (config.json names it).
[[ -d "$WORK/run/best/adapter" ]] && cp -r "$WORK/run/best/adapter" "$STAGE/adapter"
EVAL="$STAGE/.eval"
mkdir -p "$EVAL"

# Held-out text of each kind (never trained on), and a license text that is not in the corpus.
"$PY" - "$WORK/corpus/heldout.jsonl" "$EVAL" <<'EOF'
import json, sys
src, out = sys.argv[1], sys.argv[2]
texts = {}
for line in open(src):
    r = json.loads(line)
    kind = r.get("kind", "text")
    if len(texts.get(kind, "")) < 40000:
        texts[kind] = texts.get(kind, "") + r["text"] + "\n"
for kind, t in texts.items():
    open(f"{out}/heldout-{kind}.txt", "w").write(t)
EOF
cp /usr/share/common-licenses/GPL-3 "$EVAL/external-GPL-3.txt"

echo "{" > "$EVAL/evals.json"
first=1
for f in "$EVAL"/heldout-*.txt "$EVAL/external-GPL-3.txt"; do
    label="$(basename "$f" .txt)"
    echo "eval $label ..." >&2
    r="$("$CTL" eval --model "$STAGE" --max-chunks "$CHUNKS" --json "$f")"
    # Packing: text tokens per visual token over the whole text, as the engine chunks it (the
    # chunks are kept for "What it reads" below).
    "$CTL" render --local --model "$STAGE" --out "$EVAL/render-$label" --json "$f" > "$EVAL/render-$label.json"
    p="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ratio"])' "$EVAL/render-$label.json")"
    [[ $first == 1 ]] || echo "," >> "$EVAL/evals.json"
    first=0
    printf '"%s": {"file": "%s", "packing": %s, "result": %s}\n' "$label" "$label" "$p" "$r" >> "$EVAL/evals.json"
done
echo "}" >> "$EVAL/evals.json"

# Samples: the same question about a document read as visual blocks, as full text, and not at all.
head -c 9000 /usr/share/common-licenses/GPL-3 > "$EVAL/GPL-3-first-9000.txt"
Q="Continue the text."
sample() {  # title, max tokens, then the vist2ctl arguments
    local title="$1" n="$2"
    shift 2
    local out
    out="$("$CTL" generate --local --model "$STAGE" --max-tokens "$n" --temperature 0 "$@" 2>/dev/null | head -c 2000)"
    "$PY" -c 'import json,sys; print(json.dumps({"title": sys.argv[1], "command": "vist2ctl generate " + " ".join(sys.argv[3:]), "output": sys.argv[2]}))' \
        "$title" "$out" --max-tokens "$n" --temperature 0 "${@//$EVAL\//}"
}
# The README's main command, compressed and in full text.
APACHE=/usr/share/common-licenses/Apache-2.0
ASK="What does this license say about patents?"
{
    echo "["
    sample "The README's main command: the Apache-2.0 license as visual blocks" 120 --doc "$APACHE" --chat "$ASK"
    echo ","
    sample "The same question over the same document as full text" 120 --doc "$APACHE" --full-text --chat "$ASK"
    echo ","
    sample "The first 9,000 characters of the GPL-3 as visual blocks (plus the live last chunk as text)" 80 --doc "$EVAL/GPL-3-first-9000.txt" "$Q"
    echo ","
    sample "The same document as full text" 80 --doc "$EVAL/GPL-3-first-9000.txt" --full-text "$Q"
    echo ","
    sample "No document" 80 "$Q"
    echo "]"
} > "$EVAL/samples.json"

# What the model reads: the first chunk of each held-out text, its text and its transcription
# from the sketch image alone.
"$PY" - "$CTL" "$STAGE" "$EVAL" "$EVAL"/heldout-*.txt > "$EVAL/readings.json" <<'EOF'
import json, os, subprocess, sys
ctl, model, tmp, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
out = []
for f in files:
    run = lambda *a: json.loads(subprocess.run([ctl, *a], check=True, capture_output=True, text=True).stdout)
    label = os.path.basename(f)[:-4]
    chunk = json.load(open(os.path.join(tmp, f"render-{label}.json")))["chunk_list"][0]
    read = run("eval", "--model", model, "--max-chunks", "1", "--show", "--json", f)
    out.append({"title": label, "text": chunk["text"], "read": read["transcriptions"][0],
                "ocr_char_accuracy": read["ocr_char_accuracy"]})
print(json.dumps(out))
EOF

CARD=()
[[ -f "$WORK/notes.md" ]] && CARD=(--notes "$WORK/notes.md")
# The model this one replaces, when OUT_DIR holds one: the card compares them text by text.
[[ -f "$OUT/eval.json" ]] && CARD+=(--previous "$OUT/eval.json")
"$PY" "$ROOT/Training/model_card.py" --work "$WORK" --model "$STAGE" --evals "$EVAL/evals.json" --samples "$EVAL/samples.json" \
    --readings "$EVAL/readings.json" "${CARD[@]}"
cp "$EVAL/evals.json" "$STAGE/eval.json"
rm -rf "$EVAL"
chmod 755 "$STAGE"
find "$STAGE" -mindepth 1 -type d -exec chmod 755 {} +
find "$STAGE" -type f -exec chmod 644 {} +
rm -rf "$OUT.old"
[[ -e "$OUT" ]] && mv "$OUT" "$OUT.old"
mv "$STAGE" "$OUT"
rm -rf "$OUT.old"
trap - EXIT
echo "packaged $OUT"

#!/usr/bin/env bash
# kill -9 during compress, N rounds (default 100), against the tiny test model and a cache budget
# smaller than the document's entries (so evictions happen while it is killed too). Then checks:
# the restarted daemon leaves no temporary files in the cache, no entry past the budget, every
# damaged entry is detected (a miss, never served), and compress + generate over the document
# give exactly what a clean daemon with an empty cache gives.
#   bash scripts/reliability/kill9.sh [ROUNDS]      (needs a release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS="${1:-100}"
MODEL=Tests/VistEngineTests/Fixtures/tiny-vist2
# Less than the document's entries (~35 chunks of ~7 KB), so the budget evicts during the run.
BUDGET=$((200 << 10))
WORK="$(mktemp -d)"
DOC="$WORK/doc.txt"
# As much as the tiny model's context holds compressed (512 positions: ~35 chunks).
head -c 1400 /usr/share/common-licenses/GPL-3 >"$DOC"
PID=""
trap '[[ -n "$PID" ]] && kill -9 $PID 2>/dev/null; rm -rf "$WORK"' EXIT
start() { # cache dir, socket
    .build/release/vist2d --model "$MODEL" --socket "$2" --cache-dir "$1" --cache-size $BUDGET --threads 1 2>>"$WORK/vist2d.log" &
    PID=$!
    for _ in $(seq 200); do [[ -S "$2" ]] && .build/release/vist2ctl status --socket "$2" >/dev/null 2>&1 && return; sleep 0.05; done
    echo "kill9: vist2d did not start" >&2
    exit 1
}
stop() { kill -TERM $PID; wait $PID || true; PID=""; }
ctl() { .build/release/vist2ctl "$@"; }
field() { grep -o "\"$1\" *: *[^,}]*" | head -1 | sed 's/.*: *//'; }

# The reference: a clean daemon, an empty cache.
start "$WORK/ref-cache" "$WORK/ref.sock"
ref_compress="$(ctl compress --socket "$WORK/ref.sock" --json $DOC)"
ref_text="$(ctl generate --socket "$WORK/ref.sock" --doc $DOC --max-tokens 24 --temperature 0 --json "Continue:" | field text)"
stop

SOCK="$WORK/vist2.sock"
killed_during=0
for round in $(seq "$ROUNDS"); do
    start "$WORK/cache" "$SOCK"
    ctl compress --socket "$SOCK" --json $DOC >/dev/null 2>&1 &
    CPID=$!
    sleep "$(printf '0.%03d' $((RANDOM % 120)))"
    kill -0 $CPID 2>/dev/null && killed_during=$((killed_during + 1))
    kill -9 $PID
    wait $PID 2>/dev/null || true
    PID=""
    wait $CPID 2>/dev/null || true
done

start "$WORK/cache" "$SOCK"
tmp_left="$(find "$WORK/cache" -name '.tmp-*' | wc -l)"
bytes_on_disk="$(find "$WORK/cache" -name '*.v2c' -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
after="$(ctl compress --socket "$SOCK" --json $DOC)"
text="$(ctl generate --socket "$SOCK" --doc $DOC --max-tokens 24 --temperature 0 --json "Continue:" | field text)"
stats="$(ctl cache stats --socket "$SOCK" --json)"
stop
damaged="$(grep -c "ignoring .* entry" "$WORK/vist2d.log" || true)"
ok=1
[[ "$tmp_left" == 0 ]] || { echo "kill9: $tmp_left temporary files left after restart"; ok=0; }
((bytes_on_disk <= BUDGET)) || { echo "kill9: $bytes_on_disk bytes on disk, budget $BUDGET"; ok=0; }
[[ "$(field chunks <<<"$after")" == "$(field chunks <<<"$ref_compress")" ]] || { echo "kill9: compress differs: $after vs $ref_compress"; ok=0; }
[[ "$text" == "$ref_text" ]] || { echo "kill9: generated text differs after the kills: $text vs $ref_text"; ok=0; }
printf '{"rounds": %d, "killed_during_compress": %d, "damaged_entries_detected": %d, "temp_files_left": %d, "bytes_on_disk": %d, "budget": %d, "same_text_as_clean_run": %s, "cache_stats": %s}\n' \
    "$ROUNDS" "$killed_during" "$damaged" "$tmp_left" "$bytes_on_disk" "$BUDGET" "$([[ "$text" == "$ref_text" ]] && echo true || echo false)" "$stats"
((ok)) && echo "kill9: 1 passed, 0 failed" || { echo "kill9: 0 passed, 1 failed"; exit 1; }

#!/usr/bin/env bash
# A cache on a full filesystem and on a read-only one (root: a small tmpfs, then remounted
# read-only). Compress must succeed without caching, the daemon must log the failure once (not
# per entry), and what was stored before must still be served.
#   bash scripts/reliability/disk.sh        (root; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ "$(id -u)" == 0 ]] || { echo "disk: needs root (mount)" >&2; exit 1; }
MODEL=Tests/VistEngineTests/Fixtures/tiny-vist2
WORK="$(mktemp -d)"
MNT="$WORK/cache"
mkdir -p "$MNT"
PID=""
trap '[[ -n "$PID" ]] && { kill -9 $PID; wait $PID; } 2>/dev/null; umount "$MNT" 2>/dev/null; rm -rf "$WORK"' EXIT
SOCK="$WORK/vist2.sock"
ctl() { .build/release/vist2ctl "$@"; }
field() { grep -o "\"$1\" *: *[^,}]*" | head -1 | sed 's/.*: *//'; }
# The tiny model's context holds ~40 chunks (~1,400 characters); its entries take ~12 KB a chunk in tmpfs pages.
head -c 300 /usr/share/common-licenses/Apache-2.0 >"$WORK/small.txt"
head -c 1400 /usr/share/common-licenses/GPL-3 >"$WORK/large.txt"
# Room for the small document's entries and the lock, not for the large one's.
mount -t tmpfs -o size=200k tmpfs "$MNT"
.build/release/vist2d --model "$MODEL" --socket "$SOCK" --cache-dir "$MNT" --threads 1 2>"$WORK/vist2d.log" &
PID=$!
for _ in $(seq 200); do ctl status --socket "$SOCK" >/dev/null 2>&1 && break; sleep 0.05; done
ok=1
small="$(ctl compress --socket "$SOCK" --json "$WORK/small.txt")" || { echo "disk: compress failed with room"; ok=0; }
large="$(ctl compress --socket "$SOCK" --json "$WORK/large.txt")" || { echo "disk: compress failed on a full disk"; ok=0; }
errors_full="$(ctl metrics --socket "$SOCK" | awk '/^vist2_cache_write_errors_total/ {print $2}')"
logged_full="$(grep -c "cannot write" "$WORK/vist2d.log" || true)"
# Read-only: the entries stored before are still served; new ones are not stored.
mount -o remount,ro "$MNT"
again="$(ctl compress --socket "$SOCK" --json "$WORK/small.txt")" || { echo "disk: compress failed on a read-only cache"; ok=0; }
hits="$(field prefix_cache_hits <<<"$again")"
[[ "$hits" == "$(($(field chunks <<<"$small") - 1))" ]] || { echo "disk: stored entries lost: $again"; ok=0; }
other="$(head -c 600 /usr/share/common-licenses/GPL-2 | tee "$WORK/other.txt" >/dev/null; ctl compress --socket "$SOCK" --json "$WORK/other.txt")" ||
    { echo "disk: compress failed on a read-only cache"; ok=0; }
gen="$(ctl generate --socket "$SOCK" --doc "$WORK/large.txt" --max-tokens 8 --temperature 0 --json "Go:")" ||
    { echo "disk: generate failed on a read-only cache"; ok=0; }
logged="$(grep -c "cannot write" "$WORK/vist2d.log" || true)"
kill -TERM $PID
code=0
wait $PID || code=$?
PID=""
((code == 0)) || { echo "disk: vist2d exited $code on SIGTERM"; cp "$WORK/vist2d.log" /tmp/vist2d-disk-crash.log; grep -A12 -m1 -E "Crashed|Fatal error" "$WORK/vist2d.log"; ok=0; }
((errors_full > 0)) || { echo "disk: the full disk caused no write error (tmpfs too large?)"; ok=0; }
((logged_full == 1)) || { echo "disk: the full disk was logged $logged_full times"; ok=0; }
((logged <= 2)) || { echo "disk: write failures were logged $logged times"; ok=0; }
printf '{"full": {"compress_chunks": %s, "write_errors": %s, "log_lines": %d}, "read_only": {"prefix_cache_hits": %s, "log_lines_total": %d}, "generate_stop_reason": %s}\n' \
    "$(field chunks <<<"$large")" "$errors_full" "$logged_full" "$hits" "$logged" "$(field stop_reason <<<"$gen")"
((ok)) && echo "disk: 1 passed, 0 failed" || { echo "disk: 0 passed, 1 failed"; cat "$WORK/vist2d.log" | tail -20; exit 1; }

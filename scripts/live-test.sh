#!/usr/bin/env bash
# Clients other than vist2ctl against a live vist2d (the tiny test model): the C example program
# (clients/c/examples) and the independent Python client (protoc --python_out + protobuf).
# Run by scripts/test.sh after the Swift tests; needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
SOCK="$WORK/vist2.sock"
MODEL=Tests/VistEngineTests/Fixtures/tiny-vist2
.build/release/vist2d --model "$MODEL" --socket "$SOCK" --cache-dir "$WORK/cache" --threads 1 2> "$WORK/vist2d.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do [[ -S "$SOCK" ]] && break; sleep 0.1; done
head -c 1000 /usr/share/common-licenses/Apache-2.0 > "$WORK/doc.txt"

make -s -C clients/c example
echo "== C example against the live daemon"
./clients/c/build/vist2_example -s "$SOCK" -n 16 "$WORK/doc.txt" "Continue:" > "$WORK/c.out"
[[ -s "$WORK/c.out" ]] || { echo "C example printed nothing"; exit 1; }

echo "== Python client (protoc --python_out) against the live daemon"
/usr/bin/python3 clients/python/vist2_client.py --socket "$SOCK" --max-tokens 16 "$WORK/doc.txt" "Continue:"

kill -TERM $PID
wait $PID
echo "live clients: ok (vist2d exited $?)"

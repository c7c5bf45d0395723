#!/usr/bin/env bash
# The daemon's persistent cache, measured: compress a ~20k-token document (GPL-3 + GPL-2 +
# Apache-2.0 + LGPL-2.1) in vist2d on the SmolLM2-135M VIST2 geometry (untrained vision weights,
# made by scripts/bench-vist2.sh / Training/make_untrained.py), again in the same daemon, again
# after a restart, then after a one-line edit. OpenBLAS env unset for the daemon, 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
M="${XDG_CACHE_HOME:-$HOME/.cache}/vist2/bench/untrained-vist2"
[[ -f "$M/config.json" ]] || python3 Training/make_untrained.py "$M" >/dev/null
swift build -c release >/dev/null
D=$(mktemp -d); C=.build/release/vist2ctl
L=/usr/share/common-licenses; cat $L/GPL-3 $L/GPL-2 $L/Apache-2.0 $L/LGPL-2.1 > $D/doc20k.txt
start() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .build/release/vist2d --model $M --socket $D/s.sock --cache-dir $D/cache --threads 2 >> $D/log 2>&1 & sleep 1; until $C status --socket $D/s.sock >/dev/null 2>&1; do sleep 0.5; done; }
start
echo "first open:"; $C compress --socket $D/s.sock --json $D/doc20k.txt
echo "again, same daemon:"; $C compress --socket $D/s.sock --json $D/doc20k.txt
pkill -TERM -f "vist2d --model $M"; sleep 2
start
echo "after restart:"; $C compress --socket $D/s.sock --json $D/doc20k.txt
python3 - $D/doc20k.txt $D/edit.txt <<'PY'
import sys
lines = open(sys.argv[1]).read().split("\n"); i = len(lines)//2
while not lines[i].strip(): i += 1
lines[i] += " (edited)"; open(sys.argv[2], "w").write("\n".join(lines))
PY
echo "one-line edit:"; $C compress --socket $D/s.sock --json $D/edit.txt
$C cache stats --socket $D/s.sock
pkill -TERM -f "vist2d --model $M"; sleep 1; cat $D/log; du -sh $D/cache; rm -rf $D

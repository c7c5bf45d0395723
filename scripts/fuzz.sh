#!/usr/bin/env bash
# libFuzzer over the daemon's input paths (Sources/VistFuzz): the frame decoder (fuzz-frames),
# protobuf message decoding (fuzz-messages), and a whole Session fed arbitrary bytes against the
# tiny test model (fuzz-session). Each target is built with --sanitize=fuzzer --sanitize=address
# and run from the committed corpus (Tests/Fuzz/corpus/<target>, seeds from
# `fuzz-session --write-seeds`); new inputs go to a scratch copy unless --merge is given.
#
#   bash scripts/fuzz.sh [--seconds 60 | --runs N] [--merge] [frames messages session]
#
# CI runs every target for 60 seconds. A crash leaves its input in .build-fuzz/artifacts/ (replay
# it with a normal build: .build/release/fuzz-<target> FILE) and the script fails; RELIABILITY.md
# records the long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=(-max_total_time=60)
merge=0
targets=()
while (($#)); do
    case "$1" in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    --merge) merge=1; shift ;;
    frames | messages | session) targets+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
((${#targets[@]})) || targets=(frames messages session)
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
# The engine's thread pool and OpenBLAS threads would only add noise to a fuzzer.
export OPENBLAS_NUM_THREADS=1
# ASAN's leak check is off: the shared tiny model lives in a static until exit. Swift's own
# crash handler is off so that a trap is reported by libFuzzer (with the input that caused it).
export ASAN_OPTIONS="detect_leaks=0:${ASAN_OPTIONS:-}"
export SWIFT_BACKTRACE=enable=no
mkdir -p .build-fuzz/artifacts
for t in "${targets[@]}"; do
    swift build --scratch-path .build-fuzz --sanitize=fuzzer --sanitize=address -Xswiftc -DFUZZING --product "fuzz-$t" 2>&1 |
        grep -v "warning: Cannot export local symbol" | tail -1
done
status=0
for t in "${targets[@]}"; do
    work="$(mktemp -d)"
    cp -r "Tests/Fuzz/corpus/$t/." "$work/"
    echo "== fuzz-$t (${limit[*]})"
    if ! ".build-fuzz/debug/fuzz-$t" "${limit[@]}" -print_final_stats=1 -rss_limit_mb=4096 -timeout=30 \
        -artifact_prefix=.build-fuzz/artifacts/ "$work" 2>"$work.log"; then
        status=1
        grep -E "Fatal error|ERROR|SUMMARY|Test unit written|==[0-9]+==" "$work.log" | head -20
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs" "$work.log" | tr '\n' ' '
    echo
    if ((merge)); then
        ".build-fuzz/debug/fuzz-$t" -merge=1 "Tests/Fuzz/corpus/$t" "$work" 2>/dev/null >/dev/null || true
    fi
    rm -rf "$work" "$work.log"
done
exit $status

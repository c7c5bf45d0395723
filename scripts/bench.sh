#!/usr/bin/env bash
# Benchmark vist2 against llama.cpp on the same GGUF, thread count and environment, in one run.
#
#   scripts/bench.sh [-t THREADS] [-p 512] [-n 128] [-r 5] [-k 3] [--keep-openblas-env]
#
# -k rounds alternate the two programs (each round: llama-bench, then vist2ctl bench, -r timed
# repetitions each); the ratios printed are the medians of the rounds'. VIST2CTL names another
# vist2ctl binary to measure (default: .build/release/vist2ctl, built here).
# llama.cpp is built from the llama.cpp tree vendored in the llama-cpp-python sdist (PyPI) into
# ~/.cache/vist2/llama.cpp-<version> the first time (cmake, g++). Both programs run with
# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (so OpenBLAS picks its AVX-512 kernels) unless
# --keep-openblas-env is given. Prints each round, the ratios, and a JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=$(nproc)
P=512
N=128
R=5
K=3
KEEP_ENV=0
while (($#)); do
    case "$1" in
    -t) THREADS=$2; shift 2 ;;
    -p) P=$2; shift 2 ;;
    -n) N=$2; shift 2 ;;
    -r) R=$2; shift 2 ;;
    -k) K=$2; shift 2 ;;
    --keep-openblas-env) KEEP_ENV=1; shift ;;
    *) echo "usage: $0 [-t threads] [-p n] [-n n] [-r reps] [-k rounds] [--keep-openblas-env]" >&2; exit 2 ;;
    esac
done

LCPP_VERSION=0.3.36
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/vist2/llama.cpp-$LCPP_VERSION"
BENCH="$CACHE/src/vendor/llama.cpp/build/bin/llama-bench"
if [[ ! -x "$BENCH" ]]; then
    echo "building llama.cpp (llama-cpp-python $LCPP_VERSION sdist) in $CACHE ..." >&2
    command -v cmake >/dev/null && command -v g++ >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++
    }
    mkdir -p "$CACHE"
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$CACHE" "llama-cpp-python==$LCPP_VERSION"
    rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
    tar -xzf "$CACHE"/llama_cpp_python-$LCPP_VERSION.tar.gz -C "$CACHE/src" --strip-components=1
    (cd "$CACHE/src/vendor/llama.cpp" &&
        cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null &&
        cmake --build build -j"$(nproc)" --target llama-bench llama-perplexity >/dev/null)
fi

bash scripts/fetch-model.sh >/dev/null
[[ -n "${VIST2CTL:-}" ]] || swift build -c release --product vist2ctl >/dev/null
if [[ -n "${VIST2_MODELS:-}" ]]; then STORE="$VIST2_MODELS"
elif [[ -n "${XDG_DATA_HOME:-}" ]]; then STORE="$XDG_DATA_HOME/vist2/models"
else STORE="$HOME/.local/share/vist2/models"; fi
MODEL="$STORE/SmolLM2-135M-Instruct.Q4_1.gguf"

ENVCMD=(env)
((KEEP_ENV)) || ENVCMD=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)

VIST2CTL=${VIST2CTL:-.build/release/vist2ctl}
# Rounds alternate the two programs, so a slow spell of this (shared) machine falls on both; the
# ratios are the medians of the rounds' ratios.
declare -a LJSONS VJSONS
for ((k = 1; k <= K; k++)); do
    echo "== round $k of $K: llama.cpp (llama-bench, $THREADS threads), then vist2 (vist2ctl bench --local) ==" >&2
    LJSONS+=("$("${ENVCMD[@]}" "$BENCH" -m "$MODEL" -p "$P" -n "$N" -t "$THREADS" -r "$R" -o json)")
    VJSONS+=("$("${ENVCMD[@]}" "$VIST2CTL" bench --local --model "$MODEL" -p "$P" -n "$N" -r "$R" --threads "$THREADS" --json)")
done
python3 - "$KEEP_ENV" "${LJSONS[@]}" "${VJSONS[@]}" <<'PYEOF'
import json, statistics, sys
keep, rest = sys.argv[1], sys.argv[2:]
k = len(rest) // 2
ls = [json.loads(x) for x in rest[:k]]
vs = [json.loads(x) for x in rest[k:]]
def lcpp(l, key):
    return next((r["avg_ts"] for r in l if (r["n_prompt"] if key == "pp" else r["n_gen"])), None)
print("round  llama.cpp pp  vist2 pp  ratio   llama.cpp tg  vist2 tg  ratio")
pp_r, tg_r = [], []
for i, (l, v) in enumerate(zip(ls, vs), 1):
    lp, lt = lcpp(l, "pp"), lcpp(l, "tg")
    vp, vt = v["pp_tokens_per_s"], v["tg_tokens_per_s"]
    pr = vp / lp if lp else None
    tr = vt / lt if lt else None
    if pr: pp_r.append(pr)
    if tr: tg_r.append(tr)
    fmt = lambda x: "%.2fx" % x if x else "-"
    print("%5d  %12.1f  %8.1f  %5s   %12.1f  %8.1f  %5s" % (i, lp or 0, vp, fmt(pr), lt or 0, vt, fmt(tr)))
v = vs[-1]
print("vist2 peak RSS %.1f MiB, weights %.1f MiB, simd %s" % (v["peak_rss_bytes"] / 2**20, v["model_bytes"] / 2**20, v["simd"]))
med = lambda xs: statistics.median(xs) if xs else None
out = {"threads": v["threads"], "openblas_env": "kept" if keep == "1" else "unset", "rounds": k,
       "llama_cpp_pp": [lcpp(l, "pp") for l in ls], "llama_cpp_tg": [lcpp(l, "tg") for l in ls],
       "vist2_pp": [x["pp_tokens_per_s"] for x in vs], "vist2_tg": [x["tg_tokens_per_s"] for x in vs],
       "pp_ratio": med(pp_r), "tg_ratio": med(tg_r), "vist2_peak_rss_bytes": v["peak_rss_bytes"]}
print("== ratios (vist2 / llama.cpp, median of %d rounds) ==" % k)
if out["pp_ratio"]: print("prompt processing: %.2fx" % out["pp_ratio"])
if out["tg_ratio"]: print("decode:            %.2fx" % out["tg_ratio"])
print(json.dumps(out))
PYEOF

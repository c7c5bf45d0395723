#!/usr/bin/env bash
# Benchmark vist2 against llama.cpp on the same GGUF, thread count and environment, in one run.
#
#   scripts/bench.sh [-t THREADS] [-p 512] [-n 128] [-r 5] [--keep-openblas-env]
#
# llama.cpp is built from the llama.cpp tree vendored in the llama-cpp-python sdist (PyPI) into
# ~/.cache/vist2/llama.cpp-<version> the first time (cmake, g++). Both programs run with
# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (so OpenBLAS picks its AVX-512 kernels) unless
# --keep-openblas-env is given. Prints both tables, the ratios, and a JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=$(nproc)
P=512
N=128
R=5
KEEP_ENV=0
while (($#)); do
    case "$1" in
    -t) THREADS=$2; shift 2 ;;
    -p) P=$2; shift 2 ;;
    -n) N=$2; shift 2 ;;
    -r) R=$2; shift 2 ;;
    --keep-openblas-env) KEEP_ENV=1; shift ;;
    *) echo "usage: $0 [-t threads] [-p n] [-n n] [-r reps] [--keep-openblas-env]" >&2; exit 2 ;;
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
swift build -c release --product vist2ctl >/dev/null
if [[ -n "${VIST2_MODELS:-}" ]]; then STORE="$VIST2_MODELS"
elif [[ -n "${XDG_DATA_HOME:-}" ]]; then STORE="$XDG_DATA_HOME/vist2/models"
else STORE="$HOME/.local/share/vist2/models"; fi
MODEL="$STORE/SmolLM2-135M-Instruct.Q4_1.gguf"

ENVCMD=(env)
((KEEP_ENV)) || ENVCMD=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)

echo "== llama.cpp (llama-bench, $THREADS threads) =="
LJSON=$("${ENVCMD[@]}" "$BENCH" -m "$MODEL" -p "$P" -n "$N" -t "$THREADS" -r "$R" -o json)
echo "$LJSON" | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    kind = "pp%d" % r["n_prompt"] if r["n_prompt"] else "tg%d" % r["n_gen"]
    print("%-6s %9.1f ± %.1f tokens/s" % (kind, r["avg_ts"], r["stddev_ts"]))'
echo "== vist2 (vist2ctl bench --local, $THREADS threads) =="
VJSON=$("${ENVCMD[@]}" .build/release/vist2ctl bench --local --model "$MODEL" -p "$P" -n "$N" -r "$R" --threads "$THREADS" --json)
echo "$VJSON" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("pp%-4d %9.1f ± %.1f tokens/s" % (r["pp_tokens"], r["pp_tokens_per_s"], r["pp_stddev"]))
print("tg%-4d %9.1f ± %.1f tokens/s" % (r["tg_tokens"], r["tg_tokens_per_s"], r["tg_stddev"]))
print("peak RSS %.1f MiB, weights %.1f MiB, simd %s" % (r["peak_rss_bytes"] / 2**20, r["model_bytes"] / 2**20, r["simd"]))'
python3 - "$LJSON" "$VJSON" "$KEEP_ENV" <<'PYEOF'
import json, sys
l = json.loads(sys.argv[1]); v = json.loads(sys.argv[2])
pp = next((r["avg_ts"] for r in l if r["n_prompt"]), None)
tg = next((r["avg_ts"] for r in l if r["n_gen"]), None)
out = {"threads": v["threads"], "openblas_env": "kept" if sys.argv[3] == "1" else "unset",
       "llama_cpp_pp": pp, "llama_cpp_tg": tg, "vist2_pp": v["pp_tokens_per_s"], "vist2_tg": v["tg_tokens_per_s"],
       "pp_ratio": v["pp_tokens_per_s"] / pp if pp else None, "tg_ratio": v["tg_tokens_per_s"] / tg if tg else None,
       "vist2_peak_rss_bytes": v["peak_rss_bytes"]}
print("== ratios (vist2 / llama.cpp) ==")
if pp: print("prompt processing: %.2fx" % out["pp_ratio"])
if tg: print("decode:            %.2fx" % out["tg_ratio"])
print(json.dumps(out))
PYEOF

#!/usr/bin/env python3
"""Generate the golden fixtures the Swift parity tests compare against, from llama.cpp.

Run by hand (not in CI) when the inputs, the model or the llama.cpp version change:

    pip install llama-cpp-python==0.3.36 numpy gguf==0.17.1
    python3 scripts/make_golden.py --model ~/.local/share/vist2/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--llama-perplexity /path/to/llama-perplexity]

Inputs (committed):  Tests/VistTokenizerTests/Fixtures/tokenizer_inputs.json
                     Tests/VistEngineTests/Fixtures/prompts.json
Besides llama.cpp's logits the script records exact float64 logits from scripts/reference_llama.py
(numpy, weights dequantized by the gguf package, no activation quantization).

Outputs (committed): Tests/VistTokenizerTests/Fixtures/tokenizer_golden.json
                     Tests/VistEngineTests/Fixtures/model_golden.json

llama-cpp-python builds llama.cpp from source; its tools (llama-perplexity, llama-bench) are
built from the same vendored tree with cmake (see scripts/bench.sh). With --llama-perplexity the
script also records llama.cpp's perplexity on the prompts file's text.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
from llama_cpp import Llama
import llama_cpp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_llama import ReferenceLlama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "Tests/VistTokenizerTests/Fixtures")
ENG_DIR = os.path.join(ROOT, "Tests/VistEngineTests/Fixtures")
MAGIC = "vist2-golden"
VERSION = 1


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def header(model_path):
    return {
        "magic": MAGIC,
        "version": VERSION,
        "generator": "scripts/make_golden.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "model_sha256": sha256(model_path),
    }


def tokenizer_golden(llm, model_path):
    with open(os.path.join(TOK_DIR, "tokenizer_inputs.json")) as f:
        spec = json.load(f)
    cases = list(spec["cases"])
    long = spec["long_case"]
    cases.append(long["paragraph"] * long["repeat"])
    out = []
    for text in cases:
        b = text.encode("utf-8")
        out.append({
            "text": text,
            # parse_special=True: control tokens in the text become their ids (llama-tokenize --parse-special)
            "ids_special": llm.tokenize(b, add_bos=False, special=True),
            # parse_special=False: the text of control tokens is ordinary text
            "ids_plain": llm.tokenize(b, add_bos=False, special=False),
        })
    return {**header(model_path), "cases": out}


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def model_golden(model_path, llama_perplexity):
    with open(os.path.join(ENG_DIR, "prompts.json")) as f:
        spec = json.load(f)
    llm = Llama(model_path=model_path, n_ctx=512, n_batch=512, logits_all=True, verbose=False, seed=0, n_threads=2)
    ref = ReferenceLlama(model_path)
    prompts = []
    for text in spec["prompts"]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
        last = scores[-1]
        lp = log_softmax(last)
        top = np.argsort(-last, kind="stable")[: spec["top_k"]]
        # Greedy continuation, llama.cpp sampling with temperature 0 (argmax).
        greedy = []
        llm.reset()
        llm.eval(ids)
        for _ in range(spec["greedy_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt == llm.token_eos():
                break
            greedy.append(nxt)
            llm.eval([nxt])
        exact = ref.logits(np.array(ids))
        exact_lp = np.array([log_softmax(r) for r in exact])
        exact_top = np.argsort(-exact[-1], kind="stable")[: spec["top_k"]]
        prompts.append({
            "reference": {
                "argmax_per_position": [int(np.argmax(r)) for r in exact],
                "top_ids": [int(i) for i in exact_top],
                "top_logprobs": [float(exact_lp[-1][i]) for i in exact_top],
                # log-prob of the next prompt token at every position (teacher forcing)
                "next_token_logprobs": [float(exact_lp[t][ids[t + 1]]) for t in range(len(ids) - 1)],
            },
            "text": text,
            "ids": ids,
            "argmax_per_position": [int(np.argmax(s)) for s in scores],
            "top_ids": [int(i) for i in top],
            "top_logits": [float(last[i]) for i in top],
            "top_logprobs": [float(lp[i]) for i in top],
            "greedy": greedy,
        })
    out = {**header(model_path), "prompts": prompts}
    ppl_file = spec["perplexity_file"]
    if llama_perplexity and os.path.exists(ppl_file):
        ctx = spec["perplexity_ctx"]
        res = subprocess.run(
            [llama_perplexity, "-m", model_path, "-f", ppl_file, "-c", str(ctx), "-b", str(ctx), "-t", "2"],
            capture_output=True, text=True, check=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
        out["perplexity"] = {
            "file": ppl_file,
            "file_sha256": sha256(ppl_file),
            "ctx": ctx,
            "llama_perplexity": float(m.group(1)),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-perplexity", help="path to llama.cpp's llama-perplexity binary")
    args = ap.parse_args()
    llm = Llama(model_path=args.model, n_ctx=512, vocab_only=True, verbose=False)
    tg = tokenizer_golden(llm, args.model)
    with open(os.path.join(TOK_DIR, "tokenizer_golden.json"), "w") as f:
        json.dump(tg, f, ensure_ascii=False, indent=1)
    mg = model_golden(args.model, args.llama_perplexity)
    with open(os.path.join(ENG_DIR, "model_golden.json"), "w") as f:
        json.dump(mg, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(tg['cases'])} tokenizer cases and {len(mg['prompts'])} prompts", file=sys.stderr)
    if "perplexity" in mg:
        print(f"llama-perplexity: {mg['perplexity']['llama_perplexity']}", file=sys.stderr)


if __name__ == "__main__":
    main()

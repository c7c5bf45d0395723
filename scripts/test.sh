#!/usr/bin/env bash
# The whole test suite: installs what is missing (Debian packages, the default model), then runs
# every test in release mode (the parity and perplexity tests run the real model; -enable-testing
# keeps @testable imports working in an optimized build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/fetch-model.sh
# One formatter, enforced (config: .swift-format).
swift format lint --strict -r Sources Tests Package.swift
swift build -c release -Xswiftc -enable-testing --build-tests
swift test -c release -Xswiftc -enable-testing --skip-build 2>&1 | tee .build/test.log
# swift test exits non-zero on failure (set -o pipefail), so reaching here means all passed.

# The C client library (protobuf-c) against a fake daemon; then the C example program and the
# independent Python client against a live vist2d.
make -C clients/c test
bash scripts/live-test.sh
# The editor-facing bridge (vist2ctl bridge), the Neovim plugin in a headless Neovim and the Emacs
# package in batch Emacs, each against live daemons: on the tiny model, and on the default one where
# a request must last seconds (cancel, a long compress). /usr/bin/python3: Debian's pynvim.
(cd editors/tests && /usr/bin/python3 -m unittest -v test_bridge test_nvim test_emacs)
# The Neovim tests again on a current Neovim: Debian 13's 0.10, unpacked with its own glibc.
NVIM_NEW="$(bash scripts/nvim-trixie.sh "${TMPDIR:-/tmp}/vist2-nvim-trixie")"
(cd editors/tests && VIST2_NVIM="$NVIM_NEW" /usr/bin/python3 -m unittest -v test_nvim)
# The shipped system units under a real systemd 252 booted in a container (root only; ~1 min the
# first time on a machine, while it builds the container's tree, then ~10 s), and a cache on a
# full and on a read-only filesystem (root: tmpfs mounts). RELIABILITY.md has the long runs.
if [[ "$(id -u)" == 0 ]]; then
    bash scripts/systemd-test.sh
    bash scripts/reliability/disk.sh
else
    echo "skipping scripts/systemd-test.sh and scripts/reliability/disk.sh: they need root"
fi
# kill -9 during compress, a few rounds (the 100-round run is in RELIABILITY.md).
bash scripts/reliability/kill9.sh 10
# libFuzzer, 60 seconds per target from the committed corpus (Tests/Fuzz/corpus).
bash scripts/fuzz.sh --seconds 60

# The training code: its forward against the PyTorch reference, then a smoke run of every stage
# on a tiny configuration (this repository's own Markdown as the corpus, a few steps through the
# real backbone) that stops after step 5 and resumes, and must end with the same weights as a run
# that never stopped; the engine must load and evaluate its exported checkpoint. Then the eval
# command on the default model.
PY="$(bash Training/python.sh)"
"$PY" Training/test_train.py
SMOKE="$(mktemp -d)"
PYTHON="$PY" bash Training/run.sh "$SMOKE" --tiny --max-steps 5
PYTHON="$PY" bash Training/run.sh "$SMOKE" --tiny | tee .build/train-smoke.log
grep -q "resumed at step 5" .build/train-smoke.log && grep -q "stopped at step 8 of 8" .build/train-smoke.log
mkdir "$SMOKE/fresh" && cp "$SMOKE/run/run.json" "$SMOKE/fresh/"
"$PY" Training/train.py --run "$SMOKE/fresh" --minutes 10
"$PY" Training/test_train.py --compare "$SMOKE/run/checkpoint.pt" "$SMOKE/fresh/checkpoint.pt"
# The same run as two Gloo processes under torchrun (DDP, each with half of every global batch):
# the processes must end with identical weights.
mkdir "$SMOKE/ddp" && cp "$SMOKE/run/run.json" "$SMOKE/ddp/"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 Training/train.py --run-dir "$SMOKE/ddp" --minutes 10 | tee "$SMOKE/ddp.log"
grep -q "stopped at step 8 of 8" "$SMOKE/ddp.log" && grep -q "2 processes agree on the weights" "$SMOKE/ddp.log"
# The backbone read from the GGUF by the training code's own reader equals the engine's export.
"$PY" Training/vist2/gguf.py --compare "${VIST2_MODELS:-${XDG_DATA_HOME:-$HOME/.local/share}/vist2/models}/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOKE/backbone"
.build/release/vist2ctl eval --model "$SMOKE/run/best" --max-chunks 2 --json README.md
# The model card of that checkpoint (Training/package.sh: evaluations and packing per kind, the
# README's main command compressed and in full text, transcriptions), one chunk per text.
PYTHON="$PY" bash Training/package.sh "$SMOKE" "$SMOKE/packaged" --chunks 1
grep -q "text tokens per visual token" "$SMOKE/packaged/README.md" && grep -q "README's main command" "$SMOKE/packaged/README.md"
# A run started from the shipped weights (--init), and the capacity probe (2 steps, 32 tokens).
mkdir "$SMOKE/init" && cp "$SMOKE/run/run.json" "$SMOKE/init/"
"$PY" Training/train.py --run "$SMOKE/init" --max-steps 1 --init weights/vist2-smollm2-135m > "$SMOKE/init.log"
grep -q "initialised from" "$SMOKE/init.log"
IDS="$("$PY" -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["ocr_prompt_ids"])))' "$SMOKE/run/run.json")"
"$PY" Training/capacity.py --backbone "$SMOKE/backbone" --data "$SMOKE/ds-heldout" --ocr-ids "$IDS" --chunks 1 --steps 2 --tokens 32 \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin)[0]; assert 0 <= r["argmax_token_accuracy"] <= 1 and len(r["loss_curve"]) == 2, r'
# Held-out evaluations report the blind losses (visual tokens zeroed) beside the real ones.
grep -q '"ocr_blind"' "$SMOKE/run/log.jsonl"
# The interface probes (Training/EXPERIMENTS.md, sections 4 and 5), a few tokens each.
"$PY" Training/interface_probe.py constructions --backbone "$SMOKE/backbone" --data "$SMOKE/ds-heldout" --ocr-ids "$IDS" \
    --chunks 1 --tokens 16 | "$PY" -c 'import json, sys; r = json.load(sys.stdin); assert len(r) == 8, r'
"$PY" Training/interface_probe.py teacher --backbone "$SMOKE/backbone" --data "$SMOKE/ds-train" --heldout "$SMOKE/ds-heldout" \
    --ocr-ids "$IDS" --chunks 1 --tokens 16 --steps 2 --start first --causal \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); assert r["steps"] == 2 and len(r["curve"]) == 2, r'
"$PY" Training/interface_probe.py teacher --backbone "$SMOKE/backbone" --data "$SMOKE/ds-train" --heldout "$SMOKE/ds-heldout" \
    --ocr-ids "$IDS" --chunks 1 --tokens 16 --steps 2 --start first --causal --curriculum 2:1 --adapter 2 \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); assert r["curve"][0]["group_now"] == 2 and r["adapter"] == 2, r'
# The autoencoding probe (Training/EXPERIMENTS.md, section 9): a code from the backbone's own
# states, saved, then a vision encoder regressed onto it with no backbone in the loop.
"$PY" Training/interface_probe.py teacher --backbone "$SMOKE/backbone" --data "$SMOKE/ds-train" --heldout "$SMOKE/ds-heldout" \
    --ocr-ids "$IDS" --chunks 1 --tokens 16 --steps 1 --start mean --layer 1 --causal --save "$SMOKE/code.pt" \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); assert r["layer"] == 1 and len(r["curve"]) == 2, r'
"$PY" Training/interface_probe.py autoencode --backbone "$SMOKE/backbone" --data "$SMOKE/ds-train" --heldout "$SMOKE/ds-heldout" \
    --ocr-ids "$IDS" --chunks 1 --tokens 16 --steps 2 --batch 2 --eval-every 1 --teacher "$SMOKE/code.pt" --model-dir "$SMOKE/run/best" \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); c = r["curve"]; assert len(c) == 3 and c[2]["heldout_mse"] >= 0, r'
rm -rf "$SMOKE"
# The prepared GPU run (Training/gpu/), end to end on this CPU: parts within the device tool's
# limits, rendering by the static vist2-render, a few training steps, results collected and
# evaluated by the engine.
GPUDRY="$(mktemp -d)"
bash Training/gpu/dry-run.sh "$GPUDRY"
rm -rf "$GPUDRY" .gpu
.build/release/vist2ctl eval --model default --max-chunks 2 --json README.md

# Second pass under AddressSanitizer (debug build): the engine works on raw buffers, so every
# out-of-bounds write the tests can reach should fail here. The slow real-model perplexity and
# the CLI tests (which run the release binary) are left to the first pass. Leak checking is off:
# the shared test model lives in a static until exit. The BPE timing test is left to the release
# pass (an unoptimized ASAN build times the heap merge and the word cache very differently).
swift build --scratch-path .build-asan --sanitize=address --build-tests
ASAN_OPTIONS=detect_leaks=0 swift test --scratch-path .build-asan --sanitize=address --skip-build \
    --skip "perplexity|Perplexity|CLITests|longPreTokensAreNotQuadratic" 2>&1 | tee .build/test-asan.log

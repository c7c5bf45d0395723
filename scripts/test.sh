#!/usr/bin/env bash
# The whole test suite: installs what is missing (Debian packages, the default model), then runs
# every test in release mode (the parity and perplexity tests run the real model; -enable-testing
# keeps @testable imports working in an optimized build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/fetch-model.sh
swift build -c release -Xswiftc -enable-testing --build-tests
swift test -c release -Xswiftc -enable-testing --skip-build 2>&1 | tee .build/test.log
# swift test exits non-zero on failure (set -o pipefail), so reaching here means all passed.

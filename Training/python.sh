#!/usr/bin/env bash
# Prints the Python interpreter the training code runs with: $PYTHON if set; else python3 when it
# already has the pinned requirements (Training/requirements.txt); else a virtual environment in
# .build/train-venv with them installed from PyPI (Debian's own python3 refuses `pip install`
# outside one). Progress goes to stderr, only the path to stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
    exit 0
fi
# "name==version" lines -> a check that each is importable at exactly that version.
CHECK='
import importlib.metadata as m, sys
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        if m.version(name) != version:
            sys.exit(1)
'
if python3 -c "$CHECK" "$ROOT/Training/requirements.txt" 2>/dev/null; then
    command -v python3
    exit 0
fi
VENV="$ROOT/.build/train-venv"
if ! "$VENV/bin/python" -c "$CHECK" "$ROOT/Training/requirements.txt" 2>/dev/null; then
    echo "installing Training/requirements.txt into $VENV ..." >&2
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/Training/requirements.txt" >&2
fi
echo "$VENV/bin/python"

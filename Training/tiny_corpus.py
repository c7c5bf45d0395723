#!/usr/bin/env python3
"""A tiny corpus of this repository's own files for smoke runs (Training/run.sh --tiny, the GPU
dry run): OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl in build_corpus.py's format, every 4th
file (in sorted order) held out.

    python3 Training/tiny_corpus.py OUT_DIR PATTERN...     # patterns relative to the repository
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    files = sorted(p for pattern in sys.argv[2:] for p in glob.glob(os.path.join(ROOT, pattern)))
    with open(os.path.join(out, "train.jsonl"), "w") as tr, open(os.path.join(out, "heldout.jsonl"), "w") as he:
        for i, p in enumerate(files):
            text = open(p, encoding="utf-8").read()
            (he if i % 4 == 0 else tr).write(json.dumps({"id": os.path.relpath(p, ROOT), "text": text}) + "\n")


if __name__ == "__main__":
    main()

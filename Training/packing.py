#!/usr/bin/env python3
"""How densely a geometry packs text, per kind of text, and how far one-line edits reach.

    python3 Training/packing.py --config Training/configs/vist2-smollm2-135m.json [--config ...] [--edits 20] [--json]

For each config (a VIST2 config.json's render, chunk and vision sections), the engine's own
chunker and tokenizer (`vist2ctl dataset --text-only`: nothing is rendered) cut fixed sample texts
of four kinds that Debian ships:
  code   C headers and Python modules             /usr/include/{stdio,string}.h, json/decoder.py, textwrap.py
  prose  licence texts                             /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0}
  man    manual pages rendered by man(1), 80 cols  ls, grep, tar
  list   changelogs, NEWS and release notes        apt's and coreutils' changelogs, bash's and coreutils' NEWS,
         (bullet lists, short lines)               git's 2.39.0 release notes, /etc/services
and reports per kind the packing: text tokens per visual token, sum(tokens) / (chunks x visual
tokens per chunk), at most the config's chunk ratio. With --edits N, every document also gets N
one-line edits (a word inserted into a line chosen at random, seeded) and the report gives the
number of chunks each edit changes (chunks of the edited text that are not chunks of the
original): the images a client must re-encode.
"""
import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SAMPLES = {
    "code": ["/usr/include/stdio.h", "/usr/include/string.h", "/usr/lib/python3.11/json/decoder.py", "/usr/lib/python3.11/textwrap.py"],
    "prose": ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0"],
    "man": ["man:ls", "man:grep", "man:tar"],
    "list": ["/usr/share/doc/apt/changelog.gz", "/usr/share/doc/coreutils/changelog.Debian.gz", "/usr/share/doc/bash/NEWS.gz",
             "/usr/share/doc/coreutils/NEWS.gz", "/usr/share/doc/git/RelNotes/2.39.0.txt", "/etc/services"],
}


def read_sample(spec):
    """The text of one sample, or None where this machine lacks it."""
    if spec.startswith("man:"):
        if not shutil.which("man"):
            return None
        r = subprocess.run(["man", "-P", "cat", spec[4:]], capture_output=True, text=True, env=dict(os.environ, MANWIDTH="80"))
        if r.returncode != 0 or not r.stdout:
            return None
        # Drop overstrike (bold/underline) the way col -b does.
        out = []
        for ch in r.stdout:
            if ch == "\b":
                if out:
                    out.pop()
                continue
            out.append(ch)
        return "".join(out)
    if not os.path.exists(spec):
        return None
    raw = gzip.open(spec, "rb").read() if spec.endswith(".gz") else open(spec, "rb").read()
    return raw.decode("utf-8", errors="replace")


def edited(text, rng):
    """text with one word inserted into one non-empty line chosen by rng."""
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if line.strip()]
    i = rng.choice(candidates)
    words = lines[i].split(" ")
    j = rng.randrange(len(words) + 1)
    lines[i] = " ".join(words[:j] + ["edited"] + words[j:])
    return "\n".join(lines)


def measure(ctl, py, config, texts, n_edits, seed=7):
    with tempfile.TemporaryDirectory() as d:
        geom = os.path.join(d, "geometry")
        subprocess.run([py, os.path.join(HERE, "make_untrained.py"), geom, "--config", config], check=True, stdout=subprocess.DEVNULL)
        corpus = os.path.join(d, "corpus.jsonl")
        rng = random.Random(seed)
        with open(corpus, "w") as f:
            for (kind, name), text in texts.items():
                f.write(json.dumps({"id": f"{kind}|{name}|-", "text": text}) + "\n")
                for e in range(n_edits):
                    f.write(json.dumps({"id": f"{kind}|{name}|{e}", "text": edited(text, rng)}) + "\n")
        out = os.path.join(d, "ds")
        r = subprocess.run([ctl, "dataset", "--model", geom, "--text-only", "--json", "--out", out, corpus], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"packing.py: vist2ctl dataset failed: {r.stderr}")
        meta = json.loads(r.stdout)
        chunks = {}
        for line in open(os.path.join(out, "chunks.jsonl")):
            c = json.loads(line)
            chunks.setdefault(c["doc"], []).append((c["text"], len(c["tokens"])))
    m = meta["visual_tokens"]
    report = {"config": config, "visual_tokens": m, "chunk_length": meta["chunk_length"], "kinds": {}}
    for kind in SAMPLES:
        docs = [name for (k, name) in texts if k == kind]
        if not docs:
            continue
        base = [chunks[f"{kind}|{name}|-"] for name in docs]
        tokens = sum(t for cs in base for _, t in cs)
        n = sum(len(cs) for cs in base)
        rec = {"documents": len(docs), "chunks": n, "tokens": tokens, "packing": round(tokens / (n * m), 3),
               "per_document": {name: round(sum(t for _, t in cs) / (len(cs) * m), 3) for name, cs in zip(docs, base)}}
        if n_edits:
            changed = []
            for name, cs in zip(docs, base):
                original = {t for t, _ in cs}
                for e in range(n_edits):
                    changed.append(sum(1 for t, _ in chunks[f"{kind}|{name}|{e}"] if t not in original))
            rec["edit_changed_chunks"] = {"max": max(changed), "mean": round(sum(changed) / len(changed), 2),
                                          "over_2": sum(1 for c in changed if c > 2), "edits": len(changed)}
        report["kinds"][kind] = rec
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--edits", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ctl = os.path.join(ROOT, ".build", "release", "vist2ctl")
    py = sys.executable
    texts = {}
    for kind, specs in SAMPLES.items():
        for spec in specs:
            t = read_sample(spec)
            if t:
                texts[(kind, os.path.basename(spec).replace("man:", "man "))] = t
    reports = [measure(ctl, py, c, texts, args.edits) for c in args.config]
    if args.json:
        print(json.dumps(reports, indent=1))
        return
    for r in reports:
        print(f"{r['config']} ({r['chunk_length']} tokens / {r['visual_tokens']} visual tokens per chunk)")
        for kind, k in r["kinds"].items():
            e = k.get("edit_changed_chunks")
            extra = f"; one-line edits change {e['mean']} chunks on average, at most {e['max']} ({e['over_2']} of {e['edits']} over 2)" if e else ""
            print(f"  {kind:6s} {k['packing']:.3f} text tokens per visual token over {k['chunks']} chunks{extra}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the training corpus for the vision encoder from text that Debian packages ship.

    python3 Training/build_corpus.py OUT_DIR [--install] [--max-docs-per-source N]

Sources (each document tagged with the package it came from, and the package's version recorded):
  code   Python's standard library sources        package python3.11   /usr/lib/python3.11/**/*.py
  docs   Python's documentation (HTML -> text)    package python3.11-doc
  man    manual pages, sections 1 and 8, rendered by man(1) at 80 columns, from the packages
         named in MAN_PACKAGES (coreutils, util-linux, grep, git-man, ...)
  list   the changelogs and NEWS files of the same packages (list-heavy: bullets, short lines)

Everything is deterministic: files are visited in sorted order, text is normalised the same way
every time, and the held-out split is a function of the document id alone
(sha256(id) mod 20 == 0 -> held out, about 5%), so a later run, or another machine with the same
package versions, gets the same split. The corpus itself is not committed: OUT_DIR/train.jsonl and
OUT_DIR/heldout.jsonl ({"id", "kind", "package", "text"} per line) and OUT_DIR/manifest.json
(package versions, counts, characters, sha256 of both files).

--install installs the Debian packages that are missing (python3.11-doc, git-man, ...) with apt-get.
"""
import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys

MIN_CHARS = 400
MAX_CHARS = 200_000
HELDOUT_MOD = 20


def normalise(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Drop other control characters except tab and newline (man output's leftovers, form feeds).
    text = "".join(ch for ch in text if ch in "\t\n" or ord(ch) >= 32)
    lines = [l.rstrip() for l in text.split("\n")]
    out, blank = [], 0
    for l in lines:
        blank = blank + 1 if not l else 0
        if blank <= 1:
            out.append(l)
    return "\n".join(out).strip("\n") + "\n"


def heldout(doc_id):
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % HELDOUT_MOD == 0


def package_version(pkg):
    """The installed version of a Debian package, or None when it is not installed."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.startswith("install ok installed"):
        return None
    return r.stdout.split("\t", 1)[1].strip()


class HTMLText(html.parser.HTMLParser):
    """Text of a Sphinx page: the body, code blocks kept verbatim, navigation dropped."""

    SKIP = {"script", "style", "nav", "head"}
    BLOCK = {"p", "div", "section", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "table", "ul", "ol", "dl"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip, self.pre = [], 0, 0

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.skip:
            # Inside a skipped element: count nesting so its own end tag ends the skip.
            if tag not in self.VOID:
                self.skip += 1
            return
        if tag in self.SKIP or a.get("role") == "navigation" or "sphinxsidebar" in (a.get("class") or ""):
            if tag not in self.VOID:
                self.skip = 1
            return
        if tag == "pre":
            self.pre += 1
            self.parts.append("\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip:
            if tag not in self.VOID:
                self.skip -= 1
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.parts.append("\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self):
        t = "".join(self.parts).replace("\u00b6", "")
        return "\n".join(l.strip() if not l.startswith("    ") else l for l in t.split("\n"))


def code_docs(limit):
    root = "/usr/lib/python3.11"
    files = sorted(glob.glob(root + "/**/*.py", recursive=True))
    files = [f for f in files if "/test/" not in f and "/tests/" not in f and "/site-packages/" not in f
             and "/dist-packages/" not in f]
    for f in files[:limit]:
        with open(f, encoding="utf-8", errors="replace") as h:
            yield "code:" + os.path.relpath(f, root), "code", "python3.11", h.read()


def html_docs(limit):
    root = "/usr/share/doc/python3.11/html"
    files = []
    for sub in ("tutorial", "library", "reference", "howto", "faq", "using", "extending"):
        files += sorted(glob.glob(f"{root}/{sub}/**/*.html", recursive=True))
    for f in files[:limit]:
        p = HTMLText()
        with open(f, encoding="utf-8", errors="replace") as h:
            p.feed(h.read())
        yield "docs:" + os.path.relpath(f, root), "docs", "python3.11-doc", p.text()


# Manual pages come from these packages only (not from whatever else a machine has installed),
# so that the corpus is the same on every Debian 12 machine.
MAN_PACKAGES = ["coreutils", "util-linux", "findutils", "grep", "sed", "tar", "gzip", "diffutils", "bash", "procps",
                "man-db", "dpkg", "apt", "openssh-client", "git-man", "make", "rsync", "less"]


def man_docs(limit):
    files = []
    for pkg in MAN_PACKAGES:
        listed = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True).stdout.split("\n")
        files += sorted((f, pkg) for f in listed if re.match(r"^/usr/share/man/man[18]/[^/]+\.gz$", f))
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    n = 0
    for f, pkg in files:
        if n >= limit:
            break
        # Pages that are only a link to another (".so") are skipped; the target comes on its own.
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as h:
            head = h.read(200)
        if head.startswith(".so "):
            continue
        r = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-l", f], capture_output=True, env=env)
        if r.returncode != 0:
            continue
        text = subprocess.run(["col", "-bx"], input=r.stdout, capture_output=True).stdout.decode("utf-8", "replace")
        n += 1
        yield "man:" + os.path.basename(f)[:-3], "man", pkg, text


LIST_FILES = ["changelog.gz", "changelog.Debian.gz", "NEWS.gz", "NEWS.Debian.gz"]


def list_docs(limit):
    """List-heavy text: the changelogs and NEWS files of MAN_PACKAGES (bullet lists of short
    lines), each file one document."""
    n = 0
    for pkg in MAN_PACKAGES:
        for name in LIST_FILES:
            f = f"/usr/share/doc/{pkg}/{name}"
            if n >= limit or not os.path.exists(f):
                continue
            with gzip.open(f, "rt", encoding="utf-8", errors="replace") as h:
                text = h.read()
            n += 1
            yield f"list:{pkg}/{name[:-3]}", "list", pkg, text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--install", action="store_true", help="apt-get install missing source packages")
    ap.add_argument("--max-docs-per-source", type=int, default=100_000)
    a = ap.parse_args()
    needed = ["python3.11", "python3.11-doc", "groff-base", "bsdextrautils"] + MAN_PACKAGES
    missing = [p for p in needed if package_version(p) is None]
    if missing and a.install:
        subprocess.run(["apt-get", "install", "-y", "-qq"] + missing, check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        missing = [p for p in needed if package_version(p) is None]
    if missing:
        sys.exit("missing Debian packages: %s (run with --install)" % " ".join(missing))
    os.makedirs(a.out, exist_ok=True)
    paths = {"train": os.path.join(a.out, "train.jsonl"), "heldout": os.path.join(a.out, "heldout.jsonl")}
    files = {k: open(v + ".tmp", "w", encoding="utf-8") for k, v in paths.items()}
    stats = {}
    seen = set()
    for gen in (code_docs, html_docs, man_docs, list_docs):
        for doc_id, kind, pkg, text in gen(a.max_docs_per_source):
            text = normalise(text)
            if len(text) < MIN_CHARS:
                continue
            text = text[:MAX_CHARS]
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:  # the same page under two names
                continue
            seen.add(digest)
            split = "heldout" if heldout(doc_id) else "train"
            files[split].write(json.dumps({"id": doc_id, "kind": kind, "package": pkg, "text": text}, ensure_ascii=False) + "\n")
            s = stats.setdefault(split, {}).setdefault(kind, {"docs": 0, "chars": 0})
            s["docs"] += 1
            s["chars"] += len(text)
    for k, f in files.items():
        f.close()
        os.replace(paths[k] + ".tmp", paths[k])
    sums = {k: hashlib.sha256(open(p, "rb").read()).hexdigest() for k, p in paths.items()}
    packages = sorted({json.loads(l)["package"] for p in paths.values() for l in open(p, encoding="utf-8")})
    manifest = {
        "format": 1, "heldout_rule": "sha256(id)[:8] mod %d == 0" % HELDOUT_MOD, "min_chars": MIN_CHARS,
        "max_chars": MAX_CHARS, "stats": stats, "sha256": sums,
        "packages": {p: package_version(p) for p in packages if p != "unknown"},
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as h:
        json.dump(manifest, h, indent=1, sort_keys=True)
    print(json.dumps({"stats": stats, "sha256": sums}))


if __name__ == "__main__":
    main()

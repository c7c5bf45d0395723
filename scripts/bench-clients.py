#!/usr/bin/env python3
"""Throughput as clients grow: N concurrent clients (N = 1, 2, 4, 8 by default) each generate
--tokens tokens over the same open document in one vist2d, all at once.

    /usr/bin/python3 scripts/bench-clients.py [--model default] [--tokens 128] [--clients 1,2,4,8]
        [--rounds 1] [--distinct] [--kv-type f16] [--out DIR] [--vist2d PATH]

Starts vist2d (.build/release/vist2d, built if missing) on a fresh socket and cache, then for
each N: empties the cache and compresses the document under each instruction the run uses (so
every client's prefill reads the cached visual blocks, and no run finds blocks an earlier run's
chunk swaps stored), N connections open the document, wait at a barrier, send a Generate (greedy,
ignore_eos, --tokens tokens) and record when each delta arrives. All clients ask --instruction
(identical requests: they share the document's attention entries and the first one's chunk swap
serves the others through the block cache), or with --distinct each its own question (nothing
shared but the weights). Per run it reports:

- aggregate decode tokens/s: over the window in which every client is decoding (from the last
  client's first token to the first client's last token), the tokens (text deltas) that arrived
  in it over its length;
- per-token latency: the mean gap between a client's consecutive tokens in that window,
  averaged over the clients;
- the time to first token, averaged over the clients;
- each client's chunk swaps and the time they took (swap_ms, part of its decode_ms), the blocks
  its prefill and swaps found in the two caches and those it encoded, and the ceiling swaps set
  when every client computes its own: what N clients would reach over one if a batched step of
  N rows cost what one row's does while the swaps (compute-bound) run one after another,
  N (D + S) / (D + N S) with one client's decoding D and swaps S. Identical requests exceed it:
  one computes the swapped block, the others read it from the cache.

With --rounds K the sweep runs K times in the same daemon and the table reports per client count
the medians of the rounds' figures and of their ratios to that round's one client (a single
127-token window of one client moves by ~20% between runs on a shared 2-core machine).

Writes results.json (every round, and the medians as "runs") and clients.png (both curves
against N) to --out (default .build/bench-clients) and prints a Markdown table with the ratios
to one client. The OpenBLAS
environment variables are unset for the daemon. Needs the protobuf package (Debian:
python3-protobuf) and, for the plot, matplotlib (installed into .build/plot-venv if missing).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import vist2_client  # noqa: E402


def document(names):
    lic = "/usr/share/common-licenses"
    return "".join(open(os.path.join(lic, f), encoding="utf-8").read() for f in names.split(","))


def run_clients(pb, sock, text, n, tokens, instructions):
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def client(i):
        try:
            c = vist2_client.Client(pb, sock)
            doc = c.request(lambda m: (m.open_document.SetInParent(), setattr(m.open_document, "text", text))).document
            times = []

            def gen(m):
                m.generate.document_ids.append(doc.document_id)
                m.generate.instruction = instructions[i % len(instructions)]
                m.generate.max_tokens = tokens
                m.generate.ignore_eos = True
                m.generate.sampling.temperature = 0
                m.generate.sampling.top_p = 1

            barrier.wait()
            t0 = time.monotonic()
            res = c.request(gen, lambda r: times.append(time.monotonic())).generate_result
            t1 = time.monotonic()
            c.request(lambda m: setattr(m.close_document, "document_id", doc.document_id))
            results[i] = {"start": t0, "end": t1, "deltas": times, "generated": res.generated_tokens,
                          "ttft_ms": res.ttft_ms, "decode_ms": res.decode_ms, "decode_tps": res.decode_tokens_per_s,
                          "prefix_hits": res.prefix_cache_hits, "chunk_hits": res.chunk_cache_hits,
                          "encoded": res.chunks_encoded, "swaps": res.swaps, "swap_ms": res.swap_ms, "text": res.text}
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append("client %d: %s" % (i, e))
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    # The window in which every client was decoding: from the last client's first token to the
    # first client's last one. Tokens (text deltas) that arrived in it, over its length.
    lo = max(r["deltas"][0] for r in results)
    hi = min(r["deltas"][-1] for r in results)
    inside = [[t for t in r["deltas"] if lo <= t <= hi] for r in results]
    gaps = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in inside if len(ts) > 1]
    return {
        "clients": n, "tokens_per_client": tokens, "generated": [r["generated"] for r in results],
        "window_s": hi - lo, "tokens_in_window": sum(len(ts) - 1 for ts in inside),
        "aggregate_decode_tps": sum(len(ts) - 1 for ts in inside) / (hi - lo) if hi > lo else 0,
        "per_token_latency_ms": 1000 * sum(gaps) / len(gaps) if gaps else 0,
        "request_decode_tps": [r["decode_tps"] for r in results],
        "mean_ttft_ms": sum(r["ttft_ms"] for r in results) / n, "texts_identical": len({r["text"] for r in results}) == 1,
        "prefix_hits": [r["prefix_hits"] for r in results], "chunk_hits": [r["chunk_hits"] for r in results],
        "encoded": [r["encoded"] for r in results],
        "swaps": [r["swaps"] for r in results], "swap_ms": [r["swap_ms"] for r in results],
        "decode_ms": [r["decode_ms"] for r in results],
    }


# --distinct: client i asks DISTINCT[i % 8].
DISTINCT = [
    "Summarize the license above.",
    "What does the license above say about patents?",
    "List the conditions for redistributing the work under the license above.",
    "Explain the warranty disclaimer of the license above.",
    "What does the license above say about trademarks?",
    "Who is a Contributor under the license above?",
    "What may a NOTICE file contain under the license above?",
    "How do I apply the license above to my own work?",
]


def ceiling(one, n):
    """The most N clients that each compute their own swaps can reach over one client's
    aggregate if a batched step of N rows cost what one row's does: each client's decoding (its
    decode_ms less its swaps) would then be shared by all, while the chunk swaps (compute-bound
    prefill and encoding) still run one after another: N (D + S) / (D + N S)."""
    s = sum(one["swap_ms"]) / len(one["swap_ms"])
    d = sum(one["decode_ms"]) / len(one["decode_ms"]) - s
    return n * (d + s) / (d + n * s) if d + n * s > 0 else 0


def plot(rows, path):
    code = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
res = json.load(open(sys.argv[1]))
rows = res["runs"]
n = [r["clients"] for r in rows]
fig, ax = plt.subplots(figsize=(6.4, 4))
ax.plot(n, [r["aggregate_decode_tps"] for r in rows], "o-", color="tab:blue", label="aggregate decode tokens/s")
ax.set_xlabel("concurrent clients"); ax.set_ylabel("aggregate decode tokens/s", color="tab:blue")
ax.set_xticks(n); ax.set_ylim(bottom=0)
ax2 = ax.twinx()
ax2.plot(n, [r["per_token_latency_ms"] for r in rows], "s--", color="tab:red", label="per-token latency (ms)")
ax2.set_ylabel("per-token latency per client (ms)", color="tab:red"); ax2.set_ylim(bottom=0)
ax.set_title("vist2d: clients generating over the same document at once\n(%s)" % (
    "each its own question" if res.get("distinct") else "all asking the same question"))
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=120)
'''
    results = os.path.join(os.path.dirname(path), "results.json")
    for py in ("python3", os.path.join(ROOT, ".build", "plot-venv", "bin", "python")):
        if shutil.which(py) or os.path.exists(py):
            if subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0:
                subprocess.run([py, "-c", code, results, path], check=True)
                return
    venv = os.path.join(ROOT, ".build", "plot-venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "matplotlib"], check=True)
    subprocess.run([os.path.join(venv, "bin", "python"), "-c", code, results, path], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the sweep this many times in one daemon; the table reports medians (ratios: of the rounds' ratios)")
    ap.add_argument("--kv-type", default="f16", choices=["f16", "f32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--instruction", default="Summarize the license above.")
    ap.add_argument("--distinct", action="store_true",
                    help="each client asks its own question (DISTINCT below) instead of all asking --instruction")
    ap.add_argument("--document", default="GPL-3,Apache-2.0", help="files of /usr/share/common-licenses, concatenated")
    ap.add_argument("--out", default=os.path.join(ROOT, ".build", "bench-clients"))
    ap.add_argument("--vist2d", default=None, help="the vist2d binary to measure (default: .build/release/vist2d, built if missing)")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    vist2d = a.vist2d or os.path.join(ROOT, ".build", "release", "vist2d")
    if a.vist2d is None and not os.path.exists(vist2d):
        subprocess.run(["swift", "build", "-c", "release", "--product", "vist2d"], cwd=ROOT, check=True)
    pb = vist2_client.load_protocol()
    tmp = tempfile.mkdtemp(prefix="vist2-bench-")
    sock = os.path.join(tmp, "s.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    log = open(os.path.join(a.out, "vist2d.log"), "w")
    daemon = subprocess.Popen([vist2d, "--model", a.model, "--socket", sock,
                               "--cache-dir", os.path.join(tmp, "cache"), "--threads", str(a.threads),
                               "--kv-type", a.kv_type, "--queue", "64"], env=env, stdout=log, stderr=log)
    try:
        for _ in range(600):
            if os.path.exists(sock):
                try:
                    vist2_client.Client(pb, sock)
                    break
                except OSError:
                    pass
            time.sleep(0.1)
        text = document(a.document)
        c = vist2_client.Client(pb, sock)
        doc = c.request(lambda m: (m.open_document.SetInParent(), setattr(m.open_document, "text", text))).document

        instructions = DISTINCT if a.distinct else [a.instruction]

        def prime(n):
            # Every run starts from the same cache: the document's blocks under each
            # instruction the run uses (a compress each), and nothing a generation stored
            # (the blocks of earlier runs' chunk swaps are evicted).
            c.request(lambda m: setattr(m.cache_evict, "all", True))
            comp = None
            for ins in instructions[:n]:
                def compress(m):
                    m.compress.document_id = doc.document_id
                    m.compress.instruction = ins
                comp = c.request(compress).compress_result
            return comp

        counts = [int(x) for x in a.clients.split(",")]
        comp = None  # the document as the last compress saw it (the same chunks under any instruction)
        rounds = []
        for k in range(a.rounds):
            runs = []
            for n in counts:
                comp = prime(n)
                r = run_clients(pb, sock, text, n, a.tokens, instructions)
                runs.append(r)
                print("round %d, N=%d: aggregate %.1f tokens/s, per-token latency %.1f ms, TTFT %.0f ms, swaps %s taking %s ms, "
                      "blocks from the prefix cache %s, chunks from the chunk cache %s, encoded %s, identical texts %s" % (
                          k + 1, n, r["aggregate_decode_tps"], r["per_token_latency_ms"], r["mean_ttft_ms"], r["swaps"],
                          "/".join("%.0f" % x for x in r["swap_ms"]), r["prefix_hits"], r["chunk_hits"], r["encoded"],
                          r["texts_identical"]), flush=True)
            # Ratios to this round's one-client run (when the sweep starts with one client).
            base = runs[0] if runs[0]["clients"] == 1 else None
            for r in runs:
                r["aggregate_vs_1"] = r["aggregate_decode_tps"] / base["aggregate_decode_tps"] if base else None
                r["latency_vs_1"] = r["per_token_latency_ms"] / base["per_token_latency_ms"] if base else None
                r["ceiling_vs_1"] = ceiling(base, r["clients"]) if base else None
            rounds.append(runs)

        def median(xs):
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else None

        keys = ("aggregate_decode_tps", "per_token_latency_ms", "mean_ttft_ms", "aggregate_vs_1", "latency_vs_1", "ceiling_vs_1")
        runs = [dict({"clients": n}, **{key: median(rs[i][key] for rs in rounds) for key in keys}) for i, n in enumerate(counts)]
        out = {"model": a.model, "kv_type": a.kv_type, "threads": a.threads, "distinct": a.distinct, "instructions": instructions[:max(counts)],
               "document_chunks": comp.chunks,
               "document_text_tokens": comp.text_tokens, "rounds": rounds, "runs": runs}
        json.dump(out, open(os.path.join(a.out, "results.json"), "w"), indent=1)

        def ratio(x):
            return "%.2fx" % x if x is not None else "-"

        print("\n%s" % ("medians of %d rounds (each ratio is the median of the rounds' ratios)" % a.rounds if a.rounds > 1 else "one round"))
        print("| clients | aggregate decode tokens/s | vs 1 client | ceiling (own swaps) | per-token latency (ms) | vs 1 client | mean TTFT (ms) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            print("| %d | %.1f | %s | %s | %.1f | %s | %.0f |" % (
                r["clients"], r["aggregate_decode_tps"], ratio(r["aggregate_vs_1"]), ratio(r["ceiling_vs_1"]),
                r["per_token_latency_ms"], ratio(r["latency_vs_1"]), r["mean_ttft_ms"]))
        plot(runs, os.path.join(a.out, "clients.png"))
        print("\nwrote %s/results.json and clients.png" % a.out)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

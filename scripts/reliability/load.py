#!/usr/bin/python3
"""Load: many concurrent clients against one vist2d (the tiny test model by default).

Each of --clients clients makes --requests requests, drawn at random: status, tokenize, a small
generation over its open document, a generation cancelled after its first delta, and a
generation abandoned by disconnecting mid-stream (then it reconnects and reopens its document).
Checks that every request sent on a connection that stayed open got exactly one final reply
(its result, CANCELLED or BUSY: none lost), that a separate process's Status requests were
answered within --status-ms throughout, and reports the daemon's peak RSS.

    /usr/bin/python3 scripts/reliability/load.py [--clients 64] [--requests 100] [--model DIR]
"""
import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import vist2_client  # noqa: E402

DOC = open("/usr/share/common-licenses/Apache-2.0").read()[:1500]


def worker(pb, path, n, seed, out):
    rng = random.Random(seed)
    counts = {"sent": 0, "finals": 0, "busy": 0, "cancelled": 0, "errors": {}, "abandoned": 0}

    def connect():
        c = vist2_client.Client(pb, path)
        c.sock.settimeout(60)  # a reply that never comes fails the run instead of hanging it
        r = c.request(lambda m: m.open_document.CopyFrom(pb.OpenDocument(text=DOC, path="load.txt")))
        return c, r.document.document_id

    finals = {}  # final replies read while waiting for another request's

    def final(c, rid):
        """The final reply of rid (read now, or earlier while waiting for another one)."""
        while rid not in finals:
            r = c.recv()
            if r.final:
                finals[r.request_id] = r
        return finals.pop(rid)

    c, doc = connect()
    try:
        run(c, doc, n, rng, counts, connect, final, finals)
    except Exception as e:  # a lost reply (timeout) or a closed connection
        counts["failure"] = "%s: %s (during %s)" % (type(e).__name__, e, counts.get("last"))
    out.append(counts)


def run(c, doc, n, rng, counts, connect, final, finals):
    pb = c.pb
    for _ in range(n):
        kind = rng.choice(["status", "tokenize", "generate", "generate", "cancel", "disconnect"])
        counts["last"] = kind
        rid = c.next_id
        c.next_id += 1
        m = pb.ClientMessage(request_id=rid)
        if kind == "status":
            m.status.SetInParent()
        elif kind == "tokenize":
            m.tokenize.text = DOC[: rng.randint(1, 400)]
        else:
            m.generate.document_ids.append(doc)
            m.generate.instruction = "Continue:"
            m.generate.max_tokens = rng.randint(1, 12) if kind == "generate" else 200
            m.generate.sampling.temperature = 0
        c.send(m)
        if kind == "disconnect":
            c.recv()  # one reply of the stream (or its final), then go away
            c.sock.close()
            counts["abandoned"] += 1
            finals.clear()
            c, doc = connect()
            continue
        counts["sent"] += 1
        if kind == "cancel":
            first = c.recv()
            while first.request_id != rid:
                first = c.recv()
            if first.final:
                finals[rid] = first
            else:
                cm = pb.ClientMessage(request_id=c.next_id)
                c.next_id += 1
                cm.cancel.target_request_id = rid
                c.send(cm)
                final(c, cm.request_id)  # the Cancel's own Ack (or NOT_FOUND if it had ended)
            r = final(c, rid)
        else:
            r = final(c, rid)
        counts["finals"] += 1
        if r.WhichOneof("body") == "error":
            name = pb.ErrorCode.Name(r.error.code)
            if name == "BUSY":
                counts["busy"] += 1
            elif name == "CANCELLED":
                counts["cancelled"] += 1
            else:
                counts["errors"][name] = counts["errors"].get(name, 0) + 1


def prober(path, stop, result):
    pb = vist2_client.load_protocol()
    c = vist2_client.Client(pb, path)
    worst, n = 0.0, 0
    while not stop.is_set():
        t0 = time.monotonic()
        c.request(lambda m: m.status.SetInParent())
        worst = max(worst, time.monotonic() - t0)
        n += 1
        time.sleep(0.05)
    result.put({"status_requests": n, "status_worst_ms": round(worst * 1000, 1)})


def peak_rss(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--model", default=os.path.join(ROOT, "Tests/VistEngineTests/Fixtures/tiny-vist2"))
    ap.add_argument("--status-ms", type=float, default=100)
    ap.add_argument("--queue", type=int, default=16)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vist2-load-")
    path = os.path.join(work, "vist2.sock")
    log = open(os.path.join(work, "vist2d.log"), "w")
    d = subprocess.Popen(
        [os.path.join(ROOT, ".build/release/vist2d"), "--model", args.model, "--socket", path, "--cache-dir",
         os.path.join(work, "cache"), "--queue", str(args.queue)], stderr=log)
    for _ in range(300):
        if os.path.exists(path):
            break
        time.sleep(0.05)
    pb = vist2_client.load_protocol()
    stop = multiprocessing.Event()
    result = multiprocessing.Queue()
    probe = multiprocessing.Process(target=prober, args=(path, stop, result))
    probe.start()
    time.sleep(0.3)
    out = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(pb, path, args.requests, i, out)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    stop.set()
    probed = result.get()
    m = vist2_client.Client(pb, path).request(lambda m: m.status.SetInParent()).status
    probed["final_status"] = dict(state=m.state, queue=m.queue_length, clients=m.clients, stalled_s=m.engine_stalled_seconds)
    probe.join()
    rss = peak_rss(d.pid)
    d.terminate()
    code = d.wait()
    total = {k: sum(c[k] for c in out) for k in ["sent", "finals", "busy", "cancelled", "abandoned"]}
    errors = {}
    failures = [c["failure"] for c in out if "failure" in c]
    for c in out:
        for k, v in c["errors"].items():
            errors[k] = errors.get(k, 0) + v
    report = dict(clients=args.clients, requests_per_client=args.requests, workers_finished=len(out),
                  seconds=round(elapsed, 1), lost=total["sent"] - total["finals"], errors=errors, failures=failures[:5],
                  peak_rss_bytes=rss, daemon_exit=code, **total, **probed)
    print(json.dumps(report))
    ok = (len(out) == args.clients and report["lost"] == 0 and not errors and not failures and code == 0
          and probed["status_worst_ms"] <= args.status_ms)
    print("load: %d passed, %d failed" % (1 if ok else 0, 0 if ok else 1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

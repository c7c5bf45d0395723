#!/usr/bin/python3
"""Hostile clients against one vist2d (the tiny test model), each dropped by its limit while a
well-behaved client keeps being served:

- 2,000 idle connections that never send Hello: past --max-connections they get BUSY, the rest
  are closed by the handshake timeout;
- a client that sends Hello, then a frame header, then nothing: closed by the frame timeout;
- a client that floods requests and never reads a reply: closed by the unread-replies limit;
- a client that announces a 4 GiB frame, and one that streams 4 MiB documents (4 GiB over time):
  the first is refused at the header (FRAME_TOO_LARGE), the second gets DOCUMENT_TOO_LARGE once
  its connection holds its limit, and the daemon's memory stays bounded.

    /usr/bin/python3 scripts/reliability/hostile.py [--idle 2000] [--stream-gib 4]
"""
import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import vist2_client  # noqa: E402

HEADER = struct.Struct(">2sBBI")


def frame(pb_message):
    p = pb_message.SerializeToString()
    return HEADER.pack(b"V2", 1, 0, len(p)) + p


def rss(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def last_error(pb, data):
    """The error code name of the last whole frame in `data`, or None."""
    name, i = None, 0
    while len(data) - i >= HEADER.size:
        _, _, _, n = HEADER.unpack_from(data, i)
        if len(data) - i - HEADER.size < n:
            break
        m = pb.ServerMessage()
        m.ParseFromString(data[i + HEADER.size:i + HEADER.size + n])
        if m.WhichOneof("body") == "error":
            name = pb.ErrorCode.Name(m.error.code)
        i += HEADER.size + n
    return name


def closed_within(sock, seconds):
    """Reads until EOF; returns (seconds it took, the last error code seen) or (None, ...)."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return time.monotonic() - t0, data
            data += chunk
    except ConnectionResetError:  # closed with our bytes unread
        return time.monotonic() - t0, data
    except socket.timeout:
        return None, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--stream-gib", type=float, default=4)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.idle + 512)), hard))
    work = tempfile.mkdtemp(prefix="vist2-hostile-")
    path = os.path.join(work, "vist2.sock")
    log = open(os.path.join(work, "vist2d.log"), "w")
    # The daemon as a service would run it: LimitNOFILE=4096 (the unit's), default limits.
    d = subprocess.Popen(
        ["prlimit", "--nofile=4096:4096", os.path.join(ROOT, ".build/release/vist2d"), "--model",
         os.path.join(ROOT, "Tests/VistEngineTests/Fixtures/tiny-vist2"), "--socket", path, "--cache-dir",
         os.path.join(work, "cache")], stderr=log)
    for _ in range(300):
        if os.path.exists(path):
            break
        time.sleep(0.05)
    pb = vist2_client.load_protocol()
    good = vist2_client.Client(pb, path)
    report = {}
    served = []
    stop = threading.Event()

    def well_behaved():
        while not stop.is_set():
            t0 = time.monotonic()
            r = good.request(lambda m: (setattr(m.generate, "instruction", "Hi"), setattr(m.generate, "max_tokens", 4)))
            served.append((time.monotonic() - t0, r.generate_result.generated_tokens))
            time.sleep(0.1)

    bg = threading.Thread(target=well_behaved)
    bg.start()
    base_rss = rss(d.pid)

    # 2,000 idle connections.
    idle, busy = [], 0
    for _ in range(args.idle):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        idle.append(s)
    for s in idle:
        s.setblocking(False)
    time.sleep(0.5)
    for s in idle:
        try:
            if s.recv(65536):
                busy += 1
        except BlockingIOError:
            pass
        except ConnectionResetError:
            busy += 1
    t0 = time.monotonic()
    open_left = len(idle)
    while open_left and time.monotonic() - t0 < 30:
        open_left = 0
        for s in idle:
            try:
                if s.recv(65536) != b"":
                    open_left += 1
            except BlockingIOError:
                open_left += 1
            except (ConnectionResetError, OSError):
                pass
        time.sleep(0.25)
    report["idle"] = dict(connections=args.idle, refused_busy=busy, still_open_after_30s=open_left,
                          closed_after_s=round(time.monotonic() - t0, 1))
    for s in idle:
        s.close()

    # A header, then silence.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    hello = pb.ClientMessage(request_id=0)
    hello.hello.protocol_version = 1
    s.sendall(frame(hello) + HEADER.pack(b"V2", 1, 0, 1000))
    took, data = closed_within(s, 60)
    report["stalled_frame"] = dict(closed_after_s=None if took is None else round(took, 1), error=last_error(pb, data))

    # A client that never reads: floods Status requests.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(frame(hello))
    status = pb.ClientMessage(request_id=1)
    status.status.SetInParent()
    burst = frame(status) * 10000
    sent, peak = 0, 0
    s.settimeout(5)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 120:
            s.sendall(burst)
            sent += len(burst)
            peak = max(peak, rss(d.pid))
    except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError) as e:
        dropped = type(e).__name__
    else:
        dropped = None
    report["never_reads"] = dict(bytes_sent=sent, dropped=dropped, daemon_rss_peak=peak)
    s.close()

    # A 4 GiB frame header.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(frame(hello) + HEADER.pack(b"V2", 1, 0, 0xFFFFFFFF) + b"x" * 65536)
    took, data = closed_within(s, 10)
    report["huge_frame"] = dict(closed_after_s=None if took is None else round(took, 2), error=last_error(pb, data))
    s.close()

    # 4 MiB documents, streamed until --stream-gib have been sent, replies read.
    c = vist2_client.Client(pb, path)
    text = "y" * ((4 << 20) - 4096)
    opened, too_large, other, sent, peak = 0, 0, 0, 0, 0
    while sent < args.stream_gib * (1 << 30):
        try:
            c.request(lambda m: m.open_document.CopyFrom(pb.OpenDocument(text=text)))
            opened += 1
        except RuntimeError as e:
            if "DOCUMENT_TOO_LARGE" in str(e):
                too_large += 1
            else:
                other += 1
        sent += len(text)
        peak = max(peak, rss(d.pid))
    report["document_stream"] = dict(bytes_sent=sent, opened=opened, document_too_large=too_large, other_errors=other,
                                     daemon_rss_peak=peak)
    del c

    stop.set()
    bg.join()
    report["well_behaved"] = dict(requests=len(served), worst_s=round(max(t for t, _ in served), 3),
                                  all_complete=all(n == 4 for _, n in served))
    report["daemon_rss_start"] = base_rss
    d.terminate()
    report["daemon_exit"] = d.wait()
    print(json.dumps(report))
    ok = (report["idle"]["still_open_after_30s"] == 0 and report["stalled_frame"]["closed_after_s"] is not None
          and report["never_reads"]["dropped"] is not None and report["huge_frame"]["error"] == "FRAME_TOO_LARGE" and report["stalled_frame"]["error"] == "TIMEOUT"
          and report["document_stream"]["document_too_large"] > 0 and report["document_stream"]["other_errors"] == 0
          and report["well_behaved"]["all_complete"] and report["well_behaved"]["requests"] > 10
          and report["daemon_exit"] == 0)
    print("hostile: %d passed, %d failed" % (1 if ok else 0, 0 if ok else 1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

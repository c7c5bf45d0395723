#!/usr/bin/env python3
"""An independent vist2d client: the `protobuf` package plus code that `protoc --python_out`
generates from Protocols/vist2.proto (nothing shared with the Swift or C clients).

    python3 clients/python/vist2_client.py --socket PATH FILE INSTRUCTION

Generates the protobuf module into a temporary directory, connects, handshakes, opens FILE,
compresses it (printing progress), streams a greedy generation over it, closes the document, and
prints one JSON line with what it saw. Exit status 0 when every step succeeded.
"""
import argparse
import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = struct.Struct(">2sBBI")  # 'V2', version 1, flags 0, payload length (big-endian)


def load_protocol():
    out = tempfile.mkdtemp(prefix="vist2-py-")
    subprocess.run(["protoc", "-I", os.path.join(ROOT, "Protocols"), "--python_out", out, "vist2.proto"], check=True)
    sys.path.insert(0, out)
    return importlib.import_module("vist2_pb2")


class Client:
    def __init__(self, pb, path):
        self.pb = pb
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 1
        m = pb.ClientMessage(request_id=0)
        m.hello.protocol_version = 1
        m.hello.client_name = "vist2_client.py"
        self.send(m)
        r = self.recv()
        if r.WhichOneof("body") != "hello":
            raise RuntimeError("handshake failed: %s" % r)
        self.hello = r.hello

    def send(self, m):
        payload = m.SerializeToString()
        self.sock.sendall(HEADER.pack(b"V2", 1, 0, len(payload)) + payload)

    def recv(self):
        while True:
            if len(self.buf) >= HEADER.size:
                magic, version, flags, n = HEADER.unpack_from(self.buf)
                if magic != b"V2" or version != 1:
                    raise RuntimeError("bad frame header")
                if len(self.buf) >= HEADER.size + n:
                    payload = self.buf[HEADER.size:HEADER.size + n]
                    self.buf = self.buf[HEADER.size + n:]
                    r = self.pb.ServerMessage()
                    r.ParseFromString(payload)
                    return r
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the daemon closed the connection")
            self.buf += chunk

    def request(self, fill, on_partial=None):
        m = self.pb.ClientMessage(request_id=self.next_id)
        self.next_id += 1
        fill(m)
        self.send(m)
        while True:
            r = self.recv()
            if r.request_id != m.request_id:
                continue
            if r.WhichOneof("body") == "error":
                raise RuntimeError("error %s: %s" % (self.pb.ErrorCode.Name(r.error.code), r.error.message))
            if r.final:
                return r
            if on_partial:
                on_partial(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("file")
    ap.add_argument("instruction")
    a = ap.parse_args()
    pb = load_protocol()
    c = Client(pb, a.socket)
    text = open(a.file, encoding="utf-8").read()
    doc = c.request(lambda m: (m.open_document.SetInParent(), setattr(m.open_document, "text", text),
                               setattr(m.open_document, "path", a.file))).document
    progress = []
    comp = c.request(lambda m: setattr(m.compress, "document_id", doc.document_id),
                     lambda r: progress.append(r.compress_progress.chunks_done)).compress_result
    deltas = []

    def gen(m):
        m.generate.document_ids.append(doc.document_id)
        m.generate.instruction = a.instruction
        m.generate.max_tokens = a.max_tokens
        m.generate.sampling.temperature = 0
        m.generate.sampling.top_p = 1

    res = c.request(gen, lambda r: deltas.append(r.text_delta.text)).generate_result
    c.request(lambda m: setattr(m.close_document, "document_id", doc.document_id))
    metrics = c.request(lambda m: m.metrics.SetInParent()).metrics.prometheus_text
    out = {
        "server_version": c.hello.server_version, "fingerprint": c.hello.model_fingerprint,
        "chunks": comp.chunks, "progress_messages": len(progress), "chunks_rendered": comp.chunks_rendered,
        "prefix_cache_hits": comp.prefix_cache_hits, "generated_tokens": res.generated_tokens,
        "generate_prefix_cache_hits": res.prefix_cache_hits, "swaps": res.swaps,
        "streamed_equals_text": "".join(deltas) == res.text,
        "metrics_lines": len(metrics.splitlines()),
    }
    print(json.dumps(out))
    ok = (len(c.hello.model_fingerprint) == 64 and res.generated_tokens == a.max_tokens and out["streamed_equals_text"]
          and len(progress) == comp.chunks - 1 and "vist2_up 1" in metrics
          # Every finished chunk's block from the cache the compress filled; a chunk swap's block too
          # when an identical generation stored it before (the C example's, in scripts/live-test.sh).
          and comp.chunks - 1 <= res.prefix_cache_hits <= comp.chunks - 1 + res.swaps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

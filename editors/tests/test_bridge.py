"""`vist2ctl bridge` against a live vist2d on the tiny model: every request, malformed input,
cancel mid-stream, a daemon restart mid-session, a daemon that is not there yet."""

import json
import os
import signal
import time
import unittest

from harness import DOC, BridgeClient, DaemonTestCase


class BridgeCase(DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.bridge = BridgeClient(self.daemon.socket)
        up = self.bridge.next()
        self.assertEqual(up["event"], "daemon_up")
        self.assertEqual(up["protocol_version"], 1)
        self.assertEqual(up["reopened"], 0)
        self.assertIn("compress", up["capabilities"])

    def tearDown(self):
        self.bridge.close()
        super().tearDown()

    def open(self, text, rid="open", path=""):
        _, e = self.bridge.call(id=rid, op="open", text=text, path=path)
        self.assertEqual(e["event"], "document", e)
        return e["document"]


class BridgeTests(BridgeCase):
    def test_every_request(self):
        b = self.bridge
        doc = self.open(DOC, path="/tmp/doc.txt")
        _, st = b.call(id=1, op="status")
        self.assertEqual((st["event"], st["state"], st["documents_open"], st["documents"]), ("status", "ready", 1, 1))
        # compress: progress events, then the same figures as `vist2ctl compress --json`.
        progress, done = b.call(id=2, op="compress", document=doc, instruction="Summarize:")
        self.assertEqual(done["event"], "compressed")
        chunks = done["chunks"]
        self.assertGreater(chunks, 10)
        self.assertEqual(done["chunks_encoded"], chunks - 1)
        self.assertEqual([p["chunks_done"] for p in progress], list(range(1, chunks)))
        self.assertTrue(all(p["event"] == "progress" and p["chunks_total"] == chunks - 1 for p in progress))
        # generate: deltas, then `done` with the text and statistics `vist2ctl generate --json` gives.
        deltas, final = b.call(id=3, op="generate", documents=[doc], prompt="Summarize:", max_tokens=12, temperature=0)
        self.assertEqual(final["event"], "done")
        self.assertEqual("".join(d["text"] for d in deltas), final["text"])
        self.assertTrue(all(d["event"] == "delta" for d in deltas))
        self.assertEqual(final["prefix_cache_hits"], chunks - 1, "compress filled the cache the generation starts from")
        ref = self.reference_generate([DOC], "Summarize:", 12)
        self.assertEqual(final["text"], ref["text"])
        self.assertEqual(set(ref) - {"ttft_ms"}, set(final) - {"id", "event", "final", "ttft_ms"})
        for key in ("generated_tokens", "prompt_tokens", "visual_tokens", "doc_text_tokens", "chunks", "mode", "stop_reason"):
            self.assertEqual(final[key], ref[key], key)
        # update: one edited line re-encodes only the chunks it touches.
        edited = DOC.replace("Version 2.0", "Version 2.1", 1)
        self.assertNotEqual(edited, DOC)
        _, u = b.call(id=4, op="update", document=doc, text=edited)
        self.assertEqual((u["event"], u["document"], u["bytes"], u["synced"]), ("document", doc, len(edited.encode()), True))
        _, again = b.call(id=5, op="compress", document=doc, instruction="Summarize:")
        self.assertLessEqual(again["chunks_encoded"], 2)
        self.assertGreater(again["prefix_cache_hits"], 0, "the blocks before the edit come from the prefix cache")
        self.assertEqual(again["chunk_cache_hits"] + again["prefix_cache_hits"] + again["chunks_encoded"], again["chunks"] - 1)
        _, g2 = b.call(id=6, op="generate", documents=[doc], prompt="Summarize:", max_tokens=12, temperature=0)
        self.assertEqual(g2["text"], self.reference_generate([edited], "Summarize:", 12)["text"])
        # cache_stats, documents, close.
        _, cs = b.call(id=7, op="cache_stats")
        self.assertEqual(cs["event"], "cache_stats")
        self.assertGreater(cs["entries"], 0)
        _, ds = b.call(id=8, op="documents")
        self.assertEqual(ds["documents"], [{"document": doc, "path": "/tmp/doc.txt", "bytes": len(edited.encode()), "synced": True}])
        _, c = b.call(id="close", op="close", document=doc)
        self.assertEqual((c["event"], c["document"]), ("closed", doc))
        _, st = b.call(id=9, op="status")
        self.assertEqual((st["documents_open"], st["documents"]), (0, 0))
        _, e = b.call(id=10, op="compress", document=doc)
        self.assertEqual(e["error"]["code"], "unknown_document")

    def test_malformed_input(self):
        b = self.bridge
        cases = [
            (b"not json\n", None, "bad_request"),
            (b"[1, 2]\n", None, "bad_request"),
            (b'{"op": "status"}\n', None, "bad_request"),
            (b'{"id": [1], "op": "status"}\n', None, "bad_request"),
            (b'{"id": 1}\n', 1, "bad_request"),
            (b'{"id": 2, "op": "fly"}\n', 2, "unknown_request"),
            (b'{"id": 3, "op": "generate", "max_tokens": -1}\n', 3, "bad_request"),
            (b'{"id": 4, "op": "generate", "max_tokens": 1e40}\n', 4, "bad_request"),
            (b'{"id": 5, "op": "generate", "temperature": "hot"}\n', 5, "bad_request"),
            (b'{"id": 6, "op": "generate", "documents": "doc1"}\n', 6, "bad_request"),
            (b'{"id": 7, "op": "generate", "documents": ["nope"]}\n', 7, "unknown_document"),
            (b'{"id": 8, "op": "open"}\n', 8, "bad_request"),
            (b'{"id": 9, "op": "open", "text": 12}\n', 9, "bad_request"),
            (b'{"id": 10, "op": "update", "document": "doc9", "text": ""}\n', 10, "unknown_document"),
            (b'{"id": 11, "op": "cancel", "target": 999}\n', 11, "not_found"),
            (b'{"id": 12, "op": "generate", "top_p": 7}\n', 12, "bad_request"),  # the daemon's own check
            (b'{"id": 13, "op": "compress"}\n', 13, "bad_request"),
            (b'\xff\xfe{"id": 14}\n', None, "bad_request"),
        ]
        for raw, rid, code in cases:
            b.send_raw(raw)
            e = b.next()
            self.assertEqual((e["event"], e["id"], e["error"]["code"]), ("error", rid, code), raw)
            self.assertTrue(e["final"] and e["error"]["message"])
        # Blank lines are skipped; a line over the limit is refused and the next one still served.
        b.send_raw(b"\n   \n")
        b.send_raw(b'{"id": "big", "op": "open", "text": "' + b"x" * (33 << 20) + b'"}\n')
        e = b.next()
        self.assertEqual(e["error"]["code"], "bad_request")
        self.assertIn("over the limit", e["error"]["message"])
        _, st = b.call(id="after", op="status")
        self.assertEqual(st["event"], "status")
        # A document over the daemon's limit is refused by the bridge itself.
        _, big = b.call(id="big2", op="open", text="y" * ((4 << 20) + 1))
        self.assertEqual(big["error"]["code"], "document_too_large")

    def test_daemon_restart_mid_session(self):
        b = self.bridge
        doc = self.open(DOC)
        other = self.open("A second buffer.\n", rid="open2")
        b.call(id="c", op="compress", document=doc)
        b.send(id="g", op="generate", documents=[doc], prompt="Go on:", max_tokens=60000, temperature=0)
        b.until(lambda e: e.get("id") == "g" and e["event"] == "delta")
        self.daemon.kill()
        seen = b.until(lambda e: e.get("event") == "daemon_down")
        failed = [e for e in seen if e.get("id") == "g" and e.get("final")]
        self.assertEqual(failed[0]["error"]["code"], "connection_closed")
        # While it is away: edits are kept, requests that need it fail at once with a clear code.
        edited = DOC.replace("Apache", "APACHE", 1)
        _, u = b.call(id="u", op="update", document=doc, text=edited)
        self.assertEqual((u["event"], u["synced"]), ("document", False))
        _, o = b.call(id="o", op="open", text="Opened while the daemon was down.\n")
        self.assertEqual((o["event"], o["synced"]), ("document", False))
        _, g = b.call(id="g2", op="generate", documents=[doc], prompt="x")
        self.assertEqual(g["error"]["code"], "daemon_unavailable")
        _, ds = b.call(id="d", op="documents")
        self.assertEqual([d["synced"] for d in ds["documents"]], [False, False, False])
        # Back: the bridge reconnects by itself and opens every document again, edits included.
        self.daemon.start()
        up = b.until(lambda e: e.get("event") == "daemon_up", timeout=30)[-1]
        self.assertEqual(up["reopened"], 3)
        _, st = b.call(id="s", op="status")
        self.assertEqual((st["documents_open"], st["documents"]), (3, 3))
        deltas, final = b.call(id="g3", op="generate", documents=[doc, other], prompt="Go on:", max_tokens=10, temperature=0)
        self.assertEqual(final["event"], "done")
        self.assertEqual(final["text"], self.reference_generate([edited, "A second buffer.\n"], "Go on:", 10)["text"])
        # The persistent cache survived the restart: only the edited chunk is encoded again.
        self.assertLessEqual(final["chunks_encoded"], 2)

    def test_daemon_not_there_yet(self):
        self.bridge.close()
        self.daemon.kill(signal.SIGTERM)
        b = self.bridge = BridgeClient(self.daemon.socket)
        down = b.next()
        self.assertEqual(down["event"], "daemon_down")
        self.assertIn("cannot connect to the vist2 daemon at " + self.daemon.socket, down["message"])
        _, o = b.call(id=1, op="open", text=DOC)
        self.assertFalse(o["synced"])
        _, s = b.call(id=2, op="status")
        self.assertEqual(s["error"]["code"], "daemon_unavailable")
        self.daemon.start()
        up = b.until(lambda e: e.get("event") == "daemon_up", timeout=30)[-1]
        self.assertEqual(up["reopened"], 1)
        _, c = b.call(id=3, op="compress", document=o["document"])
        self.assertEqual(c["event"], "compressed")

    def test_stdin_end_lets_requests_finish(self):
        b = self.bridge
        b.send(id=1, op="open", text=DOC)
        b.send(id=2, op="generate", documents=["doc1"], prompt="Hi", max_tokens=30, temperature=0)
        b.proc.stdin.close()
        seen = b.until(lambda e: e.get("id") == 2 and e.get("final"))
        self.assertEqual(seen[-1]["event"], "done")
        self.assertEqual(seen[-1]["generated_tokens"], 30)
        self.assertEqual(b.proc.wait(timeout=10), 0)

    def test_chosen_handles(self):
        _, o = self.bridge.call(id=1, op="open", text="one\n", document="buffer-7")
        self.assertEqual(o["document"], "buffer-7")
        _, dup = self.bridge.call(id=2, op="open", text="two\n", document="buffer-7")
        self.assertEqual(dup["error"]["code"], "bad_request")
        _, empty = self.bridge.call(id=3, op="open", text="two\n", document="")
        self.assertEqual(empty["error"]["code"], "bad_request")
        _, auto = self.bridge.call(id=4, op="open", text="three\n")
        self.assertEqual(auto["document"], "doc1")
        _, ds = self.bridge.call(id=5, op="documents")
        self.assertEqual([d["document"] for d in ds["documents"]], ["buffer-7", "doc1"])
        _, g = self.bridge.call(id=6, op="generate", documents=["buffer-7", "doc1"], prompt="x", max_tokens=2, temperature=0)
        self.assertEqual(g["event"], "done")

    def test_stdin_end_closes_the_connection(self):
        self.open(DOC)
        self.assertEqual(self.daemon.ctl_json("status")["documents_open"], 1)
        self.bridge.close()
        self.assertEqual(self.bridge.proc.returncode, 0)
        deadline = time.time() + 10
        while self.daemon.ctl_json("status")["documents_open"] != 0 and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.daemon.ctl_json("status")["documents_open"], 0)


class BridgeIdleTests(BridgeCase):
    """A daemon that closes connections silent for a second."""

    daemon_extra = ("--idle-timeout", "1")

    def test_an_idle_session_keeps_its_connection(self):
        doc = self.open(DOC)
        time.sleep(3.5)
        self.assertTrue(self.bridge.events.empty(), "no daemon_down, no reconnect")
        self.assertEqual(self.daemon.ctl_json("status")["documents_open"], 1)
        _, st = self.bridge.call(id=1, op="status")
        self.assertEqual((st["event"], st["documents_open"]), ("status", 1))
        _, c = self.bridge.call(id=2, op="compress", document=doc)
        self.assertEqual(c["event"], "compressed")


class BridgeCancelTests(BridgeCase):
    daemon_model = "default"

    def test_duplicate_id_and_cancel_mid_stream(self):
        b = self.bridge
        doc = self.open(DOC)
        b.send(id="g", op="generate", documents=[doc], prompt="Write a long story:", max_tokens=2000, temperature=0)
        b.until(lambda e: e.get("id") == "g" and e["event"] == "delta")
        # The same id again while it runs is refused; the running request goes on.
        _, dup = b.call(id="g", op="status")
        self.assertEqual(dup["error"]["code"], "duplicate_request_id")
        b.send(id="stop", op="cancel", target="g")
        seen = b.until(lambda e: e.get("id") == "g" and e.get("final"))
        acks = [e for e in seen if e.get("id") == "stop"]
        self.assertEqual([a["event"] for a in acks], ["ack"])
        final = seen[-1]
        self.assertEqual(final["error"]["code"], "cancelled")
        after_ack = seen[seen.index(acks[0]) + 1:-1]
        # Stops within one decode step: at most the token already on its way and one more.
        self.assertLessEqual(len([e for e in after_ack if e.get("id") == "g"]), 2)
        generated = len([e for e in seen if e.get("event") == "delta"])
        self.assertLess(generated, 2000)
        # No more text arrives for it, and the id is free again.
        time.sleep(0.3)
        self.assertTrue(b.events.empty())
        _, st = b.call(id="g", op="status")
        self.assertEqual(st["event"], "status")


if __name__ == "__main__":
    unittest.main()

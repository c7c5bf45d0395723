"""Shared pieces of the editor tests: a real vist2d on the tiny test model in a temporary runtime
directory, vist2ctl, and a JSON-lines client of `vist2ctl bridge`.

The binaries come from $VIST2_BIN (default: .build/release of this checkout)."""

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("VIST2_BIN", os.path.join(ROOT, ".build", "release"))
TINY_MODEL = os.path.join(ROOT, "Tests", "VistEngineTests", "Fixtures", "tiny-vist2")
VIST2CTL = os.path.join(BIN, "vist2ctl")
VIST2D = os.path.join(BIN, "vist2d")
# A document the tiny model (context 512) reads whole: ~40 chunks of 32 tokens.
with open("/usr/share/common-licenses/Apache-2.0", encoding="utf-8") as _f:
    DOC = _f.read()[:1000]


class Daemon:
    """vist2d on the tiny model, listening on $XDG_RUNTIME_DIR/vist2/vist2.sock of `runtime`."""

    def __init__(self, runtime, cache_dir, extra=(), model=TINY_MODEL):
        self.model = model
        self.socket = os.path.join(runtime, "vist2", "vist2.sock")
        self.cache_dir = cache_dir
        self.extra = list(extra)
        self.proc = None

    def start(self, wait=True):
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        self.log = open(os.path.join(self.cache_dir + ".log"), "ab")
        self.proc = subprocess.Popen(
            [VIST2D, "--model", self.model, "--socket", self.socket, "--threads", "1", "--cache-dir", self.cache_dir] + self.extra,
            stdout=self.log, stderr=self.log)
        if wait:
            deadline = time.time() + 60
            while not os.path.exists(self.socket):
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("vist2d did not start; see " + self.cache_dir + ".log")
                time.sleep(0.05)
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        # A killed daemon leaves its socket file; a new one replaces it.
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def ctl(self, *args):
        """vist2ctl against this daemon; returns (status, stdout, stderr)."""
        args = list(args)
        # Options go before a "--" that ends them.
        at = args.index("--") if "--" in args else len(args)
        args[at:at] = ["--socket", self.socket]
        r = subprocess.run([VIST2CTL] + args, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout, r.stderr

    def ctl_json(self, *args):
        args = list(args)
        at = args.index("--") if "--" in args else len(args)
        args.insert(at, "--json")
        status, out, err = self.ctl(*args)
        if status != 0:
            raise AssertionError("vist2ctl %s failed: %s" % (" ".join(args), err))
        return json.loads(out)


class BridgeClient:
    """`vist2ctl bridge` as an editor runs it: requests as JSON lines, events read on a thread."""

    def __init__(self, socket, extra=()):
        self.proc = subprocess.Popen([VIST2CTL, "bridge", "--socket", socket, "--retry-interval", "0.1"] + list(extra),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events = queue.Queue()
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.events.put(json.loads(line))
        self.events.put(None)

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, **request):
        self.send_raw((json.dumps(request) + "\n").encode())

    def next(self, timeout=60):
        e = self.events.get(timeout=timeout)
        if e is None:
            raise AssertionError("the bridge exited: " + self.proc.stderr.read().decode(errors="replace"))
        return e

    def until(self, pred, timeout=60):
        """Events up to and including the first that satisfies pred (others in between returned too)."""
        seen = []
        deadline = time.time() + timeout
        while True:
            e = self.next(timeout=max(0.1, deadline - time.time()))
            seen.append(e)
            if pred(e):
                return seen

    def call(self, timeout=60, **request):
        """Sends a request and returns (its non-final events, its final event)."""
        self.send(**request)
        seen = self.until(lambda e: e.get("id") == request["id"] and e.get("final"), timeout)
        mine = [e for e in seen if e.get("id") == request["id"]]
        return mine[:-1], mine[-1]

    def close(self):
        if self.proc.poll() is None:
            if not self.proc.stdin.closed:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


class DaemonTestCase(unittest.TestCase):
    """Each test gets a runtime directory, a cache directory and a running daemon: on the tiny
    model, or, for tests that need a generation long enough to stop in the middle (the tiny model
    writes its ~600 tokens in a fifth of a second), on the default model (~75 tokens/s here)."""

    daemon_model = TINY_MODEL
    daemon_extra = ()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="vist2-editor-")
        self.runtime = os.path.join(self.tmp, "run")
        self.daemon = Daemon(self.runtime, os.path.join(self.tmp, "cache"), extra=self.daemon_extra, model=self.daemon_model).start()
        self.env = dict(os.environ, XDG_RUNTIME_DIR=self.runtime, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))

    def tearDown(self):
        self.daemon.kill(signal.SIGTERM)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def reference_generate(self, texts, prompt, max_tokens, chat=False):
        """What `vist2ctl generate --json` answers for these documents and prompt (greedy)."""
        paths = []
        for i, t in enumerate(texts):
            p = os.path.join(self.tmp, "ref%d.txt" % i)
            with open(p, "w", encoding="utf-8") as f:
                f.write(t)
            paths.append(p)
        args = ["generate", "--temperature", "0", "--max-tokens", str(max_tokens)]
        for p in paths:
            args += ["--doc", p]
        if chat:
            args.append("--chat")
        return self.daemon.ctl_json(*args, "--", prompt)

"""The Neovim plugin (editors/nvim) in a real, headless Neovim driven through its RPC API, against
a live vist2d on the tiny model."""

import os
import re
import shutil
import signal
import time
import unittest

import pynvim

from harness import DOC, ROOT, DaemonTestCase

PLUGIN = os.path.join(ROOT, "editors", "nvim")
# The Neovim to test (default: Debian's, on PATH); e.g. VIST2_NVIM=/path/to/nvim-0.10.
NVIM = os.environ.get("VIST2_NVIM", "nvim")


class NvimCase(DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.file = os.path.join(self.tmp, "notes.txt")
        with open(self.file, "w", encoding="utf-8") as f:
            f.write(DOC)
        self.nvim = self.start_nvim()

    def start_nvim(self):
        # pynvim 0.4 (Debian 12) cannot pass an environment: env(1) does.
        argv = ["env", "XDG_RUNTIME_DIR=" + self.env["XDG_RUNTIME_DIR"], "PATH=" + self.env["PATH"], NVIM, "--embed", "--headless", "-u", "NONE", "-i", "NONE", "-n",
                "--cmd", "set rtp^=" + PLUGIN, "--cmd", "runtime! plugin/vist2.lua"]
        nvim = pynvim.attach("child", argv=argv)
        nvim.exec_lua("require('vist2').setup({ debounce_ms = 200, temperature = 0, chat = false, max_tokens = 12 })")
        return nvim

    def tearDown(self):
        try:
            self.nvim.command("qa!", async_=True)
            self.nvim.close()
        except Exception:
            pass
        super().tearDown()

    def lua(self, code, *args):
        return self.nvim.exec_lua(code, *args)

    def status(self):
        return self.lua("return require('vist2').status()")

    def wait(self, pred, timeout=30, what="condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        self.fail("timed out waiting for " + what)

    def metric(self, name):
        _, text, _ = self.daemon.ctl("metrics")
        m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def buffer_text(self):
        """The buffer as a file: its lines, and a final newline unless 'noeol'."""
        lines = self.nvim.current.buffer[:]
        return "\n".join(lines) + ("\n" if self.nvim.current.buffer.options["eol"] else "")

    def attach(self):
        self.nvim.command("edit " + self.file)
        self.nvim.command("Vist2Attach")
        self.wait(lambda: self.daemon.ctl_json("status")["documents_open"] == 1, what="the document to open")

    def ask(self, prompt, timeout=60):
        self.nvim.command("Vist2Ask " + prompt)
        self.wait(lambda: self.status() not in ("generating",), timeout, "the answer")
        return self.lua("return require('vist2').answer()")

class NvimTests(NvimCase):
    def test_attach_edit_ask(self):
        self.attach()
        self.assertEqual(self.lua("return #require('vist2').documents()"), 1)
        # An edit reaches the daemon as one update after the debounce, not per keystroke.
        updates = 'vist2_requests_total{type="update_document"}'
        before = self.metric(updates)
        buf = self.nvim.current.buffer
        for i in range(3):
            buf[0] = buf[0] + " edit%d" % i
        time.sleep(0.05)
        self.assertEqual(self.metric(updates), before, "debounced")
        self.wait(lambda: self.metric(updates) == before + 1, what="the update")
        time.sleep(0.4)
        self.assertEqual(self.metric(updates), before + 1)
        text = self.buffer_text()
        # The ask streams into the answer buffer; its text is what vist2ctl generate answers.
        answer = self.ask("Summarize:")
        ref = self.reference_generate([text], "Summarize:", 12)
        self.assertEqual(answer, ref["text"])
        self.assertEqual(self.status(), "idle")
        result = self.lua("return require('vist2').last_result")
        self.assertEqual(result["event"], "done")
        # Only the chunks an edit touches are encoded again.
        encoded = self.metric("vist2_chunks_encoded_total")
        buf[3] = buf[3] + " more"
        answer2 = self.ask("Summarize:")
        self.assertLessEqual(self.metric("vist2_chunks_encoded_total") - encoded, 2)
        text2 = self.buffer_text()
        self.assertEqual(answer2, self.reference_generate([text2], "Summarize:", 12)["text"])
        # The answer window is a scratch split next to the buffer.
        names = [os.path.basename(w.buffer.name) for w in self.nvim.windows]
        self.assertIn("answer", " ".join(names))
        # Wiping the buffer closes its document.
        self.nvim.command("bwipeout! " + self.file)
        self.wait(lambda: self.daemon.ctl_json("status")["documents_open"] == 0, what="the document to close")

    def test_visual_ask_adds_the_selection(self):
        self.attach()
        self.nvim.command("1,2Vist2Ask Explain:")
        self.wait(lambda: self.status() != "generating", what="the answer")
        answer = self.lua("return require('vist2').answer()")
        lines = DOC.split("\n")
        ref = self.reference_generate([DOC], "Explain:\n\n" + "\n".join(lines[:2]), 12)
        self.assertEqual(answer, ref["text"])

    def test_daemon_restart_mid_session(self):
        self.attach()
        self.daemon.kill()
        self.wait(lambda: self.status() == "daemon down", what="the plugin to see the daemon down")
        self.nvim.current.buffer[0] = "Edited while the daemon was down."
        time.sleep(0.4)
        self.daemon.start()
        self.wait(lambda: self.status() == "idle", what="the plugin to see the daemon back")
        text = self.buffer_text()
        answer = self.ask("Summarize:")
        self.assertEqual(answer, self.reference_generate([text], "Summarize:", 12)["text"])

    def test_auto_attach_status_and_a_bridge_that_dies(self):
        self.lua("require('vist2').setup({ debounce_ms = 200, temperature = 0, chat = false, max_tokens = 12, auto_attach = { 'text' } })")
        self.nvim.command("edit " + self.file)
        self.nvim.command("setfiletype text")
        self.wait(lambda: self.daemon.ctl_json("status")["documents_open"] == 1, what="the automatic attach")
        other = os.path.join(self.tmp, "code.c")
        with open(other, "w") as f:
            f.write("int main(void) { return 0; }\n")
        self.nvim.command("edit " + other)  # filetype c: not attached
        self.assertFalse(self.lua("return require('vist2').is_attached(0)"))
        self.nvim.command("Vist2Status")
        self.wait(lambda: "1 attached here, 1 documents open in the daemon" in self.nvim.command_output("messages"), what=":Vist2Status")
        # The bridge process dies: the next ask starts a new one, which opens the buffer again.
        self.nvim.command("buffer " + self.file)
        self.assertEqual(os.system("pkill -KILL -P %d -f 'vist2ctl bridge'" % self.nvim.call("getpid")), 0)
        self.wait(lambda: self.status() == "daemon down", what="the plugin to notice")
        answer = self.ask("Summarize:")
        self.assertEqual(answer, self.reference_generate([self.buffer_text()], "Summarize:", 12)["text"])

    def test_help(self):
        doc = os.path.join(self.tmp, "nvim-plugin")
        shutil.copytree(PLUGIN, doc)
        self.nvim.command("helptags " + os.path.join(doc, "doc"))  # E154 on a duplicate tag
        self.nvim.command("set rtp^=" + doc)
        for tag in ("vist2", "vist2-setup", ":Vist2Ask", ":Vist2Cancel", "vist2-statusline", "<Plug>(vist2-ask)", "vist2-health"):
            self.nvim.command("help " + tag)
            self.assertTrue(self.nvim.current.buffer.name.endswith("vist2.txt"), tag)
            self.nvim.command("helpclose")

    def test_checkhealth(self):
        self.nvim.command("checkhealth vist2")
        report = "\n".join(self.nvim.current.buffer[:])
        self.assertRegex(report, r"OK:? Neovim")
        self.assertRegex(report, r"OK:? daemon ready")
        self.assertRegex(report, r"OK:? protocol version 1")
        self.assertNotIn("ERROR", report)
        self.daemon.kill(signal.SIGTERM)
        self.nvim.command("bwipeout!")
        self.nvim.command("checkhealth vist2")
        report = "\n".join(self.nvim.current.buffer[:])
        self.assertRegex(report, r"ERROR:? the vist2 daemon is not reachable: .*cannot connect")

class NvimDefaultModelTests(NvimCase):
    """What needs requests that take seconds: the default model."""

    daemon_model = "default"

    def test_compress_keeps_the_editor_responsive(self):
        # The whole licence on the default model: ~30 chunks, seconds of encoding and prefill.
        big = os.path.join(self.tmp, "Apache-2.0.txt")
        shutil.copy("/usr/share/common-licenses/Apache-2.0", big)
        self.nvim.command("edit " + big)
        self.lua("vim.g.ticks = 0; _G.vist2_timer = vim.loop.new_timer(); "
                 "_G.vist2_timer:start(5, 5, vim.schedule_wrap(function() vim.g.ticks = vim.g.ticks + 1 end))")
        self.nvim.command("Vist2Compress")
        seen = set()
        while True:
            s = self.status()  # an RPC round trip: answered while the compress runs
            seen.add(s)
            if not s.startswith("compressing"):
                break
        ticks = self.nvim.vars["ticks"]
        result = self.lua("return require('vist2').last_result")
        self.assertEqual(result["event"], "compressed")
        self.assertTrue(any(s.startswith("compressing") and s != "compressing 0%" for s in seen), seen)
        self.assertGreater(ticks, 50, "the timer kept firing")
        self.assertIn("chunks", self.nvim.command_output("messages"))

    def test_cancel_stops_the_stream(self):
        self.attach()
        events = []
        self.lua("""
            vim.g.vist2_events = {}
            vim.api.nvim_create_autocmd('User', { pattern = { 'Vist2RequestStarted', 'Vist2RequestFinished' },
              callback = function(a) local e = vim.g.vist2_events; table.insert(e, a.match); vim.g.vist2_events = e end })
        """)
        self.lua("require('vist2').ask('Write a long story:', { max_tokens = 2000 })")
        self.wait(lambda: len(self.lua("return require('vist2').answer()") or "") > 3, what="text to stream")
        self.assertEqual(self.status(), "generating")
        # q in the answer buffer stops it.
        win = self.lua("return vim.fn.bufwinid(vim.fn.bufnr('vist2://answer'))")
        self.nvim.command("call win_gotoid(%d)" % win)
        self.nvim.feedkeys("q")
        self.wait(lambda: self.status() == "cancelled", what="the cancel")
        stopped = self.lua("return require('vist2').answer()")
        time.sleep(0.5)
        self.assertEqual(self.lua("return require('vist2').answer()"), stopped, "no more text arrives")
        self.assertLess(len(stopped), 8000)
        self.assertEqual(self.lua("return require('vist2').last_result.error.code"), "cancelled")
        self.assertEqual(self.nvim.vars["vist2_events"], ["Vist2RequestStarted", "Vist2RequestFinished"])
        # So do <C-c> in the answer buffer and :Vist2Cancel.
        self.nvim.command("wincmd p")
        self.lua("require('vist2').ask('Write a long story:', { max_tokens = 2000 })")
        self.wait(lambda: len(self.lua("return require('vist2').answer()") or "") > 3, what="text to stream")
        self.nvim.command("call win_gotoid(%d)" % win)
        self.nvim.input("<C-c>")
        self.wait(lambda: self.status() == "cancelled", what="the cancel")
        self.lua("require('vist2').ask('Write a long story:', { max_tokens = 2000 })")
        self.wait(lambda: len(self.lua("return require('vist2').answer()") or "") > 3, what="text to stream")
        self.nvim.command("Vist2Cancel")
        self.wait(lambda: self.status() == "cancelled", what="the cancel")


if __name__ == "__main__":
    unittest.main()

"""The Emacs package (editors/emacs): byte-compiles without warnings, and its ERT tests pass in a
real Emacs (batch) against live daemons it starts on the tiny model."""

import os
import shutil
import subprocess
import tempfile
import unittest

from harness import BIN, DOC, ROOT, TINY_MODEL

EMACS_DIR = os.path.join(ROOT, "editors", "emacs")


class EmacsTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="vist2-emacs-test-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_byte_compiles_without_warnings(self):
        shutil.copy(os.path.join(EMACS_DIR, "vist2.el"), self.tmp)
        r = subprocess.run(["emacs", "--batch", "-Q", "--eval", "(setq byte-compile-error-on-warn t)",
                            "-f", "batch-byte-compile", os.path.join(self.tmp, "vist2.el")],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "vist2.elc")))

    def test_ert_against_a_live_daemon(self):
        doc = os.path.join(self.tmp, "doc.txt")
        with open(doc, "w", encoding="utf-8") as f:
            f.write(DOC)
        env = dict(os.environ, VIST2_TEST_BIN=BIN, VIST2_TEST_MODEL=TINY_MODEL, VIST2_TEST_DOC=doc)
        r = subprocess.run(["emacs", "--batch", "-Q", "-L", EMACS_DIR, "-l", "vist2-tests", "-f", "ert-run-tests-batch-and-exit"],
                           capture_output=True, text=True, timeout=600, env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("Ran 6 tests, 6 results as expected", r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()

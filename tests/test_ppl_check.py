"""qgate.ppl_check: the pinned reference text of `qgate quantize`'s perplexity check (the command: test_quantize.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qgate import ppl_check


def test_reference_text_is_the_pinned_slice():
    text, digest = ppl_check.reference_text()
    assert len(text) == ppl_check.REFERENCE_TEXT_CHARS and digest == ppl_check.REFERENCE_TEXT_SHA256


def test_the_kernel_loop_does_not_import_the_check():
    code = "import sys, qgate.quantize; assert 'qgate.ppl_check' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

"""qgate.ppl_check: the perplexity check of `qgate quantize` (the command itself: test_quantize.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qgate import ppl_check


def test_the_check_runs_the_gates_own_perplexity_task():
    """One way to measure perplexity: `qgate quantize` runs the suite task the gate decides on."""
    from qgate.evaluation.suite import load_suite

    task = ppl_check.perplexity_task()
    assert task == load_suite("smoke").task("perplexity")
    assert (task.lm_eval_task, task.metric, task.source) == ("qgate_perplexity", "word_perplexity", "pg_essays")


def test_the_kernel_loop_does_not_import_the_check():
    code = "import sys, qgate.quantize; assert 'qgate.ppl_check' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

"""An unexpected exception inside a command ends as one line naming a log file, exit 4, with the
traceback in that log and the run recorded as failed (a real failure: the CUDA device asked of a
torch built without CUDA, hit when the model is moved there, after the run has started)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unexpected_exception_is_one_line_exit_4_a_log_and_a_failed_run(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"family: smollm2\nmembers: [smollm2-135m-instruct]\nsuite: {SUITE}\n"
                      "formats: {nvfp4: {recipe: uniform}}\nfallback: [fp8]\n"
                      "tasks: {mmlu: {max_drop: 100}, perplexity: {min_recovery: 0.5}}\n")
    db, logs = tmp_path / "q.db", tmp_path / "logs"
    env = dict(os.environ, QGATE_LOG_DIR=str(logs), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "qgate.cli", "run", "--family", "smollm2", "--policy", str(policy),
                           "--db", str(db), "--device", "cuda", "--limit", "1", "--no-report"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    ours = [line for line in done.stderr.splitlines() if line.startswith("qgate: internal error")]
    assert len(ours) == 1, done.stderr
    [log] = list(logs.iterdir())
    assert ours[0].startswith("qgate: internal error: AssertionError: Torch not compiled with CUDA enabled")
    assert ours[0].endswith(f"(details in {log})")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "AssertionError" in text and "--device cuda" in text
    assert log.stat().st_mode & 0o777 == 0o600
    con = sqlite3.connect(db)
    assert con.execute("SELECT status, exit_code FROM runs").fetchall() == [("failed", 4)]

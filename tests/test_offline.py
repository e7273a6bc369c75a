"""Offline is detected at once: hub datasets and hub checkpoints without a local copy fail in seconds
with one line (exit 2), whether offline is declared (HF_*_OFFLINE) or found by the connection probe
(these machines reach no hub). Real commands in a subprocess, with an empty Hugging Face cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def qgate(args, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                              "TRANSFORMERS_OFFLINE")}
    base.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), **env)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "qgate.cli", *args], capture_output=True, text=True, env=base,
                          timeout=120, cwd=tmp_path)
    return done, time.monotonic() - started


def qgate_lines(stderr: str) -> list[str]:
    # libraries may print import-time notices; qgate's own output is what is asserted
    return [line for line in stderr.splitlines() if line.startswith("qgate")]


@pytest.mark.parametrize("declared", [{}, {"HF_DATASETS_OFFLINE": "1"}], ids=["probed", "declared"])
def test_a_hub_dataset_without_a_local_copy_fails_at_once(tmp_path, declared):
    done, seconds = qgate(["eval", "--suite", "standard", "--tasks", "mmlu", "--limit", "2"], tmp_path, **declared)
    assert done.returncode == 2, done.stderr
    assert seconds < 30
    [line] = done.stderr.splitlines()
    assert line.startswith("qgate: error: task mmlu: hub dataset cais/mmlu is not in the local cache and ")
    assert ("HF_DATASETS_OFFLINE" in line) == bool(declared)


def test_a_hub_checkpoint_without_a_local_copy_fails_at_once_and_writes_nothing(tmp_path):
    suite = REPO / "tests" / "data" / "gate_suite.yaml"
    done, seconds = qgate(["run", "--family", "qwen2.5", "--suite", str(suite), "--db", "q.db", "--limit", "1"],
                          tmp_path)
    assert done.returncode == 2, done.stderr
    assert seconds < 30
    [line] = qgate_lines(done.stderr)
    assert line.startswith("qgate: error: checkpoint Qwen/Qwen2.5-0.5B-Instruct@main is not in the local Hugging Face cache and ")
    assert "--model DIR" in line
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("q.db*"))

"""A real command run off a terminal, outside any git checkout, writes only qgate's own lines to stderr:
no git "fatal: not a git repository", no FutureWarning, no torchao ".so" or pytree lines; and `--json`
means JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOISE = ("fatal:", "not a git repository", "FutureWarning", "DeprecationWarning", "torchao", "_pytree",
         "Failed to load", "Traceback")


@pytest.mark.slow
def test_eval_off_a_terminal_outside_git_prints_only_qgate_lines(tmp_path):
    """As on a fresh clone: an empty qgate cache, so the GGUF file is converted (transformers draws that
    bar with plain tqdm) and the task's data materialized."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GIT_CEILING_DIRECTORIES": str(tmp_path),
           "QGATE_CACHE": str(tmp_path / "cache")}
    env.pop("QGATE_PROGRESS", None)
    outside = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=work, env=env, capture_output=True)
    assert outside.returncode != 0  # really not a checkout: lm-eval's `git describe` would have failed here
    done = subprocess.run([sys.executable, "-m", "qgate.cli", "eval", "--tasks", "perplexity", "--limit", "1",
                           "--json"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)  # --json: the results, and nothing else, on stdout
    assert [(r["task"], r["n"]) for r in results] == [("perplexity", 1)]
    lines = done.stderr.splitlines()
    assert not [line for line in lines if any(n in line for n in NOISE)], done.stderr
    assert all(line.startswith("qgate: ") for line in lines), done.stderr  # nothing but qgate's own lines
    # one line per step with counts, the task's requests counted to their total, no bar redraws
    assert "\r" not in done.stderr
    assert [line for line in lines if line.startswith("qgate: [1/1] ")] and \
        [line for line in lines if line.startswith("qgate: [0/1] perplexity loglikelihood: 1/1 requests")]
    assert len(lines) <= 5, done.stderr
    assert not list(work.iterdir())  # eval stores nothing


def test_known_noise_filters_drop_only_their_own_messages():
    import logging

    from qgate import noise

    noise.install()
    noise.install()  # idempotent
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.getMessage()))

    handler = Keep()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: nope")
        logging.getLogger("torchao").warning("Failed to load a checkpoint")  # not the .so message: kept
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.", "E")
        logging.getLogger("torch.utils._pytree").warning("something else")
    finally:
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).removeHandler(handler)
    assert seen == [("torchao", "Failed to load a checkpoint"), ("torch.utils._pytree", "something else")]
    assert len([f for f in logging.getLogger("torchao").filters if isinstance(f, noise._DropKnown)]) == 1


def test_json_means_stdout_json_on_every_command_that_has_it(tmp_path):
    """The cheap ones here (no model); eval above, export in test_export, run in test_gate, quantize in
    test_quantize and policy redecide in test_policy_review parse theirs."""
    from click.testing import CliRunner

    from qgate.cli import cli

    runner = CliRunner()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 256, "max_position_embeddings": 128}))
    db = tmp_path / "q.db"
    from qgate.store import open_store

    with open_store(str(db)) as store:
        run = store.start_run(family="smollm2", formats=["nvfp4"], members=["m"], suite="smoke", suite_hash="s",
                              policy_hash="p", policy_text="", policy_path="p.yaml", versions={}, host="h", pid=1,
                              git_revision=None, backend="reference", device="cpu", sample_limit=None)
        store.finish_run(run, status="completed", outcome="ships", exit_code=0)
    policy = str(REPO / "qgate" / "policies" / "smollm2.yaml")
    for args in (["formats", "--json"], ["policy", "show", "smollm2", "--json"],
                 ["policy", "diff", policy, policy, "--db", str(db), "--json"],
                 ["footprint", "--model", str(config), "--format", "mxfp4", "--json"]):
        res = runner.invoke(cli, args)
        assert res.exit_code in (0, 1), (args, res.output)
        json.loads(res.output)
    assert "--json-file" in runner.invoke(cli, ["eval", "--help"]).output
    assert "--json-file" in runner.invoke(cli, ["bench", "eval", "--help"]).output

"""NaN/inf/null results are a decision, not a crash: a tiny real model with one NaN row in a down_proj
(its baseline is broken: bad input, exit 2, naming the member), and NaN/null injected into a real
store's candidate samples (the task fails "non-finite", the gate walks on to the fallback, and
`policy redecide` / `policy diff` decide the same rows without a TypeError)."""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qgate.cli import cli
from qgate.decide import decide_task
from qgate.policy import TaskPolicy
from qgate.stats import samples_to_decide

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import byte_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"
MEMBER = "smollm2-135m-instruct"


def tiny_model_dir(path: Path, nan_row: bool) -> Path:
    from qgate.models import build_tiny_model

    tokenizer = byte_tokenizer()
    model = build_tiny_model("llama", seed=3, vocab_size=len(tokenizer))
    if nan_row:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def policy(tmp: Path, model: Path, name="p.yaml", fallback="[fp8]") -> Path:
    path = tmp / name
    path.write_text(f"family: smollm2\nmembers: [{{name: {MEMBER}, model: {model}}}]\nsuite: {SUITE}\n"
                    f"formats: {{nvfp4: {{recipe: uniform}}}}\nfallback: {fallback}\n"
                    "tasks:\n  mmlu: {max_drop: 100, inconclusive: pass}\n"
                    "  perplexity: {metric: word_perplexity, min_recovery: 0.01, inconclusive: pass}\n")
    return path


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_a_nan_baseline_stops_the_run_as_bad_input_naming_the_member(tmp_path):
    model = tiny_model_dir(tmp_path / "nan-model", nan_row=True)
    db = tmp_path / "q.db"
    result = run("run", "--family", "smollm2", "--policy", policy(tmp_path, model), "--db", db, "--limit", "1",
                 "--no-report")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("qgate: error")]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert f"member {MEMBER} ({model})" in lines[0] and "non-finite" in lines[0] and "baseline" in lines[0]
    con = sqlite3.connect(db)
    statuses = dict(con.execute("SELECT task, status FROM evaluations WHERE format = 'bf16'").fetchall())
    assert statuses.get("perplexity") == "non_finite" or statuses.get("mmlu") == "non_finite", statuses
    assert "completed" not in [s for t, s in statuses.items() if t == "perplexity"]
    assert con.execute("SELECT status, exit_code FROM runs").fetchall() == [("failed", 2)]


def test_sqnr_of_a_tensor_holding_nan_is_nan_not_inf(tmp_path):
    from qgate.models import build_tiny_model
    from qgate.quantize import quantize_model

    model = build_tiny_model("llama", seed=3)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0] = float("nan")
    result = quantize_model(model, "mxfp4")
    bad = [t for t in result.tensors if "layers.0.mlp.down_proj" in t.name]
    assert len(bad) == 1 and math.isnan(bad[0].sqnr_db)
    assert all(math.isfinite(t.sqnr_db) for t in result.tensors if t is not bad[0])
    summary = result.summary()
    assert summary["non_finite_tensors"] == [bad[0].name] and summary["sqnr_db"] is None
    lines = result.log_lines()
    assert any(bad[0].name in line and "SQNR   NaN dB" in line for line in lines)
    assert any(line.startswith("aggregate SQNR NaN") for line in lines)
    assert not any(" inf" in line for line in lines)


def test_non_finite_samples_fail_the_task_and_samples_to_decide_does_not_raise():
    tp = TaskPolicy(task="t", metric="acc", max_drop=1.0)
    base = [{"doc_id": i, "scores": {"acc": 1.0}} for i in range(20)]
    for bad in (None, float("nan"), float("inf")):
        cand = [{"doc_id": i, "scores": {"acc": bad if i == 3 else 1.0}} for i in range(20)]
        d = decide_task(base, cand, tp)
        assert d.verdict == "fail" and d.reason.startswith("t: non-finite acc") and "1 of 20 candidate" in d.reason
    d = decide_task(cand, base, tp)  # the baseline side
    assert d.verdict == "fail" and "1 of 20 baseline" in d.reason
    pairs = [{"doc_id": i, "scores": {"loglikelihood": None if i else -3.0, "words": 4}} for i in range(5)]
    good = [{"doc_id": i, "scores": {"loglikelihood": -3.0, "words": 4}} for i in range(5)]
    d = decide_task(good, pairs, TaskPolicy(task="ppl", metric="word_perplexity", max_drop=1.0), False)
    assert d.verdict == "fail" and "4 of 5 candidate" in d.reason
    assert samples_to_decide(float("nan"), -0.01, 0.1, 20) is None
    assert samples_to_decide(-0.1, -0.01, float("nan"), 20) is None
    assert samples_to_decide(-0.1, -0.01, 0.1, 20, table=(10, float("nan"), 0, 0)) is None


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A real run of a healthy tiny model; its nvfp4 candidate's samples then get NaN and null injected."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    model = tiny_model_dir(tmp / "model", nan_row=False)
    db = tmp / "q.db"
    pol = policy(tmp, model)
    first = run("run", "--family", "smollm2", "--policy", pol, "--db", db, "--limit", "1", "--no-report", "--json")
    assert first.exit_code == 0, first.output
    con = sqlite3.connect(db)
    keys = dict(con.execute("SELECT task, id FROM evaluations WHERE format = 'nvfp4'").fetchall())
    for idx, scores in con.execute("SELECT idx, scores FROM samples WHERE evaluation_id = ?", (keys["mmlu"],)).fetchall():
        s = json.loads(scores)
        s["acc"] = None
        con.execute("UPDATE samples SET scores = ? WHERE evaluation_id = ? AND idx = ?",
                    (json.dumps(s), keys["mmlu"], idx))
    rows = con.execute("SELECT idx, scores FROM samples WHERE evaluation_id = ?", (keys["perplexity"],)).fetchall()
    s = json.loads(rows[0][1])
    s["loglikelihood"] = float("nan")  # SQLite's JSON keeps NaN as a bare token only via Python's json
    con.execute("UPDATE samples SET scores = ? WHERE evaluation_id = ? AND idx = ?",
                (json.dumps(s), keys["perplexity"], rows[0][0]))
    con.commit()
    con.close()
    return tmp, db, pol


def test_a_cached_non_finite_candidate_fails_and_the_fallback_ships(stored_run):
    tmp, db, pol = stored_run
    result = run("run", "--family", "smollm2", "--policy", pol, "--db", db, "--limit", "1", "--no-report", "--json")
    assert result.exit_code == 3, result.output  # ships fp8 instead
    data = json.loads(result.stdout)
    assert data["evaluations_run"] == 2  # only fp8's two tasks were evaluated; the injected rows were reused
    nv = {t["task"]: t for t in data["tasks"] if t["format"] == "nvfp4"}
    assert nv["mmlu"]["verdict"] == "fail" and "non-finite acc" in nv["mmlu"]["reason"]
    assert nv["perplexity"]["verdict"] == "fail" and "non-finite word_perplexity" in nv["perplexity"]["reason"]
    assert data["members"][0]["shipped_format"] == "fp8"


def test_policy_redecide_and_diff_decide_the_injected_rows(stored_run):
    tmp, db, pol = stored_run
    result = run("policy", "redecide", "1", "--policy", pol, "--db", db, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    text = json.dumps(data)
    assert "non-finite acc" in text and "non-finite word_perplexity" in text
    strict = policy(tmp, tmp / "model", name="strict.yaml", fallback="[]")
    result = run("policy", "diff", pol, strict, "--db", db, "--json")
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and "TypeError" not in result.output

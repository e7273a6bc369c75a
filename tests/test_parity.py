"""Parity: qgate's evaluation of a task equals lm-eval's stock `hf` model on the same model and samples.

The stock side is lm_eval.simple_evaluate(model="hf", model_args="pretrained=<dir>") with qgate's task
folder on --include_path and no qgate code in the model path; the qgate side is evaluate_task with the
in-memory model handed over through make_lm.
"""

from __future__ import annotations

import pytest

from qgate.evaluation.runner import TASKS_DIR, evaluate_task, make_lm
from qgate.evaluation.suite import load_suite

BATCH = 4


@pytest.fixture(scope="module")
def smol():
    from qgate.models import cached_gguf_folder, load, resolve_member

    spec = resolve_member("smollm2")
    folder = cached_gguf_folder(spec.location, progress=False)
    loaded = load("smollm2", device="cpu", dtype="float32", progress=False)
    return folder, loaded.model, loaded.tokenizer


def stock_lm_eval(folder, task: str, limit: int, num_fewshot: int, seed: int):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32",
        tasks=[task],
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=BATCH,
        device="cpu",
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


@pytest.mark.slow
@pytest.mark.parametrize("name, limit", [("mmlu", 6), ("perplexity", 3)])
def test_qgate_matches_stock_lm_eval_hf(smol, name, limit):
    folder, model, tokenizer = smol
    task = load_suite("smoke").task(name)
    ours = evaluate_task(model, tokenizer, task, limit=limit, lm=make_lm(model, tokenizer))
    theirs, their_samples = stock_lm_eval(folder, task.lm_eval_task, limit, task.num_fewshot, task.seed)

    assert ours.n == len(their_samples) == limit
    assert [s["doc_hash"] for s in ours.samples] == [s["doc_hash"] for s in their_samples]
    for metric, m in ours.metrics.items():
        assert m["value"] == pytest.approx(theirs[f"{metric},none"], rel=1e-6, abs=1e-9), metric
    for mine, stock in zip(ours.samples, their_samples):
        assert mine["prompt"] == (stock["arguments"][0][0] if name == "mmlu" else "")
        if name == "mmlu":
            assert mine["scores"]["acc"] == stock["acc"]
            stock_logprobs = [r[0][0] for r in stock["resps"]]
            assert mine["logprobs"] == pytest.approx(stock_logprobs, abs=1e-4)
        else:
            assert mine["scores"]["loglikelihood"] == pytest.approx(stock["word_perplexity"][0], abs=1e-3)
            assert mine["scores"]["words"] == stock["word_perplexity"][1]

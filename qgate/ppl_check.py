"""The quick check of `qgate quantize`: the suites' perplexity task, before and after quantizing a member.

There is one way qgate measures perplexity: the `perplexity` task of the smoke suite (lm-eval's
loglikelihood_rolling over qgate.evaluation.data's `pg_essays`, word perplexity), which the gate
decides on. This check runs that same task on the model before and after quantizing it, and stores
nothing.
"""

from __future__ import annotations

from typing import Any

from qgate.errors import QgateError
from qgate.evaluation.runner import evaluate_task
from qgate.evaluation.suite import load_suite
from qgate.quantize import QuantizationResult, quantize_model
from qgate.recipes import Promotion, load_recipe, plan_model

CHECK_SUITE, CHECK_TASK = "smoke", "perplexity"


def perplexity_task():
    """The suite task the check runs (the gate's own perplexity task)."""
    return load_suite(CHECK_SUITE).task(CHECK_TASK)


def quantize_and_check(
    family: str | None,
    member: str | None,
    fmt: str,
    recipe: Any = "uniform",
    model_path: str | None = None,
    revision: str | None = None,
    backend: str | None = None,
    promote: Any = None,
    act_quant: bool | str = False,
    kv_quant: str | None = None,
    device: str | None = None,
    docs: int | None = None,
    progress: bool = True,
) -> tuple[QuantizationResult, dict]:
    """Load a member, run the perplexity task, quantize, run it again. Stores nothing.

    docs: at most this many documents of the task (default: all the suite gives it)."""
    from qgate.models import load_member, resolve_member

    if docs is not None and docs < 1:
        raise QgateError(f"--docs {docs}: expected a positive number of documents")
    recipe = load_recipe(recipe)
    promotion = Promotion.parse(promote)
    task = perplexity_task()
    spec = resolve_member(family, member, model_path, revision)
    loaded = load_member(spec, device=device, progress=progress)
    plan_model(loaded.model, recipe, fmt)  # a bad recipe fails before the slow perplexity pass
    before = evaluate_task(loaded.model, loaded.tokenizer, task, limit=docs)
    result = quantize_model(
        loaded.model, fmt, recipe, backend=backend, promote=promotion, act_quant=act_quant, kv_quant=kv_quant,
        progress=progress,
    )
    after = evaluate_task(loaded.model, loaded.tokenizer, task, limit=docs)
    check = {
        "model": spec.describe(),
        "checkpoint_hash": loaded.checkpoint_hash,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "task": f"{CHECK_SUITE}/{task.name}",
        "metric": task.metric,
        "data": before.data_source,
        "documents": before.n,
        "perplexity_before": before.value,
        "perplexity_after": after.value,
        "perplexity_change": after.value / before.value - 1.0,
    }
    return result, check

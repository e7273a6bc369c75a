"""lm-eval's own output of one evaluation, kept for `qgate export --lm-eval`.

``build`` takes what lm-eval's ``evaluate`` returned and keeps, as plain JSON:
- ``results``: its results-level entries (results, groups, group_subtasks, configs, versions, n-shot,
  higher_is_better, n-samples) plus what ``simple_evaluate`` would add about the model and tokenizer;
- ``samples``: every per-sample record (one per document and filter) as lm-eval logged it, with two
  savings: a document over DOC_KEEP_BYTES is left out (doc_hash identifies it: haystacks, MMLU documents
  carrying their exemplars), and a request context equal to the sample's stored prompt (or, for rolling
  loglikelihood, its stored target) is not repeated (``context_from`` says which column holds it).
"""

from __future__ import annotations

import json
from typing import Any

DOC_KEEP_BYTES = 4096


def _plain(obj: Any) -> Any:
    """JSON values the way lm-eval writes them (numpy scalars as numbers, anything else as its str)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable, ensure_ascii=False))


def model_info(lm) -> dict:
    """simple_evaluate's model block, without HFLM's hub query for the commit sha (qgate keys the
    checkpoint by its content hash instead)."""
    from lm_eval.loggers.utils import add_tokenizer_info

    model = getattr(lm, "model", None)
    info = {
        "model_num_parameters": sum(p.numel() for p in model.parameters()) if model is not None else -1,
        "model_dtype": str(getattr(model, "dtype", "")),
        "model_revision": getattr(lm, "revision", None),
        "model_sha": "",
        "batch_sizes": list(getattr(lm, "batch_sizes", {}).values()),
    }
    tokenizer: dict = {}
    add_tokenizer_info(tokenizer, lm)
    return {"model": info, "tokenizer": tokenizer}


def compact_sample(record: dict, task: str, idx: int, prompt: str, target: str) -> dict:
    """One lm-eval sample record for storage: see the module docstring."""
    rec = {k: v for k, v in record.items() if k != "doc"}
    doc = _plain(record.get("doc"))
    if len(json.dumps(doc, ensure_ascii=False).encode()) <= DOC_KEEP_BYTES:
        rec["doc"] = doc
    args = [list(a) for a in record.get("arguments") or []]
    for column, text in (("prompt", prompt), ("target", target)):
        if text and args and all(a and a[0] == text for a in args):
            rec["arguments"] = [a[1:] for a in args]
            rec["context_from"] = column
            break
    rec["task"] = task
    rec["idx"] = idx
    return _plain(rec)


def build(out: dict, lm, samples: list[dict]) -> dict:
    """{results, samples} of one evaluation; ``samples`` are compact records (see compact_sample)."""
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples")
    results = {k: out[k] for k in keep if k in out}
    results.update(model_info(lm) if lm is not None else {})
    return {"results": _plain(results), "samples": samples}

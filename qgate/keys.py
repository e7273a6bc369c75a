"""Cache keys: the content hashes that name a quantization, a task configuration and an evaluation.

One place, imported by the gate (to look up before evaluating) and by policy reviews (to find the
evidence a policy needs). A checkpoint's identity is its file hash or hub commit (qgate.models).
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

from qgate.canonical import content_hash
from qgate.evaluation.data import source_identity
from qgate.recipes import quant_config

BASELINE = "bf16"  # the format name the unquantized baseline is recorded under


def effective_limit(task_spec, limit: int | None) -> int | None:
    """--limit caps the suite's own per-task limit (it never raises it)."""
    if limit is None:
        return task_spec.limit
    return limit if task_spec.limit is None else min(limit, task_spec.limit)


def task_config(task_spec, limit: int | None) -> dict:
    """Everything that changes a task's samples or their scores: the task definition, the sample limit,
    the lm-eval release that runs it and, for qgate's offline sources, what builds the data (the
    model's tokenizer, which some sources use, is part of the checkpoint's key)."""
    config: dict[str, Any] = {"task": task_spec.to_dict(), "limit": effective_limit(task_spec, limit),
                              "lm_eval": metadata.version("lm-eval")}
    if task_spec.offline:
        config["data"] = source_identity(task_spec.source, task_spec.data_params)
    if getattr(task_spec, "include_path", None):  # a user's task folder: its content, so an edit re-evaluates
        config["include"] = [folder_sha256(p) for p in task_spec.include_path]
    return config


def folder_sha256(folder: str | Path) -> str:
    """One sha256 over every file of a folder (relative names and contents), hidden files and caches left out."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def quant_config_id(fmt: str, recipe: Any, backend_name: str) -> str | None:
    """The key of a format quantized with a recipe through a backend; None for the baseline."""
    if fmt == BASELINE:
        return None
    return content_hash(quant_config(fmt, recipe, backend_name))


def task_runtime(runtime: dict, task_spec: dict | None) -> dict:
    """The runtime an evaluation is keyed on: device and dtype; and, for a task scored by log-probabilities
    (no generation) on a model below float32, that they were computed in float32 (FastLM). Scores from
    before that (summed in bf16) are then never reused; generated text did not change, so its keys stay."""
    out = {k: runtime[k] for k in ("device", "dtype") if k in runtime}
    if out.get("dtype") not in (None, "float32") and task_spec is not None and not task_spec.get("generation"):
        out["logprobs"] = "float32"
    return out


def evaluation_key(checkpoint_id: str, quant_config_id: str | None, task_config_id: str,
                   qgate_version: str, runtime: dict | None = None) -> str:
    """The cache key of one evaluation. quant_config_id None means the unquantized baseline."""
    return content_hash({"checkpoint": checkpoint_id, "quant_config": quant_config_id,
                         "task_config": task_config_id, "qgate": qgate_version, "runtime": runtime or {}})

"""A planned unit of work and the function that runs it, wherever it runs.

A unit is one member in one format with the evaluations it owes (one per task of the suite). Running
it loads the member, fake-quantizes it (not for the baseline), evaluates each task and writes each
result to the store under its content-hash key. Everything a unit needs travels inside it (plain,
picklable data), so a worker on another machine runs it from the database URL alone.

Running a unit twice is harmless: it first skips the keys already stored, and the store inserts an
evaluation with its samples in one transaction, ignoring a key another worker wrote first. So a
unit retried after its worker died, or run by two workers at once, leaves each evaluation once.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from qgate.keys import BASELINE, task_runtime



@dataclass(frozen=True)
class UnitTask:
    task: Any  # qgate.evaluation.suite.TaskSpec
    key: str  # the evaluation's cache key
    task_config_id: str
    limit: int | None  # the effective sample limit


@dataclass(frozen=True)
class Unit:
    db_url: str
    run_id: int
    member: str
    spec: Any  # qgate.models.MemberSpec
    checkpoint_id: str
    format: str
    role: str  # baseline, candidate, fallback
    recipe: Any
    quant_id: str | None  # None for the baseline
    backend: str
    device: str  # a torch device name as the worker should see it ("cuda", "cpu")
    dtype: str
    runtime: dict
    version: str
    tasks: tuple[UnitTask, ...]
    gpus: int = 0  # GPUs the unit asks a cluster for (0: CPU only)

    @property
    def label(self) -> str:
        return f"{self.member} {self.format}"


@dataclass
class UnitResult:
    member: str
    format: str
    evaluated: list[str] = field(default_factory=list)  # tasks this attempt evaluated and stored
    found: list[str] = field(default_factory=list)  # tasks already stored (earlier run, attempt or worker)
    loaded: bool = False
    notes: list[str] = field(default_factory=list)
    host: str = ""
    pid: int = 0
    seconds: float = 0.0


def run_unit(unit: Unit) -> UnitResult:
    """Evaluate what the unit owes and store it; returns what this attempt did."""
    from qgate.store import open_store

    from qgate import __version__
    from qgate.errors import QgateError

    if unit.version != __version__:  # the version is part of every key: a stale worker would file under others
        raise QgateError(f"a worker runs qgate {__version__}, the driver planned for {unit.version}; "
                         "install the same qgate on every node")
    started = time.perf_counter()
    result = UnitResult(unit.member, unit.format, host=socket.gethostname(), pid=os.getpid())
    store = open_store(unit.db_url)
    try:
        stored = store.cached_keys(t.key for t in unit.tasks)
        todo = [t for t in unit.tasks if t.key not in stored]
        for t in unit.tasks:
            if t.key in stored:
                _link(store, unit, t, cached=True)
                result.found.append(t.task.name)
        if todo:
            lm = _load(unit, result)
            for t in todo:
                if _evaluate(store, unit, t, lm):
                    result.evaluated.append(t.task.name)
                else:  # another worker stored the same evaluation meanwhile; its copy stands
                    result.found.append(t.task.name)
    finally:
        store.close()
    result.seconds = time.perf_counter() - started
    return result


def _link(store, unit: Unit, t: UnitTask, cached: bool) -> None:
    store.link_evaluation(unit.run_id, t.key, member=unit.member, format=unit.format, role=unit.role,
                          task=t.task.name, cached=cached)


def _load(unit: Unit, result: UnitResult):
    from qgate.errors import QgateError
    from qgate.models import load_member

    started = time.perf_counter()
    lm = load_member(unit.spec, device=unit.device, dtype=unit.dtype, progress=False)
    result.loaded = True
    if lm.checkpoint_hash != unit.checkpoint_id:
        raise QgateError(f"{unit.member}: the checkpoint changed while the gate ran "
                         f"({unit.checkpoint_id} planned, {lm.checkpoint_hash} loaded); run again")
    result.notes.append(f"loaded {unit.member} ({lm.device}, {str(lm.dtype).removeprefix('torch.')}) "
                        f"in {time.perf_counter() - started:.1f} s on {result.host}")
    if unit.format != BASELINE:
        result.notes.append(quantize_in_place(unit, lm))
    return lm


def quantize_in_place(unit: Unit, lm) -> str:
    """Fake-quantize the loaded model to the unit's format, record the quantization; returns a note."""
    from qgate.canonical import content_hash
    from qgate.quantize import quantize_model
    from qgate.store import open_store

    q = quantize_model(lm.model, unit.format, recipe=unit.recipe, backend=unit.backend, progress=False)
    actual = q.config()
    if content_hash(actual) != unit.quant_id:
        raise RuntimeError(f"quantization config of {unit.format} differs from the planned one: {actual}")
    summary = q.summary()
    with open_store(unit.db_url) as store:
        store.put_quant_config(unit.quant_id, format=unit.format, recipe=unit.recipe, config=actual,
                               stats=[t.to_dict() for t in q.tensors], summary=summary, log=q.log_lines())
    sqnr = summary.get("sqnr_db")
    recipe = unit.recipe if isinstance(unit.recipe, str) else "inline"
    return (f"quantized {unit.member} to {unit.format} ({recipe} recipe): {summary.get('tensors')} tensors, SQNR "
            f"{f'{sqnr:.1f} dB' if sqnr is not None else 'inf'}, "
            f"promoted {100 * summary.get('promoted_share', 0):.2f}% of blocks")


def _evaluate(store, unit: Unit, t: UnitTask, lm) -> bool:
    """Evaluate one task and store it with its samples; False when another worker's copy was there first."""
    from qgate.evaluation.runner import evaluate_task
    from qgate.store import utcnow

    started_at, started = utcnow(), time.perf_counter()
    r = evaluate_task(lm.model, lm.tokenizer, t.task, limit=t.limit)
    hib = r.higher_is_better if isinstance(r.higher_is_better, dict) else {r.primary_metric: bool(r.higher_is_better)}
    saved = store.save_evaluation(
        t.key, checkpoint_id=unit.checkpoint_id, quant_config_id=unit.quant_id, task_config_id=t.task_config_id,
        qgate_version=unit.version, task=t.task.name, format=unit.format, metrics=r.metrics,
        primary_metric=r.primary_metric, higher_is_better=hib, n=r.n, samples_rows=r.samples,
        data_source=getattr(r, "data_source", None), extras=getattr(r, "extras", None),
        runtime=dict(task_runtime(unit.runtime, t.task.to_dict()), backend=unit.backend),
        duration_s=time.perf_counter() - started, started_at=started_at, lm_eval_log=getattr(r, "lm_eval_log", None),
        run_link=dict(run_id=unit.run_id, member=unit.member, format=unit.format, role=unit.role, task=t.task.name))
    return saved.inserted

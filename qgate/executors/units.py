"""A planned unit of work and the function that runs it, wherever it runs.

A unit is one member in one format with the evaluations it owes (one per task of the suite). Running
it loads the member, fake-quantizes it (not for the baseline), evaluates each task and writes each
result to the store under its content-hash key. Everything a unit needs travels inside it (plain,
picklable data), so a worker on another machine runs it from the database URL alone.

A unit runs the same wherever it runs. Given the driver's progress (the local executor, in the gate's
own process) it reports each step as it happens; on a worker it collects its notes in its result for
the driver to show.

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
    candidate: Any = None  # a checkpoint candidate (qgate.checkpoints.ResolvedCandidate) instead of a format
    quant_config: dict | None = None  # the planned quantization config (recorded for a checkpoint candidate)

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
    shown: bool = False  # its notes and steps were shown on the driver's progress as they happened


class _Say:
    """Where a unit's lines go: the driver's progress as they happen, else the result's notes."""

    def __init__(self, result: UnitResult, progress):
        self.result = result
        self.progress = progress
        self.where = "" if progress is not None else f" on {result.host}"

    def note(self, line: str) -> None:
        if self.progress is not None:
            self.progress.note(line)
        else:
            self.result.notes.append(line)

    def show(self, line: str) -> None:
        if self.progress is not None:
            self.progress.show(line)

    def step(self, line: str) -> None:
        if self.progress is not None:
            self.progress.step(line)


def run_unit(unit: Unit, progress=None) -> UnitResult:
    """Evaluate what the unit owes and store it; returns what this attempt did.

    progress: the driver's qgate.progress.Progress when the unit runs in the driver's process."""
    from qgate.store import open_store

    from qgate import __version__
    from qgate.errors import QgateError

    if unit.version != __version__:  # the version is part of every key: a stale worker would file under others
        raise QgateError(f"a worker runs qgate {__version__}, the driver planned for {unit.version}; "
                         "install the same qgate on every node")
    started = time.perf_counter()
    result = UnitResult(unit.member, unit.format, host=socket.gethostname(), pid=os.getpid(),
                        shown=progress is not None)
    say = _Say(result, progress)
    store = open_store(unit.db_url)
    try:
        stored = store.cached_keys(t.key for t in unit.tasks)
        lm = None
        for t in unit.tasks:
            what = f"{unit.member} {unit.format} {t.task.name}"
            if t.key in stored:
                _link(store, unit, t, cached=True)
                result.found.append(t.task.name)
                say.step(f"{what}: cached")
                continue
            lm = lm or _load(store, unit, result, say, progress)
            say.show(f"{what}: evaluating")
            if _evaluate(store, unit, t, lm, progress):
                result.evaluated.append(t.task.name)
            else:  # another worker stored the same evaluation meanwhile; its copy stands
                result.found.append(t.task.name)
            say.step(f"{what}: done")
    finally:
        store.close()
    result.seconds = time.perf_counter() - started
    return result


def _link(store, unit: Unit, t: UnitTask, cached: bool) -> None:
    store.link_evaluation(unit.run_id, t.key, member=unit.member, format=unit.format, role=unit.role,
                          task=t.task.name, cached=cached)


def _load(store, unit: Unit, result: UnitResult, say: _Say, progress):
    from qgate.errors import QgateError
    from qgate.models import load_member

    if unit.candidate is not None:
        return _load_checkpoint(store, unit, result, say)
    started = time.perf_counter()
    lm = load_member(unit.spec, device=unit.device, dtype=unit.dtype,
                     progress=bool(progress is not None and progress.enabled and progress.bar))
    result.loaded = True
    if lm.checkpoint_hash != unit.checkpoint_id:
        raise QgateError(f"{unit.member}: the checkpoint changed while the gate ran "
                         f"({unit.checkpoint_id} planned, {lm.checkpoint_hash} loaded); run again")
    say.note(f"loaded {unit.member} ({lm.device}, {str(lm.dtype).removeprefix('torch.')}) "
             f"in {time.perf_counter() - started:.1f} s{say.where}")
    if unit.format != BASELINE:
        say.note(quantize_in_place(store, unit, lm, progress=bool(progress is not None and progress.bar)))
    return lm


def _load_checkpoint(store, unit: Unit, result: UnitResult, say: _Say):
    """A checkpoint candidate, dequantized; its fidelity to qgate's emulation of its format recorded."""
    from qgate.checkpoints import candidate_fidelity, load_candidate
    from qgate.models import LoadedModel, load_member

    cand = unit.candidate
    started = time.perf_counter()
    base = load_member(unit.spec, device=unit.device, dtype=unit.dtype, progress=False)
    dtype = base.dtype
    model, tokenizer = load_candidate(cand, unit.device, dtype, progress=True)
    result.loaded = True
    rows, fid, fid_lines = candidate_fidelity(cand, base.model, model)
    del base
    summary = {"scheme": cand.scheme_text(), "qgate_format": cand.qgate_format, "checkpoint": cand.checkpoint_id,
               "path": cand.candidate.location, "fidelity": fid}
    lines = [f"checkpoint {cand.candidate.location} ({cand.checkpoint_id})", f"scheme: {cand.scheme_text()}",
             *fid_lines]
    store.put_quant_config(unit.quant_id, format=unit.format, recipe="checkpoint",
                           config=dict(unit.quant_config, scheme=cand.scheme, quantization_config=cand.quantization_config),
                           stats=rows, summary=summary, log=lines)
    for line in lines:
        say.note(f"{unit.format}: {line}")
    say.note(f"loaded candidate {unit.format} in {time.perf_counter() - started:.1f} s{say.where}")
    return LoadedModel(model=model, tokenizer=tokenizer, spec=unit.spec, checkpoint_hash=cand.checkpoint_id,
                       device=next(model.parameters()).device, dtype=dtype, config_dict=model.config.to_dict())


def quantize_in_place(store, unit: Unit, lm, progress: bool = False) -> str:
    """Fake-quantize the loaded model to the unit's format, record the quantization; returns a note."""
    from qgate.canonical import content_hash
    from qgate.quantize import quantize_model, summary_sqnr

    q = quantize_model(lm.model, unit.format, recipe=unit.recipe, backend=unit.backend, progress=progress)
    actual = q.config()
    if content_hash(actual) != unit.quant_id:
        raise RuntimeError(f"quantization config of {unit.format} differs from the planned one: {actual}")
    summary = q.summary()
    store.put_quant_config(unit.quant_id, format=unit.format, recipe=unit.recipe, config=actual,
                           stats=[t.to_dict() for t in q.tensors], summary=summary, log=q.log_lines())
    recipe = unit.recipe if isinstance(unit.recipe, str) else "inline"
    return (f"quantized {unit.member} to {unit.format} ({recipe} recipe): {summary.get('tensors')} tensors, SQNR "
            f"{summary_sqnr(summary)}, promoted {100 * summary.get('promoted_share', 0):.2f}% of blocks")


def _evaluate(store, unit: Unit, t: UnitTask, lm, progress=None) -> bool:
    """Evaluate one task and store it with its samples; False when another worker's copy was there first."""
    from qgate.evaluation.runner import evaluate_task
    from qgate.store import utcnow

    started_at, started = utcnow(), time.perf_counter()
    r = evaluate_task(lm.model, lm.tokenizer, t.task, limit=t.limit,
                      progress=progress if progress is not None and progress.enabled else None)
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

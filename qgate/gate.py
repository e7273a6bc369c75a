"""The gate runner: policy -> plan -> baseline -> candidate -> decide -> fallback -> record.

It orchestrates only: it plans units (member x format with its evaluations) and hands them to an
executor (qgate.executors: local, in this process, by default; or Ray), which loads, quantizes,
evaluates and stores; decisions then come from qgate.decide (the same engine a policy review uses)
on the stored evidence, keys from qgate.keys, SQL from qgate.store, the report from qgate.report. Everything a run needs is validated before the database is opened, so a bad policy,
family or format leaves no trace. Every evaluation is keyed by content hashes and looked up before
anything is loaded: a member whose evaluations are all stored is never loaded at all, and a run
that was killed resumes from what its predecessor stored.

Exit codes (``GateResult.exit_code``; also ``qgate run --help``):
  0  every requested candidate ships
  1  blocked: some member x format has no passing candidate nor fallback
  2  usage or input error (bad policy, unknown family/format/member...), raised as QgateError
  3  ships only through the fallback chain (e.g. "ship fp8 instead"); CI may treat it as pass or fail
  4  internal error (qgate.crash): the run is recorded as failed, the traceback goes to a log file
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from qgate import __version__
from qgate.canonical import content_hash, json_safe
from qgate.crash import EXIT_INTERNAL
from qgate.decide import ChainOutcome, Evidence, TaskVerdict, walk_chain, worst_outcome
from qgate.errors import QgateError
from qgate.evaluation.suite import load_suite, suite_task_names
from qgate.formats import get_format
from qgate.keys import BASELINE, effective_limit, evaluation_key, quant_config, task_config, task_runtime
from qgate import datadirs
from qgate.policy import MemberPolicy, load_policy
from qgate.preflight import check_recipes, check_suite_tasks
from qgate.progress import Progress
from qgate.report.render import render_run
from qgate.store import NON_FINITE, check_location, open_store, redact_url

EXIT_SHIPS = 0
EXIT_BLOCKED = 1
EXIT_USAGE = 2
EXIT_FALLBACK = 3
OUTCOME_EXIT = {"ships": EXIT_SHIPS, "blocked": EXIT_BLOCKED, "fallback": EXIT_FALLBACK}


@dataclass
class GateResult:
    run_id: int
    family: str
    formats: list[str]
    suite: str
    policy_path: str
    policy_hash: str
    db_url: str
    outcome: str  # ships | fallback | blocked (the worst over members x formats)
    exit_code: int
    members: list[ChainOutcome]
    tasks: list[TaskVerdict]
    evaluations_run: int
    evaluations_cached: int
    models_loaded: int
    seconds: float
    report_path: str | None = None
    notes: list[str] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)  # per member: checkpoint id, source, provenance
    candidates: list[dict] = field(default_factory=list)  # quantized checkpoints gated: scheme, hash, fidelity
    task_seconds: dict = field(default_factory=dict)  # (member, format, task) -> how long its evaluation took

    def to_dict(self) -> dict:
        """JSON-ready (NaN/inf become null)."""
        return json_safe({"run_id": self.run_id, "family": self.family, "formats": self.formats, "suite": self.suite,
                "policy": self.policy_path, "policy_hash": self.policy_hash, "db": redact_url(self.db_url),
                "outcome": self.outcome, "exit_code": self.exit_code,
                "members": [m.to_dict() for m in self.members],
                "tasks": [dict(v.to_dict(), requested=o.format, seconds=self.task_seconds.get((v.member, v.format, v.task)))
                          for o in self.members for v in o.verdicts],
                "evaluations_run": self.evaluations_run, "evaluations_cached": self.evaluations_cached,
                "models_loaded": self.models_loaded, "seconds": round(self.seconds, 3),
                "report": self.report_path, "notes": list(self.notes), "checkpoints": list(self.checkpoints),
                **({"candidates": list(self.candidates)} if self.candidates else {})})


# ---- what a run is about, resolved before the database is touched ------------------------------------

@dataclass
class _MemberPlan:
    name: str
    spec: Any  # qgate.models.MemberSpec
    checkpoint_id: str | None = None
    file_hash: str | None = None


@dataclass
class _Setup:
    policy: Any
    formats: list[str]
    members: list[_MemberPlan]
    suite: Any
    limit: int | None
    backend_name: str
    device: Any
    dtype: Any
    checkpoints: dict = field(default_factory=dict)  # candidate name -> qgate.checkpoints.ResolvedCandidate


def _resolve(family: str | None, formats: Sequence[str] | None, member: str | None, suite: str | None,
             policy: str | os.PathLike | None, backend: str | None, limit: int | None,
             device: str | None, dtype: str | None, model: str | None = None, revision: str | None = None,
             include_path: str | os.PathLike | None = None, candidates: Sequence[Any] = ()) -> _Setup:
    if limit is not None and limit <= 0:
        raise QgateError(f"--limit {limit}: expected a positive number of samples per task")
    if family is None and model is None:
        raise QgateError("give --family NAME (policies/<name>.yaml) or --model ID_OR_PATH")
    if revision is not None and model is None:
        raise QgateError("--revision applies to --model (a hub id); a family member's revision is set in its policy")
    if model is not None:  # first of all: an uncached hub model offline fails within seconds
        from qgate.hub import check_model

        check_model(model, revision)
    source = policy if policy is not None else family
    if source is None:  # --model alone: the default policy's thresholds
        source = datadirs.find("policies", "default.yaml")
        if source is None:
            raise QgateError("no policies/default.yaml found; give --policy FILE")
    pol = load_policy(source, suite_tasks=suite_task_names, need_models=model is None)
    if family is not None and pol.family != family:
        raise QgateError(f"policy {pol.path} is for family {pol.family!r}, not {family!r}")

    # checkpoint candidates: --candidate alone gates only those; the policy's join its formats
    wanted = list(dict.fromkeys(formats or ([] if candidates else [c.format for c in pol.formats])))
    if not wanted and not candidates and not pol.checkpoints:
        raise QgateError(f"no --format given and policy {pol.path} lists no candidate formats")
    checked = []
    for name in wanted:
        fmt = get_format(name)
        if fmt.is_identity:
            raise QgateError(f"--format {name}: that is the unquantized baseline; give a quantized format")
        checked.append(fmt.name)

    _check_hub_checkpoints(pol, member, model, revision)  # before torch loads: offline fails within seconds

    import torch

    from qgate.backends import get_backend
    from qgate.models import default_device, model_name, resolve_dtype, resolve_member, resolve_model

    if model is not None:
        fam_name = pol.family if pol.family != "default" else model_name(model)
        spec = resolve_model(model, revision, family=fam_name, member=member)
        members = [_MemberPlan(spec.member, spec)]
        pol = replace(pol, family=fam_name)
    else:
        names = [m.name for m in pol.members]
        chosen = [m for m in pol.members if member is None or m.name == member]
        if member is not None and not chosen:
            chosen = [MemberPolicy(member)]  # any member of the family, even one the policy does not list
        members = [_MemberPlan(m.name, resolve_member(pol.models or family, m.name, m.model, m.revision))
                   for m in chosen]
        if not members:
            raise QgateError(f"policy {pol.path} lists no members (members: {names})")

    suite_obj = load_suite(suite or pol.suite, include_path=include_path)
    try:
        dev = torch.device(device) if device else default_device()
    except RuntimeError:
        raise QgateError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    dt = resolve_dtype(dtype, dev)
    backend_obj = get_backend(backend, device=dev)
    resolved = _resolve_checkpoints(pol, candidates, members)
    return _Setup(pol, checked + list(resolved), members, suite_obj, limit, backend_obj.name, dev, dt, resolved)


def _resolve_checkpoints(pol, candidates: Sequence[Any], members: list[_MemberPlan]) -> dict:
    """name -> ResolvedCandidate for the command line's and the policy's checkpoints, each tied to a member."""
    from dataclasses import replace as dc_replace

    from qgate.checkpoints import resolve_candidate

    out: dict = {}
    names = [m.name for m in members]
    for cand in (*candidates, *pol.checkpoints):
        if cand.name in out:
            continue  # the command line's entry wins over the policy's of the same name
        if cand.member is None:
            if len(members) != 1:
                raise QgateError(f"candidate {cand.name}: {len(members)} members are gated ({', '.join(names)}); "
                                 f"give --member, or the checkpoint's member in the policy")
            cand = dc_replace(cand, member=members[0].name)
        elif cand.member not in names:
            continue  # a checkpoint of a member not gated in this run
        out[cand.name] = resolve_candidate(cand)
    return out


def _check_hub_checkpoints(pol, member: str | None, model: str | None, revision: str | None) -> None:
    """Every hub checkpoint the run needs is in the local cache or reachable (qgate.hub), checked first."""
    from qgate.hub import snapshot

    if model is not None:
        return  # checked first thing in _resolve
    if pol.models is None:
        return
    for m in pol.members:
        if (member is not None and m.name != member) or m.model is not None:
            continue
        info = pol.models.member(m.name)
        if info.source == "hub":
            snapshot(info.location, m.revision or info.revision)


def checkpoint_identity(spec) -> tuple[str, str | None]:
    """(checkpoint id, file hash) of a resolved member without loading it."""
    from qgate.models import checkpoint_hash

    ident = checkpoint_hash(spec)
    return ident, ident.split(":", 1)[1] if ident.startswith("sha256:") else None


# ---- the run ------------------------------------------------------------------------------------------

def _versions() -> dict:
    from importlib import metadata

    out = {"qgate": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "lm_eval", "sqlalchemy", "numpy"):
        try:
            out[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _git_revision() -> str | None:
    """HEAD of the repository the run starts in (where the policies live in CI), else of qgate's own checkout."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=where)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Runner:
    """One gate run's state: the store, its keys, counters and the verdicts shown."""

    def __init__(self, setup: _Setup, store, run_id: int, bar, log: Callable[[str], None]):
        self.s = setup
        self.store = store
        self.run_id = run_id
        self.bar = bar
        self.log = log
        self.evaluations_run = 0
        self.evaluations_cached = 0
        self.models_loaded = 0
        self.noted: set[tuple[str, str, str]] = set()  # (member, format, task) verdicts already shown
        self.seconds: dict[tuple, float | None] = {}  # (member, format, task) -> the evaluation's duration
        self.version = __version__
        self.runtime = {"device": setup.device.type, "dtype": str(setup.dtype).removeprefix("torch.")}
        self.task_ids = {}
        for t in setup.suite.tasks:
            cfg = task_config(t, setup.limit)
            self.task_ids[t.name] = content_hash(cfg)
            store.put_task_config(self.task_ids[t.name], task=t.name, config=cfg)
        self.quant_ids: dict[str, str] = {}
        self.quant_configs: dict[str, dict] = {}

    # -- keys --

    def quant_id(self, fmt: str) -> str | None:
        if fmt == BASELINE:
            return None
        if fmt not in self.quant_ids and fmt in self.s.checkpoints:  # keyed by the checkpoint's content hash
            self.quant_configs[fmt] = self.s.checkpoints[fmt].config()
            self.quant_ids[fmt] = content_hash(self.quant_configs[fmt])
        if fmt not in self.quant_ids:
            choice = self.s.policy.format_choice(fmt)
            cfg = quant_config(fmt, choice.recipe, self.s.backend_name)
            self.quant_configs[fmt] = cfg
            self.quant_ids[fmt] = content_hash(cfg)
        return self.quant_ids[fmt]

    def key(self, m: _MemberPlan, fmt: str, task_name: str) -> str:
        return evaluation_key(m.checkpoint_id, self.quant_id(fmt), self.task_ids[task_name], self.version,
                              self.task_runtime(task_name))

    def task_runtime(self, task_name: str) -> dict:
        return task_runtime(self.runtime, self.s.suite.task(task_name).to_dict())

    # -- decisions --

    def note(self, decided: list[TaskVerdict]) -> None:
        """Show each verdict once (a chain is walked again after its fallback's units ran)."""
        for v in decided:
            if (v.member, v.format, v.task) in self.noted:
                continue
            self.noted.add((v.member, v.format, v.task))
            self.bar.note(f"{v.member} {v.format}: {v.decision.reason}"
                          + ("" if v.blocking else " [advisory]")
                          + (" [counts as fail]" if v.decision.verdict == "inconclusive" and v.effect == "fail"
                             else ""))


def run_gate(family: str | None, formats: Sequence[str] | None = None, member: str | None = None,
             suite: str | None = None, policy: str | os.PathLike | None = None, db: str | None = None,
             backend: str | None = None, limit: int | None = None, progress: bool | None = None, *,
             device: str | None = None, dtype: str | None = None, report: bool = True,
             report_path: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
             model: str | None = None, revision: str | None = None,
             include_path: str | os.PathLike | None = None, candidates: Sequence[Any] = (),
             executor: Any = None, ray_address: str | None = None) -> GateResult:
    """Run the gate for ``family`` x ``formats``; returns what was decided (and records it in the store).

    model: a hub id, model directory or .gguf file gated instead of a family's members (the policy is
    ``policy``, else the family's, else policies/default.yaml); include_path: a folder of the user's
    own lm-eval tasks.

    progress: None = a bar on a terminal, plain lines otherwise; False = silent.
    executor: None or "local" = planned units run in this process; "ray" (or an executor object,
    qgate.executors) = the same units run by that executor. Either way decided afterwards from the store.
    Raises QgateError (exit 2) for bad input, before the database is opened.
    """
    started = time.perf_counter()
    check_location(db)  # a database that cannot be written is found before anything else is read
    setup = _resolve(family, formats, member, suite, policy, backend, limit, device, dtype, model, revision,
                     include_path, candidates)
    runs_units = _start_executor(executor, ray_address, db)
    try:
        if (device is None and getattr(runs_units, "places_units", True) and runs_units.gpu_count()
                and setup.device.type != "cuda"):  # the cluster's workers have GPUs
            setup = _resolve(family, formats, member, suite, policy, backend, limit, "cuda", dtype, model,
                             revision, include_path, candidates)
        return _gate(setup, db, progress, report, report_path, log, started, runs_units)
    finally:
        runs_units.close()


def _start_executor(executor: Any, ray_address: str | None, db: str | None):
    from qgate.executors import get_executor
    from qgate.store import resolve_url

    ex = get_executor(executor, ray_address) if executor is None or isinstance(executor, str) else executor
    ex.start()
    try:
        if ex.nodes() > 1 and resolve_url(db).startswith("sqlite"):
            raise QgateError(f"--db {resolve_url(db)}: a SQLite file is not shared by the cluster's "
                             f"{ex.nodes()} machines; give a database URL they all reach (postgresql+psycopg://...)")
    except BaseException:
        ex.close()
        raise
    return ex


def _gate(setup: _Setup, db, progress, report, report_path, log, started: float, runs_units) -> GateResult:
    family = setup.policy.family
    log = log or (lambda line: print(f"qgate: {line}", file=sys.stderr, flush=True))
    n_tasks = len(setup.suite.tasks)
    bar = Progress(total=len(setup.members) * n_tasks * (1 + len(setup.formats)), label="qgate",
                   enabled=progress is not False)
    if hasattr(runs_units, "progress"):  # units run in this process: they show their steps as they go
        runs_units.progress = bar
    check_suite_tasks(setup.suite)
    for m in setup.members:
        m.checkpoint_id, m.file_hash = checkpoint_identity(m.spec)
    check_recipes(setup.policy, [f for f in setup.formats if f not in setup.checkpoints], setup.members)

    store = open_store(db)
    host = socket.gethostname()
    try:
        stale = store.mark_interrupted(host, _pid_alive)
        if stale:
            bar.note(f"run(s) {', '.join(map(str, stale))} on this host were interrupted; "
                     f"their stored evaluations are reused")
        pol = setup.policy
        run_id = store.start_run(
            family=family, formats=setup.formats, members=[m.name for m in setup.members], suite=setup.suite.name,
            suite_hash=setup.suite.hash, policy_hash=pol.hash, policy_text=pol.text, policy_path=pol.path,
            versions=_versions(), host=host, pid=os.getpid(), git_revision=_git_revision(),
            backend=setup.backend_name, device=str(setup.device), sample_limit=setup.limit)
        for m in setup.members:
            store.put_checkpoint(m.checkpoint_id, family=family, member=m.name, source=m.spec.location,
                                 revision=m.spec.revision, file_hash=m.file_hash,
                                 info={"source": m.spec.source, "description": m.spec.description or None})
        try:
            result = _run(setup, store, run_id, bar, log, started, runs_units)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            code = EXIT_USAGE if isinstance(exc, QgateError) else (None if status == "interrupted" else EXIT_INTERNAL)
            store.finish_run(run_id, status=status, exit_code=code)
            raise
        finally:
            bar.close()
        result.report_path = _render_report(store, run_id, report, report_path, result.notes, log)
        if result.report_path:
            store.update_run(run_id, report_path=result.report_path)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        store.close()


def _run(setup: _Setup, store, run_id: int, bar, log, started: float, executor) -> GateResult:
    """The run: units (each member's baseline, then its candidates) go to the executor, which stores
    their evaluations; the decision engine then reads stored evidence only. A chain that needs a
    fallback's evidence gets those units in a further round."""
    from qgate.executors import member_gpus
    from qgate.executors.units import Unit, UnitTask

    pol = setup.policy
    runner = _Runner(setup, store, run_id, bar, log)
    tasks = setup.suite.task_names()
    by_name = {t.name: t for t in setup.suite.tasks}
    members = {m.name: m for m in setup.members}
    # a cluster places each unit on the GPUs it asks for; the local executor uses the gate's own device
    placed = setup.device.type == "cuda" and getattr(executor, "places_units", True)
    gpu_bytes = executor.gpu_bytes() if placed else None
    gpus = {m.name: member_gpus(m.spec, gpu_bytes, executor.gpu_count()) if placed else 0 for m in setup.members}

    def gated(m: _MemberPlan, fmt: str) -> bool:  # a checkpoint is a candidate for the member it was made from only
        return fmt not in setup.checkpoints or setup.checkpoints[fmt].candidate.member == m.name

    def unit(m: _MemberPlan, fmt: str, role: str) -> Unit:
        cand = setup.checkpoints.get(fmt)
        recipe = None if fmt == BASELINE or cand is not None else setup.policy.format_choice(fmt).recipe
        quant_id = runner.quant_id(fmt)
        return Unit(db_url=store.url, run_id=run_id, member=m.name, spec=m.spec, checkpoint_id=m.checkpoint_id,
                    format=fmt, role=role, recipe=recipe, quant_id=quant_id, backend=setup.backend_name,
                    device="cuda" if placed else str(setup.device),  # a worker's GPUs are the ones it was given
                    dtype=str(setup.dtype).removeprefix("torch."), runtime=runner.runtime, version=runner.version,
                    tasks=tuple(UnitTask(t, runner.key(m, fmt, t.name), runner.task_ids[t.name],
                                         effective_limit(t, setup.limit)) for t in setup.suite.tasks),
                    gpus=gpus[m.name], candidate=cand,
                    quant_config=runner.quant_configs[fmt] if cand is not None else None)

    def done(result) -> None:
        if not result.shown:  # a worker's lines, shown as its unit comes back
            for line in result.notes:
                bar.note(line)
            for t in result.found:
                bar.step(f"{result.member} {result.format} {t}: cached")
            for t in result.evaluated:
                bar.step(f"{result.member} {result.format} {t}: done")
        runner.models_loaded += result.loaded
        if result.format == BASELINE:  # no candidate is judged against a broken baseline
            m = members[result.member]
            _check_baseline_finite(store, m, {t: runner.key(m, BASELINE, t) for t in tasks})

    def stored(m: _MemberPlan):
        def source(member: str, fmt: str, role: str, task: str) -> Evidence | str:
            if (member, fmt) not in ran:  # stored by an earlier run, perhaps: its unit links it to this one
                return f"{member} {fmt}: not part of this run yet"
            base_key, cand_key = runner.key(m, BASELINE, task), runner.key(m, fmt, task)
            base, cand = store.evaluation(base_key), store.evaluation(cand_key)
            if base is None or cand is None:
                return f"{member} {fmt if base else BASELINE} {task}: not stored yet"
            runner.seconds[(member, fmt, task)] = cand.get("duration_s")
            return Evidence(store.samples(base_key), store.samples(cand_key), by_name[task].to_dict(),
                            base.get("higher_is_better") or {})
        return source

    ran: set[tuple[str, str]] = set()
    planned = []
    for m in setup.members:
        planned.append(unit(m, BASELINE, "baseline"))
        planned += [unit(m, fmt, "candidate") for fmt in setup.formats if gated(m, fmt)]
    while planned:
        executor.run(planned, done)
        ran.update((u.member, u.format) for u in planned)
        outcomes = [walk_chain(pol, m.name, fmt, tasks, stored(m), on_decided=runner.note)
                    for m in setup.members for fmt in setup.formats if gated(m, fmt)]
        planned = []
        for m in setup.members:
            for o in (o for o in outcomes if o.member == m.name and o.outcome == "undecided"):
                for fmt in dict.fromkeys(x.format for x in o.missing):
                    if (m.name, fmt) in ran:
                        raise RuntimeError(f"{m.name} {fmt}: its unit ran but left no stored evidence")
                    if all(u.member != m.name or u.format != fmt for u in planned):
                        bar.total += len(tasks)
                        bar.note(f"{m.name}: {o.format} is blocked; trying fallback {fmt}")
                        planned.append(unit(m, fmt, "fallback"))
    linked = store.run_evaluations(run_id)
    runner.evaluations_run = sum(1 for r in linked if not r["cached"])
    runner.evaluations_cached = len(linked) - runner.evaluations_run
    return _finish(setup, store, run_id, runner, outcomes, started)


def _finish(setup: _Setup, store, run_id: int, runner: _Runner, outcomes: list[ChainOutcome],
            started: float) -> GateResult:
    pol = setup.policy
    verdicts = [v for o in outcomes for v in o.verdicts]
    store.record_decisions(run_id, policy_hash=pol.hash, decisions_rows=[v.row() for v in verdicts],
                           outcomes_rows=[o.to_dict() for o in outcomes])
    worst = worst_outcome([o.outcome for o in outcomes])
    exit_code = OUTCOME_EXIT[worst]
    store.finish_run(run_id, status="completed", outcome=worst, exit_code=exit_code)
    checkpoints = [{"member": m.name, "checkpoint": m.checkpoint_id, "source": m.spec.location,
                    "description": m.spec.description or None} for m in setup.members]
    return GateResult(run_id=run_id, family=pol.family, formats=setup.formats, suite=setup.suite.name,
                      policy_path=pol.path, policy_hash=pol.hash, db_url=store.url, outcome=worst,
                      exit_code=exit_code, members=outcomes, tasks=verdicts,
                      evaluations_run=runner.evaluations_run, evaluations_cached=runner.evaluations_cached,
                      models_loaded=runner.models_loaded, seconds=time.perf_counter() - started,
                      checkpoints=checkpoints, task_seconds=runner.seconds,
                      candidates=[_candidate_row(store, runner, c) for c in setup.checkpoints.values()])


def _candidate_row(store, runner, cand) -> dict:
    """A checkpoint candidate for --json: its scheme, hash and fidelity (as its unit stored them)."""
    row = store.quant_config(runner.quant_id(cand.name)) or {}
    return dict(cand.describe(), fidelity=(row.get("summary") or {}).get("fidelity"))


def _check_baseline_finite(store, m: _MemberPlan, base_keys: dict[str, str]) -> None:
    """A baseline with NaN/inf results is bad input (a broken checkpoint): no candidate can be judged against it."""
    for task, key in base_keys.items():
        row = store.evaluation(key) or {}
        if row.get("status") == NON_FINITE:
            metric = row.get("primary_metric") or "its metric"
            raise QgateError(f"member {m.name} ({m.spec.location}): the baseline's {task} has non-finite {metric} "
                             f"(NaN or inf); the checkpoint itself is broken, nothing to compare a candidate with")


def _render_report(store, run_id: int, enabled: bool, path, notes: list[str], log) -> str | None:
    if not enabled:
        return None
    try:
        return str(render_run(store, run_id, path))
    except QgateError:
        raise
    except Exception as exc:  # noqa: BLE001 - the decision is recorded; a broken report must not hide it
        line = f"report: rendering failed ({type(exc).__name__}: {exc}); the run and its decisions are stored"
        notes.append(line)
        log(line)
        return None

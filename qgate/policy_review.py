"""Policy-file reviews: what a policy change says, and what it would decide on the results already stored.

``qgate policy diff OLD NEW`` reads two policies (files, or ``REV:path`` from git), lists the
changed settings in words, re-decides every stored decision of the family under NEW from the
stored per-sample scores (no model is loaded, nothing is evaluated) and lists the decisions that
would flip, and the evaluations NEW needs that the store does not hold. ``qgate policy redecide``
records a new decision set for one stored run under another policy; earlier sets stay.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qgate.errors import QgateError
from qgate.policy import DEFAULT_RECIPE, Policy, TaskPolicy, decide_task, gate_effect, load_policy

# ---- reading a policy from a file or from git ----------------------------------------------------


def is_git_spec(spec: str) -> bool:
    """``REV:path`` (read from git) rather than a file: not an existing path, and a revision before a colon."""
    if Path(spec).expanduser().exists():
        return False
    rev, sep, _path = spec.partition(":")
    return bool(sep) and bool(rev)


def git_show(spec: str, cwd: str | os.PathLike | None = None) -> str:
    """The text of ``REV:path`` in the current repository (``git show REV:path``)."""
    rev, _, path = spec.partition(":")
    if not rev or not path:
        raise QgateError(f"{spec}: expected REV:path (e.g. main:policies/smollm2.yaml)")
    try:
        done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True,
                              timeout=60)
    except FileNotFoundError:
        raise QgateError(f"{spec}: cannot read from git: the git command is not installed") from None
    if done.returncode != 0:
        detail = next((line.strip() for line in done.stderr.splitlines() if line.strip()), "git show failed")
        detail = detail.removeprefix("fatal: ")
        raise QgateError(f"{spec}: cannot read from git: {detail}")
    return done.stdout


def _default_beside(spec: str) -> str:
    """REV:path -> REV:<path's folder>/default.yaml."""
    rev, _, path = spec.partition(":")
    return f"{rev}:{(Path(path).parent / 'default.yaml').as_posix()}"


@contextmanager
def _policies_from_git(spec: str):
    """A temporary policies folder holding REV:path and, when REV has one beside it, REV's default.yaml
    (a family file is read on top of the default file of the same revision)."""
    text = git_show(spec)
    name = Path(spec.partition(":")[2]).name
    if Path(name).suffix not in (".yaml", ".yml"):
        name += ".yaml"
    with tempfile.TemporaryDirectory(prefix="qgate-policy-") as tmp:
        folder = Path(tmp)
        (folder / name).write_text(text)
        if name != "default.yaml":
            try:
                (folder / "default.yaml").write_text(git_show(_default_beside(spec)))
            except QgateError:
                pass  # that revision has no default file beside it: the working tree's is used
        yield folder, folder / name


def load_policy_source(spec: str, *, check_tasks: bool = True) -> Policy:
    """Load a policy from a file path, a family name, or ``REV:path`` (git). Errors name ``spec``."""
    spec = str(spec)
    if not is_git_spec(spec):
        return load_policy(spec, check_tasks=check_tasks)
    default_spec = _default_beside(spec)
    with _policies_from_git(spec) as (folder, file):
        default_copy = folder / "default.yaml"
        try:
            if default_copy.is_file():
                with _env("QGATE_POLICIES", str(folder)):
                    policy = load_policy(file, check_tasks=check_tasks)
            else:
                policy = load_policy(file, check_tasks=check_tasks)
        except QgateError as exc:
            # name the git source, not the temporary copy
            message = str(exc).replace(str(file), spec).replace(str(default_copy), default_spec)
            raise QgateError(message) from None
    sources = tuple(spec if s == str(file) else (default_spec if s == str(default_copy) else s)
                    for s in policy.sources)
    return replace(policy, path=spec, sources=sources)


@contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# ---- what changed, in words -------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One changed setting: the key path, the values before and after, and a line a reviewer reads."""

    key: str
    old: Any
    new: Any
    text: str

    def to_dict(self) -> dict:
        return {"key": self.key, "old": self.old, "new": self.new, "text": self.text}


def suite_tasks(policy: Policy) -> dict[str, Any] | None:
    """The policy's suite tasks by name (TaskSpec), or None when the suite cannot be loaded here."""
    try:
        from qgate.evaluation.suite import load_suite

        return {t.name: t for t in load_suite(policy.suite).tasks}
    except (ImportError, QgateError):
        return None


def _num(value: float) -> str:
    """1.0 stays 1.0 (a threshold reads as a number, not an integer); 0.25 stays 0.25."""
    return f"{value:.1f}" if float(value) == round(float(value), 1) else f"{value:g}"


def _allowed_text(tp: TaskPolicy, unit: str) -> str:
    if tp.min_recovery is not None:
        return f"min recovery {_num(tp.min_recovery)}"
    return f"max drop {_num(tp.max_drop or 0.0)}" + (f" {unit}" if unit else "")


def _task_summary(tp: TaskPolicy, unit: str) -> str:
    parts = [_allowed_text(tp, unit), f"confidence {tp.confidence:g}", f"inconclusive: {tp.inconclusive}",
             "blocking" if tp.blocking else "advisory"]
    if tp.metric:
        parts.insert(0, f"metric {tp.metric}")
    return ", ".join(parts)


def _task_policy_changes(name: str, old: TaskPolicy, new: TaskPolicy, unit: str, key: str,
                         suffix: str = "") -> list[Change]:
    out = []
    if old.metric != new.metric:
        out.append(Change(f"{key}.metric", old.metric, new.metric,
                          f"{name} metric {old.metric or '(primary)'} -> {new.metric or '(primary)'}{suffix}"))
    if (old.max_drop is None) != (new.max_drop is None):  # switched between absolute and relative
        out.append(Change(f"{key}.threshold", _threshold(old), _threshold(new),
                          f"{name} {_allowed_text(old, unit)} -> {_allowed_text(new, unit)}{suffix}"))
    elif old.max_drop is not None and old.max_drop != new.max_drop:
        out.append(Change(f"{key}.max_drop", old.max_drop, new.max_drop,
                          f"{name} max drop {_num(old.max_drop)} -> {_num(new.max_drop)}"
                          f"{' ' + unit if unit else ''}{suffix}"))
    elif old.min_recovery is not None and old.min_recovery != new.min_recovery:
        out.append(Change(f"{key}.min_recovery", old.min_recovery, new.min_recovery,
                          f"{name} min recovery {_num(old.min_recovery)} -> {_num(new.min_recovery)}{suffix}"))
    if old.confidence != new.confidence:
        out.append(Change(f"{key}.confidence", old.confidence, new.confidence,
                          f"{name} confidence {old.confidence:g} -> {new.confidence:g}{suffix}"))
    if old.inconclusive != new.inconclusive:
        out.append(Change(f"{key}.inconclusive", old.inconclusive, new.inconclusive,
                          f"{name} inconclusive means {old.inconclusive} -> {new.inconclusive}{suffix}"))
    if old.blocking != new.blocking:
        words = {True: "blocking", False: "advisory"}
        out.append(Change(f"{key}.blocking", old.blocking, new.blocking,
                          f"{name} {words[old.blocking]} -> {words[new.blocking]}{suffix}"))
    return out


def _threshold(tp: TaskPolicy) -> dict:
    return {"max_drop": tp.max_drop} if tp.max_drop is not None else {"min_recovery": tp.min_recovery}


def _chain(choices) -> str:
    return "[" + ", ".join(c.format + ("" if c.recipe == DEFAULT_RECIPE else f" ({_recipe_text(c.recipe)})")
                           for c in choices) + "]"


def _recipe_text(recipe: Any) -> str:
    return recipe if isinstance(recipe, str) else f"{len(recipe)} inline rules"


def describe_changes(old: Policy, new: Policy, units: Mapping[str, str] | None = None,
                     extra_tasks: Iterable[str] = ()) -> list[Change]:
    """The settings that differ between two policies, key by key, each as one line of words.

    Task thresholds are compared as they take effect (a task's own entry over the defaults), for
    every task either policy's suite runs or names; ``units`` gives a task's unit ("pts" for
    pass/fail metrics) where known; ``extra_tasks`` adds tasks known from elsewhere (the store).
    """
    units = dict(units or {})
    out: list[Change] = []
    if old.family != new.family:
        out.append(Change("family", old.family, new.family, f"family {old.family} -> {new.family}"))
    if old.description != new.description:
        out.append(Change("description", old.description, new.description, "description changed"))
    if old.suite != new.suite:
        out.append(Change("suite", old.suite, new.suite, f"suite {old.suite} -> {new.suite}"))

    old_members = {m.name: m for m in old.members}
    new_members = {m.name: m for m in new.members}
    for name in new_members.keys() - old_members.keys():
        out.append(Change(f"members.{name}", None, new_members[name].to_dict(), f"member added: {name}"))
    for name in old_members.keys() - new_members.keys():
        out.append(Change(f"members.{name}", old_members[name].to_dict(), None, f"member removed: {name}"))
    for name in sorted(old_members.keys() & new_members.keys()):
        for attr in ("model", "revision"):
            a, b = getattr(old_members[name], attr), getattr(new_members[name], attr)
            if a != b:
                out.append(Change(f"members.{name}.{attr}", a, b, f"member {name} {attr} {a or '-'} -> {b or '-'}"))

    old_formats = {c.format: c for c in old.formats}
    new_formats = {c.format: c for c in new.formats}
    for name in [f for f in new_formats if f not in old_formats]:
        out.append(Change(f"formats.{name}", None, new_formats[name].to_dict(),
                          f"format added: {name}" + ("" if new_formats[name].recipe == DEFAULT_RECIPE
                                                      else f" (recipe {_recipe_text(new_formats[name].recipe)})")))
    for name in [f for f in old_formats if f not in new_formats]:
        out.append(Change(f"formats.{name}", old_formats[name].to_dict(), None, f"format removed: {name}"))
    for name in [f for f in new_formats if f in old_formats]:
        a, b = old_formats[name].recipe, new_formats[name].recipe
        if a != b:
            out.append(Change(f"formats.{name}.recipe", a, b,
                              f"format {name} recipe {_recipe_text(a)} -> {_recipe_text(b)}"))

    if old.fallback != new.fallback:
        out.append(Change("fallback", [c.to_dict() for c in old.fallback], [c.to_dict() for c in new.fallback],
                          f"fallback {_chain(old.fallback)} -> {_chain(new.fallback)}"))

    old_suite, new_suite = suite_tasks(old), suite_tasks(new)
    # the defaults' unit, when every task they apply to shares one ("pts" for pass/fail metrics)
    defaults_units = {units.get(t) for t in (new_suite or {}) if t not in new.tasks} - {None}
    defaults_unit = defaults_units.pop() if len(defaults_units) == 1 else ""
    default_changes = _task_policy_changes("defaults", old.defaults, new.defaults, defaults_unit, "defaults")
    for change in default_changes:
        out.append(Change(change.key, change.old, change.new,
                          change.text + " (tasks without their own entry)"))

    extra = list(extra_tasks)
    old_names = _task_names(old, old_suite, extra if old_suite is None else ())
    new_names = _task_names(new, new_suite, extra if new_suite is None else ())
    for name in new_names:
        if name not in old_names:
            out.append(Change(f"tasks.{name}", None, new.task_policy(name).to_dict(),
                              f"task added: {name} ({_task_summary(new.task_policy(name), units.get(name, ''))})"))
    for name in old_names:
        if name not in new_names:
            out.append(Change(f"tasks.{name}", old.task_policy(name).to_dict(), None, f"task removed: {name}"))
    for name in new_names:
        if name not in old_names:
            continue
        own = name in old.tasks or name in new.tasks
        out += _task_policy_changes(name, old.task_policy(name), new.task_policy(name), units.get(name, ""),
                                    f"tasks.{name}", "" if own else " (from defaults)")
    return out


def _task_names(policy: Policy, suite: Mapping[str, Any] | None, extra: Iterable[str]) -> list[str]:
    """The tasks a policy decides: its suite's, then any it names that the suite does not list."""
    names = list(suite or {})
    for name in [*policy.tasks, *extra]:
        if name not in names:
            names.append(name)
    return names


# ---- the stored evidence -------------------------------------------------------------------------------

def family_decisions(store, family: str) -> list[dict]:
    """The latest stored decision per run x member x format x task of a family, oldest run first.

    Rows are the decisions table's, plus ``run_policy_hash``. (A query of this module: the store
    keeps its own API to what every command needs.)
    """
    import sqlalchemy as sa

    from qgate.store import decisions, runs

    q = (sa.select(decisions, runs.c.policy_hash.label("run_policy_hash"))
         .join(runs, runs.c.id == decisions.c.run_id)
         .where(runs.c.family == family)
         .order_by(decisions.c.run_id, decisions.c.id))
    latest: dict[tuple, dict] = {}
    with store.engine.begin() as conn:
        for row in conn.execute(q).all():
            r = dict(row._mapping)
            latest[(r["run_id"], r["member"], r["format"], r["task"])] = r  # later ids win
    return list(latest.values())


class _Evidence:
    """Finds the stored evaluations a policy's decision needs, by the gate's own cache keys.

    For a stored run, member, format and task the key is what ``qgate run`` under ``policy`` would
    look up: the run's checkpoint, task config, qgate version and runtime, and the quantization
    config of the policy's recipe for that format (so a changed recipe needs new evidence). When
    the key scheme cannot be reproduced for a run, the run's own linked evaluations are used.
    """

    def __init__(self, store, policy: Policy):
        self.store = store
        self.policy = policy
        self._links: dict[int, list[dict]] = {}
        self._samples: dict[str, list[dict]] = {}
        self._specs: dict[str, dict | None] = {}
        self._context: dict[tuple, dict | None] = {}
        self._quant_ids: dict[tuple, str | None] = {}
        self._suite = suite_tasks(policy) or {}

    def links(self, run_id: int) -> list[dict]:
        if run_id not in self._links:
            self._links[run_id] = self.store.run_evaluations(run_id)
        return self._links[run_id]

    def linked(self, run_id: int, member: str, fmt: str, task: str, role: str | None = None) -> dict | None:
        """The evaluation the run itself linked for this member x format x task (whatever its recipe)."""
        rows = [l for l in self.links(run_id) if l["member"] == member and l["format"] == fmt and l["task"] == task]
        return next((l for l in rows if l["role"] == role), rows[0] if rows else None)

    def context(self, run_id: int, member: str) -> dict | None:
        """checkpoint, qgate version and key runtime of a run's member, checked against a stored key."""
        if (run_id, member) in self._context:
            return self._context[(run_id, member)]
        from qgate.store import evaluation_key

        ctx = None
        link = next((l for l in self.links(run_id) if l["member"] == member and l["role"] == "baseline"), None)
        row = self.store.evaluation(link["evaluation_id"]) if link else None
        if row is not None:
            runtime = dict(row.get("runtime") or {})
            # the gate keys on device and dtype; the stored runtime also names the backend
            for candidate in ({k: v for k, v in runtime.items() if k != "backend"}, runtime):
                if evaluation_key(row["checkpoint_id"], None, row["task_config_id"], row["qgate_version"],
                                  candidate) == row["id"]:
                    run = self.store.run(run_id) or {}
                    ctx = {"checkpoint_id": row["checkpoint_id"], "qgate_version": row["qgate_version"],
                           "runtime": candidate, "backend": runtime.get("backend") or run.get("backend"),
                           "sample_limit": run.get("sample_limit")}
                    break
        self._context[(run_id, member)] = ctx
        return ctx

    def _task_config_id(self, run_id: int, member: str, task: str, ctx: dict) -> str | None:
        link = next((l for l in self.links(run_id) if l["member"] == member and l["task"] == task), None)
        if link is not None:
            return link["task_config_id"]
        spec = self._suite.get(task)  # a task the run did not evaluate: keyed as the policy's suite defines it
        if spec is None:
            return None
        from qgate.gate import task_config
        from qgate.store import content_hash

        return content_hash(task_config(spec, ctx.get("sample_limit")))

    def _quant_id(self, fmt: str, backend: str | None) -> str | None:
        if (fmt, backend) not in self._quant_ids:
            from qgate.gate import planned_quant_config
            from qgate.store import content_hash

            recipe = self.policy.format_choice(fmt).recipe
            self._quant_ids[(fmt, backend)] = content_hash(planned_quant_config(fmt, recipe, backend))
        return self._quant_ids[(fmt, backend)]

    def find(self, run_id: int, member: str, fmt: str, task: str, role: str | None = None) -> dict | None:
        """The stored evaluation (a row with evaluation_id) the policy needs, or None when the store lacks it."""
        from qgate.gate import BASELINE
        from qgate.store import evaluation_key

        ctx = self.context(run_id, member)
        if ctx is None:
            return self.linked(run_id, member, fmt, task, "baseline" if fmt == BASELINE else role)
        task_config_id = self._task_config_id(run_id, member, task, ctx)
        if task_config_id is None:
            return None
        quant_id = None if fmt == BASELINE else self._quant_id(fmt, ctx["backend"])
        key = evaluation_key(ctx["checkpoint_id"], quant_id, task_config_id, ctx["qgate_version"], ctx["runtime"])
        row = self.store.evaluation(key)
        if row is None or row.get("status") != "completed":
            return None
        return {**row, "evaluation_id": row["id"]}

    def baseline(self, run_id: int, member: str, task: str) -> dict | None:
        from qgate.gate import BASELINE

        return self.find(run_id, member, BASELINE, task)

    def task_spec(self, task_config_id: str | None) -> dict | None:
        """The suite task entry an evaluation ran (metric, higher_is_better, per_sample), as stored."""
        if not task_config_id:
            return None
        if task_config_id not in self._specs:
            row = self.store.task_config(task_config_id) or {}
            spec = (row.get("config") or {}).get("task")
            self._specs[task_config_id] = spec if isinstance(spec, dict) else None
        return self._specs[task_config_id]

    def samples(self, evaluation_id: str) -> list[dict]:
        if evaluation_id not in self._samples:
            self._samples[evaluation_id] = self.store.samples(evaluation_id)
        return self._samples[evaluation_id]


@dataclass
class Redecision:
    """One task decided again from stored samples: the new Decision and its effect on the gate."""

    decision: Any  # qgate.policy.Decision
    effect: str  # pass | warn | fail
    blocking: bool

    def numbers(self) -> dict:
        return {**self.decision.to_dict(), "effect": self.effect, "blocking": self.blocking}


def redecide_task(evidence: _Evidence, run_id: int, member: str, fmt: str, task: str, policy: Policy,
                  role: str | None = None, hint: Mapping[str, Any] | None = None) -> Redecision | str:
    """Decide one member x format x task of a stored run under ``policy`` from its stored samples,
    the way the gate decides it (qgate.gate): the metric is the policy's or the task's primary one;
    direction and kind come from the stored task config when the metric is the primary one.

    Returns the Redecision, or a sentence saying which evidence is missing (nothing is guessed).
    ``hint``: the stored decision's numbers, used only when the store has no task config.
    """
    base = evidence.baseline(run_id, member, task)
    cand = evidence.find(run_id, member, fmt, task, role)
    if base is None or cand is None:
        if base is not None and evidence.linked(run_id, member, fmt, task) is not None:
            recipe = _recipe_text(policy.format_choice(fmt).recipe)
            return f"not evaluated with the {fmt} recipe {recipe} (the stored {fmt} evaluation used another)"
        which = " or ".join(w for w, row in (("baseline", base), (fmt, cand)) if row is None)
        return f"not evaluated (no stored {which} evaluation)"
    tp = policy.task_policy(task)
    spec = evidence.task_spec(cand.get("task_config_id")) or {}
    if not spec and hint:
        spec = {"metric": hint.get("metric"), "higher_is_better": hint.get("higher_is_better"),
                "per_sample": "binary" if hint.get("binary") else "continuous"}
    primary = spec.get("metric") or cand.get("primary_metric")
    metric = tp.metric or primary
    if not metric:
        return "the stored evaluation names no primary metric and the policy names none"
    base_samples, cand_samples = evidence.samples(base["evaluation_id"]), evidence.samples(cand["evaluation_id"])
    if not any(metric in (s.get("scores") or {}) for s in cand_samples):
        return f"the stored samples have no per-sample {metric!r} scores"
    if metric == primary and spec.get("higher_is_better") is not None:
        higher, binary = bool(spec["higher_is_better"]), spec.get("per_sample") == "binary"
    else:
        higher, binary = bool((base.get("higher_is_better") or {}).get(metric, True)), None
    decision = decide_task(base_samples, cand_samples, tp, higher, binary, metric=metric)
    return Redecision(decision, gate_effect(decision, tp), tp.blocking)


# ---- re-deciding a family's stored decisions -----------------------------------------------------

@dataclass
class Flip:
    """A stored task decision that the new policy decides differently (verdict or gate effect)."""

    run_id: int
    member: str
    format: str
    role: str
    task: str
    old_verdict: str
    new_verdict: str
    old_effect: str | None
    new_effect: str
    old_reason: str
    new_reason: str
    old_threshold: float | None
    numbers: dict  # the new decision's numbers

    def text(self) -> str:
        n = self.numbers
        unit = f" {n['unit']}" if n.get("unit") else ""
        head = f"{self.member} {self.format} {self.task}: {self.old_verdict} -> {self.new_verdict}"
        if self.old_effect and self.old_effect != self.new_effect and (self.old_effect, self.new_effect) != (
                self.old_verdict, self.new_verdict):
            head += f" (gate: {self.old_effect} -> {self.new_effect})"
        if n.get("delta") is None:
            return f"{head}; {self.new_reason}"
        num = _signed(n.get("unit"))
        values = ""
        if not n.get("binary") and n.get("baseline") is not None:
            values = f" ({n['metric']} {n['baseline']:.2f} -> {n['candidate']:.2f})"
        return (f"{head}: {num(n['delta'])}{unit}{values}, {n['confidence'] * 100:g}% CI "
                f"[{num(n['ci_low'])}, {num(n['ci_high'])}], allowed {num(self.old_threshold)} -> "
                f"{num(n.get('threshold'))}, n={n['n']} (run {self.run_id})")

    def to_dict(self) -> dict:
        return {"run": self.run_id, "member": self.member, "format": self.format, "role": self.role,
                "task": self.task, "old_verdict": self.old_verdict, "new_verdict": self.new_verdict,
                "old_effect": self.old_effect, "new_effect": self.new_effect, "old_reason": self.old_reason,
                "new_reason": self.new_reason, "old_threshold": self.old_threshold, "numbers": self.numbers,
                "text": self.text()}


@dataclass
class Missing:
    """Evidence the new policy needs that the store does not hold."""

    member: str
    format: str
    task: str | None  # None: every task
    why: str
    needed: bool = True  # False: only needed if an earlier step of the fallback chain fails
    runs: list[int] = field(default_factory=list)

    def text(self) -> str:
        what = f"{self.member} {self.format} {self.task or '(all tasks)'}"
        runs = f" (run {', '.join(map(str, self.runs))})" if self.runs else ""
        return f"{what}: {self.why}{runs}"

    def to_dict(self) -> dict:
        return {"member": self.member, "format": self.format, "task": self.task, "why": self.why,
                "needed": self.needed, "runs": self.runs, "text": self.text()}


@dataclass
class OutcomeChange:
    run_id: int
    member: str
    format: str  # the requested candidate format
    old: str | None
    old_shipped: str | None
    new: str
    new_shipped: str | None
    reasons: list[str]

    def text(self) -> str:
        return (f"{self.member} {self.format}: {_outcome_text(self.old, self.old_shipped)} -> "
                f"{_outcome_text(self.new, self.new_shipped)} (run {self.run_id})")

    def to_dict(self) -> dict:
        return {"run": self.run_id, "member": self.member, "format": self.format, "old": self.old,
                "old_shipped": self.old_shipped, "new": self.new, "new_shipped": self.new_shipped,
                "reasons": self.reasons, "text": self.text()}


def _signed(unit: str | None):
    """A formatter for deltas and thresholds: one decimal for points, two for metric units."""
    digits = 1 if unit == "pts" else 2

    def signed(x: float | None) -> str:
        if x is None:
            return "-"
        if x and abs(x) < 10 ** -digits:  # a tiny threshold must not read as zero
            return f"{x:+.2g}"
        return f"{x:+.{digits}f}"

    return signed


def _outcome_text(outcome: str | None, shipped: str | None) -> str:
    if outcome == "fallback":
        return f"ships {shipped} instead"
    if outcome == "ships":
        return f"ships {shipped}" if shipped else "ships"
    if outcome == "undecided":
        return "undecided (evidence missing)"
    return outcome or "not decided"


@dataclass
class Outcome:
    """What the gate decides for one member x requested format under a policy."""

    outcome: str  # ships | fallback | blocked | undecided (evidence missing)
    shipped_format: str | None
    reasons: list[str]
    decisions: list[tuple[str, str, str, Redecision]]  # (format, role, task, Redecision)
    missing: list[Missing]


def decide_outcome(evidence: _Evidence, run_id: int, member: str, fmt: str, tasks: Sequence[str],
                   policy: Policy, hints: Mapping[tuple, Mapping] | None = None,
                   role_of: Mapping[tuple, str] | None = None) -> Outcome:
    """The gate's outcome for ``member`` x ``fmt`` under ``policy``, from stored evaluations only.

    The candidate ships when no task's effect is "fail"; otherwise the fallback chain is walked in
    order and the first format that passes ships instead; a step without stored evidence stops the
    walk with outcome "undecided" and the missing evaluations listed.
    """
    hints, role_of = hints or {}, role_of or {}
    decided: list[tuple[str, str, str, Redecision]] = []
    reasons: list[str] = []
    chain = [(fmt, "candidate")] + [(c.format, "fallback") for c in policy.fallback if c.format != fmt]
    for step, (f, role) in enumerate(chain):
        failing, missing = [], []
        for task in tasks:
            got = redecide_task(evidence, run_id, member, f, task, policy,
                                role_of.get((member, f, task), role), hints.get((member, f, task)))
            if isinstance(got, str):
                missing.append(Missing(member, f, task, got, runs=[run_id]))
                continue
            decided.append((f, role, task, got))
            if got.effect == "fail":
                failing.append(got.decision.reason)
        if missing or not failing:
            # formats further down the chain are only needed if this step fails
            later = [Missing(member, c, None, f"no stored evaluations (needed only if {f} fails)", needed=False,
                             runs=[run_id]) for c, _ in chain[step + 1:]
                     if not any(evidence.find(run_id, member, c, t) for t in tasks)]
            if missing:
                return Outcome("undecided", None, reasons + [m.text() for m in missing], decided, missing + later)
            if step:
                reasons.append(f"ship {f} instead of {fmt}")  # worded as the gate words it
            return Outcome("ships" if step == 0 else "fallback", f, reasons, decided, later)
        reasons += [f"{f}: {r}" for r in failing]
    return Outcome("blocked", None, reasons, decided, [])


@dataclass
class PolicyReview:
    old: Policy
    new: Policy
    changes: list[Change]
    database: str | None
    redecided: int = 0  # stored decisions decided again
    flips: list[Flip] = field(default_factory=list)
    outcome_changes: list[OutcomeChange] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def decided_changes(self) -> list[OutcomeChange]:
        """Outcome changes that are decided (not merely undecidable for missing evidence)."""
        return [o for o in self.outcome_changes if o.new != "undecided"]

    @property
    def exit_code(self) -> int:
        """0: no stored decision would flip; 1: some would (missing evidence alone is not a flip)."""
        return 1 if self.flips or self.decided_changes else 0

    def to_dict(self) -> dict:
        return {"old": {"source": self.old.path, "family": self.old.family, "hash": self.old.hash},
                "new": {"source": self.new.path, "family": self.new.family, "hash": self.new.hash},
                "changes": [c.to_dict() for c in self.changes], "database": self.database,
                "redecided": self.redecided, "flips": [f.to_dict() for f in self.flips],
                "outcome_changes": [o.to_dict() for o in self.outcome_changes],
                "missing": [m.to_dict() for m in self.missing], "notes": self.notes,
                "exit_code": self.exit_code}


def _suite_delta(old: Policy, new: Policy) -> tuple[list[str], list[str]]:
    """Tasks NEW's suite runs that OLD's does not, and the other way round (empty when unknown)."""
    old_suite, new_suite = suite_tasks(old), suite_tasks(new)
    if old_suite is None or new_suite is None:
        return [], []
    return [t for t in new_suite if t not in old_suite], [t for t in old_suite if t not in new_suite]


def _run_tasks_under(policy: Policy, run: Mapping, stored: Sequence[str]) -> list[str]:
    """The tasks ``policy`` decides for a stored run: the run's own tasks when the policy's suite is the
    one the run used, else the policy's suite's tasks."""
    try:
        from qgate.evaluation.suite import load_suite

        suite = load_suite(policy.suite)
    except (ImportError, QgateError):
        return list(stored)
    if suite.name == run.get("suite") and (not run.get("suite_hash") or suite.hash == run.get("suite_hash")):
        return list(stored)
    return suite.task_names()


def _redacted(url: str) -> str:
    """A database URL fit to print (no password)."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a message
        return url


def review(old: Policy, new: Policy, store=None) -> PolicyReview:
    """Compare two policies and re-decide the family's stored decisions under the new one."""
    stored_rows = family_decisions(store, new.family) if store is not None else []
    units = {r["task"]: (r.get("numbers") or {}).get("unit") or "" for r in stored_rows}
    for policy in (old, new):
        for name, spec in (suite_tasks(policy) or {}).items():
            units.setdefault(name, "pts" if spec.per_sample == "binary" else "")
    result = PolicyReview(old, new, describe_changes(old, new, units, extra_tasks=[r["task"] for r in stored_rows]),
                          _redacted(store.url) if store is not None else None)
    if old.family != new.family:
        result.notes.append(f"the policies are for different families ({old.family}, {new.family}); "
                            f"stored decisions of {new.family} are re-decided")
    if store is None:
        return result
    if not stored_rows:
        result.notes.append(f"no stored decisions of family {new.family}: nothing to re-decide")
    evidence = _Evidence(store, new)
    by_run: dict[int, list[dict]] = {}
    for row in stored_rows:
        by_run.setdefault(row["run_id"], []).append(row)
    other_policy = sorted({r["run_id"] for r in stored_rows if r["policy_hash"] != old.hash})
    if other_policy:
        result.notes.append(f"decisions of run {', '.join(map(str, other_policy))} were made under a policy other "
                            f"than OLD; flips are against the stored decisions")

    missing: dict[tuple, Missing] = {}

    old_chain = {c.format for c in old.fallback}

    def add_missing(m: Missing) -> None:
        if not m.needed and m.format in old_chain:
            return  # only a fallback the change introduces is worth a line when it is not (yet) needed
        key = (m.member, m.format, m.task, m.why)
        if key in missing:
            missing[key].runs = sorted(set(missing[key].runs) | set(m.runs))
        else:
            missing[key] = m

    added, removed = _suite_delta(old, new)
    for run_id, rows in by_run.items():
        run = store.run(run_id) or {}
        stored_tasks = list(dict.fromkeys(r["task"] for r in rows))
        # what the policy change asks of this run: its tasks, plus those NEW's suite adds, minus those it drops
        tasks = [t for t in dict.fromkeys([*stored_tasks, *added]) if t not in removed]
        hints = {(r["member"], r["format"], r["task"]): r.get("numbers") or {} for r in rows}
        role_of = {(r["member"], r["format"], r["task"]): r["role"] for r in rows}
        stored = {(r["member"], r["format"], r["task"]): r for r in rows}
        old_outcomes = {(o["member"], o["format"]): o for o in store.outcomes(run_id)}
        members = list(dict.fromkeys(r["member"] for r in rows))
        requested = list(run.get("formats") or []) or list(dict.fromkeys(r["format"] for r in rows
                                                                         if r["role"] == "candidate"))
        redecided_here: dict[tuple, Redecision] = {}
        for member in members:
            for fmt in requested:
                outcome = decide_outcome(evidence, run_id, member, fmt, tasks, new, hints, role_of)
                for f, _role, task, got in outcome.decisions:
                    redecided_here[(member, f, task)] = got
                for m in outcome.missing:
                    add_missing(m)
                before = old_outcomes.get((member, fmt))
                if before is not None and (before["outcome"], before.get("shipped_format")) != (
                        outcome.outcome, outcome.shipped_format):
                    result.outcome_changes.append(OutcomeChange(
                        run_id, member, fmt, before["outcome"], before.get("shipped_format"), outcome.outcome,
                        outcome.shipped_format, outcome.reasons))
        # every stored decision, whether or not the new outcome needed it
        for key, row in stored.items():
            got = redecided_here.get(key)
            if got is None and row["task"] in tasks:
                got = redecide_task(evidence, run_id, row["member"], row["format"], row["task"], new, row["role"],
                                    row.get("numbers") or {})
                if isinstance(got, str):
                    add_missing(Missing(row["member"], row["format"], row["task"], got, runs=[run_id]))
                    continue
            if got is None:
                result.notes.append(f"run {run_id}: {row['member']} {row['format']} {row['task']} is no longer "
                                    f"decided under NEW (task not in its suite)")
                continue
            result.redecided += 1
            old_numbers = row.get("numbers") or {}
            old_effect = old_numbers.get("effect") or gate_effect(_verdict_only(row), old.task_policy(row["task"]))
            if row["verdict"] != got.decision.verdict or old_effect != got.effect:
                result.flips.append(Flip(run_id, row["member"], row["format"], row["role"], row["task"],
                                         row["verdict"], got.decision.verdict, old_effect, got.effect,
                                         row["reason"], got.decision.reason, old_numbers.get("threshold"),
                                         got.numbers()))
    # what NEW adds that no stored run covers: members and candidate formats
    evaluated = {(r["member"], r["format"]) for r in stored_rows}
    stored_members = {r["member"] for r in stored_rows}
    for m in new.members:
        if stored_members and m.name not in stored_members:
            add_missing(Missing(m.name, "-", None, "member never evaluated"))
    for choice in new.formats:
        for member in sorted(stored_members):
            if (member, choice.format) not in evaluated and choice.format not in {c.format for c in old.formats}:
                add_missing(Missing(member, choice.format, None, "candidate format added; no stored evaluations"))
    result.missing = sorted(missing.values(), key=lambda m: (not m.needed, m.member, m.format, m.task or ""))
    return result


def _verdict_only(row: Mapping) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(verdict=row["verdict"])


# ---- presentation ------------------------------------------------------------------------------------

def _short(policy: Policy) -> str:
    return f"{policy.path} (hash {policy.hash[:12]})"


def _verdict_line(review: PolicyReview) -> str:
    n, k = len(review.flips), len(review.decided_changes)
    undecided = len(review.outcome_changes) - k
    tail = (f"; {undecided} gate outcome{'s' if undecided != 1 else ''} cannot be decided without the missing "
            f"evidence" if undecided else "")
    if review.exit_code == 0:
        return f"verdict: no stored decision would flip{tail} (exit 0)"
    parts = []
    if n:
        parts.append(f"{n} decision{'s' if n != 1 else ''} would flip")
    if k:
        parts.append(f"{k} gate outcome{'s' if k != 1 else ''} would change")
    return f"verdict: {', '.join(parts)}{tail} (exit 1)"


def review_text(review: PolicyReview) -> str:
    """The console report: changes, flips, outcome changes, missing evidence, one verdict line."""
    lines = [f"policy diff for family {review.new.family}",
             f"  OLD {_short(review.old)}", f"  NEW {_short(review.new)}", ""]
    if review.changes:
        lines.append(f"changed settings ({len(review.changes)}):")
        lines += [f"  {c.text}" for c in review.changes]
    else:
        lines.append("changed settings: none (the policies decide alike)")
    lines.append("")
    if review.database is None:
        lines.append("stored decisions: no results database; nothing re-decided")
    else:
        lines.append(f"re-decided {review.redecided} stored decision{'s' if review.redecided != 1 else ''} "
                     f"from stored per-sample results, no model loaded ({review.database}): "
                     f"{len(review.flips)} would flip")
        lines += [f"  {f.text()}" for f in review.flips]
        if review.outcome_changes:
            lines.append(f"gate outcomes that would change ({len(review.outcome_changes)}):")
            lines += [f"  {o.text()}" for o in review.outcome_changes]
    needed = [m for m in review.missing if m.needed]
    optional = [m for m in review.missing if not m.needed]
    if needed:
        lines += ["", f"missing evidence: NEW needs evaluations the store does not hold ({len(needed)}):"]
        lines += [f"  {m.text()}" for m in needed]
    if optional:
        lines += ["", f"not stored, needed only if a format before it fails ({len(optional)}):"]
        lines += [f"  {m.text()}" for m in optional]
    if review.missing:
        lines.append(f"  (`qgate run --family {review.new.family} --policy NEW` evaluates them; "
                     f"nothing above is guessed)")
    if review.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in review.notes]
    lines += ["", _verdict_line(review)]
    return "\n".join(lines)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def review_markdown(review: PolicyReview) -> str:
    """The same review as GitHub-flavoured markdown (for $GITHUB_STEP_SUMMARY or a PR comment)."""
    out = [f"## qgate policy diff: {_md(review.new.family)}", "",
           f"- OLD `{_md(review.old.path)}` (hash `{review.old.hash[:12]}`)",
           f"- NEW `{_md(review.new.path)}` (hash `{review.new.hash[:12]}`)", "",
           f"**{_md(_verdict_line(review))}**", "", "### Changed settings", ""]
    out += [f"- {_md(c.text)}" for c in review.changes] or ["- none"]
    out += ["", "### Decisions that would flip", ""]
    if review.database is None:
        out.append("No results database: nothing re-decided.")
    else:
        out.append(f"{review.redecided} stored decisions re-decided from stored per-sample results "
                   f"(no model loaded).")
        if review.flips:
            out += ["", "| run | member | format | task | old -> new | delta | CI | allowed (old -> new) | n |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for f in review.flips:
                n = f.numbers
                num = _signed(n.get("unit"))

                verdicts = f"{f.old_verdict} -> **{f.new_verdict}**"
                if f.old_effect and f.old_effect != f.new_effect and (f.old_effect, f.new_effect) != (
                        f.old_verdict, f.new_verdict):
                    verdicts += f" (gate {f.old_effect} -> {f.new_effect})"
                out.append(f"| {f.run_id} | {_md(f.member)} | {f.format} | {_md(f.task)} | {verdicts} | "
                           f"{num(n.get('delta'))} {n.get('unit') or ''} | [{num(n.get('ci_low'))}, "
                           f"{num(n.get('ci_high'))}] | {num(f.old_threshold)} -> {num(n.get('threshold'))} | "
                           f"{n.get('n')} |")
        if review.outcome_changes:
            out += ["", "Gate outcomes that would change:", ""]
            out += [f"- {_md(o.text())}" for o in review.outcome_changes]
    if review.missing:
        out += ["", "### Missing evidence", "", "NEW needs evaluations the store does not hold (not guessed):", ""]
        out += [f"- {_md(m.text())}" for m in review.missing]
    if review.notes:
        out += ["", "### Notes", ""] + [f"- {_md(n)}" for n in review.notes]
    return "\n".join(out) + "\n"


def write_step_summary(markdown: str) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when it is set (GitHub Actions); True when written."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(markdown)
    return True


# ---- recording a new decision set for one stored run -------------------------------------------------

@dataclass
class RunRedecision:
    run_id: int
    policy: Policy
    batch: str | None
    decisions: list[dict]  # rows as recorded
    outcomes: list[dict]
    previous: dict[tuple, dict]  # the run's latest decisions before, by (member, format, task)
    previous_outcomes: dict[tuple, dict]
    missing: list[Missing]

    def changed(self) -> list[str]:
        lines = []
        for d in self.decisions:
            before = self.previous.get((d["member"], d["format"], d["task"]))
            if before is not None and before["verdict"] != d["verdict"]:
                lines.append(f"{d['member']} {d['format']} {d['task']}: {before['verdict']} -> {d['verdict']}")
        for o in self.outcomes:
            before = self.previous_outcomes.get((o["member"], o["format"]))
            if before is not None and (before["outcome"], before.get("shipped_format")) != (
                    o["outcome"], o.get("shipped_format")):
                lines.append(f"{o['member']} {o['format']}: {_outcome_text(before['outcome'], before.get('shipped_format'))}"
                             f" -> {_outcome_text(o['outcome'], o.get('shipped_format'))}")
        return lines

    def text(self) -> str:
        lines = [f"run {self.run_id} re-decided under {_short(self.policy)}: decision set {self.batch} recorded "
                 f"({len(self.decisions)} task decisions); earlier sets kept"]
        for o in self.outcomes:
            lines.append(f"  {o['member']} {o['format']}: {_outcome_text(o['outcome'], o.get('shipped_format'))}")
        for d in self.decisions:
            lines.append(f"    {d['reason']}" + ("" if d["role"] == "candidate" else f"  [{d['format']}]"))
        changed = self.changed()
        lines.append(f"changed against the previous decision set ({len(changed)}):" if changed
                     else "no verdict changed against the previous decision set")
        lines += [f"  {c}" for c in changed]
        if self.missing:
            lines.append("missing evidence (not guessed):")
            lines += [f"  {m.text()}" for m in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"run": self.run_id, "policy": {"source": self.policy.path, "hash": self.policy.hash},
                "batch": self.batch, "decisions": self.decisions, "outcomes": self.outcomes,
                "changed": self.changed(), "missing": [m.to_dict() for m in self.missing]}


def redecide_run(store, run_id: int, policy: Policy) -> RunRedecision:
    """Decide a stored run again under ``policy`` from its stored samples and record the result as a
    new decision set (the run's earlier sets stay, so the report shows the history)."""
    run = store.run(run_id)
    if run is None:
        raise QgateError(f"RUN {run_id}: no such run in {store.url}")
    if run["family"] != policy.family:
        raise QgateError(f"--policy {policy.path}: policy is for family {policy.family!r}, "
                         f"run {run_id} is of family {run['family']!r}")
    evidence = _Evidence(store, policy)
    links = evidence.links(run_id)
    if not links:
        raise QgateError(f"RUN {run_id}: the run has no stored evaluations to decide from (status {run['status']})")
    previous_rows = store.decisions(run_id)
    previous = {(r["member"], r["format"], r["task"]): r for r in previous_rows}
    hints = {k: r.get("numbers") or {} for k, r in previous.items()}
    role_of = {(l["member"], l["format"], l["task"]): l["role"] for l in links if l["role"] != "baseline"}
    stored_tasks = list(dict.fromkeys(l["task"] for l in links))
    tasks = _run_tasks_under(policy, run, stored_tasks)
    members = list(dict.fromkeys([*(run.get("members") or []), *(l["member"] for l in links)]))
    members = [m for m in members if any(l["member"] == m for l in links)]
    formats = list(run.get("formats") or [])
    decision_rows, outcome_rows, missing = [], [], []
    for member in members:
        for fmt in formats:
            outcome = decide_outcome(evidence, run_id, member, fmt, tasks, policy, hints, role_of)
            for f, role, task, got in outcome.decisions:
                decision_rows.append({"member": member, "format": f, "role": role, "task": task,
                                      "verdict": got.decision.verdict, "reason": got.decision.reason,
                                      "numbers": got.numbers()})
            outcome_rows.append({"member": member, "format": fmt, "outcome": outcome.outcome,
                                 "shipped_format": outcome.shipped_format, "reasons": outcome.reasons})
            missing += [m for m in outcome.missing if m.needed]
    previous_outcomes = {(o["member"], o["format"]): o for o in store.outcomes(run_id)}
    batch = store.record_decisions(run_id, policy_hash=policy.hash, decisions_rows=decision_rows,
                                   outcomes_rows=outcome_rows)
    return RunRedecision(run_id, policy, batch, decision_rows, outcome_rows, previous, previous_outcomes, missing)


# ---- entry points for the command line ------------------------------------------------------------------

def open_review_store(db: str | None):
    """The results database to re-decide from, or None when there is none (a default SQLite path that
    does not exist: nothing is stored yet, and a review must not create a database as a side effect)."""
    from qgate.store import open_store, resolve_url

    url = resolve_url(db)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        if db or os.environ.get("QGATE_DB"):
            raise QgateError(f"--db {db or os.environ.get('QGATE_DB')}: no database there")
        return None
    return open_store(db)


def diff(old_spec: str, new_spec: str, db: str | None = None) -> PolicyReview:
    """``qgate policy diff``: load both policies (bad input raises before anything is read from the
    store), then review the change against the stored decisions."""
    new = load_policy_source(new_spec)
    old = load_policy_source(old_spec, check_tasks=False)  # the base was checked on its own branch
    store = open_review_store(db)
    try:
        return review(old, new, store)
    finally:
        if store is not None:
            store.close()


def redecide(run: str | int, policy_spec: str, db: str | None = None) -> RunRedecision:
    """``qgate policy redecide``: record a new decision set for a stored run under another policy."""
    from qgate.report.data import open_existing_store, resolve_run_id

    policy = load_policy_source(policy_spec)
    with open_existing_store(db) as store:
        return redecide_run(store, resolve_run_id(store, run), policy)

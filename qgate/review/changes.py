"""What a policy change says: the settings that differ, each as one line of words; a policy as a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from qgate.errors import QgateError
from qgate.evaluation.suite import load_suite
from qgate.policy import DEFAULT_RECIPE, Policy, TaskPolicy, recipe_text


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
        return {t.name: t for t in load_suite(policy.suite).tasks}
    except QgateError:
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
    return "[" + ", ".join(c.format + ("" if c.recipe == DEFAULT_RECIPE else f" ({recipe_text(c.recipe)})")
                           for c in choices) + "]"


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

    out += _model_changes(old, new)

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
                                                      else f" (recipe {recipe_text(new_formats[name].recipe)})")))
    for name in [f for f in old_formats if f not in new_formats]:
        out.append(Change(f"formats.{name}", old_formats[name].to_dict(), None, f"format removed: {name}"))
    for name in [f for f in new_formats if f in old_formats]:
        a, b = old_formats[name].recipe, new_formats[name].recipe
        if a != b:
            out.append(Change(f"formats.{name}.recipe", a, b,
                              f"format {name} recipe {recipe_text(a)} -> {recipe_text(b)}"))

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


def _model_changes(old: Policy, new: Policy) -> list[Change]:
    """Members whose weights come from somewhere else (the models: section), in words."""
    def where(m: dict) -> str:
        return f"{m['source']}: {m['location']}" + (f"@{m['revision']}" if m.get("revision") else "")

    a = {m["name"]: m for m in old.to_dict().get("models", [])}
    b = {m["name"]: m for m in new.to_dict().get("models", [])}
    out = []
    for name in [*a, *(n for n in b if n not in a)]:
        if a.get(name) == b.get(name):
            continue
        if name not in a:
            text = f"model added: {name} ({where(b[name])})"
        elif name not in b:
            text = f"model removed: {name}"
        elif where(a[name]) != where(b[name]):
            text = f"model {name}: {where(a[name])} -> {where(b[name])}"
        else:
            text = f"model {name}: record changed (aliases, description, sizes or hashes)"
        out.append(Change(f"models.{name}", a.get(name), b.get(name), text))
    return out


def _task_names(policy: Policy, suite: Mapping[str, Any] | None, extra: Iterable[str]) -> list[str]:
    """The tasks a policy decides: its suite's, then any it names that the suite does not list."""
    names = list(suite or {})
    for name in [*policy.tasks, *extra]:
        if name not in names:
            names.append(name)
    return names


def policy_table(policy: Policy, suite: Any = None) -> str:
    """The thresholds as a plain-text table (qgate policy show); with the suite, every task of it is listed
    with its primary metric and units."""
    specs = {t.name: t for t in getattr(suite, "tasks", [])}
    names = list(specs) or list(policy.tasks)
    names += [n for n in policy.tasks if n not in names]
    header = ("task", "metric", "allowed drop", "n", "detects drops of", "confidence", "inconclusive", "blocking")
    rows = [header]
    for name in names:
        tp = policy.task_policy(name)
        spec = specs.get(name)
        metric = tp.metric or (spec.metric if spec else "(primary)")
        unit = ""
        if spec is not None and metric == spec.metric:
            unit = " pts" if spec.per_sample == "binary" else (" (lower is better)" if not spec.higher_is_better else "")
        drop = (f"{tp.max_drop:g}{unit}" if tp.max_drop is not None else f"keep >= {tp.min_recovery:g} of baseline")
        n_text, detects = _resolution(spec, tp.confidence) if spec is not None else ("", "")
        rows.append((name + ("" if name in policy.tasks else " (defaults)"), metric, drop, n_text, detects,
                     f"{tp.confidence:g}", tp.inconclusive, "yes" if tp.blocking else "advisory"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"policy {policy.family}  ({policy.path})  hash {policy.hash[:12]}",
        f"members:  {', '.join(m.name for m in policy.members) or '-'}",
        f"suite:    {suite.name if suite is not None else policy.suite}",
        f"formats:  {', '.join(f'{c.format} ({c.recipe_text})' for c in policy.formats) or '-'}",
        f"fallback: {' -> '.join(c.format for c in policy.fallback) or 'none'}",
        "",
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    if suite is not None:
        lines += ["", "detects drops of: the smallest drop that n paired samples can call significant at the task's",
                  "confidence (exact McNemar), if every changed sample is lost / if 10% of samples change either",
                  "way (quantized models typically change 3-12%); a fail also needs the drop beyond the allowed",
                  "one. Continuous metrics are bootstrapped over documents: their resolution depends on the data."]
    return "\n".join(lines)


def _resolution(spec: Any, confidence: float) -> tuple[str, str]:
    """(n, "detects drops of" text) for a suite task: how finely its sample count can decide."""
    from qgate.evaluation.data import planned_samples
    from qgate.stats import detectable_drop

    try:
        n, exact = planned_samples(spec.source if spec.offline else None, spec.data_params, spec.limit)
    except QgateError:
        return "?", ""
    if not n:
        return "all", ""
    n_text = f"{n}" if exact else f"<= {n}"
    if spec.per_sample != "binary":
        return n_text, "(bootstrap)"
    floor, churned = detectable_drop(n, confidence), detectable_drop(n, confidence, churn=0.10)
    if floor is None:
        return n_text, "none"
    return n_text, f"{100 * floor:.1f} / {100 * churned:.1f} pts" if churned else f"{100 * floor:.1f} pts"

"""Policy files: what a family must keep to ship a quantized checkpoint, and task decisions under them.

A policy is YAML, one file per family (``policies/<family>.yaml``), read on top of
``policies/default.yaml``: every key a family file leaves out comes from the default file
(mappings merge key by key, lists are replaced). A family that qgate knows (``qgate.models``) but
that has no file of its own runs under the default file alone, on its default member.

Validation names the file, the line, the key path and the problem in one line, and raises
``QgateError`` (exit 2). ``decide_task`` is pure: paired samples in, a ``Decision`` out, so stored
runs can be decided again under another policy without any model.

Decision rule (``delta`` = candidate - baseline, oriented so that a drop is bad; ``allowed`` is
the allowed drop from ``max_drop`` or ``min_recovery``; the CI is two-sided at ``confidence``):
  pass          the whole CI lies within the allowed drop (non-inferiority shown);
  fail          the point estimate is beyond the allowed drop AND the drop is significant
                (the CI excludes zero);
  inconclusive  otherwise: the samples cannot tell. ``samples_needed`` estimates how many would.
What an inconclusive task does to the gate is the policy's ``inconclusive``: pass, fail or warn
(passes, flagged). A task with ``blocking: false`` is advisory: reported, never failing the gate.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from qgate import stats
from qgate.errors import QgateError

VERDICTS = ("pass", "fail", "inconclusive")
INCONCLUSIVE_MEANS = ("pass", "fail", "warn")

TOP_KEYS = ("family", "description", "members", "suite", "formats", "fallback", "defaults", "tasks")
MEMBER_KEYS = ("name", "model", "revision")
FORMAT_KEYS = ("recipe",)
FALLBACK_KEYS = ("format", "recipe")
TASK_KEYS = ("metric", "max_drop", "min_recovery", "confidence", "inconclusive", "blocking")
DEFAULT_RECIPE = "uniform"
DEFAULT_FALLBACK = ("fp8",)


# ---- the policy model ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskPolicy:
    task: str
    metric: str | None = None  # None: the task's primary metric
    max_drop: float | None = None  # absolute: points for pass/fail metrics, metric units otherwise
    min_recovery: float | None = None  # relative: candidate keeps at least this share of the baseline
    confidence: float = 0.95
    inconclusive: str = "warn"
    blocking: bool = True

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "max_drop": self.max_drop,
                "min_recovery": self.min_recovery, "confidence": self.confidence,
                "inconclusive": self.inconclusive, "blocking": self.blocking}


@dataclass(frozen=True)
class MemberPolicy:
    name: str
    model: str | None = None  # a local directory or .gguf file instead of the registered checkpoint
    revision: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "revision": self.revision}


@dataclass(frozen=True)
class FormatChoice:
    format: str
    recipe: Any = DEFAULT_RECIPE  # a built-in recipe name or inline rules (a list)

    def to_dict(self) -> dict:
        return {"format": self.format, "recipe": self.recipe}


@dataclass(frozen=True)
class Policy:
    family: str
    members: tuple[MemberPolicy, ...]
    suite: str
    formats: tuple[FormatChoice, ...]
    fallback: tuple[FormatChoice, ...]
    defaults: TaskPolicy
    tasks: Mapping[str, TaskPolicy]
    path: str  # the family file, or the default file when the family has none
    text: str  # the family file's text as written (what a reviewer reads)
    hash: str  # sha256 of the effective policy (defaults merged in)
    description: str = ""
    sources: tuple[str, ...] = field(default=())

    def task_policy(self, task: str) -> TaskPolicy:
        """The task's own entry, or the defaults applied to it."""
        return self.tasks.get(task) or replace(self.defaults, task=task)

    def format_choice(self, fmt: str) -> FormatChoice:
        """How to quantize ``fmt``: as the policy lists it (candidates, then fallbacks), else the default recipe."""
        for choice in (*self.formats, *self.fallback):
            if choice.format == fmt:
                return choice
        return FormatChoice(fmt, DEFAULT_RECIPE)

    def to_dict(self) -> dict:
        return {"family": self.family, "description": self.description,
                "members": [m.to_dict() for m in self.members], "suite": self.suite,
                "formats": [f.to_dict() for f in self.formats], "fallback": [f.to_dict() for f in self.fallback],
                "defaults": self.defaults.to_dict(), "tasks": {k: v.to_dict() for k, v in self.tasks.items()}}


# ---- finding files ------------------------------------------------------------------------------

def policy_dirs() -> list[Path]:
    """Where family policies are looked up: $QGATE_POLICIES, ./policies, then the policies/ next to qgate."""
    dirs = []
    if os.environ.get("QGATE_POLICIES"):
        dirs.append(Path(os.environ["QGATE_POLICIES"]))
    dirs.append(Path.cwd() / "policies")
    dirs.append(Path(__file__).resolve().parent.parent / "policies")
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _find_in_dirs(name: str) -> Path | None:
    for d in policy_dirs():
        p = d / name
        if p.is_file():
            return p
    return None


def known_policy_families() -> list[str]:
    names = set()
    for d in policy_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml") if p.stem != "default")
    return sorted(names)


# ---- YAML with line numbers ---------------------------------------------------------------------

class _Doc:
    """Parsed YAML plus the line of every key path, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.text = text
        self.lines: dict[tuple, int] = {}
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                self.data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise QgateError(f"{path}{where}: not valid YAML: {problem}") from None
        if node is not None:
            self._walk(node, ())

    def _walk(self, node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self._walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, path + (i,))

    def error(self, path: tuple, problem: str) -> QgateError:
        line = None
        probe = path
        while line is None and probe is not None:
            line = self.lines.get(probe)
            probe = probe[:-1] if probe else None
        where = f"{self.path}:{line}" if line else str(self.path)
        key = _key_path(path)
        return QgateError(f"{where}: {key + ': ' if key else ''}{problem}")


def _key_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- loading ------------------------------------------------------------------------------------

def load_policy(path_or_family: str | os.PathLike, *, check_tasks: bool = True) -> Policy:
    """Load and validate a policy: a YAML file path, or a family name (policies/<family>.yaml)."""
    target = str(path_or_family)
    as_path = Path(target).expanduser()
    default_path = _find_in_dirs("default.yaml")
    default_doc = _Doc(default_path, default_path.read_text()) if default_path else None

    if as_path.suffix in (".yaml", ".yml") or os.sep in target or as_path.is_file():
        if not as_path.is_file():
            raise QgateError(f"policy file {as_path} does not exist")
        doc = _Doc(as_path, as_path.read_text())
        if default_path is not None and as_path.resolve() == default_path.resolve():
            default_doc = None
        family_from = None
    else:
        family_from = target
        found = _find_in_dirs(f"{target}.yaml")
        if found is not None:
            doc = _Doc(found, found.read_text())
        else:
            # no file of its own: a family qgate knows runs under the default policy
            _require_known_family(target)
            if default_doc is None:
                raise QgateError(f"no policy for family {target!r}: neither policies/{target}.yaml nor "
                                 f"policies/default.yaml was found (looked in {', '.join(map(str, policy_dirs()))})")
            doc, default_doc = default_doc, None
    return _build(doc, default_doc, family_from, check_tasks=check_tasks)


def _require_known_family(family: str) -> None:
    from qgate.models import get_family, list_families

    try:
        get_family(family)
    except QgateError:
        known = sorted(set(list_families()) | set(known_policy_families()))
        raise QgateError(f"unknown family {family!r}: no policies/{family}.yaml and no such model family"
                         f"{_did_you_mean(family, known)}; known families: {', '.join(known)}") from None


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _build(doc: _Doc, default_doc: _Doc | None, family_from: str | None, *, check_tasks: bool) -> Policy:
    for d in (default_doc, doc):
        if d is not None and d.data is not None and not isinstance(d.data, dict):
            raise d.error((), "expected a mapping of policy keys at the top level")
        if d is not None:
            _check_keys(d, (), d.data or {}, TOP_KEYS)
    own = doc.data or {}
    data = _merge(default_doc.data or {}, own) if default_doc is not None else dict(own)

    def origin(path: tuple) -> _Doc:
        """The file a merged key came from, for error messages."""
        node: Any = own
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                return default_doc or doc
        return doc

    family = data.get("family") if "family" in own or family_from is None else family_from
    if family_from is not None and "family" in own and own["family"] != family_from:
        raise doc.error(("family",), f"says {own['family']!r} but the file was loaded for family {family_from!r}")
    is_default_file = family_from is None and doc.path.name == "default.yaml" and "family" not in own
    if is_default_file:
        family = "default"  # checking the default file itself: it serves every family
    if not family or not isinstance(family, str):
        raise doc.error(("family",), "missing: name the model family this policy is for (e.g. family: smollm2)")

    members = () if is_default_file and data.get("members") is None else _members(data.get("members"), family, origin)
    suite = data.get("suite", "smoke")
    if not isinstance(suite, str) or not suite:
        raise origin(("suite",)).error(("suite",), f"expected a suite name, got {suite!r}")
    formats = _format_choices(data.get("formats") or {}, ("formats",), origin)
    fallback = _fallback(data.get("fallback", list(DEFAULT_FALLBACK)), origin)
    defaults = _task_policy("*", data.get("defaults") or {}, ("defaults",), origin,
                            TaskPolicy(task="*", max_drop=1.0), require_threshold=True)
    tasks_raw = data.get("tasks") or {}
    if not isinstance(tasks_raw, dict):
        raise origin(("tasks",)).error(("tasks",), "expected a mapping of task name -> thresholds")
    tasks = {}
    for name, entry in tasks_raw.items():
        tasks[str(name)] = _task_policy(str(name), entry if entry is not None else {}, ("tasks", name), origin,
                                        replace(defaults, task=str(name)), require_threshold=False)
    if check_tasks:
        _check_tasks_in_suite(suite, tasks, origin)

    from qgate.store import content_hash

    policy = Policy(family=family, members=members, suite=suite, formats=formats, fallback=fallback,
                    defaults=defaults, tasks=tasks, path=str(doc.path), text=doc.text, hash="",
                    description=str(data.get("description") or ""),
                    sources=tuple(str(d.path) for d in (default_doc, doc) if d is not None))
    return replace(policy, hash=content_hash(policy.to_dict()))


def _check_keys(doc: _Doc, path: tuple, mapping: Any, allowed: Sequence[str]) -> None:
    if not isinstance(mapping, dict):
        return
    for key in mapping:
        if key not in allowed:
            raise doc.error(path + (key,), f"unknown key{_did_you_mean(key, allowed)}; "
                                           f"expected one of: {', '.join(allowed)}")


def _members(raw: Any, family: str, origin) -> tuple[MemberPolicy, ...]:
    path = ("members",)
    if raw is None:
        from qgate.models import get_family

        return (MemberPolicy(get_family(family).default_member),)
    if not isinstance(raw, list) or not raw:
        raise origin(path).error(path, "expected a non-empty list of members (names or {name, model, revision})")
    out = []
    for i, item in enumerate(raw):
        doc = origin(path + (i,))
        if isinstance(item, str):
            out.append(MemberPolicy(item))
            continue
        if not isinstance(item, dict):
            raise doc.error(path + (i,), f"expected a member name or a mapping, got {item!r}")
        _check_keys(doc, path + (i,), item, MEMBER_KEYS)
        if not isinstance(item.get("name"), str):
            raise doc.error(path + (i,), "a member needs a name")
        out.append(MemberPolicy(item["name"], _opt_str(item.get("model")), _opt_str(item.get("revision"))))
    names = [m.name for m in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise origin(path).error(path, f"member {sorted(dupes)[0]!r} is listed twice")
    return tuple(out)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _valid_format(name: Any, doc: _Doc, path: tuple) -> str:
    from qgate.formats import get_format, list_formats

    try:
        return get_format(str(name)).name
    except QgateError:
        names = [f.name for f in list_formats()]
        raise doc.error(path, f"unknown format {name!r}{_did_you_mean(name, names)}; "
                              f"expected one of: {', '.join(names)}") from None


def _recipe(value: Any, doc: _Doc, path: tuple) -> Any:
    """A built-in recipe name, a recipe .yaml file (relative to the policy file), a mapping
    {name, rules} or a bare list of rules; checked by qgate.quantize.load_recipe."""
    if value is None:
        return DEFAULT_RECIPE
    if isinstance(value, list):
        value = {"name": "inline", "rules": value}
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        file = Path(value).expanduser()
        value = str(file if file.is_absolute() else (doc.path.parent / file).resolve())
    if not isinstance(value, (str, dict)):
        raise doc.error(path, f"expected a recipe name, a .yaml file or a list of rules, got {value!r}")
    try:
        from qgate.quantize import load_recipe
    except ImportError:
        return value
    try:
        load_recipe(value)
    except QgateError as exc:
        known = _builtin_recipes() or []
        hint = _did_you_mean(value, known) if isinstance(value, str) else ""
        raise doc.error(path, f"{exc}{hint}") from None
    return value


def _builtin_recipes() -> list[str] | None:
    try:
        from qgate.quantize import list_recipes
    except ImportError:
        return None
    return list_recipes()


def _format_choices(raw: Any, path: tuple, origin) -> tuple[FormatChoice, ...]:
    """formats: {nvfp4: {recipe: uniform}} or {nvfp4: uniform} or [nvfp4, mxfp4]."""
    doc = origin(path)
    if isinstance(raw, list):
        raw = {name: None for name in raw}
    if not isinstance(raw, dict):
        raise doc.error(path, "expected a mapping of format name -> {recipe: ...}")
    out = []
    for name, entry in raw.items():
        p = path + (name,)
        d = origin(p)
        fmt = _valid_format(name, d, p)
        if isinstance(entry, dict):
            _check_keys(d, p, entry, FORMAT_KEYS)
            recipe = _recipe(entry.get("recipe"), d, p + ("recipe",))
        else:
            recipe = _recipe(entry, d, p)
        out.append(FormatChoice(fmt, recipe))
    return tuple(out)


def _fallback(raw: Any, origin) -> tuple[FormatChoice, ...]:
    """fallback: [fp8] or [{format: fp8, recipe: uniform}]; [] means no fallback."""
    path = ("fallback",)
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise origin(path).error(path, f"expected a list of formats (e.g. [fp8]), got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        p = path + (i,)
        d = origin(p)
        if isinstance(item, dict):
            _check_keys(d, p, item, FALLBACK_KEYS)
            if "format" not in item:
                raise d.error(p, "a fallback entry needs a format")
            out.append(FormatChoice(_valid_format(item["format"], d, p + ("format",)),
                                    _recipe(item.get("recipe"), d, p + ("recipe",))))
        else:
            out.append(FormatChoice(_valid_format(item, d, p), DEFAULT_RECIPE))
    return tuple(out)


def _number(value: Any, doc: _Doc, path: tuple, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise doc.error(path, f"expected {what}, got {value!r}")
    return float(value)


def _task_policy(task: str, raw: Any, path: tuple, origin, base: TaskPolicy, *,
                 require_threshold: bool) -> TaskPolicy:
    doc = origin(path)
    if not isinstance(raw, dict):
        raise doc.error(path, f"expected a mapping of {', '.join(TASK_KEYS)}, got {raw!r}")
    _check_keys(doc, path, raw, TASK_KEYS)
    values: dict[str, Any] = {}
    if "metric" in raw:
        if not isinstance(raw["metric"], str) or not raw["metric"]:
            raise origin(path + ("metric",)).error(path + ("metric",), f"expected a metric name, got {raw['metric']!r}")
        values["metric"] = raw["metric"]
    if "max_drop" in raw and "min_recovery" in raw:
        raise doc.error(path + ("min_recovery",), "give either max_drop (absolute) or min_recovery (relative), not both")
    if "max_drop" in raw:
        p = path + ("max_drop",)
        v = _number(raw["max_drop"], origin(p), p, "an allowed drop >= 0 (points, or metric units)")
        if v < 0:
            raise origin(p).error(p, f"negative threshold {v:g}; max_drop is the allowed drop, >= 0")
        values["max_drop"], values["min_recovery"] = v, None
    if "min_recovery" in raw:
        p = path + ("min_recovery",)
        v = _number(raw["min_recovery"], origin(p), p, "a share of the baseline in (0, 1], e.g. 0.99")
        if not 0 < v <= 1:
            raise origin(p).error(p, f"min_recovery {v:g} out of range; expected a share in (0, 1], e.g. 0.99")
        values["min_recovery"], values["max_drop"] = v, None
    if "confidence" in raw:
        p = path + ("confidence",)
        v = _number(raw["confidence"], origin(p), p, "a confidence level in (0, 1), e.g. 0.95")
        if not 0.5 <= v < 1:
            raise origin(p).error(p, f"confidence {v:g} out of range; expected a level in [0.5, 1), e.g. 0.95")
        values["confidence"] = v
    if "inconclusive" in raw:
        p = path + ("inconclusive",)
        v = raw["inconclusive"]
        if v not in INCONCLUSIVE_MEANS:
            raise origin(p).error(p, f"expected one of {', '.join(INCONCLUSIVE_MEANS)}, got {v!r}"
                                     f"{_did_you_mean(v, INCONCLUSIVE_MEANS)}")
        values["inconclusive"] = v
    if "blocking" in raw:
        p = path + ("blocking",)
        if not isinstance(raw["blocking"], bool):
            raise origin(p).error(p, f"expected true or false, got {raw['blocking']!r}")
        values["blocking"] = raw["blocking"]
    result = replace(base, task=task, **values)
    if require_threshold and result.max_drop is None and result.min_recovery is None:
        raise doc.error(path, "needs max_drop or min_recovery")
    return result


def _check_tasks_in_suite(suite: str, tasks: Mapping[str, TaskPolicy], origin) -> None:
    """Every task the policy names must be in its suite."""
    if not tasks:
        return
    try:
        from qgate.evaluation import load_suite
    except ImportError:
        return  # the evaluation package is not importable here: nothing to check against
    try:
        suite_obj = load_suite(suite)
    except QgateError as exc:
        raise origin(("suite",)).error(("suite",), str(exc)) from None
    names = suite_task_names(suite_obj)
    for name in tasks:
        if name not in names:
            raise origin(("tasks", name)).error(("tasks", name), f"unknown task: suite {suite!r} has no task {name!r}"
                                                               f"{_did_you_mean(name, names)}; it has: "
                                                               f"{', '.join(names)}")


def suite_task_names(suite_obj: Any) -> list[str]:
    out = []
    for t in getattr(suite_obj, "tasks", []):
        out.append(t if isinstance(t, str) else getattr(t, "name", None) or getattr(t, "task", None) or str(t))
    return out


# ---- decisions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """One task's verdict. delta, ci_low, ci_high, threshold are in the task's units: percentage
    points for pass/fail metrics, metric units otherwise; delta = candidate - baseline."""

    task: str
    metric: str
    verdict: str  # pass | fail | inconclusive
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n: int
    threshold: float | None  # the signed delta at which the task fails (e.g. -1.0, or +0.5 for perplexity)
    reason: str
    samples_needed: int | None
    baseline: float | None = None
    candidate: float | None = None
    confidence: float = 0.95
    higher_is_better: bool = True
    binary: bool = True
    unit: str = "pts"
    method: str = ""
    discordant: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def gate_effect(decision: Decision, task_policy: TaskPolicy) -> str:
    """What a decision does to the gate: "pass", "warn" (passes, flagged) or "fail".

    Advisory tasks (blocking: false) never give "fail": a failing advisory task is a "warn".
    """
    if decision.verdict == "pass":
        effect = "pass"
    elif decision.verdict == "fail":
        effect = "fail"
    else:
        effect = task_policy.inconclusive
    if effect == "fail" and not task_policy.blocking:
        return "warn"
    return effect


# corpus-level metrics: re-aggregated from per-document (loglikelihood, count) rather than averaged
CORPUS_WEIGHTS = {"word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}


def _score_value(scores: Mapping[str, Any], metric: str) -> Any:
    weight = CORPUS_WEIGHTS.get(metric)
    if weight and "loglikelihood" in scores and scores.get(weight):
        return (float(scores["loglikelihood"]), float(scores[weight]))
    if metric not in scores:
        raise KeyError(metric)
    return scores[metric]


def _aggregate_for(metric: str, pair: bool):
    name = metric.lower()
    if pair:
        if "bits_per_byte" in name or name == "bpb":
            return stats.bits_per_byte_aggregate
        if "perplexity" in name or name == "ppl":
            return stats.perplexity_aggregate
        return lambda v, w: (v * w).sum(axis=-1) / w.sum(axis=-1)  # weighted mean
    if name == "perplexity":
        return stats.mean_exp_aggregate  # per-sample loglikelihoods, as lm-eval aggregates them
    return stats.mean_aggregate


def is_binary(values: Sequence[Any]) -> bool:
    """Every value is a pass/fail outcome (0/1 or a bool)."""
    return bool(values) and all(isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1))
                                for v in values)


def _pair_samples(baseline: Sequence[Mapping], candidate: Sequence[Mapping], metric: str):
    """Match samples by doc_id (and doc_hash where both have one); returns (pairs, skipped note)."""
    cand_by_id = {str(s["doc_id"]): s for s in candidate}
    pairs, mismatched, missing = [], 0, 0
    for s in baseline:
        c = cand_by_id.get(str(s["doc_id"]))
        if c is None:
            missing += 1
            continue
        if s.get("doc_hash") and c.get("doc_hash") and s["doc_hash"] != c["doc_hash"]:
            mismatched += 1
            continue
        try:
            pairs.append((_score_value(s.get("scores") or {}, metric), _score_value(c.get("scores") or {}, metric)))
        except KeyError:
            missing += 1
    note = []
    if mismatched:
        note.append(f"{mismatched} samples differ between baseline and candidate (doc_hash) and were left out")
    if missing:
        note.append(f"{missing} samples without a pair (or without {metric}) were left out")
    return pairs, "; ".join(note)


def _fmt(x: float, unit: str, signed: bool = True) -> str:
    digits = 1 if unit == "pts" else (3 if abs(x) < 10 else 2)
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return text


def decide_task(baseline_samples: Sequence[Mapping], candidate_samples: Sequence[Mapping],
                task_policy: TaskPolicy, higher_is_better: bool = True, binary: bool | None = None, *,
                metric: str | None = None) -> Decision:
    """Decide one task from paired per-sample scores (pure: no I/O, no model).

    Samples are dicts with doc_id, optional doc_hash, and scores {metric: value}; a value is a
    number, a bool, or a [loglikelihood, weight] pair for corpus metrics such as perplexity.
    ``binary`` None: detected from the values. ``metric`` overrides the policy's metric.
    """
    metric = metric or task_policy.metric
    if not metric:
        raise ValueError(f"{task_policy.task}: no metric given and the policy names none")
    task = task_policy.task
    pairs, note = _pair_samples(baseline_samples, candidate_samples, metric)
    conf = task_policy.confidence
    if not pairs:
        reason = f"{task}: no paired samples for {metric}" + (f" ({note})" if note else "") + ": inconclusive"
        return Decision(task=task, metric=metric, verdict="inconclusive", delta=None, ci_low=None, ci_high=None,
                        p_value=None, n=0, threshold=None, reason=reason, samples_needed=None, confidence=conf,
                        higher_is_better=higher_is_better, binary=bool(binary), unit="")

    base_vals = [p[0] for p in pairs]
    cand_vals = [p[1] for p in pairs]
    pair_valued = isinstance(base_vals[0], (list, tuple))
    if binary is None:
        binary = not pair_valued and is_binary(base_vals + cand_vals)

    if binary:
        cmp = stats.compare_binary([float(v) for v in base_vals], [float(v) for v in cand_vals], conf)
        scale, unit, method = 100.0, "pts", "exact McNemar; Newcombe hybrid score CI"
    else:
        if pair_valued:
            kwargs = dict(baseline_weights=[float(v[1]) for v in base_vals],
                          candidate_weights=[float(v[1]) for v in cand_vals],
                          aggregate=_aggregate_for(metric, True))
            b, c = [float(v[0]) for v in base_vals], [float(v[0]) for v in cand_vals]
        else:
            kwargs = dict(aggregate=_aggregate_for(metric, False))
            b, c = [float(v) for v in base_vals], [float(v) for v in cand_vals]
        cmp = stats.compare_bootstrap(b, c, conf, **kwargs)
        scale, unit, method = 1.0, "", f"paired bootstrap over documents ({stats.BOOTSTRAP_RESAMPLES} resamples)"

    delta, low, high = cmp.delta * scale, cmp.ci_low * scale, cmp.ci_high * scale
    base_value = cmp.baseline * scale
    sign = 1.0 if higher_is_better else -1.0
    # allowed drop in the task's units
    if task_policy.min_recovery is not None:
        r = task_policy.min_recovery
        allowed = (1 - r) * abs(base_value) if higher_is_better else abs(base_value) * (1 / r - 1)
        allowed_text = f"recovery >= {r:g} (allowed {_fmt(-sign * allowed, unit)})"
    else:
        allowed = float(task_policy.max_drop if task_policy.max_drop is not None else 0.0)
        allowed_text = f"allowed {_fmt(-sign * allowed, unit)}"
    threshold = -sign * allowed

    # orient so that "good" is positive: o_delta >= -allowed passes
    o_delta, o_low, o_high = (delta, low, high) if higher_is_better else (-delta, -high, -low)
    if o_low >= -allowed:
        verdict = "pass"
    elif o_delta < -allowed and o_high < 0:
        verdict = "fail"
    else:
        verdict = "inconclusive"

    needed = stats.samples_to_decide(o_delta / scale, -allowed / scale, cmp.sd_pair, cmp.n, conf)
    unit_text = f" {unit}" if unit else ""
    values = f" ({_fmt(base_value, unit, False)} -> {_fmt(cmp.candidate * scale, unit, False)})" if not binary else ""
    reason = (f"{task}: {_fmt(delta, unit)}{unit_text}{values}, {conf * 100:g}% CI "
              f"[{_fmt(low, unit)}, {_fmt(high, unit)}], {allowed_text}, n={cmp.n}: {verdict}")
    if verdict == "inconclusive" and needed is not None:
        reason += f" (about {needed} samples would decide)"
    if note:
        reason += f"; {note}"
    return Decision(task=task, metric=metric, verdict=verdict, delta=delta, ci_low=low, ci_high=high,
                    p_value=cmp.p_value, n=cmp.n, threshold=threshold, reason=reason, samples_needed=needed,
                    baseline=base_value, candidate=cmp.candidate * scale, confidence=conf,
                    higher_is_better=higher_is_better, binary=bool(binary), unit=unit, method=method,
                    discordant=cmp.discordant)


# ---- presentation for policy reviews -------------------------------------------------------------

def policy_table(policy: Policy, suite: Any = None) -> str:
    """The thresholds as a plain-text table (qgate policy show); with the suite, every task of it is listed
    with its primary metric and units."""
    specs = {t.name: t for t in getattr(suite, "tasks", [])}
    names = list(specs) or list(policy.tasks)
    names += [n for n in policy.tasks if n not in names]
    header = ("task", "metric", "allowed drop", "confidence", "inconclusive", "blocking")
    rows = [header]
    for name in names:
        tp = policy.task_policy(name)
        spec = specs.get(name)
        metric = tp.metric or (spec.metric if spec else "(primary)")
        unit = ""
        if spec is not None and metric == spec.metric:
            unit = " pts" if spec.per_sample == "binary" else (" (lower is better)" if not spec.higher_is_better else "")
        drop = (f"{tp.max_drop:g}{unit}" if tp.max_drop is not None else f"keep >= {tp.min_recovery:g} of baseline")
        rows.append((name + ("" if name in policy.tasks else " (defaults)"), metric, drop,
                     f"{tp.confidence:g}", tp.inconclusive, "yes" if tp.blocking else "advisory"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"policy {policy.family}  ({policy.path})  hash {policy.hash[:12]}",
        f"members:  {', '.join(m.name for m in policy.members) or '-'}",
        f"suite:    {policy.suite}",
        f"formats:  {', '.join(f'{c.format} ({_recipe_text(c.recipe)})' for c in policy.formats) or '-'}",
        f"fallback: {' -> '.join(c.format for c in policy.fallback) or 'none'}",
        "",
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _recipe_text(recipe: Any) -> str:
    if isinstance(recipe, dict):
        return f"{recipe.get('name', 'inline')}: {len(recipe.get('rules') or [])} rules"
    return recipe if isinstance(recipe, str) else f"{len(recipe)} inline rules"

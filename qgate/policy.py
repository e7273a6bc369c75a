"""Policy files: the schema of what a family must keep to ship a quantized checkpoint, and its validation.

A policy is YAML, one file per family (``policies/<family>.yaml``), read on top of
``policies/default.yaml``: every key a family file leaves out comes from the default file
(mappings merge key by key, lists are replaced). The family file's ``models:`` says where each
member's weights come from (parsed by ``qgate.families``, the same function for ``qgate policy check``
and ``qgate run``); a file without it takes the models of the family it names. A family registered in
code that has no file of its own runs under the default file alone, on its default member.

Validation names the file, the line, the key path and the problem in one line (qgate.validation),
and raises ``QgateError`` (exit 2). What the thresholds mean is the decision engine's (qgate.decide).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from qgate.canonical import content_hash
from qgate.checkpoints import CheckpointCandidate, check_name
from qgate.errors import QgateError
from qgate import datadirs
from qgate.families import Family, Member, get_family, list_families, parse_models, registered
from qgate.formats import get_format, list_formats
from qgate.recipes import load_recipe
from qgate.validation import YamlDoc, did_you_mean

VERDICTS = ("pass", "fail", "inconclusive")
INCONCLUSIVE_MEANS = ("pass", "fail", "warn")

TOP_KEYS = ("family", "description", "models", "members", "suite", "formats", "fallback", "defaults", "tasks",
            "checkpoints")
CHECKPOINT_KEYS = ("path", "member", "revision")
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

    @property
    def recipe_text(self) -> str:
        """The recipe in words: its name, or "<name>: N rules" for one given inline."""
        return recipe_text(self.recipe)


def recipe_text(recipe: Any) -> str:
    if isinstance(recipe, dict):
        return f"{recipe.get('name', 'inline')}: {len(recipe.get('rules') or [])} rules"
    if isinstance(recipe, (list, tuple)):
        return f"inline: {len(recipe)} rules"
    return str(recipe)


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
    models: Family | None = None  # the family's members and where their weights come from
    checkpoints: tuple[CheckpointCandidate, ...] = ()  # quantized checkpoints gated as candidates


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
        models = {} if self.models is None else {"models": [_member_dict(m) for m in self.models.members]}
        return {"family": self.family, "description": self.description, **models,
                "members": [m.to_dict() for m in self.members], "suite": self.suite,
                "formats": [f.to_dict() for f in self.formats], "fallback": [f.to_dict() for f in self.fallback],
                "defaults": self.defaults.to_dict(), "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
                **({"checkpoints": [c.to_dict() for c in self.checkpoints]} if self.checkpoints else {})}


# ---- finding files ------------------------------------------------------------------------------

def _member_dict(m: Member) -> dict:
    out = {"name": m.name, "source": m.source, "location": m.location}
    for key in ("revision", "size", "sha256", "description"):
        if getattr(m, key):
            out[key] = getattr(m, key)
    if m.aliases:
        out["aliases"] = list(m.aliases)
    if m.parts:
        out["parts"] = [dict(package=p.package, version=p.version, module=p.module, file=p.file, size=p.size,
                             sha256=p.sha256) for p in m.parts]
    return out


def policy_dirs() -> list[Path]:
    """Where family policies are looked up: $QGATE_POLICIES, ./policies, then the ones shipped with qgate."""
    return datadirs.search_dirs("policies")


def _find_in_dirs(name: str) -> Path | None:
    return datadirs.find("policies", name)


def known_policy_families() -> list[str]:
    return [name for name in datadirs.names("policies") if name != "default"]


# ---- loading ------------------------------------------------------------------------------------

# suite name -> its task names (raises QgateError for an unknown suite)
SuiteTasks = Callable[[str], list[str]]


def load_policy(path_or_family: str | os.PathLike, *, suite_tasks: SuiteTasks | None = None,
                need_models: bool = True) -> Policy:
    """Load and validate a policy: a YAML file path, or a family name (policies/<family>.yaml).

    suite_tasks: when given, every task the policy names must be a task of its suite.
    need_models: False when the checkpoint comes from elsewhere (``qgate run --model``): a policy for a
    family that no file defines then serves for its thresholds alone."""
    target = str(path_or_family)
    as_path = Path(target).expanduser()
    default_path = _find_in_dirs("default.yaml")
    default_doc = YamlDoc.read(default_path) if default_path else None

    if as_path.suffix in (".yaml", ".yml") or os.sep in target or as_path.is_file():
        if not as_path.is_file():
            raise QgateError(f"policy file {as_path} does not exist")
        doc = YamlDoc.read(as_path)
        if default_path is not None and as_path.resolve() == default_path.resolve():
            default_doc = None
        family_from = None
    else:
        family_from = target
        found = _find_in_dirs(f"{target}.yaml")
        if found is not None:
            doc = YamlDoc.read(found)
        else:
            # no file of its own: a family qgate knows runs under the default policy
            _require_known_family(target)
            if default_doc is None:
                raise QgateError(f"no policy for family {target!r}: neither policies/{target}.yaml nor "
                                 f"policies/default.yaml was found (looked in {', '.join(map(str, policy_dirs()))})")
            doc, default_doc = default_doc, None
    return _build(doc, default_doc, family_from, suite_tasks=suite_tasks, need_models=need_models)


def _require_known_family(family: str) -> None:
    if registered(family) is None:
        known = sorted(set(list_families()) | set(known_policy_families()))
        raise QgateError(f"unknown family {family!r}: no policies/{family}.yaml and no such model family"
                         f"{did_you_mean(family, known)}; known families: {', '.join(known)}") from None


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _build(doc: YamlDoc, default_doc: YamlDoc | None, family_from: str | None, *,
           suite_tasks: SuiteTasks | None, need_models: bool = True) -> Policy:
    for d in (default_doc, doc):
        if d is not None and d.data is not None and not isinstance(d.data, dict):
            raise d.error((), "expected a mapping of policy keys at the top level")
        if d is not None:
            d.check_keys((), d.data or {}, TOP_KEYS)
    own = doc.data or {}
    data = _merge(default_doc.data or {}, own) if default_doc is not None else dict(own)

    def origin(path: tuple) -> YamlDoc:
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

    if default_doc is not None and isinstance(default_doc.data, dict) and "models" in default_doc.data:
        raise default_doc.error(("models",), "models belong in a family's own file, not in the default policy")
    models = None if is_default_file else _models(doc, own, family, need_models)
    members = () if is_default_file and data.get("members") is None else _members(data.get("members"), models, origin)
    suite = data.get("suite", "smoke")
    if not isinstance(suite, str) or not suite:
        raise origin(("suite",)).error(("suite",), f"expected a suite name, got {suite!r}")
    formats = _format_choices(data.get("formats") or {}, ("formats",), origin)
    fallback = _fallback(data.get("fallback", list(DEFAULT_FALLBACK)), origin)
    _check_fallback_chain(fallback, formats, origin)
    defaults = _task_policy("*", data.get("defaults") or {}, ("defaults",), origin,
                            TaskPolicy(task="*", max_drop=1.0), require_threshold=True)
    tasks_raw = data.get("tasks") or {}
    if not isinstance(tasks_raw, dict):
        raise origin(("tasks",)).error(("tasks",), "expected a mapping of task name -> thresholds")
    tasks = {}
    for name, entry in tasks_raw.items():
        tasks[str(name)] = _task_policy(str(name), entry if entry is not None else {}, ("tasks", name), origin,
                                        replace(defaults, task=str(name)), require_threshold=False)
    if suite_tasks is not None:
        _check_tasks_in_suite(suite, tasks, origin, suite_tasks)

    checkpoints = _checkpoints(data.get("checkpoints"), origin)
    policy = Policy(family=family, members=members, suite=suite, formats=formats, fallback=fallback,
                    defaults=defaults, tasks=tasks, path=str(doc.path), text=doc.text, hash="", checkpoints=checkpoints,
                    description=str(data.get("description") or ""),
                    sources=tuple(str(d.path) for d in (default_doc, doc) if d is not None), models=models)
    return replace(policy, hash=content_hash(policy.to_dict()))


def _models(doc: YamlDoc, own: dict, family: str, need_models: bool) -> Family | None:
    """The family's members and their sources: this file's ``models:``, else those of the family it names."""
    description = " ".join(str(own.get("description") or "").split())
    if own.get("models") is not None or "models" in own:
        return parse_models(doc, own.get("models"), family, description)
    try:
        return get_family(family)
    except QgateError as exc:
        if not need_models:
            return None
        raise doc.error(("models",) if ("models",) in doc.lines else ("family",),
                        f"no models: for family {family!r} ({exc}); say where each member's weights come from, "
                        f"e.g. models: {{{family}-7b: {{hub: owner/name}}}}") from None


def _members(raw: Any, models: Family | None, origin) -> tuple[MemberPolicy, ...]:
    path = ("members",)
    if raw is None:
        return (MemberPolicy(models.default_member),) if models is not None else ()
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
        doc.check_keys(path + (i,), item, MEMBER_KEYS)
        if not isinstance(item.get("name"), str):
            raise doc.error(path + (i,), "a member needs a name")
        out.append(MemberPolicy(item["name"], _opt_str(item.get("model")), _opt_str(item.get("revision"))))
    for i, m in enumerate(out):
        if models is not None:
            try:
                models.member(m.name)
            except QgateError as exc:
                raise origin(path + (i,)).error(path + (i,), str(exc)) from None
    names = [m.name for m in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise origin(path).error(path, f"member {sorted(dupes)[0]!r} is listed twice")
    return tuple(out)


def _checkpoints(raw: Any, origin) -> tuple[CheckpointCandidate, ...]:
    """checkpoints: {NAME: PATH} or {NAME: {path, member, revision}}; a relative path is the policy file's."""
    path = ("checkpoints",)
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise origin(path).error(path, "expected a mapping of candidate name -> checkpoint path (or {path, member})")
    out = []
    for name, entry in raw.items():
        p = path + (name,)
        d = origin(p)
        try:
            check_name(str(name), "checkpoints")
        except QgateError as exc:
            raise d.error(p, str(exc).removeprefix("checkpoints: ")) from None
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise d.error(p, f"expected a checkpoint path or {{path, member, revision}}, got {entry!r}")
        d.check_keys(p, entry, CHECKPOINT_KEYS)
        where = entry["path"]
        local = Path(where).expanduser()
        if where.startswith((".", "/", "~")) and not local.is_absolute():
            where = str((d.path.parent / local).resolve())
        out.append(CheckpointCandidate(str(name), where, _opt_str(entry.get("member")), _opt_str(entry.get("revision"))))
    return tuple(out)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _valid_format(name: Any, doc: YamlDoc, path: tuple) -> str:
    try:
        return get_format(str(name)).name
    except QgateError:
        names = [f.name for f in list_formats()]
        raise doc.error(path, f"unknown format {name!r}{did_you_mean(name, names)}; "
                              f"expected one of: {', '.join(names)}") from None


def _recipe(value: Any, doc: YamlDoc, path: tuple) -> Any:
    """A built-in recipe name, a recipe .yaml file (relative to the policy file), a mapping
    {name, rules} or a bare list of rules; checked by qgate.recipes.load_recipe."""
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
        load_recipe(value)
    except QgateError as exc:
        raise doc.error(path, str(exc)) from None
    return value


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
            d.check_keys(p, entry, FORMAT_KEYS)
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
            d.check_keys(p, item, FALLBACK_KEYS)
            if "format" not in item:
                raise d.error(p, "a fallback entry needs a format")
            out.append(FormatChoice(_valid_format(item["format"], d, p + ("format",)),
                                    _recipe(item.get("recipe"), d, p + ("recipe",))))
        else:
            out.append(FormatChoice(_valid_format(item, d, p), DEFAULT_RECIPE))
    return tuple(out)


def _check_fallback_chain(fallback: tuple[FormatChoice, ...], formats: tuple[FormatChoice, ...], origin) -> None:
    """A chain tries each format once, and never the candidate it stands in for (that one was just tried)."""
    path = ("fallback",)
    seen: dict[str, int] = {}
    for i, choice in enumerate(fallback):
        if choice.format in seen:
            raise origin(path + (i,)).error(path + (i,), f"{choice.format} is already entry {seen[choice.format]} "
                                            f"of the fallback chain; list each format once")
        seen[choice.format] = i
    for choice in formats:
        if choice.format in seen:
            i = seen[choice.format]
            raise origin(path + (i,)).error(path + (i,), f"{choice.format} is a candidate format of this policy; "
                                            f"a candidate cannot be its own fallback")


def _number(value: Any, doc: YamlDoc, path: tuple, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise doc.error(path, f"expected {what}, got {value!r}")
    return float(value)


def _task_policy(task: str, raw: Any, path: tuple, origin, base: TaskPolicy, *,
                 require_threshold: bool) -> TaskPolicy:
    doc = origin(path)
    if not isinstance(raw, dict):
        raise doc.error(path, f"expected a mapping of {', '.join(TASK_KEYS)}, got {raw!r}")
    doc.check_keys(path, raw, TASK_KEYS)
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
                                     f"{did_you_mean(v, INCONCLUSIVE_MEANS)}")
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


def _check_tasks_in_suite(suite: str, tasks: Mapping[str, TaskPolicy], origin, suite_tasks: SuiteTasks) -> None:
    """Every task the policy names must be in its suite."""
    if not tasks:
        return
    try:
        names = suite_tasks(suite)
    except QgateError as exc:
        raise origin(("suite",)).error(("suite",), str(exc)) from None
    for name in tasks:
        if name not in names:
            raise origin(("tasks", name)).error(("tasks", name), f"unknown task: suite {suite!r} has no task {name!r}"
                                                               f"{did_you_mean(name, names)}; it has: "
                                                               f"{', '.join(names)}")

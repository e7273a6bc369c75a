"""Suites: which tasks to run, on which data, with which shots, limits and generation caps.

A suite is a YAML file (suites/<name>.yaml). Each task entry names the lm-eval task that runs it, its
data source (``lm_eval``, or its older name ``hub``: the dataset the lm-eval task's own config names,
on the hub or in local files; or an offline source that qgate.evaluation.data materializes from
installed packages), the primary metric and its direction. The lm-eval task comes from lm-eval's
registry, from qgate's task folders, or from the user's own folders: ``include_path:`` in the suite
(relative to the suite file) or ``--include-path DIR``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qgate import datadirs
from qgate.canonical import content_hash
from qgate.errors import QgateError
from qgate.evaluation import data as data_sources
from qgate.validation import YamlDoc, did_you_mean

SUITE_KEYS = {"suite", "description", "include_path", "defaults", "tasks"}
OWN_DATA_SOURCES = ("lm_eval", "hub")  # the lm-eval task reads the data its own config names
TASK_KEYS = {
    "name", "lm_eval_task", "data", "num_fewshot", "limit", "generation", "chat_template",
    "fewshot_as_multiturn", "system_instruction", "seed", "metric", "higher_is_better", "per_sample",
}
REQUIRED_TASK_KEYS = ("name", "lm_eval_task", "num_fewshot", "metric", "higher_is_better", "per_sample")
GENERATION_KEYS = {"max_gen_toks", "until"}
PER_SAMPLE_KINDS = ("binary", "continuous")
DEFAULT_SEED = 1234
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # task names
SUITE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")  # suite names may hold hyphens (standard-offline)


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite, fully resolved (defaults applied)."""

    name: str
    lm_eval_task: str
    data: dict  # {"source": "hub" | <offline source>, ...source parameters}
    num_fewshot: int
    metric: str
    higher_is_better: bool
    per_sample: str  # "binary" (pass/fail per sample) or "continuous"
    limit: int | None = None
    generation: dict | None = None  # {"max_gen_toks": int, "until": [str, ...]}
    chat_template: bool = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    seed: int = DEFAULT_SEED
    include_path: list[str] | None = None  # the user's lm-eval task folders this task is looked up in

    @property
    def source(self) -> str:
        return self.data["source"]

    @property
    def offline(self) -> bool:
        """True for qgate's offline sources (qgate materializes the data); False when lm-eval's task reads its own."""
        return self.source not in OWN_DATA_SOURCES

    @property
    def data_params(self) -> dict:
        return {k: v for k, v in self.data.items() if k != "source"}

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["include_path"] is None:  # absent, so that the keys of tasks without one stay what they were
            del out["include_path"]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(**d)

    @property
    def hash(self) -> str:
        return content_hash(self.to_dict(), safe=False)


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: list[TaskSpec]
    description: str = ""
    path: str | None = field(default=None, compare=False)

    @property
    def hash(self) -> str:
        """sha256 of the canonical content (name + resolved tasks); the file's formatting does not matter."""
        return content_hash({"suite": self.name, "tasks": [t.to_dict() for t in self.tasks]}, safe=False)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise QgateError(f"suite {self.name!r}: no task {name!r} (tasks: {', '.join(self.task_names())})")

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def suite_dirs() -> list[Path]:
    """Where suite names are looked up: ./suites, then the suites shipped inside the qgate package."""
    return datadirs.search_dirs("suites")


def available_suites() -> list[str]:
    return datadirs.names("suites")


def find_suite(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise QgateError(f"suite file {p} does not exist")
        return p
    if not SUITE_NAME_RE.match(str(name_or_path)):
        raise QgateError(f"suite {str(name_or_path)!r}: not a file and not a suite name")
    for d in suite_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise QgateError(
        f"suite {str(name_or_path)!r} not found (known: {', '.join(available_suites()) or 'none'}; "
        f"or give a path to a .yaml file)"
    )


def load_suite(name_or_path: str | Path, include_path: str | Path | None = None) -> Suite:
    """Load and validate a suite by name (smoke, standard, full) or by path.

    include_path: a folder of the user's own lm-eval tasks (``--include-path``), added to the suite's own
    ``include_path`` for every task that reads its own data."""
    path = find_suite(name_or_path)
    doc = YamlDoc.read(path)
    suite = parse_suite(doc.data, source=str(path), doc=doc)
    return with_include_path(suite, include_path) if include_path is not None else suite


def check_include_path(value: str | Path, what: str = "--include-path") -> str:
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise QgateError(f"{what} {value}: not a directory (expected a folder of lm-eval task YAML files)")
    return str(folder.resolve())


def with_include_path(suite: Suite, include_path: str | Path) -> Suite:
    """The suite with a user task folder added to every task that reads its own data (not qgate's sources)."""
    folder = check_include_path(include_path)
    tasks = [t if t.offline else replace(t, include_path=list(dict.fromkeys([*(t.include_path or []), folder])))
             for t in suite.tasks]
    return Suite(name=suite.name, tasks=tasks, description=suite.description, path=suite.path)


def suite_task_names(name_or_path: str | Path) -> list[str]:
    """The task names of a suite (what a policy may set thresholds for)."""
    return load_suite(name_or_path).task_names()


def parse_suite(raw: Any, source: str = "<suite>", doc: YamlDoc | None = None) -> Suite:
    """Validate a suite's data; errors name the file, line and key path (qgate.validation)."""
    doc = doc or YamlDoc.from_data(source, raw)
    bad = doc.error

    if not isinstance(raw, dict):
        raise bad((), "expected a mapping with keys 'suite' and 'tasks'")
    doc.check_keys((), raw, sorted(SUITE_KEYS))
    name = raw.get("suite")
    if not isinstance(name, str) or not SUITE_NAME_RE.match(name):
        raise bad(("suite",), f"expected a lower-case name like 'smoke', got {name!r}")
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise bad(("description",), "expected a string")
    defaults = raw.get("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise bad(("defaults",), "expected a mapping of task keys")
    doc.check_keys(("defaults",), defaults, sorted(TASK_KEYS - {"name"}))
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise bad(("tasks",), "expected a non-empty list of task entries")
    include = raw.get("include_path")
    if include is not None:
        if not isinstance(include, str) or not include:
            raise bad(("include_path",), f"expected a folder of lm-eval task YAML files, got {include!r}")
        folder = Path(include).expanduser()
        if not folder.is_absolute() and isinstance(doc.path, (str, Path)) and Path(doc.path).is_file():
            folder = Path(doc.path).parent / folder
        if not folder.is_dir():
            raise bad(("include_path",), f"{folder}: not a directory (relative paths are read from the suite file's "
                                         "folder)")
        include = [str(folder.resolve())]

    tasks: list[TaskSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(tasks_raw):
        where = ("tasks", i)
        if not isinstance(entry, dict):
            raise bad(where, "expected a mapping")
        merged = {**defaults, **entry}
        spec = _parse_task(merged, where, doc)
        if include and not spec.offline:
            spec = replace(spec, include_path=include)
        if spec.name in seen:
            raise bad(where + ("name",), f"duplicate task name {spec.name!r}")
        seen.add(spec.name)
        tasks.append(spec)
    return Suite(name=name, tasks=tasks, description=description, path=source)


def _parse_task(d: dict, where: tuple, doc: YamlDoc) -> TaskSpec:
    bad = doc.error
    doc.check_keys(where, d, sorted(TASK_KEYS))
    for key in REQUIRED_TASK_KEYS:
        if key not in d:
            raise bad(where + (key,), "missing (required)")

    name = d["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad(where + ("name",), f"expected a lower-case identifier like 'mmlu', got {name!r}")
    lm_task = d["lm_eval_task"]
    if not isinstance(lm_task, str) or not lm_task.strip():
        raise bad(where + ("lm_eval_task",), f"expected an lm-eval task or group name, got {lm_task!r}")

    data = d.get("data", "lm_eval")
    if isinstance(data, str):
        data = {"source": data}
    if not isinstance(data, dict) or "source" not in data:
        raise bad(where + ("data",), "expected a mapping with a 'source' key ('lm_eval', 'hub' or an offline source)")
    source = data["source"]
    if source not in OWN_DATA_SOURCES:
        known = data_sources.source_names()
        if source not in known:
            raise bad(where + ("data", "source"), f"unknown source {source!r}"
                                                  f"{did_you_mean(source, [*OWN_DATA_SOURCES, *known])} "
                                                  f"(expected 'lm_eval', 'hub' or one of: {', '.join(known)})")
        try:
            params = data_sources.check_params(source, {k: v for k, v in data.items() if k != "source"})
        except QgateError as exc:
            raise bad(where + ("data",), str(exc)) from None
        data = {"source": source, **params}
    else:
        for k, v in data.items():
            if k not in ("source", "dataset"):
                raise bad(where + ("data", k), f"unknown key for source {source!r} (allowed: dataset)")
            if k == "dataset" and not isinstance(v, str):
                raise bad(where + ("data", "dataset"), "expected the hub dataset id as a string")
        data = dict(data)

    shots = d["num_fewshot"]
    if not _is_int(shots) or shots < 0:
        raise bad(where + ("num_fewshot",), f"expected an integer >= 0, got {shots!r}")
    limit = d.get("limit")
    if limit is not None and (not _is_int(limit) or limit <= 0):
        raise bad(where + ("limit",), f"expected a positive integer or null (all samples), got {limit!r}")

    generation = d.get("generation")
    if generation is not None:
        if not isinstance(generation, dict):
            raise bad(where + ("generation",), "expected a mapping with max_gen_toks and/or until")
        for k in generation:
            if k not in GENERATION_KEYS:
                raise bad(where + ("generation", k), f"unknown key (allowed: {', '.join(sorted(GENERATION_KEYS))}; decoding is always greedy)")
        mgt = generation.get("max_gen_toks")
        if mgt is not None and (not _is_int(mgt) or mgt <= 0):
            raise bad(where + ("generation", "max_gen_toks"), f"expected a positive integer, got {mgt!r}")
        until = generation.get("until")
        if until is not None and (not isinstance(until, list) or not all(isinstance(s, str) and s for s in until)):
            raise bad(where + ("generation", "until"), "expected a list of non-empty strings")
        generation = dict(generation)

    for key in ("chat_template", "fewshot_as_multiturn", "higher_is_better"):
        if key in d and not isinstance(d[key], bool):
            raise bad(where + (key,), f"expected true or false, got {d[key]!r}")
    seed = d.get("seed", DEFAULT_SEED)
    if not _is_int(seed) or seed < 0:
        raise bad(where + ("seed",), f"expected a non-negative integer, got {seed!r}")
    metric = d["metric"]
    if not isinstance(metric, str) or not metric:
        raise bad(where + ("metric",), f"expected the primary metric's name, got {metric!r}")
    per_sample = d["per_sample"]
    if per_sample not in PER_SAMPLE_KINDS:
        raise bad(where + ("per_sample",), f"expected one of {', '.join(PER_SAMPLE_KINDS)}, got {per_sample!r}")
    system = d.get("system_instruction")
    if system is not None and not isinstance(system, str):
        raise bad(where + ("system_instruction",), "expected a string")

    return TaskSpec(
        name=name, lm_eval_task=lm_task.strip(), data=data, num_fewshot=shots, metric=metric,
        higher_is_better=d["higher_is_better"], per_sample=per_sample, limit=limit, generation=generation,
        chat_template=d.get("chat_template", False), fewshot_as_multiturn=d.get("fewshot_as_multiturn", True),
        system_instruction=system, seed=seed,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

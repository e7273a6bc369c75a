"""What qgate knows by name, for `qgate ls`: families, suites, tasks and formats (no model library loaded)."""

from __future__ import annotations

import re
from pathlib import Path

from qgate import datadirs
from qgate.errors import QgateError
from qgate.families import get_family, list_families
from qgate.formats import list_formats

KINDS = ("families", "suites", "tasks", "formats")
TASKS_DIR = Path(__file__).resolve().parent / "evaluation" / "tasks"  # qgate's own lm-eval task folders
_TASK_LINE = re.compile(r"^task:\s*['\"]?([\w.-]+)", re.MULTILINE)


def families() -> list[dict]:
    out = []
    for name in list_families():
        fam = get_family(name)
        out.append({"name": fam.name, "description": fam.description, "path": fam.path,
                    "default_member": fam.default_member,
                    "members": [{"name": m.name, "source": m.source, "location": m.location,
                                 "revision": m.revision, "aliases": list(m.aliases)} for m in fam.members]})
    return out


def suites() -> list[dict]:
    from qgate.evaluation.suite import find_suite, load_suite

    out = []
    for name in datadirs.names("suites"):
        suite = load_suite(name)
        out.append({"name": name, "path": str(find_suite(name)), "description": suite.description,
                    "tasks": suite.task_names()})
    return out


def folder_tasks(folder: str | Path) -> list[str]:
    """The lm-eval task names a folder of task YAML files defines (its ``task:`` lines)."""
    root = Path(folder)
    if not root.is_dir():
        raise QgateError(f"--include-path {folder}: not a directory (expected a folder of lm-eval task YAML files)")
    names = set()
    for path in root.rglob("*.y*ml"):
        names.update(_TASK_LINE.findall(path.read_text(encoding="utf-8", errors="replace")))
    return sorted(names)


def tasks(include_path: str | None = None) -> list[dict]:
    """Every suite's tasks (with the lm-eval task that runs each), then the lm-eval tasks of qgate's own
    folders and of ``include_path``; `qgate eval --tasks` also takes any task of lm-eval's registry."""
    from qgate.evaluation.suite import load_suite

    out = []
    for name in datadirs.names("suites"):
        for t in load_suite(name).tasks:
            out.append({"name": t.name, "suite": name, "lm_eval_task": t.lm_eval_task, "metric": t.metric,
                        "data": t.source})
    for task in folder_tasks(TASKS_DIR):
        out.append({"name": task, "suite": None, "lm_eval_task": task, "metric": None, "data": "qgate"})
    if include_path:
        for task in folder_tasks(include_path):
            out.append({"name": task, "suite": None, "lm_eval_task": task, "metric": None,
                        "data": str(Path(include_path).resolve())})
    return out


def formats() -> list[dict]:
    return [f.describe() for f in list_formats()]


def listing(kind: str, include_path: str | None = None) -> list[dict]:
    if kind == "tasks":
        return tasks(include_path)
    return {"families": families, "suites": suites, "formats": formats}[kind]()


def table(kind: str, rows: list[dict]) -> list[str]:
    """Plain-text lines for a listing."""
    if kind == "families":
        header = ("family", "members (source)", "defined in")
        body = [(r["name"], ", ".join(f'{m["name"]} ({m["source"]})' for m in r["members"]), r["path"] or "code")
                for r in rows]
    elif kind == "suites":
        header = ("suite", "tasks", "file")
        body = [(r["name"], ", ".join(r["tasks"]), r["path"]) for r in rows]
    elif kind == "tasks":
        header = ("task", "suite", "lm-eval task", "metric", "data")
        body = [(r["name"], r["suite"] or "-", r["lm_eval_task"], r["metric"] or "-", r["data"]) for r in rows]
    else:
        header = ("format", "element", "block", "scale", "bits/value")
        body = [(r["name"], r["element"], str(r["block_size"] or "-"), r["scale"], f'{r["bits_per_value"]:g}')
                for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]

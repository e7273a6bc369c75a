"""Reading a policy for a review: a file path, a family name, or ``REV:path`` from git."""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from qgate.errors import QgateError
from qgate.evaluation.suite import suite_task_names
from qgate.policy import Policy, load_policy


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
    """Load a policy from a file path, a family name, or ``REV:path`` (git). Errors name ``spec``.
    check_tasks: the tasks the policy names must be in its suite."""
    suite_tasks = suite_task_names if check_tasks else None
    spec = str(spec)
    if not is_git_spec(spec):
        return load_policy(spec, suite_tasks=suite_tasks)
    default_spec = _default_beside(spec)
    with _policies_from_git(spec) as (folder, file):
        default_copy = folder / "default.yaml"
        try:
            if default_copy.is_file():
                with _env("QGATE_POLICIES", str(folder)):
                    policy = load_policy(file, suite_tasks=suite_tasks)
            else:
                policy = load_policy(file, suite_tasks=suite_tasks)
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

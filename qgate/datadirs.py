"""Where qgate finds its named data files: suites and policies.

The built-in ones ship inside the package (qgate/suites, qgate/policies, found through
importlib.resources, so an installed wheel finds them wherever it runs). A user's own files override
them by name: ./suites and ./policies of the working directory come first, and for policies
$QGATE_POLICIES before that.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

KINDS = ("suites", "policies")
_ENV = {"policies": "QGATE_POLICIES"}


def builtin_dir(kind: str) -> Path:
    """The package's own folder of ``kind`` (suites or policies)."""
    return Path(str(resources.files("qgate") / kind))


def search_dirs(kind: str) -> list[Path]:
    """Folders searched for ``kind``, first match wins: $QGATE_POLICIES (policies only), ./<kind>, built-in."""
    dirs = []
    env = _ENV.get(kind)
    if env and os.environ.get(env):
        dirs.append(Path(os.environ[env]))
    dirs += [Path.cwd() / kind, builtin_dir(kind)]
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def find(kind: str, filename: str) -> Path | None:
    """The first ``filename`` in the folders of ``kind``; None when no folder has it."""
    for d in search_dirs(kind):
        p = d / filename
        if p.is_file():
            return p
    return None


def names(kind: str) -> list[str]:
    """Every name (file stem of a .yaml file) found for ``kind``, sorted."""
    out: set[str] = set()
    for d in search_dirs(kind):
        if d.is_dir():
            out.update(p.stem for p in d.glob("*.yaml"))
    return sorted(out)

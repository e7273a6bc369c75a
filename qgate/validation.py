"""Validating YAML input files: parsed data with the line of every key, and one-line errors.

Every input file qgate reads (policies, suites, recipes) reports a problem the same way:
``<file>:<line>: <key path>: <problem>[ (did you mean 'x'?)]`` as a QgateError (exit 2).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml

from qgate.errors import QgateError


class YamlDoc:
    """Parsed YAML plus the line of every key path, for error messages."""

    def __init__(self, path: Path | str, text: str):
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

    @classmethod
    def read(cls, path: Path) -> "YamlDoc":
        return cls(path, path.read_text(encoding="utf-8"))

    @classmethod
    def from_data(cls, source: Path | str, data: Any) -> "YamlDoc":
        """Data that did not come from a file (e.g. a recipe given inline): errors name ``source``, no line."""
        doc = cls.__new__(cls)
        doc.path, doc.text, doc.lines, doc.data = source, "", {}, data
        return doc

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

    def line_of(self, path: tuple) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        probe: tuple | None = path
        while probe is not None:
            line = self.lines.get(probe)
            if line is not None:
                return line
            probe = probe[:-1] if probe else None
        return None

    def error(self, path: tuple, problem: str) -> QgateError:
        line = self.line_of(path)
        where = f"{self.path}:{line}" if line else str(self.path)
        key = key_path(path)
        return QgateError(f"{where}: {key + ': ' if key else ''}{problem}")

    def check_keys(self, path: tuple, mapping: Any, allowed: Sequence[str]) -> None:
        """Every key of ``mapping`` (at ``path``) is one of ``allowed``."""
        if not isinstance(mapping, dict):
            return
        for key in mapping:
            if key not in allowed:
                raise self.error(path + (key,), f"unknown key{did_you_mean(key, allowed)}; "
                                                f"expected one of: {', '.join(allowed)}")


def key_path(path: tuple) -> str:
    """("tasks", 0, "name") -> "tasks[0].name"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def did_you_mean(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

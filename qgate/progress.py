"""Progress for long work: a one-line bar on a terminal, plain parseable lines otherwise (CI, logs).

    bar = Progress(total=12, label="gate")
    bar.step("smollm2 nvfp4 mmlu: evaluating")   # advance by one and say what is being done
    bar.note("loaded smollm2 in 0.4 s")          # a line of its own, without advancing
    bar.close()

Plain mode prints ``<label>: [3/12] message`` per step to stderr, so CI logs can be grepped.
The bar is drawn only when stderr is a terminal and $TERM is not "dumb"; QGATE_PROGRESS=plain
(or =bar) forces a mode.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO


def use_bar(stream: TextIO | None = None) -> bool:
    forced = os.environ.get("QGATE_PROGRESS", "").lower()
    if forced in ("plain", "bar"):
        return forced == "bar"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


def quiet_library_bars() -> None:
    """Silence the libraries' own tqdm bars (transformers' weight loading, lm-eval's request loops).

    Off a terminal their carriage-return redraws would fill CI logs. tqdm's TQDM_DISABLE only sets a
    default, and lm-eval passes ``disable=`` explicitly, so the constructor is wrapped to force it.
    """
    import tqdm.std

    cls = tqdm.std.tqdm
    if getattr(cls, "_qgate_quiet", False):
        return
    original = cls.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    cls.__init__ = quiet_init
    cls._qgate_quiet = True


class Progress:
    def __init__(self, total: int, label: str = "qgate", stream: TextIO | None = None, enabled: bool = True,
                 bar: bool | None = None):
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = use_bar(self.stream) if bar is None else bar
        self.done = 0
        self.started = time.perf_counter()
        self._drawn = False

    def _width(self) -> int:
        return shutil.get_terminal_size((100, 20)).columns

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * (self._width() - 1) + "\r")
            self._drawn = False

    def _draw(self, message: str) -> None:
        cells = 24
        filled = cells * self.done // self.total if self.total else cells
        text = f"{self.label} [{'#' * filled}{'.' * (cells - filled)}] {self.done}/{self.total} {message}"
        self.stream.write("\r" + text[: self._width() - 1])
        self.stream.flush()
        self._drawn = True

    def step(self, message: str = "", advance: int = 1) -> None:
        """Advance by ``advance`` and show ``message``."""
        self.done = min(self.total, self.done + advance) if self.total else self.done + advance
        self.show(message)

    def show(self, message: str) -> None:
        """Show what is being done now, without advancing."""
        if not self.enabled:
            return
        if self.bar:
            self._clear()
            self._draw(message)
        else:
            self.stream.write(f"{self.label}: [{self.done}/{self.total}] {message}\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (the bar is redrawn below it)."""
        if not self.enabled:
            return
        self._clear()
        self.stream.write(f"{self.label}: {message}\n")
        self.stream.flush()

    def close(self, message: str | None = None) -> None:
        if not self.enabled:
            return
        self._clear()
        if message:
            self.stream.write(f"{self.label}: {message}\n")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

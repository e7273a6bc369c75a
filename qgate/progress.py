"""Progress for long work, through tqdm: bars on a terminal, plain parseable lines otherwise (CI, logs).

    bar = Progress(total=12, label="qgate")
    bar.step("smollm2 nvfp4 mmlu: evaluating")   # advance by one and say what is being done
    bar.note("loaded smollm2 in 0.4 s")          # a line of its own, without advancing
    with bar.within("mmlu", total=400) as sub:   # inside one step: requests done / total
        sub.update(32)
    bar.close()

On a terminal: one tqdm bar for the steps (evaluations) and, below it while a task runs, one for the
task's requests, each with elapsed time and ETA. Off a terminal: ``<label>: [3/12] message`` per step,
and inside a step at most one line every ``interval`` seconds plus one when it ends
(``<label>: [3/12] mmlu: 120/400 requests, 0:42 elapsed, ETA 1:38``), so CI logs stay readable.
The bar is drawn only when stderr is a terminal and $TERM is not "dumb"; QGATE_PROGRESS=plain
(or =bar) forces a mode.

Nothing here changes another library: qgate's evaluation adapter reports its requests to ``within``
itself, and while it does, ``library_bars_hidden`` keeps lm-eval's own bars (which take no switch)
off the screen by giving them a stream of their own for that call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TextIO

PLAIN_INTERVAL_S = 30.0


def use_bar(stream: TextIO | None = None) -> bool:
    forced = os.environ.get("QGATE_PROGRESS", "").lower()
    if forced in ("plain", "bar"):
        return forced == "bar"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Within:
    """Progress inside one step (e.g. a task's requests): ``update(n)``, ``close()``; tqdm-compatible."""

    def __init__(self, parent: "Progress", desc: str, total: int):
        self.parent = parent
        self.desc = desc
        self.total = max(int(total), 0)
        self.n = 0
        self.started = time.perf_counter()
        self._last_line = self.started
        self._closed = False
        self._bar = None
        if parent.enabled and parent.bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=f"  {desc}", unit="req", position=1, leave=False,
                             file=parent.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if (self.parent.enabled and not self.parent.bar and self.n < self.total
                and now - self._last_line >= self.parent.interval):  # the last count is close()'s line
            self._last_line = now
            self.parent._line(f"[{self.parent.done}/{self.parent.total}] {self.line()}")

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        text = f"{self.desc}: {self.n}/{self.total} requests, {_clock(elapsed)} elapsed"
        if 0 < self.n < self.total:
            text += f", ETA {_clock(elapsed * (self.total - self.n) / self.n)}"
        return text

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.parent.enabled and not self.parent.bar and self.total:
            self.parent._line(f"[{self.parent.done}/{self.parent.total}] {self.line()}")
        if self.parent._within is self:
            self.parent._within = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    def __init__(self, total: int, label: str = "qgate", stream: TextIO | None = None, enabled: bool = True,
                 bar: bool | None = None, interval: float = PLAIN_INTERVAL_S):
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = use_bar(self.stream) if bar is None else bar
        self.interval = interval
        self.done = 0
        self._total = max(int(total), 0)
        self._within: Within | None = None
        self._tqdm = None
        if self.enabled and self.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self._total, desc=label, unit="eval", position=0, leave=True,
                              file=self.stream, dynamic_ncols=True)

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:  # a fallback format adds evaluations while the gate runs
        self._total = max(int(value), 0)
        if self._tqdm is not None:
            self._tqdm.total = self._total
            self._tqdm.refresh()

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.label}: {text}\n")
        self.stream.flush()

    def step(self, message: str = "", advance: int = 1) -> None:
        """Advance by ``advance`` and show ``message``."""
        self.done = min(self.total, self.done + advance) if self.total else self.done + advance
        if self._tqdm is not None:
            self._tqdm.update(self.done - self._tqdm.n)
        self.show(message)

    def show(self, message: str) -> None:
        """Show what is being done now, without advancing."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(message)
        else:
            self._line(f"[{self.done}/{self.total}] {message}")

    def within(self, desc: str, total: int) -> Within:
        """Progress inside the current step (requests of a task): a second bar, or timed plain lines."""
        self._within = Within(self, desc, total)
        return self._within

    def note(self, message: str) -> None:
        """A line of its own (the bars are redrawn below it)."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.write(f"{self.label}: {message}", file=self.stream)
        else:
            self._line(message)

    def close(self, message: str | None = None) -> None:
        if not self.enabled:
            return
        if self._within is not None:
            self._within.close()
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if message:
            self._line(message)
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _HideRedraws:
    """A stream for other libraries' bars during one call: a tqdm redraw (a write starting with a
    carriage return, and the newline that ends such a bar) is dropped; every other write passes on."""

    def __init__(self, target: TextIO):
        self.target = target
        self._in_bar = False

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            self._in_bar = True
            return len(text)
        if self._in_bar and text in ("\n", ""):
            self._in_bar = False
            return len(text)
        self._in_bar = False
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.target, name)


@contextlib.contextmanager
def hidden_library_bars():
    """For the duration of one call, other libraries' tqdm bars that take no switch (lm-eval's context
    building, transformers' GGUF conversion) get a stream that drops their redraws."""
    with contextlib.redirect_stderr(_HideRedraws(sys.stderr)):
        yield


@contextlib.contextmanager
def library_bars_hidden(progress: Progress | None):
    """While qgate shows a task's progress itself, the libraries' own bars stay off the screen; without
    qgate's progress nothing changes."""
    if progress is None or not progress.enabled:
        yield
        return
    with hidden_library_bars():
        yield

"""An unexpected exception ends as one line for the user and a log file holding the traceback.

Exit code 4 (``EXIT_INTERNAL``) tells CI "qgate itself broke", apart from blocked (1) and bad input (2).
Logs go to $QGATE_LOG_DIR, else ~/.local/state/qgate/logs ($XDG_STATE_HOME honoured), owner-only:
a traceback can hold paths, URLs and values a user did not mean to share.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import tempfile
import traceback
from pathlib import Path

from qgate import __version__

EXIT_INTERNAL = 4


def log_dir() -> Path:
    if os.environ.get("QGATE_LOG_DIR"):
        return Path(os.environ["QGATE_LOG_DIR"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state).expanduser() / "qgate" / "logs"


def write_crash_log(exc: BaseException, argv: list[str] | None = None) -> Path:
    """The traceback of ``exc`` in a new log file (a temporary folder when the log folder cannot be written)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = (f"qgate {__version__} internal error at {stamp}\n"
            f"command: {' '.join(argv if argv is not None else sys.argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(folder / f"qgate-{stamp}-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return folder / f"qgate-{stamp}-{os.getpid()}.log"
    raise OSError("no folder to write the error log to")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."

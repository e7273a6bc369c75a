"""Where qgate keeps its files ($QGATE_CACHE), and writing a file so that a reader sees the old content
or the new, never half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """qgate's cache: $QGATE_CACHE, else ~/.cache/qgate (converted models, offline data, file hashes)."""
    return Path(os.environ.get("QGATE_CACHE") or Path.home() / ".cache" / "qgate").expanduser()


def write_atomic(path: str | os.PathLike, content: str | bytes, *, encoding: str = "utf-8",
                 mode: int | None = None) -> Path:
    """Write ``content`` (text or bytes) to ``path`` through a temporary file in the same folder and
    os.replace; the folder is created if needed. On failure the temporary file is removed and ``path``
    is left as it was. The file is readable by its owner only unless ``mode`` says otherwise.
    Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        if isinstance(content, bytes):
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        else:
            with os.fdopen(fd, "w", encoding=encoding) as handle:
                handle.write(content)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

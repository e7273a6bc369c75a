"""Known, harmless library messages kept off a user's terminal, each matched by logger and message.

They say nothing about the user's run and would bury qgate's own lines:
- torchao (imported by transformers when installed) cannot load its CUDA extensions on a CPU-only
  machine and logs "Failed to load .../torchao/_C_*.so" once per extension;
- torch's pytree logs that registering torchao's Enum types is deprecated (torchao's business).

Only those records are dropped: anything else these loggers say still shows. ``install()`` is called
by the command line; a program using qgate as a library keeps its own logging untouched.
"""

from __future__ import annotations

import logging
import re

# logger name -> messages (regular expressions, matched against the formatted message) that are dropped
KNOWN = {
    "torchao": [re.compile(r"^Failed to load .*torchao.*\.so\b")],
    "torch.utils._pytree": [re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")],
}


class _DropKnown(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def install() -> None:
    """Attach the filters to those loggers (before the libraries are imported; idempotent)."""
    for name, patterns in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(patterns))

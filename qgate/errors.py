"""The one exception type that means "the user gave us something wrong".

The CLI turns it into a single line on stderr and exit code 2, with no traceback.
Everything else is a bug and keeps its traceback.
"""


class QgateError(Exception):
    """Bad input: a file, field or value that is not what was expected."""

    exit_code = 2


class UsageError(QgateError):
    """An unknown name (format, backend, family, member...) or a malformed argument."""

"""User-facing errors: one clear line, a non-zero exit from the CLI, no traceback unless --debug."""

from __future__ import annotations


class RQError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    The message names what is wrong and where (a path, a layer, a key). The CLI prints
    ``error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # one line, always
        msg = " ".join(str(self.args[0]).split())
        return f"{msg} ({self.hint})" if self.hint else msg

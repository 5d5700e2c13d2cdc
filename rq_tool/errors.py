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


def read_json(path, missing: str) -> dict | list:
    """Parse a JSON file strictly (``rq_tool.validate.read``: finite numbers, bounded size and
    nesting, UTF-8); ``missing`` is the one-line message when the file is absent."""
    from .validate import read

    return read(path, missing)


def check_format(d, fmt: tuple[str, int], what: str, where: str, readable: tuple[int, ...] = ()) -> int:
    """Raise RQError unless ``d`` is a JSON document of format ``fmt = (name, version)``; older
    versions listed in ``readable`` are accepted too. Returns the document's version."""
    name, version = fmt
    if not isinstance(d, dict) or d.get("format") != name:
        raise RQError(f"{where}: not an rq {what} (format {d.get('format') if isinstance(d, dict) else None!r})")
    v = d.get("version")
    if type(v) is not int or (v != version and v not in readable):
        raise RQError(f"{where}: {what} version {v!r} is not supported (expected {version})")
    return v


def dataclass_fields_of(cls, d: dict, what: str) -> dict:
    """The fields of versioned frozen-dataclass ``cls`` from its JSON dict ``d`` (its ``version``
    checked against ``cls.VERSION``, unknown keys refused, one line naming ``what``)."""
    from dataclasses import fields

    d = dict(d)
    version = d.pop("version", cls.VERSION)
    if version != cls.VERSION:
        raise RQError(f"{what} version {version} is not supported (expected {cls.VERSION})")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RQError(f"unknown {what.split()[0]} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return d

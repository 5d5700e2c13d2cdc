"""Bounded click parameter types: every numeric CLI option is finite, in a sane range, or refused
with one line before any work starts (so planning math only ever sees inputs it terminates on).

``--budget 1e-99999999`` used to hang: the exact budget parser (``rq_tool.plan.budget``) builds a
``Fraction`` of the decimal as written, i.e. a 100-million-digit integer. ``BUDGET`` checks the
spec's magnitude first (``rq_tool.validate.check_budget_spec``, also called by the library's
rewrite) and hands the planner only factors in [1e-6, 10] and sizes from 1 byte to 1 EiB.
"""

from __future__ import annotations

import math
import re

import click

MAX_DEVICES = 4096  # expert-parallel devices (--ep-devices, --ep-size, --devices)


class BoundedInt(click.ParamType):
    """An integer in ``[lo, hi]``; ``1e3``-style or fractional text is refused, not truncated."""

    name = "integer"

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            v = value
        else:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?[0-9]{1,19}", text):
                self.fail(f"{value!r} is not an integer in [{self.lo}, {self.hi}]", param, ctx)
            v = int(text)
        if not self.lo <= v <= self.hi:
            self.fail(f"{v} is not in [{self.lo}, {self.hi}]", param, ctx)
        return v


class BoundedFloat(click.ParamType):
    """A finite float in ``[lo, hi]`` (``lo_open``: strictly above ``lo``); NaN / inf refused."""

    name = "number"

    def __init__(self, lo: float, hi: float, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        low_ok = v > self.lo if self.lo_open else v >= self.lo
        if not math.isfinite(v) or not low_ok or v > self.hi:
            bracket = "(" if self.lo_open else "["
            self.fail(f"{value!r} is not a finite number in {bracket}{self.lo:g}, {self.hi:g}]", param, ctx)
        return v


class CapOrOff(BoundedFloat):
    """A ``BoundedFloat`` cap, or one of ``OFF_WORDS`` (``none``, ``off``) for no cap (None)."""

    name = "number|none"
    OFF_WORDS = ("none", "off")

    def convert(self, value, param, ctx):
        if value is None or str(value).strip().lower() in self.OFF_WORDS:
            return None
        return super().convert(value, param, ctx)


class BudgetSpec(click.ParamType):
    """A ``--budget`` spec (factor or size, see ``rq_tool.plan.budget``) of sane magnitude; the
    string is passed on unchanged for the exact parser."""

    name = "budget"

    def convert(self, value, param, ctx):
        from .errors import RQError
        from .validate import check_budget_spec

        try:
            return check_budget_spec(value)
        except RQError as e:
            self.fail(str(e), param, ctx)


BUDGET = BudgetSpec()


class SchemeList(click.ParamType):
    """Comma-separated known scheme names, at least one, no repeats; returns a list."""

    name = "schemes"

    def convert(self, value, param, ctx):
        from .defaults import SCHEME_NAMES as SCHEMES  # no torch import for parsing

        if isinstance(value, (list, tuple)):
            return list(value)
        names = [s.strip() for s in str(value).split(",") if s.strip()]
        if not names:
            self.fail(f"{value!r}: give at least one scheme (known: {', '.join(SCHEMES)})", param, ctx)
        bad = [s for s in names if s not in SCHEMES]
        if bad:
            self.fail(f"unknown scheme {bad[0]!r} (known: {', '.join(SCHEMES)})", param, ctx)
        if len(set(names)) != len(names):
            self.fail(f"{value!r} names a scheme twice", param, ctx)
        return names


SCHEME_LIST = SchemeList()

"""Expert-memory budgets: from a user's ``--budget`` spec to bytes.

Legend: L MoE layers.

A spec is either
- a factor of the original expert bytes: a Python float, or a string holding a bare number or a
  number followed by ``x`` (``0.9``, ``"1.25"``, ``"1.1x"``); ``0 < factor <= MAX_FACTOR``;
- an absolute size: a Python int (bytes), or a string with a unit (``"120MB"``, ``"1.5GiB"``,
  ``"4096B"``). SI units are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024; units
  are case-insensitive. Per-layer budgets apply the size to every layer; a global budget is the
  size of the whole model's expert memory.
Bare numeric strings are always factors, so ``--budget 1`` means 1.0x and an absolute size needs
a unit (``--budget 1000000B``).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import torch

from ..errors import RQError

MAX_FACTOR = 10.0

_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SPEC_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_HINT = "use a factor like 0.9 or 1.1x (<= 10), or a size with a unit like 120MB or 1.5GiB"


def _parse(spec) -> tuple[str, Fraction]:
    """``spec`` -> ``("factor", f)`` or ``("bytes", n)``, exact (decimal strings as written)."""
    if isinstance(spec, bool):
        raise RQError(f"invalid budget {spec!r}", hint=_HINT)
    if isinstance(spec, int):
        return "bytes", Fraction(spec)
    if isinstance(spec, float):
        if not math.isfinite(spec):
            raise RQError(f"invalid budget {spec!r}", hint=_HINT)
        return "factor", Fraction(repr(spec))  # 0.29 * 100 is 28.999... in floats, 29 as written
    if isinstance(spec, str):
        m = _SPEC_RE.match(spec)
        if m:
            value, unit = Fraction(m.group(1)), m.group(2).lower()
            if unit in ("", "x"):
                return "factor", value
            if unit in _UNITS:
                return "bytes", value * _UNITS[unit]
    raise RQError(f"invalid budget {spec!r}", hint=_HINT)


def resolve_budget(spec, layer_source_bytes: torch.Tensor, global_: bool = False) -> torch.Tensor | int:
    """Budget in bytes from a spec (see the module docstring).

    ``layer_source_bytes [L]`` int64: each layer's original expert bytes (E x one expert in the
    source scheme). Returns ``[L]`` int64 per-layer budgets, or one int when ``global_``.
    Fractional bytes round down, so a factor never grants more than it says.
    """
    kind, value = _parse(spec)
    if value <= 0:
        raise RQError(f"budget must be positive, got {spec!r}", hint=_HINT)
    layer_source_bytes = torch.as_tensor(layer_source_bytes, dtype=torch.int64).reshape(-1)
    if kind == "factor":
        if value > MAX_FACTOR:
            raise RQError(f"budget factor {float(value):g} is above {MAX_FACTOR:g}x the original expert memory",
                          hint="for an absolute size add a unit, e.g. 120MB")
        if global_:
            return math.floor(value * int(layer_source_bytes.sum()))
        return torch.tensor([math.floor(value * int(b)) for b in layer_source_bytes], dtype=torch.int64)
    n = math.floor(value)
    if n < 1:
        raise RQError(f"budget {spec!r} is less than one byte", hint=_HINT)
    if global_:
        return n
    return torch.full_like(layer_source_bytes, n)

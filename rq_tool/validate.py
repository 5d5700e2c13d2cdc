"""Validation at every boundary: strict JSON reading and typed field access, one error line each.

Every file rq reads (profile, routing map, rq config, config.json, manifest, index) goes through
``loads``: NaN / Infinity / numbers that overflow a float are refused, as are big integers beyond
``MAX_INT``, nesting deeper than ``MAX_DEPTH``, non-UTF-8 text and files larger than
``MAX_JSON_BYTES``. The format readers then take fields with ``get_int`` / ``get_str`` /
``get_list`` / ``get_dict`` / ``get_number``, which name the file and the field in the message
(``routing_map.json: layers[2].phy2log: expected a list of integers``).

Light on purpose (json and math only): the runtime imports it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import RQError

MAX_DEPTH = 64  # rq's own files nest at most ~6 levels; configs of real models ~10
MAX_JSON_BYTES = 512 << 20  # an index of a 1000-shard model is a few MB
MAX_INT = 1 << 62  # fits int64 with room for sums
MAX_EXPERTS = 1 << 16  # logical experts per layer
MAX_LAYERS = 1 << 14  # decoder layers
MAX_DIM = 1 << 20  # hidden / intermediate sizes, heads
MAX_VOCAB = 1 << 24


class _Reject(ValueError):
    pass


def _no_constant(name: str):
    raise _Reject(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Reject(f"number {text[:40]} overflows a float")
    return v


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise _Reject(f"integer {text[:24]}... is too large")
    v = int(text)
    if abs(v) > MAX_INT:
        raise _Reject(f"integer {text} is too large")
    return v


def depth(obj, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value (iterative; stops counting past ``limit``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def loads(text: str | bytes, where: str):
    """Parse JSON strictly (see the module docstring); RQError naming ``where`` otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RQError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except _Reject as e:
        raise RQError(f"{where}: not valid JSON for rq ({e})") from None
    except RecursionError:
        raise RQError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise RQError(f"{where}: not valid JSON ({e})") from None
    if depth(obj) > MAX_DEPTH:
        raise RQError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return obj


def read(path, missing: str | None = None):
    """``loads`` of a file; ``missing``: the message when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise RQError(missing or f"{path} not found")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise RQError(f"{path}: {size} bytes is too large for an rq JSON file (limit {MAX_JSON_BYTES})")
    return loads(path.read_bytes(), str(path))


# ------------------------------------------------------------------------- typed field access
_MISSING = object()


def _at(where: str, field: str) -> str:
    return f"{where}: {field}" if field else where


def get(d, key: str, where: str, field: str = "", default=_MISSING):
    if not isinstance(d, dict):
        raise RQError(f"{_at(where, field)}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        if default is _MISSING:
            raise RQError(f"{_at(where, field + '.' + key if field else key)}: missing")
        return default
    return d[key]


def check_int(v, where: str, field: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RQError(f"{_at(where, field)}: expected an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise RQError(f"{_at(where, field)}: {v} is out of range [{lo}, {hi}]")
    return v


def check_number(v, where: str, field: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RQError(f"{_at(where, field)}: expected a finite number, got {_show(v)}")
    if not lo <= v <= hi:
        raise RQError(f"{_at(where, field)}: {v} is out of range [{lo}, {hi}]")
    return float(v)


def check_str(v, where: str, field: str, max_len: int = 4096) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise RQError(f"{_at(where, field)}: expected a string, got {_show(v)}")
    return v


def check_list(v, where: str, field: str, max_len: int = MAX_INT) -> list:
    if not isinstance(v, list):
        raise RQError(f"{_at(where, field)}: expected a list, got {_show(v)}")
    if len(v) > max_len:
        raise RQError(f"{_at(where, field)}: {len(v)} entries, at most {max_len} expected")
    return v


def check_dict(v, where: str, field: str) -> dict:
    if not isinstance(v, dict):
        raise RQError(f"{_at(where, field)}: expected a JSON object, got {_show(v)}")
    return v


def int_list(v, where: str, field: str, lo: int = 0, hi: int = MAX_INT, length: int | None = None) -> list[int]:
    check_list(v, where, field)
    if length is not None and len(v) != length:
        raise RQError(f"{_at(where, field)}: {len(v)} entries, expected {length}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
            raise RQError(f"{_at(where, field)}: expected integers in [{lo}, {hi}], got {_show(x)}")
    return v


def number_list(v, where: str, field: str, length: int | None = None, lo: float = -math.inf) -> list[float]:
    check_list(v, where, field)
    if length is not None and len(v) != length:
        raise RQError(f"{_at(where, field)}: {len(v)} entries, expected {length}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < lo:
            raise RQError(f"{_at(where, field)}: expected finite numbers >= {lo}, got {_show(x)}")
    return v


def _show(v) -> str:
    s = json.dumps(v) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------ model configs
# size fields of a transformers config: positive integers within bounds when present
_CONFIG_SIZES = {
    "hidden_size": MAX_DIM, "intermediate_size": MAX_DIM, "moe_intermediate_size": MAX_DIM,
    "shared_expert_intermediate_size": MAX_DIM, "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_DIM,
    "num_key_value_heads": MAX_DIM, "head_dim": MAX_DIM, "vocab_size": MAX_VOCAB, "num_experts": MAX_EXPERTS,
    "num_local_experts": MAX_EXPERTS, "n_routed_experts": MAX_EXPERTS, "num_experts_per_tok": MAX_EXPERTS,
    "max_position_embeddings": 1 << 24,
}


def check_model_config(d, where: str) -> dict:
    """A config.json's basic types: an object with a string ``model_type`` and sane size fields."""
    check_dict(d, where, "")
    check_str(get(d, "model_type", where), where, "model_type", 128)
    for key, hi in _CONFIG_SIZES.items():
        if key in d and d[key] is not None:
            check_int(d[key], where, key, 1, hi)
    return d


# ------------------------------------------------------------------------------ option values
BUDGET_FACTOR_MIN = 1e-6  # below this no layer fits in any scheme anyway
BUDGET_BYTES_MAX = 1 << 60  # 1 EiB of expert memory
_BUDGET_SPEC = re.compile(r"^\s*([0-9]*\.?[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-z]*)\s*$", re.IGNORECASE)


def check_budget_spec(spec):
    """A ``--budget`` spec of sane magnitude (returned unchanged), before the planner's exact parser
    (``rq_tool.plan.budget``) builds a Fraction of it: ``1e-99999999`` would be a 100-million-digit
    integer there. Factors must lie in [1e-6, 10], sizes between 1 byte and 1 EiB."""
    from .plan.budget import MAX_FACTOR, _parse  # the planner's own grammar, parsed once it is cheap

    hint = "a factor like 0.9 or 1.1x, or a size with a unit like 120MB or 1.5GiB"
    if isinstance(spec, str):
        m = _BUDGET_SPEC.match(spec)
        if not m:
            raise RQError(f"{spec!r} is not a budget ({hint})")
        if m.group(2) and (len(m.group(2)) > 4 or abs(int(m.group(2))) > 30) or len(m.group(1)) > 40:
            raise RQError(f"budget {spec!r} is out of range ({hint})")
    elif isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise RQError(f"{spec!r} is not a budget ({hint})")
    kind, v = _parse(spec)
    if kind == "factor" and not BUDGET_FACTOR_MIN <= v <= MAX_FACTOR:
        raise RQError(f"budget {spec!r}: a factor must lie in [{BUDGET_FACTOR_MIN:g}, {MAX_FACTOR:g}]")
    if kind == "bytes" and not 1 <= v <= BUDGET_BYTES_MAX:
        raise RQError(f"budget {spec!r}: a size must lie between 1 byte and 1 EiB")
    return spec

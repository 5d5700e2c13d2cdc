"""What ``rq plan`` reads: recorded expert loads from rq or from a serving engine (I/O only).

Legend: N rows (calibration sequences, chunks or recorded steps), L MoE layers, E logical
experts, D decoder layers (dense ones included).

- ``profile.json`` (``rq calibrate``; v2 brings per-sequence loads and domains, v1 pooled only);
- a safetensors file with ``loads [N, L, E]`` (optional ``domain [N]`` int64; its metadata may
  name the domains as a comma-separated ``domains`` entry);
- SGLang's expert-distribution counts: JSON ``{"logical_count": [D][E]}`` or ``[steps][D][E]``,
  or its recorder's ``.pt`` dump (read with ``torch.load(weights_only=True)``, never unpickled).
  Rows of a ``[D][E]`` table that are all zero are taken as dense layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RQError


@dataclass(frozen=True)
class LoadSource:
    """``seq_loads [N, L, E]`` float64 (N = 1: pooled only), ``layers [L]`` absolute ids."""

    path: Path
    kind: str  # "profile" | "loads" | "sglang"
    seq_loads: torch.Tensor
    layers: tuple[int, ...]
    num_hidden_layers: int
    top_k: int | None = None
    tokens_per_row: int | None = None  # tokens behind one row of seq_loads, when known
    rows_per_seq: int = 1  # rows per calibration sequence (a profile calibrated per chunk)
    groups: torch.Tensor | None = None  # [N] domain index
    group_names: tuple[str, ...] | None = None
    source_scheme: str = "bf16"
    activation: str = "silu"
    rows_are_steps: bool = False  # recorded engine steps: one row is one step

    @property
    def num_experts(self) -> int:
        return int(self.seq_loads.shape[-1])


def _counts(x, where: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise RQError(f"{where}: logical_count must be a [layers][experts] or [steps][layers][experts] array of numbers") from None
    if t.dim() not in (2, 3) or t.numel() == 0:
        raise RQError(f"{where}: logical_count has shape {tuple(t.shape)}, expected [layers, experts] or "
                      "[steps, layers, experts]")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise RQError(f"{where}: logical_count must hold finite non-negative counts")
    return t if t.dim() == 3 else t[None]


def _sglang(path: Path, obj) -> LoadSource:
    where = str(path)
    if isinstance(obj, dict):
        if "logical_count" not in obj:
            raise RQError(f"{where}: no 'logical_count' (keys: {', '.join(map(str, obj)) or 'none'})")
        obj = obj["logical_count"]
    t = _counts(obj, where)
    D = t.shape[1]
    moe = (t.sum((0, 2)) > 0).nonzero().flatten()
    if moe.numel() == 0:
        raise RQError(f"{where}: every count is zero; nothing to plan")
    return LoadSource(path, "sglang", t[:, moe], tuple(moe.tolist()), D, rows_are_steps=t.shape[0] > 1)


def _safetensors(path: Path) -> LoadSource:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            if "loads" not in keys:
                raise RQError(f"{path}: no 'loads' tensor (tensors: {', '.join(sorted(keys)) or 'none'})")
            loads = f.get_tensor("loads")
            dom = f.get_tensor("domain") if "domain" in keys else None
    except RQError:
        raise
    except Exception as e:  # noqa: BLE001 -- not a safetensors file
        raise RQError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if loads.dim() != 3 or loads.numel() == 0:
        raise RQError(f"{path}: 'loads' has shape {tuple(loads.shape)}, expected [N, layers, experts]")
    loads = loads.double()
    if not torch.isfinite(loads).all() or (loads < 0).any():
        raise RQError(f"{path}: 'loads' must hold finite non-negative counts")
    names = tuple(meta["domains"].split(",")) if meta.get("domains") else None
    if dom is not None:
        dom = dom.long()
        if dom.shape != (loads.shape[0],) or (dom < 0).any():
            raise RQError(f"{path}: 'domain' must be [{loads.shape[0]}] non-negative indices")
        if names is not None and int(dom.max()) >= len(names):
            raise RQError(f"{path}: 'domain' indexes {int(dom.max()) + 1} domains, metadata names {len(names)}")
    L = loads.shape[1]
    return LoadSource(path, "loads", loads, tuple(range(L)), L, groups=dom, group_names=names)


def _profile(path: Path) -> LoadSource:
    from ..calibrate.profile import Profile

    prof = Profile.load(path)
    seq = prof.seq_loads.double() if prof.seq_loads is not None else prof.load_matrix().double()[None]
    layers = tuple(lp.layer for lp in prof.layers)
    D = prof.model.get("num_hidden_layers")
    D = int(D) if isinstance(D, int) and D > max(layers) else max(layers) + 1
    return LoadSource(path, "profile", seq, layers, D, top_k=prof.model.get("top_k"),
                      tokens_per_row=prof.tokens_per_row if prof.seq_loads is not None else None,
                      rows_per_seq=prof.rows_per_sequence if prof.seq_loads is not None else 1,
                      groups=prof.seq_domain, group_names=None if prof.domains is None else tuple(prof.domains),
                      source_scheme=str(prof.model.get("expert_dtype") or "bf16"),
                      activation=str(prof.model.get("activation") or "silu"))


def read_loads(path) -> LoadSource:
    """Dispatch on the file (see module docstring); one ``RQError`` line for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise RQError(f"{str(path)!r} not found (give a profile.json, a loads .safetensors, or SGLang "
                      "expert-distribution counts .json / .pt)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors(path)
    if suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- refused (pickled objects) or damaged
            raise RQError(f"{path}: cannot read as a weights-only torch file ({type(e).__name__}); rq never "
                          "unpickles, save plain tensors / dicts of tensors") from None
        return _sglang(path, obj)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RQError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if isinstance(obj, dict) and obj.get("format") == "rq-profile":
        return _profile(path)
    return _sglang(path, obj)

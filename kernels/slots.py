"""One MoE layer's physical expert slots, stored grouped by scheme (rq slot format, version 1).

Legend: P physical slots, H hidden size, I expert intermediate size, n_g slots in scheme group g.

Each slot p stores one expert: ``gate_up [2I, H]`` (gate rows [0, I), up rows [I, 2I); gpt-oss
checkpoints are de-interleaved on rewrite) and ``down [H, I]``, nn.Linear layout. Slots are
grouped by storage scheme; ``slot_scheme[p]`` names the group and ``slot_index[p]`` the row in it.
Per group, the tensors follow ``rq_tool.quant.schemes`` (stacked over the group's slots):

- float (fp32 / bf16 / fp16): ``gate_up [n_g, 2I, H]``, ``down [n_g, H, I]``;
- int8: ``gate_up [n_g, 2I, H] int8``, ``gate_up_scale [n_g, 2I] fp32``, ``down [n_g, H, I] int8``,
  ``down_scale [n_g, H] fp32``, with ``W ~= q * scale[:, None]``;
- nf4: ``gate_up [n_g, 2I*H/2] uint8``, ``gate_up_absmax [n_g, 2I*H/64] fp32``, same for ``down``
  (bitsandbytes packing, blocksize 64);
- fp8: ``gate_up [n, 2I, H] float8_e4m3fn``, ``gate_up_scale_inv [n, ceil(2I/128), ceil(H/128)] fp32``,
  ``down [n, H, I]``, ``down_scale_inv [n, ceil(H/128), ceil(I/128)]``, ``W = q * scale_inv`` of its
  128 x 128 block (an FP8 source's experts kept as stored).

Quantizing and dequantizing a group go through the scheme's own ``quantize`` / ``dequantize``
(``rq_tool.quant``): one path for the rewrite, the runtime and both kernel implementations. The
container is :class:`rq_tool.kernels.types.SlotWeights`.
"""

from __future__ import annotations

import torch

from rq_tool.errors import RQError
from rq_tool.quant import NF4_BLOCKSIZE, get_scheme
from rq_tool.quant.schemes import FP8_BLOCK

# scheme kind -> extra tensor suffix per matrix (None for float)
_EXTRA = {"int8": "scale", "nf4": "absmax", "fp8": "scale_inv"}
# kinds the kernels dequantize (the slots a batch uses) before a float matmul
DEQUANTIZED_KINDS = ("nf4", "fp8")


def scheme_kind(name: str) -> str:
    """``"float"``, ``"int8"``, ``"nf4"`` or ``"fp8"`` for a scheme name."""
    if get_scheme(name).is_float:
        return "float"
    if name not in _EXTRA:
        raise RQError(f"the experts kernels do not read scheme {name!r}; they read float, int8, nf4 and fp8")
    return name


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


def group_shapes(scheme: str, n: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """Stored tensors of one scheme group of ``n`` slots: name -> shape (slot format v1)."""
    kind = scheme_kind(scheme)
    if kind == "nf4":
        if (2 * inter * hidden) % NF4_BLOCKSIZE or (hidden * inter) % NF4_BLOCKSIZE:
            raise RQError(f"nf4 slots need 2I*H and H*I divisible by {NF4_BLOCKSIZE} (H={hidden}, I={inter})")
        return {"gate_up": (n, inter * hidden), "down": (n, hidden * inter // 2),
                "gate_up_absmax": (n, 2 * inter * hidden // NF4_BLOCKSIZE),
                "down_absmax": (n, hidden * inter // NF4_BLOCKSIZE)}
    shapes = {"gate_up": (n, 2 * inter, hidden), "down": (n, hidden, inter)}
    if kind == "int8":
        shapes.update(gate_up_scale=(n, 2 * inter), down_scale=(n, hidden))
    elif kind == "fp8":
        bm, bn = FP8_BLOCK
        shapes.update(gate_up_scale_inv=(n, _blocks(2 * inter, bm), _blocks(hidden, bn)),
                      down_scale_inv=(n, _blocks(hidden, bm), _blocks(inter, bn)))
    return shapes


def quantize_group(scheme: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Store ``gate_up [n, 2I, H]`` and ``down [n, H, I]`` (dense) in ``scheme``: one group's tensors."""
    sch, extra = get_scheme(scheme), _EXTRA.get(scheme_kind(scheme))
    group: dict[str, torch.Tensor] = {}
    for key, w in (("gate_up", gate_up), ("down", down)):
        stored = [sch.quantize(m) for m in w]
        group[key] = torch.stack([st["w" if extra is None else "q"] for st in stored])
        if extra is not None:
            group[f"{key}_{extra}"] = torch.stack([st[extra] for st in stored])
    return group


def dequantize_group(scheme: str, group: dict[str, torch.Tensor], rows: torch.Tensor | slice, hidden: int,
                     inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (n of them) of one group -> ``gate_up [n, 2I, H]``, ``down [n, H, I]`` in ``dtype``.

    Float rows picked by a slice and already in ``dtype`` are views (no copy).
    """
    sch, extra = get_scheme(scheme), _EXTRA.get(scheme_kind(scheme))
    out = []
    for key, shape in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        if extra is None:
            out.append(group[key][rows].to(dtype))
            continue
        q, aux = group[key][rows], group[f"{key}_{extra}"][rows]
        out.append(sch.dequantize({"q": q, extra: aux}, (q.shape[0], *shape), dtype))
    return out[0], out[1]


def __getattr__(name: str):
    # SlotWeights moved to .types; importing it from here keeps working (lazily: no import cycle)
    if name == "SlotWeights":
        from .types import SlotWeights

        return SlotWeights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

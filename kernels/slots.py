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
  (bitsandbytes packing, blocksize 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rq_tool.arch.activation import activation_fn
from rq_tool.errors import RQError
from rq_tool.quant import NF4_BLOCKSIZE, get_scheme, nf4_dequantize

# scheme kind -> extra tensor suffix per matrix (None for float)
_EXTRA = {"int8": "scale", "nf4": "absmax"}


def scheme_kind(name: str) -> str:
    """``"float"``, ``"int8"`` or ``"nf4"`` for a scheme name."""
    if get_scheme(name).is_float:
        return "float"
    if name not in _EXTRA:
        raise RQError(f"the experts kernels do not read scheme {name!r}; they read float, int8 and nf4")
    return name


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
    return shapes


@dataclass(frozen=True)
class SlotWeights:
    """Physical slots of one MoE layer (see module docstring for the group tensors).

    schemes:       tuple of scheme names, one per group, e.g. ("bf16", "int8", "nf4").
    slot_scheme:   [P] int64, group of each slot (index into ``schemes``).
    slot_index:    [P] int64, row of each slot inside its group.
    groups:        one dict per group: ``gate_up``, ``down`` (+ ``*_scale`` | ``*_absmax``).
    hidden_size, intermediate_size: H, I.
    act:           activation spec, ``"glu:<name>"`` or ``"gptoss:<alpha>:<limit>"``.
    gate_up_bias:  [P, 2I] or None; down_bias: [P, H] or None (compute dtype, per slot).
    """

    schemes: tuple[str, ...]
    slot_scheme: torch.Tensor
    slot_index: torch.Tensor
    groups: tuple[dict[str, torch.Tensor], ...]
    hidden_size: int
    intermediate_size: int
    act: str
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def __post_init__(self):
        H, I, P = self.hidden_size, self.intermediate_size, self.num_slots
        assert len(self.groups) == len(self.schemes), "one tensor group per scheme"
        assert self.slot_scheme.shape == self.slot_index.shape == (P,)
        activation_fn(self.act)  # raises RQError on an unknown spec
        for name, g in zip(self.schemes, self.groups):
            shapes = group_shapes(name, g["gate_up"].shape[0], H, I)
            for key, shape in shapes.items():
                got = tuple(g[key].shape) if key in g else None
                assert got == shape, f"scheme {name}: {key} should be {shape}, got {got}"
        if self.gate_up_bias is not None:
            assert self.gate_up_bias.shape == (P, 2 * I)
        if self.down_bias is not None:
            assert self.down_bias.shape == (P, H)

    @property
    def num_slots(self) -> int:
        return self.slot_scheme.numel()

    @property
    def device(self) -> torch.device:
        return self.slot_scheme.device

    def dequantize_rows(self, group: int, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of ``rows [n]`` of one group as ``gate_up [n, 2I, H]``, ``down [n, H, I]`` in ``dtype``."""
        H, I = self.hidden_size, self.intermediate_size
        g, kind, n = self.groups[group], scheme_kind(self.schemes[group]), rows.numel()
        if kind == "float":
            return g["gate_up"][rows].to(dtype), g["down"][rows].to(dtype)
        if kind == "int8":
            gu = g["gate_up"][rows].float() * g["gate_up_scale"][rows][:, :, None]
            return gu.to(dtype), (g["down"][rows].float() * g["down_scale"][rows][:, :, None]).to(dtype)
        # nf4: every matrix is a whole number of 64-blocks, so the rows dequantize as one buffer
        gu = nf4_dequantize(g["gate_up"][rows], g["gate_up_absmax"][rows], (n, 2 * I, H), dtype)
        return gu, nf4_dequantize(g["down"][rows], g["down_absmax"][rows], (n, H, I), dtype)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots as ``gate_up [P, 2I, H]``, ``down [P, H, I]`` in ``dtype`` (no copy when the
        layer is one float group already in ``dtype`` and in slot order)."""
        if len(self.groups) == 1 and scheme_kind(self.schemes[0]) == "float":
            g = self.groups[0]
            if g["gate_up"].dtype == dtype and torch.equal(self.slot_index, torch.arange(self.num_slots, device=self.device)):
                return g["gate_up"], g["down"]
        H, I, P = self.hidden_size, self.intermediate_size, self.num_slots
        gate_up = torch.empty(P, 2 * I, H, dtype=dtype, device=self.device)
        down = torch.empty(P, H, I, dtype=dtype, device=self.device)
        for group in range(len(self.groups)):
            members = (self.slot_scheme == group).nonzero().flatten()
            gate_up[members], down[members] = self.dequantize_rows(group, self.slot_index[members], dtype)
        return gate_up, down

    def dequantize_slot(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s ``gate_up [2I, H]`` and ``down [H, I]`` in ``dtype`` (float: a view, no copy)."""
        H, I = self.hidden_size, self.intermediate_size
        group, row = int(self.slot_scheme[slot]), int(self.slot_index[slot])
        g, kind = self.groups[group], scheme_kind(self.schemes[group])
        if kind == "float":
            return g["gate_up"][row].to(dtype), g["down"][row].to(dtype)
        if kind == "int8":
            gu = g["gate_up"][row].float() * g["gate_up_scale"][row][:, None]
            return gu.to(dtype), (g["down"][row].float() * g["down_scale"][row][:, None]).to(dtype)
        gu = nf4_dequantize(g["gate_up"][row], g["gate_up_absmax"][row], (2 * I, H), dtype)
        return gu, nf4_dequantize(g["down"][row], g["down_absmax"][row], (H, I), dtype)

    def to(self, device: torch.device | str) -> "SlotWeights":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SlotWeights(
            self.schemes, move(self.slot_scheme), move(self.slot_index),
            tuple({k: move(v) for k, v in g.items()} for g in self.groups),
            self.hidden_size, self.intermediate_size, self.act, move(self.gate_up_bias), move(self.down_bias),
        )

    @classmethod
    def from_dense(
        cls,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        slot_schemes: Sequence[str],
        act: str,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> "SlotWeights":
        """Quantize dense ``gate_up [P, 2I, H]``, ``down [P, H, I]`` slot by slot with ``rq_tool.quant``.

        ``slot_schemes [P]`` names each slot's scheme; groups appear in order of first use.
        """
        P, two_i, H = gate_up.shape
        assert down.shape == (P, H, two_i // 2) and len(slot_schemes) == P
        schemes = tuple(dict.fromkeys(slot_schemes))
        slot_scheme = torch.tensor([schemes.index(s) for s in slot_schemes], dtype=torch.int64)
        slot_index = torch.zeros(P, dtype=torch.int64)
        groups = []
        for gi, name in enumerate(schemes):
            members = (slot_scheme == gi).nonzero().flatten()
            slot_index[members] = torch.arange(members.numel())
            scheme, extra = get_scheme(name), _EXTRA.get(name)
            group: dict[str, torch.Tensor] = {}
            for key, w in (("gate_up", gate_up), ("down", down)):
                stored = [scheme.quantize(w[p]) for p in members.tolist()]
                group[key] = torch.stack([st["w" if extra is None else "q"] for st in stored])
                if extra is not None:
                    group[f"{key}_{extra}"] = torch.stack([st[extra] for st in stored])
            groups.append(group)
        return cls(schemes, slot_scheme.to(gate_up.device), slot_index.to(gate_up.device), tuple(groups),
                   H, two_i // 2, act, gate_up_bias, down_bias)

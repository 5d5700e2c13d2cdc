"""The two data types the kernels exchange: a batch's :class:`Dispatch` and a layer's :class:`SlotWeights`.

Legend: T tokens, K top-k, M = T*K routed (token, k) pairs, E logical experts, P physical slots,
H hidden size, I expert intermediate size, n_g slots in scheme group g.

Both live here, apart from the code that produces and consumes them, so that the torch paths
(``dispatch``, ``experts``) and the Triton paths (``dispatch_triton``, ``experts_triton``) import
one module of types and never each other. The slot storage format itself (tensor names, shapes,
quantize / dequantize of a scheme group) is ``slots``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rq_tool.arch.activation import activation_fn

from .slots import dequantize_group, group_shapes, quantize_group, scheme_kind


@dataclass(frozen=True)
class Dispatch:
    """Where every routed (token, k) pair goes, for one MoE layer and one batch.

    phy_ids:     [T, K] int64, physical slot of each pair.
    slot_counts: [P] int64, pairs per slot.
    sorted_ids:  [num_padded] int64, flat pair indices ``t*K + k`` grouped by slot (ascending slot,
                 flat order inside a slot), each slot's segment padded with the sentinel M up to a
                 multiple of ``block_size`` (vLLM's ``moe_align_block_size`` layout).
    block_slot:  [num_padded // block_size] int64, slot of each block of ``sorted_ids``.
    num_padded:  int, length of ``sorted_ids``.
    block_size:  int, the padding multiple (the experts kernel's BLOCK_M).

    Worked example: T=3, K=2, E=3, expert 0 replicated on slots 0 and 3 (P=4), block_size=2::

        topk_ids = [[0, 1], [0, 2], [1, 0]]      flat pairs 0..5: experts 0, 1, 0, 2, 1, 0
        log2phy  = [[0, 3], [1, -1], [2, -1]]    logcnt = [2, 1, 1]

    Expert 0's occurrences (pairs 0, 2, 5) go round-robin to its slots 0, 3, 0, so::

        phy_ids     = [[0, 1], [3, 2], [1, 0]]
        slot_counts = [2, 2, 1, 1]
        sorted_ids  = [0, 5 | 1, 4 | 3, 6 | 2, 6]     (6 = M: padding)
        block_slot  = [0, 1, 2, 3]                    num_padded = 8
    """

    phy_ids: torch.Tensor
    slot_counts: torch.Tensor
    sorted_ids: torch.Tensor
    block_slot: torch.Tensor
    num_padded: int
    block_size: int

    @property
    def num_pairs(self) -> int:
        """M = T*K, also the sentinel value in ``sorted_ids``."""
        return self.phy_ids.numel()


@dataclass(frozen=True)
class SlotWeights:
    """Physical slots of one MoE layer, grouped by storage scheme (format: ``slots`` docstring).

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

    def dequantize_rows(self, group: int, rows: torch.Tensor | slice,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of ``rows`` (n of them) of one group as ``gate_up [n, 2I, H]``, ``down [n, H, I]``."""
        return dequantize_group(self.schemes[group], self.groups[group], rows,
                                self.hidden_size, self.intermediate_size, dtype)

    def dequantize_slot(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s ``gate_up [2I, H]`` and ``down [H, I]`` in ``dtype`` (float: a view, no copy)."""
        group, row = int(self.slot_scheme[slot]), int(self.slot_index[slot])
        gate_up, down = self.dequantize_rows(group, slice(row, row + 1), dtype)
        return gate_up[0], down[0]

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
            groups.append(quantize_group(name, gate_up[members], down[members]))
        return cls(schemes, slot_scheme.to(gate_up.device), slot_index.to(gate_up.device), tuple(groups),
                   H, two_i // 2, act, gate_up_bias, down_bias)

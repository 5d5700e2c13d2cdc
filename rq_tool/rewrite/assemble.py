"""Collect one MoE layer's expert tensors from a stream of checkpoint keys; hand them out per expert.

Canonical (see ``rq_tool/arch/base.py``): ``gate_up [E, 2I, H]``, ``down [E, H, I]`` and, for
families with expert biases, ``gate_up_bias [E, 2I]``, ``down_bias [E, H]``. Per-expert checkpoints
are never stacked: ``expert(e)`` returns expert ``e``'s canonical rows as the source's own tensors
(``gate_up`` as the chunks ``[gate_e, up_e]`` whose rows in order form ``[2I, H]``), so slots can be
written or quantized straight from the memory-mapped source. Fused checkpoints (gpt-oss) are
converted to canonical once per layer. Values may be lazy (a callable that dequantizes on demand,
or a future): ``expert(e)`` hands them out unresolved, ``resolve`` makes the tensor.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from ..arch import ExpertKey, MoEFamily
from ..errors import RQError


def resolve(x):
    """A tensor from a tensor, a future (its result) or a zero-argument callable (called)."""
    if isinstance(x, Future):
        return x.result()
    return x() if callable(x) else x


class LayerAssembler:
    """Receives the expert tensors of one layer in any order; ``done`` once every key arrived."""

    def __init__(self, layer: int, expected_keys: set[str], family: MoEFamily, num_experts: int):
        self.layer = layer
        self.pending = set(expected_keys)
        self.family = family
        self.E = num_experts
        self.per_expert: dict[str, dict[int, object]] = {}
        self.fused_raw: dict[str, object] = {}
        self._fused: dict[str, torch.Tensor] | None = None

    @property
    def done(self) -> bool:
        return not self.pending

    def add(self, key: str, ek: ExpertKey, tensor) -> None:
        self.pending.discard(key)
        if ek.quantized_part:
            raise RQError(f"layer {self.layer}: {key} is a quantized expert tensor ({ek.tensor}); rq reads "
                          "F32/BF16/F16 expert weights only")
        if ek.expert is None:
            self.fused_raw[ek.role] = tensor
        else:
            self.per_expert.setdefault(ek.role, {})[ek.expert] = self._canonical(ek.role, tensor)

    def _canonical(self, role: str, tensor):
        """The family's canonical view of a per-expert tensor (lazy when ``tensor`` is; a lazy value
        is handed on as it is where the family's view is the identity, e.g. a quantized source's
        ``StoredExpert`` keeps its stored parts)."""
        canon = self.family.canonical_expert_tensor
        if isinstance(tensor, torch.Tensor):
            return canon(role, tensor)
        probe = torch.empty(2, 3, device="meta")
        if canon(role, probe) is probe:
            return tensor
        return lambda: canon(role, resolve(tensor))

    def check(self) -> None:
        """RQError unless every expert's gate/up/down (and biases, if any) arrived."""
        if self.pending:
            raise RQError(f"layer {self.layer}: expert tensors missing from the checkpoint: {sorted(self.pending)[:3]}")
        for role, parts in self.per_expert.items():
            if sorted(parts) != list(range(self.E)):
                raise RQError(f"layer {self.layer}: expert {role} tensors incomplete on disk")
        have = set(self.per_expert) | set(self.fused_raw)
        if not ({"gate", "up"} <= have or "gate_up" in have) or "down" not in have:
            raise RQError(f"layer {self.layer}: could not assemble gate/up/down expert weights")

    def _fused_canonical(self) -> dict[str, torch.Tensor]:
        if self._fused is None:
            self._fused = {}
            for role, t in self.fused_raw.items():
                self._fused.update(self.family.canonical_from_fused(role, resolve(t)))
        return self._fused

    def _rows(self, e: int, whole: str, halves: tuple[str, ...]) -> list[torch.Tensor] | None:
        fused = self._fused_canonical() if self.fused_raw else {}
        for src in (fused, self.per_expert):  # fused gate and up tensors (DBRX) are halves too
            if whole in src:
                return [src[whole][e]]
            if all(h in src for h in halves):
                return [src[h][e] for h in halves]
        return None

    def expert(self, e: int) -> dict[str, list[torch.Tensor] | None]:
        """Expert ``e`` as row chunks (tensors or lazy, see ``resolve``): ``gate_up`` (rows form
        ``[2I, H]``), ``down`` (``[H, I]``), ``gate_up_bias`` (``[2I]``) / ``down_bias`` (``[H]``) or None."""
        return {"gate_up": self._rows(e, "gate_up", ("gate", "up")), "down": self._rows(e, "down", ("down",)),
                "gate_up_bias": self._rows(e, "gate_up_bias", ("gate_bias", "up_bias")),
                "down_bias": self._rows(e, "down_bias", ("down_bias",))}

    def canonical(self) -> dict[str, torch.Tensor]:
        """The whole layer stacked: ``gate_up [E, 2I, H]``, ``down [E, H, I]`` (+ biases)."""
        self.check()
        out = {}
        for e in range(self.E):
            for name, rows in self.expert(e).items():
                if rows is not None:
                    rows = [resolve(r) for r in rows]
                    out.setdefault(name, []).append(torch.cat(rows) if len(rows) > 1 else rows[0])
        return {name: torch.stack(ts) for name, ts in out.items()}

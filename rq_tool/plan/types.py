"""Planner options and outputs: ``PlanOptions`` in, ``Plan`` (one ``LayerPlan`` per layer) out.

Legend: L MoE layers, E logical experts, P physical slots, S quantization schemes, R max replicas.

A layer's slots follow one convention: slots ``0..E-1`` are the original experts in expert order
(``phy2log[:E] == arange(E)``), replicas are appended after in the order they were added.
``log2phy[e, :logcnt[e]]`` lists the slots of expert e in increasing slot order, padded with -1.
Both dataclasses round-trip through JSON (``to_dict`` / ``from_dict``); the Plan document carries
``format: "rq-plan"`` and an integer ``version``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from .. import defaults
from ..errors import RQError, check_format, dataclass_fields_of
from .predict import check_layer

PLAN_FORMAT = ("rq-plan", 2)  # v2: optional device placement (num_devices, per-layer slot_device)
PLAN_READABLE = (1,)

# What the caller may feed the planner as ``error [L, E, S]`` (it builds the tensor; the planner
# never special-cases it): the profile's measured quant_error, or error proportional to load (the
# "frequency-only" baseline: every routed token is assumed to suffer the same damage).
ERROR_WEIGHTS: tuple[str, ...] = defaults.IMPORTANCE


@dataclass(frozen=True)
class PlanOptions:
    """How to plan. ``strategy`` names an entry of ``rq_tool.plan.STRATEGIES``.

    - ``max_error``: cap on the predicted error (per layer, or for the whole model when the budget
      is global); replication stops before exceeding it. ``None``: no cap. It never overrides the
      budget: a budget below 1.0x is met whatever the error.
    - ``max_replicas_per_expert``: cap on ``logcnt[e]`` (the original counts as one).
    - ``max_slots_factor``: cap on ``P <= floor(max_slots_factor * E)`` per layer.
    - ``min_gain``: a replica must lower the layer's predicted LIS by at least this fraction of
      its current value, else replication of that layer stops.
    - ``error_weight``: which damage estimate the caller used to build ``error`` (recorded only).
    """

    VERSION: ClassVar[int] = 1

    strategy: str = defaults.STRATEGY
    max_error: float | None = None
    max_replicas_per_expert: int = defaults.MAX_REPLICAS_PER_EXPERT
    max_slots_factor: float = defaults.MAX_SLOTS_FACTOR
    min_gain: float = defaults.MIN_GAIN
    error_weight: str = defaults.IMPORTANCE_DEFAULT

    def __post_init__(self):
        if self.max_error is not None and not self.max_error >= 0:
            raise RQError(f"max_error must be >= 0 or unset, got {self.max_error}")
        if int(self.max_replicas_per_expert) != self.max_replicas_per_expert or self.max_replicas_per_expert < 1:
            raise RQError(f"max_replicas_per_expert must be an integer >= 1, got {self.max_replicas_per_expert}")
        if not self.max_slots_factor >= 1.0:
            raise RQError(f"max_slots_factor must be >= 1.0 (the originals need E slots), got {self.max_slots_factor}")
        if not self.min_gain >= 0:
            raise RQError(f"min_gain must be >= 0, got {self.min_gain}")
        if self.error_weight not in ERROR_WEIGHTS:
            raise RQError(f"unknown error_weight {self.error_weight!r}; known: {', '.join(ERROR_WEIGHTS)}")

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanOptions":
        return cls(**dataclass_fields_of(cls, d, "plan options"))


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """The plan of one MoE layer (tensors int64; predictions from ``rq_tool.plan.predict``).

    - ``phy2log [P]``: logical expert of each physical slot.
    - ``slot_scheme [P]``: index into ``Plan.schemes`` of each slot's storage scheme.
    - ``logcnt [E]``: slots per logical expert (>= 1).
    - ``log2phy [E, R]``: slots of each expert, increasing, padded with -1; ``R = max(logcnt)``.
    - ``lis_before`` / ``lis_after``: predicted LIS with E originals / with the P slots, each
      expert's tokens split evenly over its slots.
    - ``bytes_before`` / ``bytes_after``: expert bytes, all-source / as planned.
    - ``pred_error``: sum over non-source slots of ``error[e, s] / logcnt[e]``.
    - ``budget_bytes``: this layer's budget, ``None`` when the budget is global.
    - ``slot_device [P]``: expert-parallel device of each slot (plans made with ``--ep-size``).
    """

    layer: int
    phy2log: torch.Tensor
    slot_scheme: torch.Tensor
    logcnt: torch.Tensor
    log2phy: torch.Tensor
    lis_before: float
    lis_after: float
    bytes_before: int
    bytes_after: int
    pred_error: float
    budget_bytes: int | None = None
    slot_device: torch.Tensor | None = None

    @property
    def num_logical(self) -> int:
        return int(self.logcnt.numel())

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.numel())

    @property
    def num_replicas(self) -> int:
        """Extra slots beyond the E originals."""
        return self.num_physical - self.num_logical

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "phy2log": self.phy2log.tolist(),
            "slot_scheme": self.slot_scheme.tolist(),
            "logcnt": self.logcnt.tolist(),
            "log2phy": self.log2phy.tolist(),
            "lis_before": self.lis_before,
            "lis_after": self.lis_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "pred_error": self.pred_error,
            "budget_bytes": self.budget_bytes,
            **({} if self.slot_device is None else {"slot_device": self.slot_device.tolist()}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        E = len(d["logcnt"])
        log2phy = torch.tensor(d["log2phy"], dtype=torch.int64).reshape(E, -1)
        return cls(
            layer=int(d["layer"]),
            phy2log=torch.tensor(d["phy2log"], dtype=torch.int64),
            slot_scheme=torch.tensor(d["slot_scheme"], dtype=torch.int64),
            logcnt=torch.tensor(d["logcnt"], dtype=torch.int64),
            log2phy=log2phy,
            lis_before=float(d["lis_before"]),
            lis_after=float(d["lis_after"]),
            bytes_before=int(d["bytes_before"]),
            bytes_after=int(d["bytes_after"]),
            pred_error=float(d["pred_error"]),
            budget_bytes=None if d.get("budget_bytes") is None else int(d["budget_bytes"]),
            slot_device=None if d.get("slot_device") is None else torch.tensor(d["slot_device"], dtype=torch.int64),
        )


@dataclass(frozen=True, eq=False)
class Plan:
    """A replication + quantization plan for L MoE layers.

    ``schemes [S]`` names the storage schemes (index 0 = the source scheme), ``scheme_bytes [S]``
    the stored bytes of one expert in each. ``budget_bytes`` is the total budget (the sum of the
    per-layer budgets, or the global one).
    """

    layers: tuple[LayerPlan, ...]
    schemes: tuple[str, ...]
    scheme_bytes: tuple[int, ...]
    options: PlanOptions
    global_budget: bool
    budget_bytes: int
    num_devices: int | None = None  # G, when every layer has a slot_device
    balance: dict | None = None  # predicted per-step device balance (rq_tool.plan.balance.predict_balance)

    @property
    def source_scheme(self) -> str:
        return self.schemes[0]

    @property
    def bytes_before(self) -> int:
        return sum(lp.bytes_before for lp in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(lp.bytes_after for lp in self.layers)

    @property
    def pred_error(self) -> float:
        return float(sum(lp.pred_error for lp in self.layers))

    @property
    def lis_before(self) -> float:
        """Mean over layers of the predicted LIS before (1.0 for an empty plan)."""
        return sum(lp.lis_before for lp in self.layers) / len(self.layers) if self.layers else 1.0

    @property
    def lis_after(self) -> float:
        return sum(lp.lis_after for lp in self.layers) / len(self.layers) if self.layers else 1.0

    def totals(self) -> dict:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "pred_error": self.pred_error,
            "lis_before_mean": self.lis_before,
            "lis_after_mean": self.lis_after,
            "replicas": sum(lp.num_replicas for lp in self.layers),
        }

    def to_dict(self) -> dict:
        name, version = PLAN_FORMAT
        return {
            "format": name,
            "version": version,
            "schemes": list(self.schemes),
            "scheme_bytes": list(self.scheme_bytes),
            "options": self.options.to_dict(),
            "global_budget": self.global_budget,
            "budget_bytes": self.budget_bytes,
            "totals": self.totals(),
            "num_devices": self.num_devices,
            "balance": self.balance,
            "layers": [lp.to_dict() for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        check_format(d, PLAN_FORMAT, "plan", where, PLAN_READABLE)
        try:
            plan = cls(
                layers=tuple(LayerPlan.from_dict(row) for row in d["layers"]),
                schemes=tuple(d["schemes"]),
                scheme_bytes=tuple(int(b) for b in d["scheme_bytes"]),
                options=PlanOptions.from_dict(d["options"]),
                global_budget=bool(d["global_budget"]),
                budget_bytes=int(d["budget_bytes"]),
                num_devices=None if d.get("num_devices") is None else int(d["num_devices"]),
                balance=d.get("balance"),
            )
            for lp in plan.layers:
                check_layer(lp.phy2log, lp.slot_scheme, lp.logcnt, lp.log2phy, len(plan.schemes))
        except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as exc:
            raise RQError(f"{where}: malformed plan ({type(exc).__name__}: {exc})") from None
        return plan

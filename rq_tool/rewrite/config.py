"""``RewriteConfig``: everything a rewrite's plan depends on, in one frozen, versioned object.

``rq rewrite``'s planning flags build one (their defaults are its field defaults), and
``rq_tool.rewrite(model, profile, out, config)`` takes it; keyword overrides
(``rq_tool.rewrite(..., strategy="paper")``) are applied with ``dataclasses.replace``. How the
output is written (``force``, ``dry_run``, ``progress``, ``shard_bytes``) is not part of it: it
never changes the plan. The planner's own options (``rq_tool.plan.PlanOptions``) are derived
from it by ``plan_options``. Light on purpose (no torch): the CLI imports it to print its help.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from .. import defaults
from ..errors import RQError, dataclass_fields_of


@dataclass(frozen=True)
class RewriteConfig:
    """How to plan a rewrite (one field per ``rq rewrite`` planning flag).

    - ``budget``: expert memory, a factor of the original (``1.0``, ``"0.9"``, ``"1.1x"``) or a size
      (``"120MB"``); per MoE layer, or for all layers together when ``global_budget``.
    - ``strategy``: a name of ``rq_tool.plan.STRATEGIES``.
    - ``schemes``: quantization schemes the planner may use.
    - ``importance``: what picks the experts to quantize (``defaults.IMPORTANCE``).
    - ``max_error``: cap on predicted quantization noise relative to expert output power
      (default ``defaults.MAX_ERROR``), or None: no cap. With the greedy strategy (per-layer
      budget) a cap also turns on the accuracy guard and the held-out replica check
      (``rq_tool.plan.guarded``); None plans the plain greedy of earlier versions.
    - ``ep_devices``: also fit every layer's slots onto this many EP devices, or None.
    - ``ep_size``: plan per step for this many expert-parallel devices with the placement in the
      loop (``rq_tool.plan.ep_plan``; ``strategy`` is then not used), or None.
    - ``batch_tokens``: tokens per step the per-step planners score (the guarded greedy's held-out
      check, ``ep_size``); None: ``defaults.SEQS_PER_STEP`` calibration rows per step.
    """

    VERSION: ClassVar[int] = 1

    budget: str | float = defaults.BUDGET
    global_budget: bool = False
    strategy: str = defaults.STRATEGY
    schemes: tuple[str, ...] = defaults.QUANT_SCHEMES
    importance: str = defaults.IMPORTANCE_DEFAULT
    max_error: float | None = defaults.MAX_ERROR
    ep_devices: int | None = None
    ep_size: int | None = None
    batch_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "schemes", tuple(self.schemes))
        if self.strategy not in defaults.STRATEGIES:
            raise RQError(f"unknown strategy {self.strategy!r}; known: {', '.join(defaults.STRATEGIES)}")
        if self.importance not in defaults.IMPORTANCE:
            raise RQError(f"unknown --importance {self.importance!r}; known: {', '.join(defaults.IMPORTANCE)}")
        if self.batch_tokens is not None and not (isinstance(self.batch_tokens, int) and self.batch_tokens >= 1):
            raise RQError(f"--batch-tokens must be an integer >= 1, got {self.batch_tokens!r}")
        # max_error and ep_devices are checked where they are used (PlanOptions, plan.fit)

    def plan_options(self, **overrides):
        """The planner's ``PlanOptions`` for this config (``overrides``: its other fields)."""
        from ..plan import PlanOptions

        return PlanOptions(strategy=self.strategy, max_error=self.max_error, error_weight=self.importance,
                           **overrides)

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self), "schemes": list(self.schemes)}

    @classmethod
    def from_dict(cls, d: dict) -> "RewriteConfig":
        return cls(**dataclass_fields_of(cls, d, "rewrite config"))

"""Run a model over held-out windows and count what its experts receive, batch by batch.

Legend: L MoE layers, E logical experts, P physical slots (per layer), B batches.

``ExpertCounter`` (one owner, always restored) puts a forward pre-hook on every MoE block's
experts module: the ``top_k_index [T, K]`` it is called with are the ids actually used (so a
routing policy such as LASER is counted as it routes). For rewritten models it also switches on
the ``RQExperts`` per-slot counters (``count_load``/``slot_load``) and reads them after every
batch: slot loads are the runtime's own counts, not a prediction. Plain models have one slot per
expert (``phy2log = arange(E)``), so their slot loads are their expert loads.

Perplexity and accuracy come from ``rq_tool.eval.perplexity.evaluate_ids``, one batch at a time.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import MoEFamily
from ..errors import RQError
from ..lis import lis
from ..runtime import RQExperts
from .perplexity import evaluate_ids


@dataclass
class Measure:
    """What one model did on one set of windows (a domain, or several pooled).

    ``load [L, E]`` logical token-slots; ``slot_load[l] [P_l]`` per physical slot (int64 counts,
    float64 for a weighted mixture);
    ``batch_lis [L, B]`` float64 the slot-level LIS of every batch on its own.
    """

    nll_sum: float
    correct: int
    tokens: int
    load: torch.Tensor
    slot_load: list[torch.Tensor]
    batch_lis: torch.Tensor

    @property
    def ppl(self) -> float:
        import math

        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")

    def lis_layers(self) -> list[float]:
        """Slot-level LIS of each layer over all windows pooled: ``P * max slot load / total``."""
        return [float(lis(s)) for s in self.slot_load]

    @staticmethod
    def pool(parts: list["Measure"], shares: list[float] | None = None) -> "Measure":
        """All windows of ``parts`` together, or (``shares``) a mixture with those token shares.

        A mixture rescales each part to ``share * total tokens`` (losses and loads are sums over
        tokens, so they scale with it); its ``batch_lis [L, 1]`` is the share-weighted mean of
        the parts' per-batch LIS (single-domain batches).
        """
        if not parts:
            raise ValueError("nothing to pool")
        if shares is None:
            return Measure(
                nll_sum=sum(p.nll_sum for p in parts), correct=sum(p.correct for p in parts),
                tokens=sum(p.tokens for p in parts), load=sum(p.load for p in parts),
                slot_load=[sum(s) for s in zip(*(p.slot_load for p in parts))],
                batch_lis=torch.cat([p.batch_lis for p in parts], dim=1))
        total_share = float(sum(shares))
        if len(shares) != len(parts) or total_share <= 0 or min(shares) < 0:
            raise RQError(f"mixture shares {list(shares)} do not fit {len(parts)} domains")
        tokens = sum(p.tokens for p in parts)
        f = [s / total_share * tokens / p.tokens for s, p in zip(shares, parts)]
        return Measure(
            nll_sum=sum(fi * p.nll_sum for fi, p in zip(f, parts)),
            correct=sum(fi * p.correct for fi, p in zip(f, parts)),
            tokens=tokens, load=sum(fi * p.load.double() for fi, p in zip(f, parts)),
            slot_load=[sum(fi * x.double() for fi, x in zip(f, s)) for s in zip(*(p.slot_load for p in parts))],
            batch_lis=sum(s / total_share * p.batch_lis.mean(1, keepdim=True) for s, p in zip(shares, parts)))


@dataclass
class ModelMeasure:
    """Per-domain measures plus the layer map: ``layers [L]``, ``phy2log[l] [P_l]``."""

    layers: list[int]
    phy2log: list[torch.Tensor]
    slot_scheme: list[tuple[str, ...]] | None
    domains: dict[str, Measure]
    policy_stats: list[dict] | None = None

    def pooled(self, names, shares=None) -> Measure:
        return Measure.pool([self.domains[d] for d in names], shares)


class ExpertCounter:
    """Context manager counting, per MoE layer, the ids each experts module receives."""

    def __init__(self, model: nn.Module, family: MoEFamily):
        self.blocks = family.moe_blocks(model)
        if not self.blocks:
            raise RQError("model has no MoE blocks to count")
        self.experts = [b.experts for _, b in self.blocks]
        self.rq = [e for e in self.experts if isinstance(e, RQExperts)]
        if self.rq and len(self.rq) != len(self.experts):
            raise RQError("model mixes RQ and plain experts modules")
        self.num_experts = [self._num_experts(e) for e in self.experts]
        self.batch_load = [torch.zeros(E, dtype=torch.int64) for E in self.num_experts]
        self._hooks = []
        self._saved = []

    @staticmethod
    def _num_experts(experts: nn.Module) -> int:
        if isinstance(experts, RQExperts):
            return experts.num_experts
        n = getattr(experts, "num_experts", None)
        if n is None:
            n = experts.gate_up_proj.shape[0]
        return int(n)

    def phy2log(self) -> list[torch.Tensor]:
        if self.rq:
            return [e.phy2log.cpu().clone() for e in self.rq]
        return [torch.arange(E) for E in self.num_experts]

    def __enter__(self) -> "ExpertCounter":
        try:
            for i, experts in enumerate(self.experts):
                self._hooks.append(experts.register_forward_pre_hook(self._make_hook(i), with_kwargs=True))
            for e in self.rq:
                self._saved.append((e, e.count_load, e.slot_load.clone()))
                e.count_load = True
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        for e, flag, saved in self._saved:
            e.count_load = flag
            e.slot_load.copy_(saved)
        self._hooks.clear()
        self._saved.clear()

    def _make_hook(self, i: int):
        E = self.num_experts[i]

        def hook(module, args, kwargs):
            ids = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            self.batch_load[i] += torch.bincount(ids.reshape(-1).long(), minlength=E).cpu()

        return hook

    def start_batch(self) -> None:
        for b in self.batch_load:
            b.zero_()
        for e in self.rq:
            e.slot_load.zero_()

    def batch_slot_load(self) -> list[torch.Tensor]:
        if self.rq:
            return [e.slot_load.cpu().clone() for e in self.rq]
        return [b.clone() for b in self.batch_load]


def measure(model: nn.Module, family: MoEFamily, domains: dict[str, torch.Tensor], *, batch_size: int = 8,
            policy=None, progress: bool = False, desc: str = "scoring") -> ModelMeasure:
    """Score every domain's windows ``[N, S]`` in batches of ``batch_size`` (single-domain batches).

    ``policy``: ``None`` or a factory ``(model, family) -> context manager`` wrapping the run
    (e.g. LASER routing); if the manager has ``stats`` they are returned as ``policy_stats``.
    ``progress``: a bar of windows scored on stderr, drawn only when stderr is a terminal.
    """
    if batch_size < 1:
        raise RQError(f"--batch-size must be >= 1 (got {batch_size})")
    from tqdm import tqdm

    out: dict[str, Measure] = {}
    pol = policy(model, family) if policy is not None else contextlib.nullcontext()
    bar = tqdm(total=sum(int(ids.shape[0]) for ids in domains.values()), desc=f"scoring {desc}", unit="window",
               file=sys.stderr, leave=False, disable=None if progress else True)  # None: off when not a tty
    with bar, torch.inference_mode(), ExpertCounter(model, family) as counter, pol:
        for name, ids in domains.items():
            nll, correct, tokens = 0.0, 0, 0
            load = torch.zeros(len(counter.experts), max(counter.num_experts), dtype=torch.int64)
            slot_load = None
            batch_lis = []
            for start in range(0, ids.shape[0], batch_size):
                counter.start_batch()
                s = evaluate_ids(model, ids[start:start + batch_size], batch_size=batch_size)
                nll, correct, tokens = nll + s["nll_sum"], correct + s["correct"], tokens + s["tokens"]
                load += torch.stack(counter.batch_load)
                sl = counter.batch_slot_load()
                slot_load = sl if slot_load is None else [a + b for a, b in zip(slot_load, sl)]
                batch_lis.append(torch.stack([lis(x) for x in sl]))
                bar.update(min(batch_size, ids.shape[0] - start))
            out[name] = Measure(nll, correct, tokens, load, slot_load, torch.stack(batch_lis, dim=1))
    schemes = [tuple(e.schemes[int(i)] for i in e.slot_scheme) for e in counter.rq] if counter.rq else None
    return ModelMeasure([layer for layer, _ in counter.blocks], counter.phy2log(), schemes, out,
                        getattr(pol, "stats", None))

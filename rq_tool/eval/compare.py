"""Score models on held-out data and compare a candidate with the original.

Legend: L MoE layers, E logical experts, P physical slots (per layer), G devices.

``score_original`` / ``score_rewritten`` / ``score_policy`` load a model, run it over the
held-out domains (``measure``) and read its expert bytes from the safetensors headers; they
return a ``Scored``. ``compare(original, candidate, heldout)`` turns two of them into one
JSON-ready result (format ``rq-eval`` v1):

- ``quality``: perplexity and next-token top-1 accuracy per domain, ``heldout`` (the training
  domains' held-out split pooled: the headline) and ``unseen`` (domains never trained on), with
  deltas (``ppl_delta_pct`` in percent, ``acc_delta`` in points of fraction);
- ``lis``: per layer ``before`` (original experts) and ``after`` (the candidate's physical slots,
  from its own runtime counters), their means, the reduction factor and the fraction of the
  excess imbalance removed; per domain the pooled and the per-batch (single-domain batches) LIS;
  the raw held-out loads (``load_before [L][E]``, ``slot_load_after [L][P]``);
- ``bytes``: expert bytes before / after from the safetensors headers;
- ``ep``: simulated expert parallelism (``rq_tool.eval.ep``), layer means per G;
- ``matched`` (when domain weights are given): quality, lis and ep on the held-out domains mixed
  in the calibration traffic's proportions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import defaults
from ..errors import RQError
from ..lis import excess_removed
from .ep import DEVICE_COUNTS, simulate_layer
from .heldout import HeldOut
from .measure import Measure, ModelMeasure, measure

EVAL_FORMAT = ("rq-eval", 1)
_EXPERT_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.[A-Za-z_]+\.experts\.")


@dataclass
class Scored:
    """One model measured on held-out data.

    ``expert_bytes[layer]``: stored bytes of the layer's routed experts (safetensors headers);
    ``slot_bytes[l] [P_l]``: bytes of each physical slot; ``plan_load [L, E]``: the calibration
    loads a deployer would plan device placement on (``None``: plan on held-out loads).
    """

    name: str
    path: str
    measure: ModelMeasure
    expert_bytes: dict[int, int]
    slot_bytes: list[torch.Tensor]
    plan_load: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def header_expert_bytes(path) -> dict[int, int]:
    """``{layer: bytes}`` of every routed-expert tensor in a model directory's safetensors headers."""
    from ..checkpoint import SafetensorsCheckpoint

    out: dict[int, int] = {}
    for key, info in SafetensorsCheckpoint(Path(path)).tensors.items():
        m = _EXPERT_TENSOR.search(key)
        if m:
            n = info.nbytes  # stored tensors: a quantized source's weights and scales both count
            out[int(m.group(1))] = out.get(int(m.group(1)), 0) + n
    if not out:
        raise RQError(f"{path}: no routed-expert tensors in the safetensors headers")
    return out


def _layout(original_path):
    from ..arch import get_family
    from ..source import load_config
    from ..rewrite.layout import read_layout
    from ..source import SourceCheckpoint

    return read_layout(SourceCheckpoint(Path(original_path)), get_family(load_config(Path(original_path))))


def _open_original(path):
    from ..source import load_model, resolve_model_path

    path = resolve_model_path(path)
    model, family = load_model(path, dtype="auto")
    return path, model, family


def score_original(path, heldout: HeldOut, *, batch_size: int = defaults.BATCH_SIZE, policy=None,
                   name: str = "original", plan_load: torch.Tensor | None = None, info: dict | None = None,
                   progress: bool = False) -> Scored:
    """The source model as is (``policy``: an optional routing-policy factory, see ``measure``)."""
    path, model, family = _open_original(path)
    layout = _layout(path)
    m = measure(model, family, heldout.domains, batch_size=batch_size, policy=policy, progress=progress, desc=name)
    slot_bytes = [torch.full((len(p),), layout.expert_bytes(layout.keep_scheme), dtype=torch.int64)
                  for p in m.phy2log]
    return Scored(name, str(path), m, header_expert_bytes(path), slot_bytes, plan_load, dict(info or {}))


def score_rewritten(path, original_path, heldout: HeldOut, *, batch_size: int = defaults.BATCH_SIZE,
                    name: str = "rewritten", info: dict | None = None, progress: bool = False) -> Scored:
    """A directory written by ``rq rewrite``; placement is planned on its own profile's loads."""
    from ..arch import get_family
    from ..calibrate.profile import Profile
    from ..runtime import load

    path = Path(path)
    model = load(path)
    family = get_family(model.config)
    layout = _layout(original_path)
    m = measure(model, family, heldout.domains, batch_size=batch_size, progress=progress, desc=name)
    slot_bytes = [torch.tensor([layout.expert_bytes(s) for s in schemes], dtype=torch.int64)
                  for schemes in m.slot_scheme]
    plan_load = None
    prof_path = path / defaults.PROFILE_FILE
    if prof_path.is_file():
        plan_load = Profile.load(prof_path).load_matrix()
    info = dict(info or {})
    from ..runtime.model_dir import read_rq_config

    plan = read_rq_config(path)["rq"].get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("options"), dict):
        info.setdefault("strategy", plan["options"].get("strategy"))
    return Scored(name, str(path), m, header_expert_bytes(path), slot_bytes, plan_load, info)


# ---------------------------------------------------------------------------- comparison
def _quality(o: Measure, c: Measure) -> dict:
    return {"original": {"ppl": o.ppl, "acc": o.acc, "tokens": o.tokens},
            "candidate": {"ppl": c.ppl, "acc": c.acc, "tokens": c.tokens},
            "ppl_delta_pct": 100.0 * (c.ppl / o.ppl - 1.0), "acc_delta": c.acc - o.acc}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _lis_block(o: Measure, c: Measure) -> dict:
    before, after = o.lis_layers(), c.lis_layers()
    mb, ma = _mean(before), _mean(after)
    return {"mean_before": mb, "mean_after": ma, "excess_removed": excess_removed(mb, ma),
            "batch_mean_before": float(o.batch_lis.mean()), "batch_mean_after": float(c.batch_lis.mean())}


def _balance(original: Scored, candidate: Scored, o: Measure, c: Measure, device_counts) -> tuple[dict, dict]:
    """``(lis, ep)`` blocks of one pool of windows (see the module docstring)."""
    cm = candidate.measure
    before, after = o.lis_layers(), c.lis_layers()
    mb, ma = _mean(before), _mean(after)
    lis = {
        "layers": [{"layer": layer, "before": b, "after": a, "slots": int(p.numel())}
                   for layer, b, a, p in zip(cm.layers, before, after, cm.phy2log)],
        "mean_before": mb, "mean_after": ma, "reduction": mb / ma if ma > 0 else float("inf"),
        "excess_removed": excess_removed(mb, ma),
        "batch_mean_before": float(o.batch_lis.mean()), "batch_mean_after": float(c.batch_lis.mean()),
        "load_before": o.load.tolist(), "slot_load_after": [s.tolist() for s in c.slot_load],
    }
    per_layer = []
    for l, layer in enumerate(cm.layers):
        plan = candidate.plan_load[l] if candidate.plan_load is not None else None
        per_layer.append(simulate_layer(o.load[l], c.slot_load[l], cm.phy2log[l], candidate.slot_bytes[l],
                                        original.expert_bytes[layer], plan, device_counts))
    ep = {}
    for G in device_counts:
        rows = [r[int(G)] for r in per_layer]
        ep[str(G)] = {"before": _mean(r["contiguous"] for r in rows), "after": _mean(r["placed"] for r in rows),
                      "after_memory_free": _mean(r["placed_memory_free"] for r in rows),
                      "eplb": _mean(r["eplb"] for r in rows),
                      "eplb_bytes_ratio": _mean(r["eplb_slots"] / o.load.shape[1] for r in rows),
                      "fits_original_share": all(r["fits_original_share"] for r in rows),
                      "device_bytes_ratio": max(r["device_bytes_ratio"] for r in rows),
                      "layers": rows}
    return lis, ep


def compare(original: Scored, candidate: Scored, heldout: HeldOut, *, device_counts=DEVICE_COUNTS,
            domain_weights: dict[str, float] | None = None) -> dict:
    """One JSON-ready comparison (see the module docstring).

    ``domain_weights``: token shares of the traffic the plan was made for (e.g. the calibration
    set's domain mix); adds a ``matched`` block (quality, lis, ep) on that mixture of the
    held-out domains, so a plan is also judged on held-out data shaped like its calibration.
    """
    om, cm = original.measure, candidate.measure
    if om.layers != cm.layers:
        raise RQError(f"{candidate.name}: MoE layers {cm.layers} differ from the original's {om.layers}")
    groups = {"heldout": list(heldout.seen), "unseen": list(heldout.unseen)}
    quality = {d: _quality(om.domains[d], cm.domains[d]) for d in heldout.domains}
    for g, names in groups.items():
        if names:
            quality[g] = _quality(om.pooled(names), cm.pooled(names))
    lis, ep = _balance(original, candidate, om.pooled(groups["heldout"]), cm.pooled(groups["heldout"]),
                       device_counts)
    lis["domains"] = {d: _lis_block(om.domains[d], cm.domains[d]) for d in heldout.domains}
    matched = None
    if domain_weights:
        missing = [d for d in domain_weights if d not in heldout.domains]
        if missing:
            raise RQError(f"domain weights name {', '.join(missing)}, not among the held-out domains "
                          f"({', '.join(heldout.domains)})")
        names = [d for d, w in domain_weights.items() if w > 0]
        shares = [float(domain_weights[d]) for d in names]
        o_mix, c_mix = om.pooled(names, shares), cm.pooled(names, shares)
        m_lis, m_ep = _balance(original, candidate, o_mix, c_mix, device_counts)
        matched = {"weights": {d: w / sum(shares) for d, w in zip(names, shares)},
                   "quality": _quality(o_mix, c_mix), "lis": m_lis, "ep": m_ep}
    b0, b1 = sum(original.expert_bytes.values()), sum(candidate.expert_bytes.values())
    nbytes = {"before": b0, "after": b1, "ratio": b1 / b0,
              "layers": [{"layer": layer, "before": original.expert_bytes[layer],
                          "after": candidate.expert_bytes[layer]} for layer in cm.layers]}
    name, version = EVAL_FORMAT
    return {"format": name, "version": version, "name": candidate.name, "original": original.path,
            "candidate": candidate.path, "info": candidate.info, "heldout": heldout.describe(),
            "placement_planned_on": "calibration" if candidate.plan_load is not None else "heldout",
            "quality": quality, "lis": lis, "bytes": nbytes, "ep": ep, "matched": matched,
            "policy_stats": cm.policy_stats}

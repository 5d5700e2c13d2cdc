"""``rq plan``: a per-step, shift-robust expert placement from recorded loads, without the model.

Registered in rq_tool/cli.py with one ``add_command``. ``plan_loads`` is the library call (pure
planning on a ``LoadSource``); the command reads the source, plans, writes the engine's file.

Legend: N rows of loads, L MoE layers, E logical experts, P = E + R physical slots per layer,
G devices (the EP size), D decoder layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from .. import defaults
from ..errors import RQError
from .balance import BalanceResult, Layout, plan_balance, predict_balance
from .steps import contiguous_layout, rows_per_step
from .sources import LoadSource, read_loads

ENGINE_POLICY = {"sglang": "round-robin", "vllm": "round-robin", "rq": "load-aware"}


@dataclass
class LoadsPlan:
    source: LoadSource
    engine: str
    ep_size: int
    num_slots: int
    per_step: int
    policy: str
    result: BalanceResult
    original: Layout
    predicted: dict

    @property
    def redundant(self) -> int:
        return self.num_slots - self.source.num_experts

    def gpu_major(self) -> torch.Tensor:
        """``[L, P]`` phy2log with slot p on device ``p // (P / G)`` (every device holds exactly P / G)."""
        lay, G, P = self.result.layout, self.ep_size, self.num_slots
        rows = []
        for l in range(lay.phy2log.shape[0]):
            phy, dev = lay.layer(l)
            if phy.numel() != P or not torch.equal(torch.bincount(dev, minlength=G), torch.full((G,), P // G)):
                raise RQError(f"layer {self.source.layers[l]}: the plan does not fill every device with {P // G} slots")
            rows.append(phy[torch.argsort(dev, stable=True)])
        return torch.stack(rows)


def slots_for(budget, num_experts: int, ep_size: int) -> int:
    """Physical slots per layer for ``--budget B`` (x the E experts): the largest multiple of G <= B * E,
    at least the smallest multiple of G that holds the E originals."""
    try:
        b = float(str(budget).rstrip("xX"))
    except ValueError:
        raise RQError(f"--budget must be a factor of the experts' memory like 1.125 or 1.25x, got {budget!r}") from None
    if not (math.isfinite(b) and 1.0 <= b <= 10.0):
        raise RQError(f"--budget {budget!r}: expected a factor between 1.0 (no redundant slots) and 10")
    E, G = int(num_experts), int(ep_size)
    return max(G * math.floor(b * E / G + 1e-9), G * math.ceil(E / G))


def steps_per(source: LoadSource, batch_tokens: int | None, top_k: int | None) -> int:
    """Rows summed into one step: recorded steps are steps; else ``--batch-tokens`` over tokens per row."""
    if source.rows_are_steps or source.seq_loads.shape[0] == 1:
        return 1
    if batch_tokens is None:
        return defaults.SEQS_PER_STEP * source.rows_per_seq
    tokens = source.tokens_per_row
    if tokens is None:
        k = top_k or source.top_k
        if not k:
            raise RQError("--batch-tokens needs --top-k for a loads file (to turn token-slots into tokens)")
        tokens = float(source.seq_loads[:, 0].sum(-1).mean()) / k
    return rows_per_step(batch_tokens, tokens)


def engine_default(L: int, E: int, P: int, G: int) -> Layout:
    """Identity + round-robin redundancy (slot p holds expert p % E) on devices ``p // (P / G)``."""
    return Layout(torch.arange(P).remainder(E).repeat(L, 1), (torch.arange(P) // (P // G)).repeat(L, 1))


def plan_loads(source: LoadSource, ep_size: int, engine: str = "sglang", budget=defaults.PLAN_BUDGET,
               batch_tokens: int | None = None, top_k: int | None = None, seed: int = 0) -> LoadsPlan:
    """Plan replicas and devices for ``source`` on ``ep_size`` devices (see ``rq_tool.plan.balance``)."""
    if engine not in ENGINE_POLICY:
        raise RQError(f"unknown engine {engine!r}; known: {', '.join(ENGINE_POLICY)}")
    G = int(ep_size)
    if G < 1:
        raise RQError(f"--ep-size must be at least 1, got {ep_size}")
    if batch_tokens is not None and batch_tokens < 1:
        raise RQError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    N, L, E = source.seq_loads.shape
    P = slots_for(budget, E, G)
    per_step = steps_per(source, batch_tokens, top_k)
    policy = ENGINE_POLICY[engine]
    # the deployment without rq: the engine's own layout, or (rq) the original model on standard EP
    original = Layout(*contiguous_layout(L, E, G)) if engine == "rq" else engine_default(L, E, P, G)
    seq = source.seq_loads.round().long()
    res = plan_balance(seq, G, P, original, policy=policy, per_step=per_step, groups=source.groups,
                       group_names=source.group_names, fill_all=True, seed=seed, rows_per_seq=source.rows_per_seq)
    pred = predict_balance(seq, res.layout, original, G, per_step=per_step, groups=source.groups,
                           group_names=source.group_names)
    return LoadsPlan(source, engine, G, P, per_step, policy, res, original, pred)


def _placement_plan(plan: LoadsPlan):
    """The export module's ``PlacementPlan`` for this plan, so SGLang / vLLM files are written by one code path."""
    from ..export.engines import PlacementPlan
    from ..export.location import engine_default_phy2log, gpu_max_mean

    src = plan.source
    load = src.seq_loads.sum(0)
    E, P, G = src.num_experts, plan.num_slots, plan.ep_size
    phy2log = plan.gpu_major()
    identity = gpu_max_mean(load, torch.arange(E)[None], G) if E % G == 0 else None
    return PlacementPlan(src.layers, src.num_hidden_layers, load, G, plan.redundant, False,
                         defaults.EXPORT_TARGET_MAX_MEAN, phy2log,
                         gpu_max_mean(load, engine_default_phy2log(E, P)[None], G), gpu_max_mean(load, phy2log, G),
                         identity)


def routing_map(plan: LoadsPlan):
    """``rq`` engine: routing map v2 with the placement (``num_devices``, per-layer ``slot_device``)."""
    from ..plan.predict import log2phy_from_phy2log
    from ..runtime.routing_map import LayerMap, RoutingMap

    src = plan.source
    layers = []
    for l, layer in enumerate(src.layers):
        phy, dev = plan.result.layout.layer(l)
        log2phy, logcnt = log2phy_from_phy2log(phy, src.num_experts)
        layers.append(LayerMap(int(layer), phy, log2phy, logcnt, (src.source_scheme,) * phy.numel(), dev))
    rmap = RoutingMap(src.num_experts, layers, src.source_scheme, src.activation, defaults.LOAD_AWARE_POLICY,
                      plan.ep_size)
    rmap.validate("planned routing map")
    return rmap


def summary(plan: LoadsPlan) -> dict:
    ratio = plan.result.ratio
    chosen = torch.tensor([[ratio[c][f][l] for f in range(len(ratio[c]))] for l, c in enumerate(plan.result.choice)])
    return {"engine": plan.engine, "ep_size": plan.ep_size, "num_experts": plan.source.num_experts,
            "num_slots": plan.num_slots, "redundant": plan.redundant, "slots_per_device": plan.num_slots // plan.ep_size,
            "layers": list(plan.source.layers), "rows": int(plan.source.seq_loads.shape[0]),
            "per_step": plan.per_step, "policy": plan.policy, "choice": plan.result.choice,
            "folds": plan.result.folds,
            "heldout_ratio": {"worst": float(chosen.max()), "mean": float(chosen.mean()), "best": float(chosen.min())},
            "predicted": plan.predicted}


def _fmt(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['p10']:.3f}-{s['p90']:.3f}]"


def text(plan: LoadsPlan, out) -> str:
    s = summary(plan)
    E, P, G, R = s["num_experts"], s["num_slots"], s["ep_size"], s["redundant"]
    lines = [f"rq plan ({plan.engine}): {len(s['layers'])} MoE layers x {E} experts on EP {G}: {P} slots per layer, "
             f"{P // G} per device (+{R} redundant, +{100.0 * R / E:.1f}% expert memory per device on average), "
             f"{plan.policy} dispatch",
             f"predicted per-step device max/mean, {s['per_step']} row(s) per step, mean [p10-p90] over resampled "
             "steps (1.00 = balanced):",
             f"  {'steps':<14} {'before (' + ('standard EP' if plan.engine == 'rq' else 'engine default') + ')':>26} "
             f"{'after (rq)':>26}"]
    for name, v in plan.predicted["policies"][plan.policy].items():
        lines.append(f"  {name:<14} {_fmt(v['before']):>26} {_fmt(v['after']):>26}")
    h = s["heldout_ratio"]
    where = (f"leave-one-out over {len(s['folds'])} folds ({', '.join(s['folds'])})" if s["folds"]
             else "in-sample (too few rows for held-out folds)")
    kept = sum(c == "original" for c in s["choice"])
    lines.append(f"held-out check, {where}: after / before per layer worst {h['worst']:.3f}, mean {h['mean']:.3f}; "
                 f"{kept}/{len(s['choice'])} layers keep the engine default (replication did not hold up there)")
    if s["rows"] == 1:
        lines.append("note: pooled counts only (one row): no per-step spread; give per-step counts "
                     "([steps][layers][experts]) or a profile v2 for a per-step plan")
    if out is not None:
        lines.append(f"wrote {out}")
    return "\n".join(lines)


@click.command("plan")
@click.argument("source", type=click.Path())
@click.option("--ep-size", type=int, required=True, help="Expert-parallel devices G.")
@click.option("--engine", default="sglang", show_default=True, type=click.Choice(sorted(ENGINE_POLICY)),
              help="sglang: physical_to_logical_map [layers, E+R] (slot p on device p // ((E+R)/G)); vllm: its EPLB "
                   "flags (vLLM cannot load a placement); rq: a routing map v2 with the placement.")
@click.option("--budget", default=str(defaults.PLAN_BUDGET), show_default=True,
              help="Physical slots per layer as a factor of E (rounded down to a multiple of --ep-size).")
@click.option("--batch-tokens", type=int, default=None,
              help=f"Tokens per step the placement is planned for (default: {defaults.SEQS_PER_STEP} calibration "
                   "sequences; recorded engine steps are used as they are).")
@click.option("--top-k", type=int, default=None, help="Experts per token (a loads file with --batch-tokens).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="File to write (required for sglang and rq).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def plan_cmd(source, ep_size, engine, budget, batch_tokens, top_k, out, as_json):
    """Plan expert replicas and their devices from recorded loads (SOURCE: profile.json, a loads
    .safetensors with loads [N, L, E], or SGLang expert-distribution counts .json / .pt), per step
    and robust to held-out domains; no model needed."""
    from ..export.engines import get_engine
    from ..export.source import write_json_atomic

    if top_k is not None and top_k < 1:
        raise RQError(f"--top-k must be >= 1, got {top_k}")
    if out is None and engine != "vllm":
        raise RQError(f"--out is required for --engine {engine}")
    if out is not None and Path(out).resolve() == Path(source).resolve():
        raise RQError("--out is the SOURCE file; rq never writes over its input")
    src = read_loads(source)
    plan = plan_loads(src, ep_size, engine, budget, batch_tokens, top_k)
    flags, notes, path = [], [], None
    if engine == "rq":
        path = write_json_atomic(out, routing_map(plan).to_dict())
    else:
        result = get_engine(engine).build(_placement_plan(plan), out, False)
        flags, notes = result.flags, result.notes
        if result.content is not None and out is not None:
            path = write_json_atomic(out, result.content)
    if as_json:
        click.echo(json.dumps({"format": defaults.EXPORT_FORMAT[0], "version": defaults.EXPORT_FORMAT[1],
                               "source": str(src.path), "out": str(path) if path else None, "flags": flags,
                               "notes": notes, **summary(plan)}))
        return
    click.echo(text(plan, path))
    if flags:
        click.echo("server flags:\n  " + " ".join(flags))
    for n in notes:
        click.echo(f"note: {n}")

"""Baselines at the same memory, scored on the same held-out data, as rows of one table.

Registry ``BASELINES`` (name -> ``Baseline``), in table order:

- ``original``: the source model, standard routing, no rewrite.
- ``paper``: the R&Q paper's setting (``--strategy paper``): each layer's heaviest expert
  replicated once in int8, least important experts quantized to int8 to fit the budget.
- ``greedy``: rq's default (``--strategy greedy``, ``--importance quant_error``).
- ``replicate-only``: EPLB-style replicas in full precision, no quantization; memory grows.
- ``uniform-int8``: every expert stored int8, no replicas; the freed memory is left unused.
  (int8 is the scheme the other methods quantize to; it is built as a greedy plan whose
  per-layer budget is exactly E int8 experts and that may only use int8, so it cannot replicate.)
- ``frequency``: rq greedy, but what to quantize is chosen by routing frequency only
  (``--importance frequency``), the choice the R&Q paper argues against.
- ``laser``: the original weights with LASER routing (``rq_tool.eval.laser``), no rewrite.

``baseline_results`` builds and scores each (rewrites go to a scratch directory) and returns one
``compare`` result per baseline; ``markdown_table`` renders them, ``target_checks`` tests the
rq-default row against the project's stated targets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import defaults
from ..errors import RQError
from .laser import LaserConfig, LaserRouting
from .compare import compare, score_original, score_rewritten


@dataclass(frozen=True)
class Baseline:
    name: str
    summary: str
    kind: str  # original | rewrite | policy
    rewrite_args: Callable[[object], dict] | None = None  # layout -> rq_tool.rewrite keyword args


def _uniform_int8(layout) -> dict:
    per_layer = layout.num_experts * layout.expert_bytes("int8")
    return {"strategy": "greedy", "schemes": ["int8"], "budget": f"{per_layer}B"}


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("original", "source model, standard routing", "original"),
    Baseline("paper", "R&Q paper: heaviest expert x2 in int8, cold experts int8", "rewrite",
             lambda layout: {"strategy": "paper"}),
    Baseline("greedy", "rq default: greedy with the accuracy guard and the held-out replica check", "rewrite",
             lambda layout: {"strategy": "greedy"}),
    Baseline("greedy-unguarded", "rq greedy without the guard (--max-error none): replicate + quantize by "
             "measured damage", "rewrite", lambda layout: {"strategy": "greedy", "max_error": None}),
    Baseline("greedy-ep8", "rq greedy (unguarded) with --ep-devices 8: slots also pack into 8 original device "
             "shares", "rewrite", lambda layout: {"strategy": "greedy", "ep_devices": 8, "max_error": None}),
    Baseline("replicate-only", "full-precision replicas, no quantization (memory grows)", "rewrite",
             lambda layout: {"strategy": "replicate-only"}),
    Baseline("uniform-int8", "every expert int8, no replicas (freed memory unused)", "rewrite", _uniform_int8),
    Baseline("frequency", "rq greedy (unguarded), quantize by routing frequency only", "rewrite",
             lambda layout: {"strategy": "greedy", "importance": "frequency", "max_error": None}),
    Baseline("laser", "LASER load-aware routing on the original weights", "policy"),
)}

TARGETS = {"bytes_ratio_max": 1.0, "excess_removed_min": 0.70, "ppl_delta_pct_max": 1.0, "ep8_max_mean_max": 1.15}


def baseline_results(model, profile, heldout, workdir, *, names=tuple(BASELINES), budget=defaults.BUDGET,
                     laser: LaserConfig = LaserConfig(), batch_size: int = defaults.BATCH_SIZE,
                     domain_weights: dict[str, float] | None = None, original=None, suffix: str = "",
                     log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Build and score every named baseline; ``[compare(...) per baseline]`` in ``names`` order.

    ``domain_weights``: the calibration traffic's domain shares, for the ``matched`` pool;
    ``original``: an already scored original (``Scored``) to reuse; ``suffix`` is appended to
    every row name (e.g. to tell plans made on another calibration set apart).
    """
    from ..source import resolve_model_path
    from ..rewrite import rewrite
    from .compare import _layout

    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise RQError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    src = resolve_model_path(model)
    layout = _layout(src)
    workdir = Path(workdir)
    plan_load = profile.load_matrix()
    t0 = time.perf_counter()
    if original is None:
        original = score_original(src, heldout, batch_size=batch_size, plan_load=plan_load,
                                  info={"summary": BASELINES["original"].summary})
        log(f"scored original ({time.perf_counter() - t0:.0f}s)")
    out = []
    for name in names:
        b = BASELINES[name]
        t0 = time.perf_counter()
        info = {"summary": b.summary}
        if b.kind == "original":
            scored = original
        elif b.kind == "policy":
            info["laser"] = laser.to_dict()
            scored = score_original(src, heldout, batch_size=batch_size, name=name + suffix, plan_load=plan_load,
                                    info=info,
                                    policy=lambda m, f: LaserRouting(m, f, laser))
        else:
            kwargs = {"budget": budget, **b.rewrite_args(layout)}
            info.update(kwargs)
            out_dir = workdir / f"{name}{suffix}".replace(" ", "_")
            res = rewrite(src, profile, out_dir, force=True, progress=False, **kwargs)
            info["predicted"] = res.plan.totals()
            scored = score_rewritten(out_dir, src, heldout, batch_size=batch_size, name=name + suffix, info=info)
        out.append(compare(original, scored, heldout, domain_weights=domain_weights))
        out[-1]["info"]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"scored {name}{suffix} ({out[-1]['info']['seconds']:.0f}s)")
    return out


# ---------------------------------------------------------------------------- rendering
def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pool(r: dict, pool: str) -> dict:
    """The quality/lis/ep block of a result for ``pool`` ("heldout" or "matched")."""
    if pool == "heldout":
        return {"quality": r["quality"]["heldout"], "lis": r["lis"], "ep": r["ep"]}
    if pool == "matched" and r.get("matched"):
        return r["matched"]
    raise RQError(f"result {r['name']!r} has no {pool!r} pool")


def table_row(r: dict, pool: str = "heldout") -> dict:
    """The flat numbers one table row shows (all taken from a ``compare`` result)."""
    b = _pool(r, pool)
    q = b["quality"]
    unseen = r["quality"].get("unseen")
    return {
        "name": r["name"], "bytes_ratio": r["bytes"]["ratio"],
        "ppl": q["candidate"]["ppl"], "ppl_delta_pct": q["ppl_delta_pct"],
        "acc": q["candidate"]["acc"], "acc_delta": q["acc_delta"],
        "unseen_ppl_delta_pct": unseen["ppl_delta_pct"] if unseen else None,
        "lis": b["lis"]["mean_after"], "excess_removed": b["lis"]["excess_removed"],
        "batch_lis": b["lis"]["batch_mean_after"],
        "ep": {g: e["after"] for g, e in b["ep"].items()},
        "device_bytes_ratio": max(e["device_bytes_ratio"] for e in b["ep"].values()),
    }


def markdown_table(results: list[dict], pool: str = "heldout") -> str:
    """One Markdown table: a row per result, plus EPLB's simulated reference and contiguous EP."""
    gs = list(results[0]["ep"])
    head = ["baseline", "expert bytes", "ppl (Δ%)", "top-1 acc (Δ pts)", "unseen ppl Δ%", "LIS mean",
            "excess removed", "LIS per batch"] + [f"EP{g} max/mean" for g in gs] + ["max device mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t = table_row(r, pool)
        cells = [t["name"], f"{t['bytes_ratio']:.3f}x", f"{t['ppl']:.3f} ({t['ppl_delta_pct']:+.2f}%)",
                 f"{100 * t['acc']:.2f}% ({100 * t['acc_delta']:+.2f})", _f(t["unseen_ppl_delta_pct"], "+.2f"),
                 f"{t['lis']:.3f}", f"{100 * t['excess_removed']:.0f}%", f"{t['batch_lis']:.3f}"]
        cells += [f"{t['ep'][g]:.3f}" for g in gs] + [f"{t['device_bytes_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    # EPLB is shown at the slot count of rq's default (or the first rewritten model's)
    ref = next((r for r in results if r["name"] == "greedy"), None) or \
        next((r for r in results if r["info"].get("strategy")), results[-1])
    base, ref_ep = _pool(results[0], pool)["ep"], _pool(ref, pool)["ep"]
    lines.append("")
    lines.append("EP columns: each model's own slots placed heaviest-first within the original per-device memory "
                 f"share (planned on the {ref['placement_planned_on']} loads, scored on "
                 f"{ref['heldout'].get('data', 'held-out')} data); max device mem "
                 "> 1.00x means the slots did not pack into the original share.")
    lines.append("Original, standard contiguous EP (E/G experts per device): "
                 + ", ".join(f"G={g} {base[g]['before']:.3f}" for g in gs) + ".")
    lines.append(f"{ref['name']} placed with memory ignored (ceil(P/G) slots per device): "
                 + ", ".join(f"G={g} {ref_ep[g]['after_memory_free']:.3f}" for g in gs) + ".")
    lines.append(f"DeepSeek EPLB reference at {ref['name']}'s slot count (full-precision replicas): "
                 + ", ".join(f"G={g} {ref_ep[g]['eplb']:.3f} at {ref_ep[g]['eplb_bytes_ratio']:.2f}x bytes"
                             for g in gs) + ".")
    return "\n".join(lines)


def target_checks(results: list[dict], name: str = "greedy", pool: str = "heldout") -> list[dict]:
    """The project's targets for the rq-default row: ``[{"target", "value", "met"}]``."""
    r = next((x for x in results if x["name"] == name), None)
    if r is None:
        return []
    t = table_row(r, pool)
    ep8 = _pool(r, pool)["ep"].get("8", {})
    ep8_value, ep8_fits = ep8.get("after"), bool(ep8.get("fits_original_share"))
    return [
        {"target": f"expert bytes <= {TARGETS['bytes_ratio_max']:.2f}x", "value": t["bytes_ratio"],
         "met": t["bytes_ratio"] <= TARGETS["bytes_ratio_max"] + 1e-12},
        {"target": f"removes >= {TARGETS['excess_removed_min']:.0%} of mean per-layer excess LIS",
         "value": t["excess_removed"], "met": t["excess_removed"] >= TARGETS["excess_removed_min"]},
        {"target": f"perplexity within +{TARGETS['ppl_delta_pct_max']:.0f}%", "value": t["ppl_delta_pct"],
         "met": t["ppl_delta_pct"] <= TARGETS["ppl_delta_pct_max"]},
        {"target": f"simulated 8-device max/mean <= {TARGETS['ep8_max_mean_max']} within the original per-device "
                   "memory", "value": ep8_value,
         "met": ep8_value is not None and ep8_value <= TARGETS["ep8_max_mean_max"] and ep8_fits},
    ]

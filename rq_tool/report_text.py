"""Plain-text tables for the terminal (what the CLI prints for people)."""

from __future__ import annotations

import torch


def _share(load: torch.Tensor, idx: int) -> float:
    total = float(load.sum())
    return 100.0 * float(load[idx]) / total if total else 0.0


def profile_table(profile, top: int = 3) -> str:
    """Per MoE layer: LIS, per-batch LIS, hottest experts with their share, least important ones."""
    bsz = max((b for lp in profile.layers for b in lp.lis_by_batch), default=None)
    head = f"{'layer':>5}  {'LIS':>5}  {f'LIS@{bsz} mean/max' if bsz else '':>16}  {'hottest (share of load)':<32}  least important"
    lines = [head, "-" * len(head)]
    for lp in profile.layers:
        load = lp.load
        hot = torch.argsort(load, descending=True, stable=True)[:top].tolist()
        imp = lp.output_energy
        cold = torch.argsort(imp, stable=True)[:top].tolist()
        hot_s = " ".join(f"e{e}:{_share(load, e):.0f}%" for e in hot)
        cold_s = " ".join(f"e{e}" for e in cold)
        b = lp.lis_by_batch.get(bsz) if bsz else None
        bs = f"{b['mean']:.2f}/{b['max']:.2f}" if b else ""
        lines.append(f"{lp.layer:>5}  {lp.lis:>5.2f}  {bs:>16}  {hot_s:<32}  {cold_s}")
    mean_lis = sum(lp.lis for lp in profile.layers) / len(profile.layers)
    c = profile.calibration
    lines.append(f"mean LIS {mean_lis:.3f} over {len(profile.layers)} MoE layers; {c['sequences']} sequences x "
                 f"{c['seq_len']} tokens of {c['dataset']!r}; E={profile.num_experts}, top-k={profile.model['top_k']}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB" if n < 1e9 else f"{n / 1e9:.2f}GB"


def plan_table(plan) -> str:
    """Per MoE layer: replicas, slot schemes, LIS before -> predicted after, expert bytes."""
    head = f"{'layer':>5}  {'slots':>5}  {'replicated (x copies)':<24}  {'schemes':<22}  {'LIS':>13}  {'bytes':>21}  {'pred err':>9}"
    lines = [head, "-" * len(head)]
    for lp in plan.layers:
        E = lp.num_logical
        rep = [(e, int(c)) for e, c in enumerate(lp.logcnt.tolist()) if c > 1]
        rep_s = " ".join(f"e{e}x{c}" for e, c in rep) or "-"
        if len(rep_s) > 24:
            rep_s = rep_s[:21].rsplit(" ", 1)[0] + " .."
        counts: dict[str, int] = {}
        for i in lp.slot_scheme.tolist():
            counts[plan.schemes[i]] = counts.get(plan.schemes[i], 0) + 1
        sch = " ".join(f"{k}:{v}" for k, v in counts.items())
        lis_s = f"{lp.lis_before:.2f} -> {lp.lis_after:.2f}"
        by = f"{_mb(lp.bytes_before)} -> {_mb(lp.bytes_after)}"
        slots = f"{lp.num_physical}/{E}"
        lines.append(f"{lp.layer:>5}  {slots:>5}  {rep_s:<24}  {sch:<22}  {lis_s:>13}  {by:>21}  {lp.pred_error:>9.3g}")
    t = plan.totals()
    ratio = t["bytes_after"] / t["bytes_before"] if t["bytes_before"] else 1.0
    lines.append(f"strategy {plan.options.strategy}: mean LIS {t['lis_before_mean']:.3f} -> {t['lis_after_mean']:.3f} "
                 f"(predicted), {t['replicas']} replicas, expert bytes {ratio:.3f}x of the original")
    return "\n".join(lines)

"""The profile table ``rq calibrate`` prints (plain text for the terminal)."""

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

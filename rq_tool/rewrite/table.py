"""The plan table ``rq rewrite`` prints (plain text for the terminal)."""

from __future__ import annotations

import torch


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
    slots = [i for lp in plan.layers for i in lp.slot_scheme.tolist()]
    src = sum(1 for i in slots if i == 0)
    cap = "" if plan.options.max_error is None else f"; limit --max-error {plan.options.max_error:g}"
    lines.append(f"{src}/{len(slots)} slots ({100.0 * src / max(len(slots), 1):.0f}%) keep the source precision "
                 f"({plan.source_scheme}); pred err = predicted quantization noise of a layer's quantized slots as a "
                 f"fraction of its expert output power (1e-3 = 0.1%, 30 dB SQNR){cap}")
    if getattr(plan, "num_devices", None):
        lines += _device_lines(plan)
    elif plan.balance:  # the guarded greedy: no placement of its own, scored placed in the original shares
        b = plan.balance
        lines += _balance_lines(b, b.get("policy", "round-robin"), f" on EP {b.get('num_devices')} (replicated layers' "
                                "slots placed heaviest first within the original per-device memory)")
    return "\n".join(lines)


def device_memory(plan) -> list[dict]:
    """Per MoE layer of a placed plan (``num_devices`` G): ``bytes`` [G] expert bytes on each device,
    ``share`` the original per-device share (``bytes_before / G``), ``fullest`` max(bytes) / share.
    Empty for a plan without a placement."""
    G = plan.num_devices
    if not G:
        return []
    nbytes = torch.tensor(plan.scheme_bytes)
    out = []
    for lp in plan.layers:
        per = torch.zeros(G, dtype=torch.int64).index_add_(0, lp.slot_device, nbytes[lp.slot_scheme])
        share = lp.bytes_before / G
        out.append({"layer": lp.layer, "bytes": per.tolist(), "share": share,
                    "fullest": float(per.max()) / max(share, 1)})
    return out


def _device_lines(plan) -> list[str]:
    """Per-device memory of the placement and the predicted per-step balance with its spread."""
    mem = device_memory(plan)
    worst = max(mem, key=lambda m: m["fullest"])
    lines = [f"EP {plan.num_devices} devices: fullest device {worst['fullest']:.3f}x its original share of expert "
             f"memory (worst layer {worst['layer']}; per layer: "
             + " ".join(f"{m['layer']}:{m['fullest']:.2f}x" for m in mem) + ")"]
    return lines + _balance_lines(plan.balance or {}, "load-aware", "")


def _balance_lines(b: dict, policy: str, where: str) -> list[str]:
    """The predicted per-step balance of ``policy`` (gain with its spread) and the held-out check."""
    pol = b.get("policies", {}).get(policy)
    if not pol:
        return []
    lines = [f"predicted per-step device max/mean{where} ({b['per_step']} calibration rows per step, {policy} "
             "dispatch; mean [p10-p90] over resampled steps), standard EP -> this plan:"]
    for name, v in pol.items():
        bf, af = v["before"], v["after"]
        lines.append(f"  {name:<12} {bf['mean']:.3f} [{bf['p10']:.2f}-{bf['p90']:.2f}] -> "
                     f"{af['mean']:.3f} [{af['p10']:.2f}-{af['p90']:.2f}]  (gain {bf['mean'] - af['mean']:+.3f})")
    folds = b.get("folds") or []
    ratio = b.get("heldout_ratio") or []
    kept = sum(c == "original" for c in b.get("choice", []))
    if folds and ratio:
        lines.append(f"held out (leave-one-out over {', '.join(folds)}): worst layer after/before {max(ratio):.3f}; "
                     f"{kept}/{len(ratio)} layers keep the original layout (replication did not hold up there)")
    elif b.get("sequences") == 1:
        lines.append("note: the profile has no per-sequence loads (v1): planned on pooled loads, no held-out check")
    return lines

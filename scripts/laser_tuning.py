"""LASER's ``eps_high`` tuned on calibration data, as its paper tunes per model (used by scripts/bench_quality.py)."""

from __future__ import annotations

from rq_tool import defaults
from rq_tool.eval.baselines import TARGETS
from rq_tool.eval.laser import LaserConfig, LaserRouting
from rq_tool.eval.measure import measure


def tune_laser(model, family, input_ids, *, eps_grid=(0.2, 0.25, 0.3, 0.35, 0.4, 0.5), t_fix: float = 0.3,
               num_candidates: int | None = None, max_ppl_increase_pct: float = TARGETS["ppl_delta_pct_max"],
               batch_size: int = defaults.BATCH_SIZE) -> tuple[LaserConfig, list[dict]]:
    """Pick LASER's ``eps_high`` on calibration windows ``input_ids [N, S]``, as its paper tunes per model.

    Walking the grid upwards (more rerouting), the last ``eps_high`` before perplexity on these
    windows first rises by more than ``max_ppl_increase_pct`` over vanilla routing; the smallest
    if none qualifies.
    Returns the config and the sweep (``eps_high``, ``ppl_delta_pct``, ``lis_mean``, ``rerouted``).
    """
    vanilla = measure(model, family, {"cal": input_ids}, batch_size=batch_size).domains["cal"]
    sweep, best = [], None
    for eps in sorted(eps_grid):
        cfg = LaserConfig(eps, t_fix, num_candidates)
        m = measure(model, family, {"cal": input_ids}, batch_size=batch_size,
                    policy=lambda mm, ff: LaserRouting(mm, ff, cfg))
        d = m.domains["cal"]
        delta = 100.0 * (d.ppl / vanilla.ppl - 1.0)
        rer = sum(s["rerouted"] for s in m.policy_stats) / max(sum(s["tokens"] for s in m.policy_stats), 1)
        sweep.append({"eps_high": eps, "ppl_delta_pct": delta, "lis_mean": sum(d.lis_layers()) / len(d.lis_layers()),
                      "rerouted": rer})
        if delta > max_ppl_increase_pct:
            break  # rerouting only grows with eps_high
        best = cfg
    return best or LaserConfig(min(eps_grid), t_fix, num_candidates), sweep

"""From a profile and a checkpoint's expert layout to planner inputs, and the plan itself.

The planner is pure (``rq_tool.plan``); this module only builds its tensors:
``load [L, E]``, ``error [L, E, S]`` (scheme 0 = the scheme that keeps an expert as the source has
it, zero error: ``ExpertLayout.keep_scheme``; the others only where they store fewer bytes),
``scheme_bytes [S]`` (exact bytes of one expert per scheme) and the budget in bytes.
"""

from __future__ import annotations

import math

import torch

from .. import defaults
from ..calibrate.profile import Profile
from ..errors import RQError
from ..plan.steps import rows_per_step
from .config import RewriteConfig
from .layout import ExpertLayout


def plan_inputs(profile: Profile, layout: ExpertLayout, schemes, importance: str = defaults.IMPORTANCE_DEFAULT):
    """``(load [L, E] f64, error [L, E, S] f64, scheme_names [S], scheme_bytes [S] i64)``.

    ``error`` is relative: quantization damage over the layer's expert output power.
    """
    if importance not in defaults.IMPORTANCE:
        raise RQError(f"unknown --importance {importance!r}; known: {', '.join(defaults.IMPORTANCE)}")
    prof_layers = [lp.layer for lp in profile.layers]
    if prof_layers != list(layout.layers):
        raise RQError(f"profile has MoE layers {prof_layers} but the model has {list(layout.layers)}")
    if profile.num_experts != layout.num_experts:
        raise RQError(f"profile has {profile.num_experts} experts per layer, the model {layout.num_experts}")
    keep = layout.keep_scheme
    # a "cheaper" scheme must store fewer bytes than keeping the expert (int8 does not, beside fp8)
    schemes = [s for s in schemes if s != keep and layout.expert_bytes(s) < layout.expert_bytes(keep)]
    if not schemes:
        from ..quant import QUANT_SCHEMES

        smaller = [s for s in QUANT_SCHEMES if layout.expert_bytes(s) < layout.expert_bytes(keep)]
        raise RQError(f"--schemes: no scheme smaller than the model's own {keep} experts to quantize to "
                      f"(give {','.join(smaller) or 'a smaller scheme'})")
    names = [keep, *schemes]
    load = profile.load_matrix().double()
    L, E = load.shape
    if importance == "quant_error":
        measured = profile.quant_error_tensor(schemes)  # [L, E, S-1]
    else:
        # frequency-only baseline: damage proportional to routed tokens, scaled so each scheme's
        # layer total matches the measured total when available (else 1 per token-slot)
        share = load / load.sum(-1, keepdim=True).clamp_min(1)
        if all(s in profile.schemes for s in schemes):
            totals = profile.quant_error_tensor(schemes).sum(1, keepdim=True)  # [L, 1, S-1]
        else:
            totals = load.sum(-1)[:, None, None].expand(L, 1, len(schemes))
        measured = share[:, :, None] * totals
    error = torch.cat([torch.zeros(L, E, 1, dtype=torch.float64), measured.double()], dim=-1)
    # relative units: damage as a fraction of the layer's calibrated expert output power
    # (sum of w^2 ||y||^2), so --max-error 1e-3 means "at most 0.1% noise power per layer" (30 dB)
    power = torch.stack([lp.output_power.sum() for lp in profile.layers]).double().clamp_min(1e-30)
    error = error / power[:, None, None]
    scheme_bytes = torch.tensor([layout.expert_bytes(s) for s in names], dtype=torch.int64)
    return load, error, names, scheme_bytes


def build_plan(profile: Profile, layout: ExpertLayout, config: RewriteConfig, **option_overrides):
    """The plan of ``config`` for this profile and layout (``option_overrides``: other ``PlanOptions`` fields)."""
    from ..plan import make_plan, resolve_budget
    from ..plan.strategies import STRATEGIES
    from ..validate import check_budget_spec

    check_budget_spec(config.budget)  # bounded before the exact parser (a huge exponent would hang it)
    load, error, names, scheme_bytes = plan_inputs(profile, layout, config.schemes, config.importance)
    # the budget's 1.0x: each layer's experts as stored (a quantized source: its weights + scales)
    layer_bytes = torch.tensor([layout.layer_source_bytes(layer) for layer in layout.layers], dtype=torch.int64)
    budget_bytes = resolve_budget(config.budget, layer_bytes, config.global_budget)
    if config.ep_size is not None or getattr(STRATEGIES.get(config.strategy), "enforces_budget", False):
        _check_quantized_source_budget(layout, budget_bytes, scheme_bytes, names, config.global_budget)
    per_step = steps_per_profile(profile, config.batch_tokens)
    if config.ep_size is not None:
        return _build_ep_plan(profile, layout, load, error, names, scheme_bytes, budget_bytes, config.global_budget,
                              config.ep_size, config.ep_devices, config.importance, config.max_error, per_step)
    # the guard keeps hot experts precise, so it needs at least the original bytes; a budget below
    # 1.0x is met by the plain greedy (the budget wins over the error cap, as documented)
    if (config.strategy == "greedy" and config.max_error is not None and not config.global_budget
            and bool((torch.as_tensor(budget_bytes) >= torch.as_tensor(layer_bytes)).all())):
        from ..plan.guarded import plan_guarded

        seq = profile.seq_loads.double() if profile.seq_loads is not None else load[None]
        plan = plan_guarded(seq, error, names, scheme_bytes, budget_bytes, config.plan_options(**option_overrides),
                            groups=profile.seq_domain, group_names=profile.domains, per_step=per_step,
                            layer_ids=list(layout.layers), rows_per_seq=profile.rows_per_sequence)
    else:
        plan = make_plan(load, error, names, scheme_bytes, budget_bytes, config.plan_options(**option_overrides),
                         global_budget=config.global_budget, layer_ids=list(layout.layers))
    if config.ep_devices:
        from ..plan.fit import fit_devices

        plan = fit_devices(plan, load, error, config.ep_devices)
    return plan


def steps_per_profile(profile: Profile, batch_tokens: int | None) -> int:
    """Calibration rows summed into one planned step: ``batch_tokens`` over the tokens behind one
    row of the profile's loads (a sequence, or a chunk), else ``defaults.SEQS_PER_STEP`` sequences."""
    if profile.seq_loads is None:
        return defaults.SEQS_PER_STEP
    if batch_tokens is None:
        return defaults.SEQS_PER_STEP * profile.rows_per_sequence
    return rows_per_step(int(batch_tokens), profile.tokens_per_row)


def _build_ep_plan(profile, layout, load, error, names, scheme_bytes, budget_bytes, global_budget, ep_size, ep_devices,
                   importance, max_error, per_step):
    """``--ep-size G``: the per-step, shift-robust planner with device placement (``rq_tool.plan.ep_plan``)."""
    from ..plan.ep_plan import plan_ep

    if int(ep_size) < 1:
        raise RQError(f"--ep-size must be >= 1, got {ep_size}")
    if ep_devices is not None:
        raise RQError("--ep-size places slots on devices itself; drop --ep-devices")
    if global_budget:
        raise RQError("--ep-size plans each layer within its own per-device shares; drop --global")
    seq = profile.seq_loads.double() if profile.seq_loads is not None else load[None]
    return plan_ep(seq, error, names, scheme_bytes, budget_bytes, int(ep_size), max_error=max_error,
                   groups=profile.seq_domain, group_names=profile.domains, per_step=per_step,
                   layer_ids=list(layout.layers), error_weight=importance, rows_per_seq=profile.rows_per_sequence)


def _check_quantized_source_budget(layout: ExpertLayout, budget_bytes, scheme_bytes, names, global_budget) -> None:
    """A quantized source (FP8 / MXFP4) is measured as stored, but rq writes bf16 / int8 / nf4 slots:
    a budget too small for its experts in the cheapest of those gets the factor that would fit."""
    if layout.source_quant == "none" or layout.fp8_kept:
        return
    cheapest = int(torch.argmin(scheme_bytes))
    need = layout.num_experts * int(scheme_bytes[cheapest])
    have = [int(budget_bytes)] if global_budget else budget_bytes.tolist()
    per = need * (len(layout.layers) if global_budget else 1)
    if min(have) >= per:
        return
    factor = max(need / layout.layer_source_bytes(layer) for layer in layout.layers)
    what = ("rq writes no mxfp4 slots" if layout.source_quant == "mxfp4" else
            "rq keeps fp8 experts as slots only with 128 x 128 blocks, per-expert nn.Linear tensors and I a multiple of 128")
    raise RQError(f"the source stores its experts in {layout.source_quant} and {what}: even {names[cheapest]} needs "
                  f"{factor:.2f}x the stored expert bytes",
                  hint=f"use --budget {math.ceil(factor * 100) / 100:.2f} or more")

"""``rq_tool.eval.evaluate(...)``: the library call behind ``rq eval``, and its text rendering."""

from __future__ import annotations

from pathlib import Path

from .. import defaults
from ..errors import RQError
from .compare import compare, score_original, score_rewritten
from .heldout import load_heldout


def evaluate(original, rewritten, *, datasets=(), max_tokens: int = defaults.HELDOUT_TOKENS,
             seq_len: int = defaults.HELDOUT_SEQ_LEN, batch_size: int = defaults.HELDOUT_BATCH_SIZE,
             device_counts=defaults.DEVICE_COUNTS, laser=None,
             domain_weights: dict[str, float] | None = None, dataset_config: str | None = None,
             split: str | None = None, text_field: str | None = None, progress: bool = True) -> dict:
    """Compare ``rewritten`` (an ``rq rewrite`` output) with ``original`` on held-out data.

    Returns ``{"results": [original row, rewritten row (, laser row)], "heldout": ...}``; each
    row is a ``compare`` result (see ``rq_tool.eval.compare``). ``datasets`` empty: the data the
    rewritten model's profile was calibrated on, its unused texts when there are any, else the
    calibration texts (``heldout["held_out"]`` is then False: in-sample numbers); see
    ``rq_tool.eval.heldout``. ``dataset_config`` / ``split`` / ``text_field``: how to read the
    data (``rq_tool.calibrate.load_texts``). ``laser``: a ``LaserConfig`` to also score LASER
    routing on the original weights. ``domain_weights``: token shares of the traffic the plan was
    made for, adding each row's ``matched`` pool. ``progress``: bars on stderr (only on a terminal).
    """
    from ..calibrate.profile import Profile
    from ..source import load_tokenizer, resolve_model_path

    src = resolve_model_path(original)
    rewritten = Path(rewritten)
    if not (rewritten / "config.json").is_file():
        raise RQError(f"{rewritten} is not a model directory (no config.json)")
    prof_path = rewritten / defaults.PROFILE_FILE
    profile = Profile.load(prof_path) if prof_path.is_file() else None
    tokenizer = load_tokenizer(src)
    max_pos = getattr(_config(src), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise RQError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    heldout = load_heldout(tokenizer, tuple(datasets), seq_len=seq_len, max_tokens=max_tokens,
                           calibration=profile.calibration if profile else None, config=dataset_config, split=split,
                           text_field=text_field)
    plan_load = profile.load_matrix() if profile else None
    orig = score_original(src, heldout, batch_size=batch_size, plan_load=plan_load, progress=progress)
    cand = score_rewritten(rewritten, src, heldout, batch_size=batch_size, name=rewritten.name, progress=progress)
    kw = {"device_counts": device_counts, "domain_weights": domain_weights}
    results = [compare(orig, orig, heldout, **kw), compare(orig, cand, heldout, **kw)]
    if laser is not None:
        from .laser import LaserRouting

        las = score_original(src, heldout, batch_size=batch_size, name="laser", plan_load=plan_load,
                             info={"laser": laser.to_dict()}, policy=lambda m, f: LaserRouting(m, f, laser),
                             progress=progress)
        results.append(compare(orig, las, heldout, **kw))
    out = {"results": results, "heldout": heldout.describe()}
    placed = per_step_section(src, rewritten, heldout, batch_size, progress)
    if placed is not None:
        out["per_step"] = placed
    return out


def per_step_section(src, rewritten: Path, heldout, batch_size: int, progress: bool = False) -> dict | None:
    """Per-step device max/mean of a rewritten model's own placement (routing map v2 with
    ``num_devices``) vs standard EP, on held-out per-sequence loads of the original model, at
    ``defaults.STEP_COUNTS`` sequences per step, both split policies, mixed and single-domain steps.
    ``None`` when the map has no placement."""
    import json

    import torch

    from ..calibrate import CalibrationData, profile_model
    from ..source import load_model
    from ..plan.balance import Layout
    from ..plan.steps import contiguous_layout
    from ..runtime.routing_map import RoutingMap
    from .ep import per_step_balance

    path = rewritten / defaults.ROUTING_MAP_FILE
    if not path.is_file():
        return None
    rmap = RoutingMap.from_dict(json.loads(path.read_text()), where=str(path))
    if rmap.num_devices is None:
        return None
    model, family = load_model(src)
    loads = {}
    for name, ids in heldout.domains.items():
        _, seq = profile_model(model, family, CalibrationData(name, "", ids, 0), batch_size=batch_size,
                               quant_error=False, progress=progress, return_seq_loads=True)
        loads[name] = seq
    G, L, E = rmap.num_devices, len(rmap.layers), rmap.num_experts
    pad = torch.nn.utils.rnn.pad_sequence
    layouts = {"standard EP": Layout(*contiguous_layout(L, E, G)),
               "rewritten": Layout(pad([lm.phy2log for lm in rmap.layers], True, -1),
                                   pad([lm.slot_device for lm in rmap.layers], True, -1))}
    return {"num_devices": G, "data": heldout.label, "table": per_step_balance(loads, layouts, G)}


def _config(path):
    from ..source import load_config

    return load_config(path)


def per_step_text(section: dict) -> str:
    """The per-step table of ``per_step_section`` for people."""
    lines = [f"per-step device max/mean on EP {section['num_devices']} ({section.get('data', 'held-out')}; mean over "
             "64 resampled steps; "
             "standard EP -> the rewritten model's placement):"]
    for policy, by_b in section["table"].items():
        for b, by_steps in by_b.items():
            cells = ", ".join(f"{st} {v['standard EP']['mean']:.3f}->{v['rewritten']['mean']:.3f}"
                              for st, v in by_steps.items())
            lines.append(f"  {policy}, {b} seq/step: {cells}")
    return "\n".join(lines)


def data_text(heldout: dict) -> str:
    """Which data was scored and whether it is held out (``HeldOut.describe()``), for people."""
    doms = ", ".join(f"{d} ({v['sequences']} x {v['seq_len']} tokens)" for d, v in heldout["domains"].items())
    tag = "held-out" if heldout.get("held_out", True) else "IN-SAMPLE"
    return f"scored on [{tag}] {heldout['source']}: {doms}" + (f"\n  {heldout['note']}" if heldout.get("note") else "")


def detail_text(result: dict) -> str:
    """Per-domain quality, per-layer LIS, bytes and EP of one ``compare`` result, for people."""
    r = result
    data = "held-out" if r["heldout"].get("held_out", True) else "IN-SAMPLE"
    lines = [f"== {r['name']} vs original ({data})"]
    lines.append(f"{'domain':<12} {'ppl orig':>9} {'ppl new':>9} {'Δppl%':>7} {'acc orig':>9} {'acc new':>8} "
                 f"{'Δacc pts':>8} {'LIS before':>10} {'after':>6} {'batch LIS before':>16} {'after':>6}")
    for d, q in r["quality"].items():
        li = r["lis"]["domains"].get(d)
        lis_s = (f"{li['mean_before']:>10.3f} {li['mean_after']:>6.3f} {li['batch_mean_before']:>16.3f} "
                 f"{li['batch_mean_after']:>6.3f}") if li else ""
        lines.append(f"{d:<12} {q['original']['ppl']:>9.3f} {q['candidate']['ppl']:>9.3f} {q['ppl_delta_pct']:>+7.2f} "
                     f"{100 * q['original']['acc']:>8.2f}% {100 * q['candidate']['acc']:>7.2f}% "
                     f"{100 * q['acc_delta']:>+8.2f} {lis_s}")
    li = r["lis"]
    lines.append(f"LIS per layer ({data}, pooled): " + ", ".join(
        f"L{x['layer']} {x['before']:.2f}->{x['after']:.2f} ({x['slots']} slots)" for x in li["layers"]))
    change = f"{li['reduction']:.2f}x lower" if li["reduction"] >= 1 else f"{1 / li['reduction']:.2f}x higher"
    lines.append(f"LIS mean {li['mean_before']:.3f} -> {li['mean_after']:.3f} ({change}, "
                 f"{100 * li['excess_removed']:.0f}% of the excess removed); per batch "
                 f"{li['batch_mean_before']:.3f} -> "
                 f"{li['batch_mean_after']:.3f}")
    b = r["bytes"]
    lines.append(f"expert bytes {b['before']:,} -> {b['after']:,} ({b['ratio']:.3f}x)")
    for g, e in r["ep"].items():
        mem = "within the original per-device share" if e["fits_original_share"] else \
            f"fullest device {e['device_bytes_ratio']:.2f}x the original share"
        lines.append(f"EP G={g}: max/mean before (contiguous) {e['before']:.3f}, after (placed) {e['after']:.3f} "
                     f"[{mem}; memory ignored {e['after_memory_free']:.3f}]; EPLB {e['eplb']:.3f} at "
                     f"{e['eplb_bytes_ratio']:.2f}x bytes")
    m = r.get("matched")
    if m:
        w = ", ".join(f"{d} {v:.0%}" for d, v in m["weights"].items())
        e8 = m["ep"].get(max(m["ep"], key=int))
        lines.append(f"mixture {w}: ppl {m['quality']['ppl_delta_pct']:+.2f}%, "
                     f"LIS mean {m['lis']['mean_before']:.3f} -> "
                     f"{m['lis']['mean_after']:.3f} ({100 * m['lis']['excess_removed']:.0f}% of the excess removed), "
                     f"EP G={max(m['ep'], key=int)} {e8['before']:.3f} -> {e8['after']:.3f}")
    if r.get("policy_stats"):
        tok = sum(s["tokens"] for s in r["policy_stats"])
        rer = sum(s["rerouted"] for s in r["policy_stats"])
        lines.append(f"routing policy: {rer}/{tok} token-layer decisions had a choice ({100 * rer / max(tok, 1):.1f}%)")
    return "\n".join(lines)

"""``rq export``: a thin click layer over rq_tool.export (parse, call the library, print).

Registered in rq_tool/cli.py with ``main.add_command(export)``; RQError becomes one line there.
"""

from __future__ import annotations

import json

import click

from .. import defaults
from ..cli_types import BUDGET, MAX_DEVICES, BoundedInt
from ..errors import RQError

_HELP = f"""Export rq's measured expert loads for a serving engine (SGLang, vLLM).

PROFILE_OR_OUT is a profile.json from rq calibrate, or a model directory from rq rewrite (its
rq_profile.json is used). Engines serve the ORIGINAL checkpoint; rq only tells them where to put
experts (or, with --per-layer-precision, which layers to quantize).

\b
sglang: writes the --init-expert-location JSON: {{"physical_to_logical_map":
        [num_hidden_layers, E+R]}} (rq's replicas and GPU packing), or with
        --logical-count {{"logical_count": [num_hidden_layers, E]}} so SGLang
        plans itself; prints the server flags.
vllm:   vLLM cannot load a placement yet; prints --enable-eplb --eplb-config
        with rq's R (--out writes that JSON). vLLM starts from identity +
        round-robin redundancy and learns the load online.

Default --redundant R: the smallest R >= 0 with (E + R) divisible by --ep-size whose predicted
per-GPU max/mean load, averaged over MoE layers, is <= {defaults.EXPORT_TARGET_MAX_MEAN:.2f}; capped at E
(if no R up to E gets there, the most balanced one). Each redundant slot costs one more expert's
memory per MoE layer on some GPU.

--per-layer-precision: engines run one quantization scheme per MoE layer, so rq picks which
layers' experts to quantize (int8, or int4 group-32 for nf4) to fit --budget at the lowest total
predicted error, and writes a compressed-tensors quantization_config for the checkpoint
(per-expert projections targeted, every other Linear listed in ignore). Writing
the re-quantized checkpoint is out of scope: quantize it with these config_groups (e.g.
llm-compressor) and put the dict in its config.json."""


@click.command("export", help=_HELP)
@click.argument("source", metavar="PROFILE_OR_OUT", type=click.Path())
@click.option("--engine", required=True, type=click.Choice(sorted(defaults.EXPORT_ENGINES)), help="The serving engine.")
@click.option("--ep-size", type=BoundedInt(1, MAX_DEVICES), help="Expert-parallel GPUs N (placement export; required there).")
@click.option("--redundant", type=BoundedInt(0, 1 << 16), default=None,
              help="Redundant expert slots R per MoE layer (more: better balance, more memory). "
                   "Default: rq's recommendation, see above.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help=f"File to write (sglang default {defaults.EXPORT_SGLANG_FILE}; vllm: only printed unless given; "
                   f"--per-layer-precision default {defaults.EXPORT_QCONFIG_FILE}).")
@click.option("--logical-count", is_flag=True,
              help="sglang: write measured counts instead of a placement, so SGLang's EPLB plans (and can keep "
                   "rebalancing with --enable-eplb).")
@click.option("--per-layer-precision", is_flag=True,
              help="Write a per-layer quantization_config (compressed-tensors) instead of a placement.")
@click.option("--budget", default=str(defaults.BUDGET), show_default=True, type=BUDGET,
              help="--per-layer-precision: expert memory of ALL MoE layers together, a factor of the original "
                   "(0.9) or a size (120MB).")
@click.option("--model", type=click.Path(),
              help="--per-layer-precision: the original checkpoint (for expert sizes); default: the profile's "
                   "model path.")
@click.option("--force", is_flag=True, help="Replace an existing file written by rq export (never any other file).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
def export(source, engine, ep_size, redundant, out, logical_count, per_layer_precision, budget, model, force, as_json):
    from functools import partial

    from ..outputs import check_output
    from .engines import get_engine
    from .source import EXPORT_KIND, read_source, write_json_atomic

    eng = get_engine(engine)
    src = read_source(source)
    inputs = [source, model, src.profile.model.get("path") if per_layer_precision and model is None else None]
    if out is not None:
        check_output(out, EXPORT_KIND, inputs, force)  # before any work
    write_json_atomic = partial(write_json_atomic, inputs=inputs, force=force)
    if per_layer_precision:
        given = [flag for flag, v in (("--ep-size", ep_size), ("--redundant", redundant),
                                      ("--logical-count", logical_count or None)) if v is not None]
        if given:
            raise RQError(f"--per-layer-precision writes a quantization config only; drop {', '.join(given)} "
                          "(export the placement in a separate run)")
        _export_precision(src, eng, budget, model, out or defaults.EXPORT_QCONFIG_FILE, as_json, write_json_atomic)
        return
    if ep_size is None:
        raise RQError("--ep-size is required to export a placement (the number of expert-parallel GPUs)")
    from .engines import plan_placement

    plan = plan_placement(src.load(), src.layers, src.num_hidden_layers, ep_size, redundant)
    result = eng.build(plan, out, logical_count, src.profile.model.get("model_type"))
    path = None
    if result.content is not None:
        path = write_json_atomic(out or defaults.EXPORT_SGLANG_FILE, result.content)
    if as_json:
        click.echo(json.dumps({"format": defaults.EXPORT_FORMAT[0], "version": defaults.EXPORT_FORMAT[1],
                               "engine": eng.name, "source": str(src.path), "out": str(path) if path else None,
                               "content": next(iter(result.content)) if result.content else None,
                               "flags": result.flags, "notes": result.notes, "warnings": result.warnings,
                               **plan.summary()}))
        return
    click.echo(_placement_text(src, eng.name, plan, result, path, logical_count))


def _placement_text(src, engine: str, plan, result, path, logical_count: bool) -> str:
    E, R, N, P = plan.num_experts, plan.redundant, plan.ep_size, plan.num_physical
    why = (f"rq's pick: smallest R reaching max/mean <= {plan.target:.2f}" if plan.recommended else "given")
    lines = [f"{engine}: EP size {N}, {E} experts + {R} redundant ({why}) = {P} slots per MoE layer, {P // N} per GPU",
             f"  memory: +{R} experts per MoE layer (+{100.0 * R / E:.1f}% expert memory)",
             f"predicted per-GPU max/mean load over {len(plan.layers)} MoE layers (1.00 = balanced):",
             f"  {'':48s} {'mean':>6s} {'worst':>6s}"]
    rows = []
    if plan.identity is not None and R:
        rows.append(("before: no redundancy (identity)", plan.identity))
    rows.append(("before: engine default, identity" + (" + round-robin" if R else ""), plan.engine_default))
    rows.append(("after: rq placement" + (" (EPLB global policy)" if logical_count else ""), plan.rq))
    lines += [f"  {name:48s} {float(x.mean()):6.3f} {float(x.max()):6.3f}" for name, x in rows]
    if path is not None:
        key, value = next(iter(result.content.items()))
        shape = f" ({key} [{len(value)}, {len(value[0])}])" if isinstance(value, list) else ""
        lines.append(f"wrote {path}{shape}")
    lines.append("server flags:")
    lines.append("  " + " ".join(result.flags))
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _export_precision(src, eng, budget, model, out, as_json, write_json_atomic) -> None:
    from .precision import plan_layer_precision
    from .source import layer_scheme_bytes

    measured = [s for s in defaults.QUANT_SCHEMES if s in src.profile.schemes]
    if not measured:
        have = ", ".join(src.profile.schemes) or "none"
        raise RQError(f"{src.path}: the profile has no quant_error (measured: {have}); "
                      "re-run rq calibrate without --no-quant-error")
    layer_bytes, names, serving = layer_scheme_bytes(src, model, measured)
    res = plan_layer_precision(src.profile, src.layers, layer_bytes, names, budget, serving, eng.moe_probe_projections)
    warnings = eng.precision_warnings({row["scheme"] for row in res["layers"]})
    config, rows, original, budget_bytes = (res["quantization_config"], res["layers"], res["original_bytes"],
                                            res["budget_bytes"])
    path = write_json_atomic(out, config) if config["config_groups"] else None
    if as_json:
        click.echo(json.dumps({"format": defaults.EXPORT_FORMAT[0], "version": defaults.EXPORT_FORMAT[1],
                               "engine": eng.name, "source": str(src.path), "out": str(path) if path else None,
                               "warnings": warnings, **res}))
        return
    lines = [f"{eng.name}: one scheme per MoE layer within {budget_bytes} bytes "
             f"(--budget {budget}; original {original})",
             f"  {'layer':>5s} {'scheme':>6s} {'bytes':>12s} {'pred error':>11s} {'err/power':>9s}"]
    lines += [f"  {r['layer']:5d} {r['scheme']:>6s} {r['bytes']:12d} {r['error']:11.4g} {r['relative_error']:9.2e}"
              for r in rows]
    lines.append(f"  total {res['total_bytes']} bytes ({100.0 * res['total_bytes'] / original:.1f}% of the "
                 f"original), predicted error {res['total_error']:.4g}")
    if path is None:
        lines.append("the budget holds every MoE layer unquantized: nothing to quantize, no file written")
    else:
        lines.append(f"wrote {path} (compressed-tensors quantization_config, format {config['format']}, "
                     f"{len(config['ignore'])} ignore entries)")
        lines.append("next: quantize the original checkpoint with these config_groups (e.g. llm-compressor) and put "
                     f"this dict in its config.json as quantization_config; {eng.name} then reads it "
                     "(rq does not write the re-quantized checkpoint)")
    lines += [f"warning: {w}" for w in warnings]
    click.echo("\n".join(lines))

"""Click commands ``rq eval`` and ``rq report`` (registered by ``rq_tool.cli`` with ``add_command``)."""

from __future__ import annotations

import json
import math

import click

from .. import defaults
from ..cli_types import MAX_DEVICES, BoundedFloat, BoundedInt
from ..errors import RQError
from ..outputs import check_output, json_file_kind, write_text

EVAL_KIND = json_file_kind("eval result", ["rq-eval"])


def _devices(spec: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in spec.split(",") if x.strip() and len(x.strip()) <= 6)
    except ValueError:
        raise RQError(f"--devices must be comma-separated integers, got {spec!r}") from None
    if not out or len(out) != len([x for x in spec.split(",") if x.strip()]) or any(not 1 <= g <= MAX_DEVICES
                                                                                     for g in out):
        raise RQError(f"--devices must list device counts in [1, {MAX_DEVICES}], got {spec!r}")
    return out


def _weights(spec: str | None) -> dict[str, float] | None:
    if not spec:
        return None
    bad = RQError(f"--weights must look like code=0.5,math=0.5 (non-negative, not all zero), got {spec!r}")
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise bad from None
        if not name.strip() or out[name.strip()] < 0:
            raise bad
    if sum(out.values()) <= 0:
        raise bad
    return out


def json_safe(v):
    """``v`` with every NaN / inf replaced by null: rq's JSON is strict (RFC 8259 has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v



@click.command("eval")
@click.argument("original", type=click.Path())
@click.argument("rewritten", type=click.Path())
@click.option("--dataset", "-d", "datasets", multiple=True,
              help="Held-out data (file, dataset folder or dataset name), one domain each; repeatable. Default: the "
                   "rewritten model's calibration data -- its texts calibration did not use (held-out), else the "
                   "calibration texts, reported as in-sample; for a bundled set, the bundled corpus's held-out split.")
@click.option("--dataset-config", default=None, help="Config of the datasets (a datasets name's config, or a parquet "
              "folder's subfolder).")
@click.option("--split", default=None, help="Split of the datasets (default: train); without --dataset, that split "
              "of the calibration data, scored as held-out.")
@click.option("--text-field", default=None, help="Column / JSON field holding the text.")
@click.option("--max-tokens", default=defaults.HELDOUT_TOKENS, show_default=True, type=BoundedInt(2, 1 << 32),
              help="Tokens scored per domain: more is steadier, slower.")
@click.option("--seq-len", default=defaults.HELDOUT_SEQ_LEN, show_default=True, type=BoundedInt(2, 1 << 20),
              help="Tokens per window (at least 2: one prediction).")
@click.option("--batch-size", default=defaults.HELDOUT_BATCH_SIZE, show_default=True, type=BoundedInt(1, 1 << 16),
              help="Windows per forward; per-batch LIS is measured on batches of this size from one domain.")
@click.option("--weights", default=None,
              help="Also pool the held-out domains in these token shares, e.g. code=0.55,math=0.36,prose=0.04,"
                   "docs=0.05 (the traffic the plan was calibrated for); default: equal tokens per domain only.")
@click.option("--devices", default=",".join(map(str, defaults.DEVICE_COUNTS)), show_default=True,
              help="Device counts for the simulated expert parallelism.")
@click.option("--laser", is_flag=True, help="Also score LASER load-aware routing on the original weights.")
@click.option("--laser-eps-high", default=defaults.LASER_EPS_HIGH, show_default=True, type=BoundedFloat(0.0, 1.0),
              help="LASER: top-k gate mass at or above which a token keeps vanilla routing (higher: reroutes more).")
@click.option("--laser-t-fix", default=defaults.LASER_T_FIX, show_default=True, type=BoundedFloat(0.0, 1.0),
              help="LASER: candidates need gate prob >= t_fix x the max (lower: more candidates, more damage).")
@click.option("--laser-candidates", type=BoundedInt(1, 1 << 16), default=None,
              help="LASER: at most this many candidates (default 2 x top-k).")
@click.option("--out", "-o", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON here.")
@click.option("--force", is_flag=True, help="Replace an existing --out written by rq eval (never any other file).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (they are drawn on stderr, only on a terminal).")
def eval_cmd(original, rewritten, datasets, dataset_config, split, text_field, max_tokens, seq_len, batch_size, weights,
             devices, laser, laser_eps_high, laser_t_fix, laser_candidates, out_path, force, as_json, quiet):
    """Compare REWRITTEN with ORIGINAL: perplexity, accuracy, LIS, bytes, simulated EP.

    Scores --dataset data, or by default the data REWRITTEN was calibrated on (its unused texts; the
    first output line says which data and whether it is held out or in-sample)."""
    from .laser import LaserConfig
    from .baselines import markdown_table
    from .run import data_text, detail_text, evaluate, per_step_text

    inputs = [original, rewritten, *datasets]
    if out_path:
        check_output(out_path, EVAL_KIND, inputs, force)  # before the (long) evaluation
    cfg = LaserConfig(laser_eps_high, laser_t_fix, laser_candidates) if laser else None
    res = evaluate(original, rewritten, datasets=datasets, max_tokens=max_tokens, seq_len=seq_len,
                   batch_size=batch_size, device_counts=_devices(devices), laser=cfg, domain_weights=_weights(weights),
                   dataset_config=dataset_config, split=split, text_field=text_field, progress=not quiet)
    if out_path:
        write_text(out_path, json.dumps(json_safe(res), indent=1, allow_nan=False) + "\n", EVAL_KIND, inputs, force)
    if as_json:
        click.echo(json.dumps(json_safe(res), allow_nan=False))
        return
    click.echo(data_text(res["heldout"]))
    click.echo("")
    click.echo(markdown_table(res["results"]))
    for r in res["results"][1:]:
        click.echo("")
        click.echo(detail_text(r))
    if res.get("per_step"):
        click.echo("")
        click.echo(per_step_text(res["per_step"]))
    if out_path:
        click.echo(f"wrote {out_path}")


@click.command("report")
@click.argument("profile", type=click.Path())
@click.option("--compare", "rewritten", type=click.Path(file_okay=False), default=None,
              help="A rewritten model directory: adds its predicted load heatmap (each expert's heaviest slot, on "
                   "the before plot's colour scale) and LIS after.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True, help="Directory for the PNGs.")
@click.option("--force", is_flag=True, help="Replace an existing report folder written by rq report (never any "
              "other folder).")
def report(profile, rewritten, out_dir, force):
    """PNG heatmaps of load per layer x expert (before, and after with --compare) and an LIS-per-layer chart."""
    from .report import write_report

    for p in write_report(profile, out_dir, compare=rewritten, force=force):
        click.echo(f"wrote {p}")

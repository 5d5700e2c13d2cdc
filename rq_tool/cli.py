"""The ``rq`` command line: a thin click layer over the library (defaults from rq_tool.defaults)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import defaults
from .errors import RQError
from .quant import QUANT_SCHEMES, SCHEMES


class _Group(click.Group):
    """Turns RQError (and bad files) into one line + non-zero exit, unless --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RQError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was left half-written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="rq-tool")
@click.pass_context
def main(ctx, debug):
    """rq: replicate heavy-hitter experts and quantize cold ones, within the original memory."""
    ctx.ensure_object(dict)["debug"] = debug
    import logging
    import warnings

    if not debug:
        warnings.filterwarnings("ignore", module="bitsandbytes")
        logging.getLogger("transformers").setLevel(logging.ERROR)


@main.command()
@click.argument("model", required=False)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="profile.json", show_default=True,
              help="Where to write the profile.")
@click.option("--dataset", "-d", default=defaults.DEFAULT_DATASET, show_default=True,
              help="Bundled set name, local .jsonl/.txt/.parquet file, or a datasets name.")
@click.option("--num-samples", default=defaults.NUM_SAMPLES, show_default=True, help="Packed sequences to run.")
@click.option("--seq-len", default=defaults.SEQ_LEN, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", default=defaults.BATCH_SIZE, show_default=True, help="Sequences per forward.")
@click.option("--seed", default=defaults.SEED, show_default=True, help="Document shuffle seed.")
@click.option("--schemes", default=",".join(QUANT_SCHEMES), show_default=True,
              help=f"Quantization schemes to measure quant_error for (known: {', '.join(SCHEMES)}).")
@click.option("--no-quant-error", is_flag=True, help="Skip the quant_error pass (faster; rewrite then needs "
              "--importance frequency).")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON instead of a table.")
def calibrate(model, out, dataset, num_samples, seq_len, batch_size, seed, schemes, no_quant_error, as_json):
    """Profile expert load and importance of MODEL (default: the bundled tiny MoE)."""
    from .calibrate import calibrate as run
    from .quant import get_scheme
    from .report_text import profile_table

    scheme_list = [get_scheme(s.strip()).name for s in schemes.split(",") if s.strip()]
    profile = run(model, dataset, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  schemes=scheme_list, quant_error=not no_quant_error, progress=not as_json)
    profile.save(out)
    if as_json:
        click.echo(json.dumps(profile.to_dict()))
    else:
        click.echo(profile_table(profile))
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()

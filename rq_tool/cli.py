"""The ``rq`` command line: a thin click layer over the library (defaults from rq_tool.defaults)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from . import defaults
from .cli_types import BUDGET, MAX_DEVICES, SCHEME_LIST, BoundedInt, CapOrOff
from .errors import RQError
from .outputs import Terminated, check_output, json_file_kind, signals_as_interrupt, write_text
from .rewrite.config import RewriteConfig

_REWRITE = RewriteConfig()  # rq rewrite's planning defaults

PROFILE_KIND = json_file_kind("profile", [defaults.PROFILE_FORMAT[0]])


def usage_error_line(e: click.ClickException) -> None:
    """A click usage error as one ``error:`` line and exit 2 (click's default prints three)."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    cmd = f"{ctx.command_path}: " if ctx is not None and ctx.command_path else ""
    click.echo(f"error: {cmd}{msg} (--help for usage)", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns RQError (and bad files, usage errors, SIGTERM) into one line + non-zero exit, unless --debug."""

    # commands whose module imports torch: loaded only when named, so `rq --help` stays light
    _LAZY = {"plan": ("rq_tool.plan.cli", "plan_cmd", "Plan replicas and devices from recorded loads (no model).")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._LAZY))

    def get_command(self, ctx, name):
        if name in self._LAZY and name not in self.commands:
            import importlib

            module, attr, _ = self._LAZY[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(n, self.commands[n].get_short_help_str(60) if n in self.commands else self._LAZY[n][2])
                for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            usage_error_line(e)

    def invoke(self, ctx):
        try:
            with signals_as_interrupt():
                return super().invoke(ctx)
        except click.ClickException as e:
            usage_error_line(e)
        except RQError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # disk full, permissions, a path under a file ...
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):
                click.echo(f"terminated ({signal.Signals(e.signum).name}): nothing was left half-written", err=True)
                sys.exit(128 + e.signum)
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
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        else:  # read when transformers is first imported (importing it just for this costs ~1 s)
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command()
@click.argument("model", required=False)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="profile.json", show_default=True,
              help="Where to write the profile.")
@click.option("--dataset", "-d", default=defaults.DEFAULT_DATASET, show_default=True,
              help="Bundled set name, local .jsonl/.txt/.parquet file, a datasets save_to_disk folder or a folder "
                   "of parquet files, or a datasets name.")
@click.option("--dataset-config", default=None, help="Config of a datasets name (or subfolder of a parquet folder).")
@click.option("--split", default=None, help="Split of a dataset folder or datasets name (default: train).")
@click.option("--text-field", default=None, help="Column / JSON field holding the text (default: the first of "
              "text, content, code, document, body).")
@click.option("--num-samples", default=defaults.NUM_SAMPLES, show_default=True, type=BoundedInt(1, 1 << 24),
              help="Packed sequences to run.")
@click.option("--seq-len", default=defaults.SEQ_LEN, show_default=True, type=BoundedInt(1, 1 << 20),
              help="Tokens per sequence.")
@click.option("--chunk-tokens", default=None, type=BoundedInt(1, 1 << 20),
              help="Record per-row loads per chunk of this many tokens (must divide --seq-len) instead of per "
                   "sequence, so planning can resample steps finer than a sequence.")
@click.option("--batch-size", default=defaults.BATCH_SIZE, show_default=True, type=BoundedInt(1, 1 << 16),
              help="Sequences per forward.")
@click.option("--seed", default=defaults.SEED, show_default=True, type=BoundedInt(0, 2**32 - 1),
              help="Document shuffle seed.")
@click.option("--schemes", default=",".join(defaults.QUANT_SCHEMES), show_default=True, type=SCHEME_LIST,
              help=f"Quantization schemes to measure quant_error for (known: {', '.join(defaults.SCHEME_NAMES)}).")
@click.option("--no-quant-error", is_flag=True, help="Skip the quant_error pass (faster; rewrite then needs "
              "--importance frequency).")
@click.option("--max-memory", default=None, help="Keep at most this much of the weights in RAM (e.g. 8GB) and "
              "offload the rest to disk, loading layers as the forward reaches them (slower; for models "
              "larger than memory; needs accelerate).")
@click.option("--force", is_flag=True, help="Replace an existing profile written by rq (never any other file).")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON instead of a table.")
def calibrate(model, out, dataset, dataset_config, split, text_field, num_samples, seq_len, chunk_tokens, batch_size,
              seed, schemes, no_quant_error, max_memory, force, as_json):
    """Profile expert load and importance of MODEL (default: the bundled tiny MoE)."""
    from .calibrate import calibrate as run
    from .source import resolve_model_path
    from .calibrate.table import profile_table

    inputs = [resolve_model_path(model), *([dataset] if Path(dataset).exists() else [])]
    check_output(out, PROFILE_KIND, inputs, force)  # before the (long) calibration
    profile = run(model, dataset, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  schemes=schemes, quant_error=not no_quant_error, progress=not as_json, max_memory=max_memory,
                  dataset_config=dataset_config, split=split, text_field=text_field, chunk_tokens=chunk_tokens)
    profile.save(out, PROFILE_KIND, inputs, force)
    if as_json:
        click.echo(json.dumps(profile.to_dict()))
    else:
        click.echo(profile_table(profile))
        click.echo(f"wrote {out}")


@main.command()
@click.argument("model", required=False)
@click.option("--profile", "-p", "profile_path", required=True, type=click.Path(),
              help="profile.json from rq calibrate on this model.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Output model directory (required unless --dry-run).")
@click.option("--budget", default=str(_REWRITE.budget), show_default=True, type=BUDGET,
              help="Expert memory: a factor of the original (0.9, 1.1x) or a size (120MB, 1.5GiB).")
@click.option("--global", "global_budget", is_flag=True,
              help="Apply the budget to all MoE layers together instead of to each layer.")
@click.option("--strategy", default=_REWRITE.strategy, show_default=True,
              type=click.Choice(sorted(defaults.STRATEGIES)),
              help="greedy: replicate while LIS improves, pay with least-damaging quantization; paper: R&Q "
                   "setting; replicate-only: EPLB-style, memory grows.")
@click.option("--schemes", default=",".join(_REWRITE.schemes), show_default=True, type=SCHEME_LIST,
              help="Quantization schemes the planner may use.")
@click.option("--importance", default=_REWRITE.importance, show_default=True,
              type=click.Choice(defaults.IMPORTANCE),
              help="What picks the experts to quantize: measured quantization damage, or routing frequency only.")
@click.option("--max-error", type=CapOrOff(0.0, 1e6), default=_REWRITE.max_error, show_default=True,
              help="Cap on predicted quantization noise per layer, relative to the layer's expert output power "
                   "(1e-3 = 30 dB SQNR). With greedy it also keeps hot / important experts in the source precision "
                   "(int8 before nf4) and keeps only replicas that hold up on held-out calibration domains; "
                   "'none' (or off): no cap, no guard (the plain greedy).")
@click.option("--ep-devices", type=BoundedInt(1, MAX_DEVICES), default=_REWRITE.ep_devices,
              help="Also make each layer's slots pack onto this many expert-parallel devices within the original "
                   "per-device memory (cheaper schemes first, then fewer replicas).")
@click.option("--ep-size", type=BoundedInt(1, MAX_DEVICES), default=_REWRITE.ep_size,
              help="Plan for this many expert-parallel devices: per-step, shift-robust replicas placed within each "
                   "device's share, hot experts kept in source precision (--max-error); writes the placement "
                   "into the routing map (load-aware dispatch). --strategy is not used.")
@click.option("--batch-tokens", type=BoundedInt(1, 1 << 40), default=_REWRITE.batch_tokens,
              help=f"Tokens per step the per-step checks score (greedy's held-out check, --ep-size); default: "
                   f"{defaults.SEQS_PER_STEP} calibration sequences.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output directory written by rq (never any other "
              "directory: rq checks its manifest lists every file there).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def rewrite(model, profile_path, out, budget, global_budget, strategy, schemes, importance, max_error, ep_devices,
            ep_size, batch_tokens, dry_run, force, as_json):
    """Replicate heavy-hitter experts and quantize cold ones of MODEL (default: bundled tiny MoE)."""
    from .rewrite.table import plan_table
    from .rewrite import rewrite as run

    if out is None and not dry_run:
        raise RQError("--out is required (or use --dry-run to only print the plan)")
    config = RewriteConfig(budget=budget, global_budget=global_budget, strategy=strategy, schemes=tuple(schemes),
                           importance=importance, max_error=max_error, ep_devices=ep_devices,
                           ep_size=ep_size, batch_tokens=batch_tokens)
    res = run(model, profile_path, out, config, force=force, dry_run=dry_run, progress=not as_json)
    if as_json:
        from .rewrite.table import device_memory

        click.echo(json.dumps({"plan": res.plan.to_dict(), "device_memory": device_memory(res.plan),
                               "out": str(res.out) if res.out else None}))
        return
    click.echo(plan_table(res.plan))
    if res.out:
        click.echo(f"wrote {res.out} (load with rq_tool.load() or AutoModelForCausalLM.from_pretrained(..., "
                   "trust_remote_code=True))")


@main.command()
@click.argument("out", type=click.Path())
def verify(out):
    """Re-hash OUT against its manifest and run the loader's integrity checks (dtypes, shapes, activation, paths)."""
    from .rewrite.verify import verify as run

    problems = run(out)
    for p in problems:
        click.echo(f"FAIL {p}", err=True)
    if problems:
        raise RQError(f"{out}: {len(problems)} problem(s) found")
    click.echo(f"OK {out}: every file matches the manifest; tensors, dtypes, activation and shard paths are what "
               "the routing map planned (rq_tool.load gives the planned model)")


@main.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the statuses as JSON instead of a Markdown table.")
def families(model, as_json):
    """List every MoE causal-LM family of the installed transformers and whether rq supports it.

    With MODEL (a local model directory), judge that model's own config instead.
    """
    from dataclasses import asdict

    from .arch.catalog import family_status, family_table, moe_causal_lm_types

    if model is not None:
        from .source import read_config_dict, resolve_model_path

        d = read_config_dict(resolve_model_path(model))
        statuses = [family_status(d["model_type"], d)]
    else:
        statuses = [family_status(mt) for mt in moe_causal_lm_types()]
    if as_json:
        click.echo(json.dumps([asdict(s) for s in statuses], indent=2))
    else:
        click.echo(family_table(statuses))


def _register_stage_commands() -> None:
    from .eval.cli import eval_cmd, report
    from .export.cli import export

    main.add_command(eval_cmd)
    main.add_command(report)
    main.add_command(export)


_register_stage_commands()

if __name__ == "__main__":
    main()

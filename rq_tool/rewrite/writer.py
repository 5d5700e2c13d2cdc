"""``rq_tool.rewrite(...)``: plan, then stream a source checkpoint into a rewritten model directory.

Order of work (nothing is written before every check passed):
1. open the source (config, family, safetensors headers), check the profile belongs to it;
2. plan (pure, ``rq_tool.plan``); ``dry_run`` stops here (and when the profile recorded this
   checkpoint's layout, ``dry_run`` plans from that record, before step 1 builds the family);
3. stream shard by shard into a temporary directory beside ``out`` (``stream.py``): every output
   tensor is planned from the headers first; non-expert tensors are copied as stored (renamed to
   the runtime module's key names), each MoE layer's slots (replicas + per-slot schemes) are written
   as soon as the layer is complete, kept slots straight from the source, quantized ones by a thread
   pool; a writer thread writes and hashes while the next layer is read -- peak memory is about one
   layer's quantized slots plus the bytes queued for the writer;
4. write config.json (+ ``rq`` section, ``auto_map``), routing_map.json, the profile, the runtime
   code, tokenizer files and a sha256 manifest; rename into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__, defaults
from ..arch import get_family
from ..calibrate.profile import Profile, config_fingerprint
from ..checkpoint import SafetensorsCheckpoint
from ..errors import RQError
from ..outputs import check_output, marked_dir_kind, staged
from ..runtime.routing_map import LayerMap, RoutingMap
from ..source import SourceCheckpoint, load_config, read_config_dict, resolve_model_path
from .config import RewriteConfig
from .layout import ExpertLayout, layout_key, read_layout, recorded_layout
from .planning import build_plan
from .shards import ShardWriter, write_json, write_manifest
from .stream import output_entries, plan_steps, write_steps

# files copied verbatim from the source directory (tokenizer, generation config, chat template)
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".md")
_NEVER_COPY = {"config.json", defaults.INDEX_FILE, defaults.MANIFEST_FILE, defaults.ROUTING_MAP_FILE, defaults.PROFILE_FILE}
MODEL_DIR = marked_dir_kind("rewritten model", defaults.MANIFEST_FILE, defaults.MANIFEST_FORMAT[0])


@dataclass
class RewriteResult:
    plan: object
    routing_map: RoutingMap
    out: Path | None
    layout: ExpertLayout


def rewrite(
    model: str | Path | None,
    profile: Profile | str | Path,
    out: str | Path | None,
    config: RewriteConfig | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    shard_bytes: int = defaults.SHARD_BYTES,
    workers: int = defaults.REWRITE_WORKERS,
    **options,
) -> RewriteResult:
    """Plan with ``config`` and (unless ``dry_run``) write the rewritten model to ``out``.

    ``config``: a ``RewriteConfig`` (default: its defaults); ``options``: overrides of its fields
    (``strategy="paper"``, ``budget=0.9``, ...).
    """
    config = config if config is not None else RewriteConfig()
    if options:
        try:
            config = dataclasses.replace(config, **options)
        except TypeError:
            known = ", ".join(f.name for f in dataclasses.fields(RewriteConfig))
            raise RQError(f"unknown rewrite option(s) {', '.join(sorted(options))}; known: {known}") from None
    src = resolve_model_path(model)
    config_dict = read_config_dict(src)
    if "rq" in config_dict:
        raise RQError(f"{src} is already an rq-rewritten model; rewrite the original model")
    inputs = [src] if isinstance(profile, Profile) else [src, Path(profile)]
    profile_where = "profile" if isinstance(profile, Profile) else str(profile)
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    ckpt = None
    if (dry_run or out is None) and profile.model.get("layout") is not None:
        # a layout the profile recorded for this very config and headers: plan without building the model
        ckpt = SourceCheckpoint(src)
        recorded = recorded_layout(profile.model["layout"], layout_key(ckpt, config_dict), profile_where)
        if recorded is not None:
            layout, activation = recorded
            plan = build_plan(profile, layout, config)
            return RewriteResult(plan, routing_map_from_plan(plan, layout, activation), None, layout)
    hf_config = load_config(src)
    family = get_family(hf_config)
    profile.check_matches(hf_config, where="profile")
    if out is not None and not dry_run:
        out = Path(out)
        # the output policy (rq_tool.outputs) before any work; stale temporaries are tidied first, so
        # a backup left by a killed --force rewrite is back in place before the checks
        check_output(out, MODEL_DIR, inputs, force, notify=lambda note: tqdm.write(f"rq: {note}", file=sys.stderr))
    if ckpt is None:
        ckpt = SourceCheckpoint(src)
    layout = read_layout(ckpt, family)
    plan = build_plan(profile, layout, config)
    rmap = routing_map_from_plan(plan, layout, family.activation(hf_config))
    if dry_run or out is None:
        return RewriteResult(plan, rmap, None, layout)

    try:
        with staged(out, MODEL_DIR, inputs, force) as tmp:  # removed on any exception, SIGTERM included
            hashes = _stream(ckpt, family, layout, rmap, tmp, shard_bytes, progress, workers)
            _write_metadata(src, tmp, config_dict, rmap, profile, plan, hf_config)
            write_manifest(tmp, known=hashes)
    except OSError as e:  # disk full, permissions, ...: one line naming the output, nothing left behind
        where = f": {e.filename}" if e.filename else ""
        raise RQError(f"writing {out} failed ({e.strerror or e}{where}); nothing was published") from None
    return RewriteResult(plan, rmap, out, layout)


def plan_summary(plan) -> dict:
    """The plan without its index tensors (those live in the routing map)."""
    d = plan.to_dict()
    keep = ("layer", "lis_before", "lis_after", "bytes_before", "bytes_after", "pred_error", "budget_bytes")
    d["layers"] = [{k: row[k] for k in keep} for row in d["layers"]]
    return d


def routing_map_from_plan(plan, layout: ExpertLayout, activation: str) -> RoutingMap:
    layers = []
    for layer, lp in zip(layout.layers, plan.layers):
        layers.append(LayerMap(layer, lp.phy2log.clone(), lp.log2phy.clone(), lp.logcnt.clone(),
                               tuple(plan.schemes[int(i)] for i in lp.slot_scheme),
                               None if lp.slot_device is None else lp.slot_device.clone()))
    placed = getattr(plan, "num_devices", None)
    rmap = RoutingMap(layout.num_experts, layers, layout.source_scheme, activation,
                      defaults.LOAD_AWARE_POLICY if placed else defaults.SPLIT_POLICY, placed)
    rmap.validate("planned routing map")
    return rmap


def _stream(ckpt: SourceCheckpoint, family, layout: ExpertLayout, rmap: RoutingMap, tmp: Path,
            shard_bytes: int, progress: bool, workers: int) -> dict[str, str]:
    """Write every tensor into ``tmp`` (see ``stream.py``); returns the shards' hashes by file name."""
    steps, expected = plan_steps(ckpt, family, layout)
    entries = output_entries(steps, expected, ckpt, family, layout, rmap)
    bar = tqdm(total=len(ckpt.stored), desc="rewriting", unit="tensor", disable=not progress, leave=False)
    try:  # errors writing the output propagate as they are (OSError)
        with _no_cyclic_gc(), ThreadPoolExecutor(max(1, workers)) as pool, ShardWriter(tmp, entries, shard_bytes, pool=pool) as writer:
            write_steps(steps, expected, ckpt, family, layout, rmap, writer, bar)
            writer.finish()
    finally:
        bar.close()  # also on errors: the error line must not follow a half-drawn progress bar
    return writer.digests


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic GC paused for the streaming pass (restored after, errors included).

    The pass allocates many short-lived objects (closures, futures, queue items), which trigger
    collections; a full one walks every object transformers and torch left in the heap (~370k) while
    holding the GIL, stalling the writer and hash threads (measured: one gen-2 collection ~1 s of a
    1 GB rewrite on a loaded 2-core VM, ~1/3 of the CPU samples in perf). Tensors are freed by
    reference counting, so memory stays flat without it.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _write_metadata(src: Path, tmp: Path, config_dict: dict, rmap: RoutingMap, profile: Profile, plan, config):
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in _COPY_SUFFIXES and p.name not in _NEVER_COPY and not p.name.startswith("."):
            shutil.copyfile(p, tmp / p.name)
    from ..runtime.bundle import write_bundle
    from ..runtime.integrity import header_fingerprint

    write_bundle(tmp)  # the runtime the directory needs, so it loads where rq-tool is not installed
    rq_section = {
        "format": defaults.RQ_CONFIG_FORMAT[0],
        "version": defaults.RQ_CONFIG_FORMAT[1],
        "rq_version": __version__,
        "base_model_type": config_dict["model_type"],
        "source_config_sha256": config_fingerprint(config),
        "routing_map": rmap.to_dict(),
        "plan": plan_summary(plan),
        # what the integrity check compares the stored headers with (a relabelled dtype is caught)
        "tensors_sha256": header_fingerprint(SafetensorsCheckpoint(tmp).tensors),
    }
    new = dict(config_dict)
    # the experts are rq slots now; what stays quantized (an FP8 source's non-expert weights, copied
    # as stored) is described here and dequantized by rq's loader, not by transformers' quantizers
    qc = new.pop("quantization_config", None)
    if qc is not None:
        rq_section["source_quantization"] = qc
    # the base model_type stays, so AutoTokenizer / AutoConfig read the directory without remote
    # code; the base class rejects experts_implementation "rq", so loading the model without
    # trust_remote_code fails instead of building it with missing experts
    new["experts_implementation"] = "rq"
    new["architectures"] = ["RQForCausalLM"]
    new["auto_map"] = {"AutoConfig": "modeling_rq.RQConfig", "AutoModelForCausalLM": "modeling_rq.RQForCausalLM"}
    new["rq"] = rq_section
    write_json(tmp / "config.json", new)
    write_json(tmp / defaults.ROUTING_MAP_FILE, rmap.to_dict())
    write_json(tmp / defaults.PROFILE_FILE, profile.to_dict())

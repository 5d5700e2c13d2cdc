"""``rq_tool.rewrite(...)``: plan, then stream a source checkpoint into a rewritten model directory.

Order of work (nothing is written before every check passed):
1. open the source (config, family, safetensors headers), check the profile belongs to it;
2. plan (pure, ``rq_tool.plan``); ``dry_run`` stops here;
3. stream shard by shard into a temporary directory beside ``out``: non-expert tensors are copied
   unchanged (renamed to the runtime module's key names), each MoE layer's experts are assembled,
   turned into physical slots (replicas + per-slot schemes) and written as soon as the layer is
   complete -- peak memory is about one layer's experts plus one output shard;
4. write config.json (+ ``rq`` section, ``auto_map``), routing_map.json, the profile, the runtime
   code, tokenizer files and a sha256 manifest; rename into place.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from tqdm.auto import tqdm

from .. import __version__, defaults
from ..arch import get_family
from ..calibrate.profile import Profile, config_fingerprint
from ..errors import RQError
from ..kernels import SlotWeights
from ..modelio import load_config, read_config_dict, resolve_model_path
from ..runtime.routing_map import LayerMap, RoutingMap
from .assemble import LayerAssembler
from .config import RewriteConfig
from .layout import ExpertLayout, read_layout
from .planning import build_plan
from ..outputs import check_output, marked_dir_kind, staged
from .shards import ShardWriter, write_json, write_manifest
from .source import SafetensorsCheckpoint

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
    hf_config = load_config(src)
    family = get_family(hf_config)
    inputs = [src] if isinstance(profile, Profile) else [src, Path(profile)]
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    profile.check_matches(hf_config, where="profile")
    if out is not None and not dry_run:
        out = Path(out)
        # the output policy (rq_tool.outputs) before any work; stale temporaries are tidied first, so
        # a backup left by a killed --force rewrite is back in place before the checks
        check_output(out, MODEL_DIR, inputs, force, notify=lambda note: tqdm.write(f"rq: {note}", file=sys.stderr))
    ckpt = SafetensorsCheckpoint(src)
    layout = read_layout(ckpt, family)
    plan = build_plan(profile, layout, config)
    rmap = routing_map_from_plan(plan, layout, family.activation(hf_config))
    if dry_run or out is None:
        return RewriteResult(plan, rmap, None, layout)

    try:
        with staged(out, MODEL_DIR, inputs, force) as tmp:  # removed on any exception, SIGTERM included
            _stream(ckpt, family, layout, rmap, tmp, shard_bytes, progress)
            _write_metadata(src, tmp, config_dict, rmap, profile, plan, hf_config)
            write_manifest(tmp)
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


def _stream(ckpt: SafetensorsCheckpoint, family, layout: ExpertLayout, rmap: RoutingMap, tmp: Path,
            shard_bytes: int, progress: bool) -> None:
    expected: dict[int, set[str]] = {layer: set() for layer in layout.layers}
    for key in ckpt.tensors:
        ek = family.parse_expert_key(key)
        if ek is not None:
            expected[ek.layer].add(key)
    assemblers = {layer: LayerAssembler(layer, keys, family, layout.num_experts) for layer, keys in expected.items()}
    writer = ShardWriter(tmp, shard_bytes)
    bar = tqdm(total=len(ckpt.tensors), desc="rewriting", unit="tensor", disable=not progress, leave=False)
    try:
        for key, tensor in _read_tensors(ckpt):  # errors writing the output propagate as they are (OSError)
            bar.update(1)
            ek = family.parse_expert_key(key)
            if ek is None:
                writer.add(family.runtime_key(key), tensor)
                continue
            asm = assemblers[ek.layer]
            asm.add(key, ek, tensor)
            if asm.done:
                _write_layer(writer, family, layout, rmap.layer(ek.layer), asm, rmap.activation)
                del assemblers[ek.layer]
    finally:
        bar.close()  # also on errors: the error line must not follow a half-drawn progress bar
    if assemblers:
        raise RQError(f"layers {sorted(assemblers)}: expert tensors incomplete on disk")
    writer.finish()


def _read_tensors(ckpt: SafetensorsCheckpoint):
    """``(key, tensor)`` of every source tensor, shard by shard; a read error names the source shard."""
    for shard, keys in ckpt.keys_by_shard().items():
        try:
            f = safe_open(str(shard), framework="pt")
        except Exception as e:  # safetensors errors on a damaged shard
            raise RQError(f"{shard}: cannot read tensors ({type(e).__name__}: {e})") from None
        with f:
            for key in keys:
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise RQError(f"{shard}: cannot read tensors ({type(e).__name__}: {e})") from None
                yield key, tensor


def _write_layer(writer: ShardWriter, family, layout: ExpertLayout, lmap: LayerMap, asm: LayerAssembler, act: str):
    canon = asm.canonical()
    idx = lmap.phy2log
    bias_up = canon.get("gate_up_bias")
    bias_down = canon.get("down_bias")
    slots = SlotWeights.from_dense(canon["gate_up"][idx], canon["down"][idx], list(lmap.slot_scheme), act,
                                   None if bias_up is None else bias_up[idx].contiguous(),
                                   None if bias_down is None else bias_down[idx].contiguous())
    prefix = family.runtime_key(layout.block_prefix[lmap.layer] + ".experts.")
    for scheme, group in zip(slots.schemes, slots.groups):
        for name, t in group.items():
            writer.add(f"{prefix}{scheme}_{name}", t)
    if slots.gate_up_bias is not None:
        writer.add(prefix + "gate_up_bias", slots.gate_up_bias)
        writer.add(prefix + "down_bias", slots.down_bias)


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
        "tensors_sha256": header_fingerprint(SafetensorsCheckpoint(tmp)),
    }
    new = dict(config_dict)
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

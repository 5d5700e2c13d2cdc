"""Thin I/O for rq export: read a profile or a rewritten model dir, write engine files atomically.

Legend: L MoE layers, E logical experts, S schemes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults
from ..calibrate.profile import Profile
from ..errors import RQError
from ..outputs import json_file_kind, write_text


@dataclass(frozen=True)
class ExportSource:
    """Everything export needs from PROFILE_OR_OUT."""

    path: Path
    profile: Profile
    num_hidden_layers: int  # decoder layers, dense ones included
    routing_map: object | None = None  # rq_tool.runtime.RoutingMap of a rewritten model dir

    @property
    def layers(self) -> tuple[int, ...]:
        """Absolute ids of the MoE layers, profile order."""
        return tuple(lp.layer for lp in self.profile.layers)

    @property
    def num_experts(self) -> int:
        return self.profile.num_experts

    def load(self) -> torch.Tensor:
        """``[L, E]`` float64 measured loads (routed token-slots)."""
        return self.profile.load_matrix().double()


def _num_hidden_layers(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RQError(f"{where}: num_hidden_layers is {value!r}, expected a positive integer")
    return value


def read_source(path) -> ExportSource:
    """A profile.json (``rq calibrate``) or a rewritten model dir (its ``rq_profile.json``, and the
    MoE layers of ``config.json``'s ``rq.routing_map``, which must agree with the profile)."""
    path = Path(path)
    if not path.exists():
        raise RQError(f"{str(path)!r} not found (give a profile.json from rq calibrate or a directory from rq rewrite)")
    if path.is_file():
        profile = Profile.load(path)
        return ExportSource(path, profile, _num_hidden_layers(profile.model.get("num_hidden_layers"), str(path)))
    from ..runtime.model_dir import read_rq_model

    md = read_rq_model(path)
    config, rmap = md.config, md.routing_map
    profile = Profile.load(path / defaults.PROFILE_FILE)
    map_layers = [lm.layer for lm in rmap.layers]
    prof_layers = [lp.layer for lp in profile.layers]
    if map_layers != prof_layers or rmap.num_experts != profile.num_experts:
        raise RQError(f"{path}: routing map has MoE layers {map_layers} x {rmap.num_experts} experts but "
                      f"{defaults.PROFILE_FILE} has {prof_layers} x {profile.num_experts}")
    n = _num_hidden_layers(config.get("num_hidden_layers"), f"{path}/config.json")
    return ExportSource(path, profile, n, rmap)


def layer_scheme_bytes(source: ExportSource, model, schemes):
    """Stored bytes of one MoE layer's experts in each scheme, from the source checkpoint's headers,
    and the checkpoint's module names (for the engines' ``quantization_config``).

    ``model``: the checkpoint the profile was measured on (None: the profile's ``model.path``).
    Returns ``(layer_bytes [S] int64, scheme names [S] with the source scheme first,
    precision.ServingNames)``; the profile must belong to that checkpoint.
    """
    from ..arch import get_family
    from ..rewrite.layout import read_layout
    from ..source import SourceCheckpoint, load_config, read_config_dict, resolve_model_path

    spec = model if model is not None else source.profile.model.get("path")
    if spec is None or not Path(str(spec)).expanduser().is_dir():
        raise RQError(f"per-layer precision needs the expert sizes of the original checkpoint, and {spec!r} (the "
                      "profile's model path) is not a local directory", hint="pass --model SOURCE_DIR")
    src = resolve_model_path(spec)
    if "rq" in read_config_dict(src):
        raise RQError(f"{src} is an rq-rewritten model; --model must be the original checkpoint")
    config = load_config(src)
    source.profile.check_matches(config, where=str(source.path))
    ckpt, family = SourceCheckpoint(src), get_family(config)
    layout = read_layout(ckpt, family)
    if list(layout.layers) != list(source.layers):
        raise RQError(f"{src} has MoE layers {list(layout.layers)}, the profile {list(source.layers)}")
    names = [layout.keep_scheme, *[s for s in schemes if s != layout.keep_scheme]]
    nbytes = torch.tensor([layout.num_experts * layout.expert_bytes(s) for s in names], dtype=torch.int64)
    return nbytes, names, serving_names(ckpt, family)


_PER_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(?P<proj>[A-Za-z0-9_]+)\.weight$")


def serving_names(ckpt, family):
    """``precision.ServingNames`` of a checkpoint, from its keys: the family says which keys are
    routed experts; per-expert ``…experts.<e>.<proj>.weight`` keys give the containers and the
    projection names, every other 2-D ``….weight`` an ``other_linear`` module. Raises RQError for
    experts stored fused (``experts.gate_up_proj [E, …]``): compressed-tensors quantizes Linear
    modules, one per expert projection."""
    from .precision import ServingNames

    experts, projections, other = {}, set(), set()
    for key, info in ckpt.tensors.items():
        ek = family.parse_expert_key(key)
        if ek is None:
            if key.endswith(".weight") and len(info.shape) == 2:
                other.add(key[: -len(".weight")])
            continue
        m = _PER_EXPERT_WEIGHT.search(key)
        if ek.expert is None or m is None:
            if ek.expert is None:
                raise RQError(f"{ckpt.path}: experts are stored fused ({key}); a compressed-tensors config targets "
                              "one Linear per expert projection, so --per-layer-precision cannot describe them")
            continue  # a bias
        container = key[: m.start()] + ".experts"
        if experts.setdefault(ek.layer, container) != container:
            raise RQError(f"{ckpt.path}: MoE layer {ek.layer} has experts under {experts[ek.layer]} and {container}")
        projections.add(m["proj"])
    return ServingNames(dict(sorted(experts.items())), tuple(sorted(projections)), tuple(sorted(other)))


def _engine_file(d: dict) -> bool:
    """Whether a JSON object is one of the engine files rq export writes (they carry no rq marker:
    the engines read them as they are)."""
    keys = set(d)
    return (keys in ({"physical_to_logical_map"}, {"logical_count"},
                     {"num_redundant_experts", "window_size", "step_interval"})
            or (d.get("quant_method") == "compressed-tensors" and "config_groups" in d and "model_type" not in d))


EXPORT_KIND = json_file_kind("export", [defaults.EXPORT_FORMAT[0]], shapes=_engine_file)


def write_json_atomic(path, obj, inputs=(), force: bool = False) -> Path:
    """Write ``obj`` as JSON under the output policy (``rq_tool.outputs``): never over an input or a
    file rq did not write, an existing export only with ``force``; temporary + rename."""
    return write_text(path, json.dumps(obj) + "\n", EXPORT_KIND, inputs, force)

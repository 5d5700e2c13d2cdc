"""The expert layout of a source checkpoint, read from safetensors headers (no tensor data)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..arch import MoEFamily
from ..checkpoint import DTYPES, FLOAT_DTYPES
from ..errors import RQError
from ..quant import get_scheme, scheme_for_dtype
from ..source import SourceCheckpoint


@dataclass(frozen=True)
class ExpertLayout:
    """Routed-expert geometry shared by every MoE layer of a checkpoint."""

    layers: tuple[int, ...]  # absolute decoder-layer indices of MoE layers
    num_experts: int
    hidden_size: int
    intermediate_size: int
    source_scheme: str  # fp32 | bf16 | fp16: the slot scheme that keeps an expert as read (dequantized)
    has_bias: bool
    block_prefix: dict[int, str]  # layer -> on-disk block prefix, e.g. "model.layers.3.mlp"
    stored_bytes: dict[int, int] | None = None  # layer -> bytes of its routed experts as stored on disk
    source_quant: str = "none"  # none | fp8 | mxfp4: how the source stores its tensors
    fp8_kept: bool = False  # a block-FP8 source whose experts rq keeps byte for byte as fp8 slots (``fp8_keepable``)

    @property
    def keep_scheme(self) -> str:
        """The slot scheme that keeps an expert exactly as the source has it (zero error): ``fp8``
        for a kept FP8 source, else ``source_scheme`` (for an MXFP4 source: dequantized)."""
        return "fp8" if self.fp8_kept else self.source_scheme

    def layer_source_bytes(self, layer: int) -> int:
        """The original expert memory of a layer (the budget's 1.0x): the bytes as stored, which for a
        quantized source (FP8 / MXFP4 weights + scales) is less than its experts kept as ``source_scheme``.
        A kept FP8 source counts at least its experts as fp8 slots (fp32 scales: a source storing bf16
        or E8M0 scales is 0.01-0.02% smaller), so the original layout always fits 1.0x."""
        if self.stored_bytes is None:
            return self.num_experts * self.expert_bytes(self.source_scheme)
        if self.fp8_kept:
            return max(self.stored_bytes[layer], self.num_experts * self.expert_bytes("fp8"))
        return self.stored_bytes[layer]

    def expert_bytes(self, scheme: str) -> int:
        """Stored bytes of one expert (both matrices, + biases kept in the source dtype)."""
        s = get_scheme(scheme)
        H, I = self.hidden_size, self.intermediate_size
        bias = get_scheme(self.source_scheme).nbytes(1, 2 * I + H) if self.has_bias else 0
        return s.nbytes(2 * I, H) + s.nbytes(H, I) + bias


def read_layout(ckpt: SourceCheckpoint, family: MoEFamily) -> ExpertLayout:
    per_layer: dict[int, dict] = defaultdict(lambda: {"experts": set(), "roles": set(), "fused_E": None})
    prefixes: dict[int, str] = {}
    dims: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    stored_bytes: dict[int, int] = defaultdict(int)
    for key, info in ckpt.tensors.items():
        ek = family.parse_expert_key(key)
        if ek is None:
            continue
        if ek.quantized_part:  # a side tensor no declared source quantization paired with its weight
            raise RQError(f"{ckpt.path}: {key} is a quantized expert tensor ({ek.tensor}) but config.json declares "
                          "no quantization_config rq reads (fp8, mxfp4); rq reads F32/BF16/F16 expert weights")
        stored_bytes[ek.layer] += info.stored_bytes
        rec = per_layer[ek.layer]
        prefixes[ek.layer] = ek.block_prefix
        rec["roles"].add(ek.role)
        dtypes.add(info.dtype)
        if ek.expert is None:  # canonical shape from the family (transposed, interleaved, flattened layouts)
            canon = next(iter(family.canonical_from_fused(ek.role, torch.empty(info.shape, device="meta")).values()))
            rec["fused_E"] = canon.shape[0]
            dims.setdefault(f"fused_{ek.role}", tuple(canon.shape[1:]))
        else:
            rec["experts"].add(ek.expert)
            dims.setdefault(ek.role, tuple(family.canonical_expert_tensor(ek.role, _meta(info.shape)[0]).shape))
    if not per_layer:
        raise RQError(f"{ckpt.path}: no routed-expert tensors found for family {family.name!r}")
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        raise RQError(f"{ckpt.path}: expert tensors have dtypes {sorted(dtypes)}; rq reads one of F32/BF16/F16")
    counts = {layer: (r["fused_E"] if r["fused_E"] is not None else len(r["experts"])) for layer, r in per_layer.items()}
    E = max(counts.values())
    for layer, r in per_layer.items():
        if counts[layer] != E or (r["fused_E"] is None and r["experts"] != set(range(E))):
            raise RQError(f"{ckpt.path}: layer {layer} has {counts[layer]} experts on disk, other layers {E} "
                          "(a shard may be missing)")
    if "fused_gate_up" in dims:
        two_i, H = dims["fused_gate_up"]
    elif "fused_gate" in dims:
        I_, H = dims["fused_gate"]
        two_i = 2 * I_
    elif "gate_up" in dims:
        two_i, H = dims["gate_up"]
    elif "gate" in dims:
        I_, H = dims["gate"]
        two_i = 2 * I_
    else:
        raise RQError(f"{ckpt.path}: cannot find gate/up expert tensors")
    has_bias = any(r.startswith(("gate_up_bias", "down_bias", "gate_bias", "up_bias")) for p in per_layer.values()
                   for r in p["roles"])
    return ExpertLayout(tuple(sorted(per_layer)), E, int(H), int(two_i) // 2,
                        scheme_for_dtype(DTYPES[next(iter(dtypes))][0]), has_bias, prefixes, dict(stored_bytes),
                        ckpt.quant.name, fp8_keepable(ckpt, family, int(two_i) // 2) is None)


def fp8_keepable(ckpt: SourceCheckpoint, family: MoEFamily, inter: int) -> str | None:
    """None when the source's routed experts can be kept byte for byte as rq ``fp8`` slots, else why not.

    That needs block FP8 with rq's 128 x 128 blocks, every expert weight in float8, per-expert
    tensors in nn.Linear layout (no fused or transposed storage), and I a multiple of 128 so a
    slot's gate and up halves stack into whole blocks.
    """
    from ..quant.schemes import FP8_BLOCK

    if ckpt.quant.method != "fp8":
        return f"the source is not block-FP8 ({ckpt.quant.name})"
    if ckpt.quant.block != FP8_BLOCK:
        return f"weight_block_size {list(ckpt.quant.block) if ckpt.quant.block else 'per-tensor'}, not {list(FP8_BLOCK)}"
    if inter % FP8_BLOCK[0]:
        return f"moe intermediate size {inter} is not a multiple of {FP8_BLOCK[0]}"
    probe = torch.empty(2, 3, device="meta")
    for key, info in ckpt.tensors.items():
        ek = family.parse_expert_key(key)
        if ek is None or ek.role.endswith("_bias"):
            continue
        if ek.expert is None or family.canonical_expert_tensor(ek.role, probe) is not probe:
            return "experts are stored fused or transposed"
        if info.stored.method != "fp8":
            return f"{key} is not stored in float8"
    return None


def _meta(shape):
    return torch.empty((1, *shape), device="meta")


# ---------------------------------------------------------------------- the layout a profile records
# ``rq calibrate`` records the checkpoint's layout in the profile (``model.layout``), keyed by what it
# is a function of: the config.json identity, the safetensors headers, and the rq / transformers
# versions (transformers' conversion mapping names the expert keys). ``rq rewrite --dry-run`` plans
# from a matching record without building the family's model (the imports of transformers' modeling
# code are most of a dry-run's time); a stale or missing record means the full path. Writing a model
# always reads the layout from the family and the headers.
_RECORD_VERSION = 2  # 2: + fp8_kept


def layout_key(ckpt: SourceCheckpoint, config_dict: dict) -> dict:
    """What a recorded layout is valid for: config.json identity, stored headers, versions."""
    from importlib.metadata import version

    from .. import __version__
    from ..calibrate.profile import config_fingerprint
    from ..runtime.integrity import header_fingerprint

    return {"version": _RECORD_VERSION, "rq_version": __version__, "transformers_version": version("transformers"),
            "config_json_sha256": config_fingerprint(config_dict),
            "headers_sha256": header_fingerprint(ckpt.stored)}


def layout_record(layout: ExpertLayout, activation: str, key: dict) -> dict:
    """The JSON record of ``layout`` (+ the experts' activation) under ``key`` (``layout_key``)."""
    return {**key, "layers": list(layout.layers), "num_experts": layout.num_experts,
            "hidden_size": layout.hidden_size, "intermediate_size": layout.intermediate_size,
            "source_scheme": layout.source_scheme, "has_bias": layout.has_bias,
            "block_prefix": {str(k): v for k, v in layout.block_prefix.items()},
            "stored_bytes": None if layout.stored_bytes is None else {str(k): v for k, v in layout.stored_bytes.items()},
            "source_quant": layout.source_quant, "fp8_kept": layout.fp8_kept, "activation": activation}


def recorded_layout(record, key: dict, where: str) -> tuple[ExpertLayout, str] | None:
    """``(layout, activation)`` from a profile's record when it was made under ``key``; None when
    it is absent or stale; RQError when it is malformed."""
    from .. import validate as v

    if record is None:
        return None
    at = "model.layout"
    rec = v.check_dict(record, where, at)
    if any(rec.get(k) != want for k, want in key.items()):
        return None
    layers = v.int_list(v.get(rec, "layers", where, at), where, f"{at}.layers", 0, v.MAX_LAYERS)
    E = v.check_int(v.get(rec, "num_experts", where, at), where, f"{at}.num_experts", 1, v.MAX_EXPERTS)
    H, I = (v.check_int(v.get(rec, k, where, at), where, f"{at}.{k}", 1) for k in ("hidden_size", "intermediate_size"))
    scheme, quant, act = (v.check_str(v.get(rec, k, where, at), where, f"{at}.{k}", 256)
                          for k in ("source_scheme", "source_quant", "activation"))
    get_scheme(scheme)  # a known scheme name
    has_bias, fp8_kept = v.get(rec, "has_bias", where, at), v.get(rec, "fp8_kept", where, at)
    for name, flag in (("has_bias", has_bias), ("fp8_kept", fp8_kept)):
        if not isinstance(flag, bool):
            raise RQError(f"{where}: {at}.{name} must be true or false")

    def per_layer(name, check):
        d = v.check_dict(v.get(rec, name, where, at), where, f"{at}.{name}")
        if sorted(d) != sorted(str(i) for i in layers):
            raise RQError(f"{where}: {at}.{name} must have one entry per layer of {at}.layers")
        return {int(k): check(x, where, f"{at}.{name}[{k}]") for k, x in d.items()}

    prefix = per_layer("block_prefix", v.check_str)
    stored = None if rec.get("stored_bytes") is None else per_layer("stored_bytes", v.check_int)
    if not layers:
        raise RQError(f"{where}: {at}.layers is empty")
    return ExpertLayout(tuple(sorted(layers)), E, H, I, scheme, has_bias, prefix, stored, quant, fp8_kept), act


def source_layout_record(path, family: MoEFamily, activation: str) -> dict | None:
    """The record ``rq calibrate`` stores for the model directory ``path`` (None: a layout
    ``rq rewrite`` cannot read; it then says why)."""
    from ..source import read_config_dict

    ckpt = SourceCheckpoint(path)
    try:
        layout = read_layout(ckpt, family)
    except RQError:
        return None
    return layout_record(layout, activation, layout_key(ckpt, read_config_dict(path)))

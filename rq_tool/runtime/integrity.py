"""Load-time integrity of a rewritten model directory: what is stored is what the routing map planned.

Called from one place in the loader (``rq_tool.runtime.hf.load``, so the remote-code entry too)
and from ``rq verify``, so "verify OK" means "load gives the planned model". Headers only, no
tensor data. Checks, each reported as one line:

- every shard lies inside the model directory (no absolute / ``..`` / symlinked-out paths);
- every MoE layer's slot tensors: present, nothing extra, shape and **dtype** as the routing map's
  slot schemes need (int8 ``I8``, nf4 ``U8``, scales / absmax ``F32``, float slots their dtype;
  a relabelled ``I8`` <-> ``U8`` or ``BF16`` -> ``F16`` header is caught);
- the routing map's activation is the one the base config implies;
- the stored tensor headers match the fingerprint rq recorded when it wrote the directory
  (``rq.tensors_sha256``, when present: catches a relabelled dtype of any tensor).
"""

from __future__ import annotations

import hashlib

from ..checkpoint import TORCH_TO_ST, SafetensorsCheckpoint
from ..errors import RQError
from ..validate import check_int, get
from .experts import slot_tensor_dtype, slot_tensor_shapes
from .routing_map import RoutingMap

def header_fingerprint(tensors: dict) -> str:
    """sha256 over every tensor's ``key, dtype, shape`` (sorted by key) of a ``{key: TensorInfo}``
    header map: what rq records at write time (and a profile's recorded layout, of the source)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        info = tensors[key]
        h.update(f"{key}\t{info.dtype}\t{list(info.shape)}\n".encode())
    return h.hexdigest()


def problems(path, model_dir, ckpt: SafetensorsCheckpoint | None = None) -> list[str]:
    """Every integrity problem of a rewritten directory (empty: it loads as planned).

    ``model_dir``: its ``RQModelDir`` (``rq_tool.runtime.model_dir.read_rq_model``).
    """
    from .model_dir import base_config

    try:
        ckpt = ckpt or SafetensorsCheckpoint(path)
    except RQError as e:
        return [str(e)]
    rmap, config = model_dir.routing_map, model_dir.config
    out = []
    try:
        from ..arch import get_family

        from ..arch.families import text_config

        cfg = base_config(config)
        expected_act = get_family(cfg).activation(cfg)
        # the built config, not the raw dict: families name it differently (DBRX: d_model)
        hidden = check_int(getattr(text_config(cfg), "hidden_size", None), "config.json", "hidden_size", 1)
    except RQError as e:
        return [str(e)]
    if rmap.activation != expected_act:
        out.append(f"routing map activation {rmap.activation!r} differs from the base config's {expected_act!r}")
    out += _slot_problems(ckpt, rmap, hidden)
    recorded = model_dir.rq.get("tensors_sha256")
    if not out and recorded is not None and recorded != header_fingerprint(ckpt.tensors):
        out.append("tensor headers (names, dtypes, shapes) differ from what rq wrote (rq.tensors_sha256)")
    return out


def check(path, model_dir, ckpt: SafetensorsCheckpoint | None = None) -> None:
    """Raise RQError with the first problem (and how many there are)."""
    found = problems(path, model_dir, ckpt)
    if found:
        more = f" (and {len(found) - 1} more; rq verify lists them)" if len(found) > 1 else ""
        raise RQError(f"{path}: {found[0]}{more}")


def _layer_of_experts_key(key: str) -> int | None:
    """The decoder layer of an experts tensor key (its first numeric path segment, with an
    ``experts`` segment after it: ``model.layers.3.mlp.experts.int8_w13``, DBRX's
    ``transformer.blocks.3.ffn.experts.bf16_w13``), else None."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return int(p) if "experts" in parts[i + 1:] else None
    return None


def _slot_problems(ckpt: SafetensorsCheckpoint, rmap: RoutingMap, hidden: int) -> list[str]:
    problems = []
    for lm in rmap.layers:
        keys = {k: v for k, v in ckpt.tensors.items() if _layer_of_experts_key(k) == lm.layer}
        if not keys:
            problems.append(f"layer {lm.layer}: no slot tensors stored")
            continue
        prefix = next(iter(keys)).rsplit(".experts.", 1)[0] + ".experts."
        schemes = dict.fromkeys(lm.slot_scheme)
        inter = _intermediate_size(keys, prefix, schemes, hidden)
        expected = {}  # key -> (shape, safetensors dtype)
        for scheme in schemes:
            n = sum(1 for s in lm.slot_scheme if s == scheme)
            for name, shape in slot_tensor_shapes(scheme, n, hidden, inter).items():
                expected[f"{prefix}{scheme}_{name}"] = (tuple(shape), TORCH_TO_ST[slot_tensor_dtype(scheme, name, None)])
        if f"{prefix}gate_up_bias" in keys:
            bias = TORCH_TO_ST[slot_tensor_dtype(rmap.source_scheme, "bias", None)]  # kept in the source dtype
            expected[f"{prefix}gate_up_bias"] = ((lm.num_slots, 2 * inter), bias)
            expected[f"{prefix}down_bias"] = ((lm.num_slots, hidden), bias)
        for k, (shape, dtype) in expected.items():
            if k not in keys:
                problems.append(f"layer {lm.layer}: {k} missing")
            elif tuple(keys[k].shape) != shape:
                problems.append(f"layer {lm.layer}: {k} has shape {tuple(keys[k].shape)}, routing map needs {shape}")
            elif dtype is not None and keys[k].dtype != dtype:
                problems.append(f"layer {lm.layer}: {k} has dtype {keys[k].dtype}, routing map needs {dtype}")
        for k in sorted(set(keys) - set(expected)):
            problems.append(f"layer {lm.layer}: unexpected tensor {k}")
    return problems


def _intermediate_size(keys: dict, prefix: str, schemes, hidden: int) -> int:
    """The experts' intermediate size, read from the first stored group that shows it (0 if none).

    Float and int8 groups store ``down [n, H, I]``; nf4 stores ``gate_up`` packed as ``[n, I * H]``
    (2I x H 4-bit values, two per byte) -- so a layer whose slot 0 is nf4 is read correctly too.
    """
    for scheme in schemes:
        down = keys.get(f"{prefix}{scheme}_down")
        if down is not None and len(down.shape) == 3:
            return int(down.shape[-1])
        gate_up = keys.get(f"{prefix}{scheme}_gate_up")
        if scheme == "nf4" and gate_up is not None and len(gate_up.shape) == 2 and hidden:
            return int(gate_up.shape[1]) // hidden
    return 0

"""Loading a rewritten model: ``rq_tool.load(path)`` and the transformers remote-code entry.

A rewritten directory's config.json keeps the base ``model_type`` (so ``AutoTokenizer`` and
``AutoConfig`` read it without remote code), adds an ``rq`` section (base model type, routing
map), ``experts_implementation: "rq"`` and an ``auto_map`` pointing at ``modeling_rq.py``, the
entry of the runtime bundled beside it (``bundle.py``: this module and what it imports, torch +
transformers only). So ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` and
``pipeline(..., trust_remote_code=True)`` load it without rq-tool installed, and loading *without*
trusting remote code fails loudly (the base class rejects ``experts_implementation="rq"``) instead
of silently building the base model with missing experts.

The model is the base family's own CausalLM class (generation, pipelines and caches unchanged)
with every MoE block's experts module replaced by ``RQExperts``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

from ..arch import get_family
from ..checkpoint import SafetensorsCheckpoint
from ..errors import RQError
from . import integrity
from .experts import RQExperts
from .model_dir import base_config, read_rq_config, read_rq_model  # noqa: F401 (read_rq_config: API)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None, *,
         ep_size: int | None = None, distributed_config=None, cache_dequantized: bool = False):
    """Load a rewritten model directory as the base family's CausalLM with RQ experts.

    ``ep_size`` / ``distributed_config`` (a transformers ``DistributedConfig``; under torchrun):
    expert parallel on transformers' machinery, each rank holding the slots the routing map's
    placement gives it (``rq_tool.runtime.ep``). ``cache_dequantized``: on the CPU path keep each
    quantized slot's dequantized weights after its first use (faster nf4, but the cached slots then
    cost their float bytes; off by default).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    path = Path(path)
    md = read_rq_model(path)
    d = md.config
    config = base_config(d)
    family = get_family(config)
    rmap = md.routing_map
    ckpt = SafetensorsCheckpoint(path)
    integrity.check(path, md, ckpt)  # dtypes, shapes, activation, shard paths: the model loads as planned
    ep = None
    if ep_size is not None or distributed_config is not None:
        from .ep import ExpertParallel

        ep = ExpertParallel.setup(rmap, ep_size, distributed_config, where=str(path))
    compute_dtype = _DTYPES.get(str(d.get("dtype") or d.get("torch_dtype") or "float32"), torch.float32)
    if dtype not in (None, "auto"):
        compute_dtype = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).replace("torch.", ""))
        if compute_dtype is None:
            raise RQError(f"dtype {dtype!r} is not one rq computes in (known: {', '.join(_DTYPES)})")
    with warnings.catch_warnings(), no_init_weights():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    H = config.hidden_size
    blocks = family.moe_blocks(model)
    if {layer for layer, _ in blocks} != {lm.layer for lm in rmap.layers}:
        raise RQError(f"{path}: routing map layers {[lm.layer for lm in rmap.layers]} do not match the model's MoE "
                      f"layers {[layer for layer, _ in blocks]}")
    for layer, block in blocks:
        canon = family.canonical_experts(block.experts)
        inter = canon["gate_up"].shape[1] // 2
        block.experts = RQExperts(rmap.layer(layer), H, inter, rmap.activation, has_bias="down_bias" in canon,
                                  bias_dtype=compute_dtype, split_policy=rmap.split_policy,
                                  num_devices=rmap.num_devices, slots=None if ep is None else ep.slots(rmap.layer(layer)))
        block.experts.cache_dequantized = cache_dequantized
    _load_weights(model, path, compute_dtype, ckpt.shards, _checkpoint_rows(model), md.rq.get("source_quantization"))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    if device is not None:
        model.to(device)
    if ep is not None:
        ep.distribute(model)
    return model


def _checkpoint_rows(model) -> dict[str, torch.Tensor]:
    """State-dict key -> the rows of the checkpoint tensor it holds, for experts holding a subset of slots."""
    return {f"{name}.{key}": rows for name, m in model.named_modules() if isinstance(m, RQExperts)
            for key, rows in m.checkpoint_rows.items()}


def _read_rows(f, key: str, rows: torch.Tensor) -> torch.Tensor:
    """Only ``rows`` (sorted, int64) of tensor ``key`` from an open safetensors file, by runs of consecutive rows."""
    sl, parts, rows = f.get_slice(key), [], rows.tolist()
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            parts.append(sl[rows[start]:rows[i - 1] + 1])
            start = i
    if not parts:
        shape = sl.get_shape()
        return torch.empty(0, *shape[1:], dtype=f.get_tensor(key).dtype)
    return torch.cat(parts)


def _load_weights(model, path: Path, compute_dtype: torch.dtype, shards: list[Path],
                  rows: dict[str, torch.Tensor] | None = None, source_quantization: dict | None = None) -> None:
    """Load ``shards`` (checked to lie inside ``path`` by ``rq_tool.checkpoint.shard_files``); ``rows``:
    the checkpoint rows of experts that hold a subset of slots (``_checkpoint_rows``).

    A rewrite of an FP8 checkpoint keeps the source's non-expert float8 weights and their
    ``weight_scale_inv`` as stored (``source_quantization``: the source's quantization_config);
    they are dequantized here to the compute dtype (weight and scale may sit in different shards).
    """
    from ..quant.sources import read_source_quant

    quant = read_source_quant({"quantization_config": source_quantization}) if source_quantization else None
    pending: dict[str, dict[str, torch.Tensor]] = {}
    expected = model.state_dict()
    loaded: set[str] = set()
    for shard in shards:
        chunk = {}
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    if rows and key in rows and key not in expected and rows[key].numel() == 0:
                        continue  # a slot group held by other expert-parallel ranks only
                    t = f.get_tensor(key) if not rows or key not in rows else _read_rows(f, key, rows[key])
                    slot8 = key in expected and expected[key].element_size() == 1 and expected[key].is_floating_point()
                    if quant is not None and quant.method == "fp8" and not slot8:  # rq's fp8 slots load as stored
                        key, t = _fp8_pair(key, t, pending, quant, compute_dtype)
                        if t is None:
                            continue
                    ref = expected.get(key)
                    if ref is None:
                        raise RQError(f"{shard.name}: unexpected tensor {key!r} (not part of the model)")
                    if tuple(t.shape) != tuple(ref.shape):
                        raise RQError(f"{shard.name}: {key} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(ref.shape)}")
                    if t.is_floating_point() and t.element_size() > 1 and not key.endswith(_SCALES):
                        t = t.to(compute_dtype)  # float8 slots and every scale stay as stored
                    elif not t.is_floating_point() and t.data_ptr() % 64:
                        t = t.clone()  # safetensors may hand out unaligned int8 data; CPU int8 kernels need it aligned
                    chunk[key] = t
        except RQError:
            raise
        except Exception as e:
            raise RQError(f"{shard}: corrupt or truncated safetensors ({type(e).__name__})") from None
        model.load_state_dict(chunk, strict=False, assign=True)
        loaded.update(chunk)
    if pending:
        raise RQError(f"{path}: float8 weights or scales without their pair: {sorted(pending)[:3]}")
    missing = set(expected) - loaded
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing -= {k for k in missing if k.startswith("lm_head.")}
    if missing:
        raise RQError(f"{path}: tensors missing from the checkpoint: {sorted(missing)[:3]}")


_SCALES = ("_scale", "_absmax", "_scale_inv")  # slot scale tensors (fp32, kept as stored)


def _fp8_pair(key: str, t: torch.Tensor, pending: dict, quant, dtype: torch.dtype):
    """``(key, tensor)`` to load, or ``(key, None)`` while an FP8 weight waits for its scale (or back)."""
    from ..quant.sources import FP8_DTYPE, fp8_dequantize

    is_scale = key.endswith(".weight_scale_inv")
    if not is_scale and t.dtype != FP8_DTYPE:
        return key, t
    base = key[: -len("_scale_inv")] if is_scale else key
    part = pending.setdefault(base, {})
    part["scale_inv" if is_scale else "q"] = t
    if len(part) < 2:
        return key, None
    del pending[base]
    return base, fp8_dequantize(part["q"], part["scale_inv"], quant.block, dtype)


class RQConfig(PretrainedConfig):
    """Remote-code config entry: resolves to the base family's config (with the rq section)."""

    model_type = "rq"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config = base_config(read_rq_config(Path(pretrained_model_name_or_path)))
        if kwargs.pop("return_unused_kwargs", False):
            unused = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
            return config, unused
        return config


_HUB_KWARGS = {"cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder",
               "trust_remote_code", "code_revision", "_from_pipeline", "_from_auto", "_commit_hash", "user_agent",
               "adapter_kwargs", "resume_download"}


class RQForCausalLM(PreTrainedModel):
    """Remote-code model entry: ``from_pretrained`` returns the base CausalLM with RQ experts."""

    config_class = RQConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, torch_dtype=None, device_map=None,
                        distributed_config=None, cache_dequantized=False, **kwargs):
        return load(pretrained_model_name_or_path, dtype=dtype if dtype is not None else torch_dtype,
                    device=single_device(device_map), distributed_config=distributed_config,
                    cache_dequantized=bool(cache_dequantized))


def single_device(device_map) -> torch.device | None:
    """The one device a transformers ``device_map`` names (None: leave the model on CPU).

    Accepts a device string / ``torch.device`` / CUDA index, ``"auto"`` (the first CUDA device if
    any, else CPU) and a dict whose values all name one device (e.g. ``{"": 0}``); a map over
    several devices is an RQError (the rq runtime does not split layers across devices; expert
    parallelism goes through ``distributed_config``).
    """
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {torch.device(f"cuda:{v}" if isinstance(v, int) else v) for v in device_map.values()}
        if len(devices) != 1:
            raise RQError(f"device_map spreads the model over {sorted(map(str, devices))}; an rq-rewritten model "
                          "loads on one device", hint='pass one device, e.g. device_map="cuda:0" or device_map="cpu"')
        return devices.pop()
    if device_map == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else None
    if isinstance(device_map, int):
        return torch.device(f"cuda:{device_map}")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise RQError(f"device_map={device_map!r} is not a device") from None

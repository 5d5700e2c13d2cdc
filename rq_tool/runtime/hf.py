"""Loading a rewritten model: ``rq_tool.load(path)`` and the transformers remote-code entry.

A rewritten directory's config.json has ``model_type: "rq"``, an ``rq`` section (base model
type, routing map) and an ``auto_map`` pointing at ``modeling_rq.py``, which only re-exports the
two classes below. So ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` and
``pipeline(..., trust_remote_code=True)`` load it, and loading *without* trusting remote code
fails loudly instead of silently building the base model with missing experts.

The model is the base family's own CausalLM class (generation, pipelines and caches unchanged)
with every MoE block's experts module replaced by ``RQExperts``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

from .. import __version__, defaults
from ..arch import get_family
from ..errors import RQError, read_json
from .experts import RQExperts
from .routing_map import RoutingMap

REMOTE_CODE = f'''"""rq runtime entry point (written by rq-tool {__version__}); loading needs `pip install rq-tool`."""

from rq_tool.runtime.hf import RQConfig, RQForCausalLM  # noqa: F401
'''

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NOT_BASE_KEYS = ("model_type", "auto_map", "architectures")


def read_rq_config(path: Path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    d = read_json(cfg, f"{path} is not a model directory (no config.json)")
    rq = d.get("rq") if isinstance(d, dict) else None
    if not isinstance(rq, dict):
        raise RQError(f"{path} is not an rq-rewritten model (config.json has no 'rq' section)")
    if (rq.get("format"), rq.get("version")) != defaults.RQ_CONFIG_FORMAT:
        raise RQError(f"{cfg}: rq section {rq.get('format')!r} v{rq.get('version')} is not supported "
                      f"(expected {defaults.RQ_CONFIG_FORMAT[0]} v{defaults.RQ_CONFIG_FORMAT[1]})")
    return d


def base_config(d: dict):
    """The base family's config object (with ``rq`` and ``auto_map`` kept as attributes)."""
    from transformers import CONFIG_MAPPING

    base_type = d["rq"].get("base_model_type")
    get_family(base_type)
    cfg = CONFIG_MAPPING[base_type].from_dict({k: v for k, v in d.items() if k not in _NOT_BASE_KEYS})
    cfg.auto_map = d.get("auto_map")
    return cfg


def load(path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None):
    """Load a rewritten model directory as the base family's CausalLM with RQ experts."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    path = Path(path)
    d = read_rq_config(path)
    config = base_config(d)
    family = get_family(config)
    rmap = RoutingMap.from_dict(d["rq"]["routing_map"], where=f"{path}/config.json routing map")
    compute_dtype = _DTYPES.get(str(d.get("dtype") or d.get("torch_dtype") or "float32"), torch.float32)
    if dtype not in (None, "auto"):
        compute_dtype = dtype if isinstance(dtype, torch.dtype) else _DTYPES[str(dtype).replace("torch.", "")]
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
                                  bias_dtype=compute_dtype)
    _load_weights(model, path, compute_dtype, d["rq"].get("source_quantization"))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _load_weights(model, path: Path, compute_dtype: torch.dtype, source_quantization: dict | None = None) -> None:
    """Every stored tensor into ``model`` (shapes checked, nothing missing or unexpected).

    A rewrite of an FP8 checkpoint keeps the source's non-expert float8 weights and their
    ``weight_scale_inv`` as stored; they are dequantized here to the compute dtype (weight and scale
    may sit in different shards).
    """
    from ..quant.sources import read_source_quant

    quant = read_source_quant({"quantization_config": source_quantization}) if source_quantization else None
    pending: dict[str, dict[str, torch.Tensor]] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [p.name for p in sorted(path.glob("*.safetensors"))]
    expected = model.state_dict()
    loaded: set[str] = set()
    for name in shards:
        shard = path / name
        if not shard.is_file():
            raise RQError(f"shard {name!r} listed in the index is missing from {path}")
        chunk = {}
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if quant is not None and quant.method == "fp8":
                        key, t = _fp8_pair(key, t, pending, quant, compute_dtype)
                        if t is None:
                            continue
                    ref = expected.get(key)
                    if ref is None:
                        raise RQError(f"{shard.name}: unexpected tensor {key!r} (not part of the model)")
                    if tuple(t.shape) != tuple(ref.shape):
                        raise RQError(f"{shard.name}: {key} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(ref.shape)}")
                    if t.is_floating_point() and not key.endswith(("_scale", "_absmax")):
                        t = t.to(compute_dtype)
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
                        **kwargs):
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else None
        return load(pretrained_model_name_or_path, dtype=dtype if dtype is not None else torch_dtype, device=device)

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

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

from .. import defaults
from ..arch import get_family
from ..errors import RQError, read_json
from .experts import RQExperts
from .routing_map import RoutingMap

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "experts_implementation": "rq" in config.json makes the base class refuse the directory (loading it
# without trust_remote_code fails loudly); the rq runtime builds the base model without it
_NOT_BASE_KEYS = ("model_type", "auto_map", "architectures", "experts_implementation")


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


def load(path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         cache_dequantized: bool = False):
    """Load a rewritten model directory as the base family's CausalLM with RQ experts.

    ``cache_dequantized``: on the CPU path keep each quantized slot's dequantized weights after its
    first use (faster nf4, but the cached slots then cost their float bytes; off by default).
    """
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
        block.experts.cache_dequantized = cache_dequantized
    _load_weights(model, path, compute_dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _load_weights(model, path: Path, compute_dtype: torch.dtype) -> None:
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
                    ref = expected.get(key)
                    if ref is None:
                        raise RQError(f"{shard.name}: unexpected tensor {key!r} (not part of the model)")
                    if tuple(t.shape) != tuple(ref.shape):
                        raise RQError(f"{shard.name}: {key} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(ref.shape)}")
                    if t.is_floating_point() and not key.endswith(("_scale", "_absmax")):
                        t = t.to(compute_dtype)
                    elif not t.is_floating_point() and t.data_ptr() % 64:
                        t = t.clone()  # safetensors may hand out unaligned int8 data; CPU int8 kernels need it aligned
                    chunk[key] = t
        except RQError:
            raise
        except Exception as e:
            raise RQError(f"{shard}: corrupt or truncated safetensors ({type(e).__name__})") from None
        model.load_state_dict(chunk, strict=False, assign=True)
        loaded.update(chunk)
    missing = set(expected) - loaded
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing -= {k for k in missing if k.startswith("lm_head.")}
    if missing:
        raise RQError(f"{path}: tensors missing from the checkpoint: {sorted(missing)[:3]}")


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
        return load(pretrained_model_name_or_path, dtype=dtype if dtype is not None else torch_dtype,
                    device=single_device(device_map), cache_dequantized=bool(kwargs.get("cache_dequantized", False)))


def single_device(device_map) -> torch.device | None:
    """The one device a transformers ``device_map`` names (None: leave the model on CPU).

    Accepts a device string / ``torch.device`` / CUDA index, ``"auto"`` (the first CUDA device if
    any, else CPU) and a dict whose values all name one device (e.g. ``{"": 0}``); a map over
    several devices is an RQError (the rq runtime does not split layers across devices).
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

"""Opening source models and tokenizers with one clear error for every bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

from . import defaults
from .arch import MoEFamily, get_family
from .errors import RQError, read_json
from .quant.sources import read_source_quant


def resolve_model_path(spec: str | Path | None) -> Path:
    """``None`` -> the bundled tiny MoE; otherwise a local model directory (no hub access)."""
    if spec is None:
        path = defaults.default_model_path()
        if not (path / "config.json").is_file():
            raise RQError(f"the bundled default model is missing at {path}; reinstall rq-tool")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise RQError(f"model path {str(spec)!r} does not exist (rq reads local model directories only)")
    if not path.is_dir():
        raise RQError(f"model path {str(spec)!r} is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise RQError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise RQError(f"{path} has no *.safetensors weights (rq reads safetensors only, never pickle)")
    from .checkpoint import read_index

    read_index(path)  # an index naming shards outside the directory is refused before anything reads it
    return path


def read_config_dict(path: Path) -> dict:
    from .validate import check_model_config

    d = read_json(path / "config.json", f"{path} is not a model directory (no config.json)")
    if not isinstance(d, dict) or "model_type" not in d:
        raise RQError(f"{path / 'config.json'}: no model_type")
    return check_model_config(d, str(path / "config.json"))


def load_config(path: Path):
    from transformers import AutoConfig

    d = read_config_dict(path)
    if d["model_type"] != "rq":
        get_family(d)  # one clear error for dense / unsupported models, before transformers sees it
        read_source_quant(d)  # ... and for quantized checkpoints rq cannot read
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise RQError(f"{path}: transformers cannot read this config ({type(e).__name__}: {e})") from None


def open_family(path: Path) -> tuple[object, MoEFamily]:
    """``(config, family)`` of a source model directory; dense/unknown models get an RQError."""
    config = load_config(path)
    if getattr(config, "rq", None):
        raise RQError(f"{path} is already an rq-rewritten model; calibrate and rewrite the original model")
    return config, get_family(config)


def load_model(path: Path, dtype="auto", max_memory: str | None = None, offload_folder: str | None = None):
    """A source CausalLM on CPU in eval mode (safetensors only).

    ``max_memory`` (e.g. ``"2GB"``): keep at most that much of the weights in RAM and offload the
    rest to ``offload_folder`` on disk (accelerate's big-model support); layers are loaded for
    their forward and dropped after, so a model larger than memory can be calibrated.
    """
    from transformers import AutoModelForCausalLM

    config, family = open_family(path)
    quant = read_source_quant(read_config_dict(path))
    if quant.method is not None:
        if max_memory is not None:
            raise RQError(f"{path}: --max-memory (disk offload) is not supported for {quant.method} checkpoints yet; "
                          "calibrate with the weights in RAM")
        model = _load_dequantized(path, config, quant)
        if not family.moe_blocks(model):
            raise RQError(f"{path}: model_type {config.model_type!r} has no MoE layers in this configuration")
        return model, family
    kwargs = {}
    if max_memory is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise RQError("--max-memory needs the accelerate package (pip install 'rq-tool[offload]')") from None
        kwargs = {"device_map": "auto", "max_memory": {"cpu": max_memory}, "offload_folder": offload_folder}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                         **kwargs)
    except RQError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RQError(f"{path}: cannot load model weights ({type(e).__name__}: {msg[:200]})") from None
    model.eval()
    if not family.moe_blocks(model):
        raise RQError(f"{path}: model_type {config.model_type!r} has no MoE layers in this configuration")
    return model, family


def _load_dequantized(path: Path, config, quant):
    """A quantized (FP8 / MXFP4) checkpoint as a plain CausalLM: rq dequantizes every weight with its
    scales (``rq_tool.quant.sources``) and hands transformers an unquantized state dict.

    Not transformers' own ``dequantize`` path: on CPU it derives the FP8 block size from the scale grid,
    which is wrong for partial edge blocks (e.g. DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``).
    Tensors stored unquantized stay memory-mapped; dequantized ones take the config's dtype.
    """
    import copy

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from .rewrite.source import SourceCheckpoint

    ckpt = SourceCheckpoint(path, quant)
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with ckpt.reader() as rd:
        state = {key: rd.logical(key) for key in ckpt.tensors}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the family's class, not the Auto one (which needs a path); transformers still applies its
            # conversion mapping (per-expert on-disk keys -> fused experts) to the state dict
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model = cls.from_pretrained(None, config=config, state_dict=state, dtype=quant.out_dtype)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RQError(f"{path}: cannot load the dequantized {quant.method} weights ({type(e).__name__}: {msg[:200]})"
                      ) from None
    del state
    return model.eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise RQError(f"{path}: no usable tokenizer ({type(e).__name__}); calibration needs the model's tokenizer") from None

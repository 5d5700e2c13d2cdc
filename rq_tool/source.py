"""The source model: opening its directory, config, family, weights and tokenizer (calibration,
evaluation) and reading its checkpoint's tensors (rewrite), with one clear error for every bad input.

The header reader lives in ``rq_tool.checkpoint`` (shared with the runtime's integrity check).
A source checkpoint has *stored* tensors (what the safetensors headers list) and *logical* ones
(what the same model's unquantized checkpoint would hold): equal for fp32/bf16/fp16 checkpoints;
for FP8 and MXFP4 releases a logical tensor is read from a weight and its scales
(``rq_tool.quant.sources``), possibly in different shards, and dequantized on read.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import defaults
from .arch import MoEFamily, get_family
from .checkpoint import INDEX_FILE, FileSpan, SafetensorsCheckpoint, TensorInfo
from .errors import RQError, read_json
from .quant.sources import SourceQuant, StoredTensor, read_source_quant

@dataclass(frozen=True)
class LogicalTensor(TensorInfo):
    """A logical tensor: ``shard`` of its primary stored part, ``shape`` / ``dtype`` as handed out
    (dequantized), ``stored`` the parts it is read from, ``stored_bytes`` their bytes on disk."""

    stored: StoredTensor | None = None
    stored_bytes: int = 0


class SourceCheckpoint(SafetensorsCheckpoint):
    """A source model directory's tensors, headers checked, in shard order.

    ``stored``: stored key -> TensorInfo (the safetensors headers). ``tensors``: logical key ->
    LogicalTensor (``.stored`` names the parts). ``quant``: the checkpoint's source quantization
    (from its config.json by default).
    """

    def __init__(self, path: Path, quant: SourceQuant | None = None):
        super().__init__(path)
        if quant is None:
            cfg = self.path / "config.json"
            quant = read_source_quant(read_config_dict(self.path)) if cfg.is_file() else SourceQuant(None)
        self.quant = quant
        self.stored: dict[str, TensorInfo] = self.tensors
        logical = quant.logical({k: (i.shape, i.dtype) for k, i in self.stored.items()})
        self.tensors = {  # type: ignore[assignment]
            key: LogicalTensor(self.stored[st.primary].shard, st.shape, st.dtype, st,
                               sum(self.stored[k].nbytes for k in st.parts.values()))
            for key, st in logical.items()}
        self._part_of = {k: key for key, st in logical.items() for k in st.parts.values()}

    def logical_key(self, stored_key: str) -> str | None:
        """The logical tensor a stored tensor belongs to (None: not part of one, e.g. activation scales)."""
        return self._part_of.get(stored_key)

    def keys_by_shard(self) -> dict[Path, list[str]]:
        """Stored keys of every shard, in file order of the index / headers."""
        out: dict[Path, list[str]] = {s: [] for s in self.shards}
        for key, info in self.stored.items():
            out[info.shard].append(key)
        return out

    def reader(self) -> "CheckpointReader":
        return CheckpointReader(self)


class CheckpointReader:
    """Open shards (memory-mapped, opened once each) of a checkpoint; a context manager.

    ``stored(key)`` is the stored tensor as is (zero-copy over the mapped file); ``logical(key)``
    the logical tensor, dequantized from its parts when the checkpoint is quantized.
    """

    def __init__(self, ckpt: SourceCheckpoint):
        self.ckpt = ckpt
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._open.clear()

    def _file(self, shard: Path):
        f = self._open.get(shard)
        if f is None:
            try:
                f = self._stack.enter_context(safe_open(str(shard), framework="pt"))
            except Exception as e:  # safetensors errors on a damaged shard
                raise RQError(f"{shard}: cannot read tensors ({type(e).__name__}: {e})") from None
            self._open[shard] = f
        return f

    def stored(self, key: str) -> torch.Tensor:
        shard = self.ckpt.stored[key].shard
        try:
            return self._file(shard).get_tensor(key)
        except RQError:
            raise
        except Exception as e:  # safetensors errors on a damaged shard
            raise RQError(f"{shard}: cannot read tensors ({type(e).__name__}: {e})") from None

    def span(self, key: str) -> FileSpan:
        """The stored tensor as a ``FileSpan`` (its bytes' place in its shard, and the mapped tensor)."""
        info = self.ckpt.stored[key]
        return FileSpan(info.shard, self.ckpt.offsets[key], info.nbytes, self.stored(key))

    def logical(self, key: str) -> torch.Tensor:
        st = self.ckpt.tensors[key].stored
        parts = {role: self.stored(k) for role, k in st.parts.items()}
        return self.ckpt.quant.dequantize(st, parts)


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

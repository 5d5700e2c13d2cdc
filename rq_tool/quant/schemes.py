"""Storage schemes for one expert matrix, by name, with exact byte accounting.

A scheme turns a weight matrix ``W [out, in]`` (nn.Linear layout) into a dict of stored tensors
and back. Byte counts are the real bytes of those stored tensors (packed data + scales), so the
planner's budget is checked against what lands on disk and in memory.

Stored layouts (version 1 of the rq slot format; the runtime and kernels read exactly these):
- float schemes ``fp32`` / ``bf16`` / ``fp16``: ``{"w": W.to(dtype)}``.
- ``int8`` (LLM.int8-style row-wise absmax, bitsandbytes' ``int8_vectorwise_quant``): ``{"q": int8 [out, in],
  "scale": fp32 [out]}`` with ``W ~= q * scale[:, None]`` (scale = row absmax / 127).
- ``nf4`` (bitsandbytes NormalFloat4, blocksize 64, no double quantization): ``{"q": uint8
  [out * in / 2], "absmax": fp32 [out * in / 64]}``, bitsandbytes' packed order (row-major,
  high nibble first).
- ``fp8`` (block FP8, the format DeepSeek-V3 / Qwen3-FP8 / GLM-4.5-FP8 ship): ``{"q": float8_e4m3fn
  [out, in], "scale_inv": fp32 [ceil(out/128), ceil(in/128)]}`` with ``W = q * scale_inv`` of its
  128 x 128 block (partial edge blocks). An FP8 source's experts are kept in it byte for byte.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import defaults
from ..errors import RQError

NF4_BLOCKSIZE = 64
FP8_BLOCK = (128, 128)  # the fp8 slot scheme's weight block (rows, columns)


@functools.lru_cache(maxsize=1)
def _bnb_functional():
    # bitsandbytes prints an import-time notice about optional hub kernels; it is harmless.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnbf
    except ImportError:
        raise RQError("quantizing needs bitsandbytes", hint="pip install bitsandbytes") from None
    return bnbf


@functools.lru_cache(maxsize=1)
def _bnb_dequantize_4bit():
    """bitsandbytes' native NF4 dequantization op if bitsandbytes is installed, else None (the
    rewritten model's runtime needs only torch; bitsandbytes is an optional speed-up, ~5x here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
        return torch.ops.bitsandbytes.dequantize_4bit.default
    except (ImportError, AttributeError, RuntimeError):
        return None


def chunk_units(device: torch.device, unit_values: int, units: int) -> int:
    """How many units (rows, blocks) of ``unit_values`` values one chunk of a CPU quantize /
    dequantize takes (about ``defaults.CHUNK_VALUES`` values, at least one unit); on an accelerator
    all of them (one launch per op beats cache-sized chunks there)."""
    if torch.device(device).type != "cpu":
        return max(1, units)
    return max(1, defaults.CHUNK_VALUES // max(1, unit_values))


@dataclass(frozen=True)
class Scheme:
    """One storage scheme. ``bits`` is nominal (for tables); ``nbytes`` is exact."""

    name: str
    bits: int
    is_float: bool
    nbytes: Callable[[int, int], int]  # (out, in) -> stored bytes
    quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    dequantize: Callable[[dict[str, torch.Tensor], tuple[int, int], torch.dtype], torch.Tensor]

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize ``w [out, in]``; returns fp32 ``[out, in]``."""
        return self.dequantize(self.quantize(w), tuple(w.shape), torch.float32)


def _float_scheme(name: str, dtype: torch.dtype) -> Scheme:
    size = torch.empty((), dtype=dtype).element_size()
    return Scheme(
        name=name,
        bits=8 * size,
        is_float=True,
        nbytes=lambda o, i: o * i * size,
        quantize=lambda w: {"w": w.detach().to(dtype).contiguous()},
        dequantize=lambda st, shape, out_dtype: st["w"].to(out_dtype),
    )


def _int8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes' ``int8_vectorwise_quant`` (no outlier threshold), bit for bit.

    On CPU bitsandbytes runs its default kernel, plain torch ops; they are repeated here so a rewrite
    never imports bitsandbytes for int8 (seconds of import on a loaded VM, paid inside the streaming
    pass's first quantize). Row absmax by ``amax`` (the same value as the kernel's ``max(...).values``,
    without its argmax); whole rows at a time, about ``defaults.CHUNK_VALUES`` values, each chunk's
    fp32 copy scaled and rounded in place (8x faster than whole-matrix temporaries on a 4096 x 7168
    expert). Other devices call bitsandbytes' own kernel.
    """
    w = w.detach()
    if w.device.type != "cpu":
        q, absmax, _ = _bnb_functional().int8_vectorwise_quant(w.float().contiguous())
        return {"q": q.contiguous(), "scale": (absmax.float() / 127.0).contiguous()}
    O, C = w.shape
    q, absmax = torch.empty((O, C), dtype=torch.int8), torch.empty(O, dtype=torch.float32)
    step = chunk_units(w.device, C, O)
    for r0 in range(0, O, step):
        a = w[r0:r0 + step].to(torch.float32, copy=True)
        m = torch.amax(a.abs(), dim=1, out=absmax[r0:r0 + step])
        q[r0:r0 + step] = a.mul_(127.0 / m.unsqueeze(-1)).round_()
    return {"q": q, "scale": absmax / 127.0}


def _int8_dequantize(st, shape, dtype):
    # q [..., out, in] and scale [..., out]: one matrix or a stack of them
    return (st["q"].float() * st["scale"][..., None]).to(dtype)


def _nf4_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes' NF4 quantization (its ``quantize_4bit`` default kernel), bit for bit, in torch.

    Same absmax per 64-block, same clamp, same nearest level (the count of level midpoints below the
    value, which is what its ``torch.bucketize`` computes); 15 comparisons instead of bucketize,
    which is ~3x slower on CPU, and nf4 quantization dominates the CPU cost of a greedy rewrite.
    """
    if w.numel() % NF4_BLOCKSIZE:
        raise RQError(f"nf4 needs a weight size divisible by {NF4_BLOCKSIZE}, got shape {tuple(w.shape)}")
    blocks = w.detach().reshape(-1, NF4_BLOCKSIZE).float()
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    q = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for bound in _nf4_midpoints(str(w.device)):
        q += scaled > bound
    return {"q": ((q[::2] << 4) | q[1::2]).contiguous(), "absmax": absmax.contiguous()}


@functools.lru_cache(maxsize=8)
def _nf4_midpoints(device: str = "cpu") -> tuple[float, ...]:
    code = nf4_code(device)
    return tuple(((code[:-1] + code[1:]) / 2).tolist())


# The 16 NF4 levels (QLoRA's NormalFloat4: quantiles of N(0, 1), create_normal_map(offset=0.9677083)),
# exactly bitsandbytes' table (tested equal); a constant, so reading nf4 never imports bitsandbytes.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@functools.lru_cache(maxsize=8)
def nf4_code(device: str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels ``[16]`` fp32 (``NF4_CODE``) on ``device``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=8)
def _nf4_pair_table(device: str) -> torch.Tensor:
    """``[256, 2]`` fp32: the (high nibble, low nibble) levels of every packed byte."""
    code = nf4_code(device)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], 1).contiguous()


def nf4_dequantize_torch(q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Pure-torch NF4 dequantization: ``q [n/2] uint8``, ``absmax [n/64]`` -> fp32 ``shape`` (n elements).

    Same numbers as bitsandbytes' ``dequantize_4bit`` (high nibble is the even element). ``q`` and
    ``absmax`` may have leading dimensions (a stack of matrices, each a whole number of blocks).
    """
    vals = _nf4_pair_table(str(q.device)).index_select(0, q.reshape(-1).int()).view(-1, NF4_BLOCKSIZE)
    return vals.mul_(absmax.float().reshape(-1, 1)).reshape(shape)


def nf4_dequantize(q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """NF4 dequantization to ``dtype`` (the nf4 scheme's ``dequantize``): bitsandbytes' native
    CPU/GPU op when installed (same numbers, several times faster), else :func:`nf4_dequantize_torch`."""
    op = _bnb_dequantize_4bit()
    if op is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
        # asked for rows of exactly one block: bitsandbytes' CPU op mis-reads blocks that span
        # rows of its output shape (e.g. [64, 32] matrices), whatever shape the caller wants
        n = q.numel() * 2
        out = op(q.reshape(-1, 1), absmax.float().reshape(-1), NF4_BLOCKSIZE, "nf4",
                 [n // NF4_BLOCKSIZE, NF4_BLOCKSIZE], dtype)
        return out.view(shape)
    return nf4_dequantize_torch(q, absmax, shape).to(dtype)


def _nf4_dequantize(st, shape, dtype):
    return nf4_dequantize(st["q"], st["absmax"], shape, dtype)


def _fp8_nbytes(o: int, i: int) -> int:
    return o * i + 4 * (-(-o // FP8_BLOCK[0])) * (-(-i // FP8_BLOCK[1]))


def _fp8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    from .sources import fp8_quantize

    q, scale_inv = fp8_quantize(w.detach(), FP8_BLOCK)
    return {"q": q, "scale_inv": scale_inv.float()}


def _fp8_dequantize(st, shape, dtype):
    # q [..., out, in] and scale_inv [..., ceil(out/128), ceil(in/128)]: one matrix or a stack
    from .sources import FP8_DTYPE, fp8_dequantize

    q = st["q"]
    if q.dtype != FP8_DTYPE:  # cast by a module.to(dtype): every e4m3 value is exact in bf16 / fp16 / fp32
        q = q.float().to(FP8_DTYPE)
    return fp8_dequantize(q, st["scale_inv"], FP8_BLOCK, dtype).reshape(shape)


SCHEMES: dict[str, Scheme] = {
    "fp32": _float_scheme("fp32", torch.float32),
    "bf16": _float_scheme("bf16", torch.bfloat16),
    "fp16": _float_scheme("fp16", torch.float16),
    "int8": Scheme("int8", 8, False, lambda o, i: o * i + 4 * o, _int8_quantize, _int8_dequantize),
    "nf4": Scheme(
        "nf4", 4, False, lambda o, i: (o * i) // 2 + 4 * ((o * i) // NF4_BLOCKSIZE), _nf4_quantize, _nf4_dequantize
    ),
    "fp8": Scheme("fp8", 8, False, _fp8_nbytes, _fp8_quantize, _fp8_dequantize),
}

# Schemes rq offers for quantizing experts (the planner's cheaper options), most precise first.
QUANT_SCHEMES: tuple[str, ...] = defaults.QUANT_SCHEMES
assert tuple(SCHEMES) == defaults.SCHEME_NAMES and set(QUANT_SCHEMES) <= set(SCHEMES), "update defaults.SCHEME_NAMES"

_DTYPE_TO_SCHEME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise RQError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}") from None


def scheme_for_dtype(dtype: torch.dtype) -> str:
    """Name of the float scheme that stores ``dtype`` unchanged."""
    try:
        return _DTYPE_TO_SCHEME[dtype]
    except KeyError:
        raise RQError(f"unsupported expert weight dtype {dtype}; rq reads fp32/bf16/fp16 checkpoints") from None

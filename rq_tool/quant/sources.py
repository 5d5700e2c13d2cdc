"""Quantized *source* checkpoints: which ones rq reads, how their stored tensors pair up, dequantization.

Legend: O rows (out features), C columns (in features), E experts, J 32-value MXFP4 blocks of a row.

rq reads two pre-quantized storage formats, as transformers 5.x writes and reads them
(``integrations/finegrained_fp8.py``, ``integrations/mxfp4.py``):

- ``fp8`` (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8): ``X.weight`` is ``float8_e4m3fn
  [O, C]`` and ``X.weight_scale_inv`` its per-block scale ``[ceil(O/bm), ceil(C/bn)]`` (fp32 / bf16,
  or E8M0 exponents as uint8 for ``scale_fmt: "ue8m0"``), with ``weight_block_size = [bm, bn]`` in
  ``quantization_config`` (no block size: one scale per tensor). ``W = q * scale_inv`` of its block.
- ``mxfp4`` (gpt-oss): ``X_blocks`` is uint8 ``[..., O, J, 16]`` (two E2M1 values a byte, low nibble
  first, 32 values a block) and ``X_scales`` uint8 ``[..., O, J]`` E8M0 exponents (``2 ** (s - 127)``).
  The dequantized tensor is stored transposed (``[..., J * 32, O]``), as transformers loads it: that is
  the layout of the same model's bf16 checkpoint (gpt-oss keeps ``gate_up_proj`` as ``[E, H, 2I]``).

A stored tensor and its companions form one *logical* tensor (``StoredTensor``): the key and shape
that the same model's unquantized checkpoint has. Everything else in rq works on logical tensors;
untouched ones are copied as stored. Other quantization methods (bitsandbytes, GPTQ, AWQ,
compressed-tensors, ...) are refused with one clear error.

What a rewrite writes back (``rq rewrite`` of an fp8 / mxfp4 source):

- routed experts of a block-FP8 source with 128 x 128 blocks, per-expert nn.Linear tensors and I
  a multiple of 128 (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8 all are): kept as rq ``fp8``
  slots, the float8 bytes as stored and the block scales as fp32 (exact: the same dequantized
  numbers), replicas included; the planner's cheaper option is nf4 (int8 stores no fewer bytes
  than fp8). ``rq_tool.rewrite.layout.fp8_keepable`` says why another FP8 source is not kept;
- routed experts of any other quantized source (MXFP4, other FP8 block sizes): rq slots in the
  dequantized compute dtype (the ``source_scheme``, e.g. bf16), int8 or nf4, so the budget (1.0x =
  the experts' bytes *as stored*, weights + scales) needs quantized slots to fit; a budget below
  what nf4 needs is refused with the factor that fits (MXFP4's 4.25 bits are below nf4 + fp32
  absmax: ``--budget 1.5`` or so);
- every other tensor (attention, dense / shared MLPs, embeddings, norms, routers): byte for byte
  as stored, an fp8 weight with its ``weight_scale_inv``; the source's ``quantization_config``
  moves to ``config.json``'s ``rq.source_quantization`` and ``rq_tool.load`` dequantizes those
  weights itself (transformers' quantizers are not involved).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..checkpoint import TORCH_TO_ST
from ..errors import RQError
from .schemes import chunk_units

SOURCE_METHODS = ("fp8", "mxfp4")
# E2M1 (FP4) values by 4-bit code (transformers' FP4_VALUES)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max
_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config "dtype"


@dataclass(frozen=True)
class StoredTensor:
    """One logical tensor of a checkpoint and the stored tensors it is read from.

    ``parts``: role -> stored key (``{"w": key}`` for a plain tensor; fp8: ``{"q", "scale_inv"}``;
    mxfp4: ``{"blocks", "scales"}``). ``shape`` / ``dtype`` (safetensors name) are those of the
    logical tensor as rq hands it out (dequantized: the model's compute dtype).
    """

    key: str
    parts: dict[str, str]
    shape: tuple[int, ...]
    dtype: str
    method: str | None = None  # None = stored as is

    @property
    def primary(self) -> str:
        return self.parts["w" if self.method is None else ("q" if self.method == "fp8" else "blocks")]


@dataclass(frozen=True)
class SourceQuant:
    """The quantization of a source checkpoint (from its ``config.json``), or none."""

    method: str | None  # None | "fp8" | "mxfp4"
    block: tuple[int, int] | None = None  # fp8 weight_block_size; None = per-tensor scale
    out_dtype: torch.dtype = torch.bfloat16  # dtype dequantized tensors are handed out in
    config: dict | None = None  # the checkpoint's quantization_config, as stored

    @property
    def name(self) -> str:
        return self.method or "none"

    # ------------------------------------------------------------------ pairing stored tensors
    def logical(self, stored: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, StoredTensor]:
        """``stored key -> (shape, dtype)`` -> ``logical key -> StoredTensor`` (stored order kept).

        Raises RQError for a scale without its weight or a weight without its scale.
        """
        out: dict[str, StoredTensor] = {}
        if self.method is None:
            return {k: StoredTensor(k, {"w": k}, tuple(s), d) for k, (s, d) in stored.items()}
        out_name = TORCH_TO_ST[self.out_dtype]
        if self.method == "fp8":
            for key, (shape, dtype) in stored.items():
                if key.endswith(".weight_scale_inv"):
                    if key[: -len("_scale_inv")] not in stored:
                        raise RQError(f"fp8 checkpoint: scale {key!r} has no weight beside it")
                    continue
                if key.endswith(".activation_scale"):  # static activation scales: runtime-only, not weights
                    continue
                scale = key + "_scale_inv"
                if dtype == "F8_E4M3":
                    if scale not in stored:
                        raise RQError(f"fp8 checkpoint: {key!r} is float8 but has no {scale.rsplit('.', 1)[-1]}")
                    self._check_fp8_grid(key, tuple(shape), tuple(stored[scale][0]))
                    out[key] = StoredTensor(key, {"q": key, "scale_inv": scale}, tuple(shape), out_name, "fp8")
                else:
                    out[key] = StoredTensor(key, {"w": key}, tuple(shape), dtype)
            return out
        for key, (shape, dtype) in stored.items():  # mxfp4
            if key.endswith("_scales") and key[: -len("_scales")] + "_blocks" in stored:
                continue
            if key.endswith("_blocks"):
                base = key[: -len("_blocks")]
                scales = base + "_scales"
                if scales not in stored:
                    raise RQError(f"mxfp4 checkpoint: {key!r} has no {scales.rsplit('.', 1)[-1]} beside it")
                sshape = tuple(stored[scales][0])
                if len(shape) < 3 or tuple(shape[:-1]) != sshape or shape[-1] != MXFP4_BLOCK // 2:
                    raise RQError(f"mxfp4 checkpoint: {key} {list(shape)} / scales {list(sshape)} are not "
                                  f"[..., O, J, {MXFP4_BLOCK // 2}] / [..., O, J]")
                *lead, O, J, _ = shape
                out[base] = StoredTensor(base, {"blocks": key, "scales": scales},
                                         (*lead, J * MXFP4_BLOCK, O), out_name, "mxfp4")
            else:
                out[key] = StoredTensor(key, {"w": key}, tuple(shape), dtype)
        return out

    def _check_fp8_grid(self, key: str, shape: tuple[int, ...], sshape: tuple[int, ...]) -> None:
        want = fp8_scale_shape(shape, self.block)
        if sshape != want and not (self.block is None and math.prod(sshape) == 1):
            raise RQError(f"fp8 checkpoint: {key} {list(shape)} needs scales {list(want)} for block "
                          f"{list(self.block) if self.block else 'per-tensor'}, found {list(sshape)}")

    # ------------------------------------------------------------------ dequantization
    def dequantize(self, st: StoredTensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logical tensor from its stored parts (role -> tensor); plain tensors pass through."""
        if st.method is None:
            return parts["w"]
        if st.method == "fp8":
            return fp8_dequantize(parts["q"], parts["scale_inv"], self.block, self.out_dtype)
        return mxfp4_dequantize(parts["blocks"], parts["scales"], self.out_dtype).transpose(-1, -2)


def read_source_quant(config: dict) -> SourceQuant:
    """The source quantization of a ``config.json`` dict; RQError for methods rq cannot read."""
    qc = config.get("quantization_config")
    if isinstance(config.get("text_config"), dict) and qc is None:
        qc = config["text_config"].get("quantization_config")
    out_dtype = _OUT_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
    if qc is None:
        return SourceQuant(None, out_dtype=out_dtype)
    if not isinstance(qc, dict):
        raise RQError("config.json: quantization_config is not a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise RQError(f"fp8 checkpoint with fmt {fmt!r}: rq reads float8 e4m3 (fmt 'e4m3') only")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise RQError(f"fp8 checkpoint with activation_scheme {qc.get('activation_scheme')!r}: rq reads dynamic "
                          "activation scaling only")
        block = qc.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                                  for b in block)):
                raise RQError(f"fp8 checkpoint: weight_block_size {block!r} is not [rows, cols]")
            block = (int(block[0]), int(block[1]))
        return SourceQuant("fp8", block, out_dtype, dict(qc))
    if method == "mxfp4":
        return SourceQuant("mxfp4", None, out_dtype, dict(qc))
    what = {"bitsandbytes": "bitsandbytes (int8 / nf4)", "gptq": "GPTQ", "awq": "AWQ",
            "compressed-tensors": "compressed-tensors"}.get(method, repr(method or "unknown"))
    raise RQError(f"source checkpoint is quantized with {what}; rq reads unquantized (fp32/bf16/fp16), "
                  f"block-FP8 and MXFP4 checkpoints only: dequantize it first, or start from the original weights")


# ---------------------------------------------------------------------------- FP8 (block-wise)
def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """Scale grid of an fp8 weight ``[..., O, C]``: ``[..., ceil(O/bm), ceil(C/bn)]`` (``()`` per-tensor)."""
    if block is None:
        return ()
    *lead, O, C = shape
    return (*lead, -(-O // block[0]), -(-C // block[1]))


@functools.lru_cache(maxsize=1)
def _fp8_table() -> torch.Tensor:
    """The 256 float8_e4m3fn values ``[256]`` fp32, by bit pattern."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).to(torch.float32)


def _fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> fp32, exactly (a 256-entry table: ~9x faster than ``.to`` on CPU)."""
    idx = q.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return _fp8_table().index_select(0, idx).view(q.shape)


def fp8_scale_float(scale: torch.Tensor) -> torch.Tensor:
    """A block-scale grid as fp32, exactly: fp32 / bf16 / fp16 values, or E8M0 exponents (uint8)."""
    if scale.dtype == torch.uint8:  # E8M0 exponents (scale_fmt "ue8m0" stored as bytes)
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q [..., O, C]`` float8 and ``scale_inv [..., ceil(O/bm), ceil(C/bn)]`` -> ``[..., O, C]`` in ``dtype``.

    Computed in fp32 (``q * scale``), then rounded once to ``dtype``, as transformers does. Edge
    blocks may be partial (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` has 5 row blocks). Block
    scales: whole row blocks at a time (about ``defaults.CHUNK_VALUES`` values), each written into
    the output (3-5x faster than whole-matrix temporaries on a 7168 x 2048 expert).
    """
    s = fp8_scale_float(scale_inv)
    if block is None or s.numel() == 1:
        return (_fp8_to_float(q) * s.reshape(())).to(dtype)
    bm, bn = block
    O, C = q.shape[-2:]
    full, rem = divmod(C, bn)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    step = bm * chunk_units(q.device, bm * C * math.prod(q.shape[:-2]), -(-O // bm))
    for r0 in range(0, O, step):
        r1 = min(O, r0 + step)
        w = _fp8_to_float(q[..., r0:r1, :])
        # [..., r1 - r0, ceil(C/bn)]: rows only, columns broadcast
        sr = s[..., r0 // bm: -(-r1 // bm), :].repeat_interleave(bm, dim=-2)[..., : r1 - r0, :]
        if full:  # in place on the fp32 rows, through a view: the scales are never expanded over columns
            w[..., : full * bn].unflatten(-1, (full, bn)).mul_(sr[..., :full, None])
        if rem:
            w[..., full * bn:].mul_(sr[..., full:])
        out[..., r0:r1, :] = w
    return out


def fp8_quantize(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., O, C]`` -> ``(q float8_e4m3fn [..., O, C], scale_inv fp32 grid)``: per-block absmax to 448.

    What FP8 checkpoints ship (transformers' ``Fp8Quantize``, with partial edge blocks); used to build
    test and benchmark checkpoints.
    """
    w = w.float()
    O, C = w.shape[-2:]
    if block is None:
        amax = w.abs().amax().clamp_min(1e-12)
        scale_inv = (amax / _FP8_MAX).reshape(())
        return (w / scale_inv).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_DTYPE), scale_inv
    bm, bn = block
    pr, pc = -(-O // bm) * bm - O, -(-C // bn) * bn - C
    padded = torch.nn.functional.pad(w, (0, pc, 0, pr))
    tiles = padded.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm))  # [..., O/bm, bm, C/bn, bn]
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-2).flatten(-3, -2)[..., :O, :C].contiguous()
    return q, scale_inv.contiguous()


# ---------------------------------------------------------------------------- MXFP4
def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``blocks [..., O, J, 16]`` uint8, ``scales [..., O, J]`` uint8 -> ``[..., O, J * 32]`` in ``dtype``.

    Value ``2j`` of a block is the low nibble of byte ``j``, ``2j + 1`` the high one; each block is
    scaled by ``2 ** (scale - 127)`` (E8M0). Every FP4 value times a power of two is exact in bf16.
    """
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8).reshape(-1)
    lo, hi = (lut.index_select(0, (b & 0x0F).to(torch.int32)), lut.index_select(0, (b >> 4).to(torch.int32)))
    vals = torch.stack([lo, hi], dim=-1).view(*blocks.shape[:-2], -1)  # [..., O, J * 32]
    scale = (scales.to(torch.float32) - 127.0).exp2()  # [..., O, J]
    return (vals.unflatten(-1, (-1, MXFP4_BLOCK)) * scale[..., None]).flatten(-2).to(dtype)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., O, C]`` (C a multiple of 32) -> ``(blocks [..., O, C/32, 16] uint8, scales [..., O, C/32] uint8)``.

    Round-to-nearest onto the E2M1 grid with a per-block power-of-two scale (absmax <= 6);
    builds test and benchmark checkpoints in gpt-oss's on-disk format.
    """
    w = w.float()
    if w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 needs rows of a multiple of {MXFP4_BLOCK} values, got {tuple(w.shape)}")
    blk = w.unflatten(-1, (-1, MXFP4_BLOCK))  # [..., O, J, 32]
    amax = blk.abs().amax(-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = blk / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [..., O, J, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()

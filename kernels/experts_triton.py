"""Triton implementation of :func:`rq_tool.kernels.experts.moe_experts`.

A grouped matmul over the padded blocks of ``dispatch.sorted_ids`` (vLLM fused-MoE style), in
two kernels, each launched once per scheme group over that group's blocks (grid: block x column tile of BLOCK_N):

1. ``_gate_up_act_kernel``: rows of x gathered by ``sorted_ids // K``, times the slot's gate and up
   tiles (two fp32 accumulators), fused: int8 row-scale dequantization (applied to the
   accumulator: ``x @ (q * s)^T = (x @ q^T) * s``), gate_up bias, activation. Writes the
   activated ``[num_padded, I]`` intermediate in the compute dtype (rounded like F.linear's).
2. ``_down_combine_kernel``: intermediate rows times the slot's down tile, fused: int8 scale,
   down bias, routing weight; writes fp32 ``[T*K, H]`` rows at their flat pair index.
   The combine over k is ``out.view(T, K, H).sum(1)`` in torch: deterministic, fp32, no atomics.

nf4 and fp8 slots are dequantized in torch (only the slots this batch uses) into a compute-dtype buffer,
then run through the float kernels. Dot operands are the compute dtype on GPU (fp32 with IEEE
precision for fp32); the interpreter stores bf16 as raw uint16 and cannot multiply it, so there
every operand is converted to fp32 first.
"""

from __future__ import annotations

import torch

try:  # optional (CUDA, or TRITON_INTERPRET=1): a try block keeps transformers' remote-code import check
    import triton  # from demanding triton of a rewritten model loaded where only the torch paths run
    import triton.language as tl
except ImportError as e:  # pragma: no cover - imported only when the Triton backend was chosen
    raise ImportError(f"{__name__} needs triton (pip install 'rq-tool[kernels]')") from e

from rq_tool.errors import RQError

from .backend import interpreter_enabled
from .slots import DEQUANTIZED_KINDS, scheme_kind
from .types import Dispatch, SlotWeights

# activation spec -> ACT code of _activate
_GLU_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2, "relu": 3}
_GPTOSS = 4
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _activate(gate, up, ACT: tl.constexpr, alpha, limit):
    """fp32 ``act(gate) * up`` (ACT 0-3) or gpt-oss's clamped SwiGLU (ACT 4)."""
    if ACT == 0:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        out = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACT == 2:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * inner)) * up  # 1 + tanh(z) = 2 * sigmoid(2z)
    elif ACT == 3:
        out = tl.maximum(gate, 0.0) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    return out


@triton.jit
def _gate_up_act_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, bias_ptr, sorted_ids_ptr, blocks_ptr, block_slot_ptr, widx_ptr, inter_ptr,
    # dimensions and activation parameters
    num_pairs, H, I, alpha, limit,
    # strides
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
    stride_bp, stride_bn, stride_im, stride_in,
    # meta-parameters
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INT8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block = tl.load(blocks_ptr + tl.program_id(0))
    slot = tl.load(block_slot_ptr + block)
    wi = tl.load(widx_ptr + slot)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    valid = pair < num_pairs
    token = pair // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < I

    w_base = w_ptr + wi * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        a = tl.load(x_ptr + token[:, None] * stride_xt + k[None, :] * stride_xh,
                    mask=valid[:, None] & kmask[None, :], other=0.0).to(DOT_DTYPE)
        wmask = kmask[:, None] & nmask[None, :]
        w_gate = tl.load(w_base + n[None, :] * stride_wn + k[:, None] * stride_wk, mask=wmask, other=0)
        w_up = tl.load(w_base + (n + I)[None, :] * stride_wn + k[:, None] * stride_wk, mask=wmask, other=0)
        acc_gate = tl.dot(a, w_gate.to(DOT_DTYPE), acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, w_up.to(DOT_DTYPE), acc_up, input_precision=DOT_PRECISION)
    if INT8:
        acc_gate *= tl.load(scale_ptr + wi * stride_se + n * stride_sn, mask=nmask, other=0.0)[None, :]
        acc_up *= tl.load(scale_ptr + wi * stride_se + (n + I) * stride_sn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        b_base = bias_ptr + slot * stride_bp
        acc_gate += tl.load(b_base + n * stride_bn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_base + (n + I) * stride_bn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc_gate, acc_up, ACT, alpha, limit)
    tl.store(inter_ptr + rows[:, None] * stride_im + n[None, :] * stride_in, h, mask=valid[:, None] & nmask[None, :])


@triton.jit
def _down_combine_kernel(
    # pointers
    inter_ptr, w_ptr, scale_ptr, bias_ptr, topk_weights_ptr, sorted_ids_ptr, blocks_ptr, block_slot_ptr,
    widx_ptr, out_ptr,
    # dimensions
    num_pairs, H, I,
    # strides
    stride_im, stride_in, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
    stride_bp, stride_bn, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block = tl.load(blocks_ptr + tl.program_id(0))
    slot = tl.load(block_slot_ptr + block)
    wi = tl.load(widx_ptr + slot)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    valid = pair < num_pairs
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H

    w_base = w_ptr + wi * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < I
        a = tl.load(inter_ptr + rows[:, None] * stride_im + k[None, :] * stride_in,
                    mask=valid[:, None] & kmask[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_base + n[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=kmask[:, None] & nmask[None, :], other=0)
        acc = tl.dot(a, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if INT8:
        acc *= tl.load(scale_ptr + wi * stride_se + n * stride_sn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + slot * stride_bp + n * stride_bn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pair[:, None] * stride_om + n[None, :] * stride_on, acc, mask=valid[:, None] & nmask[None, :])


def _act_code(act: str) -> tuple[int, float, float]:
    kind, _, rest = act.partition(":")
    if kind == "glu" and rest in _GLU_CODES:
        return _GLU_CODES[rest], 0.0, 0.0
    if kind == "gptoss":
        alpha, _, limit = rest.partition(":")
        return _GPTOSS, float(alpha), float(limit)
    raise RQError(f"the Triton experts kernel has no activation {act!r}",
                  hint=f"it has glu:{{{','.join(_GLU_CODES)}}} and gptoss:<alpha>:<limit>; use RQ_KERNEL=torch")


def _tiles(n: int, k: int, tiles: tuple[int, int] | None, interpret: bool) -> tuple[int, int, dict]:
    """(BLOCK_N, BLOCK_K, launch options) for an [M, k] x [k, n] product."""
    if tiles is not None:
        return tiles[0], tiles[1], {}
    if interpret:  # few, big programs
        return max(16, min(triton.next_power_of_2(n), 256)), max(16, min(triton.next_power_of_2(k), 256)), {}
    return 64, 64, {"num_warps": 4, "num_stages": 3}


def moe_experts_triton(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    dispatch: Dispatch,
    weights: SlotWeights,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Launches the two kernels per scheme group; inputs already checked by the public wrapper.

    ``tiles``: (BLOCK_N, BLOCK_K) powers of two >= 16, to override the defaults (tests).
    """
    T, K = dispatch.phy_ids.shape
    H, I, M, bm = weights.hidden_size, weights.intermediate_size, T * K, dispatch.block_size
    if bm < 16 or bm & (bm - 1):
        raise RQError(f"the Triton experts kernel needs dispatch block_size a power of two >= 16, got {bm}")
    interpret = interpreter_enabled()
    if x.device.type == "cpu" and not interpret:
        raise RQError("the Triton kernels run on CPU tensors only with TRITON_INTERPRET=1")
    act, alpha, limit = _act_code(weights.act)
    dtype = x.dtype
    dot_dtype = tl.float32 if interpret else _DOT_DTYPES[dtype]
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # "tf32" is ignored for 16-bit operands
    out = torch.empty(M, H, dtype=torch.float32, device=x.device)
    if M == 0:
        return out.view(T, K, H).sum(1).to(dtype)
    x = x.contiguous()
    tw = topk_weights.reshape(-1).contiguous()
    inter = torch.empty(dispatch.num_padded, I, dtype=dtype, device=x.device)
    block_group = weights.slot_scheme[dispatch.block_slot]
    gu_bias, dn_bias = weights.gate_up_bias, weights.down_bias
    dummy = torch.zeros(1, dtype=torch.float32, device=x.device)

    for g, name in enumerate(weights.schemes):
        blocks = (block_group == g).nonzero().flatten()
        if blocks.numel() == 0:
            continue
        kind, group = scheme_kind(name), weights.groups[g]
        if kind in DEQUANTIZED_KINDS:  # dequantize only the slots this batch uses, then run as float
            used = torch.unique(dispatch.block_slot[blocks])
            w_gu, w_dn = weights.dequantize_rows(g, weights.slot_index[used], dtype)
            widx = torch.zeros(weights.num_slots, dtype=torch.int64, device=x.device)
            widx[used] = torch.arange(used.numel(), device=x.device)
            s_gu = s_dn = dummy.view(1, 1)
        else:
            w_gu, w_dn, widx = group["gate_up"], group["down"], weights.slot_index
            s_gu = group.get("gate_up_scale", dummy.view(1, 1))
            s_dn = group.get("down_scale", dummy.view(1, 1))
        int8 = kind == "int8"

        bn, bk, opts = _tiles(I, H, tiles, interpret)
        b_gu = gu_bias if gu_bias is not None else dummy.view(1, 1)
        _gate_up_act_kernel[(blocks.numel(), triton.cdiv(I, bn))](
            x, w_gu, s_gu, b_gu, dispatch.sorted_ids, blocks, dispatch.block_slot, widx, inter,
            M, H, I, alpha, limit,
            x.stride(0), x.stride(1), w_gu.stride(0), w_gu.stride(1), w_gu.stride(2), s_gu.stride(0), s_gu.stride(1),
            b_gu.stride(0), b_gu.stride(1), inter.stride(0), inter.stride(1),
            TOP_K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INT8=int8, HAS_BIAS=gu_bias is not None, ACT=act,
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, **opts,
        )
        bn, bk, opts = _tiles(H, I, tiles, interpret)
        b_dn = dn_bias if dn_bias is not None else dummy.view(1, 1)
        _down_combine_kernel[(blocks.numel(), triton.cdiv(H, bn))](
            inter, w_dn, s_dn, b_dn, tw, dispatch.sorted_ids, blocks, dispatch.block_slot, widx, out,
            M, H, I,
            inter.stride(0), inter.stride(1), w_dn.stride(0), w_dn.stride(1), w_dn.stride(2),
            s_dn.stride(0), s_dn.stride(1), b_dn.stride(0), b_dn.stride(1), out.stride(0), out.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INT8=int8, HAS_BIAS=dn_bias is not None,
            DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, **opts,
        )
    return out.view(T, K, H).sum(1).to(dtype)

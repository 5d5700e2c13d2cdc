"""Expert compute over physical slots: ``y[t] = sum_k w[t, k] * expert_{phy_ids[t, k]}(x[t])``.

Legend: T tokens, K top-k, H hidden, I expert intermediate size, P physical slots.

Both implementations take the :class:`Dispatch` of the batch (its ``sorted_ids`` is the
permutation that groups pairs by slot) and a layer's :class:`SlotWeights`; they accumulate the
weighted sum in fp32 and return ``x.dtype``. Quantized slots are dequantized to the compute dtype
(``x.dtype``): the reference does it per slot per call (nothing cached: the memory saving of a
quantized slot is the point), the Triton path fuses int8 dequantization into the matmul, and the
CPU path (``experts_cpu``) computes int8 slots with weight-only int8 matmuls and dequantizes
only the nf4 / fp8 slots a batch uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rq_tool.arch.activation import activation_fn

from .backend import resolve_impl, triton_import_failed
from .experts_cpu import moe_experts_cpu
from .types import Dispatch, SlotWeights


def _check(x: torch.Tensor, topk_weights: torch.Tensor, dispatch: Dispatch, weights: SlotWeights):
    assert x.dim() == 2 and x.shape[1] == weights.hidden_size, (
        f"x must be [T, H={weights.hidden_size}], got {tuple(x.shape)}"
    )
    assert topk_weights.shape == dispatch.phy_ids.shape and topk_weights.shape[0] == x.shape[0], (
        f"topk_weights {tuple(topk_weights.shape)} and phy_ids {tuple(dispatch.phy_ids.shape)} must be [T, K]"
    )
    assert dispatch.slot_counts.numel() == weights.num_slots, (
        f"dispatch has {dispatch.slot_counts.numel()} slots, weights {weights.num_slots}"
    )


def moe_experts_reference(
    x: torch.Tensor, topk_weights: torch.Tensor, dispatch: Dispatch, weights: SlotWeights
) -> torch.Tensor:
    """Pure-torch expert compute: per used slot one gather, two F.linear and one scatter of rows."""
    _check(x, topk_weights, dispatch, weights)
    T, K = dispatch.phy_ids.shape
    M, dtype, act = T * K, x.dtype, activation_fn(weights.act)
    # fp32 output per (token, k) pair, summed over k at the end: the combine order is then k order
    # whatever slots the pairs went to (replica placement cannot change it), as in the Triton path.
    out = torch.empty(M, weights.hidden_size, dtype=torch.float32, device=x.device)
    pair_w = topk_weights.reshape(-1).float()
    pairs = dispatch.sorted_ids[dispatch.sorted_ids < M]  # drop padding: slot-grouped flat pair ids
    for slot, ids in enumerate(pairs.split(dispatch.slot_counts.tolist())):
        if ids.numel() == 0:
            continue
        gate_up, down = weights.dequantize_slot(slot, dtype)
        gu_bias = None if weights.gate_up_bias is None else weights.gate_up_bias[slot].to(dtype)
        dn_bias = None if weights.down_bias is None else weights.down_bias[slot].to(dtype)
        tokens = ids // K
        h = act(F.linear(x[tokens], gate_up, gu_bias))
        out[ids] = F.linear(h, down, dn_bias).float() * pair_w[ids, None]  # every pair written once
    return out.view(T, K, weights.hidden_size).sum(1).to(dtype)


def moe_experts_grouped(
    x: torch.Tensor, topk_weights: torch.Tensor, dispatch: Dispatch, weights: SlotWeights
) -> torch.Tensor:
    """The torch path the CPU runtime runs (``experts_cpu``): the reference's math, scheme group by
    scheme group, computing only the slots the batch uses (int8 with weight-only int8 matmuls,
    nf4 / fp8 dequantized for the call, nothing cached)."""
    _check(x, topk_weights, dispatch, weights)
    return moe_experts_cpu(x, topk_weights, dispatch.phy_ids, weights)


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    dispatch: Dispatch,
    weights: SlotWeights,
    impl: str | None = None,
) -> torch.Tensor:
    """``x [T, H]``, ``topk_weights [T, K]``, a batch's Dispatch and a layer's slots -> ``y [T, H]``.

    ``impl``: ``"triton"`` / ``"torch"`` / None (``RQ_KERNEL``, see ``backend``). The Triton path
    needs ``dispatch.block_size`` a power of two >= 16 and an activation it implements
    (glu:silu / gelu / gelu_pytorch_tanh / relu, gptoss).
    """
    if resolve_impl(impl, x.is_cuda) == "triton":
        try:  # optional: triton (resolve_impl checked it is installed); a bundled model runs without it
            from .experts_triton import moe_experts_triton
        except ImportError as e:
            raise triton_import_failed(e) from None

        _check(x, topk_weights, dispatch, weights)
        return moe_experts_triton(x, topk_weights, dispatch, weights)
    return moe_experts_grouped(x, topk_weights, dispatch, weights)

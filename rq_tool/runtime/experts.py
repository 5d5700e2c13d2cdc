"""The RQ experts module: drop-in replacement for a family's fused experts module.

Called exactly like the original (``experts(hidden [T, H], top_k_index [T, K], top_k_weights
[T, K])``) with *logical* expert ids; it maps them to physical slots through the layer's routing
map (round-robin by occurrence, see ``routing_map.py``), computes every slot in its storage
scheme and combines. On CUDA the Triton kernels run, elsewhere their torch references
(``rq_tool.kernels``; ``RQ_KERNEL=torch|triton|auto`` forces either).

State-dict keys (slot format v1, one group per scheme present in the layer, see
``rq_tool/quant/schemes.py``)::

    {scheme}_gate_up, {scheme}_down            float [n, 2I, H] / [n, H, I]; int8 same shapes;
                                               nf4 packed uint8 [n, 2I*H/2] / [n, H*I/2]
    {scheme}_gate_up_scale, {scheme}_down_scale   int8 row scales fp32 [n, 2I] / [n, H]
    {scheme}_gate_up_absmax, {scheme}_down_absmax nf4 block absmax fp32 [n, 2I*H/64] / [n, H*I/64]
    {scheme}_gate_up_scale_inv, ..._down_scale_inv  fp8 (float8_e4m3fn slots) 128x128 block scales fp32
                                               [n, ceil(2I/128), ceil(H/128)] / [n, ceil(H/128), ceil(I/128)]
    gate_up_bias [P, 2I], down_bias [P, H]     families with expert biases (gpt-oss)

Per-slot load counting (``count_load = True``) adds each batch's slot counts to ``slot_load``;
it is off by default and costs nothing when off.

Split policy ``load-aware`` (a map with a placement): per batch, expert counts -> water-filled
split over the replicas' devices -> per-token slot (``rq_tool.kernels.replica_choice``).
Expert parallelism (``runtime/ep.py``) builds the module with ``slots``: only those slots are
materialised (parameters of that many rows); routing still sees the whole layer map.

On the torch (CPU) path, replicas whose stored tensors are identical are computed as one slot
(``kernels.experts_cpu.identical_slots``; same numbers, the split only matters across devices), so
a layer whose replicas are all exact copies skips the dispatch unless it counts loads.
``cache_dequantized = True`` keeps dequantized quantized slots after first use (faster, and costs
their float bytes: see ``kernels.experts_cpu.DequantCache``); off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import defaults
from ..kernels import SlotWeights, moe_experts, replica_dispatch, resolve_impl
from ..kernels.dispatch import dispatch_from_phy
from ..kernels.experts_cpu import DequantCache, identical_slots, moe_experts_cpu
from ..kernels.replica_choice import choose_slots
from ..kernels.slots import group_shapes as slot_tensor_shapes
from .routing_map import LayerMap

def slot_tensor_dtype(scheme: str, name: str, compute_dtype: torch.dtype) -> torch.dtype:
    if name.endswith(("_scale", "_absmax", "_scale_inv")):
        return torch.float32
    if scheme == "int8":
        return torch.int8
    if scheme == "nf4":
        return torch.uint8
    if scheme == "fp8":
        return torch.float8_e4m3fn
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[scheme]


class RQExperts(nn.Module):
    """Physical expert slots of one MoE layer plus its routing map."""

    def __init__(self, layer_map: LayerMap, hidden_size: int, intermediate_size: int, act: str,
                 has_bias: bool = False, bias_dtype: torch.dtype = torch.float32, device="cpu",
                 split_policy: str = defaults.SPLIT_POLICY, num_devices: int | None = None,
                 slots: torch.Tensor | None = None):
        super().__init__()
        self.layer = layer_map.layer
        self.hidden_size, self.intermediate_size, self.act = hidden_size, intermediate_size, act
        self.num_slots = layer_map.num_slots
        self.num_experts = int(layer_map.logcnt.numel())
        self.split_policy, self.num_devices = split_policy, num_devices
        # materialised slots (global ids, increasing): all of them unless expert-parallel
        self.local_slots = torch.arange(self.num_slots) if slots is None else torch.as_tensor(slots).long().sort().values
        local_scheme = [layer_map.slot_scheme[int(p)] for p in self.local_slots]
        self.schemes = tuple(dict.fromkeys(local_scheme))  # first-seen order
        slot_scheme = torch.tensor([self.schemes.index(s) for s in local_scheme], dtype=torch.int64)
        slot_index = torch.zeros_like(slot_scheme)
        for g in range(len(self.schemes)):
            members = (slot_scheme == g).nonzero().flatten()
            slot_index[members] = torch.arange(members.numel())
        for name, t in (("phy2log", layer_map.phy2log), ("log2phy", layer_map.log2phy), ("logcnt", layer_map.logcnt),
                        ("slot_scheme", slot_scheme), ("slot_index", slot_index)):
            self.register_buffer(name, t.clone().to(device), persistent=False)
        if layer_map.slot_device is not None:
            self.register_buffer("slot_device", layer_map.slot_device.clone().to(device), persistent=False)
        elif split_policy == defaults.LOAD_AWARE_POLICY:
            raise ValueError(f"layer {self.layer}: split policy {split_policy!r} needs the map's slot_device")
        self.register_buffer("slot_load", torch.zeros(self.num_slots, dtype=torch.int64, device=device), persistent=False)
        self.count_load = False
        self.cache_dequantized = False
        for g, scheme in enumerate(self.schemes):
            n = int((slot_scheme == g).sum())
            for name, shape in slot_tensor_shapes(scheme, n, hidden_size, intermediate_size).items():
                dtype = slot_tensor_dtype(scheme, name, bias_dtype)
                self.register_parameter(f"{scheme}_{name}", nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                                         requires_grad=False))
        # checkpoint tensor -> the rows of it materialised here (only when a subset; empty: a group
        # this module holds no slot of, so no parameter)
        self.checkpoint_rows: dict[str, torch.Tensor] = {}
        if slots is not None:
            for scheme in dict.fromkeys(layer_map.slot_scheme):
                same = [p for p, s in enumerate(layer_map.slot_scheme) if s == scheme]
                rows = torch.tensor([same.index(int(p)) for p in self.local_slots if layer_map.slot_scheme[int(p)] == scheme],
                                    dtype=torch.int64)
                for name in slot_tensor_shapes(scheme, 0, hidden_size, intermediate_size):
                    self.checkpoint_rows[f"{scheme}_{name}"] = rows
            if has_bias:
                self.checkpoint_rows["gate_up_bias"] = self.checkpoint_rows["down_bias"] = self.local_slots
        if has_bias:
            n = self.local_slots.numel()
            self.gate_up_bias = nn.Parameter(torch.empty(n, 2 * intermediate_size, dtype=bias_dtype,
                                                         device=device), requires_grad=False)
            self.down_bias = nn.Parameter(torch.empty(n, hidden_size, dtype=bias_dtype, device=device),
                                          requires_grad=False)
        else:
            self.gate_up_bias = self.down_bias = None

    def slot_weights(self) -> SlotWeights:
        """The layer's slots as the kernels' view; rebuilt only when the tensors moved or changed."""
        key = tuple((t.data_ptr(), t.device) for t in self.parameters()) + (self.slot_scheme.data_ptr(),)
        cached = self.__dict__.get("_slot_weights")
        if cached is None or cached[0] != key:
            cached = (key, self._build_slot_weights())
            self.__dict__["_slot_weights"] = cached
            self.__dict__.pop("_compute_plan", None)
            self.__dict__["_dequant_cache"] = DequantCache()
        return cached[1]

    def _cpu_plan(self, weights: SlotWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``compute_slot [P]`` (identical replicas share one) and, when every expert's replicas
        are identical, ``log2c [E]`` (the one compute slot of each logical expert), else None."""
        plan = self.__dict__.get("_compute_plan")
        if plan is None:
            compute = identical_slots(weights, self.phy2log)
            log2c = compute[self.log2phy[:, 0]]
            valid = self.log2phy >= 0
            same = (compute[self.log2phy.clamp(min=0)] == log2c[:, None]) | ~valid
            plan = self.__dict__["_compute_plan"] = (compute, log2c if bool(same.all()) else None)
        return plan

    @property
    def dequant_cache_bytes(self) -> int:
        """Bytes the opt-in dequantized-slot cache holds now (0 when ``cache_dequantized`` is off)."""
        cache = self.__dict__.get("_dequant_cache")
        return 0 if cache is None else cache.nbytes

    def _build_slot_weights(self) -> SlotWeights:
        groups = []
        for scheme in self.schemes:
            names = slot_tensor_shapes(scheme, 0, self.hidden_size, self.intermediate_size)
            groups.append({name: getattr(self, f"{scheme}_{name}") for name in names})
        return SlotWeights(self.schemes, self.slot_scheme, self.slot_index, tuple(groups), self.hidden_size,
                           self.intermediate_size, self.act, self.gate_up_bias, self.down_bias)

    def choose_slots(self, top_k_index: torch.Tensor, counts_before=None, step_counts=None) -> torch.Tensor:
        """``top_k_index [T, K]`` logical ids -> physical slots ``[T, K]`` under the layer's split policy
        (``counts_before`` / ``step_counts [E]``: this rank's place in an expert-parallel step)."""
        return choose_slots(top_k_index, self.log2phy, self.logcnt, self.split_policy,
                            getattr(self, "slot_device", None), self.num_devices, counts_before, step_counts)

    def forward_local(self, hidden_states: torch.Tensor, local_slot: torch.Tensor) -> torch.Tensor:
        """Rows ``hidden_states [M, H]`` through materialised slot ``local_slot [M]`` (index into
        ``local_slots``), unweighted -> ``[M, H]``."""
        dispatch = dispatch_from_phy(local_slot.view(-1, 1), self.local_slots.numel())
        ones = torch.ones(local_slot.numel(), 1, dtype=hidden_states.dtype, device=hidden_states.device)
        return moe_experts(hidden_states, ones, dispatch, self.slot_weights())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        shape = hidden_states.shape  # [T, H], or [B, S, H] where the family passes it unflattened (DBRX)
        if self.checkpoint_rows:
            raise RuntimeError(f"layer {self.layer}: holds {self.local_slots.numel()} of {self.num_slots} slots; "
                               "it runs only through its expert-parallel forward (rq_tool.runtime.ep)")
        x = hidden_states.reshape(-1, shape[-1])
        if resolve_impl(None, x.is_cuda) == "torch":
            return self._forward_cpu(x, top_k_index, top_k_weights).view(shape)
        dispatch = self._dispatch(top_k_index)
        if self.count_load:
            self.slot_load += dispatch.slot_counts.to(self.slot_load.device)
        return moe_experts(x, top_k_weights, dispatch, self.slot_weights()).view(shape)

    def _dispatch(self, top_k_index: torch.Tensor):
        """The batch's Dispatch under the layer's split policy."""
        if self.split_policy == defaults.SPLIT_POLICY:
            return replica_dispatch(top_k_index, self.log2phy, self.logcnt, self.num_slots)
        return dispatch_from_phy(self.choose_slots(top_k_index), self.num_slots)

    def _forward_cpu(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` on the torch path: identical replicas merged, only used slots computed."""
        weights = self.slot_weights()
        compute, log2c = self._cpu_plan(weights)
        if log2c is not None and not self.count_load:
            slot_ids = log2c[top_k_index]  # every expert's replicas are copies: no split to make
        else:
            dispatch = self._dispatch(top_k_index)
            if self.count_load:
                self.slot_load += dispatch.slot_counts.to(self.slot_load.device)
            slot_ids = compute[dispatch.phy_ids]
        cache = self.__dict__["_dequant_cache"] if self.cache_dequantized else None
        return moe_experts_cpu(x, top_k_weights, slot_ids, weights, cache)

    def extra_repr(self) -> str:
        local = "" if self.local_slots.numel() == self.num_slots else f", materialised={self.local_slots.numel()}"
        return (f"layer={self.layer}, experts={self.num_experts}, slots={self.num_slots}{local}, schemes={self.schemes}, "
                f"split={self.split_policy}")

"""The CPU expert path: compute only the slots a batch uses, each scheme group with its own kernel.

Legend: T tokens, K top-k, H hidden, I expert intermediate size, P physical slots, S pairs routed
to one scheme group, n_g slots in group g, U used slots of a group.

Per batch the (token, k) pairs are grouped by slot (slots ordered group by group, row by row), then
every scheme group runs on its own pairs:

- float: one grouped matmul per projection straight on the stored tensors (a view, no copy, when
  the group is in the compute dtype);
- int8: weight-only int8 matmul. bf16/fp16 activations with few rows per slot (decode) run
  ``torch._weight_int8pack_mm`` (int8 weights, per-output-channel scales; faster than a bf16 GEMM
  at decode sizes); otherwise the used slots' int8 weights are cast to the compute dtype (exact:
  |q| <= 127) for one grouped matmul and the row scales multiply the outputs. The int8 bytes are
  never expanded for slots the batch does not use, nor kept;
- nf4: no CPU kernel in torch, so the used slots are dequantized for the call (pure torch) -- or
  read from an opt-in :class:`DequantCache`, which keeps each dequantized slot after first use and
  so costs the float bytes of every cached slot (for nf4 in bf16 about 3.6x the nf4 bytes: the
  memory saving of the scheme is given back for speed).

Replicas of one expert that store identical tensors (same scheme, same bytes) are one compute slot
on a single device (:func:`identical_slots`): splitting their tokens only matters across devices.
"""

from __future__ import annotations

import torch

from rq_tool.arch.activation import activation_fn, grouped_expert_forward, grouped_linear

from .slots import scheme_kind
from .types import SlotWeights

# torch._weight_int8pack_mm on CPU: fast only for bf16/fp16 activations and few rows (it is a
# GEMV-style kernel; at 64 rows a cast + GEMM wins, measured in scripts/bench_runtime.py's shapes),
# and it needs the reduction size a multiple of 16 and the int8 weights 16-byte aligned (other
# sizes or a misaligned pointer crash the process in torch 2.13, so both are checked first).
INT8PACK_MAX_ROWS = 32
INT8PACK_DTYPES = (torch.bfloat16, torch.float16)
INT8PACK_K_MULTIPLE = 16
INT8PACK_ALIGN = 16


def _int8pack_ok(g: dict, counts: list[int], dtype: torch.dtype, H: int, I: int) -> bool:
    return (dtype in INT8PACK_DTYPES and max(counts) <= INT8PACK_MAX_ROWS and H % INT8PACK_K_MULTIPLE == 0
            and I % INT8PACK_K_MULTIPLE == 0 and g["gate_up"].is_contiguous() and g["down"].is_contiguous()
            and g["gate_up"].data_ptr() % INT8PACK_ALIGN == 0 and g["down"].data_ptr() % INT8PACK_ALIGN == 0)


class DequantCache:
    """Opt-in cache of dequantized quantized slots, keyed by (group, row) and compute dtype.

    Grows on first use of each slot up to every quantized slot of the layer; ``nbytes`` says what
    it holds. Off by default: it trades the memory the quantized schemes saved for speed.
    """

    def __init__(self):
        self._store: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, weights: SlotWeights, group: int, rows: list[int], dtype: torch.dtype):
        """``gate_up [U, 2I, H]``, ``down [U, H, I]`` of ``rows`` of ``group`` in ``dtype``."""
        missing = [r for r in rows if (group, r, dtype) not in self._store]
        if missing:
            gu, dn = weights.dequantize_rows(group, torch.tensor(missing, device=weights.device), dtype)
            for i, r in enumerate(missing):
                self._store[(group, r, dtype)] = (gu[i].clone(), dn[i].clone())
        pairs = [self._store[(group, r, dtype)] for r in rows]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._store.values())

    def clear(self) -> None:
        self._store.clear()


def identical_slots(weights: SlotWeights, phy2log: torch.Tensor) -> torch.Tensor:
    """``compute_slot [P]``: for each slot the lowest slot of the same logical expert (``phy2log
    [P]``) in the same scheme group whose stored tensors are equal; a slot is its own otherwise."""
    P = weights.num_slots
    out = torch.arange(P)
    owner = phy2log.tolist()
    group, row = weights.slot_scheme.tolist(), weights.slot_index.tolist()
    first: dict[tuple[int, int], list[int]] = {}
    for p in range(P):
        g = weights.groups[group[p]]
        for q in first.setdefault((owner[p], group[p]), []):
            if all(torch.equal(t[row[p]], t[row[q]]) for t in g.values()):
                out[p] = q
                break
        else:
            first[(owner[p], group[p])].append(p)
        # biases are per slot: slots with different biases are different experts
        for b in (weights.gate_up_bias, weights.down_bias):
            if b is not None and out[p] != p and not torch.equal(b[p], b[int(out[p])]):
                out[p] = p
    return out.to(weights.device)


def _bias_rows(bias: torch.Tensor | None, slots: list[int], dtype) -> torch.Tensor | None:
    return None if bias is None else bias[slots].to(dtype)


def _scaled(h: torch.Tensor, scale: torch.Tensor, rows: list[int], counts: list[int]) -> torch.Tensor:
    """Multiply rows of ``h [S, out]`` by their slot's output-channel scale ``scale[row] [out]``."""
    reps = torch.tensor(counts, device=h.device)
    return h * torch.repeat_interleave(scale[rows].to(h.dtype), reps, dim=0)


def _add_bias(h: torch.Tensor, bias: torch.Tensor | None, counts: list[int]) -> torch.Tensor:
    if bias is None:
        return h
    return h + torch.repeat_interleave(bias, torch.tensor(counts, device=h.device), dim=0)


def _int8_group(x, g, rows, counts, weights, slots, act, dtype):
    H, I = weights.hidden_size, weights.intermediate_size
    gu_b = _bias_rows(weights.gate_up_bias, slots, dtype)
    dn_b = _bias_rows(weights.down_bias, slots, dtype)
    if _int8pack_ok(g, counts, dtype, H, I):
        outs = []
        for i, (r, xs) in enumerate(zip(rows, x.split(counts))):
            # rows of a contiguous [n, out, in] group at an aligned base stay aligned (in % 16 == 0);
            # activations are fresh allocations (``x[ids]``, ``act(h)``) or whole-row slices of them
            h = torch._weight_int8pack_mm(xs.contiguous(), g["gate_up"][r], g["gate_up_scale"][r].to(dtype))
            if gu_b is not None:
                h = h + gu_b[i]
            y = torch._weight_int8pack_mm(act(h).contiguous(), g["down"][r], g["down_scale"][r].to(dtype))
            outs.append(y if dn_b is None else y + dn_b[i])
        return torch.cat(outs)
    gu, dn = g["gate_up"][rows].to(dtype), g["down"][rows].to(dtype)
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    h = _add_bias(_scaled(grouped_linear(x, gu, counts, offs, None), g["gate_up_scale"], rows, counts), gu_b, counts)
    y = _scaled(grouped_linear(act(h), dn, counts, offs, None), g["down_scale"], rows, counts)
    return _add_bias(y, dn_b, counts)


def _group_forward(x: torch.Tensor, group: int, row_counts: list[int], members: list[int], weights: SlotWeights,
                   cache: DequantCache | None) -> torch.Tensor:
    """Unweighted outputs ``[S, H]`` of one group for its pairs ``x [S, H]`` sorted by row;
    ``row_counts [n_g]`` pairs per row, ``members [n_g]`` slot id of each row."""
    dtype, g, kind = x.dtype, weights.groups[group], scheme_kind(weights.schemes[group])
    rows = [r for r, c in enumerate(row_counts) if c]
    counts = [row_counts[r] for r in rows]
    slots = [members[r] for r in rows]
    if kind == "int8" and cache is None:
        return _int8_group(x, g, rows, counts, weights, slots, activation_fn(weights.act), dtype)
    if kind == "float" and g["gate_up"].dtype == dtype:
        hi = rows[-1] + 1  # a view of rows [0, hi): unused rows below hi cost an empty group, no copy
        gu, dn, counts, slots = g["gate_up"][:hi], g["down"][:hi], row_counts[:hi], members[:hi]
    elif kind == "float":
        gu, dn = g["gate_up"][rows].to(dtype), g["down"][rows].to(dtype)
    elif cache is not None:
        gu, dn = cache.get(weights, group, rows, dtype)
    else:
        gu, dn = weights.dequantize_rows(group, torch.tensor(rows, device=x.device), dtype)
    return grouped_expert_forward(x, counts, gu, dn, weights.act, _bias_rows(weights.gate_up_bias, slots, dtype),
                                  _bias_rows(weights.down_bias, slots, dtype))


def moe_experts_cpu(x: torch.Tensor, topk_weights: torch.Tensor, slot_ids: torch.Tensor, weights: SlotWeights,
                    cache: DequantCache | None = None) -> torch.Tensor:
    """``x [T, H]``, ``topk_weights [T, K]``, physical (or compute) slot of every pair ``slot_ids
    [T, K]`` in [0, P) -> ``y [T, H]`` in ``x.dtype`` (fp32 combine in k order, as the reference)."""
    T, K = slot_ids.shape
    M, P = T * K, weights.num_slots
    out = torch.zeros(M, weights.hidden_size, dtype=torch.float32, device=x.device)
    if M == 0:
        return out.view(T, K, weights.hidden_size).sum(1).to(x.dtype)
    n_groups = len(weights.groups)
    sizes = [g["gate_up"].shape[0] for g in weights.groups]
    group_start = torch.tensor([0] + sizes[:-1], device=x.device).cumsum(0)
    rank = group_start[weights.slot_scheme] + weights.slot_index  # [P]: position in group-then-row order
    flat_rank = rank[slot_ids.reshape(-1)]
    pairs = torch.sort(flat_rank, stable=True).indices
    counts = torch.bincount(flat_rank, minlength=P).tolist()
    members = torch.empty(P, dtype=torch.int64)
    members[rank.cpu()] = torch.arange(P)
    members = members.tolist()
    pair_w = topk_weights.reshape(-1).float()
    start = pos = 0
    for group in range(n_groups):
        row_counts = counts[start:start + sizes[group]]
        n = sum(row_counts)
        if n:
            ids = pairs[pos:pos + n]
            y = _group_forward(x[ids // K], group, row_counts, members[start:start + sizes[group]], weights, cache)
            out[ids] = y.float() * pair_w[ids, None]
        start, pos = start + sizes[group], pos + n
    return out.view(T, K, weights.hidden_size).sum(1).to(x.dtype)

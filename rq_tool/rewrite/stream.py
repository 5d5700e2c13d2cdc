"""The streaming pass of a rewrite: every output tensor planned from the headers, then written.

Legend: E logical experts, P physical slots of a layer, n_g slots of one scheme group, H hidden, I
expert intermediate size.

1. ``plan_steps`` (headers only): the stored tensors in shard order. A non-expert tensor is copied
   as stored (renamed to the runtime's key; a quantized source's weights and scales byte for byte);
   a layer's slot tensors follow its last expert tensor. ``output_entries`` turns the steps into the
   list of output tensors (key, dtype, shape), so ``ShardWriter`` writes each header first and
   hashes while it writes.
2. ``write_steps``: the same steps with data. A slot kept in the source scheme is written straight
   from the source file (``FileSpan``: sendfile, page cache to page cache; no stacking), and so is an FP8 source's expert
   kept as an ``fp8`` slot (its float8 bytes; its block scales as fp32); a quantized (or converted) slot
   matrix, and a quantized source's expert (dequantized on demand), is a callable that the writer
   runs on its worker pool a few chunks ahead of the write (replicas of an expert in one scheme
   share one result). The writer thread writes and a hash thread hashes while the caller reads on:
   disk and both cores overlap, and memory holds a window of chunks plus the queued bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..checkpoint import DTYPES, FileSpan
from ..errors import RQError
from ..kernels.slots import group_shapes, scheme_kind
from ..quant import get_scheme
from ..runtime.experts import slot_tensor_dtype
from ..runtime.routing_map import LayerMap, RoutingMap
from .assemble import LayerAssembler, resolve
from .layout import ExpertLayout
from .shards import Entry, ShardWriter
from ..source import SourceCheckpoint


@dataclass(frozen=True)
class Step:
    """``copy`` a stored tensor, feed an ``expert`` (logical) tensor to its layer, or write a ``layer``."""

    kind: str
    key: str | None = None
    layer: int | None = None


def plan_steps(ckpt: SourceCheckpoint, family, layout: ExpertLayout) -> tuple[list[Step], dict[int, set[str]]]:
    """``(steps, expected logical expert keys per layer)`` from the headers, in stored shard order."""
    expected: dict[int, set[str]] = {layer: set() for layer in layout.layers}
    for key in ckpt.tensors:
        ek = family.parse_expert_key(key)
        if ek is not None:
            expected[ek.layer].add(key)
    remaining = {layer: set(keys) for layer, keys in expected.items()}
    steps = []
    for keys in ckpt.keys_by_shard().values():
        for key in keys:
            lkey = ckpt.logical_key(key)
            ek = None if lkey is None else family.parse_expert_key(lkey)
            if ek is None:
                steps.append(Step("copy", key))
            elif key == ckpt.tensors[lkey].stored.primary:  # a scale is read together with its weight
                steps.append(Step("expert", lkey, ek.layer))
                remaining[ek.layer].discard(lkey)
                if not remaining[ek.layer]:
                    steps.append(Step("layer", layer=ek.layer))
    incomplete = sorted(layer for layer, keys in remaining.items() if keys)
    if incomplete:
        raise RQError(f"layers {incomplete}: expert tensors incomplete on disk")
    return steps, expected


def _slot_prefix(family, layout: ExpertLayout, layer: int) -> str:
    return family.runtime_key(layout.block_prefix[layer] + ".experts.")


def _groups(lmap: LayerMap) -> list[tuple[str, list[int]]]:
    """``[(scheme, logical expert of each slot of the group)]`` in first-use order (slot format v1)."""
    out: dict[str, list[int]] = {}
    for p, scheme in enumerate(lmap.slot_scheme):
        out.setdefault(scheme, []).append(int(lmap.phy2log[p]))
    return list(out.items())


def _bias_dtype(ckpt: SourceCheckpoint, family, keys: set[str]) -> torch.dtype | None:
    for key in sorted(keys):
        if family.parse_expert_key(key).role.endswith("_bias"):
            return DTYPES[ckpt.tensors[key].dtype][0]
    return None


def _group_tensors(scheme: str, n: int, H: int, I: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``[(matrix, stored name, shape)]`` of one scheme group in write order: each matrix's data,
    then its scales (slot format v1, ``rq_tool.kernels.slots.group_shapes``)."""
    shapes = group_shapes(scheme, n, H, I)
    return [(mat, name, shapes[name]) for mat in ("gate_up", "down") for name in shapes
            if name == mat or name.startswith(mat + "_")]


def layer_entries(prefix: str, lmap: LayerMap, layout: ExpertLayout, bias_dtype: torch.dtype | None) -> list[Entry]:
    """The slot tensors of one layer, in the order ``write_layer`` writes them."""
    H, I, out = layout.hidden_size, layout.intermediate_size, []
    for scheme, ids in _groups(lmap):
        for _, name, shape in _group_tensors(scheme, len(ids), H, I):
            out.append(Entry(f"{prefix}{scheme}_{name}", slot_tensor_dtype(scheme, name, None), shape))
    if layout.has_bias:
        out.append(Entry(prefix + "gate_up_bias", bias_dtype, (lmap.num_slots, 2 * I)))
        out.append(Entry(prefix + "down_bias", bias_dtype, (lmap.num_slots, H)))
    return out


def output_entries(steps: list[Step], expected, ckpt: SourceCheckpoint, family, layout: ExpertLayout,
                   rmap: RoutingMap) -> list[Entry]:
    out = []
    for step in steps:
        if step.kind == "copy":
            info = ckpt.stored[step.key]  # every header dtype is one rq reads (rq_tool.checkpoint.read_header)
            out.append(Entry(family.runtime_key(step.key), DTYPES[info.dtype][0], tuple(info.shape)))
        elif step.kind == "layer":
            out += layer_entries(_slot_prefix(family, layout, step.layer), rmap.layer(step.layer), layout,
                                 _bias_dtype(ckpt, family, expected[step.layer]))
    return out


def write_steps(steps: list[Step], expected, ckpt: SourceCheckpoint, family, layout: ExpertLayout,
                rmap: RoutingMap, writer: ShardWriter, bar=None) -> None:
    """Read, transform and queue every planned tensor (see the module docstring)."""
    assemblers = {layer: LayerAssembler(layer, keys, family, layout.num_experts) for layer, keys in expected.items()}
    spans: dict[int, dict[int, FileSpan]] = {layer: {} for layer in expected}  # id(stored tensor) -> its span
    quant = ckpt.quant
    with ckpt.reader() as rd:
        for step in steps:
            if step.kind == "copy":
                writer.add(family.runtime_key(step.key), rd.span(step.key))
                if bar is not None:
                    bar.update(1)
            elif step.kind == "expert":
                st = ckpt.tensors[step.key].stored
                stored = {role: rd.span(k) for role, k in st.parts.items()}
                parts = {role: sp.tensor for role, sp in stored.items()}  # memory-mapped views
                spans[step.layer].update((id(sp.tensor), sp) for sp in stored.values())
                value = parts["w"] if st.method is None else StoredExpert(quant, st, parts)
                assemblers[step.layer].add(step.key, family.parse_expert_key(step.key), value)
                if bar is not None:
                    bar.update(len(parts))
            else:
                asm = assemblers.pop(step.layer)
                write_layer(writer, _slot_prefix(family, layout, step.layer), rmap.layer(step.layer), layout, asm,
                            spans.pop(step.layer))


class StoredExpert:
    """A quantized source's expert tensor: its stored parts (memory-mapped), dequantized when called."""

    def __init__(self, quant, st, parts: dict[str, torch.Tensor]):
        self.quant, self.st, self.parts = quant, st, parts

    def __call__(self) -> torch.Tensor:
        return self.quant.dequantize(self.st, self.parts)


def _fp8_scale(row: StoredExpert) -> torch.Tensor:
    from ..quant.sources import fp8_scale_float

    return fp8_scale_float(row.parts["scale_inv"])


def _cat(rows) -> torch.Tensor:
    rows = [resolve(r) for r in rows]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


class _Memo:
    """One matrix's stored tensors, computed once on first use (thread-safe), handed out by name;
    a tensor is dropped after its last use. The slot format stores a group's data before its
    scales, so between the two only the (small) scales of the group are held."""

    def __init__(self, fn, uses: int, names: tuple[str, ...]):
        self._fn, self._lock, self._val = fn, threading.Lock(), None
        self._uses = dict.fromkeys(names, uses)

    def part(self, name: str) -> torch.Tensor:
        with self._lock:
            if self._val is None:
                self._val = self._fn()
            t = self._val[name]
            self._uses[name] -= 1
            if not self._uses[name]:
                del self._val[name]
            return t


def _lazy(x, spans: dict[int, FileSpan]):
    """A writer chunk: a stored tensor as its ``FileSpan`` (copied file to file), another tensor as
    is, anything lazy as a callable the writer resolves in order."""
    if isinstance(x, torch.Tensor):
        span = spans.get(id(x))
        return span if span is not None and span.tensor is x else x
    return lambda: resolve(x)


def write_layer(writer: ShardWriter, prefix: str, lmap: LayerMap, layout: ExpertLayout, asm: LayerAssembler,
                spans: dict[int, FileSpan] | None = None) -> None:
    """Queue one layer's slot tensors (the order of ``layer_entries``). Nothing is computed here:
    quantized (or converted) matrices are callables the writer runs on its worker pool, a few
    chunks ahead of the write, so memory holds a window of them, not the layer. ``spans``: the
    layer's stored tensors (by ``id``) as file spans: a slot kept as stored is copied file to file."""
    spans = spans or {}
    asm.check()
    experts = [asm.expert(e) for e in range(layout.num_experts)]
    for scheme, ids in _groups(lmap):
        kind = scheme_kind(scheme)
        if kind == "float" and scheme == layout.source_scheme:  # the source's own bytes, slot by slot
            for mat in ("gate_up", "down"):
                writer.add(f"{prefix}{scheme}_{mat}", [_lazy(r, spans) for e in ids for r in experts[e][mat]])
            continue
        if scheme == "fp8" and layout.fp8_kept:  # an FP8 source's own float8 bytes; its block scales as fp32
            for mat in ("gate_up", "down"):
                writer.add(f"{prefix}fp8_{mat}", [_lazy(r.parts["q"], spans) for e in ids for r in experts[e][mat]])
                rows = [r for e in ids for r in experts[e][mat]]  # one chunk: the whole (small) scale grid
                writer.add(f"{prefix}fp8_{mat}_scale_inv", lambda rows=rows: torch.cat([_fp8_scale(r) for r in rows]))
            continue
        uses = {e: ids.count(e) for e in dict.fromkeys(ids)}
        sch = get_scheme(scheme)  # quantize() -> {"w"} (float) or {"q", "scale" | "absmax"}
        fn = (lambda rows, sch=sch: sch.quantize(_cat(rows)))
        tensors = _group_tensors(scheme, len(ids), layout.hidden_size, layout.intermediate_size)
        for mat in ("gate_up", "down"):
            # stored name -> the quantize() output it is made of
            parts = {name: ("w" if kind == "float" else "q") if name == mat else name[len(mat) + 1:]
                     for m, name, _ in tensors if m == mat}
            memo = {e: _Memo(lambda rows=experts[e][mat], fn=fn: fn(rows), n, tuple(parts.values()))
                    for e, n in uses.items()}
            for name, part in parts.items():
                writer.add(f"{prefix}{scheme}_{name}", [lambda m=memo[e], part=part: m.part(part) for e in ids])
    if layout.has_bias:
        for name in ("gate_up_bias", "down_bias"):
            writer.add(prefix + name, [_lazy(r, spans) for e in lmap.phy2log.tolist() for r in experts[e][name]])

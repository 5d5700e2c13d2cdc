"""Per-expert statistics recorded during calibration forwards.

One owner, ``ExpertRecorder``, instruments every MoE block of a model for the duration of a
``with`` block and always restores it. The experts module's forward is swapped for an
instrumented eager implementation (the same math as transformers' eager experts path) that,
per logical expert e of each MoE layer, accumulates:

- ``load[e]``: routed token-slots; ``gate_mass[e]``: sum of routing weights;
- ``output_energy[e]``: sum over routed tokens of ``w * ||y||`` and ``output_power[e]``:
  ``sum w^2 ||y||^2`` (the signal that quantization noise is measured against);
- ``quant_error[s][e]``: ``sum w^2 ||y - y_s||^2`` where ``y_s`` uses the expert's weights after
  a round trip through scheme ``s`` -- what quantizing e would add to the layer output. Both
  ``y`` and ``y_s`` are computed in fp32 so the storage dtype's rounding does not mask int8 error;
- ``seq_load [N, E]``: load per row: a calibration sequence, or a chunk of one (``batch_size`` rows per forward).

Routing is untouched: the ids and weights are exactly what the family's router produced.
Shared experts get a forward hook recording their token count and output energy.
Legend: T tokens in a forward (B sequences x S positions), K top-k, E experts, H hidden.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import MoEFamily
from ..arch.activation import grouped_expert_forward
from ..quant import get_scheme


@dataclass
class LayerStats:
    layer: int
    num_experts: int
    schemes: tuple[str, ...]
    load: torch.Tensor = None
    gate_mass: torch.Tensor = None
    output_energy: torch.Tensor = None
    output_power: torch.Tensor = None
    quant_error: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_load: list[torch.Tensor] = field(default_factory=list)
    shared_tokens: int = 0
    shared_energy: float = 0.0
    has_shared: bool = False

    def __post_init__(self):
        E = self.num_experts
        self.load = torch.zeros(E, dtype=torch.int64)
        self.gate_mass = torch.zeros(E, dtype=torch.float64)
        self.output_energy = torch.zeros(E, dtype=torch.float64)
        self.output_power = torch.zeros(E, dtype=torch.float64)
        self.quant_error = {s: torch.zeros(E, dtype=torch.float64) for s in self.schemes}


class ExpertRecorder:
    """Context manager that instruments ``model``'s MoE blocks and collects ``LayerStats``."""

    def __init__(self, model: nn.Module, family: MoEFamily, schemes=(), quant_error: bool = True):
        self.model = model
        self.family = family
        self.schemes = tuple(schemes) if quant_error else ()
        self.act = family.activation(model.config)
        self.blocks = family.moe_blocks(model)
        self.stats: list[LayerStats] = []
        self.batch_size = 1  # sequences in the current forward; set by the runner
        self._patched: list[tuple[nn.Module, str, object]] = []  # (module, attribute, original or None)
        self._hooks = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ExpertRecorder":
        try:
            for layer, block in self.blocks:
                experts = block.experts
                st = LayerStats(layer, self._num_experts(experts), self.schemes)
                st.has_shared = bool(self.family.shared_modules(block))
                self.stats.append(st)
                # accelerate's big-model offload (device_map with disk/cpu offload) wraps forward
                # in a hook that materialises the weights for the call: patch the inner forward
                # and read the weights at call time instead of caching them.
                offloaded = hasattr(experts, "_hf_hook") and hasattr(experts, "_old_forward")
                weights = self._weights_fn(experts, cache=not offloaded)
                fwd = types.MethodType(self._make_forward(st, weights), experts)
                if offloaded:
                    self._patched.append((experts, "_old_forward", experts._old_forward))
                    experts._old_forward = fwd
                else:
                    self._patched.append((experts, "forward", None))
                    experts.forward = fwd
                for shared in self.family.shared_modules(block):
                    self._hooks.append(shared.register_forward_hook(self._make_shared_hook(st)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for experts, attr, original in self._patched:
            if original is None:
                experts.__dict__.pop(attr, None)
            else:
                setattr(experts, attr, original)
        for h in self._hooks:
            h.remove()
        self._patched.clear()
        self._hooks.clear()

    def _num_experts(self, experts) -> int:
        return int(self.family.canonical_experts(experts)["gate_up"].shape[0])

    def _weights_fn(self, experts, cache: bool):
        """``module -> (weights, quantized, f32)``: canonical weights (contiguous), their
        quantize/dequantize round trips per scheme and fp32 copies (the latter two only when
        measuring quant_error); cached for in-memory models, rebuilt per call when offloaded."""
        def build(module):
            weights = {k: v.detach().contiguous() for k, v in self.family.canonical_experts(module).items()}
            quantized = self._quantized_weights(weights) if self.schemes else {}
            f32 = {k: v.float() for k, v in weights.items()} if quantized else {}
            return weights, quantized, f32

        if not cache:
            return build
        built = build(experts)
        return lambda module: built

    # ------------------------------------------------------------------ internals
    def _quantized_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Per scheme: the canonical matrices after a quantize/dequantize round trip (fp32)."""
        out = {}
        for s in self.schemes:
            scheme = get_scheme(s)
            out[s] = {
                name: torch.stack([scheme.roundtrip(w) for w in weights[name]])
                for name in ("gate_up", "down")
            }
        return out

    def _make_forward(self, st: LayerStats, weights_fn):
        act = self.act
        recorder = self

        def forward(module, hidden_states, top_k_index, top_k_weights):
            shape = hidden_states.shape  # [T, H], or [B, S, H] where the family passes it unflattened (DBRX)
            hidden_states = hidden_states.reshape(-1, shape[-1])
            top_k_index, top_k_weights = top_k_index.reshape(-1, top_k_index.shape[-1]), top_k_weights.reshape(
                -1, top_k_weights.shape[-1])
            weights, quantized, f32 = weights_fn(module)
            bias_up, bias_down = weights.get("gate_up_bias"), weights.get("down_bias")
            T, K = top_k_index.shape
            E = st.num_experts
            flat = top_k_index.reshape(-1)
            w_flat = top_k_weights.reshape(-1)
            counts_t = torch.bincount(flat, minlength=E)
            st.load += counts_t.cpu()
            st.gate_mass += torch.zeros(E, dtype=torch.float64, device=flat.device).scatter_add_(
                0, flat, w_flat.double()).cpu()
            B = recorder.batch_size if T % max(recorder.batch_size, 1) == 0 else 1
            seq = torch.arange(T * K, device=flat.device) // (T * K // B)
            st.seq_load.append(torch.zeros(B * E, dtype=torch.int64, device=flat.device).scatter_add_(
                0, seq * E + flat, torch.ones_like(flat)).view(B, E).cpu())

            # pairs grouped by expert; one grouped matmul per projection for all experts
            order = torch.argsort(flat, stable=True)
            counts = counts_t.tolist()
            ids = flat[order]
            tok = order // K
            x = hidden_states[tok]
            w = w_flat[order]
            y = grouped_expert_forward(x, counts, weights["gate_up"], weights["down"], act, bias_up, bias_down)
            wd = w.double()
            ny = y.double().norm(dim=-1)
            zeros = torch.zeros(E, dtype=torch.float64, device=flat.device)
            st.output_energy += zeros.scatter_add(0, ids, wd * ny).cpu()
            if quantized:
                x32 = x.float()
                bu, bd = f32.get("gate_up_bias"), f32.get("down_bias")
                y32 = grouped_expert_forward(x32, counts, f32["gate_up"], f32["down"], act, bu, bd)
                st.output_power += zeros.scatter_add(0, ids, wd.square() * y32.double().square().sum(-1)).cpu()
                for s, qw in quantized.items():
                    yq = grouped_expert_forward(x32, counts, qw["gate_up"], qw["down"], act, bu, bd)
                    err = (y32 - yq).double().square().sum(-1)
                    st.quant_error[s] += zeros.scatter_add(0, ids, wd.square() * err).cpu()
            else:
                st.output_power += zeros.scatter_add(0, ids, wd.square() * ny.square()).cpu()
            out = torch.zeros_like(hidden_states)
            out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))  # same promotion as eager
            return out.view(shape)

        return forward

    @staticmethod
    def _make_shared_hook(st: LayerStats):
        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            y = y.reshape(-1, y.shape[-1])
            st.shared_tokens += int(y.shape[0])
            st.shared_energy += float(y.double().norm(dim=-1).sum())

        return hook

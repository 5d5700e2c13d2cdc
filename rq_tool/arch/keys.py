"""On-disk checkpoint key names, read from transformers' own conversion mapping.

transformers loads a checkpoint by renaming keys (``WeightRenaming``) and merging per-expert
tensors into the fused runtime parameters (``WeightConverter``, e.g. Qwen2-MoE's
``mlp.experts.*.gate_proj.weight`` + ``mlp.experts.*.up_proj.weight`` -> ``mlp.experts.gate_up_proj``
with ``MergeModulelist(dim=0), Concatenate(dim=1)``); ``save_pretrained`` writes the reverse.
rq runs the same forward renaming (``transformers.core_model_loading.rename_source_key``) on
each key it reads, so a family's on-disk names are data in transformers, not code in rq.

``KeyMap.classify(key)`` says what an on-disk key is:

- a routed-expert tensor -> ``(runtime experts path, role, expert or None, tensor)``: per-expert
  keys merged by a converter (role from the converter's source position: gate / up, or the
  target's: gate_up / up / down), or fused keys renamed onto ``<experts>.gate_up_proj`` etc.;
  ``tensor`` is ``"weight"``/``"bias"``, or the suffix of a quantization side tensor
  (``"weight_scale_inv"``, ``"blocks"``, ``"scales"``) of that weight;
- anything else -> its runtime key (``KeyMap.runtime_key``).

Converter operations other than ``MergeModulelist(dim=0)`` (+ ``Concatenate`` on the 2I axis)
on expert keys, and any converter on a non-expert key, raise RQError naming the key: rq does not
silently write a tensor transformers would have reshaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RQError

_FUSED_ROLES = {"gate_up_proj": "gate_up", "down_proj": "down", "up_proj": "up", "gate_up_proj_bias": "gate_up_bias",
                "down_proj_bias": "down_bias", "up_proj_bias": "up_bias"}
# quantization side tensors of a fused parameter (gpt-oss MXFP4, FP8 block scales)
_FUSED_QUANT = re.compile(r"^(?P<param>gate_up_proj|down_proj|up_proj)(?:_(?P<q>blocks|scales|scale_inv|scale))$")
_PER_EXPERT = re.compile(r"\.experts\.(?P<e>\d+)\.(?P<part>[A-Za-z0-9_]+)\.(?P<tensor>[A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class ClassifiedKey:
    experts_path: str  # runtime module path of the experts, e.g. "model.layers.3.mlp.experts"
    role: str  # gate | up | down | gate_up | gate_up_bias | down_bias | up_bias
    expert: int | None  # None for fused [E, ...] tensors
    tensor: str = "weight"  # weight | bias | a quantization side tensor's suffix


class KeyMap:
    """Disk key <-> runtime key for one model, from ``get_model_conversion_mapping(model)``.

    ``model``: the CausalLM (a meta-device instance is enough); ``experts_paths``: runtime paths
    of its routed experts modules; ``concat_dim``: the 2I axis of the runtime ``gate_up_proj``
    (1, or 2 when transposed) that a gate/up ``Concatenate`` must use.
    """

    def __init__(self, model, experts_paths: set[str], concat_dim: int = 1):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model, add_legacy=False)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.experts_paths = experts_paths
        self.concat_dim = concat_dim
        self.base_model_prefix = getattr(model, "base_model_prefix", "") or ""
        self.state_keys = set(model.state_dict().keys())

    # ------------------------------------------------------------------ renaming
    def _renamed(self, key: str) -> tuple[str, object, str | None]:
        """Renamings, then at most one converter (transformers' order): ``(key, converter, pattern)``."""
        from transformers.core_model_loading import apply_renamings

        renamed = apply_renamings(key, self.renamings)
        for conv in self.converters:
            out, pattern = conv.rename_source_key(renamed)
            if pattern is not None:
                return self._prefix(out), conv, pattern
        return self._prefix(renamed), None, None

    def _prefix(self, key: str) -> str:
        """Add or strip ``base_model_prefix`` the way transformers does when loading."""
        p = self.base_model_prefix
        if not p or key in self.state_keys:
            return key
        if key.startswith(p + ".") and key[len(p) + 1:] in self.state_keys:
            return key[len(p) + 1:]
        if f"{p}.{key}" in self.state_keys:
            return f"{p}.{key}"
        return key

    def runtime_key(self, key: str) -> str:
        """A non-expert on-disk key -> the runtime state-dict key; runtime keys map to themselves."""
        if key in self.state_keys or (key.endswith(".experts.") and key[:-1] in self.experts_paths):
            return key
        out, conv, pattern = self._renamed(key)
        if conv is not None:
            ops = ", ".join(type(o).__name__ for o in getattr(conv, "operations", ()))
            raise RQError(f"checkpoint key {key!r} needs transformers' conversion ({ops}) to become {out!r}; "
                          "rq copies non-expert tensors unchanged and cannot rewrite this checkpoint")
        return out

    def non_expert_conversions(self) -> list[str]:
        """``"<ops> -> <target>"`` for converters that reshape non-expert tensors of this model on
        load (rq copies those unchanged, so such a model cannot be rewritten yet)."""
        out = []
        other = [k for k in self.state_keys if not any(k.startswith(p + ".") for p in self.experts_paths)]
        for conv in self.converters:
            for tgt in conv.target_patterns:
                plain = tgt.lstrip("^").replace("\\", "").replace("*", "")
                if plain and any(plain in k for k in other):
                    ops = ", ".join(type(o).__name__ for o in getattr(conv, "operations", ()))
                    out.append(f"{ops} -> {plain}")
                    break
        return out

    # ------------------------------------------------------------------ experts
    def classify(self, key: str) -> ClassifiedKey | None:
        out, conv, pattern = self._renamed(key)
        owner, _, leaf = out.rpartition(".")
        if conv is not None:
            if owner not in self.experts_paths:
                return None  # a converter on a non-expert key: runtime_key reports it
            return self._per_expert(key, owner, leaf, conv, pattern)
        if owner in self.experts_paths:
            if leaf in _FUSED_ROLES:
                role = _FUSED_ROLES[leaf]
                return ClassifiedKey(owner, role, None, "bias" if role.endswith("_bias") else "weight")
            m = _FUSED_QUANT.match(leaf)
            if m:
                return ClassifiedKey(owner, _FUSED_ROLES[m["param"]], None, m["q"])
            return None
        # a quantization side tensor of a per-expert weight (e.g. gate_proj.weight_scale_inv): the
        # converters match the weight's name only, so classify the weight's key and keep the suffix
        m = _PER_EXPERT.search(key)
        if m and m["tensor"] not in ("weight", "bias"):
            base = self.classify(key[: m.start("tensor")] + "weight")
            if base is not None and base.expert is not None:
                return ClassifiedKey(base.experts_path, base.role, base.expert, m["tensor"])
        return None

    def _per_expert(self, key: str, owner: str, leaf: str, conv, pattern: str) -> ClassifiedKey:
        m = _PER_EXPERT.search(key)
        if m is None:
            raise RQError(f"checkpoint key {key!r}: cannot find the expert index (expected '.experts.<e>.')")
        ops = [type(o).__name__ for o in getattr(conv, "operations", ())]
        sources = list(conv.source_patterns)
        target = _FUSED_ROLES.get(leaf)
        merge_ok = ops and ops[0] == "MergeModulelist" and conv.operations[0].dim == 0
        if target is None or not merge_ok:
            raise RQError(f"checkpoint key {key!r}: transformers converts it with {ops or 'no operation'} into "
                          f"{leaf!r}, a layout rq does not read")
        if ops == ["MergeModulelist"] and len(sources) == 1:
            role = target
        elif ops == ["MergeModulelist", "Concatenate"] and len(sources) == 2 and target == "gate_up":
            if conv.operations[1].dim != self.concat_dim:
                raise RQError(f"checkpoint key {key!r}: gate/up concatenated on dim {conv.operations[1].dim}, "
                              f"the runtime's 2I axis is {self.concat_dim}")
            role = ("gate", "up")[sources.index(pattern)]
        else:
            raise RQError(f"checkpoint key {key!r}: transformers converts it with {ops} from {len(sources)} "
                          "sources, a layout rq does not read")
        tensor = m["tensor"]
        if tensor == "bias":
            role = f"{role}_bias"
        return ClassifiedKey(owner, role, int(m["e"]), tensor)

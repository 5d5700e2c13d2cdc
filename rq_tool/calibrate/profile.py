"""profile.json: the versioned, human-readable result of ``rq calibrate``.

Layout (format ``rq-profile``, version 2; version 1 = the same without ``loads``)::

    {"format": "rq-profile", "version": 2, "rq_version": "...",
     "model": {"path", "model_type", "family", "config_sha256", "num_experts", "top_k",
               "num_hidden_layers", "moe_layers", "expert_dtype", "activation", "layout"},
     "calibration": {"dataset", "sha256", "texts", "sequences", "seq_len", "tokens", "batch_size", "seed",
                     "texts_used", "source": {"spec", "kind", "path", "config", "split", "text_field"}},
     "schemes": ["int8", "nf4"],
     "layers": [{"layer": 3, "load": [E], "gate_mass": [E], "output_energy": [E],
                 "output_power": [E], "quant_error": {"int8": [E], ...}, "lis": 1.7,
                 "lis_by_batch": {"1": {"mean", "max", "batches"}, ...},
                 "shared": null | {"tokens", "output_energy"}}]}

     "loads": null | {"file": "profile.loads.safetensors", "sha256": "...", "shape": [N, L, E],
               "unit": "sequence" | "chunk", "tokens_per_sequence": S, "tokens_per_row": S | C,
               "domains": null | ["code", ...]}}

``calibration.texts_used`` / ``source`` (optional, written since issue 15): how many of the shuffled
texts gave the tokens and where the data is (``rq_tool.calibrate.data.source_record``), so ``rq eval``
can score the source's unused texts as held-out data (``rq_tool.eval.heldout``).

``model.layout`` (optional, written since issue 15; null where rq rewrite cannot read the checkpoint):
the checkpoint's routed-expert layout (``rq_tool.rewrite.layout.layout_record``) under the config.json
identity, safetensors headers and rq / transformers versions it was read with; ``rq rewrite --dry-run``
plans from it when all four still match, without building the model.

``layer`` is the absolute decoder-layer index (dense layers are simply absent); ``moe_layers``
(optional, written since issue 11) lists the model's MoE layers, so a profile missing one is refused
instead of being exported as a dense layer.

The distribution behind the pooled loads (v2): ``loads [N, L, E]`` int64, the routed token-slots
of every calibration sequence (with ``calibration.chunk_tokens`` C, written since issue 13 by
``rq calibrate --chunk-tokens C``: of every C-token chunk, S / C rows per sequence in order), and
when the calibration texts carry domain tags ``domain [N]`` int64 (index into ``loads.domains``:
each row's majority domain by tokens), in a safetensors file beside profile.json, referenced by
name and sha256 (a changed file is refused; a missing one,
e.g. a profile copied without it, loads with ``seq_loads = None``: pooled loads only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, defaults
from ..errors import RQError, check_format, read_json
from ..lis import lis

_FORMAT, _VERSION = defaults.PROFILE_FORMAT
# keys of a config that do not change the model's math or identity. ``quantization_config`` describes
# how the weights are stored, and transformers rewrites (or drops) it when it loads a quantized
# checkpoint, so the model calibrated and the checkpoint rewritten would otherwise hash apart.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "rq", "auto_map", "architectures", "dtype",
                         "torch_dtype", "output_router_logits", "use_cache", "_experts_implementation",
                         "experts_implementation", "_attn_implementation_autoset", "quantization_config")


def config_fingerprint(config) -> str:
    """sha256 of a model config's identity (volatile keys removed), as a hex string."""
    d = config if isinstance(config, dict) else config.to_dict()
    return hashlib.sha256(json.dumps(_identity(d), sort_keys=True, default=str).encode()).hexdigest()


def _identity(d):
    """Volatile keys removed at every level (sub-configs such as DBRX's ffn_config carry a dtype too)."""
    if isinstance(d, dict):
        return {k: _identity(v) for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return d


@dataclass
class LayerProfile:
    layer: int
    load: torch.Tensor  # [E] int64
    gate_mass: torch.Tensor  # [E] float64
    output_energy: torch.Tensor  # [E] float64
    output_power: torch.Tensor  # [E] float64
    quant_error: dict[str, torch.Tensor]  # scheme -> [E] float64
    lis_by_batch: dict[int, dict[str, float]]
    shared: dict | None = None

    @property
    def lis(self) -> float:
        return float(lis(self.load))


@dataclass
class Profile:
    model: dict
    calibration: dict
    schemes: list[str]
    layers: list[LayerProfile]
    seq_loads: torch.Tensor | None = None  # [N, L, E] int64 per calibration sequence, or chunk (v2)
    seq_domain: torch.Tensor | None = None  # [N] int64 index into ``domains``
    domains: list[str] | None = None
    loads_ref: dict | None = None  # the "loads" entry of the JSON, once saved or loaded

    # ------------------------------------------------------------------ views
    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

    @property
    def tokens_per_row(self) -> int:
        """Tokens behind one row of ``seq_loads``: ``chunk_tokens`` when calibrated per chunk, else
        one calibration sequence's (``seq_len``)."""
        return int(self.calibration.get("chunk_tokens") or self.calibration.get("seq_len") or 1)

    @property
    def rows_per_sequence(self) -> int:
        """Rows of ``seq_loads`` per calibration sequence (1 unless calibrated per chunk)."""
        return max(1, int(self.calibration.get("seq_len") or 1) // self.tokens_per_row)

    def load_matrix(self) -> torch.Tensor:
        """``[L, E]`` int64 loads of the MoE layers, in layer order."""
        return torch.stack([lp.load for lp in self.layers])

    def quant_error_tensor(self, schemes) -> torch.Tensor:
        """``[L, E, S]`` float64; a scheme the profile did not measure raises RQError."""
        missing = [s for s in schemes if s not in self.schemes]
        if missing:
            raise RQError(f"profile has no quant_error for {', '.join(missing)} (measured: {', '.join(self.schemes) or 'none'});"
                          " re-run rq calibrate with those schemes")
        return torch.stack([torch.stack([lp.quant_error[s] for s in schemes], -1) for lp in self.layers])

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = self._dict()
        d["loads"] = self.loads_ref
        return d

    def _dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "rq_version": __version__,
            "model": self.model,
            "calibration": self.calibration,
            "schemes": list(self.schemes),
            "layers": [
                {
                    "layer": lp.layer,
                    "lis": round(lp.lis, 6),
                    "load": lp.load.tolist(),
                    "gate_mass": [round(float(x), 6) for x in lp.gate_mass],
                    "output_energy": [float(f"{float(x):.8g}") for x in lp.output_energy],
                    "output_power": [float(f"{float(x):.8g}") for x in lp.output_power],
                    "quant_error": {s: [float(f"{float(x):.8g}") for x in v] for s, v in lp.quant_error.items()},
                    "lis_by_batch": {str(b): v for b, v in lp.lis_by_batch.items()},
                    "shared": lp.shared,
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "Profile":
        check_format(d, defaults.PROFILE_FORMAT, "profile", where, defaults.PROFILE_READABLE)
        _check_types(d, where)
        try:
            E = int(d["model"]["num_experts"])
            schemes = list(d["schemes"])
            layers = []
            for row in d["layers"]:
                lp = LayerProfile(
                    layer=int(row["layer"]),
                    load=torch.tensor(row["load"], dtype=torch.int64),
                    gate_mass=torch.tensor(row["gate_mass"], dtype=torch.float64),
                    output_energy=torch.tensor(row["output_energy"], dtype=torch.float64),
                    output_power=torch.tensor(row["output_power"], dtype=torch.float64),
                    quant_error={s: torch.tensor(row["quant_error"][s], dtype=torch.float64) for s in schemes},
                    lis_by_batch={int(b): v for b, v in row.get("lis_by_batch", {}).items()},
                    shared=row.get("shared"),
                )
                for name in ("load", "gate_mass", "output_energy", "output_power"):
                    if tuple(getattr(lp, name).shape) != (E,):
                        raise RQError(f"{where}: layer {lp.layer} {name} has shape {tuple(getattr(lp, name).shape)}, "
                                      f"expected ({E},)")
                for s, v in lp.quant_error.items():
                    if tuple(v.shape) != (E,):
                        raise RQError(f"{where}: layer {lp.layer} quant_error[{s}] has shape {tuple(v.shape)}, expected ({E},)")
                if (lp.load < 0).any():
                    raise RQError(f"{where}: layer {lp.layer} has negative loads")
                layers.append(lp)
        except (KeyError, TypeError, ValueError) as e:
            raise RQError(f"{where}: malformed profile ({type(e).__name__}: {e})") from None
        if not layers:
            raise RQError(f"{where}: profile has no MoE layers")
        ref = d.get("loads")
        if ref is not None and not (isinstance(ref, dict) and isinstance(ref.get("file"), str)
                                    and isinstance(ref.get("sha256"), str)):
            raise RQError(f"{where}: malformed 'loads' entry (expected file and sha256)")
        return cls(model=d["model"], calibration=d["calibration"], schemes=schemes, layers=layers, loads_ref=ref,
                   domains=None if ref is None else ref.get("domains"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path, kind=None, inputs=(), force: bool = False) -> None:
        """Write atomically (a unique temporary beside ``path`` + rename; concurrent saves never mix);
        per-sequence loads go to a safetensors file beside it, written first (the JSON names its hash).
        ``kind`` / ``inputs`` / ``force``: the output policy (``rq_tool.outputs``) that ``rq calibrate``
        applies; the library call without them applies none."""
        from ..outputs import staged, write_text

        path = Path(path)
        doc = self.to_dict()
        if self.seq_loads is not None:
            from safetensors.torch import save

            tensors = {"loads": self.seq_loads.to(torch.int64).contiguous()}
            if self.seq_domain is not None:
                tensors["domain"] = self.seq_domain.to(torch.int64).contiguous()
            # one metadata key: safetensors serialises the metadata map in hash order, so two keys
            # would make the bytes (and the sha256 the profile records) differ from run to run
            blob = save(tensors, metadata={"format": "rq-profile-loads/1"})
            name = (path.name[:-5] if path.name.endswith(".json") else path.name) + defaults.PROFILE_LOADS_SUFFIX
            if kind is not None:
                from ..outputs import check_output

                check_output(path, kind, inputs, force)  # before the loads file is written beside it
            with staged(path.with_name(name)) as tmp:
                tmp.write_bytes(blob)
            doc["loads"] = {"file": name, "sha256": hashlib.sha256(blob).hexdigest(),
                            "shape": list(self.seq_loads.shape),
                            "unit": "chunk" if self.rows_per_sequence > 1 else "sequence",
                            "tokens_per_sequence": self.calibration.get("seq_len"),
                            "tokens_per_row": self.tokens_per_row, "domains": self.domains}
        write_text(path, json.dumps(doc, indent=1) + "\n", kind, inputs, force)

    @classmethod
    def load(cls, path) -> "Profile":
        d = read_json(path, f"profile {str(path)!r} not found")
        prof = cls.from_dict(d, where=str(path))
        if prof.loads_ref is not None:
            prof._read_loads(Path(path).parent / prof.loads_ref["file"], str(path))
        return prof

    def _read_loads(self, file: Path, where: str) -> None:
        if not file.is_file():
            return  # e.g. a copy of profile.json without its loads file: pooled loads only
        blob = file.read_bytes()
        if hashlib.sha256(blob).hexdigest() != self.loads_ref["sha256"]:
            raise RQError(f"{where}: {file.name} does not match the sha256 the profile records (changed or damaged)")
        from safetensors.torch import load

        try:
            tensors = load(blob)
        except Exception as e:  # noqa: BLE001 -- a damaged safetensors file: name it
            raise RQError(f"{file}: not a readable safetensors file ({type(e).__name__})") from None
        loads = tensors.get("loads")
        L, E = len(self.layers), self.num_experts
        if loads is None or loads.dim() != 3 or tuple(loads.shape[1:]) != (L, E) or (loads < 0).any():
            raise RQError(f"{file}: 'loads' must be [N, {L}, {E}] non-negative counts")
        dom = tensors.get("domain")
        if dom is not None and (dom.shape != (loads.shape[0],) or self.domains is None
                                or (dom < 0).any() or (dom >= len(self.domains)).any()):
            raise RQError(f"{file}: 'domain' must hold [{loads.shape[0]}] indices into the profile's domains")
        self.seq_loads, self.seq_domain = loads.long(), None if dom is None else dom.long()

    def check_matches(self, config, where: str = "profile") -> None:
        """Raise RQError unless this profile was measured on a model with ``config``."""
        fp = config_fingerprint(config)
        if self.model.get("config_sha256") != fp:
            raise RQError(f"{where} was measured on another model (config hash {str(self.model.get('config_sha256'))[:12]} "
                          f"!= {fp[:12]}); re-run rq calibrate on this model")


def _check_types(d: dict, where: str) -> None:
    """JSON types, sizes and finiteness of a profile (one line naming the field), before tensors are built."""
    from .. import validate as v

    model = v.check_dict(v.get(d, "model", where), where, "model")
    E = v.check_int(v.get(model, "num_experts", where, "model"), where, "model.num_experts", 1, v.MAX_EXPERTS)
    for key in ("path", "model_type", "config_sha256", "family", "activation", "expert_dtype"):
        if model.get(key) is not None:
            v.check_str(model[key], where, f"model.{key}")
    for key in ("top_k", "num_hidden_layers"):
        if model.get(key) is not None:
            v.check_int(model[key], where, f"model.{key}", 1, v.MAX_LAYERS if key == "num_hidden_layers" else E)
    moe_layers = model.get("moe_layers")
    if moe_layers is not None:
        v.int_list(moe_layers, where, "model.moe_layers", 0, v.MAX_LAYERS)
    cal = v.check_dict(v.get(d, "calibration", where), where, "calibration")
    for key in ("seq_len", "chunk_tokens"):
        if cal.get(key) is not None:
            v.check_int(cal[key], where, f"calibration.{key}", 1, v.MAX_INT)
    if cal.get("chunk_tokens") is not None and (not isinstance(cal.get("seq_len"), int)
                                                or cal["seq_len"] % cal["chunk_tokens"]):
        raise RQError(f"{where}: calibration.chunk_tokens must divide calibration.seq_len")
    schemes = v.check_list(v.get(d, "schemes", where), where, "schemes", 16)
    for s in schemes:
        v.check_str(s, where, "schemes", 64)
    layers = v.check_list(v.get(d, "layers", where), where, "layers", v.MAX_LAYERS)
    seen = set()
    for i, row in enumerate(layers):
        at = f"layers[{i}]"
        layer = v.check_int(v.get(row, "layer", where, at), where, f"{at}.layer", 0, v.MAX_LAYERS)
        if layer in seen:
            raise RQError(f"{where}: {at}.layer: layer {layer} appears twice")
        seen.add(layer)
        n_layers = model.get("num_hidden_layers")
        if isinstance(n_layers, int) and layer >= n_layers:
            raise RQError(f"{where}: {at}.layer: {layer} is not below model.num_hidden_layers {n_layers}")
        v.int_list(v.get(row, "load", where, at), where, f"{at}.load", 0, v.MAX_INT >> 8, length=E)
        for key in ("gate_mass", "output_energy", "output_power"):
            v.number_list(v.get(row, key, where, at), where, f"{at}.{key}", length=E, lo=0.0)
        qe = v.check_dict(v.get(row, "quant_error", where, at), where, f"{at}.quant_error")
        for s in schemes:
            v.number_list(v.get(qe, s, where, f"{at}.quant_error"), where, f"{at}.quant_error.{s}", length=E, lo=0.0)
        lbb = row.get("lis_by_batch", {})
        v.check_dict(lbb, where, f"{at}.lis_by_batch")
        for b, stats in lbb.items():
            if not b.isdigit() or len(b) > 9:
                raise RQError(f"{where}: {at}.lis_by_batch: batch size {b[:20]!r} is not a positive integer")
            v.check_dict(stats, where, f"{at}.lis_by_batch.{b}")
            for k in ("mean", "max"):
                v.check_number(v.get(stats, k, where, f"{at}.lis_by_batch.{b}"), where, f"{at}.lis_by_batch.{b}.{k}", 0.0)
            if "batches" in stats:
                v.check_int(stats["batches"], where, f"{at}.lis_by_batch.{b}.batches")
        shared = row.get("shared")
        if shared is not None:
            v.check_dict(shared, where, f"{at}.shared")
    if moe_layers is not None and sorted(seen) != sorted(moe_layers):
        missing, extra = sorted(set(moe_layers) - seen), sorted(seen - set(moe_layers))
        raise RQError(f"{where}: layers: " + (f"MoE layer(s) {missing} of the model are missing" if missing else
                                                f"layer(s) {extra} are not MoE layers of the model") + " (model.moe_layers)")

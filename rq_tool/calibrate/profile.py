"""profile.json: the versioned, human-readable result of ``rq calibrate``.

Layout (format ``rq-profile``, version 1)::

    {"format": "rq-profile", "version": 1, "rq_version": "...",
     "model": {"path", "model_type", "family", "config_sha256", "num_experts", "top_k",
               "num_hidden_layers", "expert_dtype", "activation"},
     "calibration": {"dataset", "sha256", "sequences", "seq_len", "tokens", "batch_size", "seed"},
     "schemes": ["int8", "nf4"],
     "layers": [{"layer": 3, "load": [E], "gate_mass": [E], "output_energy": [E],
                 "output_power": [E], "quant_error": {"int8": [E], ...}, "lis": 1.7,
                 "lis_by_batch": {"1": {"mean", "max", "batches"}, ...},
                 "shared": null | {"tokens", "output_energy"}}]}

``layer`` is the absolute decoder-layer index (dense layers are simply absent).
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
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


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

    # ------------------------------------------------------------------ views
    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

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
        check_format(d, defaults.PROFILE_FORMAT, "profile", where)
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
        return cls(model=d["model"], calibration=d["calibration"], schemes=schemes, layers=layers)

    def save(self, path) -> None:
        """Write atomically (temporary file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "Profile":
        d = read_json(path, f"profile {str(path)!r} not found")
        return cls.from_dict(d, where=str(path))

    def check_matches(self, config, where: str = "profile") -> None:
        """Raise RQError unless this profile was measured on a model with ``config``."""
        fp = config_fingerprint(config)
        if self.model.get("config_sha256") != fp:
            raise RQError(f"{where} was measured on another model (config hash {str(self.model.get('config_sha256'))[:12]} "
                          f"!= {fp[:12]}); re-run rq calibrate on this model")

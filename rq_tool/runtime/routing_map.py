"""routing_map.json: logical expert -> physical replica slots, per MoE layer (validated, versioned).

Names follow DeepSeek's EPLB so serving engines' formats map onto it directly. Per layer::

    phy2log  [P]     logical expert of each physical slot (slots 0..E-1 are the originals)
    log2phy  [E, R]  physical slots of each logical expert, -1 padded, R = max replicas
    logcnt   [E]     number of replicas of each logical expert (>= 1)
    slot_scheme [P]  storage scheme name of each slot ("bf16", "int8", "nf4", ...)
    slot_device [P]  device (expert-parallel rank) of each slot, in [0, G); only with a placement

Version 2 adds the optional placement: top-level ``num_devices`` G and every layer's
``slot_device``, either both present or both absent. Version 1 maps (no placement) still load.

Split policies (``defaults.SPLIT_POLICIES``; the rule lives in ``rq_tool.kernels.split``):
``round-robin-by-occurrence``: the j-th routed token-slot (token order, then k) of logical expert e
in a batch goes to slot ``log2phy[e, j % logcnt[e]]``. ``load-aware``: per step, each expert's
pairs are water-filled over its replicas' devices so the busiest device is as light as possible
(needs the placement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import defaults
from ..errors import RQError, check_format
from ..quant import SCHEMES
from .. import validate as v

_FORMAT, _VERSION = defaults.ROUTING_MAP_FORMAT


@dataclass(frozen=True)
class LayerMap:
    layer: int
    phy2log: torch.Tensor  # [P] int64
    log2phy: torch.Tensor  # [E, R] int64
    logcnt: torch.Tensor  # [E] int64
    slot_scheme: tuple[str, ...]  # [P]
    slot_device: torch.Tensor | None = None  # [P] int64, with a placement

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.numel())

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "phy2log": self.phy2log.tolist(), "log2phy": self.log2phy.tolist(),
             "logcnt": self.logcnt.tolist(), "slot_scheme": list(self.slot_scheme)}
        if self.slot_device is not None:
            d["slot_device"] = self.slot_device.tolist()
        return d


@dataclass(frozen=True)
class RoutingMap:
    num_experts: int
    layers: list[LayerMap]
    source_scheme: str
    activation: str
    split_policy: str = defaults.SPLIT_POLICY
    num_devices: int | None = None  # G, with a placement (every layer has slot_device)

    def layer(self, index: int) -> LayerMap:
        for lm in self.layers:
            if lm.layer == index:
                return lm
        raise KeyError(index)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "split_policy": self.split_policy,
                "num_logical_experts": self.num_experts, "source_scheme": self.source_scheme,
                "activation": self.activation, "num_devices": self.num_devices,
                "layers": [lm.to_dict() for lm in self.layers]}

    @classmethod
    def from_dict(cls, d: dict, where: str = "routing map") -> "RoutingMap":
        check_format(d, defaults.ROUTING_MAP_FORMAT, "routing map", where, defaults.ROUTING_MAP_READABLE)
        if d.get("split_policy") not in defaults.SPLIT_POLICIES:
            raise RQError(f"{where}: unknown split policy {d.get('split_policy')!r} "
                          f"(known: {', '.join(defaults.SPLIT_POLICIES)})")
        _check_types(d, where)
        try:
            E = int(d["num_logical_experts"])
            G = d.get("num_devices")
            layers = [
                LayerMap(int(row["layer"]), torch.tensor(row["phy2log"], dtype=torch.int64),
                         torch.tensor(row["log2phy"], dtype=torch.int64), torch.tensor(row["logcnt"], dtype=torch.int64),
                         tuple(row["slot_scheme"]),
                         torch.tensor(row["slot_device"], dtype=torch.int64) if "slot_device" in row else None)
                for row in d["layers"]
            ]
            rmap = cls(E, layers, str(d["source_scheme"]), str(d["activation"]), d["split_policy"],
                       None if G is None else int(G))
        except (KeyError, TypeError, ValueError) as e:
            raise RQError(f"{where}: malformed routing map ({type(e).__name__}: {e})") from None
        rmap.validate(where)
        return rmap

    def validate(self, where: str = "routing map") -> None:
        """Every check the runtime relies on; raises RQError naming the layer and the problem."""
        E = self.num_experts
        if self.num_devices is not None and not (isinstance(self.num_devices, int) and self.num_devices >= 1):
            raise RQError(f"{where}: num_devices must be a positive integer, got {self.num_devices!r}")
        if self.split_policy == defaults.LOAD_AWARE_POLICY and self.num_devices is None:
            raise RQError(f"{where}: split policy {defaults.LOAD_AWARE_POLICY!r} needs a device placement (num_devices)")
        if self.source_scheme not in SCHEMES:
            raise RQError(f"{where}: unknown source scheme {self.source_scheme!r}")
        for lm in self.layers:
            at = f"{where}: layer {lm.layer}"
            P = lm.num_slots
            if lm.phy2log.dim() != 1 or lm.logcnt.shape != (E,) or lm.log2phy.dim() != 2 or lm.log2phy.shape[0] != E:
                raise RQError(f"{at}: shapes phy2log {tuple(lm.phy2log.shape)}, log2phy {tuple(lm.log2phy.shape)}, "
                              f"logcnt {tuple(lm.logcnt.shape)} do not fit {E} experts")
            if len(lm.slot_scheme) != P:
                raise RQError(f"{at}: {len(lm.slot_scheme)} slot schemes for {P} slots")
            bad = [s for s in lm.slot_scheme if s not in SCHEMES]
            if bad:
                raise RQError(f"{at}: unknown scheme {bad[0]!r} (known: {', '.join(SCHEMES)})")
            if P < E or (lm.phy2log < 0).any() or (lm.phy2log >= E).any():
                raise RQError(f"{at}: phy2log has ids out of range [0, {E})")
            if (lm.log2phy < -1).any() or (lm.log2phy >= P).any():
                raise RQError(f"{at}: log2phy has slot ids out of range [-1, {P})")
            if (lm.slot_device is None) != (self.num_devices is None):
                raise RQError(f"{at}: slot_device must be given exactly when the map has num_devices")
            if lm.slot_device is not None and (
                    lm.slot_device.shape != (P,) or (lm.slot_device < 0).any() or (lm.slot_device >= self.num_devices).any()):
                raise RQError(f"{at}: slot_device must hold {P} device ids in [0, {self.num_devices})")
            if (lm.logcnt < 1).any():
                raise RQError(f"{at}: every logical expert needs at least one slot (logcnt has zeros)")
            counts = torch.bincount(lm.phy2log, minlength=E)
            if not torch.equal(counts, lm.logcnt):
                raise RQError(f"{at}: logcnt disagrees with phy2log")
            R = lm.log2phy.shape[1]
            for e in range(E):
                row = lm.log2phy[e]
                c = int(lm.logcnt[e])
                if c > R or (row[c:] != -1).any() or (row[:c] < 0).any() or (lm.phy2log[row[:c]] != e).any():
                    raise RQError(f"{at}: log2phy row of expert {e} disagrees with logcnt/phy2log")


MAX_SLOTS_PER_EXPERT = 64  # P <= 64 E: far above any plan (MAX_REPLICAS_PER_EXPERT is 8)
_BIG = 1 << 62  # ids are range-checked by validate(); here only int64-safe


def _check_types(d: dict, where: str) -> None:
    """JSON types and sizes of a routing map, before any tensor is built (one line naming the field)."""
    E = v.check_int(v.get(d, "num_logical_experts", where), where, "num_logical_experts", 1, v.MAX_EXPERTS)
    v.check_str(v.get(d, "source_scheme", where), where, "source_scheme", 64)
    v.check_str(v.get(d, "activation", where), where, "activation", 256)
    G = d.get("num_devices")
    if G is not None:
        v.check_int(G, where, "num_devices", 1, 1 << 20)
    layers = v.check_list(v.get(d, "layers", where), where, "layers", v.MAX_LAYERS)
    P_max = MAX_SLOTS_PER_EXPERT * E
    for i, row in enumerate(layers):
        at = f"layers[{i}]"
        v.check_int(v.get(row, "layer", where, at), where, f"{at}.layer", 0, v.MAX_LAYERS)
        phy2log = v.int_list(v.get(row, "phy2log", where, at), where, f"{at}.phy2log", -_BIG, _BIG)
        P = len(phy2log)
        if not E <= P <= P_max:
            raise RQError(f"{where}: {at}.phy2log: {P} slots for {E} experts (expected {E}..{P_max})")
        log2phy = v.check_list(v.get(row, "log2phy", where, at), where, f"{at}.log2phy", E)
        if len(log2phy) != E:
            raise RQError(f"{where}: {at}.log2phy: {len(log2phy)} rows, expected {E}")
        width = len(log2phy[0]) if log2phy and isinstance(log2phy[0], list) else -1
        if not 1 <= width <= P:
            raise RQError(f"{where}: {at}.log2phy: rows must be lists of 1..{P} slot ids")
        for e, r in enumerate(log2phy):
            v.int_list(r, where, f"{at}.log2phy[{e}]", -_BIG, _BIG, length=width)
        v.int_list(v.get(row, "logcnt", where, at), where, f"{at}.logcnt", -_BIG, _BIG, length=E)
        schemes = v.check_list(v.get(row, "slot_scheme", where, at), where, f"{at}.slot_scheme", P)
        for s in schemes:
            v.check_str(s, where, f"{at}.slot_scheme", 64)
        if "slot_device" in row:
            v.int_list(row["slot_device"], where, f"{at}.slot_device", -_BIG, _BIG)

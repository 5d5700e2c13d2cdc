"""The one reader of a rewritten model directory's ``config.json``: its ``rq`` section and routing map.

Used by the loader (``rq_tool.load`` / the remote-code entry), ``rq verify``, ``rq report
--compare`` and ``rq export``; each gets the same validation and the same one-line errors.
Light on purpose (json + torch): no transformers, click, datasets or rewrite imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import defaults
from ..errors import RQError, check_format
from ..validate import check_dict, check_model_config, check_str, get, read
from .routing_map import RoutingMap


@dataclass(frozen=True)
class RQModelDir:
    """A rewritten model directory, read and validated.

    ``config``: the whole config.json (base keys + ``rq``); ``rq``: its rq section;
    ``routing_map``: the parsed, validated map; ``base_model_type``: the family's model_type.
    """

    path: Path
    config: dict
    rq: dict
    routing_map: RoutingMap

    @property
    def base_model_type(self) -> str:
        return self.rq["base_model_type"]


def read_rq_config(path) -> dict:
    """config.json of a rewritten model, its ``rq`` section format-checked (the routing map is not parsed)."""
    path = Path(path)
    cfg = path / "config.json"
    d = read(cfg, f"{path} is not a model directory (no config.json)")
    rq = d.get("rq") if isinstance(d, dict) else None
    if not isinstance(rq, dict):
        raise RQError(f"{path} is not an rq-rewritten model (config.json has no 'rq' section)")
    check_format(rq, defaults.RQ_CONFIG_FORMAT, "config section", str(cfg))
    check_model_config(d, str(cfg))
    if rq.get("base_model_type") is not None:  # required to load (base_config), not to read the map
        check_str(rq["base_model_type"], str(cfg), "rq.base_model_type", 128)
    check_dict(get(rq, "routing_map", str(cfg), "rq"), str(cfg), "rq.routing_map")
    return d


def read_rq_model(path) -> RQModelDir:
    """``RQModelDir`` of ``path``; RQError naming the file and field on any problem."""
    path = Path(path)
    d = read_rq_config(path)
    rmap = RoutingMap.from_dict(d["rq"]["routing_map"], where=f"{path / 'config.json'} rq.routing_map")
    return RQModelDir(path, d, d["rq"], rmap)


# "experts_implementation": "rq" in config.json makes the base class refuse the directory (loading it
# without trust_remote_code fails loudly); the rq runtime builds the base model without it
_NOT_BASE_KEYS = ("model_type", "auto_map", "architectures", "experts_implementation")


def base_config(d: dict):
    """The base family's transformers config of a rewritten config.json (``rq`` and ``auto_map`` kept
    as attributes); RQError if transformers refuses its values."""
    from transformers import CONFIG_MAPPING

    from ..arch.families import config_from_dict

    base_type = get(d["rq"], "base_model_type", "config.json", "rq")
    if base_type not in CONFIG_MAPPING:  # the family itself is checked on the built config by the loader
        raise RQError(f"config.json: rq.base_model_type {base_type!r} is not known to the installed transformers")
    try:
        cfg = config_from_dict(base_type, {k: v for k, v in d.items() if k not in _NOT_BASE_KEYS})
    except Exception as e:  # transformers validates values in its own ways
        raise RQError(f"config.json: transformers cannot read this {base_type} config ({type(e).__name__}: "
                      f"{str(e)[:160]})") from None
    cfg.auto_map = d.get("auto_map")
    return cfg

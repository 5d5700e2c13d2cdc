"""Which MoE causal-LM families the installed transformers ships, and what rq makes of each.

One source for ``rq families`` and the README's family list: a model_type is an MoE causal LM
when transformers has a causal-LM class for it and its default config counts experts
(``num_experts``, ``num_local_experts``, ``n_routed_experts``, ``ffn_config.moe_num_experts``, ...) or has
such a field (Hunyuan's default counts 1 expert).
Each is then judged by the structural adapter on its default config, built on the meta device
(no weights, a few seconds for all of them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import RQError
from .families import UnjudgedConfig, _expert_counts, get_family


@dataclass(frozen=True)
class FamilyStatus:
    model_type: str
    causal_lm_class: str
    supported: bool | None  # None: not judged (the config given or the default one builds no experts)
    adapter: str  # adapter class name when supported
    activation: str
    note: str  # why not, when unsupported (one line)


def moe_causal_lm_types() -> list[str]:
    """Sorted model_types with a causal-LM class whose default config counts experts."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for mt in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if mt not in CONFIG_MAPPING:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CONFIG_MAPPING[mt]()
        except Exception:  # a default config that does not validate on its own
            continue
        if _expert_counts(config) or _has_count_field(config.to_dict()):
            out.append(mt)
    return out


_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


def _has_count_field(d: dict) -> bool:
    """An expert-count field, whatever its default (Hunyuan defaults to 1 expert, dots1 to None)."""
    return any(k in _COUNT_FIELDS or (isinstance(v, dict) and _has_count_field(v)) for k, v in d.items())


def family_status(model_type: str, config=None) -> FamilyStatus:
    """What rq makes of ``model_type`` (its default config unless ``config`` is given)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
    cls = cls[0] if isinstance(cls, (list, tuple)) else cls
    try:
        fam = get_family(config if config is not None else model_type)
    except RQError as e:
        note = str(e)
        prefix = f"{model_type}: "
        note = note[len(prefix):] if note.startswith(prefix) else note
        judged = not isinstance(e, UnjudgedConfig)
        if not judged and config is None:
            note = f"not judged on the default config: {note}; run `rq families MODEL_DIR` on a checkpoint"
        return FamilyStatus(model_type, cls, False if judged else None, "", "", note)
    return FamilyStatus(model_type, cls, True, type(fam).__name__, fam.activation(), "")


def family_table(statuses: list[FamilyStatus] | None = None) -> str:
    """A Markdown table of every MoE causal-LM family (supported first)."""
    if statuses is None:
        statuses = [family_status(mt) for mt in moe_causal_lm_types()]
    ok = [s for s in statuses if s.supported]
    unjudged = sum(s.supported is None for s in statuses)
    lines = [f"{len(ok)} of {len(statuses)} MoE causal-LM families in this transformers are supported"
             + (f" ({unjudged} not judged on their default config)." if unjudged else "."), "",
             "| model_type | class | rq | adapter / reason |", "|---|---|---|---|"]
    rank = {True: 0, False: 1, None: 2}
    for s in sorted(statuses, key=lambda s: (rank[s.supported], s.model_type)):
        what = f"{s.adapter}, `{s.activation}`" if s.supported else s.note.replace("|", "/")
        mark = {True: "yes", False: "no", None: "?"}[s.supported]
        lines.append(f"| `{s.model_type}` | {s.causal_lm_class} | {mark} | {what} |")
    return "\n".join(lines)

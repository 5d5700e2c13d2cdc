"""PNG reports of a profile (and, with ``--compare``, of a rewritten model's slots).

Legend: L MoE layers, E logical experts, P physical slots.

- ``load_before.png``: heatmap of each layer's load share per logical expert, with its LIS;
- ``load_after.png`` (with a rewritten model): per layer and logical expert, the predicted load
  share of the expert's heaviest slot (the profile's load split evenly over its replicas:
  ``expert_slot_share``), cells marked with the replica count and quantized storage; same axes
  and the same colour scale as ``load_before.png``, so the two compare cell by cell;
- ``lis_per_layer.png``: LIS per layer before and (predicted) after, plus the mean per-batch
  LIS of the profile at each recorded batch size.

Shares are per layer (each row sums to 100%) so layers with different token counts compare.
matplotlib runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import defaults
from ..errors import RQError
from ..lis import lis, slot_loads
from ..outputs import check_output, marked_dir_kind, staged
from ..runtime.model_dir import read_rq_model

REPORT_KIND = marked_dir_kind("report", defaults.REPORT_FILE, defaults.REPORT_FORMAT[0])


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RQError("rq report needs matplotlib", hint="pip install 'rq-tool[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_SCHEME_MARK = {"int8": "i8", "nf4": "n4"}
_MAX_ANNOTATED_CELLS = 4096  # beyond this the cell texts are unreadable anyway


def expert_slot_share(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """Predicted load of each logical expert's heaviest slot, in % of the layer's load.

    ``load [E]`` int64, ``phy2log [P]``, ``logcnt [E]`` -> ``[E]`` float64 (``lis.slot_loads``:
    tokens split evenly over replicas). Before a rewrite (one slot each) this is the load share.
    """
    s = slot_loads(load, phy2log, logcnt)
    top = torch.zeros(load.shape[0], dtype=torch.float64).scatter_reduce_(0, phy2log, s, "amax", include_self=False)
    return 100.0 * top / load.double().sum().clamp_min(1)


def _heatmap(plt, share, title: str, row_labels, path: Path, vmax: float, cells=None,
             xlabel: str = "logical expert"):
    """``share [L, E]`` in %, rows labelled ``row_labels``, colours 0..``vmax``; ``cells [L][E]``: text per cell."""
    L, C = share.shape
    width = 0.42 * C + 2.5 if C <= 32 else 0.22 * C + 9.0
    fig, ax = plt.subplots(figsize=(max(6.0, width), max(2.5, 0.32 * L + 1.8)))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(L), row_labels, fontsize=8 if L <= 48 else 6)  # every layer labelled
    step = 1 if C <= 64 else 2 if C <= 128 else 4
    ax.set_xticks(range(0, C, step), [str(e) for e in range(0, C, step)], rotation=90 if C > 24 else 0,
                  fontsize=7 if C > 24 else 8)
    if cells is not None and L * C <= _MAX_ANNOTATED_CELLS:
        for i, row in enumerate(cells):
            for j, text in enumerate(row):
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=6 if C > 24 else 7,
                            color="white" if float(share[i, j]) < 0.6 * vmax else "black")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=ax, label="share of the layer's load (%)", fraction=0.15 if C <= 32 else 0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(profile, out_dir, compare=None, force: bool = False) -> list[Path]:
    """Write the PNGs (see the module docstring) to the folder ``out_dir``; returns their paths.

    ``profile``: a ``Profile`` or a path to one; ``compare``: a rewritten model directory. The
    folder is written whole under a temporary name and renamed into place (``rq_tool.outputs``),
    with an ``rq_report.json`` listing its files; an existing one is replaced only with ``force``
    and only if rq wrote it.
    """
    from ..calibrate.profile import Profile

    inputs = [compare] if isinstance(profile, Profile) else [profile, compare]
    check_output(out_dir, REPORT_KIND, inputs, force)
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    rmap = read_rq_model(compare).routing_map if compare is not None else None
    plt = _plt()
    with staged(out_dir, REPORT_KIND, inputs, force) as tmp:
        names = [p.name for p in _draw(plt, profile, compare, rmap, tmp)]
        files = {n: {"bytes": (tmp / n).stat().st_size} for n in names}
        (tmp / defaults.REPORT_FILE).write_text(json.dumps({"format": defaults.REPORT_FORMAT[0], "version":
                                                            defaults.REPORT_FORMAT[1], "files": files}, indent=1))
    return [Path(out_dir) / n for n in names]


def _draw(plt, profile, compare, rmap, out: Path) -> list[Path]:
    load = profile.load_matrix()  # [L, E]
    layers = [lp.layer for lp in profile.layers]
    share = 100.0 * load.double() / load.double().sum(-1, keepdim=True).clamp_min(1)
    vmax = float(share.max()) or 1.0  # the after plot's cells are never above their before cell
    before = [float(v) for v in lis(load.double())]
    cal = profile.calibration
    paths = [_heatmap(plt, share, f"Expert load per layer (calibration: {cal.get('dataset')}, "
                      f"{cal.get('tokens')} tokens)",
                      [f"L{layer}  LIS {b:.2f}" for layer, b in zip(layers, before)], out / "load_before.png", vmax)]
    after = None
    if compare is not None:
        if [lm.layer for lm in rmap.layers] != layers:
            raise RQError(f"{compare}: its MoE layers {[lm.layer for lm in rmap.layers]} differ from the "
                          f"profile's {layers}")
        top = torch.stack([expert_slot_share(load[i], lm.phy2log, lm.logcnt) for i, lm in enumerate(rmap.layers)])
        after = [float(lis(slot_loads(load[i], lm.phy2log, lm.logcnt))) for i, lm in enumerate(rmap.layers)]
        cells = [[_cell(lm, e) for e in range(load.shape[1])] for lm in rmap.layers]
        paths.append(_heatmap(plt, top, f"Predicted load of each expert's heaviest slot after rewrite\n"
                              f"({Path(compare).name}; colour scale of load_before.png)",
                              [f"L{layer}  LIS {a:.2f}  ({lm.num_slots} slots)"
                               for layer, a, lm in zip(layers, after, rmap.layers)],
                              out / "load_after.png", vmax, cells,
                              "logical expert (cell: xN = N replicas, i8 / n4 = stored int8 / nf4)"))
    paths.append(_lis_chart(plt, profile, layers, before, after, out / "lis_per_layer.png"))
    return paths


def _cell(lm, e: int) -> str:
    """``x2 i8``: expert ``e``'s replica count (when > 1) and quantized storage of its slots."""
    slots = (lm.phy2log == e).nonzero().flatten().tolist()
    marks = sorted({_SCHEME_MARK[lm.slot_scheme[p]] for p in slots if lm.slot_scheme[p] in _SCHEME_MARK})
    return " ".join(([f"x{len(slots)}"] if len(slots) > 1 else []) + marks)


def _lis_chart(plt, profile, layers, before, after, path: Path) -> Path:
    import numpy as np

    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(layers) + 3), 3.6))
    w = 0.38 if after is not None else 0.6
    ax.bar(x - (w / 2 if after is not None else 0), before, w, label="before (calibration)", color="#d62728")
    if after is not None:
        ax.bar(x + w / 2, after, w, label="after (predicted, per slot)", color="#2ca02c")
    sizes = sorted({b for lp in profile.layers for b in lp.lis_by_batch})
    for b, style in zip(sizes, ("o--", "s--", "^--", "v--", "d--")):
        ys = [lp.lis_by_batch.get(b, {}).get("mean", np.nan) for lp in profile.layers]
        ax.plot(x, ys, style, ms=4, lw=1, label=f"per-batch mean, {b} seq/batch")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, [f"L{layer}" for layer in layers])
    ax.set_ylabel("LIS = max / mean load")
    ax.set_title("Load-imbalance score per MoE layer (1.0 = balanced)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

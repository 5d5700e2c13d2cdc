"""PNG reports of a profile (and, with ``--compare``, of a rewritten model's slots).

Legend: L MoE layers, E logical experts, P physical slots.

- ``load_before.png``: heatmap of each layer's load share per logical expert, with its LIS;
- ``load_after.png`` (with a rewritten model): each layer's predicted load share per physical
  slot (the profile's load split evenly over an expert's replicas), slots labelled with their
  expert and marked by storage scheme;
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


def _heatmap(plt, share, title: str, row_labels, col_labels=None, path: Path = None, marks=None):
    L, C = share.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * C + 2.5), max(2.5, 0.5 * L + 1.6)))
    masked = torch.where(torch.isnan(share), torch.zeros_like(share), share)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")  # grey: no slot in this layer
    im = ax.imshow(share.numpy(), aspect="auto", cmap=cmap, vmin=0.0, vmax=float(masked.max()) or 1.0,
                   interpolation="nearest")
    ax.set_yticks(range(L), row_labels)
    if col_labels is not None:
        ax.set_xticks(range(C), col_labels, rotation=90 if C > 24 else 0, fontsize=7 if C > 24 else 8)
    else:
        ax.set_xticks(range(C))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("physical slot (logical expert; ' replica, · int8, : nf4)" if marks else "expert")
    fig.colorbar(im, ax=ax, label="share of the layer's load (%)")
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
    load = profile.load_matrix().double()  # [L, E]
    layers = [lp.layer for lp in profile.layers]
    share = 100.0 * load / load.sum(-1, keepdim=True).clamp_min(1)
    before = [float(v) for v in lis(load)]
    paths = [_heatmap(plt, share, f"Expert load per layer (calibration: {profile.calibration.get('dataset')}, "
                      f"{profile.calibration.get('tokens')} tokens)",
                      [f"L{layer}  LIS {b:.2f}" for layer, b in zip(layers, before)], path=out / "load_before.png")]
    after = None
    if compare is not None:
        if [lm.layer for lm in rmap.layers] != layers:
            raise RQError(f"{compare}: its MoE layers {[lm.layer for lm in rmap.layers]} differ from the "
                          f"profile's {layers}")
        P = max(lm.num_slots for lm in rmap.layers)
        slot_share = torch.full((len(layers), P), float("nan"), dtype=torch.float64)
        after, labels = [], None
        for i, lm in enumerate(rmap.layers):
            s = slot_loads(load[i], lm.phy2log, lm.logcnt)
            slot_share[i, : lm.num_slots] = 100.0 * s / s.sum().clamp_min(1)
            after.append(float(lis(s)))
        labels = [f"L{layer}  LIS {a:.2f}" for layer, a in zip(layers, after)]
        widest = max(rmap.layers, key=lambda lm: lm.num_slots)
        mark = {"int8": "·", "nf4": ":"}
        cols = [f"{int(e)}{chr(39) if p >= rmap.num_experts else ''}{mark.get(s, '')}"
                for p, (e, s) in enumerate(zip(widest.phy2log.tolist(), widest.slot_scheme))]
        paths.append(_heatmap(plt, slot_share, f"Predicted load per physical slot ({Path(compare).name}; columns "
                              f"labelled for layer {widest.layer}, grey = no slot)", labels, cols,
                              out / "load_after.png", marks=True))
    paths.append(_lis_chart(plt, profile, layers, before, after, out / "lis_per_layer.png"))
    return paths


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

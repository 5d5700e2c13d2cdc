"""How many calibration sequences does a good load estimate need?

Legend: N calibration sequences, L MoE layers, E experts.

One pass of the model over the largest calibration sample records every sequence's expert
loads (``ExpertRecorder``, no quantization-error pass); the estimate from the first ``n``
sequences (the packer shuffles documents, so any prefix is a random sample of documents) is then
compared with the held-out truth ``load [L, E]``, per layer:

- ``spearman``: rank correlation of per-expert loads (average ranks for ties) -- does the sample
  order the experts right, which is what the planner's replication choice depends on;
- ``lis_abs_error``: ``|LIS(sample) - LIS(held-out)|`` -- is the imbalance itself right.
"""

from __future__ import annotations

import torch

from rq_tool import defaults
from rq_tool.lis import lis

SIZES = (16, 64, 256, 1024)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) of ``x [E]``, ties sharing their mean rank; float64."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    for v in torch.unique(x):
        tie = x == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``[E]`` vectors (0.0 when either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def sequence_loads(model_path, dataset: str = defaults.DEFAULT_DATASET, *, max_sequences: int = max(SIZES),
                   seq_len: int = defaults.SEQ_LEN, batch_size: int = defaults.BATCH_SIZE,
                   seed: int = defaults.SEED) -> torch.Tensor:
    """``[L, N, E]`` int64 per-sequence expert loads on up to ``max_sequences`` calibration sequences."""
    from rq_tool.calibrate import ExpertRecorder, load_texts, pack
    from rq_tool.source import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(model_path)
    model, family = load_model(path)
    name, texts = load_texts(dataset)
    import warnings

    with warnings.catch_warnings():  # a short set yields fewer sequences: capped on purpose
        warnings.simplefilter("ignore")
        data = pack(texts, load_tokenizer(path), num_samples=max_sequences, seq_len=seq_len, seed=seed, name=name)
    ids = data.input_ids
    with torch.inference_mode(), ExpertRecorder(model, family, (), quant_error=False) as rec:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size]
            rec.batch_size = batch.shape[0]
            model(input_ids=batch, use_cache=False)
    return torch.stack([torch.cat(st.seq_load) for st in rec.stats])


def size_study(seq_load: torch.Tensor, heldout_load: torch.Tensor, sizes=SIZES) -> list[dict]:
    """Estimates from the first n sequences vs the held-out truth, for each n (capped at N).

    ``seq_load [L, N, E]``, ``heldout_load [L, E]`` -> ``[{"sequences", "spearman" [L],
    "spearman_mean", "spearman_min", "lis" [L], "lis_abs_error" [L], "lis_abs_error_mean"}]``.
    """
    L, N, _ = seq_load.shape
    truth_lis = lis(heldout_load)
    rows = []
    for n in sorted({min(int(s), N) for s in sizes}):
        est = seq_load[:, :n].sum(1)
        rho = [spearman(est[l], heldout_load[l]) for l in range(L)]
        est_lis = lis(est)
        err = (est_lis - truth_lis).abs()
        rows.append({"sequences": n, "spearman": rho, "spearman_mean": sum(rho) / L, "spearman_min": min(rho),
                     "lis": [float(v) for v in est_lis], "heldout_lis": [float(v) for v in truth_lis],
                     "lis_abs_error": [float(v) for v in err], "lis_abs_error_mean": float(err.mean())})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| calibration sequences | Spearman (mean / min over layers) | LIS abs error (mean) | "
             "LIS estimate (mean) | held-out LIS (mean) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sequences']} | {r['spearman_mean']:.3f} / {r['spearman_min']:.3f} | "
                     f"{r['lis_abs_error_mean']:.3f} | {sum(r['lis']) / len(r['lis']):.3f} | "
                     f"{sum(r['heldout_lis']) / len(r['heldout_lis']):.3f} |")
    return "\n".join(lines)

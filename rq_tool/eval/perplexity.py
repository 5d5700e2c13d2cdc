"""Held-out perplexity, next-token top-1 accuracy and router load of a causal MoE LM.

Texts are tokenized in order, each followed by EOS, concatenated and cut into non-overlapping
``[N, W]`` windows until ``max_tokens`` tokens (rounded down to whole windows), so a fixed
``max_tokens`` always scores the same tokens. Every window predicts its ``W - 1`` next tokens.

Legend: ``N`` windows, ``W`` window length, ``L`` MoE layers, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import math

import torch

from .. import defaults
from ..lis import lis


def pack_tokens(tokenizer, texts: list[str], seq_len: int = defaults.HELDOUT_SEQ_LEN, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``texts`` (EOS after each), pack into ``input_ids [N, seq_len]`` (no padding).

    ``N = min(max_tokens, available) // seq_len``; raises ValueError when not one window fits.
    """
    need = max_tokens
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if need is not None and len(ids) >= need:
            break
    n = (len(ids) if need is None else min(len(ids), need)) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens: fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def evaluate_ids(model, input_ids: torch.Tensor, batch_size: int = 8) -> dict:
    """Score packed windows ``input_ids [N, W]``.

    Returns ``nll_sum`` (nats), ``correct`` and ``tokens`` (``N * (W - 1)`` predictions), and
    ``load [L, E]`` int64: how many of the ``N * W`` tokens each layer's router sent to each
    expert (its top-K, counted once per slot), or None for a model without router logits.
    """
    model.eval()
    nll, correct, tokens, load = 0.0, 0, 0, None
    top_k = getattr(model.config, "num_experts_per_tok", None)
    for start in range(0, input_ids.shape[0], batch_size):
        x = input_ids[start:start + batch_size]
        out = model(input_ids=x, output_router_logits=top_k is not None, use_cache=False)
        logits = out.logits[:, :-1].float()
        target = x[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                        reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        tokens += target.numel()
        router_logits = getattr(out, "router_logits", None)
        if top_k is not None and router_logits:
            counts = torch.stack([
                torch.bincount(r.topk(top_k, dim=-1).indices.reshape(-1), minlength=r.shape[-1])
                for r in router_logits])
            load = counts if load is None else load + counts
    return {"nll_sum": nll, "correct": correct, "tokens": tokens, "load": load}


def summarize(scores: dict) -> dict:
    """``ppl``, ``top1_acc``, ``tokens`` and, if loads were recorded, per-layer ``lis`` [L]."""
    out = {"ppl": math.exp(scores["nll_sum"] / scores["tokens"]),
           "top1_acc": scores["correct"] / scores["tokens"], "tokens": scores["tokens"]}
    if scores.get("load") is not None:
        out["lis"] = [float(v) for v in lis(scores["load"])]
        out["dead_experts"] = [int(v) for v in (scores["load"] == 0).sum(-1)]
    return out


def merge(*scores: dict) -> dict:
    """Pool several :func:`evaluate_ids` results (sums; loads add)."""
    loads = [s["load"] for s in scores if s.get("load") is not None]
    return {"nll_sum": sum(s["nll_sum"] for s in scores), "correct": sum(s["correct"] for s in scores),
            "tokens": sum(s["tokens"] for s in scores), "load": sum(loads) if loads else None}

#!/usr/bin/env python
"""Train rq's bundled tiny MoE (the embedded default model) and evaluate it.

    python scripts/train_tiny_moe.py                 # tokenizer + model + eval -> rq_tool/assets/tiny_moe
    python scripts/train_tiny_moe.py --eval-only     # re-evaluate the committed model, rewrite eval.json

The corpus (rq_tool/eval/corpus.py) is read at run time from the Python stdlib, Debian's KJV Bible
(`apt-get install -y bible-kjv-text bible-kjv`), Debian `manpages` and a seeded arithmetic
generator; only the trained weights and tokenizer are written.

Load balancing: the stock transformers aux loss pools expert counts over all layers, which lets
single layers collapse onto a few experts (dead experts at coef 0.01). Here the Switch-style loss
``E * sum_e f_e * P_e`` is computed for each MoE layer separately and averaged over layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rq_tool import defaults
from rq_tool.eval import corpus
from rq_tool.eval import perplexity as ev

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "rq_tool" / "assets" / "tiny_moe"
EVAL_FILE, LOG_FILE = "eval.json", "train_log.json"
EVAL_FORMAT = ("rq-tiny-moe-eval", 1)
EOS, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 360  # ~7 min at ~3.5k tok/s on one idle core
    minutes: float | None = None  # optional wall-clock cap (stops early; the schedule still spans `steps`)
    seed: int = 0
    threads: int = 1
    batch_size: int = 16  # sequences per step, split evenly over the training domains
    seq_len: int = defaults.HELDOUT_SEQ_LEN  # training windows are the held-out windows
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    aux_coef: float = 0.01  # per-layer load-balancing loss weight
    vocab_size: int = 8192
    tokenizer_chars: int = 2_000_000  # per domain, for BPE training
    train_chars: int = 4_000_000  # per domain, for the token stream the batches are cut from
    eval_tokens: int = defaults.HELDOUT_TOKENS  # per domain
    test_tokens: int = 2048  # per domain, the subset tests/calibrate/test_tiny_moe.py re-scores
    eval_batch: int = defaults.HELDOUT_BATCH_SIZE


def model_config(tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
        num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=512, tie_word_embeddings=True,
        router_aux_loss_coef=0.0,  # ours is per layer, added in the loop below
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


# ---- data -----------------------------------------------------------------------------------
def _capped(texts: list[str], chars: int, seed: int) -> list[str]:
    """A seeded shuffle of ``texts``, cut once ``chars`` characters are collected."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out, n = [], 0
    for i in order:
        out.append(texts[i])
        n += len(texts[i])
        if n >= chars:
            break
    return out


def train_tokenizer(train: dict[str, list[str]], cfg: TrainConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS, BOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = [t for d in corpus.DOMAINS for t in _capped(train[d], cfg.tokenizer_chars, cfg.seed)]
    tok.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=512)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """``[T]`` ids of ``texts`` joined with EOS (the layout of ev.pack_tokens and rq calibrate)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for ids in enc for i in ids + [tokenizer.eos_token_id]], dtype=torch.long)


# ---- training -------------------------------------------------------------------------------
def per_layer_aux(router_logits, top_k: int) -> torch.Tensor:
    """Mean over MoE layers of ``E * sum_e f_e * P_e`` (1.0 at perfect balance).

    ``router_logits``: one ``[T, E]`` tensor per layer. ``f_e`` is the share of the ``T*K``
    routing slots that went to ``e`` (no gradient), ``P_e`` the mean router probability.
    """
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)  # [T, E]
        num_experts = probs.shape[-1]
        idx = probs.topk(top_k, dim=-1).indices.reshape(-1)
        f = torch.bincount(idx, minlength=num_experts).float() / idx.numel()
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: TrainConfig, out: Path) -> None:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    train_docs = {d: corpus.train_texts(d) for d in corpus.DOMAINS}
    tokenizer = train_tokenizer(train_docs, cfg)
    streams = {d: token_stream(tokenizer, _capped(train_docs[d], cfg.train_chars, cfg.seed + 1))
               for d in corpus.DOMAINS}
    print(f"data + tokenizer: {time.time() - t0:.0f}s; train tokens per domain: "
          + ", ".join(f"{d} {len(s)}" for d, s in streams.items()), flush=True)

    torch.manual_seed(cfg.seed)
    model = Qwen3MoeForCausalLM(model_config(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    per_domain = cfg.batch_size // len(corpus.DOMAINS)
    top_k = model.config.num_experts_per_tok
    log, t_start = [], time.time()
    model.train()
    for step in range(cfg.steps):
        if cfg.minutes is not None and time.time() - t_start > 60 * cfg.minutes:
            print(f"stopping at step {step}: --minutes {cfg.minutes} reached", flush=True)
            break
        rows = []
        for d in corpus.DOMAINS:  # fixed domain order, seeded offsets: a deterministic data order
            s = streams[d]
            starts = torch.randint(0, len(s) - cfg.seq_len, (per_domain,), generator=gen)
            rows += [s[i:i + cfg.seq_len] for i in starts.tolist()]
        x = torch.stack(rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        t = time.time()
        res = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = res.logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = per_layer_aux(res.router_logits, top_k)
        loss = ce + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.time() - t
        log.append({"step": step, "loss": round(ce.item(), 4), "aux": round(aux.item(), 4),
                    "lr": round(lr_at(step, cfg), 6), "tok_per_s": round(x.numel() / dt, 1),
                    "elapsed_s": round(time.time() - t_start, 1)})
        if step % 10 == 0 or step == cfg.steps - 1:
            print(json.dumps(log[-1]), flush=True)
    train_s = time.time() - t_start

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"format": "rq-tiny-moe-train-log", "version": 1, "config": dataclasses.asdict(cfg),
               "params": n_params, "steps_done": len(log), "train_seconds": round(train_s, 1),
               "final_loss_mean_last_20": round(sum(r["loss"] for r in log[-20:]) / len(log[-20:]), 4),
               "train_tokens_per_domain": {d: len(s) for d, s in streams.items()},
               "environment": environment(), "log": log}
    (out / LOG_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"trained {len(log)} steps in {train_s:.0f}s ({n_params} params) -> {out}", flush=True)


# ---- evaluation -----------------------------------------------------------------------------
def environment() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def load_model(out: Path):
    """The saved model in float32 (from its bf16 weights) and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _ids_sha256(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()


def evaluate(out: Path, cfg: TrainConfig) -> dict:
    model, tokenizer = load_model(out)
    domains = corpus.DOMAINS + corpus.UNSEEN_DOMAINS
    scores, result, test = {}, {}, {}
    n_test = cfg.test_tokens // cfg.seq_len
    for d in domains:
        ids = ev.pack_tokens(tokenizer, corpus.heldout_texts(d), cfg.seq_len, cfg.eval_tokens)
        scores[d] = ev.evaluate_ids(model, ids, cfg.eval_batch)
        result[d] = {**ev.summarize(scores[d]), "input_sha256": _ids_sha256(ids)}
        sub = ids[:n_test]
        test[d] = {**ev.summarize(ev.evaluate_ids(model, sub, cfg.eval_batch)), "input_sha256": _ids_sha256(sub)}
        test[d].pop("lis", None), test[d].pop("dead_experts", None)
    mixed = ev.summarize(ev.merge(*(scores[d] for d in corpus.DOMAINS)))
    mixed_load = ev.merge(*(scores[d] for d in corpus.DOMAINS))["load"]
    return {
        "format": EVAL_FORMAT[0], "version": EVAL_FORMAT[1],
        "command": "python scripts/train_tiny_moe.py --eval-only",
        "seq_len": cfg.seq_len, "eval_tokens_per_domain": cfg.eval_tokens,
        "training_domains": list(corpus.DOMAINS), "unseen_domains": list(corpus.UNSEEN_DOMAINS),
        "heldout": {"fraction": corpus.HELDOUT_FRACTION, "split_seed": corpus.SPLIT_SEED},
        "domains": result,
        "mixed": {**mixed, "load": mixed_load.tolist(), "note": "the training domains' held-out windows pooled"},
        "test_subset": {"tokens_per_domain": n_test * cfg.seq_len, "domains": test},
        "environment": environment(),
    }


def markdown(ev_json: dict) -> str:
    """The model card's tables."""
    rows = ["| domain | held-out tokens | perplexity | top-1 acc | LIS per layer (L0..L3) | dead experts |",
            "|---|---|---|---|---|---|"]
    for name, r in [*ev_json["domains"].items(), ("mixed (4 training domains)", ev_json["mixed"])]:
        tag = " (unseen)" if name in ev_json["unseen_domains"] else ""
        rows.append(f"| {name}{tag} | {r['tokens']} | {r['ppl']:.2f} | {r['top1_acc']:.3f} | "
                    f"{' / '.join(f'{v:.2f}' for v in r['lis'])} | {sum(r['dead_experts'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps; the LR schedule spans them")
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock cap (stops early)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--aux-coef", type=float, default=d.aux_coef, help="per-layer load-balancing loss weight")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the model in --out, rewrite eval.json")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(d, steps=a.steps, minutes=a.minutes, seed=a.seed, threads=a.threads,
                              aux_coef=a.aux_coef)
    torch.set_num_threads(cfg.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence longer than 512": we tokenize whole documents
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not a.eval_only:
        train(cfg, a.out)
    t = time.time()
    result = evaluate(a.out, cfg)
    (a.out / EVAL_FILE).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"eval: {time.time() - t:.0f}s -> {a.out / EVAL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

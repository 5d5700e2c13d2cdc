"""End-to-end CPU cost of the rq runtime: generation and prefill of rewritten models vs the original.

Calibrates (quickly) and rewrites the model three ways -- replicas only (no quantized slot),
int8-only (``schemes=("int8",)``) and the default greedy plan (int8 + nf4 slots) -- then measures,
interleaved per round so machine noise hits every model alike:

- decode: ``generate()`` of ``--new-tokens`` greedy tokens after a ``--prompt-len`` prompt, for
  1 and for 8 sequences; tokens/s = sequences * new tokens / wall time (prefill included, as a
  user sees it);
- prefill: one ``use_cache=False`` forward of 8 x ``--seq-len`` tokens; tokens/s.

Prints medians over ``--rounds`` and the ratio of each model's time to the original's (the
targets of issue 15: default rewrite generation <= 1.5x, replicas-only <= 1.10x).

    OMP_NUM_THREADS=2 python scripts/bench_runtime.py [--model DIR] [--rounds 7] [--json]

``--cache-dequantized`` also times the default rewrite with the opt-in dequantized-weight cache
(``rq_tool.load(..., cache_dequantized=True)``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rq_tool
from rq_tool.calibrate.data import load_texts, pack
from rq_tool.source import load_model, load_tokenizer, resolve_model_path

VARIANTS = (("replicas-only", {"strategy": "replicate-only"}),
            ("int8-only", {"schemes": ("int8",)}),
            ("default (greedy)", {}))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default="mix")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=256, help="prefill sequence length (8 sequences)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dequantized", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    original, _ = load_model(path)
    name, texts = load_texts(args.dataset)
    tok = load_tokenizer(path)
    prefill = pack(texts, tok, num_samples=8, seq_len=args.seq_len, seed=1, name=name).input_ids
    prompts = pack(texts, tok, num_samples=8, seq_len=args.prompt_len, seed=2, name=name).input_ids
    profile = rq_tool.calibrate(path, args.dataset, num_samples=32, seq_len=args.seq_len, progress=False)
    models = {"original": original}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in VARIANTS:
            out = Path(tmp) / label.split()[0]
            rq_tool.rewrite(path, profile, out, progress=False, **kw)
            models[label] = rq_tool.load(out)
            if args.cache_dequantized and label.startswith("default"):
                models["default + cache"] = rq_tool.load(out, cache_dequantized=True)

    def gen(model, n):
        ids = prompts[:n]
        return lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0)

    tasks = {"decode 1 seq": (lambda m: gen(m, 1), args.new_tokens),
             "decode 8 seq": (lambda m: gen(m, 8), 8 * args.new_tokens),
             "prefill 8 seq": (lambda m: (lambda: m(input_ids=prefill, use_cache=False)), prefill.numel())}
    times = {t: {k: [] for k in models} for t in tasks}
    for t, (make, _) in tasks.items():
        for m in models.values():
            _timed(make(m))  # warm-up
    for _ in range(args.rounds):
        for t, (make, _) in tasks.items():
            for k, m in models.items():
                times[t][k].append(_timed(make(m)))
    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in times.items()}
    res = {"model": str(path), "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
           "prompt_len": args.prompt_len, "prefill_tokens": prefill.numel(), "median_s": med,
           "tokens_per_s": {t: {k: tasks[t][1] / s for k, s in d.items()} for t, d in med.items()},
           "ratio": {t: {k: s / d["original"] for k, s in d.items()} for t, d in med.items()}}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"model {path}: {args.threads} threads, median of {args.rounds} rounds; decode = generate() of "
          f"{args.new_tokens} tokens after a {args.prompt_len}-token prompt, prefill = 8 x {args.seq_len} tokens")
    print(f"{'task':<15}{'model':<19}{'median s':>10}{'tokens/s':>11}{'x original':>12}")
    for t in tasks:
        for k in models:
            print(f"{t:<15}{k:<19}{med[t][k]:>10.4f}{res['tokens_per_s'][t][k]:>11.1f}{res['ratio'][t][k]:>12.2f}")


if __name__ == "__main__":
    main()

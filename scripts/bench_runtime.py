"""End-to-end CPU cost of the rq runtime: rewritten model forward vs the original model's forward.

Calibrates (quickly) and rewrites the model twice -- replicas only, and the default greedy plan --
then times full forwards of the same batches through the original model (transformers' default
experts path) and both rewritten models (rq's torch reference path on CPU), interleaved per round
so noise hits all alike; prints medians and ratios to the original. Target (issue 5): <= 1.10x
for the replicas-only rewrite.

    OMP_NUM_THREADS=2 python scripts/bench_runtime.py [--model DIR] [--rounds 7]
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
from rq_tool.modelio import load_model, load_tokenizer, resolve_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default="mix")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    original, _ = load_model(path)
    name, texts = load_texts(args.dataset)
    data = pack(texts, load_tokenizer(path), num_samples=2 * args.batch_size, seq_len=args.seq_len, seed=1, name=name)
    batches = list(data.input_ids.split(args.batch_size))
    profile = rq_tool.calibrate(path, args.dataset, num_samples=32, seq_len=args.seq_len, progress=False)
    models = {"original": original}
    with tempfile.TemporaryDirectory() as tmp:
        for label, strategy in (("replicas-only", "replicate-only"), ("greedy (default)", "greedy")):
            out = Path(tmp) / strategy
            rq_tool.rewrite(path, profile, out, strategy=strategy, progress=False)
            models[label] = rq_tool.load(out)

        def run(model) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    model(input_ids=b, use_cache=False)
            return time.perf_counter() - t0

        for m in models.values():
            run(m)  # warm-up
        times = {k: [] for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                times[k].append(run(m))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": str(path), "tokens": sum(b.numel() for b in batches), "threads": args.threads,
           "median_s": med, "ratio": {k: med[k] / med["original"] for k in med}}
    if args.json:
        print(json.dumps(res))
        return
    print(f"model {path}: {res['tokens']} tokens per round, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'model':<20}{'median s':>10}{'x original':>12}")
    for k in med:
        print(f"{k:<20}{med[k]:>10.3f}{res['ratio'][k]:>12.2f}")


if __name__ == "__main__":
    main()

"""Calibration overhead: rq's instrumented forward vs a plain forward over the same batches.

Side by side in one process, interleaved (plain, recorder, recorder+quant_error per round) so
machine noise hits all three alike; reports medians over rounds and the ratios to plain.

    OMP_NUM_THREADS=2 python scripts/bench_calibrate.py [--model DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rq_tool import defaults
from rq_tool.calibrate import ExpertRecorder
from rq_tool.calibrate.data import load_texts, pack
from rq_tool.source import load_model, load_tokenizer, resolve_model_path
from rq_tool.quant import QUANT_SCHEMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: the bundled tiny MoE)")
    ap.add_argument("--dataset", default=defaults.DEFAULT_DATASET)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=defaults.SEQ_LEN)
    ap.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    model, family = load_model(path)
    name, texts = load_texts(args.dataset)
    data = pack(texts, load_tokenizer(path), num_samples=args.num_samples, seq_len=args.seq_len, seed=0, name=name)
    batches = list(data.input_ids.split(args.batch_size))

    def run(mode: str) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if mode == "plain":
                for b in batches:
                    model(input_ids=b, use_cache=False)
            else:
                with ExpertRecorder(model, family, QUANT_SCHEMES, quant_error=(mode == "quant_error")) as rec:
                    for b in batches:
                        rec.batch_size = b.shape[0]
                        model(input_ids=b, use_cache=False)
        return time.perf_counter() - t0

    modes = ("plain", "recorder", "quant_error")
    run("plain")  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            times[m].append(run(m))
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "model": str(path), "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "tokens": data.num_tokens, "threads": args.threads, "rounds": args.rounds,
        "median_s": med,
        "ratio_recorder": med["recorder"] / med["plain"],
        "ratio_quant_error": med["quant_error"] / med["plain"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {path} ({result['tokens']} tokens, {args.threads} threads, median of {args.rounds} rounds)")
    print(f"{'mode':<28}{'median s':>10}{'x plain':>9}")
    for m, label in (("plain", "plain forward"), ("recorder", "calibrate (no quant_error)"),
                     ("quant_error", f"calibrate + quant_error {','.join(QUANT_SCHEMES)}")):
        print(f"{label:<28}{med[m]:>10.3f}{med[m] / med['plain']:>9.2f}")


if __name__ == "__main__":
    main()

"""Quality and balance of every same-memory baseline on the bundled trained tiny MoE.

Everything is measured in this run: calibrate the model on the bundled ``mix`` set; tune LASER's
eps_high on calibration sequences; rewrite the model once per baseline (``rq_tool.eval.BASELINES``)
into a scratch directory; score each, and the original, on the corpus's held-out split (never the
calibration data). Held-out results are pooled two ways: equal tokens per training domain, and
mixed in the calibration set's own domain shares (so a plan is judged both on traffic shaped
like its calibration and on shifted traffic). One extra row plans rq's default on an equal-domain
sample of the training split instead (calibration matching the equal-domain traffic). Finally a
calibration-size study. Prints Markdown tables, checks the rq-default row against the project's
targets (reported, not tuned for), writes everything as JSON.

    OMP_NUM_THREADS=2 python scripts/bench_quality.py [--out bench_quality.json] [--model DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch is imported

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from rq_tool import defaults
from rq_tool.calibrate import calibrate, load_texts, pack
from rq_tool.eval import BASELINES, baseline_results, load_heldout, markdown_table, score_original, target_checks
from rq_tool.eval.laser import LaserConfig
from rq_tool.source import load_model, load_tokenizer, resolve_model_path

from calib_study import SIZES, markdown as study_markdown, sequence_loads, size_study  # scripts/
from laser_tuning import tune_laser  # scripts/


def bundled_mix_shares(tokenizer, dataset: str) -> dict[str, float] | None:
    """Token shares of the corpus domains in a bundled calibration set (whole set), or None.

    A bundled set named after a domain is all that domain; ``mix`` is made of documents of the
    per-domain bundled sets, so each of its documents is traced back to one of them.
    """
    from rq_tool.eval import corpus
    from rq_tool.calibrate import load_texts
    from rq_tool.calibrate.data import bundled_sets

    sets = bundled_sets()
    if dataset not in sets:
        return None
    if dataset in corpus.DOMAINS:
        return {dataset: 1.0}
    owner = {t: d for d in corpus.DOMAINS if d in sets for t in load_texts(d)[1]}
    tokens: dict[str, int] = {}
    for t in load_texts(dataset)[1]:
        d = owner.get(t)
        if d is None:
            return None
        tokens[d] = tokens.get(d, 0) + len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    total = sum(tokens.values())
    return {d: n / total for d, n in sorted(tokens.items())}


def write_equal_train_set(tokenizer, path, tokens_per_domain: int, seq_len: int) -> str:
    """A JSONL calibration set of the training split with equal tokens per domain (windows as texts)."""
    from rq_tool.eval import corpus
    from rq_tool.eval.perplexity import pack_tokens

    with open(path, "w") as f:
        for d in corpus.DOMAINS:
            for window in pack_tokens(tokenizer, corpus.train_texts(d), seq_len, tokens_per_domain):
                f.write(json.dumps({"text": tokenizer.decode(window.tolist())}) + "\n")
    return str(path)


def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{d} {v:.0%}" for d, v in shares.items())


def _targets_md(checks) -> str:
    lines = []
    for c in checks:
        v = c["value"]
        lines.append(f"- [{'x' if c['met'] else ' '}] {c['target']}: {'-' if v is None else f'{v:.4g}'} "
                     f"-> {'MET' if c['met'] else 'NOT MET'}")
    return "\n".join(lines)


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: the bundled tiny MoE)")
    ap.add_argument("--dataset", default=defaults.DEFAULT_DATASET, help="calibration set")
    ap.add_argument("--heldout", action="append", default=[],
                    help="held-out file(s), one domain each (default: the bundled corpus's held-out split)")
    ap.add_argument("--num-samples", type=int, default=defaults.NUM_SAMPLES, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=defaults.HELDOUT_SEQ_LEN)
    ap.add_argument("--max-tokens", type=int, default=defaults.HELDOUT_TOKENS, help="held-out tokens per domain")
    ap.add_argument("--batch-size", type=int, default=defaults.HELDOUT_BATCH_SIZE)
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--laser-eps-high", type=float, default=None,
                    help="fix LASER's eps_high (default: tuned on the calibration set, see tune_laser)")
    ap.add_argument("--laser-t-fix", type=float, default=LaserConfig().t_fix)
    ap.add_argument("--laser-candidates", type=int, default=None)
    ap.add_argument("--no-train-calibrated", action="store_true",
                    help="skip the extra rq-default row planned on an equal-domain sample of the training split")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="calibration-size study (sequences)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_quality.json")
    return ap.parse_args(argv)


def laser_setting(path, tokenizer, args, cal: dict, log) -> tuple[LaserConfig, list[dict]]:
    """LASER's thresholds: given, or eps_high tuned on (a slice of) the calibration data, as the
    paper tunes per model. Returns ``(config, sweep rows)``."""
    if args.laser_eps_high is not None:
        return LaserConfig(args.laser_eps_high, args.laser_t_fix, args.laser_candidates), []
    model, family = load_model(path)
    name, texts = load_texts(args.dataset)
    ids = pack(texts, tokenizer, num_samples=min(32, args.num_samples), seq_len=args.seq_len, seed=cal["seed"],
               name=name).input_ids
    laser, sweep = tune_laser(model, family, ids, t_fix=args.laser_t_fix, num_candidates=args.laser_candidates,
                              batch_size=args.batch_size)
    log(f"LASER tuned on {ids.shape[0]} calibration sequences: eps_high={laser.eps_high}")
    return laser, sweep


def score_all(path, tokenizer, profile, heldout, laser, shares, args, log) -> tuple[list[dict], list[dict]]:
    """Score the original and every named baseline; plus (unless disabled) rq's default planned on
    an equal-domain sample of the training split. Returns ``(rows, extra rows)``."""
    names = tuple(n.strip() for n in args.baselines.split(",") if n.strip())
    original = score_original(path, heldout, batch_size=args.batch_size, plan_load=profile.load_matrix(),
                              info={"summary": BASELINES["original"].summary})
    log("scored original")
    with tempfile.TemporaryDirectory(prefix="rq-bench-") as work:
        results = baseline_results(path, profile, heldout, work, names=names, laser=laser, batch_size=args.batch_size,
                                   domain_weights=shares, original=original, log=log)
        extra = []
        if not args.no_train_calibrated and not args.heldout:
            from rq_tool.eval import corpus

            per_domain = args.num_samples * args.seq_len // len(corpus.DOMAINS) + args.seq_len
            train_set = write_equal_train_set(tokenizer, Path(work) / "train_equal.jsonl", per_domain, args.seq_len)
            profile_eq = calibrate(path, train_set, num_samples=args.num_samples, seq_len=args.seq_len,
                                   batch_size=args.batch_size, progress=False)
            log("calibrated on the equal-domain training sample")
            extra = baseline_results(path, profile_eq, heldout, work, names=("greedy", "greedy-unguarded", "greedy-ep8"),
                                     batch_size=args.batch_size, domain_weights=shares, original=original,
                                     suffix=" (cal: train, equal)", log=log)
    return results, extra


def calibration_size_study(path, args, results: list[dict], shares, log) -> dict:
    """How many calibration sequences a stable plan needs: ``{"heldout" (, "matched"): rows}``."""
    sizes = tuple(int(s) for s in args.sizes.split(","))
    seq_load = sequence_loads(path, args.dataset, max_sequences=max(sizes), seq_len=args.seq_len,
                              batch_size=args.batch_size)
    study = {"heldout": size_study(seq_load, torch.tensor(results[0]["lis"]["load_before"]), sizes)}
    if shares:
        study["matched"] = size_study(seq_load, torch.tensor(results[0]["matched"]["lis"]["load_before"]), sizes)
    log(f"calibration-size study on up to {seq_load.shape[1]} sequences")
    return study


def run(args, log) -> dict:
    """Every measurement of the benchmark; the JSON it writes."""
    t_start = time.perf_counter()
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    profile = calibrate(path, args.dataset, num_samples=args.num_samples, seq_len=args.seq_len,
                        batch_size=args.batch_size, progress=False)
    cal = profile.calibration
    log(f"calibrated on {cal['dataset']!r}: {cal['sequences']} x {cal['seq_len']} tokens")
    heldout = load_heldout(tokenizer, tuple(args.heldout), seq_len=args.seq_len, max_tokens=args.max_tokens,
                           calibration_sha256=cal["sha256"])
    log("held-out: " + ", ".join(f"{d} {x.shape[0]}x{x.shape[1]}" for d, x in heldout.domains.items()))
    shares = bundled_mix_shares(tokenizer, args.dataset)
    if shares and not set(shares) <= set(heldout.domains):
        shares = None
    laser, sweep = laser_setting(path, tokenizer, args, cal, log)
    results, extra = score_all(path, tokenizer, profile, heldout, laser, shares, args, log)
    study = calibration_size_study(path, args, results, shares, log)
    rows = results + extra
    targets = {"heldout": target_checks(rows)}
    if shares:
        targets["matched"] = target_checks(rows, pool="matched")
    if extra:
        targets["train_equal_heldout"] = target_checks(rows, name=extra[0]["name"])
    return {"model": str(path), "profile_calibration": cal, "domain_shares": shares, "heldout": heldout.describe(),
            "laser": laser.to_dict(), "laser_sweep": sweep, "results": rows, "extra_names": [r["name"] for r in extra],
            "targets": targets, "calibration_size_study": study, "seconds": time.perf_counter() - t_start,
            "threads": args.threads}


def render(out: dict, args) -> str:
    """The Markdown report of ``run``'s result."""
    cal, shares, rows, laser, targets = (out["profile_calibration"], out["domain_shares"], out["results"],
                                         out["laser"], out["targets"])
    doms = list(out["heldout"]["domains"])
    unseen = out["heldout"]["unseen"]
    seen = ", ".join(d for d in doms if d not in unseen)
    lines = [f"# rq quality benchmark: {Path(out['model']).name}\n",
             f"Calibration: {cal['dataset']!r}, {cal['sequences']} sequences x {cal['seq_len']} tokens"
             + (f" (domain token shares of the set: {_shares(shares)})" if shares else "")
             + f". Budget {defaults.BUDGET}x expert bytes per layer. LASER {laser}. Threads {out['threads']}.\n",
             f"## Held-out, equal tokens per domain ({seen}: {args.max_tokens} tokens each; unseen: "
             f"{', '.join(unseen) or 'none'})\n",
             markdown_table(rows)]
    if shares:
        lines += [f"\n## Held-out, mixed like the calibration set ({_shares(shares)})\n",
                  markdown_table(rows, pool="matched")]
    lines += [f"\n## Per-domain LIS mean over layers (pooled per domain / per batch of {args.batch_size} "
              "single-domain sequences)\n",
              "| baseline | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    for r in rows:
        cells = [f"{r['lis']['domains'][d]['mean_after']:.2f} / {r['lis']['domains'][d]['batch_mean_after']:.2f}"
                 for d in doms]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines.append("\n## Targets for rq's default (greedy, planned on the calibration set) — reported, not tuned for\n")
    lines.append("Held-out, equal domains:\n\n" + _targets_md(targets["heldout"]))
    if "matched" in targets:
        lines.append("\nHeld-out, calibration-shaped mixture:\n\n" + _targets_md(targets["matched"]))
    if "train_equal_heldout" in targets:
        lines.append(f"\n{out['extra_names'][0]} on held-out, equal domains (calibration matches this traffic):\n\n"
                     + _targets_md(targets["train_equal_heldout"]))
    if out["laser_sweep"]:
        lines.append("\n## LASER threshold sweep on the calibration sequences (t_fix "
                     f"{laser['t_fix']}, candidates {laser['num_candidates'] or '2 x top-k'})\n")
        lines.append("| eps_high | ppl Δ% | LIS mean | tokens with a choice |\n|---|---|---|---|")
        lines += [f"| {x['eps_high']} | {x['ppl_delta_pct']:+.2f} | {x['lis_mean']:.3f} | {x['rerouted']:.1%} |"
                  for x in out["laser_sweep"]]
    for pool, rows_ in out["calibration_size_study"].items():
        what = "equal-domain held-out" if pool == "heldout" else "calibration-shaped held-out mixture"
        lines.append(f"\n## Calibration-size study: {cal['dataset']!r} samples vs the original model's loads on the "
                     f"{what}\n")
        lines.append(study_markdown(rows_))
    lines.append(f"\n(all numbers measured in this run, {out['seconds']:.0f}s)")
    return "\n".join(lines)


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    out = run(args, log)
    print(render(out, args))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

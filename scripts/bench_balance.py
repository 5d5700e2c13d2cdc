"""Per-step expert-parallel balance: rq's planner vs the original layout, EPLB and the paper setting.

Everything is measured in this run, side by side:

1. Bundled tiny MoE, held-out text (the corpus's held-out split, never calibrated on): per-step
   device max/mean on EP8 (round-robin and load-aware dispatch) at 1 / 8 / 64 sequences per step,
   mixed and single-domain steps, for the original model on standard EP, EPLB at the same slot
   count, and rq's default plan (``rq_tool.plan.balance``, the ``rq plan --engine rq`` path),
   calibrated on the bundled ``mix`` set and on a sample of the training split; plus
   leave-one-domain-out (plan without domain d's calibration sequences, score on held-out d).
2. Synthetic Zipf loads, s in {1, 1.5, 2} x E in {8, 64, 256} x G in {8, 32, 64}, at EPLB's slot
   count (E + 25% rounded up to a multiple of G): rq vs EPLB vs the paper setting (one replica of
   the heaviest expert) vs the lower bound (the heaviest per-copy load when the slots go to the
   experts as evenly as possible, over the mean; 1.0 at least).
3. Planning time at DeepSeek-V3 scale (E=256, L=61, G=64, 64 sequences in 4 domains).

    OMP_NUM_THREADS=2 python scripts/bench_balance.py [--out bench_balance.json] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch is imported

import argparse
import json
import math
import statistics
import time
import warnings

import torch

from rq_tool import defaults
from rq_tool.eval.ep import per_step_balance
from rq_tool.plan.balance import Layout, plan_balance
from rq_tool.plan.layout import replicate
from rq_tool.plan.eplb import rebalance_experts
from rq_tool.plan.steps import contiguous_layout, max_over_mean, step_device_loads

G_MODEL = 8


def eplb_layout(weight: torch.Tensor, P: int, G: int) -> Layout:
    phy2log, _, _ = rebalance_experts(weight.double(), P, 1, 1, G)
    L = weight.shape[0]
    return Layout(phy2log, (torch.arange(P) // (P // G)).repeat(L, 1))


def paper_layout(weight: torch.Tensor, G: int) -> Layout:
    """The R&Q paper setting: the heaviest expert of each layer gets one replica (E + 1 slots), placed LPT."""
    from rq_tool.plan.layout import build_layout

    L, E = weight.shape
    phy, dev, _ = build_layout(weight.double(), torch.full((L,), E + 1), G)
    return Layout(phy, dev)


def lower_bound(weight: torch.Tensor, P: int, G: int) -> torch.Tensor:
    """``[L]``: max(1, heaviest per-copy load with P slots spread as evenly as possible / mean device load)."""
    L, E = weight.shape
    cnt = replicate(weight.double(), torch.full((L,), P))
    return (G * (weight.double() / cnt).amax(-1) / weight.double().sum(-1)).clamp(min=1.0)


# ---------------------------------------------------------------------------- bundled model
def seq_loads_of(model, family, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    from rq_tool.calibrate import CalibrationData, profile_model

    data = CalibrationData("heldout", "", ids, 0)
    _, loads = profile_model(model, family, data, batch_size=batch_size, quant_error=False, progress=False,
                             return_seq_loads=True)
    return loads


def calibration_sets(tokenizer, model, family, args):
    """``{name: (seq_loads [N, L, E], domain [N], names)}``: bundled ``mix`` and a training-split sample."""
    from rq_tool.eval import corpus
    from rq_tool.calibrate import load_tags, load_texts, pack

    out = {}
    name, texts = load_texts(defaults.DEFAULT_DATASET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = pack(texts, tokenizer, num_samples=args.num_samples, seq_len=defaults.SEQ_LEN, seed=defaults.SEED,
                    name=name, tags=load_tags(defaults.DEFAULT_DATASET, texts))
        out["mix (bundled)"] = (seq_loads_of(model, family, data.input_ids, 8), data.seq_domain, data.domains)
        tr_texts, tr_tags = [], []
        for d in corpus.DOMAINS:
            t = corpus.train_texts(d)
            tr_texts += t
            tr_tags += [d] * len(t)
        data = pack(tr_texts, tokenizer, num_samples=args.num_samples, seq_len=defaults.SEQ_LEN, seed=defaults.SEED,
                    name="train", tags=tr_tags)
        out["training split"] = (seq_loads_of(model, family, data.input_ids, 8), data.seq_domain, data.domains)
    return out


def model_section(args, log) -> dict:
    from rq_tool.eval.heldout import load_heldout
    from rq_tool.source import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(None)
    tokenizer = load_tokenizer(path)
    model, family = load_model(path)
    heldout = load_heldout(tokenizer, max_tokens=args.heldout_tokens)
    held = {d: seq_loads_of(model, family, ids, 8) for d, ids in heldout.domains.items()}
    log("held-out: " + ", ".join(f"{d} {x.shape[0]} seqs" for d, x in held.items()))
    cals = calibration_sets(tokenizer, model, family, args)
    L, E = next(iter(held.values())).shape[1:]
    G = G_MODEL
    P = args.model_slots
    original = Layout(*contiguous_layout(L, E, G))
    res: dict = {"ep": G, "slots": P, "experts": E, "calibrations": {}}
    for cname, (seq, dom, names) in cals.items():
        t0 = time.perf_counter()
        plan = plan_balance(seq, G, P, original, policy="load-aware", per_step=defaults.SEQS_PER_STEP, groups=dom,
                            group_names=names, fill_all=True)
        t_plan = time.perf_counter() - t0
        layouts = {"original": original, "eplb": eplb_layout(seq.sum(0).double(), P, G), "rq": plan.layout}
        table = per_step_balance(held, layouts, G, seed=args.seed)
        lodo = {}
        for i, d in enumerate(names or ()):
            if d not in held:
                continue
            keep = dom != i
            p_d = plan_balance(seq[keep], G, P, original, policy="load-aware", per_step=defaults.SEQS_PER_STEP,
                               groups=dom[keep], group_names=names, fill_all=True)
            t = per_step_balance({d: held[d]}, {"original": original, "rq": p_d.layout}, G,
                                 per_steps=(defaults.SEQS_PER_STEP,), seed=args.seed)
            lodo[d] = {pol: {k: v["mean"] for k, v in t[pol][defaults.SEQS_PER_STEP][d].items()} for pol in t}
        slots_used = int((plan.layout.phy2log >= 0).sum(-1).float().mean())
        res["calibrations"][cname] = {"per_step": table, "leave_one_domain_out": lodo, "choice": plan.choice,
                                      "plan_seconds": t_plan, "mean_slots_used": slots_used,
                                      "sequences": int(seq.shape[0])}
        log(f"{cname}: planned in {t_plan:.1f}s, choice {plan.choice}, ~{slots_used} slots per layer")
    if not args.no_rewrite:
        res["rewrite"] = rewrite_section(args, log, held, original, G)
    return res


def rewrite_section(args, log, held, original, G) -> dict:
    """The default ``rq rewrite --ep-size 8`` (budget 1.0x, accuracy guard) on the bundled model:
    held-out perplexity vs the original, bf16 share, and per-step balance of its placement."""
    import tempfile

    from rq_tool import rewrite
    from rq_tool.calibrate import calibrate
    from rq_tool.eval import evaluate

    prof = calibrate(None, defaults.DEFAULT_DATASET, num_samples=args.num_samples, progress=False)
    with tempfile.TemporaryDirectory(prefix="rq-bench-balance-") as tmp:
        out = f"{tmp}/tiny-ep{G}"
        r = rewrite(None, prof, out, ep_size=G, progress=False)
        plan = r.plan
        lay = Layout(torch.nn.utils.rnn.pad_sequence([lp.phy2log for lp in plan.layers], True, -1),
                     torch.nn.utils.rnn.pad_sequence([lp.slot_device for lp in plan.layers], True, -1))
        table = per_step_balance(held, {"original": original, "rq rewrite": lay}, G, seed=args.seed,
                                 policies=("load-aware",))
        ev = evaluate(None, out, device_counts=(G,))
    cand = ev["results"][1]
    slots = [i for lp in plan.layers for i in lp.slot_scheme.tolist()]
    ppl = {d: q["ppl_delta_pct"] for d, q in cand["quality"].items()}
    row = {"ppl_delta_pct": ppl, "bytes_ratio": cand["bytes"]["ratio"],
           "source_share": sum(1 for i in slots if i == 0) / len(slots), "slots": len(slots),
           "replicas": sum(lp.num_replicas for lp in plan.layers), "per_step": table,
           "choice": plan.balance["choice"], "pred_error": plan.pred_error}
    log(f"rewrite --ep-size {G}: ppl delta {ppl}, bf16 share {row['source_share']:.2%}, {row['replicas']} replicas")
    return row


# ---------------------------------------------------------------------------- synthetic
def zipf_loads(E: int, s: float, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([base[torch.randperm(E, generator=g)] for _ in range(L)]) * 1e6


def synthetic_section(args, log) -> list[dict]:
    rows = []
    L = args.synthetic_layers
    for s in (1.0, 1.5, 2.0):
        for E in (8, 64, 256):
            for G in (8, 32, 64):
                P = G * math.ceil(1.25 * E / G)
                w = zipf_loads(E, s, L, seed=int(10 * s) + E + G)
                counts = w.round().long()[None]
                lb = lower_bound(w, P, G)
                orig = Layout(torch.arange(P).remainder(E).repeat(L, 1), (torch.arange(P) // (P // G)).repeat(L, 1))
                t0 = time.perf_counter()
                la = plan_balance(counts, G, P, orig, policy="load-aware", per_step=1, fill_all=True).layout
                rr = plan_balance(counts, G, P, orig, policy="round-robin", per_step=1, fill_all=True).layout
                t = time.perf_counter() - t0

                def score(lay, pol):
                    return max_over_mean(step_device_loads(counts, lay.phy2log, lay.slot_device, G, pol))[0]

                ep = eplb_layout(w, P, G)
                pa = paper_layout(w, G)
                row = {"s": s, "E": E, "G": G, "P": P, "lower_bound": float(lb.mean()),
                       "eplb": float(score(ep, "round-robin").mean()),
                       "eplb_load_aware": float(score(ep, "load-aware").mean()),
                       "paper": float(score(pa, "round-robin").mean()),
                       "rq_round_robin": float(score(rr, "round-robin").mean()),
                       "rq_load_aware": float(score(la, "load-aware").mean()), "seconds": t}
                rows.append(row)
                cell = row["eplb"] > 1.10 * row["lower_bound"]  # a cell the target applies to
                log(f"zipf s={s} E={E} G={G} P={P}: LB {row['lower_bound']:.3f} EPLB {row['eplb']:.3f} paper "
                    f"{row['paper']:.3f} rq-rr {row['rq_round_robin']:.3f} rq-la {row['rq_load_aware']:.3f}"
                    + (f" (target rq-la <= {1.03 * row['lower_bound']:.3f})" if cell else ""))
    return rows


def timing_section(args, log) -> dict:
    N, L, E, G = 64, 61, 256, 64
    g = torch.Generator().manual_seed(0)
    w = zipf_loads(E, 1.2, L, seed=1)
    dom = torch.arange(N) % 4
    lam = w[None] * torch.exp(0.5 * torch.randn(4, L, E, generator=g))[dom]
    lam = lam / lam.sum(-1, keepdim=True) * defaults.SEQ_LEN * 8
    seq = torch.poisson(lam, generator=g).long()
    P = G * math.ceil(1.125 * E / G)
    orig = Layout(torch.arange(P).remainder(E).repeat(L, 1), (torch.arange(P) // (P // G)).repeat(L, 1))
    times = {}
    for policy in ("load-aware", "round-robin"):
        ts = []
        for _ in range(args.timing_repeats):
            t0 = time.perf_counter()
            plan_balance(seq, G, P, orig, policy=policy, per_step=8, groups=dom, group_names=list("abcd"),
                         fill_all=True)
            ts.append(time.perf_counter() - t0)
        times[policy] = statistics.median(ts)
        log(f"planning E={E} L={L} G={G} P={P} ({policy}): median {times[policy]:.1f}s over {len(ts)}")
    return {"E": E, "L": L, "G": G, "P": P, "N": N, "seconds": times}


# ---------------------------------------------------------------------------- report
def targets(model, synth, timing) -> list[tuple[str, bool, str]]:
    out = []
    cells = [r for r in synth if r["eplb"] > 1.10 * r["lower_bound"]]
    if synth:
        worst = max((r["rq_load_aware"] / r["lower_bound"] for r in cells), default=1.0)
        out.append(("Zipf: rq (load-aware) within 3% of the lower bound where EPLB is >10% above it",
                    worst <= 1.03, f"worst rq/LB {worst:.3f} over {len(cells)} cells"))
        worst_rr = max((r["rq_round_robin"] / r["lower_bound"] for r in cells), default=1.0)
        out.append(("Zipf: same, rq with round-robin dispatch", worst_rr <= 1.03, f"worst rq/LB {worst_rr:.3f}"))
    if timing:
        t = max(timing["seconds"].values())
        out.append(("planning E=256, L=61, G=64 under 10 s", t < 10, f"{t:.1f}s"))
    if model:
        b = defaults.SEQS_PER_STEP
        for cname, c in model["calibrations"].items():
            la = c["per_step"]["load-aware"][b]
            mixed = la["mixed"]["rq"]["mean"]
            single = max(v["rq"]["mean"] for k, v in la.items() if k != "mixed")
            out.append((f"{cname}: held-out mixed steps, EP8 load-aware <= 1.10", mixed <= 1.10, f"{mixed:.3f}"))
            out.append((f"{cname}: held-out single-domain steps <= 1.25 (worst domain)", single <= 1.25, f"{single:.3f}"))
            worse = [d for d, v in c["leave_one_domain_out"].items() if v["load-aware"]["rq"] > v["load-aware"]["original"]]
            out.append((f"{cname}: leave-one-domain-out never worse than the original",
                        not worse, "worse on " + ", ".join(worse) if worse else "no domain worse"))
        rw = model.get("rewrite")
        if rw:
            worst = max(rw["ppl_delta_pct"].values())
            out.append(("rq rewrite --ep-size 8 (default): held-out perplexity change <= +0.5% on every domain",
                        worst <= 0.5, f"worst {worst:+.3f}%, {rw['source_share']:.1%} of slots bf16"))
            la = rw["per_step"]["load-aware"][b]
            out.append(("rq rewrite --ep-size 8 (1.0x memory): held-out mixed steps <= 1.10",
                        la["mixed"]["rq rewrite"]["mean"] <= 1.10, f"{la['mixed']['rq rewrite']['mean']:.3f} "
                        f"(standard EP {la['mixed']['original']['mean']:.3f})"))
    return out


def markdown(model, synth, timing, checks) -> str:
    lines = []
    if model:
        for cname, c in model["calibrations"].items():
            lines += [f"### Bundled model, EP{model['ep']}, {model['slots']} slots per layer, calibrated on {cname}",
                      "", "| dispatch | seqs/step | steps | original | EPLB | rq |", "|---|---|---|---|---|---|"]
            for pol, by_b in c["per_step"].items():
                for b, by_steps in by_b.items():
                    for st, v in by_steps.items():
                        lines.append(f"| {pol} | {b} | {st} | " + " | ".join(
                            f"{v[k]['mean']:.3f} [{v[k]['p10']:.2f}-{v[k]['p90']:.2f}]" for k in ("original", "eplb", "rq"))
                            + " |")
            lines += ["", "leave-one-domain-out (8 seqs/step, load-aware): " + ", ".join(
                f"{d} {v['load-aware']['original']:.3f} -> {v['load-aware']['rq']:.3f}"
                for d, v in c["leave_one_domain_out"].items()), ""]
    rw = (model or {}).get("rewrite")
    if rw:
        lines += ["### rq rewrite --ep-size 8 (budget 1.0x, default accuracy guard)", "",
                  f"held-out perplexity change per domain: " + ", ".join(f"{d} {v:+.3f}%" for d, v in rw["ppl_delta_pct"].items()),
                  f"; expert bytes {rw['bytes_ratio']:.3f}x; {rw['source_share']:.1%} of {rw['slots']} slots bf16; "
                  f"{rw['replicas']} replicas", "", "| seqs/step | steps | standard EP | rq rewrite |", "|---|---|---|---|"]
        for b, by_steps in rw["per_step"]["load-aware"].items():
            for st, v in by_steps.items():
                lines.append(f"| {b} | {st} | {v['original']['mean']:.3f} | {v['rq rewrite']['mean']:.3f} |")
        lines.append("")
    lines += ["### Synthetic Zipf (pooled loads, one step), EPLB's slot count", "",
              "| s | E | G | P | lower bound | EPLB | paper | rq round-robin | rq load-aware | target (1.03 x LB where EPLB > 1.10 x LB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in synth:
        tgt = f"<= {1.03 * r['lower_bound']:.3f}" if r["eplb"] > 1.10 * r["lower_bound"] else "-"
        lines.append(f"| {r['s']} | {r['E']} | {r['G']} | {r['P']} | {r['lower_bound']:.3f} | {r['eplb']:.3f} | "
                     f"{r['paper']:.3f} | {r['rq_round_robin']:.3f} | {r['rq_load_aware']:.3f} | {tgt} |")
    if timing:
        lines += ["", f"planning time E={timing['E']} L={timing['L']} G={timing['G']}: " +
                  ", ".join(f"{k} {v:.1f}s" for k, v in timing["seconds"].items())]
    lines += ["", "### Targets", "", "| target (issue 13) | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {m} | {'met' if ok else 'NOT met'} |" for name, ok, m in checks]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_balance.json")
    ap.add_argument("--num-samples", type=int, default=defaults.NUM_SAMPLES, help="calibration sequences")
    ap.add_argument("--heldout-tokens", type=int, default=64 * defaults.SEQ_LEN, help="held-out tokens per domain")
    ap.add_argument("--model-slots", type=int, default=24, help="slots per layer on the bundled model (E = 16)")
    ap.add_argument("--synthetic-layers", type=int, default=4)
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-model", action="store_true", help="skip the bundled-model section")
    ap.add_argument("--no-rewrite", action="store_true", help="skip the rq rewrite --ep-size perplexity check")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic Zipf section")
    ap.add_argument("--no-timing", action="store_true", help="skip the planning-time section")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    model = None if args.no_model else model_section(args, log)
    synth = [] if args.no_synthetic else synthetic_section(args, log)
    timing = None if args.no_timing else timing_section(args, log)
    checks = targets(model, synth, timing)
    print(markdown(model, synth, timing, checks))
    with open(args.out, "w") as f:
        json.dump({"model": model, "synthetic": synth, "timing": timing,
                   "targets": [{"target": n, "met": ok, "measured": m} for n, ok, m in checks],
                   "omp_num_threads": int(os.environ["OMP_NUM_THREADS"])}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

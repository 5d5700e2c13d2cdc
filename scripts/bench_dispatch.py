"""Benchmark rq's replica-aware dispatch + expert compute against baselines on one routed batch.

On CUDA: the Triton kernels and the torch reference vs transformers' grouped_mm experts path
(logical experts, no replicas), timed with CUDA events. On CPU: the Triton timings need CUDA, so
it times the torch reference (what the rq runtime runs on CPU) vs a plain per-expert loop
(transformers' eager experts) and grouped_mm, with a fixed thread count.

Every time is the median of ``--runs`` runs after warm-up; ratios are against the baseline
measured in the same run (grouped_mm on CUDA, the per-expert loop on CPU). Example:

    python scripts/bench_dispatch.py                     # CUDA if present, else CPU defaults
    python scripts/bench_dispatch.py --tokens 512 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="T (default 4096 on CUDA, 256 on CPU)")
    p.add_argument("--experts", type=int, default=64, help="E logical experts")
    p.add_argument("--top-k", type=int, default=8, help="K")
    p.add_argument("--hidden", type=int, help="H (default 2048 on CUDA, 512 on CPU)")
    p.add_argument("--inter", type=int, help="I (default 768 on CUDA, 256 on CPU)")
    p.add_argument("--extra-slots", type=int, default=16, help="replica slots beyond E (P = E + this)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--runs", type=int, default=20, help="timed runs per path (median reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS), fixed for the run")
    p.add_argument("--cpu", action="store_true", help="run the CPU benchmark even when CUDA is present")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p.parse_args(argv)


ARGS = parse_args()
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)  # before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rq_tool.arch.activation import activation_fn  # noqa: E402
from rq_tool.kernels import SlotWeights, moe_experts, replica_dispatch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACT = "glu:silu"


def make_batch(T, E, K, H, I, extra, dtype, device, seed=0):
    """Skewed routing (a few heavy hitters), replicas greedily to the largest load per slot (EPLB-style)."""
    g = torch.Generator().manual_seed(seed)
    skew = torch.distributions.Exponential(1.0).sample((E,)) * 2.0
    scores = torch.randn(T, E, generator=g) + skew
    topk = torch.softmax(scores, -1).topk(K, dim=-1)
    topk_ids, topk_weights = topk.indices, (topk.values / topk.values.sum(-1, keepdim=True))
    load = torch.bincount(topk_ids.reshape(-1), minlength=E).float()
    logcnt = torch.ones(E, dtype=torch.int64)
    for _ in range(extra):
        logcnt[torch.argmax(load / logcnt)] += 1
    phy2log = torch.repeat_interleave(torch.arange(E), logcnt)
    P, R = phy2log.numel(), int(logcnt.max())
    log2phy = torch.full((E, R), -1, dtype=torch.int64)
    starts = torch.cumsum(logcnt, 0) - logcnt
    for e in range(E):
        log2phy[e, : logcnt[e]] = torch.arange(starts[e], starts[e] + logcnt[e])
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    to = lambda t, dt=None: t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return dict(
        x=to(torch.randn(T, H, generator=g), dtype), topk_ids=to(topk_ids), topk_weights=to(topk_weights, dtype),
        log2phy=to(log2phy), logcnt=to(logcnt), phy2log=phy2log, load=load,
        gate_up=to(gate_up, dtype), down=to(down, dtype), P=P,
    )


def slot_weights(b, schemes_of_slot):
    """SlotWeights of the replicated layer; each slot a copy of its logical expert."""
    gu, dn = b["gate_up"][b["phy2log"]], b["down"][b["phy2log"]]
    return SlotWeights.from_dense(gu, dn, schemes_of_slot, ACT)


def mixed_schemes(b, base):
    """Replica copies int8, the coldest quarter of experts nf4, the rest ``base``."""
    cold = set(torch.argsort(b["load"])[: len(b["load"]) // 4].tolist())
    seen, out = set(), []
    for e in b["phy2log"].tolist():
        out.append("nf4" if e in cold else ("int8" if e in seen else base))
        seen.add(e)
    return out


def per_expert_loop(x, topk_ids, topk_weights, gate_up, down):
    """transformers' eager experts: one masked gather + two linears + index_add_ per logical expert."""
    act = activation_fn(ACT)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        tok, k = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel():
            h = F.linear(act(F.linear(x[tok], gate_up[e])), down[e])
            y.index_add_(0, tok, h.float() * topk_weights[tok, k, None].float())
    return y.to(x.dtype)


def grouped_mm_fn(b):
    """transformers' grouped_mm experts forward on the logical experts, or None if unavailable."""
    try:
        from transformers.integrations.moe import _default_apply_gate, grouped_mm_experts_forward
    except ImportError:
        return None
    mod = types.SimpleNamespace(
        num_experts=b["gate_up"].shape[0], _is_expert_parallel=False, has_gate=True, has_bias=False,
        is_transposed=False, gate_up_proj=b["gate_up"], down_proj=b["down"], has_post_expert_norm=False,
        act_fn=torch.nn.functional.silu,
    )
    mod._apply_gate = lambda h: _default_apply_gate(mod, h)
    return lambda: grouped_mm_experts_forward(mod, b["x"], b["topk_ids"], b["topk_weights"])


def median_ms(fn, runs, cuda):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    cuda = torch.cuda.is_available() and not ARGS.cpu
    device = "cuda" if cuda else "cpu"
    T = ARGS.tokens or (4096 if cuda else 256)
    H, I = ARGS.hidden or (2048 if cuda else 512), ARGS.inter or (768 if cuda else 256)
    dtype = DTYPES[ARGS.dtype or ("bf16" if cuda else "fp32")]
    E, K = ARGS.experts, ARGS.top_k
    torch.set_num_threads(ARGS.threads)
    b = make_batch(T, E, K, H, I, ARGS.extra_slots, dtype, device)
    base = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    w_float = slot_weights(b, [base] * b["P"])
    w_mixed = slot_weights(b, mixed_schemes(b, base))
    route = (b["topk_ids"], b["log2phy"], b["logcnt"], b["P"])

    def rq(impl, w):
        d = replica_dispatch(*route, block_size=64, impl=impl)
        return moe_experts(b["x"], b["topk_weights"], d, w, impl=impl)

    paths = {}
    gmm = grouped_mm_fn(b)
    loop = lambda: per_expert_loop(b["x"], b["topk_ids"], b["topk_weights"], b["gate_up"], b["down"])  # noqa: E731
    if cuda:
        if gmm is not None:
            paths["transformers grouped_mm (E experts)"] = gmm
        paths["per-expert loop (E experts)"] = loop
        paths["rq dispatch: triton"] = lambda: replica_dispatch(*route, impl="triton")
        paths["rq dispatch: torch ref"] = lambda: replica_dispatch(*route, impl="torch")
        for name, w in ((base, w_float), ("mixed", w_mixed)):
            paths[f"rq dispatch+experts {name}: triton"] = lambda w=w: rq("triton", w)
            paths[f"rq dispatch+experts {name}: torch ref"] = lambda w=w: rq("torch", w)
    else:
        print("note: Triton timings need CUDA; timing the torch reference path on CPU", file=sys.stderr)
        paths["per-expert loop (E experts)"] = loop
        if gmm is not None:
            paths["transformers grouped_mm (E experts)"] = gmm
        paths["rq dispatch: torch ref"] = lambda: replica_dispatch(*route, impl="torch")
        for name, w in ((base, w_float), ("mixed", w_mixed)):
            paths[f"rq dispatch+experts {name}: torch ref"] = lambda w=w: rq("torch", w)

    # sanity: the float rq path equals the logical computation up to rounding (replicas are copies)
    ref = loop().float()
    err = (rq("torch", w_float).float() - ref).abs().max().item() / ref.abs().max().item()
    errs = {"max_rel_err_float_vs_loop": err}
    if cuda:  # smoke check of the kernels on real hardware: Triton vs torch reference, both weight sets
        for name, w in ((base, w_float), ("mixed", w_mixed)):
            want = rq("torch", w).float()
            errs[f"max_rel_err_triton_vs_ref_{name}"] = ((rq("triton", w).float() - want).abs().max()
                                                         / want.abs().max()).item()
    results = {name: median_ms(fn, ARGS.runs, cuda) for name, fn in paths.items()}
    baseline = next(iter(results))
    setup = dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({ARGS.threads} threads)",
                 T=T, E=E, K=K, H=H, I=I, P=b["P"], dtype=base, runs=ARGS.runs, baseline=baseline, **errs)
    if ARGS.json:
        print(json.dumps(dict(setup=setup, median_ms=results,
                              ratio_vs_baseline={k: v / results[baseline] for k, v in results.items()})))
        return
    print(" ".join(f"{k}={v}" for k, v in setup.items() if k not in errs))
    for k, v in errs.items():
        print(f"check: {k} = {v:.2e}")
    width = max(map(len, results))
    print(f"{'path':<{width}}  {'median ms':>10}  {'x baseline':>10}")
    for name, ms in results.items():
        print(f"{name:<{width}}  {ms:>10.3f}  {ms / results[baseline]:>10.2f}")


if __name__ == "__main__":
    main()

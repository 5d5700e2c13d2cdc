"""Expert compute over physical slots: torch reference vs a naive per-token loop (full T x E x K grid,
then dtypes x scheme mixes x activations), Triton kernel vs reference (interpreted subset).

Triton runs on CUDA when present, else in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported). Interpreted, each program costs ~20 ms, so the kernel runs on
KERNEL_CASES: every scheme kind, dtype and activation, biases, T in {0, 1, 33} with E up to 128,
and T=4096 only with E=8, K=2 and block_size 256.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_cases import ROUTING_GRID  # noqa: E402

from rq_tool.arch.activation import expert_forward  # noqa: E402
from rq_tool.kernels import SlotWeights, moe_experts, moe_experts_reference, replica_dispatch_reference  # noqa: E402
from rq_tool.quant import get_scheme  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, I = 40, 24  # odd sizes; 2I*H = 1920 and H*I = 960 are multiples of 64, as nf4 needs

# fp32: identical math on both sides; only the accumulation order differs (batched vs per-row
# GEMM, tl.dot's K blocking, int8 scale applied before vs after the dot).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16 (8-bit mantissa, eps 2^-8): both sides round the gate_up output, the activation and the
# dequantized weights to bf16, at different points (the kernel keeps fp32 accumulators and applies
# int8 scales in fp32); a few bf16 ulps at outputs of magnitude ~1-10.
BF16_TOL = dict(atol=3e-2, rtol=2e-2)
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}


pytestmark = pytest.mark.usefixtures("one_thread")

MIXES = {
    "float": ("fp32",),
    "float+int8": ("fp32", "int8"),
    "float+int8+nf4": ("fp32", "int8", "nf4"),
    "float+fp8+nf4": ("fp32", "fp8", "nf4"),
}


def _id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def make_case(T, E, K, dtype=torch.float32, mix="float+int8+nf4", act="glu:silu", bias=False, block_size=16, seed=0):
    """Random routing map + routed batch + slots whose schemes cycle through ``MIXES[mix]``."""
    g = torch.Generator().manual_seed(seed)
    logcnt = torch.randint(1, 5, (E,), generator=g)
    P = int(logcnt.sum())
    perm, starts = torch.randperm(P, generator=g), torch.cumsum(logcnt, 0) - logcnt
    log2phy = torch.full((E, 4), -1, dtype=torch.int64)
    for e in range(E):
        log2phy[e, : logcnt[e]] = perm[starts[e] : starts[e] + logcnt[e]]
    scores = torch.rand(T, E, generator=g) * torch.linspace(1.0, 3.0, E)[torch.randperm(E, generator=g)]
    topk = scores.topk(K, dim=1) if T else None
    topk_ids = topk.indices if T else torch.empty(0, K, dtype=torch.int64)
    topk_weights = (topk.values / topk.values.sum(1, keepdim=True)).to(dtype) if T else torch.empty(0, K, dtype=dtype)
    gate_up = (torch.randn(P, 2 * I, H, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(P, H, I, generator=g) / I**0.5).to(dtype)
    schemes = MIXES[mix]
    if dtype == torch.bfloat16:
        schemes = tuple("bf16" if s == "fp32" else s for s in schemes)
    slot_schemes = [schemes[p % len(schemes)] for p in range(P)]
    gu_bias = torch.randn(P, 2 * I, generator=g).to(dtype) if bias else None
    dn_bias = torch.randn(P, H, generator=g).to(dtype) if bias else None
    weights = SlotWeights.from_dense(gate_up, down, slot_schemes, act, gu_bias, dn_bias)
    x = torch.randn(T, H, generator=g).to(dtype)
    dispatch = replica_dispatch_reference(topk_ids, log2phy, logcnt, P, block_size)
    dense = (gate_up, down, slot_schemes, act, gu_bias, dn_bias)
    return x, topk_weights, dispatch, weights, dense


def naive_experts(x, topk_weights, phy_ids, gate_up, down, slot_schemes, act, gu_bias, dn_bias):
    """Per-token, per-k loop; weights round-tripped through rq_tool.quant (not through SlotWeights)."""
    dtype = x.dtype
    mats = []
    for p, name in enumerate(slot_schemes):
        sch = get_scheme(name)
        mats.append(tuple(sch.dequantize(sch.quantize(w[p]), tuple(w[p].shape), dtype) for w in (gate_up, down)))
    y = torch.zeros(x.shape, dtype=dtype)
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float32)
        for k, p in enumerate(phy_ids[t].tolist()):
            bias = (None if gu_bias is None else gu_bias[p], None if dn_bias is None else dn_bias[p])
            out = expert_forward(x[t : t + 1], mats[p][0], mats[p][1], act, *bias)[0]
            acc += out.float() * topk_weights[t, k].float()
        y[t] = acc.to(dtype)
    return y


def run_triton(x, topk_weights, dispatch, weights, **kw):
    pytest.importorskip("triton")
    from rq_tool.kernels.dispatch import Dispatch

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    d = Dispatch(dev(dispatch.phy_ids), dev(dispatch.slot_counts), dev(dispatch.sorted_ids),
                 dev(dispatch.block_slot), dispatch.num_padded, dispatch.block_size)
    if kw:
        from rq_tool.kernels.experts_triton import moe_experts_triton

        return moe_experts_triton(dev(x), dev(topk_weights), d, weights.to(DEVICE), **kw).cpu()
    return moe_experts(dev(x), dev(topk_weights), d, weights.to(DEVICE), impl="triton").cpu()


@pytest.mark.parametrize("T,E,K", ROUTING_GRID)
def test_reference_matches_naive_grid(T, E, K):
    x, tw, d, w, dense = make_case(T, E, K, seed=T + E + K)
    y = moe_experts_reference(x, tw, d, w)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, naive_experts(x, tw, d.phy_ids, *dense), **FP32_TOL)


@pytest.mark.parametrize("act", ["glu:silu", "glu:gelu", "glu:gelu_pytorch_tanh", "glu:relu", "gptoss:1.702:7.0"])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_reference_matches_naive_variants(dtype, mix, act):
    x, tw, d, w, dense = make_case(33, 16, 2, dtype, mix, act, bias=act.startswith("gptoss"), seed=1)
    y = moe_experts_reference(x, tw, d, w)
    torch.testing.assert_close(y, naive_experts(x, tw, d.phy_ids, *dense), **TOL[dtype])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_hand_made_values(impl):
    """H=2, I=1, identity gate_up: gate = x0, up = x1; down = [1, 2]; two slots, two activations."""
    gate_up = torch.eye(2).expand(2, 2, 2).clone()
    down = torch.tensor([[1.0], [2.0]]).expand(2, 2, 1).clone()
    x = torch.tensor([[3.0, 2.0], [-1.0, 5.0]])
    tw = torch.tensor([[0.5], [1.0]])
    d = replica_dispatch_reference(torch.tensor([[0], [0]]), torch.tensor([[0, 1]]), torch.tensor([2]), 2, 16)
    assert d.phy_ids.tolist() == [[0], [1]]
    for act, expect in (
        ("glu:relu", [[3.0, 6.0], [0.0, 0.0]]),
        # gate = min(x0, 2.5), up = clamp(x1, -2.5, 2.5), (up + 1) * gate * sigmoid(gate)
        ("gptoss:1.0:2.5", [[0.5 * v * m for m in (1, 2)] for v in [3 * 2.5 / (1 + math.exp(-2.5))]]
         + [[v * m for m in (1, 2)] for v in [3.5 * -1.0 / (1 + math.exp(1.0))]]),
    ):
        w = SlotWeights.from_dense(gate_up, down, ["fp32", "fp32"], act)
        y = moe_experts_reference(x, tw, d, w) if impl == "torch" else run_triton(x, tw, d, w)
        torch.testing.assert_close(y, torch.tensor(expect), **FP32_TOL)


def test_quantized_slots_keep_signal():
    """Output SQNR above a floor per scheme, and int8 / fp8 (more bits) beat nf4."""
    x, tw, d, _, (gu, dn, _, act, _, _) = make_case(512, 16, 2, seed=2)
    P = d.slot_counts.numel()

    def out(scheme):
        return moe_experts_reference(x, tw, d, SlotWeights.from_dense(gu, dn, [scheme] * P, act))

    exact = out("fp32")
    sqnr = {s: 10 * math.log10(exact.pow(2).sum() / (out(s) - exact).pow(2).sum()) for s in ("int8", "nf4", "fp8")}
    assert sqnr["int8"] > 30.0 and sqnr["nf4"] > 12.0 and sqnr["int8"] > sqnr["nf4"] + 10.0, sqnr
    assert sqnr["fp8"] > 25.0 and sqnr["fp8"] > sqnr["nf4"] + 5.0, sqnr


# Interpreted subset (see module docstring): (T, E, K, dtype, mix, act, bias, block_size)
KERNEL_CASES = [
    (0, 8, 2, torch.float32, "float", "glu:silu", False, 16),
    (1, 8, 1, torch.float32, "float", "glu:silu", False, 16),
    (1, 64, 8, torch.bfloat16, "float+int8+nf4", "glu:silu", False, 16),
    (33, 16, 2, torch.float32, "float+int8+nf4", "glu:gelu", False, 16),
    (33, 16, 8, torch.bfloat16, "float+int8+nf4", "glu:gelu_pytorch_tanh", False, 32),
    (33, 8, 2, torch.float32, "float+int8", "gptoss:1.702:7.0", True, 16),
    (33, 8, 2, torch.bfloat16, "float+int8", "glu:relu", True, 16),
    (33, 128, 8, torch.float32, "float+int8+nf4", "glu:silu", False, 16),
    (33, 16, 2, torch.float32, "float+fp8+nf4", "glu:silu", False, 16),
    (33, 8, 2, torch.bfloat16, "float+fp8+nf4", "gptoss:1.702:7.0", True, 16),
    (4096, 8, 2, torch.float32, "float+int8+nf4", "glu:silu", False, 256),
]



@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's numpy sigmoid
@pytest.mark.parametrize("T,E,K,dtype,mix,act,bias,block_size", KERNEL_CASES, ids=_id)
def test_triton_matches_reference(T, E, K, dtype, mix, act, bias, block_size):
    x, tw, d, w, _ = make_case(T, E, K, dtype, mix, act, bias, block_size, seed=3)
    torch.testing.assert_close(run_triton(x, tw, d, w), moe_experts_reference(x, tw, d, w), **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_triton_small_tiles_match_reference():
    """GPU-sized tiles under the interpreter: several N-tiles and K-loop steps per program."""
    x, tw, d, w, _ = make_case(33, 8, 2, torch.float32, "float+int8+nf4", "glu:silu", True, 16, seed=4)
    torch.testing.assert_close(run_triton(x, tw, d, w, tiles=(16, 16)), moe_experts_reference(x, tw, d, w), **FP32_TOL)

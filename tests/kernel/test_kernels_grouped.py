"""The CPU runtime's grouped torch path equals the per-slot torch reference."""

import pytest
import torch
from kernel_cases import slot_maps

from rq_tool.kernels import SlotWeights, moe_experts_grouped, moe_experts_reference, replica_dispatch_reference

# Same math, different matmul batching (grouped vs per slot): fp32 accumulation-order noise.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16 inputs: rounding of intermediate activations may differ by one bf16 ulp.
BF16_TOL = dict(rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("T,E,K,H,I", [(0, 8, 2, 32, 16), (1, 8, 1, 32, 16), (33, 16, 2, 64, 32),
                                       (257, 64, 8, 48, 40), (100, 8, 2, 40, 24)])
@pytest.mark.parametrize("mix", [("fp32",), ("fp32", "int8"), ("fp32", "int8", "nf4"), ("bf16",), ("fp32", "fp8")])
@pytest.mark.parametrize("act", ["glu:silu", "gptoss:1.702:7.0"])
def test_grouped_equals_reference(T, E, K, H, I, mix, act):
    g = torch.Generator().manual_seed(T * 7 + E)
    if "nf4" in mix and ((2 * I * H) % 64 or (H * I) % 64):
        pytest.skip("nf4 needs 64-divisible matrices")
    extra = torch.randint(0, E, (E // 2,), generator=g)
    phy2log = torch.cat([torch.arange(E), extra])
    P = phy2log.numel()
    logcnt, log2phy = slot_maps(phy2log, E)
    dtype = torch.bfloat16 if mix == ("bf16",) else torch.float32
    gate_up = torch.randn(E, 2 * I, H, generator=g)[phy2log] * 0.1
    down = torch.randn(E, H, I, generator=g)[phy2log] * 0.1
    schemes = [mix[p % len(mix)] for p in range(P)]
    bias = act.startswith("gptoss")
    w = SlotWeights.from_dense(gate_up.to(dtype), down.to(dtype), schemes, act,
                               torch.randn(P, 2 * I, generator=g).to(dtype) if bias else None,
                               torch.randn(P, H, generator=g).to(dtype) if bias else None)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    wts = torch.rand(T, K, generator=g).to(dtype)
    d = replica_dispatch_reference(ids, log2phy, logcnt, P)
    torch.testing.assert_close(moe_experts_grouped(x, wts, d, w), moe_experts_reference(x, wts, d, w),
                               **(BF16_TOL if dtype == torch.bfloat16 else FP32_TOL))

"""The CPU expert path (kernels/experts_cpu.py): int8 kernels, used-slot dequantization, the opt-in
dequantized cache and identical-replica merging agree with the per-slot torch reference."""

import pytest
import torch
from kernel_cases import slot_maps

from rq_tool.kernels import SlotWeights, moe_experts_reference, replica_dispatch_reference
from rq_tool.kernels.experts_cpu import DequantCache, identical_slots, moe_experts_cpu
from rq_tool.quant import NF4_CODE, nf4_dequantize, nf4_dequantize_torch

# fp32: same math, int8 scales applied after the matmul instead of before (accumulation order).
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16: _weight_int8pack_mm accumulates in fp32 but rounds the gate_up output to bf16 at another
# point than the reference's dequantize-then-matmul; a few bf16 ulps at outputs of magnitude ~1.
BF16_TOL = dict(rtol=2e-2, atol=3e-2)

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(T, E, H, I, mix, dtype, seed=0, K=2):
    g = torch.Generator().manual_seed(seed)
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (E // 2,), generator=g)])
    P = phy2log.numel()
    logcnt, log2phy = slot_maps(phy2log, E)
    gate_up = torch.randn(E, 2 * I, H, generator=g)[phy2log] * 0.1
    down = torch.randn(E, H, I, generator=g)[phy2log] * 0.1
    w = SlotWeights.from_dense(gate_up.to(dtype), down.to(dtype), [mix[p % len(mix)] for p in range(P)], "glu:silu")
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    wts = torch.rand(T, K, generator=g).to(dtype)
    return x, wts, replica_dispatch_reference(ids, log2phy, logcnt, P), w, phy2log


@pytest.mark.parametrize("T", [1, 8, 200])  # decode sizes take _weight_int8pack_mm, 200 the cast path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_nf4_fp8_slots_match_reference(T, dtype):
    float_scheme = "bf16" if dtype == torch.bfloat16 else "fp32"
    x, wts, d, w, _ = _case(T, 8, 64, 32, (float_scheme, "int8", "nf4", "fp8"), dtype, seed=T)
    tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
    torch.testing.assert_close(moe_experts_cpu(x, wts, d.phy_ids, w), moe_experts_reference(x, wts, d, w), **tol)


def test_misaligned_int8_weights_fall_back_safely():
    """_weight_int8pack_mm crashes the process on int8 data not 16-byte aligned: such slots must
    take the cast path and still give the reference's numbers."""
    x, wts, d, w, _ = _case(4, 8, 64, 32, ("int8",), torch.bfloat16)
    g = dict(w.groups[0])
    for key in ("gate_up", "down"):
        flat = torch.empty(g[key].numel() + 1, dtype=torch.int8)
        shifted = flat[1:].view(g[key].shape)
        shifted.copy_(g[key])
        assert shifted.data_ptr() % 16
        g[key] = shifted
    w2 = SlotWeights(w.schemes, w.slot_scheme, w.slot_index, (g,), w.hidden_size, w.intermediate_size, w.act)
    torch.testing.assert_close(moe_experts_cpu(x, wts, d.phy_ids, w2), moe_experts_reference(x, wts, d, w), **BF16_TOL)


def test_dequant_cache_same_numbers_and_counts_its_bytes():
    x, wts, d, w, _ = _case(3, 8, 64, 32, ("fp32", "int8", "nf4", "fp8"), torch.float32, seed=3, K=1)
    cache = DequantCache()
    y = moe_experts_cpu(x, wts, d.phy_ids, w, cache)
    torch.testing.assert_close(y, moe_experts_cpu(x, wts, d.phy_ids, w), **FP32_TOL)
    used = d.phy_ids.flatten().unique()
    quantized = [p for p in used.tolist() if w.schemes[int(w.slot_scheme[p])] != "fp32"]
    assert cache.nbytes == len(quantized) * 3 * 64 * 32 * 4  # gate_up + down of each used quantized slot, fp32
    torch.testing.assert_close(moe_experts_cpu(x, wts, d.phy_ids, w, cache), y, rtol=0, atol=0)  # from the cache


def test_identical_replicas_merge_only_when_bytes_match():
    _, _, _, w, phy2log = _case(1, 8, 64, 32, ("fp32",), torch.float32)
    compute = identical_slots(w, phy2log)
    assert torch.equal(phy2log[compute], phy2log)  # a compute slot holds the same logical expert
    assert torch.equal(compute[:8], torch.arange(8)) and bool((compute[8:] < 8).all())
    _, _, _, w, phy2log = _case(1, 8, 64, 32, ("fp32", "int8"), torch.float32)
    compute = identical_slots(w, phy2log)
    for p, q in enumerate(compute.tolist()):  # merged only inside one scheme group
        assert w.slot_scheme[p] == w.slot_scheme[q]


def test_nf4_table_and_dequantize_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu").float())
    packed, state = bnbf.quantize_4bit(torch.randn(256, 128), blocksize=64, quant_type="nf4")
    q, absmax = packed.reshape(-1), state.absmax.float()
    # bitsandbytes' layout: two levels a byte, high nibble first, one absmax per 64 values
    code = torch.tensor(NF4_CODE)
    ref = (code[torch.stack([q >> 4, q & 15], 1).reshape(-1).long()].view(-1, 64) * absmax[:, None]).view(256, 128)
    assert torch.equal(nf4_dequantize_torch(q, absmax, (256, 128)), ref)  # the pure-torch fallback
    assert torch.equal(nf4_dequantize(q, absmax, (256, 128), torch.float32), ref)  # bitsandbytes' op if present
    assert torch.equal(nf4_dequantize(q, absmax, (256, 128), torch.bfloat16), ref.bfloat16())

"""Block-FP8 sources kept as rq ``fp8`` slots: byte-exact experts and replicas, budgets, load, generate."""

from collections import Counter

import pytest
import torch
from safetensors import safe_open

import rq_tool
from rq_tool.arch import get_family
from rq_tool.quant import get_scheme
from rq_tool.rewrite.layout import fp8_keepable, read_layout
from rq_tool.source import SourceCheckpoint, load_config
from tiny_models import save_tiny_quantized, write_texts

REPLICA_ATOL = 1e-5  # replicas only regroup tokens per slot (fp32 accumulation)
# qwen3_moe / deepseek_v3 with I = 128 (whole row blocks of the gate / up halves) and H = 64 (one
# partial column block): rq's 128 x 128 fp8 slots
CASES = {"qwen3_moe": dict(moe_intermediate_size=128), "deepseek_v3": dict(moe_intermediate_size=128)}


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"{model_type}-fp8-128")
            src = save_tiny_quantized(model_type, root / "src", "fp8", block=(128, 128), **CASES[model_type])
            write_texts(root / "t.jsonl", 40)
            prof = rq_tool.calibrate(src, str(root / "t.jsonl"), num_samples=8, seq_len=32, batch_size=4,
                                     progress=False)
            prof.save(root / "p.json")
            cache[model_type] = root
        return cache[model_type]

    return get


def _tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _bytes(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("model_type", CASES)
def test_replicate_only_keeps_every_expert_byte_for_byte(kept, model_type, tmp_path):
    from rq_tool.source import load_model

    root = kept(model_type)
    res = rq_tool.rewrite(root / "src", root / "p.json", tmp_path / "out", strategy="replicate-only", progress=False)
    assert res.layout.fp8_kept and res.layout.keep_scheme == "fp8" and res.layout.source_scheme == "fp32"
    assert sum(lp.num_replicas for lp in res.plan.layers) > 0
    assert {s for lm in res.routing_map.layers for s in lm.slot_scheme} == {"fp8"}
    assert rq_tool.verify(tmp_path / "out") == []
    src, out = _tensors(root / "src"), _tensors(tmp_path / "out")
    # every slot (replicas included) holds its logical expert's stored float8 bytes, gate rows then up rows
    for lm, layer in zip(res.routing_map.layers, res.layout.layers):
        prefix = res.layout.block_prefix[layer] + ".experts."
        q, scale = out[f"{prefix}fp8_gate_up"], out[f"{prefix}fp8_gate_up_scale_inv"]
        dq, dscale = out[f"{prefix}fp8_down"], out[f"{prefix}fp8_down_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        for p, e in enumerate(lm.phy2log.tolist()):
            gate, up, down = (f"{prefix}{e}.{n}_proj.weight" for n in ("gate", "up", "down"))
            assert torch.equal(_bytes(q[p]), _bytes(torch.cat([src[gate], src[up]])))
            assert torch.equal(scale[p], torch.cat([src[gate + "_scale_inv"], src[up + "_scale_inv"]]).float())
            assert torch.equal(_bytes(dq[p]), _bytes(src[down])) and torch.equal(dscale[p], src[down + "_scale_inv"])
    # the experts' bytes grow by the replicas only (no dequantized copy of the source)
    one = res.layout.expert_bytes("fp8")
    for lp, layer in zip(res.plan.layers, res.layout.layers):
        assert lp.bytes_after == lp.phy2log.numel() * one and lp.bytes_before == res.layout.stored_bytes[layer]
    orig, _ = load_model(root / "src")
    new = rq_tool.load(tmp_path / "out")
    ids = torch.randint(2, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=ids).logits, orig(input_ids=ids).logits, rtol=0, atol=REPLICA_ATOL)


@pytest.mark.parametrize("budget", [1.0, 1.3])
def test_greedy_pays_replicas_with_nf4_only_and_generates(kept, budget, tmp_path):
    from transformers import AutoTokenizer, pipeline

    root = kept("qwen3_moe")
    res = rq_tool.rewrite(root / "src", root / "p.json", tmp_path / "out", budget=budget, progress=False)
    dry = rq_tool.rewrite(root / "src", root / "p.json", None, budget=budget, progress=False, dry_run=True)
    assert dry.layout == res.layout and dry.routing_map.to_dict() == res.routing_map.to_dict()
    assert res.plan.schemes == ("fp8", "nf4")  # int8 stores more bytes than fp8: never offered here
    used = Counter(s for lm in res.routing_map.layers for s in lm.slot_scheme)
    assert set(used) <= {"fp8", "nf4"} and used["fp8"] > 0
    for lp, layer in zip(res.plan.layers, res.layout.layers):
        assert lp.bytes_after <= budget * res.layout.layer_source_bytes(layer)
    if budget > 1.0:
        assert sum(lp.num_replicas for lp in res.plan.layers) > 0
    assert rq_tool.verify(tmp_path / "out") == []
    model = rq_tool.load(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = pipeline("text-generation", model=model, tokenizer=tok)("alpha beta", max_new_tokens=4,
                                                                    do_sample=False)[0]["generated_text"]
    assert text.startswith("alpha beta") and len(text) > len("alpha beta")


def test_fp8_slot_scheme_counts_its_bytes_and_round_trips():
    s = get_scheme("fp8")
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    st = s.quantize(w)
    assert st["q"].dtype == torch.float8_e4m3fn and tuple(st["scale_inv"].shape) == (3, 2)
    assert s.nbytes(300, 200) == sum(t.numel() * t.element_size() for t in st.values())
    back = s.roundtrip(w)
    assert float(10 * torch.log10(w.pow(2).sum() / (w - back).pow(2).sum())) > 28.0
    # a module.to(bf16) casts float8 storage to bf16: every e4m3 value is exact there, same numbers
    cast = {"q": st["q"].to(torch.bfloat16), "scale_inv": st["scale_inv"]}
    assert torch.equal(s.dequantize(cast, (300, 200), torch.float32), back)


@pytest.mark.parametrize("block, kw, why", [
    ((32, 32), {}, "weight_block_size [32, 32]"),
    ((128, 128), dict(moe_intermediate_size=64), "not a multiple of 128"),
])
def test_other_fp8_sources_are_dequantized_and_say_why(tmp_path, block, kw, why):
    src = save_tiny_quantized("qwen3_moe", tmp_path / "src", "fp8", block=block, **kw)
    ckpt, family = SourceCheckpoint(src), get_family(load_config(src))
    layout = read_layout(ckpt, family)
    assert not layout.fp8_kept and layout.keep_scheme == layout.source_scheme
    assert why in fp8_keepable(ckpt, family, layout.intermediate_size)


def test_int8_alone_is_refused_beside_fp8_with_the_scheme_that_fits(kept):
    from rq_tool.errors import RQError

    root = kept("qwen3_moe")
    with pytest.raises(RQError, match=r"no scheme smaller than the model's own fp8 experts.*give nf4"):
        rq_tool.rewrite(root / "src", root / "p.json", None, schemes=("int8",), progress=False, dry_run=True)

"""Quantized source checkpoints (block-FP8, MXFP4): dequantization, calibration, exact and greedy rewrites."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import rq_tool
from rq_tool.errors import RQError
from rq_tool.quant.sources import (fp8_dequantize, fp8_quantize, fp8_scale_shape, mxfp4_dequantize, mxfp4_quantize,
                                   read_source_quant)
from tiny_models import save_tiny_quantized, write_texts

# replicas only regroup tokens per slot (fp32 accumulation), as in test_rewrite.py
REPLICA_ATOL = 1e-5
# FP8 e4m3 keeps 3 mantissa bits (relative step 1/16): SQNR of a Gaussian matrix is ~31 dB
FP8_SQNR_DB = 28.0
# MXFP4: 1 mantissa bit and power-of-two block scales, ~18 dB on Gaussian blocks of 32
MXFP4_SQNR_DB = 15.0
CASES = [("deepseek_v3", "fp8"), ("qwen3_moe", "fp8"), ("gpt_oss", "mxfp4")]


def _sqnr_db(ref, got):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


# ------------------------------------------------------------------------------ dequantization
@pytest.mark.parametrize("chunk_values", [None, 1, 3 * 128 * 384], ids=["whole", "one-row-block", "three-row-blocks"])
def test_fp8_dequantize_matches_transformers_including_partial_blocks(monkeypatch, chunk_values):
    """The same numbers whether fp8_dequantize works through the matrix at once or row blocks at a time."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    from rq_tool import defaults

    monkeypatch.setattr(defaults, "CHUNK_VALUES", chunk_values or 1 << 40)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(640, 384, generator=g)
    q, s = fp8_quantize(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3) == fp8_scale_shape((640, 384), (128, 128))
    assert torch.equal(fp8_dequantize(q, s, (128, 128), torch.bfloat16),
                       Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16))
    w3 = torch.randn(3, 200, 300, generator=g)  # edge blocks of 72 rows / 44 columns, stacked experts
    q3, s3 = fp8_quantize(w3, (128, 128))
    assert s3.shape == (3, 2, 3)
    got = fp8_dequantize(q3, s3, (128, 128), torch.float32)
    assert torch.equal(got, _dequantize_fp8_weight(q3, s3, [128, 128], torch.float32))
    assert _sqnr_db(w3, got) > FP8_SQNR_DB


def test_mxfp4_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(1))
    blocks, scales = mxfp4_quantize(w)
    assert blocks.shape == (4, 64, 3, 16) and scales.shape == (4, 64, 3) and blocks.dtype == torch.uint8
    got = mxfp4_dequantize(blocks, scales, torch.bfloat16)
    assert torch.equal(got.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    assert _sqnr_db(w, got.float()) > MXFP4_SQNR_DB


@pytest.mark.parametrize("qc, what", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
    ({"quant_method": "awq", "bits": 4}, "AWQ"),
    ({"quant_method": "compressed-tensors", "config_groups": {}}, "compressed-tensors"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e4m3"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "dynamic"),
])
def test_other_quantized_sources_get_one_clear_error(qc, what):
    with pytest.raises(RQError, match=what):
        read_source_quant({"model_type": "qwen3_moe", "quantization_config": qc})


def test_cli_refuses_gptq_checkpoint(tmp_path):
    from click.testing import CliRunner

    from rq_tool.cli import main
    from tiny_models import save_tiny

    src = save_tiny("qwen3_moe", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["calibrate", str(src), "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "GPTQ" in r.output and r.output.count("error:") == 1, r.output
    assert not (tmp_path / "p.json").exists()


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    cache = {}

    def get(model_type, method):
        if (model_type, method) not in cache:
            root = tmp_path_factory.mktemp(f"{model_type}-{method}")
            src = save_tiny_quantized(model_type, root / "src", method)
            write_texts(root / "t.jsonl", 40)
            prof = rq_tool.calibrate(src, str(root / "t.jsonl"), num_samples=8, seq_len=32, batch_size=4,
                                     progress=False)
            prof.save(root / "p.json")
            cache[model_type, method] = root
        return cache[model_type, method]

    return get


def _stored(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type, method", CASES)
def test_quantized_source_calibrates_and_rewrites_exactly(quantized, model_type, method, tmp_path):
    from transformers import AutoConfig

    from rq_tool.calibrate.profile import Profile, config_fingerprint
    from rq_tool.source import load_model

    root = quantized(model_type, method)
    src = root / "src"
    prof = Profile.load(root / "p.json")
    # the fingerprint of the calibrated (dequantized) model is the one rq rewrite checks on the checkpoint
    assert prof.model["config_sha256"] == config_fingerprint(AutoConfig.from_pretrained(src))
    res = rq_tool.rewrite(src, prof, tmp_path / "out", strategy="replicate-only", progress=False)
    assert sum(lp.num_replicas for lp in res.plan.layers) > 0
    assert res.layout.source_quant == method and res.layout.source_scheme == "fp32"
    assert rq_tool.verify(tmp_path / "out") == []
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["rq"]["source_quantization"]["quant_method"] == method

    # every stored non-expert tensor (FP8 weights and their scales included) is copied byte for byte
    before, after = _stored(src), _stored(tmp_path / "out")
    kept = [k for k in before if ".experts." not in k]
    assert kept and all(k in after and after[k].dtype == before[k].dtype
                        and torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in kept)
    if method == "fp8":
        assert any(k.endswith("self_attn.o_proj.weight_scale_inv") for k in kept)

    orig, _ = load_model(src)
    new = rq_tool.load(tmp_path / "out")
    ids = torch.randint(2, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(new, ids), _logits(orig, ids), rtol=0, atol=REPLICA_ATOL)


def test_fp8_dequantized_load_matches_transformers_own(quantized):
    """Where every FP8 block is whole (qwen3_moe tiny, block 32), transformers' own CPU dequantization
    and rq's agree tensor for tensor: same key mapping, same numbers."""
    from transformers import AutoModelForCausalLM

    from rq_tool.source import load_model

    src = quantized("qwen3_moe", "fp8") / "src"
    ours, _ = load_model(src)
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


@pytest.mark.parametrize("model_type, method", CASES)
def test_quantized_source_greedy_rewrite_loads_and_generates(quantized, model_type, method, tmp_path):
    from transformers import AutoTokenizer, pipeline

    root = quantized(model_type, method)
    if method == "mxfp4":  # 4.25-bit experts: rq's cheapest slot (nf4 + fp32 absmax) does not fit 1.0x
        with pytest.raises(RQError, match="--budget"):
            rq_tool.rewrite(root / "src", root / "p.json", tmp_path / "x", progress=False, dry_run=True)
    budget = 1.5 if method == "mxfp4" else 1.0
    res = rq_tool.rewrite(root / "src", root / "p.json", tmp_path / "out", budget=budget, progress=False)
    # the dry run plans from the layout calibrate recorded (stored bytes of the quantized source included)
    dry = rq_tool.rewrite(root / "src", root / "p.json", None, budget=budget, progress=False, dry_run=True)
    assert dry.layout == res.layout and dry.routing_map.to_dict() == res.routing_map.to_dict()
    assert json.loads((root / "p.json").read_text())["model"]["layout"]["source_quant"] == method
    stored = res.layout.stored_bytes
    for lp, layer in zip(res.plan.layers, res.layout.layers):
        assert lp.bytes_after <= budget * stored[layer]
    assert rq_tool.verify(tmp_path / "out") == []
    model = rq_tool.load(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    out = pipeline("text-generation", model=model, tokenizer=tok)("alpha beta", max_new_tokens=4,
                                                                   do_sample=False)[0]["generated_text"]
    assert out.startswith("alpha beta") and len(out) > len("alpha beta")


@pytest.mark.parametrize("chunk_values", [None, 1, 7 * 160], ids=["whole", "one-row", "seven-rows"])
def test_int8_quantize_is_bitsandbytes_bit_for_bit(monkeypatch, chunk_values):
    """rq's torch int8 quantizer on CPU (amax, in-place round, rows in chunks) = bitsandbytes'
    int8_vectorwise_quant."""
    import bitsandbytes.functional as bnbf

    from rq_tool import defaults
    from rq_tool.quant import get_scheme

    monkeypatch.setattr(defaults, "CHUNK_VALUES", chunk_values or 1 << 40)

    g = torch.Generator().manual_seed(4)
    for scale in (1e-6, 1.0, 300.0):
        w = torch.randn(96, 160, generator=g) * scale
        w[1] = torch.arange(160) - 80.0
        w[1, 0] = 254.0  # 127 / absmax = 0.5: every odd value lands on a .5 tie (round half to even)
        w[2, :] = -w[2].abs()  # a row whose absmax is a negative value
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = w.to(dtype)
            q, absmax, _ = bnbf.int8_vectorwise_quant(x.float().contiguous())
            st = get_scheme("int8").quantize(x)
            assert st["q"].dtype == torch.int8 and torch.equal(st["q"], q)
            assert torch.equal(st["scale"], absmax.float() / 127.0)


def test_int8_quantize_on_cpu_never_imports_bitsandbytes():
    code = ("import sys, torch; from rq_tool.quant import get_scheme; "
            "get_scheme('int8').quantize(torch.randn(8, 16)); print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_nf4_quantize_is_bitsandbytes_bit_for_bit():
    """rq's torch NF4 quantizer (comparisons instead of bucketize, for speed) = bitsandbytes' own."""
    import bitsandbytes.functional as bnbf

    from rq_tool.quant import get_scheme, nf4_code

    code = nf4_code()
    g = torch.Generator().manual_seed(3)
    for scale in (1e-6, 1.0, 300.0):
        w = torch.randn(128, 256, generator=g) * scale
        w[0, :64] = 0  # an all-zero block
        w[1, :15] = (code[:-1] + code[1:]) / 2 * w[1, :64].abs().max()  # values near the level midpoints
        for dtype in (torch.float32, torch.bfloat16):
            x = w.to(dtype)
            packed, state = bnbf.quantize_4bit(x.float(), blocksize=64, quant_type="nf4")
            st = get_scheme("nf4").quantize(x)
            assert torch.equal(st["q"], packed.reshape(-1)) and torch.equal(st["absmax"], state.absmax.float())

"""rq rewrite end to end on tiny models of every family: exactness, budget, map, runtime counters."""

import json

import pytest
import torch
from safetensors import safe_open

import rq_tool
from rq_tool.calibrate import calibrate
from rq_tool.lis import lis
from rq_tool.rewrite import rewrite
from rq_tool.rewrite.verify import verify
from rq_tool.runtime import RQExperts, load
from tiny_models import FAMILIES, save_tiny, write_texts

# Replicas-only rewrites change matmul batching (tokens regrouped per slot, fp32 accumulation),
# never the math: 1e-5 absolute on fp32 logits of size ~3.
REPLICA_ATOL = 1e-5
# int8 slots: row-wise absmax int8 (~0.6% relative weight error) on a few cold experts.
INT8_ATOL = 0.05


def _calibrated(root, model_type, dtype=torch.float32):
    save_tiny(model_type, root / "src", dtype=dtype)
    write_texts(root / "t.jsonl", 120)
    prof = calibrate(root / "src", str(root / "t.jsonl"), num_samples=16, seq_len=32, batch_size=4, progress=False)
    return prof


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(model_type)
            cache[model_type] = (root, _calibrated(root, model_type))
        return cache[model_type]

    return get


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_replicas_only_rewrite_is_exact(calibrated, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    root, prof = calibrated(model_type)
    res = rewrite(root / "src", prof, tmp_path / "out", strategy="replicate-only", progress=False)
    assert sum(lp.num_replicas for lp in res.plan.layers) > 0
    assert verify(tmp_path / "out") == []
    orig = AutoModelForCausalLM.from_pretrained(root / "src").eval()
    new = load(tmp_path / "out")
    ids = torch.randint(0, 90, (3, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(new, ids), _logits(orig, ids), rtol=0, atol=REPLICA_ATOL)
    assert sum(isinstance(m, RQExperts) for m in new.modules()) == len(res.plan.layers)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_greedy_rewrite_within_budget_and_tolerance(calibrated, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    root, prof = calibrated(model_type)
    res = rewrite(root / "src", prof, tmp_path / "out", schemes=["int8"], progress=False)
    out = tmp_path / "out"
    # budget in real stored bytes: sum the slot tensors in the written shards, per layer
    stored = {}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for key, shard in index.items():
        if ".experts." in key:
            layer = int(key.split("layers.")[1].split(".")[0])
            with safe_open(str(out / shard), "pt") as f:
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                stored[layer] = stored.get(layer, 0) + n * {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}[t.get_dtype()]
    for lp in res.plan.layers:
        assert stored[lp.layer] == lp.bytes_after <= lp.bytes_before
        assert lp.lis_after <= lp.lis_before
    orig = AutoModelForCausalLM.from_pretrained(root / "src").eval()
    new = rq_tool.load(out)
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(new, ids), _logits(orig, ids), rtol=0, atol=INT8_ATOL)


def test_measured_slot_lis_matches_prediction(calibrated, tmp_path):
    """Runtime per-slot counters on the calibration batches reproduce the planner's slot loads."""
    from rq_tool.calibrate.data import load_texts, pack
    from rq_tool.source import load_tokenizer

    root, prof = calibrated("qwen3_moe")
    res = rewrite(root / "src", prof, tmp_path / "out", strategy="replicate-only", progress=False)
    model = load(tmp_path / "out")
    name, texts = load_texts(str(root / "t.jsonl"))
    data = pack(texts, load_tokenizer(root / "src"), num_samples=16, seq_len=32, seed=0, name=name)
    experts = [m for m in model.modules() if isinstance(m, RQExperts)]
    for m in experts:
        m.count_load = True
    n_batches = 0
    with torch.no_grad():
        for start in range(0, 16, 4):
            model(input_ids=data.input_ids[start:start + 4])
            n_batches += 1
    for m, lp, prof_layer in zip(experts, res.plan.layers, prof.layers):
        measured = m.slot_load.double()
        predicted = prof_layer.load.double()[lp.phy2log] / lp.logcnt.double()[lp.phy2log]
        assert measured.sum() == prof_layer.load.sum()
        # each batch splits an expert's tokens over its replicas up to rounding: <= 1 per batch
        assert (measured - predicted).abs().max() <= n_batches
        assert float(lis(measured)) == pytest.approx(lp.lis_after, abs=lp.num_physical * n_batches / float(measured.sum()))


def test_counters_off_by_default(calibrated, tmp_path):
    root, prof = calibrated("qwen3_moe")
    rewrite(root / "src", prof, tmp_path / "out", progress=False)
    model = load(tmp_path / "out")
    with torch.no_grad():
        model(input_ids=torch.randint(0, 90, (1, 8)))
    assert all(int(m.slot_load.sum()) == 0 for m in model.modules() if isinstance(m, RQExperts))


def test_auto_classes_and_pipeline_in_fresh_process(calibrated, tmp_path):
    import subprocess
    import sys

    root, prof = calibrated("mixtral")
    rewrite(root / "src", prof, tmp_path / "out", progress=False)
    code = (
        "import torch, sys\n"
        "from transformers import AutoModelForCausalLM, pipeline\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        "assert any(type(x).__name__ == 'RQExperts' for x in m.modules())\n"
        f"p = pipeline('text-generation', model={str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        "out = p('alpha beta', max_new_tokens=4, do_sample=False)[0]['generated_text']\n"
        "assert out.startswith('alpha beta') and len(out) > len('alpha beta'), out\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_loading_without_trust_remote_code_fails_loudly(calibrated, tmp_path):
    from transformers import AutoModelForCausalLM

    root, prof = calibrated("olmoe")
    rewrite(root / "src", prof, tmp_path / "out", progress=False)
    # the base class rejects the rewritten directory's experts_implementation "rq"
    with pytest.raises(Exception, match="(?i)trust_remote_code|remote code|experts_implementation"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)


def test_bf16_source_keeps_dtype(tmp_path):
    prof = _calibrated(tmp_path, "qwen2_moe", dtype=torch.bfloat16)
    res = rewrite(tmp_path / "src", prof, tmp_path / "out", progress=False)
    assert res.layout.source_scheme == "bf16"
    model = load(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert verify(tmp_path / "out") == []

"""The rq CLI: calibrate -> rewrite -> verify on a tiny model, JSON output, one-line errors."""

import json

import pytest
from click.testing import CliRunner

from rq_tool.cli import main
from tiny_models import save_tiny, write_texts


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny("qwen3_moe", root / "src")
    write_texts(root / "t.jsonl", 100)
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_calibrate_rewrite_verify(work):
    r = run("calibrate", work / "src", "-d", work / "t.jsonl", "--num-samples", 8, "--seq-len", 32, "-o", work / "p.json")
    assert r.exit_code == 0, r.output
    assert "LIS" in r.output and "hottest" in r.output
    r = run("calibrate", work / "src", "-d", work / "t.jsonl", "--num-samples", 8, "--seq-len", 32, "-o",
            work / "p2.json", "--json")
    assert r.exit_code == 0
    assert json.loads(r.output)["format"] == "rq-profile"
    r = run("rewrite", work / "src", "-p", work / "p.json", "--dry-run")
    assert r.exit_code == 0 and "strategy greedy" in r.output and not (work / "out").exists()
    r = run("rewrite", work / "src", "-p", work / "p.json", "--dry-run", "--json")
    assert json.loads(r.output)["plan"]["format"] == "rq-plan"
    r = run("rewrite", work / "src", "-p", work / "p.json", "-o", work / "out")
    assert r.exit_code == 0, r.output
    r = run("verify", work / "out")
    assert r.exit_code == 0 and r.output.startswith("OK")
    r = run("rewrite", work / "src", "-p", work / "p.json", "-o", work / "out")
    assert r.exit_code == 2 and "already exists" in r.output
    r = run("rewrite", work / "src", "-p", work / "p.json", "-o", work / "out", "--force", "--strategy", "paper")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("model_type,needle", [("llama", "dense"), ("jetmoe", "MoE model rq cannot rewrite")])
def test_unsupported_models_one_line(work, tmp_path, model_type, needle):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32)
    if model_type == "jetmoe":  # an MoE whose experts are not one fused module (mixture of attention + MLP)
        kw.update(num_local_experts=4, num_experts_per_tok=2, kv_channels=16)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).save_pretrained(tmp_path / "m")
    r = CliRunner().invoke(main, ["calibrate", str(tmp_path / "m")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0] and model_type in lines[0]
    assert "Traceback" not in r.output

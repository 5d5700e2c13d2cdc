"""Calibrating a model larger than a memory limit: weights offloaded to disk, loaded per layer."""

import json

import pytest

from rq_tool.calibrate import calibrate
from tiny_models import save_tiny, write_texts

pytest.importorskip("accelerate")


def test_offloaded_calibration_equals_in_memory(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "m", num_hidden_layers=4)
    write_texts(tmp_path / "t.jsonl", 60)
    weights = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    limit = weights // 4  # the model is 4x larger than what may stay in memory
    kw = dict(num_samples=8, seq_len=32, batch_size=4, progress=False)
    ref = calibrate(tmp_path / "m", str(tmp_path / "t.jsonl"), **kw)

    from rq_tool.source import load_model

    model, _ = load_model(tmp_path / "m", max_memory=f"{limit // 1000}KB", offload_folder=str(tmp_path / "off"))
    assert "disk" in set(model.hf_device_map.values())  # most layers really live on disk
    del model
    off = calibrate(tmp_path / "m", str(tmp_path / "t.jsonl"), max_memory=f"{limit // 1000}KB", **kw)
    assert json.dumps(off.to_dict(), sort_keys=True) == json.dumps(ref.to_dict(), sort_keys=True)

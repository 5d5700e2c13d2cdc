"""`rq rewrite --dry-run` from the layout the profile recorded: the same plan as the full path,
without importing transformers, and never from a stale or malformed record."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import rq_tool
from rq_tool.calibrate.profile import Profile
from rq_tool.errors import RQError
from tiny_models import save_tiny, write_texts


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    save_tiny("qwen3_moe", root / "src")
    write_texts(root / "t.jsonl", 60)
    prof = rq_tool.calibrate(root / "src", str(root / "t.jsonl"), num_samples=16, seq_len=32, batch_size=4,
                             progress=False)
    prof.save(root / "p.json")
    return root, prof


def _loaded(root, record: bool = True) -> Profile:
    prof = Profile.load(root / "p.json")
    if not record:
        del prof.model["layout"]
    return prof


@pytest.mark.parametrize("options", [{}, {"budget": 1.3}, {"strategy": "paper"}, {"ep_size": 4}])
def test_recorded_layout_plans_like_the_full_path(calibrated, options):
    root, prof = calibrated
    assert prof.model["layout"]["headers_sha256"]
    fast = rq_tool.rewrite(root / "src", _loaded(root), None, dry_run=True, progress=False, **options)
    full = rq_tool.rewrite(root / "src", _loaded(root, record=False), None, dry_run=True, progress=False, **options)
    assert fast.layout == full.layout
    assert fast.routing_map.to_dict() == full.routing_map.to_dict()
    assert json.dumps(fast.plan.to_dict()) == json.dumps(full.plan.to_dict())


def test_dry_run_imports_no_transformers(calibrated):
    """The point of the record: a dry run is torch + planning (the family's model build imports
    transformers' modeling code, most of a dry run's time)."""
    root, _ = calibrated
    code = ("import sys, json\n"
            "from click.testing import CliRunner\n"
            "from rq_tool.cli import main\n"
            f"r = CliRunner().invoke(main, ['rewrite', {str(root / 'src')!r}, '-p', {str(root / 'p.json')!r}, "
            "'--dry-run', '--json'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_changed_headers_are_read_again(calibrated, tmp_path):
    """Same config.json, other tensors on disk (fp32 -> bf16): the record is stale, the headers decide."""
    root, prof = calibrated
    shutil.copytree(root / "src", tmp_path / "src")
    for shard in (tmp_path / "src").glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    assert prof.model["layout"]["source_scheme"] == "fp32"
    res = rq_tool.rewrite(tmp_path / "src", prof, None, dry_run=True, progress=False)
    assert res.layout.source_scheme == "bf16"


def test_changed_config_is_refused(calibrated, tmp_path):
    root, prof = calibrated
    shutil.copytree(root / "src", tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RQError, match="measured on another model"):
        rq_tool.rewrite(tmp_path / "src", prof, None, dry_run=True, progress=False)


@pytest.mark.parametrize("field,value,needle", [
    ("has_bias", "no", "has_bias"), ("num_experts", 0, "num_experts"), ("block_prefix", {"0": "x"}, "one entry per layer"),
    ("source_scheme", "fp7", "fp7"), ("layers", "0,1", "layers")])
def test_malformed_record_is_one_clear_error(calibrated, field, value, needle):
    root, prof = calibrated
    d = json.loads(json.dumps(prof.to_dict()))  # a copy: the fixture's profile stays as calibrated
    d["model"]["layout"][field] = value
    with pytest.raises(RQError, match=needle) as e:
        rq_tool.rewrite(root / "src", Profile.from_dict(d), None, dry_run=True, progress=False)
    assert "\n" not in str(e.value)

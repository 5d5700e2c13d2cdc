"""The streaming writer (rq_tool/rewrite/stream.py) writes exactly the slot tensors of the reference
construction ``SlotWeights.from_dense`` over the stacked canonical experts, for every family layout."""

import pytest
import torch
from safetensors import safe_open

import rq_tool
from rq_tool.arch import get_family
from rq_tool.kernels import SlotWeights
from rq_tool.source import load_config
from rq_tool.rewrite.assemble import LayerAssembler
from rq_tool.source import SourceCheckpoint
from tiny_models import save_tiny, write_texts


def _stored(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("model_type, dtype", [("qwen3_moe", torch.bfloat16), ("gpt_oss", torch.float32)])
def test_streamed_slots_equal_the_reference_construction(model_type, dtype, tmp_path, one_thread):
    src = save_tiny(model_type, tmp_path / "src", dtype=dtype)
    write_texts(tmp_path / "t.jsonl", 40)
    prof = rq_tool.calibrate(src, str(tmp_path / "t.jsonl"), num_samples=8, seq_len=32, progress=False)
    # a tight budget: replicas paid by int8 / nf4 slots, several schemes per layer
    res = rq_tool.rewrite(src, prof, tmp_path / "out", budget=0.6, shard_bytes=64 << 10, progress=False)
    assert any(len(set(lm.slot_scheme)) > 1 for lm in res.routing_map.layers)
    assert any(lp.num_replicas for lp in res.plan.layers)
    out = _stored(tmp_path / "out")
    family = get_family(load_config(src))
    ckpt = SourceCheckpoint(src)
    with ckpt.reader() as rd:
        for lm in res.routing_map.layers:
            keys = {k for k in ckpt.tensors if (ek := family.parse_expert_key(k)) is not None and ek.layer == lm.layer}
            asm = LayerAssembler(lm.layer, keys, family, res.layout.num_experts)
            for k in keys:
                asm.add(k, family.parse_expert_key(k), rd.logical(k))
            canon = asm.canonical()
            idx = lm.phy2log
            ref = SlotWeights.from_dense(canon["gate_up"][idx], canon["down"][idx], list(lm.slot_scheme),
                                         res.routing_map.activation)
            prefix = family.runtime_key(res.layout.block_prefix[lm.layer] + ".experts.")
            for scheme, group in zip(ref.schemes, ref.groups):
                for name, t in group.items():
                    got = out[f"{prefix}{scheme}_{name}"]
                    assert got.dtype == t.dtype and torch.equal(got, t), (lm.layer, scheme, name)
            if "gate_up_bias" in canon:
                assert torch.equal(out[prefix + "gate_up_bias"], canon["gate_up_bias"][idx])
                assert torch.equal(out[prefix + "down_bias"], canon["down_bias"][idx])


def test_cyclic_gc_paused_only_during_the_stream(monkeypatch):
    """The streaming pass runs with Python's cyclic GC off and restores it, also on errors."""
    import gc

    from rq_tool.rewrite import writer

    seen = []

    def boom(*a, **k):
        seen.append(gc.isenabled())
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_steps", boom)
    monkeypatch.setattr(writer, "plan_steps", lambda *a: ([], {}))
    monkeypatch.setattr(writer, "output_entries", lambda *a: [])
    assert gc.isenabled()
    with pytest.raises(OSError):
        writer._stream(type("C", (), {"stored": {}})(), None, None, None, __import__("pathlib").Path("/nonexistent-rq"),
                       1 << 20, False, 1)
    assert seen == [False] and gc.isenabled()


def test_stored_bytes_are_copied_file_to_file_and_equal_the_written_fallback(tmp_path, monkeypatch, one_thread):
    """Tensors copied as stored (non-expert tensors, slots kept in the source precision) go through
    ``os.sendfile``; where the kernel refuses it (EINVAL, e.g. an old kernel or file system) the writer
    writes the mapped bytes instead, and both give the same files and a manifest that verifies."""
    import errno
    import os

    from rq_tool.rewrite import shards
    from rq_tool.rewrite.verify import verify

    src = save_tiny("qwen3_moe", tmp_path / "src", dtype=torch.bfloat16)
    write_texts(tmp_path / "t.jsonl", 40)
    prof = rq_tool.calibrate(src, str(tmp_path / "t.jsonl"), num_samples=8, seq_len=32, progress=False)
    real, calls = os.sendfile, []

    def counting(out, fd, offset, count):
        calls.append(real(out, fd, offset, min(count, 4096)))  # short transfers: the writer must loop
        return calls[-1]

    monkeypatch.setattr(shards.os, "sendfile", counting)
    rq_tool.rewrite(src, prof, tmp_path / "a", strategy="replicate-only", shard_bytes=64 << 10, progress=False)
    stored = sum(info.nbytes for info in SourceCheckpoint(src).stored.values())
    assert sum(calls) >= stored  # every stored tensor (and each replica again) file to file

    def refuse(*a):
        raise OSError(errno.EINVAL, "sendfile not supported here")

    monkeypatch.setattr(shards.os, "sendfile", refuse)
    rq_tool.rewrite(src, prof, tmp_path / "b", strategy="replicate-only", shard_bytes=64 << 10, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert len(names) > 1 and names == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for out in ("a", "b"):
        assert verify(tmp_path / out) == []

"""Data safety and load-time integrity, the cases of issue 11 as regression tests.

* Output policy (``rq_tool.outputs``): no command writes into, over or around its inputs;
  ``--force`` replaces only what rq wrote; temporaries are unique, locked, cleaned on SIGTERM,
  and a live one of another process (or PID namespace) is never removed; disk-full names the output.
* Integrity (``rq_tool.runtime.integrity``): a relabelled dtype, a changed activation or a shard
  outside the model directory is refused by ``rq_tool.load`` and by ``rq verify`` alike, even
  after the manifest was regenerated.
* Every command: one ``error:`` line and exit 2, click usage errors included; options bounded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import importlib
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import rq_tool
from rq_tool import defaults
from rq_tool.cli import main
from rq_tool.errors import RQError
from rq_tool.outputs import _host
from rq_tool.rewrite.shards import write_manifest
from tiny_models import save_tiny

N_TEXTS = 40


def tree(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (hidden ones too), or of ``path`` itself."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob(".*rq-tmp*"))


def invoke(*argv) -> "object":
    return CliRunner().invoke(main, [str(a) for a in argv])


def one_error_line(r) -> str:
    lines = [ln.split("\r")[-1].strip() for ln in r.stderr.split("\n") if ln.split("\r")[-1].strip()]
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


@pytest.fixture(scope="module")
def m(rewritten_tiny, tmp_path_factory):
    """``M/src`` (a source model), ``M/p.json``, ``M/out`` (its rewrite): copied per module."""
    return rewritten_tiny


@pytest.fixture
def M(m, tmp_path):
    d = tmp_path / "M"
    shutil.copytree(m, d)
    return d


# --------------------------------------------------------------------------- output policy
def test_rewrite_into_the_parent_of_its_source_is_refused(M):
    before = tree(M)
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M, "--force"))
    assert f"output {M} contains the input" in msg
    assert tree(M) == before and not leftovers(M.parent)


@pytest.mark.parametrize("where", ["src", "src/sub", "p.json"])
def test_rewrite_over_or_inside_an_input_is_refused(M, where):
    before = tree(M)
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / where, "--force"))
    assert any(s in msg for s in ("is the input", "lies inside the input", "is a file"))
    assert tree(M) == before and not leftovers(M.parent)


def test_rewrite_through_a_symlink_to_the_source_is_refused(M):
    (M / "link").symlink_to(M / "src", target_is_directory=True)
    before = tree(M / "src")
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "link", "--force"))
    assert "is the input" in msg
    assert tree(M / "src") == before


def test_force_never_deletes_a_folder_rq_did_not_write(M, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", photos, "--force"))
    assert "is not an rq rewritten model directory" in msg and "even with --force" in msg
    assert (photos / "cat.jpg").read_bytes() == b"\xff\xd8 a cat" and not leftovers(tmp_path)


def test_force_replaces_an_rq_output_but_not_one_with_user_files(M):
    r = invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "out", "--force", "--strategy", "paper")
    assert r.exit_code == 0, r.output
    assert rq_tool.verify(M / "out") == [] and not leftovers(M)
    (M / "out" / "my_notes.txt").write_text("mine")  # the manifest no longer lists every file: not rq's alone
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "out", "--force"))
    assert "is not an rq rewritten model directory" in msg
    assert (M / "out" / "my_notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["src/model.safetensors", "src/config.json", "src", "t.jsonl"])
def test_calibrate_never_writes_over_its_inputs(M, target):
    before = tree(M)
    r = invoke("calibrate", M / "src", "-d", M / "t.jsonl", "--num-samples", 2, "--seq-len", 32, "--out", M / target)
    msg = one_error_line(r)
    assert any(s in msg for s in ("is the input", "lies inside the input", "not an rq profile", "is a directory"))
    assert tree(M) == before and not leftovers(M)


def test_calibrate_replaces_only_a_profile_and_only_with_force(M):
    mine = M / "notes.json"
    mine.write_text('{"a": 1}')
    msg = one_error_line(invoke("calibrate", M / "src", "-d", M / "t.jsonl", "--num-samples", 2, "--seq-len", 32,
                                "--out", mine, "--force"))
    assert "is not an rq profile file" in msg and mine.read_text() == '{"a": 1}'
    before = tree(M / "p.json")
    msg = one_error_line(invoke("calibrate", M / "src", "-d", M / "t.jsonl", "--num-samples", 2, "--seq-len", 32,
                                "--out", M / "p.json"))
    assert "already exists (use --force" in msg and tree(M / "p.json") == before
    r = invoke("calibrate", M / "src", "-d", M / "t.jsonl", "--num-samples", 2, "--seq-len", 32, "--out",
               M / "p.json", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((M / "p.json").read_text())["format"] == "rq-profile" and not leftovers(M)


@pytest.mark.parametrize("target", ["src/config.json", "out/config.json", "p.json"])
def test_export_never_writes_over_its_inputs_or_foreign_files(M, target):
    before = tree(M)
    args = ("export", M / "p.json", "--engine", "sglang", "--ep-size", 4, "--out", M / target, "--force")
    if target.startswith("out/"):
        args = ("export", M / "out", "--engine", "sglang", "--ep-size", 4, "--out", M / target, "--force")
    msg = one_error_line(invoke(*args))
    assert "input" in msg or "not an rq export file" in msg
    assert tree(M) == before and not leftovers(M)


def test_export_replaces_its_own_file_with_force(M, tmp_path):
    out = tmp_path / "loc.json"
    assert invoke("export", M / "p.json", "--engine", "sglang", "--ep-size", 4, "--out", out).exit_code == 0
    assert "already exists" in one_error_line(invoke("export", M / "p.json", "--engine", "sglang", "--ep-size", 4,
                                                     "--out", out))
    assert invoke("export", M / "p.json", "--engine", "sglang", "--ep-size", 4, "--out", out, "--force").exit_code == 0
    assert "physical_to_logical_map" in json.loads(out.read_text())


def test_profile_missing_an_moe_layer_is_refused(M, tmp_path):
    d = json.loads((M / "p.json").read_text())
    assert d["model"]["moe_layers"] == [lp["layer"] for lp in d["layers"]]
    del d["layers"][1]
    (tmp_path / "holed.json").write_text(json.dumps(d))
    msg = one_error_line(invoke("export", tmp_path / "holed.json", "--engine", "sglang", "--ep-size", 4,
                                "--out", tmp_path / "x.json"))
    assert f"MoE layer(s) [{d['model']['moe_layers'][1]}] of the model are missing" in msg
    assert not (tmp_path / "x.json").exists()


def test_report_is_whole_or_absent(M, tmp_path, monkeypatch):
    from rq_tool.eval import report as report_mod

    calls = []
    real = report_mod._heatmap

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(report_mod, "_heatmap", fail_second)
    msg = one_error_line(invoke("report", M / "p.json", "--compare", M / "out", "--out", tmp_path / "rep"))
    assert "No space left on device" in msg
    assert not (tmp_path / "rep").exists() and not leftovers(tmp_path)
    monkeypatch.setattr(report_mod, "_heatmap", real)
    assert invoke("report", M / "p.json", "--out", tmp_path / "rep").exit_code == 0
    assert "already exists" in one_error_line(invoke("report", M / "p.json", "--out", tmp_path / "rep"))
    assert invoke("report", M / "p.json", "--out", tmp_path / "rep", "--force").exit_code == 0
    msg = one_error_line(invoke("report", M / "p.json", "--compare", M / "out", "--out", M / "out" / "rep"))
    assert "lies inside the input" in msg


def test_concurrent_saves_to_one_path_publish_valid_json(m, tmp_path):
    """Many writers of one path at once (threads: one pid, so the old shared ``.tmp`` name collided)."""
    from rq_tool.calibrate.profile import Profile

    prof = Profile.load(m / "p.json")
    target = tmp_path / "p.json"
    errors = []

    def save():
        try:
            for _ in range(10):
                prof.save(target)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Profile.load(target).to_dict() == prof.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.json", "p.loads.safetensors"][: 1 + (prof.seq_loads is not None)])


def test_disk_full_names_the_output_not_the_source(M, monkeypatch):
    from rq_tool.rewrite import shards

    real, n = shards.ShardWriter.add, []

    def add(self, key, tensor):
        n.append(key)
        if len(n) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, tensor)

    monkeypatch.setattr(shards.ShardWriter, "add", add)
    before = tree(M / "src")
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "new"))
    assert msg.startswith(f"error: writing {M / 'new'} failed (No space left on device") and "src" not in msg
    assert not (M / "new").exists() and not leftovers(M) and tree(M / "src") == before


def test_sigterm_during_rewrite_leaves_nothing(M, monkeypatch):
    """SIGTERM unwinds like Ctrl-C: the temporary (and its lock) go, nothing is published, exit 143."""
    writer = importlib.import_module("rq_tool.rewrite.writer")  # rq_tool.rewrite is also the function

    out = M / "new"
    real = writer.write_manifest

    def term_then_write(tmp, *a, **kw):  # deterministic: the signal lands while the temporary is full
        assert any(tmp.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        return real(tmp, *a, **kw)

    monkeypatch.setattr(writer, "write_manifest", term_then_write)
    r = invoke("rewrite", M / "src", "-p", M / "p.json", "--out", out)
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "terminated (SIGTERM): nothing was left half-written" in r.stderr
    assert not out.exists() and not leftovers(M)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


def test_a_live_temporary_of_another_pid_namespace_is_left_alone(M):
    """Same host name and pid (another container), its lock held: a rewrite of the same output keeps it."""
    foreign = M / f".new.rq-tmp-{_host()}-{os.getpid()}-0badc0de"
    foreign.mkdir()
    (foreign / "x").write_text("theirs")
    fd = os.open(foreign.with_name(foreign.name + ".lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a separate open file description: conflicts like another process's
    try:
        r = invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "new")
        assert r.exit_code == 0, r.output
        assert (foreign / "x").read_text() == "theirs"
    finally:
        os.close(fd)
    r = invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "new", "--force")  # now its writer is gone
    assert r.exit_code == 0 and f"removed stale temporary {foreign}" in r.stderr
    assert not leftovers(M)


# -------------------------------------------------------------------------- load integrity
def _relabel(out: Path, key_part: str, old: str, new: str) -> str:
    """Rewrite one tensor's dtype in its shard header (same header size), then regenerate the manifest."""
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k, v in header.items() if key_part in k and isinstance(v, dict) and v["dtype"] == old)
    header[key]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    data[8:8 + n] = text.ljust(n, b" ")
    shard.write_bytes(bytes(data))
    write_manifest(out)  # the hashes match again: only the semantic checks can catch it
    return key


def _assert_refused(out: Path, needle: str):
    with pytest.raises(RQError, match=re.escape(needle)):
        rq_tool.load(out)
    problems = rq_tool.verify(out)
    assert any(needle in p for p in problems), problems
    r = invoke("verify", out)
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output


@pytest.fixture(scope="module")
def bf16_outs(m, tmp_path_factory):
    """A bf16 source rewritten twice: greedy (int8 + nf4 slots) and replicate-only (bf16 slots)."""
    root = tmp_path_factory.mktemp("bf16")
    save_tiny("qwen3_moe", root / "src", dtype=torch.bfloat16)
    for strategy in ("greedy", "replicate-only"):  # the profile fits: dtype is not in the config fingerprint
        rq_tool.rewrite(root / "src", m / "p.json", root / strategy, strategy=strategy, progress=False)
    return root


@pytest.mark.parametrize("strategy,part,old,new", [("greedy", "int8_gate_up", "I8", "U8"),
                                                    ("greedy", "nf4_down", "U8", "I8"),
                                                    ("replicate-only", "bf16_down", "BF16", "F16")])
def test_relabelled_slot_dtype_is_refused(bf16_outs, tmp_path, strategy, part, old, new):
    out = tmp_path / "out"
    shutil.copytree(bf16_outs / strategy, out)
    assert rq_tool.verify(out) == []
    key = _relabel(out, part, old, new)
    _assert_refused(out, f"{key} has dtype {new}, routing map needs {old}")


def test_relabelled_non_expert_tensor_is_refused(M):
    _relabel(M / "out", "embed_tokens", "F32", "I32")
    _assert_refused(M / "out", "differ from what rq wrote (rq.tensors_sha256)")


def test_activation_other_than_the_base_config_is_refused(M):
    out = M / "out"
    cfg = json.loads((out / "config.json").read_text())
    cfg["rq"]["routing_map"]["activation"] = "glu:gelu"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / defaults.ROUTING_MAP_FILE).write_text(json.dumps(cfg["rq"]["routing_map"], indent=1))
    write_manifest(out)
    _assert_refused(out, "activation 'glu:gelu' differs from the base config's 'glu:silu'")


@pytest.mark.parametrize("name", ["/etc/passwd", "../src/model.safetensors", "sub/../../x.safetensors",
                                  "C:\\x.safetensors"])
def test_index_pointing_outside_the_model_dir_is_refused(M, name):
    out = M / "out"
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(out)
    _assert_refused(out, "points outside the model directory")
    # the same rule on the source side of rq rewrite
    (M / "src" / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = one_error_line(invoke("rewrite", M / "src", "-p", M / "p.json", "--out", M / "new"))
    assert "points outside the model directory" in msg and not (M / "new").exists()
    msg = one_error_line(invoke("calibrate", M / "src", "-d", M / "t.jsonl", "--out", M / "new.json"))
    assert "points outside the model directory" in msg and not (M / "new.json").exists()


def test_verify_ok_means_load_gives_the_planned_model(m):
    assert rq_tool.verify(m / "out") == []
    model = rq_tool.load(m / "out")
    ids = torch.arange(12)[None] % 50
    assert torch.isfinite(model(input_ids=ids).logits).all()


# --------------------------------------------------------------------- options and usage
@pytest.mark.parametrize("argv,needle", [
    (["rewrite", "--profile", "p.json", "--bogus"], "No such option"),
    (["calibrate", "--seq-len", "abc"], "--seq-len"),
    (["calibrate", "--seq-len", "0"], "--seq-len"),
    (["calibrate", "--schemes", ""], "at least one scheme"),
    (["calibrate", "--schemes", "int8,int3"], "unknown scheme 'int3'"),
    (["rewrite", "-p", "p.json", "--dry-run", "--budget", "1e-99999999"], "out of range"),
    (["rewrite", "-p", "p.json", "--dry-run", "--budget", "1e309"], "out of range"),
    (["rewrite", "-p", "p.json", "--dry-run", "--budget", "1e30B"], "between 1 byte and 1 EiB"),
    (["rewrite", "-p", "p.json", "--dry-run", "--budget", "nan"], "not a budget"),
    (["rewrite", "-p", "p.json", "--dry-run", "--ep-devices", "1e30"], "--ep-devices"),
    (["rewrite", "-p", "p.json", "--dry-run", "--max-error", "nan"], "--max-error"),
    (["rewrite", "-p", "p.json", "--dry-run", "--max-error", "inf"], "--max-error"),
    (["export", "p.json", "--engine", "sglang", "--ep-size", "-3"], "--ep-size"),
    (["eval", "a", "b", "--seq-len", "1"], "--seq-len"),
    (["eval", "a", "b", "--laser-eps-high", "nan"], "--laser-eps-high"),
    (["nosuchcommand"], "No such command"),
])
def test_bad_options_are_one_line_and_exit_2(argv, needle):
    t = time.perf_counter()
    msg = one_error_line(invoke(*argv))
    assert needle in msg and time.perf_counter() - t < 10


def test_budget_bounds_hold_in_the_library_too(m):
    t = time.perf_counter()
    with pytest.raises(RQError, match="out of range"):
        rq_tool.rewrite(m / "src", m / "p.json", None, budget="1e-99999999", dry_run=True)
    assert time.perf_counter() - t < 10


def test_integrity_and_readers_stay_light():
    """The loader's readers and checks import no CLI, dataset, calibration or rewrite code."""
    import subprocess
    import sys

    code = ("import sys, rq_tool.runtime.integrity, rq_tool.runtime.model_dir, rq_tool.checkpoint, rq_tool.validate, "
            "rq_tool.outputs; heavy = [m for m in ('click', 'datasets', 'rq_tool.calibrate.run', 'rq_tool.calibrate.data', "
            "'rq_tool.rewrite.writer', 'rq_tool.rewrite.planning', 'rq_tool.cli') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

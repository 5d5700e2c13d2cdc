"""Interruption, tampering, determinism and pickle safety: rq never loses or half-writes anything.

* Interruption: ``rq rewrite`` (the real click entry point) runs in child processes forked from a
  server that imported rq once -- so a kill lands in the rewrite itself, not in five seconds of
  imports -- and is killed (SIGINT / SIGKILL) at seeded random delays; the output must then either
  be absent or verify, a previous output must survive a killed ``--force``, and the next run must
  clean (and report) what a SIGKILL left.
* ``rq verify`` catches a flipped byte, a deleted file, an added file and an edited routing map.
* Same inputs and seed give byte-identical profiles and rewritten models (also across processes).
* rq never unpickles: a ``pytorch_model.bin`` is refused alone and ignored beside safetensors, and
  the only code in an output is rq's own runtime entry point, hashed in the manifest.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner

import rq_tool
from rq_tool import defaults
from rq_tool.cli import main
from rq_tool.rewrite.shards import clean_stale_temporaries, publish, write_manifest
from tiny_models import save_tiny

SEED = 0


@pytest.fixture(scope="module")
def tiny(rewritten_tiny):
    return rewritten_tiny


def manifest(out: Path) -> dict:
    return json.loads((out / defaults.MANIFEST_FILE).read_text())


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.rq-tmp-*"))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------ verify
def test_verify_passes_on_fresh_output(tiny):
    r = CliRunner().invoke(main, ["verify", str(tiny / "out")])
    assert r.exit_code == 0 and r.stdout.startswith("OK"), r.output
    names = {p.name for p in (tiny / "out").iterdir()} - {defaults.MANIFEST_FILE}
    assert set(manifest(tiny / "out")["files"]) == names  # every file is covered


def test_verify_reads_a_v1_sha256_manifest_and_refuses_unknown_hashes(tiny, tmp_path):
    """Outputs of earlier rq versions (manifest v1, sha256) still verify, a flipped byte included."""
    out = tmp_path / "out"
    shutil.copytree(tiny / "out", out)
    m = manifest(out)
    m["version"], algo = 1, m.pop("hash")
    assert algo == "xxh3_128"
    for name, entry in m["files"].items():
        entry["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
        del entry[algo]
    (out / defaults.MANIFEST_FILE).write_text(json.dumps(m))
    assert rq_tool.verify(out) == []
    assert rq_tool.verify(out) == [] and _flip_byte(out).replace("xxh3_128", "sha256") in rq_tool.verify(out)[0]
    m.update(version=2, hash="md5")
    (out / defaults.MANIFEST_FILE).write_text(json.dumps(m))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 2 and "unknown file hash 'md5'" in r.output and r.output.count("error:") == 1, r.output


def _flip_byte(out):
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return "model.safetensors: xxh3_128 differs"


def _delete_file(out):
    (out / "tokenizer.json").unlink()
    return "tokenizer.json: listed in the manifest but missing"


def _add_file(out):
    (out / "extra.py").write_text("print('hi')\n")
    return "extra.py: not in the manifest"


def _edit_routing_map(out):
    rmap = json.loads((out / defaults.ROUTING_MAP_FILE).read_text())
    rmap["layers"][0]["slot_scheme"][0] = "nf4" if rmap["layers"][0]["slot_scheme"][0] != "nf4" else "int8"
    (out / defaults.ROUTING_MAP_FILE).write_text(json.dumps(rmap, indent=1) + "\n")
    return "routing_map.json: xxh3_128 differs"


def _edit_routing_map_and_manifest(out):
    _edit_routing_map(out)
    write_manifest(out)  # a consistent manifest: the cross-check with config.json must catch it
    return "routing_map.json differs from the routing map in config.json"


TAMPER = [_flip_byte, _delete_file, _add_file, _edit_routing_map, _edit_routing_map_and_manifest]


@pytest.mark.parametrize("tamper", TAMPER, ids=[t.__name__.strip("_") for t in TAMPER])
def test_verify_detects_tampering(tiny, tmp_path, tamper):
    out = tmp_path / "out"
    shutil.copytree(tiny / "out", out)
    needle = tamper(out)
    assert any(needle in p for p in rq_tool.verify(out))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output


# ------------------------------------------------------------------------------- interruption
_SERVER = r"""
import glob, json, os, sys, time
# import what a rewrite imports lazily, so a child starts at the rewrite itself; run nothing (no torch op,
# no thread) before forking: a forked copy of a process with busy worker threads can deadlock
import rq_tool.cli, rq_tool.rewrite.writer, rq_tool.runtime.hf, rq_tool.rewrite.table, rq_tool.plan
import bitsandbytes.functional, torch._dynamo, transformers.models.qwen3_moe.modeling_qwen3_moe
sys.modules["rq_tool.rewrite.writer"].rewrite.__kwdefaults__["shard_bytes"] = int(sys.argv[1])  # many small shards
print("@@ ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child is `rq <argv>`, its output in a log file
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        code = 0
        try:
            rq_tool.cli.main(job["argv"], prog_name="rq")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a signal before click took over
            code = 99
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    # the child is reaped only here, so its pid cannot be reused by another process before the kill
    when = job.get("kill_when_exists", "").replace("{pid}", str(pid))  # a glob pattern
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if job.get("signal") and not killed and (time.perf_counter() - t0 >= job.get("kill_after", 1e9)
                                                or (when and glob.glob(when))):
            os.kill(pid, job["signal"])
            killed = True
        time.sleep(0.001)
    print("@@ " + json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status), "killed": killed,
                              "seconds": time.perf_counter() - t0}), flush=True)
"""


class ForkServer:
    """Runs ``rq <argv>`` in forked children of one warm interpreter, optionally killing them."""

    def __init__(self, shard_bytes: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(shard_bytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        assert self._read() == "ready"

    def _read(self) -> str:
        while True:
            line = self.proc.stdout.readline()
            assert line, "fork server died"
            if line.startswith("@@ "):
                return line[3:].strip()

    def run(self, argv, log: Path, **kill) -> dict:
        """``{pid, code, killed, seconds}``; ``code`` < 0: killed by that signal. ``kill``: ``signal`` plus
        ``kill_after`` (seconds) or ``kill_when_exists`` (a path; ``{pid}`` is the child's pid)."""
        job = {"argv": [str(a) for a in argv], "log": str(log), **kill}
        self.proc.stdin.write(json.dumps(job) + "\n")
        return json.loads(self._read())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a hung child: the server (ours) goes, the test fails
            self.proc.kill()
            raise


SHARD_BYTES = 128 << 10  # many small output shards: kills land between them too
KILLS = 4  # every (first write | --force replace) x (SIGINT | SIGKILL) once, at a seeded random time


def synthetic_profile(src: Path, layers, num_experts: int, seed: int = 0):
    """A profile with skewed loads for ``src`` (its config hash), without running calibration."""
    import torch
    from transformers import AutoConfig

    from rq_tool.calibrate.profile import LayerProfile, Profile, config_fingerprint

    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in layers:
        load = (1000 * torch.rand(num_experts, generator=g) ** 3).long() + 1
        err = load.double() * torch.rand(num_experts, generator=g, dtype=torch.float64)
        rows.append(LayerProfile(layer, load, load.double(), err, err, {"int8": err * 0.1, "nf4": err}, {}))
    model = {"path": str(src), "model_type": "qwen3_moe", "config_sha256": config_fingerprint(
        AutoConfig.from_pretrained(src)), "num_experts": num_experts}
    return Profile(model, {"dataset": "synthetic"}, ["int8", "nf4"], rows)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A model whose rewrite (~0.3-1 s) is long enough to be killed mid-way: 6 MoE layers x 32 experts."""
    root = tmp_path_factory.mktemp("interrupt")
    src = save_tiny("qwen3_moe", root / "src", num_hidden_layers=6, num_experts=32)
    synthetic_profile(src, range(6), 32).save(root / "p.json")
    rq_tool.rewrite(src, root / "p.json", root / "ref", progress=False, shard_bytes=SHARD_BYTES,
                    max_error=None)  # the unguarded greedy: many quantized slots (nf4 first in some layers)
    return root


@pytest.mark.slow
def test_rewrite_survives_kills(big, tmp_path):
    out = tmp_path / "out"
    argv = ["rewrite", big / "src", "-p", big / "p.json", "-o", out, "--force", "--max-error", "none"]
    ref = big / "ref"  # the same rewrite in the test process: every output below must match it byte for byte
    server = ForkServer(SHARD_BYTES)
    try:
        full = []
        for _ in range(2):  # the first run in a fresh child is slower: time the second one too
            r = server.run(argv, tmp_path / "log0")
            assert r["code"] == 0, (tmp_path / "log0").read_text()
            full.append(r["seconds"])
        full = min(full)
        assert len(list(out.glob("*.safetensors"))) > 3  # many shards: kills land between them too
        assert manifest(out) == manifest(ref)  # deterministic across processes (hash seeds differ)

        rng = random.Random(SEED)
        outcomes = []
        for i in range(KILLS):
            if i % 2 == 0:  # kill a first write
                shutil.rmtree(out, ignore_errors=True)
            elif not out.exists():  # kill a --force replace of a complete output
                shutil.copytree(ref, out)
            sig = (signal.SIGINT, signal.SIGKILL)[i // 2 % 2]
            before = out.stat().st_ino if out.exists() else None
            log = tmp_path / f"log{i + 1}"
            r = server.run(argv, log, signal=int(sig), kill_after=rng.uniform(0, full))
            left = temporaries(out)
            after = out.stat().st_ino if out.exists() else None
            state = ("published" if after not in (None, before) else "kept" if after else "absent") + (
                f"+{len(left)} tmp" if left else "")
            outcomes.append((sig.name, r["code"], round(r["seconds"], 2), state))
            existed = before is not None
            if out.exists():
                assert rq_tool.verify(out) == [], f"kill {i} ({sig.name}) left a damaged output"
                assert manifest(out) == manifest(ref)
            if existed:  # a killed --force replace never loses the previous output
                assert out.exists() or any(p.name.endswith(".old") for p in left)
            if sig == signal.SIGINT and r["code"] == 130:  # the handler removed its own temporary (and lock)
                assert not [p for p in left if f"-{r['pid']}-" in p.name]
                assert "interrupted" in log.read_text()

        # a SIGKILL certain to leave a temporary: as soon as the child's temporary directory appears
        pattern = f".{out.name}.rq-tmp-*-{{pid}}-{'[0-9a-f]' * 8}"  # HOST-PID-RANDOM, not the .lock
        r = server.run(argv, tmp_path / "log-kill-at-tmp", signal=int(signal.SIGKILL),
                       kill_when_exists=str(out.parent / pattern))
        assert r["code"] == -signal.SIGKILL and r["killed"]
        assert glob.glob(str(out.parent / pattern.replace("{pid}", str(r["pid"]))))
        # a live writer's temporary (its lock held here, in another process than the rewrite): left alone
        live = out.parent / f".{out.name}.rq-tmp-otherhost-1-0123abcd"
        live.mkdir()
        live_lock = os.open(live.with_name(live.name + ".lock"), os.O_CREAT | os.O_RDWR)
        fcntl.flock(live_lock, fcntl.LOCK_EX)

        stale = [p for p in temporaries(out) if p != live and not p.name.endswith(".lock")]
        r = server.run(argv, tmp_path / "log-final")
        assert r["code"] == 0
        log = (tmp_path / "log-final").read_text()
        for p in stale:
            assert f"removed stale temporary {p}" in log or ("-old-" in p.name and "restored" in log), log
        assert temporaries(out) == [live, live.with_name(live.name + ".lock")]
        os.close(live_lock)
        assert rq_tool.verify(out) == [] and manifest(out) == manifest(ref)
        print(f"full run {full:.2f}s; kills (signal, exit code, seconds, output state):", *outcomes, sep="\n  ")
    finally:
        server.close()


def test_verify_reads_layers_whose_first_slot_is_quantized(big, tmp_path):
    """Regression: verify took the intermediate size from slot 0, packed to 2-D when slot 0 is nf4."""
    rmap = json.loads((big / "ref" / defaults.ROUTING_MAP_FILE).read_text())
    assert "nf4" in [lm["slot_scheme"][0] for lm in rmap["layers"]]
    assert rq_tool.verify(big / "ref") == []
    assert CliRunner().invoke(main, ["verify", str(big / "ref")]).exit_code == 0


def test_killed_force_replace_is_restored(tiny, tmp_path):
    """SIGKILL between publish's two renames leaves the old output as a backup: the next run restores it."""
    out = tmp_path / "out"
    shutil.copytree(tiny / "out", out)
    pid = dead_pid()
    backup = tmp_path / f".out.rq-tmp-old-{pid}"
    out.rename(backup)
    partial = tmp_path / f".out.rq-tmp-{pid}"
    partial.mkdir()
    (partial / ".part-00000.safetensors").write_bytes(b"half")
    r = CliRunner().invoke(main, ["rewrite", str(tiny / "src"), "-p", str(tiny / "p.json"), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.stderr  # the restored output is there again
    assert f"restored {out}" in r.stderr and f"removed stale temporary {partial}" in r.stderr
    assert temporaries(out) == [] and rq_tool.verify(out) == []
    assert manifest(out) == manifest(tiny / "out")


def test_failed_publish_puts_the_old_output_back(tiny, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny / "out", out)
    with pytest.raises(FileNotFoundError):
        publish(tmp_path / "missing-tmp", out, force=True)  # the second rename fails
    assert rq_tool.verify(out) == [] and temporaries(out) == []
    assert clean_stale_temporaries(out) == []


def test_streamed_shards_round_trip(tmp_path):
    """ShardWriter writes planned tensors front to back (header first, from its threads): safetensors
    reads every dtype back, data stays aligned (a misaligned start opens a new shard), shards respect
    ``max_bytes``, chunks form a tensor, and the hash it computed while writing is the file's."""
    import torch
    from safetensors import safe_open

    from rq_tool.rewrite.shards import Entry, ShardWriter, hash_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.arange(5, dtype=torch.uint8), "d": torch.randn(2, 2, generator=g), "e": torch.tensor(3.0),
               "f": torch.zeros(0, 4), "g": torch.randn(300, generator=g), "h": torch.arange(6).view(2, 3).t(),
               "i": torch.tensor([True, False]), "j": torch.randint(-128, 127, (64,), dtype=torch.int8, generator=g)}
    tensors["k"] = torch.randn(4, 6, generator=g).to(torch.float8_e4m3fn)
    entries = [Entry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with ShardWriter(tmp_path, entries, max_bytes=1024, inflight_bytes=256) as w:
        for k, t in tensors.items():
            w.add(k, [t[:1], lambda t=t: t[1:]] if t.dim() and len(t) > 1 else t)  # chunks, one of them lazy
        weight_map = w.finish()
    assert w.digests == {name: hash_file(tmp_path / name) for name in set(weight_map.values())}
    assert set(weight_map) == set(tensors) and len(set(weight_map.values())) > 1
    for name in set(weight_map.values()):
        with safe_open(str(tmp_path / name), "pt") as f:
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), tensors[k]), k
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict(sorted(weight_map.items()))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shard_writer_hands_a_thread_error_to_the_caller(tmp_path):
    import torch

    from rq_tool.rewrite.shards import Entry, ShardWriter

    def boom():
        raise RuntimeError("worker failed")

    entries = [Entry(f"t{i}", torch.float32, (256,)) for i in range(8)]
    with pytest.raises(RuntimeError, match="worker failed"):
        with ShardWriter(tmp_path, entries, inflight_bytes=1024) as w:
            w.add("t0", torch.zeros(256))
            w.add("t1", boom)
            for i in range(2, 8):
                w.add(f"t{i}", torch.zeros(256))
            w.finish()
    with pytest.raises(AssertionError, match="planned"):
        with ShardWriter(tmp_path / "x", entries[:1]) as w:
            w.add("other", torch.zeros(256))


# ------------------------------------------------------------------------------ determinism
def test_calibrate_is_deterministic(tiny, tmp_path):
    for name in ("a.json", "b.json"):
        r = CliRunner().invoke(main, ["calibrate", str(tiny / "src"), "-d", str(tiny / "t.jsonl"), "--num-samples",
                                      "4", "--seq-len", "32", "--seed", "3", "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["loads"].pop("file") == "a.loads.safetensors" and b["loads"].pop("file") == "b.loads.safetensors"
    assert a == b  # profile v2 names its loads file after itself; everything else is byte-identical
    assert (tmp_path / "a.loads.safetensors").read_bytes() == (tmp_path / "b.loads.safetensors").read_bytes()


@pytest.mark.parametrize("strategy", ["greedy", "replicate-only"])
def test_rewrite_is_deterministic(tiny, tmp_path, strategy):
    outs = [tmp_path / "a", tmp_path / "elsewhere" / "b"]  # the output path must not leak into the files
    for out in outs:
        r = CliRunner().invoke(main, ["rewrite", str(tiny / "src"), "-p", str(tiny / "p.json"), "-o", str(out),
                                      "--strategy", strategy, "--json"])
        assert r.exit_code == 0, r.output
    a, b = (manifest(o) for o in outs)
    assert a == b
    for name in a["files"]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert str(tmp_path) not in json.dumps(a)


# ---------------------------------------------------------------------------------- safety
class _Bomb:
    """Unpickling this creates ``path``: proof that something unpickled the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    import pickle

    import torch

    def refuse(*a, **k):
        raise AssertionError("rq unpickled something")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)


def test_pickle_only_model_is_refused(tiny, tmp_path, no_unpickling):
    import torch

    d = tmp_path / "model"
    shutil.copytree(tiny / "src", d)
    (d / "model.safetensors").unlink()
    sentinel = tmp_path / "UNPICKLED"
    torch.save({"model.embed_tokens.weight": _Bomb(sentinel)}, d / "pytorch_model.bin")
    for argv in (["calibrate", d, "-d", tiny / "t.jsonl", "--seq-len", "32", "-o", tmp_path / "p.json"],
                 ["rewrite", d, "-p", tiny / "p.json", "-o", tmp_path / "out"]):
        r = CliRunner().invoke(main, [str(a) for a in argv])
        assert r.exit_code == 2 and "never pickle" in r.stderr and "safetensors" in r.stderr, r.output
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.json").exists()


def test_pickle_beside_safetensors_is_never_read(tiny, tmp_path, no_unpickling):
    import torch

    d = tmp_path / "model"
    shutil.copytree(tiny / "src", d)
    sentinel = tmp_path / "UNPICKLED"
    torch.save({"model.embed_tokens.weight": _Bomb(sentinel)}, d / "pytorch_model.bin")
    (d / "training_args.bin").write_bytes((d / "pytorch_model.bin").read_bytes())
    (d / "modeling_custom.py").write_text(f"open({str(sentinel)!r}, 'w')\n")  # foreign code is never shipped
    r = CliRunner().invoke(main, ["calibrate", str(d), "-d", str(tiny / "t.jsonl"), "--num-samples", "2",
                                  "--seq-len", "32", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["rewrite", str(d), "-p", str(tmp_path / "p.json"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert not sentinel.exists()
    assert not list((tmp_path / "out").glob("*.bin")) and not (tmp_path / "out" / "modeling_custom.py").exists()
    assert rq_tool.verify(tmp_path / "out") == []


def test_runtime_code_is_rqs_own_and_hashed(tiny):
    from rq_tool.runtime.bundle import bundle_files

    out = tiny / "out"
    files = bundle_files()
    assert sorted(p.name for p in out.glob("*.py")) == sorted(files)  # exactly the bundled runtime, no other code
    for name, text in files.items():
        code = (out / name).read_bytes()
        assert code == text.encode()
        assert manifest(out)["files"][name]["xxh3_128"] == xxhash.xxh3_128(code).hexdigest()
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert all(v.startswith("modeling_rq.") for v in auto_map.values())

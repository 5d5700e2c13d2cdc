"""Streaming rewrite at scale: ``rq_tool.rewrite`` vs plainly copying the same bytes, and its peak memory.

For each size (same layer size, more layers) this builds a synthetic multi-shard Qwen3-MoE checkpoint
under a temporary directory -- real key names, random bf16 weights, ~500 MB source shards -- and a
profile with the matching config hash (skewed loads), then runs, each in a fresh subprocess:

  copy            shutil.copyfile of every source shard (the I/O floor, measured in the same run)
  replicate-only  rq_tool.rewrite(..., strategy="replicate-only")  (copies + replicas, no quantization)
  greedy          rq_tool.rewrite(..., strategy="greedy")          (replicas paid for by int8/nf4)
  MODE@baseline   the same with another rq source tree first on PYTHONPATH (``--baseline DIR``, e.g.
                  ``git archive main | tar -x -C /tmp/rq-main``): before / after, side by side

``--source fp8`` stores the decoder Linear weights as block-FP8 (float8_e4m3fn + weight_scale_inv per
128x128 block, ``quant_method: "fp8"``, as DeepSeek-V3 / Qwen3-FP8 ship); the budget then counts the
FP8 bytes, rq dequantizes the experts it keeps (bf16 slots) and copies the rest as stored. With
``--repeat N`` every job runs N times, interleaved; the table shows medians and the min-max spread.

Each rewrite run is split in two at the moment the first tensor is streamed (the child wraps
``rq_tool.rewrite.writer._stream``, the same function in both trees):

  start-up   everything before it: opening the source (config, family -- building the family's meta
             model imports its transformers modeling code --, safetensors headers), the profile check,
             planning. A fixed cost per run, whatever the checkpoint's size.
  stream     the rest, to durable bytes: the streaming pass (every tensor read, transformed, written and
             hashed), then config / routing map / runtime code / manifest, then os.sync().

Throughput = source bytes / seconds (the child's imports never counted; os.sync() always counted, both
sides pay the same writeback). Two ratios, each per repetition against the copy of the same
repetition, then median and min-max spread:

  vs copy          (start-up + stream) -- what a user waits for; at ~1 GB start-up weighs about as much
                   as the copy itself, so this ratio grows with the checkpoint's size
  stream vs copy   stream only -- the steady state a large checkpoint approaches

Peak RSS = the child's own high-water mark (VmHWM; see ``run_child`` for why not ru_maxrss alone), split
into sampled peaks of anonymous memory (tensors) and file pages (the mmapped source shards being read,
reclaimable); an ``import`` row gives the floor a child reaches by importing rq and torch alone. Flat
peak RSS across sizes means the rewrite holds about one layer plus the source shard(s) it reads, never
the model: output tensors are streamed to disk as they are made (rq_tool/rewrite/shards.py ShardWriter).

Every child imports ``rq_tool`` from one tree and nothing else of it: this script's own tree, or DIR for
``--baseline DIR`` rows. Only TREE/rq_tool is put on its path (``bench_startup.prepare``: its entries
and TREE/kernels as ``rq_tool.kernels`` linked in a temporary directory, ahead of any installed rq_tool), it runs with PYTHONSAFEPATH=1 from that directory, so no tree's root
``kernels/`` folder shadows PyPI's ``kernels`` package (which transformers imports); every child reports
the ``rq_tool`` it imported and the bench checks it. A snapshot (``git archive HEAD``) thus benches itself.

    python scripts/bench_rewrite.py                       # ~1 GB and ~3 GB
    python scripts/bench_rewrite.py --layers 4,14 --json
    python scripts/bench_rewrite.py --layers 14 --source bf16,fp8 --repeat 3 --baseline /tmp/rq-main
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_startup import prepare  # noqa: E402  (this directory: run as a script)
from safetensors.torch import save_file

MB = 1024**2

CHILD = r"""
import json, os, sys, threading, time
mode, src, profile, out, shard_bytes = sys.argv[1:6]
peak = {"RssAnon": 0, "RssFile": 0}
marks = {}
def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("RssAnon", "RssFile", "VmHWM"))}
def sample():  # anonymous (heap, tensors) vs file-backed (mmapped source shards) resident memory
    while True:
        for k, v in status().items():
            if k in peak:
                peak[k] = max(peak[k], v)
        time.sleep(0.01)
rq_file = None
if mode == "copy":
    import shutil
    from pathlib import Path
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    Path(out).mkdir()
    for p in sorted(Path(src).iterdir()):
        shutil.copyfile(p, Path(out) / p.name)
elif mode == "import":
    import rq_tool.rewrite.writer, torch  # noqa: F401  the memory floor of a rewrite child
    rq_file = rq_tool.__file__
    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.05)
    t0 = time.perf_counter()
else:
    import rq_tool.rewrite.writer, rq_tool.kernels.slots
    rq_file = rq_tool.__file__
    def tree(f):
        return os.path.dirname(os.path.dirname(os.path.realpath(f)))
    if tree(rq_tool.kernels.slots.__file__) != tree(rq_file):
        raise SystemExit(f"rq_tool.kernels from {rq_tool.kernels.slots.__file__}, another tree than {rq_file}")
    w = sys.modules["rq_tool.rewrite.writer"]  # (rq_tool.rewrite is the function)
    stream = w._stream
    def _stream(*a, **k):  # start-up ends where the first tensor is streamed
        marks["stream_t0"] = time.perf_counter()
        return stream(*a, **k)
    w._stream = _stream
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    rq_tool.rewrite(src, profile, out, strategy=mode, progress=False, shard_bytes=int(shard_bytes))
os.sync()  # timed to durable bytes: both sides pay the same writeback
t1 = time.perf_counter()
startup = marks["stream_t0"] - t0 if marks else 0.0
print(json.dumps({"seconds": t1 - t0, "startup_s": startup, "stream_s": t1 - t0 - startup, "rq_tool": rq_file,
                  "vmhwm_kib": status()["VmHWM"], "anon_kib": peak["RssAnon"], "file_kib": peak["RssFile"]}))
"""


# ------------------------------------------------------------------------------- the checkpoint
def qwen3_moe_config(args, layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          moe_intermediate_size=args.moe_intermediate, num_hidden_layers=layers,
                          num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                          head_dim=64, num_experts=args.experts, num_experts_per_tok=8, max_position_embeddings=4096,
                          tie_word_embeddings=False, dtype="bfloat16")


def _fp8_eligible(key: str) -> bool:
    """The tensors an FP8 release stores in float8: decoder Linear weights (attention, experts), not
    embeddings, head, norms or routers."""
    return ".layers." in key and key.endswith("proj.weight")


def checkpoint_tensors(config, gen: torch.Generator, source: str = "bf16"):
    """``(key, tensor)`` in on-disk order; ``source="fp8"``: eligible weights as float8 + block scales."""
    from rq_tool.quant.sources import fp8_quantize

    for key, t in _bf16_tensors(config, gen):
        if source == "fp8" and _fp8_eligible(key):
            q, scale_inv = fp8_quantize(t, (128, 128))
            yield key, q
            yield key + "_scale_inv", scale_inv
        else:
            yield key, t


def _bf16_tensors(config, gen: torch.Generator):
    """``(key, tensor)`` in on-disk order: embeddings, then layer by layer, then final norm and head."""
    H, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim

    def w(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    yield "model.embed_tokens.weight", w(config.vocab_size, H)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", ones(H)
        yield f"{p}.post_attention_layernorm.weight", ones(H)
        for name, shape in (("q_proj", (q, H)), ("k_proj", (kv, H)), ("v_proj", (kv, H)), ("o_proj", (H, q))):
            yield f"{p}.self_attn.{name}.weight", w(*shape)
        yield f"{p}.self_attn.q_norm.weight", ones(config.head_dim)
        yield f"{p}.self_attn.k_norm.weight", ones(config.head_dim)
        yield f"{p}.mlp.gate.weight", w(E, H)
        for e in range(E):
            yield f"{p}.mlp.experts.{e}.gate_proj.weight", w(I, H)
            yield f"{p}.mlp.experts.{e}.up_proj.weight", w(I, H)
            yield f"{p}.mlp.experts.{e}.down_proj.weight", w(H, I)
    yield "model.norm.weight", ones(H)
    yield "lm_head.weight", w(config.vocab_size, H)


def build_checkpoint(path: Path, config, shard_bytes: int, seed: int = 0, source: str = "bf16") -> int:
    """Write config.json, ``model-0000i-of-0000n.safetensors`` shards and the index; returns weight bytes."""
    path.mkdir(parents=True)
    config.to_json_file(path / "config.json")
    if source == "fp8":
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
        (path / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = torch.Generator().manual_seed(seed)
    parts, buf, buf_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal buf, buf_bytes
        part = path / f".part-{len(parts)}.safetensors"
        save_file(buf, str(part), metadata={"format": "pt"})
        parts.append((part, list(buf)))
        buf, buf_bytes = {}, 0

    for key, t in checkpoint_tensors(config, gen, source):
        n = t.numel() * t.element_size()
        if buf and buf_bytes + n > shard_bytes:
            flush()
        buf[key], buf_bytes, total = t, buf_bytes + n, total + n
    flush()
    weight_map = {}
    for i, (part, keys) in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.rename(path / name)
        weight_map.update(dict.fromkeys(keys, name))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def synthetic_profile(path: Path, src: Path, config, seed: int = 0) -> None:
    """A profile whose config hash matches ``src``: Zipf-skewed loads, errors growing with load."""
    from transformers import AutoConfig

    from rq_tool.calibrate.profile import LayerProfile, Profile, config_fingerprint

    E = config.num_experts
    gen = torch.Generator().manual_seed(seed)
    rank_load = (65536 * 8 / torch.arange(1, E + 1, dtype=torch.float64)).long()
    rows = []
    for layer in range(config.num_hidden_layers):
        load = rank_load[torch.randperm(E, generator=gen)]
        err = load.double() * (0.5 + torch.rand(E, generator=gen, dtype=torch.float64))
        rows.append(LayerProfile(layer, load, load.double(), err, err, {"int8": 0.05 * err, "nf4": err}, {}))
    model = {"path": str(src), "model_type": "qwen3_moe", "family": "qwen3_moe", "num_experts": E,
             "config_sha256": config_fingerprint(AutoConfig.from_pretrained(src))}
    Profile(model, {"dataset": "synthetic"}, ["int8", "nf4"], rows).save(path)


# ----------------------------------------------------------------------------------- measuring
def run_child(mode: str, src: Path, profile: Path, out: Path, shard_bytes: int, threads: int,
              baseline: str | None = None) -> dict:
    """Run one job in a fresh interpreter; ``{seconds, peak_rss_mb}``.

    Peak RSS is the child's VmHWM (high-water mark of its own address space since exec), checked
    against its ``ru_maxrss`` from os.wait4. Linux carries the parent's RSS at fork into a child's
    ru_maxrss across exec (and RUSAGE_CHILDREN is the maximum over all children so far), so for a
    small child of this large parent ru_maxrss alone would report this process's size.
    """
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONSAFEPATH": "1"}
    want = Path(__file__).resolve().parents[1] / "rq_tool"  # this tree's, unless the baseline's
    if mode.endswith("@baseline"):
        mode, want = mode.split("@")[0], Path(baseline) / "rq_tool"
    with tempfile.TemporaryDirectory(prefix="rq-bench-path-") as scratch:
        # only that tree's rq_tool (its kernels/ as rq_tool.kernels too) on the path, ahead of an
        # installed one: see the module docstring
        path_dir = str(prepare(want.parent, Path(scratch)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path_dir, env.get("PYTHONPATH")) if p)
        p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(src), str(profile), str(out), str(shard_bytes)],
                             stdout=subprocess.PIPE, text=True, env=env, cwd=path_dir)
        stdout = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise SystemExit(f"{mode} child failed with exit code {p.returncode}")
        res = json.loads(stdout.strip().splitlines()[-1])
        got = res.pop("rq_tool")  # resolved while the symlink exists
        if got is not None and Path(got).resolve().parent != want.resolve():
            raise SystemExit(f"{mode} child imported rq_tool from {got}, expected {want}")
    res["peak_rss_mb"] = res.pop("vmhwm_kib") / 1024
    res["peak_anon_mb"] = res.pop("anon_kib") / 1024  # sampled every 10 ms
    res["peak_file_mb"] = res.pop("file_kib") / 1024
    res["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux; >= peak_rss_mb (see above)
    return res


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def bench_size(args, layers: int, root: Path, source: str) -> list[dict]:
    config = qwen3_moe_config(args, layers)
    src, profile = root / "src", root / "profile.json"
    t0 = time.perf_counter()
    weight_bytes = build_checkpoint(src, config, args.source_shard_mb * MB, source=source)
    synthetic_profile(profile, src, config)
    build_s = time.perf_counter() - t0
    n_shards = len(list(src.glob("*.safetensors")))
    modes = ["import", "copy", *args.strategies]
    if args.baseline:  # the baseline tree must read every --source asked for
        modes += [f"{m}@baseline" for m in args.strategies]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            out = root / f"out-{mode}"
            os.sync()  # start each run with no dirty pages of the previous one to write back
            res = run_child(mode, src, profile, out, args.out_shard_mb * MB, args.threads, args.baseline)
            if mode != "import":
                res["gb_per_s"] = weight_bytes / 1e9 / res["seconds"]
                res["stream_gb_per_s"] = weight_bytes / 1e9 / res["stream_s"]
                res["out_gb"] = dir_bytes(out) / 1e9
            runs[mode].append(res)
            shutil.rmtree(out, ignore_errors=True)
    rows = []
    for mode, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        row = {"layers": layers, "source": source, "source_gb": weight_bytes / 1e9, "source_shards": n_shards,
               "mode": mode, "build_s": build_s, "runs": rs, **med}
        rows.append(row)
    copy = next(r for r in rows if r["mode"] == "copy")
    for r in rows:
        # each ratio per repetition against the copy of the same repetition, then median and spread;
        # the copy has no start-up: its stream throughput is its throughput
        for name, speed in (("ratio_vs_copy", "gb_per_s"), ("stream_ratio_vs_copy", "stream_gb_per_s")):
            if speed in r:
                ratios = [x[speed] / c["gb_per_s"] for x, c in zip(r["runs"], copy["runs"])]
                r[name] = statistics.median(ratios)
                r[name + "_spread"] = (min(ratios), max(ratios))
        if "startup_s" in r:
            r["startup_spread"] = (min(x["startup_s"] for x in r["runs"]), max(x["startup_s"] for x in r["runs"]))
    return rows


def _ratio(r: dict, name: str) -> str:
    """``0.55x (0.50-0.60)``: median and min-max over the repetitions, or blanks."""
    if name not in r:
        return f"{'':>17}"
    lo, hi = r[name + "_spread"]
    return f"{r[name]:>5.2f}x ({lo:.2f}-{hi:.2f})"


def table(rows: list[dict]) -> str:
    head = (f"{'layers':>6} {'source':>13} {'mode':<24} {'seconds':>8} {'start-up':>15} {'stream':>7} "
            f"{'GB/s':>6} {'vs copy':>17} {'stream vs copy':>17} {'out':>8} {'peak RSS':>9} {'anon':>6} {'file':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r['gb_per_s']:>6.2f}" if "gb_per_s" in r else f"{'':>6}"
        out = f"{r['out_gb']:>6.2f}GB" if "out_gb" in r else f"{'':>8}"
        src = f"{r['source_gb']:.2f}GB {r['source']}"
        if r["mode"] in ("copy", "import"):
            startup, stream = f"{'':>15}", f"{'':>7}"
        else:
            lo, hi = r["startup_spread"]
            startup, stream = f"{r['startup_s']:>5.2f} ({lo:.2f}-{hi:.2f})", f"{r['stream_s']:>7.2f}"
        lines.append(f"{r['layers']:>6} {src:>13} {r['mode']:<24} {r['seconds']:>8.2f} {startup:>15} {stream} {speed} "
                     f"{_ratio(r, 'ratio_vs_copy')} {_ratio(r, 'stream_ratio_vs_copy')} "
                     f"{out} {r['peak_rss_mb']:>6.0f} MB {r['peak_anon_mb']:>6.0f} {r['peak_file_mb']:>6.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,14", help="MoE layers of each size (same layer size): ~1 GB and ~3 GB")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64, help="experts per layer (64 x 3 MB = 201 MB per layer)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--strategies", default="replicate-only,greedy")
    ap.add_argument("--source-shard-mb", type=int, default=500)
    ap.add_argument("--out-shard-mb", type=int, default=None,
                    help="rewrite's output shard size (default: rq's default, defaults.SHARD_BYTES)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each child (OMP_NUM_THREADS). 1 by default: on small shared VMs, "
                         "parallel first-touch page faults make multi-threaded copies up to 10x slower")
    ap.add_argument("--source", default="bf16", help="source formats, comma-separated: bf16, fp8 (block-FP8)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every job (interleaved); medians are shown")
    ap.add_argument("--baseline", default=None,
                    help="another rq source tree (e.g. main) to run the strategies with too, as MODE@baseline")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    from rq_tool import defaults

    args.strategies = [s for s in args.strategies.split(",") if s]
    if args.out_shard_mb is None:
        args.out_shard_mb = defaults.SHARD_BYTES // MB
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    rows = []
    for source in args.source.split(","):
        for layers in (int(x) for x in args.layers.split(",")):
            root = Path(tempfile.mkdtemp(prefix="rq-bench-rewrite-", dir=args.workdir))
            try:
                rows += bench_size(args, layers, root, source)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            if not args.json:
                print(f"source={source} layers={layers} done", file=sys.stderr)
    if args.json:
        print(json.dumps({"out_shard_mb": args.out_shard_mb, "threads": args.threads, "cpus": os.cpu_count(),
                          "repeat": args.repeat, "rows": rows}))
    else:
        print(table(rows))
        print(f"output shards: {args.out_shard_mb} MB; {args.threads} thread(s), {os.cpu_count()} CPUs; "
              "seconds = start-up + stream, medians (start-up: min-max beside it); stream includes the metadata, "
              "manifest and os.sync(); vs copy = throughput incl. start-up / copy's, stream vs copy = excl. "
              "start-up, both median (min-max) of per-repetition ratios; peak RSS = the child's VmHWM; anon / file = sampled peaks (MB) of "
              "anonymous memory and of file pages (the mmapped source shards being read)")


if __name__ == "__main__":
    main()

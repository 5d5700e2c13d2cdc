"""Property-based fuzzing of every file and option rq reads (hypothesis, in-process, reproducible).

Valid profiles, routing maps, rewritten and source configs, shard indexes, manifests,
safetensors headers and option values are mutated -- a field replaced by NaN / Infinity / a huge
or negative number / a wrong type, a key deleted, a value nested thousands deep, bytes truncated
or made non-UTF-8 -- and fed to the real commands (click's CliRunner, or the library call the
loader makes). Every case must end in success or exit code 2 with one ``error:`` line (never a
traceback, never another exception), within a time bound, without changing any input file and
without leaving a temporary behind. ``derandomize=True``: the same cases in every run.

Counts: ``CASES`` per target, at least 2,000 together (checked by ``test_total_cases``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rq_tool
from rq_tool import defaults
from rq_tool.cli import main
from rq_tool.errors import RQError
from rq_tool.rewrite.shards import write_manifest

N_TEXTS = 40
CASES = {"profile-export": 350, "profile-rewrite": 120, "rq-config-verify": 350, "rq-config-load": 40,
         "source-config": 120, "index": 200, "manifest": 200, "header": 200, "options": 450}
RAN: dict[str, int] = {}
CASE_SECONDS = 30  # a case running longer is a hang
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

_WEIRD = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 1e-320, 10**30, -(10**30), 2**63, 2**64,
          -1, 0, 1, -0.5, 0.5, 3.7, True, False, None, "", "x", "int3", "../../etc/passwd", "/etc/passwd",
          [], {}, [[]], [None], {"a": 1}, [1e308, -1], "\u00ff\u0000"]
DEEP = "@@DEEP@@"  # replaced in the text by a value nested thousands of levels deep

weird_values = st.one_of(st.sampled_from(_WEIRD), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                         st.just(DEEP))


# ------------------------------------------------------------------------------ mutations
def json_paths(doc, limit: int = 4000) -> list[tuple]:
    """Every path (keys / indices) into a JSON document, breadth first, at most ``limit``."""
    out, queue = [()], [((), doc)]
    while queue and len(out) < limit:
        path, node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append(path + (k,))
            queue.append((path + (k,), v))
    return out


def mutate(doc, data) -> str:
    """One to three structural mutations of ``doc`` (a deep copy), serialised (NaN allowed), then
    maybe a byte-level one: the text of a malformed file."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = json_paths(doc)
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "wrap", "add-key"]), label="op")
        if not path:
            doc = data.draw(weird_values, label="root") if op == "replace" else [doc]
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "add-key" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["extra", "format", "version", "layers", ""]), label="k")] = \
                data.draw(weird_values, label="v")
        else:
            parent[key] = data.draw(weird_values, label="value")
    text = json.dumps(doc, allow_nan=True).replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000)
    byte_op = data.draw(st.sampled_from(["none"] * 6 + ["truncate", "non-utf8", "bom"]), label="bytes")
    if byte_op == "truncate":
        return text[: data.draw(st.integers(0, max(0, len(text) - 1)), label="cut")]
    if byte_op == "non-utf8":
        at = data.draw(st.integers(0, len(text)), label="at")
        return text[:at] + "\udcff" + text[at:]  # written with surrogateescape: a lone 0xFF byte
    if byte_op == "bom":
        return "\ufeff" + text
    return text


def write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------- the checks
def digest(paths) -> dict[str, str]:
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def bounded(seconds: int = CASE_SECONDS):
    def hang(signum, frame):
        raise AssertionError(f"a fuzz case ran longer than {seconds} s (hang)")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_cli(argv, inputs, work: Path) -> int:
    """Run ``rq argv`` in-process: exit 0, or exit 2 with exactly one ``error:`` line; inputs unchanged;
    no temporaries left."""
    before = digest(inputs)
    with bounded():
        r = CliRunner().invoke(main, [str(a) for a in argv])
    assert r.exit_code in (0, 2), (argv, r.exit_code, r.output[-2000:], r.exc_info)
    assert r.exception is None or isinstance(r.exception, SystemExit), (argv, r.exc_info)
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        lines = [ln.split("\r")[-1].strip() for ln in r.stderr.split("\n") if ln.split("\r")[-1].strip()]
        if argv[0] == "verify":  # verify lists each problem as "FAIL ...", then its one error line
            lines = [ln for ln in lines if not ln.startswith("FAIL ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr[-2000:])
        assert len(lines[0]) < 2000, lines[0][:300]
    assert digest(inputs) == before, f"an input changed: {argv}"
    assert not list(work.rglob(".*rq-tmp*")), "a temporary was left behind"
    return r.exit_code


def check_call(fn, inputs, work: Path) -> None:
    """The library call behind a command: returns or raises RQError (one line), nothing else."""
    before = digest(inputs)
    with bounded():
        try:
            fn()
        except RQError as e:
            assert "\n" not in str(e) and len(str(e)) < 2000
    assert digest(inputs) == before
    assert not list(work.rglob(".*rq-tmp*"))


def count(name: str) -> None:
    RAN[name] = RAN.get(name, 0) + 1


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(rewritten_tiny):
    return rewritten_tiny


@pytest.fixture(scope="module")
def work(base, tmp_path_factory):
    """A scratch directory with copies of the inputs; each case rewrites the one file it mutates."""
    w = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(base / "src", w / "src")
    shutil.copytree(base / "out", w / "out")
    shutil.copy(base / "p.json", w / "p.json")
    return w


def _json(path: Path):
    return json.loads(path.read_text())


def _restore(base: Path, work: Path, name: str) -> None:
    shutil.copy(base / name, work / name)


# ----------------------------------------------------------------------------------- cases
@settings(FUZZ, max_examples=CASES["profile-export"])
@given(data=st.data())
def test_fuzz_profile_export(base, work, data):
    prof = work / "bad_profile.json"
    write(prof, mutate(_json(base / "p.json"), data))
    out = work / "exported.json"
    engine = data.draw(st.sampled_from(["sglang", "vllm"]), label="engine")
    extra = data.draw(st.sampled_from([[], ["--logical-count"], ["--redundant", "8"]]), label="extra")
    check_cli(["export", prof, "--engine", engine, "--ep-size", 4, "--out", out, *extra], [prof, work / "src"], work)
    out.unlink(missing_ok=True)
    count("profile-export")


@settings(FUZZ, max_examples=CASES["profile-rewrite"])
@given(data=st.data())
def test_fuzz_profile_rewrite_plan(base, work, data):
    prof = work / "bad_profile.json"
    write(prof, mutate(_json(base / "p.json"), data))
    importance = data.draw(st.sampled_from(["quant_error", "frequency"]), label="importance")
    check_cli(["rewrite", work / "src", "-p", prof, "--dry-run", "--json", "--importance", importance],
              [prof, work / "src"], work)
    count("profile-rewrite")


def _mutated_rq_dir(base, work, data, which: str) -> Path:
    """The rewritten dir with config.json (and routing_map.json alike) mutated, manifest regenerated:
    the hashes pass, the semantic checks must catch what is wrong."""
    out = work / "out"
    cfg = _json(base / "out" / "config.json")
    if which == "routing_map":
        text = mutate(cfg["rq"]["routing_map"], data)
        try:
            cfg["rq"]["routing_map"] = json.loads(text)
            text = json.dumps(cfg, allow_nan=True)
        except (ValueError, RecursionError):
            text = text  # the malformed text itself, as config.json
        write(out / defaults.ROUTING_MAP_FILE, text)
    else:
        text = mutate(cfg, data)
    write(out / "config.json", text)
    write_manifest(out)
    return out


@settings(FUZZ, max_examples=CASES["rq-config-verify"])
@given(data=st.data())
def test_fuzz_rq_config_and_routing_map_verify(base, work, data):
    which = data.draw(st.sampled_from(["config", "routing_map"]), label="which")
    out = _mutated_rq_dir(base, work, data, which)
    inputs = [out]
    check_cli(["verify", out], inputs, work)
    from rq_tool.runtime import integrity
    from rq_tool.runtime.model_dir import read_rq_model

    check_call(lambda: integrity.problems(out, read_rq_model(out)), inputs, work)
    check_cli(["export", out, "--engine", "sglang", "--ep-size", 4, "--out", work / "exported.json"], inputs, work)
    (work / "exported.json").unlink(missing_ok=True)
    count("rq-config-verify")


@settings(FUZZ, max_examples=CASES["rq-config-load"])
@given(data=st.data())
def test_fuzz_rq_config_load(base, work, data):
    which = data.draw(st.sampled_from(["config", "routing_map"]), label="which")
    out = _mutated_rq_dir(base, work, data, which)
    check_call(lambda: rq_tool.load(out), [out], work)
    count("rq-config-load")


@settings(FUZZ, max_examples=CASES["source-config"])
@given(data=st.data())
def test_fuzz_source_config(base, work, data):
    src = work / "src"
    write(src / "config.json", mutate(_json(base / "src" / "config.json"), data))
    check_cli(["rewrite", src, "-p", base / "p.json", "--dry-run", "--json"], [src], work)
    _restore(base, work, "src/config.json")
    count("source-config")


@settings(FUZZ, max_examples=CASES["index"])
@given(data=st.data())
def test_fuzz_shard_index(base, work, data):
    from rq_tool.checkpoint import SafetensorsCheckpoint

    out = work / "out"
    keys = list(_json(base / "out" / "model.safetensors.index.json")["weight_map"])[:6]
    index = {"metadata": {"total_size": 1}, "weight_map": {k: "model.safetensors" for k in keys}}
    write(out / "model.safetensors.index.json", mutate(index, data))
    write_manifest(out)
    check_call(lambda: SafetensorsCheckpoint(out), [out], work)
    check_cli(["verify", out], [out], work)
    count("index")


@settings(FUZZ, max_examples=CASES["manifest"])
@given(data=st.data())
def test_fuzz_manifest(base, work, data):
    out = work / "out"
    for name in ("config.json", defaults.ROUTING_MAP_FILE, "model.safetensors.index.json"):
        _restore(base, work, f"out/{name}")
    write(out / defaults.MANIFEST_FILE, mutate(_json(base / "out" / defaults.MANIFEST_FILE), data))
    code = check_cli(["verify", out], [out], work)
    if code == 0:  # a mutation the manifest check may accept must leave a genuinely valid model
        assert rq_tool.verify(out) == []
    count("manifest")


@settings(FUZZ, max_examples=CASES["header"])
@given(data=st.data())
def test_fuzz_safetensors_header(base, work, data):
    from rq_tool.checkpoint import read_header

    shard = base / "out" / "model.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    small = dict(list(header.items())[:8])  # a few entries keep the path list short
    text = mutate(small, data).encode("utf-8", "surrogateescape")
    length = data.draw(st.sampled_from([len(text), len(text) + 1, 0, 2**63, len(text) - 1]), label="length")
    blob = length.to_bytes(8, "little", signed=False) + text + raw[8 + n:]
    bad = work / "bad.safetensors"
    bad.write_bytes(blob)
    check_call(lambda: read_header(bad), [bad], work)
    count("header")


_OPTIONS = {
    "--budget": st.one_of(st.sampled_from(["1e-99999999", "1e309", "1e30B", "1e30", "-1", "0", "0x", "nan", "inf",
                                            "1.1x", "0.9", "120MB", "1.5GiB", "10", "10.0001", "1e-6", "4096B",
                                            "1e18TiB", "", " ", "1e+30", "9" * 400]),
                          st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True).map(repr)),
    "--ep-devices": st.one_of(st.sampled_from(["1e30", "0", "-1", "1", "2", "4096", "4097", "99999999999999999999",
                                                "nan", "2.5", ""]), st.integers(-5, 10**6).map(str)),
    "--max-error": st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-3", "1e309", "1e6", ""]),
                             st.floats(allow_nan=True, allow_infinity=True).map(repr)),
    "--schemes": st.one_of(st.sampled_from(["", ",", "int8", "nf4", "int8,nf4", "int8,int8", "int3", "bf16,fp16",
                                             " , ", "fp32"]), st.text(max_size=8)),
    "--strategy": st.sampled_from(["greedy", "paper", "replicate-only", "bogus", ""]),
}


@settings(FUZZ, max_examples=CASES["options"])
@given(data=st.data())
def test_fuzz_rewrite_options(base, work, data):
    names = data.draw(st.lists(st.sampled_from(sorted(_OPTIONS)), min_size=1, max_size=3, unique=True), label="opts")
    argv = ["rewrite", work / "src", "-p", work / "p.json", "--dry-run", "--json"]
    for name in names:
        argv += [name, data.draw(_OPTIONS[name], label=name)]
    if data.draw(st.booleans(), label="global"):
        argv.append("--global")
    check_cli(argv, [work / "src", work / "p.json"], work)
    count("options")


def test_total_cases(request):
    """At least 2,000 mutated inputs ran (when the whole module ran)."""
    fuzz = [i for i in request.session.items if i.module is request.module and i.name.startswith("test_fuzz")]
    if len(fuzz) != len(CASES):
        pytest.skip("only part of the fuzz suite was selected")
    assert sum(CASES.values()) >= 2000
    assert sum(RAN.values()) >= 2000, RAN

"""Bad input through the CLI: a non-zero exit, one `error:` line naming what and where, no traceback
(unless --debug) and nothing half-written beside the requested output.

One tiny Qwen3-MoE model, its profile and one rewritten output are built once for the module;
each case copies what it breaks into its own tmp_path.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import rq_tool
from rq_tool.cli import main
from rq_tool.errors import RQError
from rq_tool.rewrite.shards import write_manifest
from tiny_models import save_tiny, tiny_model

CAL = ("--num-samples", "4", "--seq-len", "32")
N_TEXTS = 40  # calibration texts of the shared rewritten_tiny fixture


@pytest.fixture(scope="module")
def base(rewritten_tiny):
    root = rewritten_tiny
    # the same model saved in two shards (same seed and config, so p.json belongs to it too)
    tiny_model("qwen3_moe").save_pretrained(root / "sharded", max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "src" / name, root / "sharded" / name)
    assert len(list((root / "sharded").glob("*.safetensors"))) == 2
    return root


def stderr_lines(text: str) -> list[str]:
    """Lines a terminal would show: tqdm's '\\r'-erased progress bars dropped."""
    return [ln.split("\r")[-1].strip() for ln in text.split("\n") if ln.split("\r")[-1].strip()]


def copy_src(base, tmp_path, edit=None):
    d = tmp_path / "model"
    shutil.copytree(base / "src", d)
    if edit:
        edit(d)
    return d


def set_model_type(model_type):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = model_type
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def garbage_weights(d):
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 40)


def truncate_weights(keep):
    def edit(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:keep(len(data))])
    return edit


def dense(model_type):
    def make(base, tmp_path):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=32, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
        return tmp_path / "model"
    return make


def missing_shard(base, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(base / "sharded", d)
    (d / "model-00002-of-00002.safetensors").unlink()
    return d


def profile_edit(edit):
    def make(base, tmp_path):
        d = json.loads((base / "p.json").read_text())
        edit(d)
        (tmp_path / "bad_profile.json").write_text(json.dumps(d))
        return tmp_path / "bad_profile.json"
    return make


def short_load(d):
    d["layers"][0]["load"] = d["layers"][0]["load"][:-1]


def extra_expert(d):
    d["model"]["num_experts"] += 1
    for row in d["layers"]:
        for k in ("load", "gate_mass", "output_energy", "output_power"):
            row[k] = row[k] + [0]
        for s in row["quant_error"]:
            row["quant_error"][s] = row["quant_error"][s] + [0.0]


def other_model_profile(base, tmp_path):
    """A real profile of another model: same family, one more layer."""
    other = save_tiny("qwen3_moe", tmp_path / "other", num_hidden_layers=3)
    profile = rq_tool.calibrate(other, str(base / "t.jsonl"), num_samples=2, seq_len=32, progress=False)
    profile.save(tmp_path / "po.json")
    return tmp_path / "po.json"


def data_file(name, content: bytes):
    def make(base, tmp_path):
        (tmp_path / name).write_bytes(content)
        return tmp_path / name
    return make


# Each case: (id, command, model maker (None = the good source), extra maker, argv builder, needles).
# ``o`` is an empty directory the command's output goes into; after the failure it must still be empty.
def _calibrate(model, o, extra=None, *more):
    return ["calibrate", model, "-d", extra, *CAL, "-o", o / "p.json", *more]


CASES = [
    # --- the model path
    ("missing-path", lambda b, t: t / "nope", None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["nope", "does not exist"]),
    ("missing-path-rewrite", lambda b, t: t / "nope", None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["nope", "does not exist"]),
    ("a-file-not-a-dir", lambda b, t: b / "t.jsonl", None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["t.jsonl", "not a model directory"]),
    ("no-config-json", lambda b, t: t, None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["no config.json"]),
    ("dense-llama", dense("llama"), None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["'llama'", "dense"]),
    ("dense-qwen2", dense("qwen2"), None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["'qwen2'", "dense"]),
    ("unsupported-jetmoe", lambda b, t: copy_src(b, t, set_model_type("jetmoe")), None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["'jetmoe'", "MoE model rq cannot rewrite"]),
    ("made-up-model-type", lambda b, t: copy_src(b, t, set_model_type("zorg_moe")), None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["'zorg_moe'", "not support"]),
    ("only-pickle-weights", lambda b, t: copy_src(b, t, lambda d: (d / "model.safetensors").rename(
        d / "pytorch_model.bin")), None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["safetensors", "never pickle"]),
    # --- the weights
    ("garbage-safetensors", lambda b, t: copy_src(b, t, garbage_weights), None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["model", "cannot load"]),
    ("garbage-safetensors-rewrite", lambda b, t: copy_src(b, t, garbage_weights), None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["model.safetensors", "corrupt"]),
    ("truncated-safetensors", lambda b, t: copy_src(b, t, truncate_weights(lambda n: n // 2)), None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["model", "cannot load"]),
    ("truncated-safetensors-rewrite", lambda b, t: copy_src(b, t, truncate_weights(lambda n: n // 2)), None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["model.safetensors", "truncated"]),
    ("truncated-in-header-rewrite", lambda b, t: copy_src(b, t, truncate_weights(lambda n: 100)), None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["model.safetensors", "truncated"]),
    ("shard-missing", missing_shard, None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl"), ["model-00002-of-00002.safetensors"]),
    ("shard-missing-rewrite", missing_shard, None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"],
     ["model-00002-of-00002.safetensors", "listed in model.safetensors.index.json but missing"]),
    # --- the profile
    ("profile-of-another-model", None, other_model_profile,
     lambda m, o, x, b: ["rewrite", m, "-p", x, "-o", o / "out"], ["another model", "config hash"]),
    ("profile-wrong-shape", None, profile_edit(short_load),
     lambda m, o, x, b: ["rewrite", m, "-p", x, "-o", o / "out"], ["bad_profile.json", "layers[0].load", "7 entries, expected 8"]),
    ("profile-wrong-expert-count", None, profile_edit(extra_expert),
     lambda m, o, x, b: ["rewrite", m, "-p", x, "-o", o / "out"], ["9 experts", "the model 8"]),
    ("profile-not-json", None, data_file("p.json", b"{oops"),
     lambda m, o, x, b: ["rewrite", m, "-p", x, "-o", o / "out"], ["p.json", "not valid JSON"]),
    ("profile-missing", None, None,
     lambda m, o, x, b: ["rewrite", m, "-p", o.parent / "nope.json", "-o", o / "out"], ["nope.json", "not found"]),
    # --- the plan
    ("budget-infeasible", None, None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out", "--budget", "0.1"],
     ["layer 0", "budget", "bytes"]),
    ("budget-unparsable", None, None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out", "--budget", "banana"],
     ["'banana'"]),
    # --- calibration data
    ("data-empty", None, data_file("empty.jsonl", b""),
     lambda m, o, x, b: _calibrate(m, o, x), ["empty.jsonl", "no non-empty texts"]),
    ("data-not-json", None, data_file("bad.jsonl", b'{"text": "a b c"}\nnot json\n'),
     lambda m, o, x, b: _calibrate(m, o, x), ["bad.jsonl:2", "not valid JSON"]),
    ("data-no-text-field", None, data_file("nt.jsonl", b'{"title": "a b c"}\n'),
     lambda m, o, x, b: _calibrate(m, o, x), ["nt.jsonl:1", "no text field"]),
    ("data-not-utf8", None, data_file("bin.jsonl", b'{"text": "ok"}\n\xff\xfe\x00garbage\n'),
     lambda m, o, x, b: _calibrate(m, o, x), ["bin.jsonl:2", "not UTF-8"]),
    ("data-too-short", None, data_file("short.jsonl", b'{"text": "a b"}\n'),
     lambda m, o, x, b: _calibrate(m, o, x), ["short.jsonl", "fewer than one sequence"]),
    ("data-missing-file", None, None,
     lambda m, o, x, b: _calibrate(m, o, o.parent / "nope.jsonl"), ["nope.jsonl", "not found"]),
    ("seq-len-beyond-positions", None, None,
     lambda m, o, x, b: _calibrate(m, o, b / "t.jsonl", "--seq-len", "4096"), ["4096", "max_position_embeddings 128"]),
    # --- the output
    ("output-under-a-file", None, data_file("afile", b"x"),
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", x / "out"], ["afile"]),
    ("rewrite-an-rq-output", lambda b, t: b / "out", None,
     lambda m, o, x, b: ["rewrite", m, "-p", b / "p.json", "-o", o / "out"], ["already an rq-rewritten model"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_written(base, tmp_path, case):
    _, make_model, make_extra, argv, needles = case
    model = make_model(base, tmp_path) if make_model else base / "src"
    extra = make_extra(base, tmp_path) if make_extra else None
    o = tmp_path / "o"
    o.mkdir()
    r = CliRunner().invoke(main, [str(a) for a in argv(model, o, extra, base)])
    assert isinstance(r.exception, SystemExit) and r.exit_code == 2, (r.exception, r.output)
    lines = stderr_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert list(o.iterdir()) == [], "something was written beside the output"
    assert not list(tmp_path.glob("**/.*rq-tmp*")), "a temporary directory was left behind"


def test_output_already_there_is_left_untouched(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):  # not an rq output: refused with --force too (issue 11)
        r = CliRunner().invoke(main, ["rewrite", str(base / "src"), "-p", str(base / "p.json"), "-o", str(out), *force])
        assert r.exit_code == 2
        assert stderr_lines(r.stderr) == [f"error: output {out} already exists and is not an rq rewritten model "
                                          "directory; rq only ever replaces what it wrote itself, even with --force "
                                          "(choose another output path)"]
        assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_calibrate_output_in_missing_directory(base, tmp_path):
    r = CliRunner().invoke(main, _calibrate(str(base / "src"), tmp_path / "no" / "dir", str(base / "t.jsonl")))
    assert isinstance(r.exception, SystemExit) and r.exit_code == 2
    assert len(stderr_lines(r.stderr)) == 1


def test_debug_shows_the_traceback(base, tmp_path):
    r = CliRunner().invoke(main, ["--debug", "rewrite", str(tmp_path / "nope"), "-p", str(base / "p.json"),
                                  "-o", str(tmp_path / "out")])
    assert isinstance(r.exception, RQError) and "does not exist" in str(r.exception)


def test_sharded_source_is_fine(base, tmp_path):
    """The control for ``shard-missing``: the intact two-shard checkpoint rewrites and verifies."""
    r = CliRunner().invoke(main, ["rewrite", str(base / "sharded"), "-p", str(base / "p.json"), "-o",
                                  str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    assert rq_tool.verify(tmp_path / "out") == []


# ------------------------------------------------------------- inconsistent routing maps at load time
def _phy2log_out_of_range(lm, E):
    lm["phy2log"][-1] = E + 3


def _logcnt_disagrees(lm, E):
    lm["logcnt"][0] += 1


def _log2phy_out_of_range(lm, E):
    lm["log2phy"][0][0] = len(lm["phy2log"]) + 5


def _unknown_slot_scheme(lm, E):
    lm["slot_scheme"][0] = "int3"


def _expert_without_slot(lm, E):
    lm["logcnt"][1] = 0


MAP_EDITS = [("phy2log-out-of-range", _phy2log_out_of_range, "phy2log has ids out of range"),
             ("logcnt-disagrees", _logcnt_disagrees, "logcnt disagrees with phy2log"),
             ("log2phy-out-of-range", _log2phy_out_of_range, "log2phy has slot ids out of range"),
             ("unknown-scheme", _unknown_slot_scheme, "unknown scheme 'int3'"),
             ("expert-without-slot", _expert_without_slot, "at least one slot")]


@pytest.mark.parametrize("edit,needle", [m[1:] for m in MAP_EDITS], ids=[m[0] for m in MAP_EDITS])
def test_inconsistent_routing_map_is_refused(base, tmp_path, edit, needle):
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    cfg = json.loads((out / "config.json").read_text())
    rmap = cfg["rq"]["routing_map"]
    edit(rmap["layers"][0], rmap["num_logical_experts"])
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "routing_map.json").write_text(json.dumps(rmap, indent=1))
    write_manifest(out)  # hashes match again: the routing-map check itself has to catch it
    with pytest.raises(RQError, match=needle):
        rq_tool.load(out)
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output


def test_unknown_split_policy_is_refused(base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rq"]["routing_map"]["split_policy"] = "random"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_manifest(out)
    with pytest.raises(RQError, match="unknown split policy 'random'"):
        rq_tool.load(out)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 2

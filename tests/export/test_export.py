"""rq export: engine placement files (shape, divisibility, coverage, dense layers), the same numbers as the
simulator, EPLB's published example, per-layer precision, and one-line errors. Hand-made profiles, no model."""

import itertools
import json
import re

import pytest
import torch
from click.testing import CliRunner

from rq_tool import defaults
from rq_tool.calibrate.profile import LayerProfile, Profile, config_fingerprint
from rq_tool.errors import RQError
from rq_tool.eval.ep import eplb_max_mean
from rq_tool.export import (ENGINE_WEIGHT_SCHEMES, ServingNames, balanced_phy2log, check_redundant,
                            choose_layer_precision, compressed_tensors_config, expert_target, get_engine, gpu_max_mean,
                            ignore_patterns, plan_placement, precision_summary, read_source, recommend_redundant,
                            valid_redundant)
from rq_tool.export.cli import export
from rq_tool.plan.eplb import rebalance_experts
from rq_tool.plan.placement import device_loads, max_mean

# DeepSeek EPLB's README example (github deepseek-ai/EPLB)
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def make_profile(loads, layers, num_hidden_layers, model_path="/nonexistent", config_sha256=None) -> Profile:
    loads = torch.as_tensor(loads, dtype=torch.int64)
    rows = []
    for layer, load in zip(layers, loads):
        f = load.double()
        rows.append(LayerProfile(layer, load, f / f.sum().clamp_min(1), f, 4 * f,
                                 {"int8": 0.01 * f, "nf4": 0.1 * f}, {}))
    E = loads.shape[-1]
    model = {"path": model_path, "model_type": "qwen3_moe", "num_experts": E, "top_k": 2,
             "num_hidden_layers": num_hidden_layers, "config_sha256": config_sha256}
    return Profile(model, {}, ["int8", "nf4"], rows)


def slots_per_gpu_loads(load, row, ep_size):
    """Round trip: an exported physical_to_logical_map row -> per-GPU loads (device_loads)."""
    row = torch.as_tensor(row)
    logcnt = torch.bincount(row, minlength=load.numel()).double()
    slot_load = load.double()[row] / logcnt[row]
    return device_loads(slot_load, torch.arange(row.numel()) // (row.numel() // ep_size), ep_size)


@pytest.fixture
def profile_path(tmp_path):
    # MoE layers 1 and 3 of 4 decoder layers: 0 and 2 are dense
    path = tmp_path / "profile.json"
    make_profile(README_WEIGHT, [1, 3], 4).save(path)
    return path


def run(*args):
    from rq_tool.cli import main

    if "export" not in main.commands:  # the lead registers it in rq_tool/cli.py with this same line
        main.add_command(export)
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- placement math
def test_sglang_map_shape_divisibility_coverage_dense_layers(profile_path, tmp_path):
    out = tmp_path / "loc.json"
    r = run("export", profile_path, "--engine", "sglang", "--ep-size", 4, "--redundant", 4, "--out", out)
    assert r.exit_code == 0, r.output
    m = torch.tensor(json.loads(out.read_text())["physical_to_logical_map"])
    E, R, N = 12, 4, 4
    assert m.shape == (4, E + R) and (E + R) % N == 0
    for layer in range(4):  # every logical expert on some GPU, in every layer
        assert set(m[layer].tolist()) == set(range(E))
    assert torch.equal(m[0], torch.arange(E + R) % E) and torch.equal(m[2], m[0])  # dense: engine default
    assert "--ep-num-redundant-experts 4" in r.output and f"--init-expert-location {out}" in r.output
    assert "before" in r.output and "after" in r.output


def test_round_trip_matches_simulator():
    load = README_WEIGHT.double()
    for N, R in ((4, 0), (4, 4), (8, 4), (3, 3)):
        plan = plan_placement(load, [0, 1], 2, N, R)
        P = 12 + R
        # rq's placement is EPLB's global policy: the same code path, slot for slot
        assert torch.equal(plan.phy2log, rebalance_experts(load, P, 1, 1, N)[0])
        for i in range(2):
            got = max_mean(slots_per_gpu_loads(load[i], plan.phy2log[i], N))
            assert got == pytest.approx(float(plan.rq[i]), abs=1e-12)
            assert got == pytest.approx(eplb_max_mean(load[i], P, N)["max_mean"], abs=1e-12)
            per_gpu = torch.bincount(torch.arange(P) // (P // N), minlength=N)
            assert (per_gpu == P // N).all()


def test_no_worse_than_eplb_on_its_readme_example():
    weight = README_WEIGHT.double()
    plan = plan_placement(weight, [0, 1], 2, ep_size=8, redundant=4)  # 16 slots on 8 GPUs
    phy2log, _, _ = rebalance_experts(weight, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    eplb = gpu_max_mean(weight, phy2log, 8)
    for i in range(2):
        print(f"layer {i}: per-GPU max/mean rq export {float(plan.rq[i]):.3f}, EPLB {float(eplb[i]):.3f}")
    assert (plan.rq <= eplb + 1e-12).all()


def test_default_redundant_rule():
    load = README_WEIGHT.double()
    target = defaults.EXPORT_TARGET_MAX_MEAN
    R, score = recommend_redundant(load, 4, target)
    valid = [r for r in range(0, 13) if (12 + r) % 4 == 0]
    scores = {r: float(gpu_max_mean(load, balanced_phy2log(load, 12 + r, 4), 4).mean()) for r in valid}
    assert R == min(r for r in valid if scores[r] <= target) and score == pytest.approx(scores[R])
    assert recommend_redundant(torch.full((2, 8), 5.0), 4, target)[0] == 0  # balanced already
    assert recommend_redundant(torch.full((1, 8), 5.0), 3, target)[0] == 1  # (8 + R) % 3 == 0
    skewed = torch.tensor([[1000.0] + [1.0] * 7])
    R, score = recommend_redundant(skewed, 2, 1.0)  # unreachable: capped at E, most balanced candidate
    assert R <= 8 and score == min(float(gpu_max_mean(skewed, balanced_phy2log(skewed, 8 + r, 2), 2).mean())
                                   for r in range(0, 9, 2))
    plan = plan_placement(load, [0, 1], 2, 4)
    assert plan.recommended and (12 + plan.redundant) % 4 == 0


def test_zero_load_layer_spreads_replicas():
    m = balanced_phy2log(torch.zeros(1, 4), 8, 2)
    assert torch.bincount(m[0], minlength=4).tolist() == [2, 2, 2, 2]


def test_logical_count_variant(profile_path, tmp_path):
    out = tmp_path / "lc.json"
    r = run("export", profile_path, "--engine", "sglang", "--ep-size", 4, "--logical-count", "-o", out)
    assert r.exit_code == 0, r.output
    lc = torch.tensor(json.loads(out.read_text())["logical_count"])
    assert lc.shape == (4, 12)
    assert torch.equal(lc[1], README_WEIGHT[0]) and torch.equal(lc[3], README_WEIGHT[1])
    assert lc[0].sum() == 0 and lc[2].sum() == 0
    assert "--enable-eplb" in r.output


def test_vllm_eplb_config(profile_path, tmp_path):
    r = run("export", profile_path, "--engine", "vllm", "--ep-size", 4, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["out"] is None and rep["format"] == "rq-export"
    cfg = json.loads(re.search(r"--eplb-config '(.*)'", " ".join(rep["flags"])).group(1))
    assert cfg == {"num_redundant_experts": rep["redundant"], "window_size": defaults.VLLM_EPLB_WINDOW_SIZE,
                   "step_interval": defaults.VLLM_EPLB_STEP_INTERVAL}
    assert "--enable-eplb" in rep["flags"] and any("identity + round-robin" in n for n in rep["notes"])
    out = tmp_path / "eplb.json"
    assert run("export", profile_path, "--engine", "vllm", "--ep-size", 4, "-o", out).exit_code == 0
    assert json.loads(out.read_text()) == cfg


def test_flags_carry_the_parallel_size(profile_path, tmp_path):
    """SGLang lays the EP group out inside TP (moe_tp_size = tp_size // ep_size: --ep-size 8 needs
    --tp-size 8); vLLM's EP size is TP x DP and it refuses EPLB at TP = DP = 1."""
    rep = json.loads(run("export", profile_path, "--engine", "sglang", "--ep-size", 4, "-o", tmp_path / "x.json",
                         "--json").output)
    assert rep["flags"][:2] == ["--tp-size 4", "--ep-size 4"]
    rep = json.loads(run("export", profile_path, "--engine", "vllm", "--ep-size", 4, "--json").output)
    assert rep["flags"][:2] == ["--tensor-parallel-size 4", "--enable-expert-parallel"]
    assert any("TP x DP" in n for n in rep["notes"])
    r = run("export", profile_path, "--engine", "vllm", "--ep-size", 1)
    assert r.exit_code == 2 and "refuses --enable-eplb on one GPU" in r.output


@pytest.mark.parametrize("model_type, engine, warned", [
    ("qwen3_moe", "sglang", False), ("qwen3_moe", "vllm", False), ("mixtral", "sglang", True),
    ("olmoe", "sglang", True), ("mixtral", "vllm", False), ("qwen2_moe", "vllm", True), ("olmoe", "vllm", True),
    ("gpt_oss", "vllm", True), ("gpt_oss", "sglang", False), ("deepseek_v3", "vllm", False),
    ("some_new_moe", "sglang", True)])
def test_eplb_support_warning(tmp_path, model_type, engine, warned):
    prof = make_profile(README_WEIGHT, [1, 3], 4)
    prof.model["model_type"] = model_type
    prof.save(tmp_path / "p.json")
    r = run("export", tmp_path / "p.json", "--engine", engine, "--ep-size", 4, "-o", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("warning:")]
    assert len(lines) == int(warned), r.output
    if warned:
        assert model_type in lines[0] and engine in lines[0]
    rep = json.loads(run("export", tmp_path / "p.json", "--engine", engine, "--ep-size", 4, "-o", tmp_path / "o.json",
                         "--force", "--json").output)
    assert len(rep["warnings"]) == int(warned)


# ---------------------------------------------------------------- bad inputs
def test_bad_redundant_names_numbers_and_nearest():
    with pytest.raises(RQError, match=r"12 experts \+ 3 redundant = 15 .* 8 GPUs.*nearest valid --redundant: 4"):
        check_redundant(12, 8, 3)
    assert valid_redundant(12, 8, 3) == [4] and valid_redundant(12, 8, 9) == [12]
    assert valid_redundant(12, 8, 8) == [4, 12] and valid_redundant(6, 4, 1) == [2]
    with pytest.raises(RQError, match=">= 0"):
        check_redundant(12, 4, -4)
    with pytest.raises(RQError, match="at least 1"):
        plan_placement(README_WEIGHT, [0, 1], 2, 0)


def test_cli_errors_are_one_line(profile_path, tmp_path):
    r = run("export", profile_path, "--engine", "sglang", "--ep-size", 8, "--redundant", 3)
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
    assert "15 physical slots" in r.output and "nearest valid --redundant: 4" in r.output
    r = run("export", tmp_path / "missing.json", "--engine", "sglang", "--ep-size", 4)
    assert r.exit_code == 2 and "not found" in r.output
    r = run("export", profile_path, "--engine", "trtllm", "--ep-size", 4)
    assert r.exit_code == 2 and "trtllm" in r.output
    with pytest.raises(RQError, match="unknown engine 'trtllm'"):
        get_engine("trtllm")
    r = run("export", profile_path, "--engine", "sglang")
    assert r.exit_code == 2 and "--ep-size is required" in r.output
    r = run("export", profile_path, "--engine", "vllm", "--ep-size", 4, "--logical-count")
    assert r.exit_code == 2 and "SGLang's format" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert run("export", bad, "--engine", "sglang", "--ep-size", 4).exit_code == 2
    with pytest.raises(RQError, match="outside the model's 2 decoder layers"):
        plan_placement(README_WEIGHT, [1, 3], 2, 4, 0)


def test_rewritten_model_dir_source(tmp_path):
    from rq_tool.runtime.routing_map import LayerMap, RoutingMap

    E = 12
    prof = make_profile(README_WEIGHT, [1, 3], num_hidden_layers=99)  # config.json's count wins
    maps = [LayerMap(layer, torch.arange(E), torch.arange(E)[:, None], torch.ones(E, dtype=torch.int64), ("bf16",) * E)
            for layer in (1, 3)]
    rmap = RoutingMap(E, maps, "bf16", "silu")
    out = tmp_path / "out"
    out.mkdir()
    prof.save(out / defaults.PROFILE_FILE)
    cfg = {"model_type": "rq", "num_hidden_layers": 5,
           "rq": {"format": defaults.RQ_CONFIG_FORMAT[0], "version": defaults.RQ_CONFIG_FORMAT[1],
                  "routing_map": rmap.to_dict()}}
    (out / "config.json").write_text(json.dumps(cfg))
    src = read_source(out)
    assert src.num_hidden_layers == 5 and src.layers == (1, 3) and src.routing_map is not None
    r = run("export", out, "--engine", "sglang", "--ep-size", 4, "--redundant", 0, "-o", tmp_path / "x.json")
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "x.json").read_text())["physical_to_logical_map"]) == 5
    cfg["rq"]["routing_map"]["layers"][1]["layer"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RQError, match=r"routing map has MoE layers \[1, 2\]"):
        read_source(out)


# ---------------------------------------------------------------- per-layer precision
def _brute_force(err, nbytes, budget):
    best = None
    for combo in itertools.product(range(err.shape[1]), repeat=err.shape[0]):
        if sum(int(nbytes[s]) for s in combo) <= budget:
            e = sum(float(err[i, s]) for i, s in enumerate(combo))
            best = e if best is None or e < best else best
    return best


def test_choose_layer_precision_exact_and_greedy_quality():
    # 3 layers x 2 experts, schemes (bf16, int8, nf4): layer 1 is cheap to quantize, layer 2 expensive
    qe = torch.tensor([[[0, 1, 8], [0, 1, 8]], [[0, 0.1, 0.5], [0, 0.1, 0.5]], [[0, 5, 40], [0, 5, 40]]]).double()
    power = torch.ones(3, 2)
    nbytes = torch.tensor([100, 52, 28])
    assert choose_layer_precision(qe, power, nbytes, 300).tolist() == [0, 0, 0]
    assert choose_layer_precision(qe, power, nbytes, 252).tolist() == [0, 1, 0]
    assert choose_layer_precision(qe, power, nbytes, 228).tolist() == [0, 2, 0]
    assert choose_layer_precision(qe, power, nbytes, 180).tolist() == [1, 2, 0]
    err = qe.sum(1)
    for budget in range(84, 301, 4):
        choice = choose_layer_precision(qe, power, nbytes, budget)
        s = precision_summary(qe, power, nbytes, choice)
        assert s["total_bytes"] <= budget
        assert s["total_error"] == pytest.approx(_brute_force(err, nbytes, budget))
    with pytest.raises(RQError, match="below 84 bytes"):
        choose_layer_precision(qe, power, nbytes, 83)


def test_choose_layer_precision_beats_uniform():
    """Smarter beats naive: per-layer choice vs the same scheme for every layer, equal budget."""
    g = torch.Generator().manual_seed(0)
    L, E = 12, 8
    scale = torch.rand(L, 1, 1, generator=g) ** 4 * 10  # some layers far more sensitive than others
    qe = torch.cat([torch.zeros(L, E, 1), scale * torch.tensor([1.0, 6.0]) * torch.rand(L, E, 2, generator=g)], -1)
    nbytes = torch.tensor([1000, 516, 281])
    budget = L * 516  # what "every layer int8" needs
    s = precision_summary(qe, torch.ones(L, E), nbytes, choose_layer_precision(qe, torch.ones(L, E), nbytes, budget))
    uniform = float(qe[:, :, 1].sum())
    print(f"predicted error per-layer {s['total_error']:.3f} vs all-int8 {uniform:.3f}")
    assert s["total_bytes"] <= budget and s["total_error"] < uniform


def test_compressed_tensors_config_and_targets():
    names = ServingNames({l: f"model.layers.{l}.mlp.experts" for l in (1, 3, 5, 7)}, ("down_proj", "gate_proj", "up_proj"),
                         ("lm_head", "model.embed_tokens", *(f"model.layers.{l}.{m}" for l in range(8)
                                                            for m in ("self_attn.q_proj", "mlp.gate"))))
    cfg = compressed_tensors_config({1: "int8", 3: "nf4", 5: "int8", 7: "bf16"}, names)
    # every group is pack-quantized, so is the top level (SGLang's Marlin MoE refuses "mixed-precision")
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    g0, g1 = cfg["config_groups"]["group_0"], cfg["config_groups"]["group_1"]
    assert {g0["format"], g1["format"]} == {"pack-quantized"}
    assert g0["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert g1["weights"]["num_bits"] == 4 and g1["weights"]["group_size"] == 32  # SGLang Triton: 32 or 128
    proj = names.projections
    assert g0["targets"] == [expert_target(names.experts[1], proj), expert_target(names.experts[5], proj)]
    assert g1["targets"] == [expert_target(names.experts[3], proj)]
    assert set(ENGINE_WEIGHT_SCHEMES) == {"int8", "nf4"}
    pat = re.compile(expert_target(names.experts[3], proj)[3:])
    for name in ("model.layers.3.mlp.experts.0.gate_proj", "model.layers.3.mlp.experts.17.down_proj"):
        assert pat.match(name), name
    for name in ("model.layers.3.mlp.experts", "model.layers.3.mlp.experts.0", "model.layers.13.mlp.experts.0.up_proj",
                 "model.layers.30.mlp.experts.0.up_proj", "model.layers.3.mlp.shared_experts.gate_proj",
                 "model.layers.3.mlp.gate", "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.experts.0.gate_proj.x"):
        assert not pat.match(name), name
    # ignore: the other Linear modules, folded over the layer index, and the unquantized layer's experts
    assert cfg["ignore"] == ["lm_head", "model.embed_tokens", r"re:model\.layers\.\d+\.mlp\.gate$",
                             r"re:model\.layers\.\d+\.self_attn\.q_proj$", expert_target(names.experts[7], proj)]
    ign = [re.compile(p[3:]) for p in cfg["ignore"] if p.startswith("re:")]
    assert not any(p.match("model.layers.3.mlp.gate_proj") or p.match("model.layers.3.mlp.experts.0.gate_proj")
                   for p in ign)
    # one format for all groups; SGLang also asks about gate/up/down_proj names, whatever the checkpoint says
    mix = ServingNames({0: "model.layers.0.block_sparse_moe.experts"}, ("w1", "w2", "w3"), ())
    t = compressed_tensors_config({0: "nf4"}, mix, ("gate_proj", "up_proj", "down_proj"))["config_groups"]["group_0"]
    assert re.match(t["targets"][0][3:], "model.layers.0.block_sparse_moe.experts.3.w2")
    assert re.match(t["targets"][0][3:], "model.layers.0.block_sparse_moe.experts.0.gate_proj")
    with pytest.raises(RQError, match=r"no scheme chosen for MoE layers \[7\]"):
        compressed_tensors_config({1: "int8", 3: "nf4", 5: "int8"}, names)


def test_ignore_patterns_fold_only_the_layer_index():
    got = ignore_patterns(["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
                           "model.layers.0.mlp.gate_proj", "lm_head", "model.layers.2.mlp.gate"])
    assert got == ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.2.mlp.gate",
                   r"re:model\.layers\.\d+\.self_attn\.q_proj$"]
    folded = re.compile(got[-1][3:])
    assert folded.match("model.layers.7.self_attn.q_proj") and not folded.match("model.layers.7.self_attn.q_proj_x")
    assert not folded.match("x.model.layers.7.self_attn.q_proj")


def test_cli_per_layer_precision(tmp_path):
    """End to end on a hand-made checkpoint (expert tensors only; the layout reads headers)."""
    from safetensors.torch import save_file

    from rq_tool.source import load_config

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
        "intermediate_size": 64, "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 96,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "dtype": "bfloat16"}))
    tensors = {}
    for layer, e in itertools.product(range(2), range(8)):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        tensors[p + "gate_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
        tensors[p + "up_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
        tensors[p + "down_proj.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
    save_file(tensors, str(src / "model.safetensors"))
    loads = torch.tensor([[50, 10, 10, 10, 10, 5, 3, 2], [20, 20, 20, 10, 10, 10, 5, 5]])
    prof = make_profile(loads, [0, 1], 2, model_path=str(src), config_sha256=config_fingerprint(load_config(src)))
    prof.layers[1].quant_error = {k: 50 * v for k, v in prof.layers[1].quant_error.items()}  # layer 1 is sensitive
    prof.save(tmp_path / "p.json")
    out = tmp_path / "q.json"
    r = run("export", tmp_path / "p.json", "--engine", "vllm", "--per-layer-precision", "--budget", "0.8", "-o", out)
    assert r.exit_code == 0, r.output
    cfg = json.loads(out.read_text())
    assert cfg["format"] == "pack-quantized"
    proj = ("down_proj", "gate_proj", "up_proj")
    assert [g["targets"] for g in cfg["config_groups"].values()] == [[expert_target("model.layers.0.mlp.experts", proj)]]
    assert cfg["ignore"] == ["lm_head", expert_target("model.layers.1.mlp.experts", proj)]  # only layer 0, int8
    assert "--enable-eplb" in r.output and "refuses per-channel int8" in r.output  # vLLM EPLB cannot run int8
    assert "does not write the re-quantized checkpoint" in r.output
    r = run("export", tmp_path / "p.json", "--engine", "sglang", "--per-layer-precision", "--budget", "1.0", "-o",
            tmp_path / "none.json")
    assert r.exit_code == 0 and "nothing to quantize" in r.output and not (tmp_path / "none.json").exists()
    r = run("export", tmp_path / "p.json", "--engine", "sglang", "--per-layer-precision", "--ep-size", 4)
    assert r.exit_code == 2 and "drop --ep-size" in r.output

"""Every MoE causal-LM family of the installed transformers, on tiny models of its real classes.

Per supported family (the six of ``tiny_models.FAMILIES`` are covered in depth by
test_calibrate.py / test_rewrite.py and are not repeated here): calibrate; an exact
replicate-only rewrite (logits of the rewritten model equal the original's up to fp32
rounding); a greedy rewrite that loads and generates in ``pipeline()``. Every family rq does not
support gets one clear error line naming the model_type. One calibration and two rewrites per
family, shared by its tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rq_tool
from rq_tool.arch import get_family
from rq_tool.arch.catalog import family_status, moe_causal_lm_types
from rq_tool.errors import RQError
from rq_tool.rewrite.layout import layout_key, recorded_layout
from rq_tool.rewrite.verify import verify
from rq_tool.runtime import RQExperts
from rq_tool.source import SourceCheckpoint, read_config_dict
from tiny_models import FAMILIES, save_tiny, tiny_config, write_texts

REPLICA_ATOL = 1e-5  # replicas are bit-copies; only the order of fp32 sums may differ
ALL_TYPES = moe_causal_lm_types()
MIN_SUPPORTED = 40
MAX_TINY_PARAMS = 5_000_000


def _tiny_status(model_type: str):
    """``(config or None, RQError message or None)``: None config when transformers cannot build a
    tiny model of this type (the test cannot judge rq then)."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            config = tiny_config(model_type)
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception:
        return None, None
    if n_params > MAX_TINY_PARAMS:  # composite configs whose other towers keep their full default size
        return None, None
    try:
        get_family(config)
    except RQError as e:
        return config, str(e)
    return config, None


STATUS = {mt: _tiny_status(mt) for mt in ALL_TYPES}
SUPPORTED = [mt for mt, (cfg, err) in STATUS.items() if cfg is not None and err is None]
UNSUPPORTED = [mt for mt, (cfg, err) in STATUS.items() if cfg is not None and err is not None]
NEW = [mt for mt in SUPPORTED if mt not in FAMILIES]


def test_enumeration_finds_the_known_families():
    assert set(FAMILIES) <= set(ALL_TYPES)
    assert {"deepseek_v2", "glm4_moe", "phimoe", "granitemoe", "qwen3_next", "dbrx", "jamba", "jetmoe",
            "minimax", "ernie4_5_moe", "llama4_text"} <= set(ALL_TYPES)


def test_at_least_forty_families_supported():
    assert len(SUPPORTED) >= MIN_SUPPORTED, sorted(SUPPORTED)
    assert "deepseek_v2" in SUPPORTED and "dbrx" in SUPPORTED


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_family_gets_one_clear_error(model_type):
    msg = STATUS[model_type][1]
    assert "\n" not in msg and model_type in msg
    assert "dense" not in msg  # every family here is an MoE: say what is missing, never "dense"
    status = family_status(model_type, STATUS[model_type][0])
    assert not status.supported and status.note


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("texts") / "t.jsonl", 24)


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory, texts):
    """Per family, built once: source dir, profile, replicate-only and greedy rewrites."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(model_type)
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    src = save_tiny(model_type, root / "src")
                    prof = rq_tool.calibrate(src, str(texts), num_samples=4, seq_len=16, batch_size=4,
                                             schemes=("int8",), progress=False)
                    rep = rq_tool.rewrite(src, prof, root / "rep", strategy="replicate-only", schemes=["int8"],
                                          progress=False)
                    greedy = rq_tool.rewrite(src, prof, root / "greedy", schemes=["int8"], budget=0.9,
                                             progress=False)
            finally:
                torch.set_num_threads(n)
            cache[model_type] = (root, prof, rep, greedy)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", NEW)
def test_family_calibrate_rewrite_generate(rewritten, model_type, one_thread):
    from transformers import AutoModelForCausalLM, pipeline

    root, prof, rep, greedy = rewritten(model_type)
    # calibration: every MoE layer profiled, every routed token-slot counted once
    fam = get_family(tiny_config(model_type))
    assert [lp.layer for lp in prof.layers] == [b.layer for b in fam.blocks]
    K = prof.model["top_k"]
    for lp in prof.layers:
        assert int(lp.load.sum()) == 4 * 16 * K
    # replicate-only: exact, and the directory verifies (manifest, routing map vs tensors)
    assert sum(lp.num_replicas for lp in rep.plan.layers) > 0
    assert verify(root / "rep") == [] and verify(root / "greedy") == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig = AutoModelForCausalLM.from_pretrained(root / "src").eval()
        new = rq_tool.load(root / "rep")
    assert sum(isinstance(m, RQExperts) for m in new.modules()) == len(prof.layers)
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=ids).logits, orig(input_ids=ids).logits, rtol=0, atol=REPLICA_ATOL)
    # greedy (int8 slots within 0.9x): loads through auto_map and generates in pipeline()
    assert any(s == "int8" for lm in greedy.routing_map.layers for s in lm.slot_scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = pipeline("text-generation", model=str(root / "greedy"), trust_remote_code=True, device="cpu")
    out = gen("alpha beta", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith("alpha beta")
    assert sum(isinstance(m, RQExperts) for m in gen.model.modules()) == len(prof.layers)
    # the layout calibrate recorded (what `rq rewrite --dry-run` plans from) is the one the full path reads
    key = layout_key(SourceCheckpoint(root / "src"), read_config_dict(root / "src"))
    assert recorded_layout(prof.model["layout"], key, "profile") == (greedy.layout, greedy.routing_map.activation)
    dry = rq_tool.rewrite(root / "src", prof, None, schemes=["int8"], budget=0.9, dry_run=True, progress=False)
    assert dry.routing_map.to_dict() == greedy.routing_map.to_dict()


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_activation_read_from_the_model(act):
    assert get_family(tiny_config("qwen3_moe", hidden_act=act)).activation() == f"glu:{act}"


def test_layouts_read_from_the_model():
    gpt = get_family(tiny_config("gpt_oss"))
    assert (gpt.layout.transposed, gpt.layout.interleaved, gpt.layout.has_bias) == (True, True, True)
    aria = get_family(tiny_config("aria_text"))
    assert aria.layout.transposed and not aria.layout.interleaved
    # the clamped SwiGLU of gpt-oss on concatenated halves (MiniMax-M3-VL) is found by its numbers
    assert get_family(tiny_config("minimax_m3_vl_text")).activation().startswith("gptoss:")
    # on-disk names come from transformers' conversion mapping, not from rq
    mix = get_family(tiny_config("mixtral"))
    ek = mix.parse_expert_key("model.layers.1.block_sparse_moe.experts.3.w3.weight")
    assert (ek.layer, ek.role, ek.expert, ek.block_prefix) == (1, "up", 3, "model.layers.1.mlp")
    assert mix.runtime_key("model.layers.0.block_sparse_moe.gate.weight") == "model.layers.0.mlp.gate.weight"
    gran = get_family(tiny_config("granitemoe"))
    ek = gran.parse_expert_key("model.layers.0.block_sparse_moe.input_linear.weight")
    assert (ek.role, ek.expert) == ("gate_up", None)
    q = get_family(tiny_config("qwen3_moe")).parse_expert_key("model.layers.0.mlp.experts.2.down_proj.weight_scale_inv")
    assert (q.role, q.expert, q.tensor, q.quantized_part) == ("down", 2, "weight_scale_inv", True)


def test_family_table_and_cli(tmp_path):
    from click.testing import CliRunner

    from rq_tool.arch.catalog import family_table
    from rq_tool.cli import main

    table = family_table([family_status("qwen3_moe", tiny_config("qwen3_moe")),
                          family_status("jetmoe", STATUS["jetmoe"][0])])
    assert "1 of 2" in table and "| `qwen3_moe` |" in table and "| `jetmoe` |" in table
    save_tiny("olmoe", tmp_path / "m")
    r = CliRunner().invoke(main, ["families", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0 and '"supported": true' in r.output and '"model_type": "olmoe"' in r.output

"""rq export --per-layer-precision's quantization_config through the real compressed-tensors package:
its own validation (``QuantizationConfig.model_validate``) and ``apply_quantization_config`` on tiny
checkpoints saved by the real transformers classes. Which modules get a quantization scheme is the
test: every per-expert projection of a quantized MoE layer, nothing else (not the experts container,
not a router, not attention, not a shared expert, not an unquantized layer's experts).

The engines build their layers under the CHECKPOINT's module names (transformers 5 fuses the experts
into one module, the checkpoint keeps one Linear per expert projection), so the config is applied to
a module tree with the checkpoint's names: an ``nn.Linear`` for every 2-D ``weight`` on disk.
"""

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from compressed_tensors.utils.match import match_name
from torch import nn
from tiny_models import save_tiny, tiny_model

from rq_tool.arch import get_family
from rq_tool.checkpoint import SafetensorsCheckpoint
from rq_tool.errors import RQError
from rq_tool.export import ENGINE_WEIGHT_SCHEMES, compressed_tensors_config, get_engine
from rq_tool.export.source import serving_names
from rq_tool.source import load_config

SGLANG_PROBE = get_engine("sglang").moe_probe_projections


def checkpoint_modules(ckpt: SafetensorsCheckpoint) -> nn.Module:
    """A module tree named as the checkpoint: an ``nn.Linear`` per 2-D ``….weight`` key."""
    root = nn.Module()
    for key, info in ckpt.tensors.items():
        if not (key.endswith(".weight") and len(info.shape) == 2):
            continue
        *parents, leaf = key[: -len(".weight")].split(".")
        mod = root
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        out_features, in_features = info.shape
        mod.add_module(leaf, nn.Linear(in_features, out_features, bias=False))
    return root


def _scheme_of(module):
    return getattr(module, "quantization_scheme", None)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe"])
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_config_quantizes_exactly_the_chosen_experts(tmp_path, model_type, engine):
    path = save_tiny(model_type, tmp_path / model_type, dtype=torch.bfloat16)
    ckpt, config = SafetensorsCheckpoint(path), load_config(path)
    names = serving_names(ckpt, get_family(config))
    layers = sorted(names.experts)
    assert len(layers) == 2 and names.projections  # two MoE layers in every tiny model
    probe = get_engine(engine).moe_probe_projections
    for choice in ({layers[0]: "nf4", layers[1]: "bf16"}, {layers[0]: "int8", layers[1]: "nf4"}):
        cfg = compressed_tensors_config(choice, names, probe)
        qc = QuantizationConfig.model_validate(cfg)  # compressed-tensors' own schema
        assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
        model = checkpoint_modules(ckpt)
        apply_quantization_config(model, qc, show_progress=False)
        got = {n: _scheme_of(m).weights.num_bits for n, m in model.named_modules() if _scheme_of(m) is not None}
        want = {f"{names.experts[l]}.{e}.{p}": ENGINE_WEIGHT_SCHEMES[s]["num_bits"]
                for l, s in choice.items() if s in ENGINE_WEIGHT_SCHEMES
                for e in range(8) for p in names.projections}
        assert got == want, sorted(set(got) ^ set(want))[:6]
        for n in (names.experts[layers[0]], f"{names.experts[layers[0]]}.0"):
            assert _scheme_of(model.get_submodule(n)) is None  # never the container
        # SGLang refuses a Linear neither targeted nor ignored (find_matched_target raises): none is left
        targets = [t for g in cfg["config_groups"].values() for t in g["targets"]]
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear):
                hit_t = any(match_name(n, t) for t in targets)
                hit_i = any(match_name(n, t) for t in cfg["ignore"])
                assert hit_t != hit_i, (n, hit_t, hit_i)
        # the names each engine asks about for a fused MoE layer: "<experts>.0.<proj>" (vLLM: the
        # checkpoint's projection names; SGLang: gate/up/down_proj whatever the checkpoint calls them)
        for l, s in choice.items():
            for p in (*names.projections, *probe):
                probe_name = f"{names.experts[l]}.0.{p}"
                quantized = any(match_name(probe_name, t) for t in targets)
                ignored = any(match_name(probe_name, t) for t in cfg["ignore"])
                assert (quantized, ignored) == ((True, False) if s in ENGINE_WEIGHT_SCHEMES else (False, True))


def test_config_on_the_transformers_model_touches_no_fused_module():
    """On transformers' own (fused-experts) modules the config quantizes nothing and does not fail:
    the experts container, routers and attention never match a target."""
    from rq_tool.export import ServingNames

    model = tiny_model("qwen3_moe")
    names = ServingNames({0: "model.layers.0.mlp.experts", 1: "model.layers.1.mlp.experts"},
                         ("down_proj", "gate_proj", "up_proj"), ())
    qc = QuantizationConfig.model_validate(compressed_tensors_config({0: "nf4", 1: "int8"}, names, SGLANG_PROBE))
    apply_quantization_config(model, qc, show_progress=False)
    assert [n for n, m in model.named_modules() if _scheme_of(m) is not None] == []


def test_fused_checkpoint_is_refused(tmp_path):
    path = save_tiny("gpt_oss", tmp_path / "g", dtype=torch.bfloat16)
    with pytest.raises(RQError, match="experts are stored fused"):
        serving_names(SafetensorsCheckpoint(path), get_family(load_config(path)))


def test_int4_group_size_keeps_nf4_bytes():
    """The budget is spent in rq's nf4 bytes; int4 in groups of 32 with 16-bit scales stores exactly
    as many (4.5 bits per weight), and 32 is a group size SGLang's Triton MoE kernel takes."""
    from rq_tool.quant import get_scheme

    args = ENGINE_WEIGHT_SCHEMES["nf4"]
    assert args["group_size"] in (32, 128) and args["num_bits"] == 4
    for out_f, in_f in ((64, 32), (1536, 2048), (4096, 768)):
        engine_bytes = out_f * in_f * args["num_bits"] // 8 + 2 * (out_f * in_f // args["group_size"])
        assert engine_bytes == get_scheme("nf4").nbytes(out_f, in_f)

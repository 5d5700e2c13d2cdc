"""Tiny random-weight models of every supported family, built from the real transformers classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)

FAMILY_KWARGS = {
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      head_dim=16, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}
FAMILIES = tuple(FAMILY_KWARGS)

# Every other MoE causal-LM family: generic tiny sizes (set only where the config has the field),
# plus the few per-family settings a tiny model needs (2 layers, at least one attention layer).
GENERIC = dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48, head_dim=16,
               num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
               q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, decoder_sparse_step=1,
               moe_layer_freq=1, expert_layer_period=1, expert_layer_offset=0)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
GENERIC_OVERRIDES = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "beam": dict(mlp_layer_types=["dense", "sparse"]),
    "flint": dict(mlp_only_layers=[0]),
    "dots1": dict(n_shared_experts=1),
    "zaya": dict(num_experts_per_tok=1),  # top-1 routing only
    "dbrx": dict(d_model=64, n_heads=4, ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), max_seq_len=128),
}


def _generic_kwargs(model_type: str) -> dict:
    import inspect

    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "__dataclass_fields__", {}))
    kw = {k: v for k, v in GENERIC.items() if k in fields}
    kw.update({k: 8 for k in EXPERT_COUNT_FIELDS if k in fields})
    if "kv_lora_rank" in fields:  # multi-head latent attention: as many kv heads as heads
        kw["num_key_value_heads"] = BASE["num_attention_heads"]
    return {**kw, **GENERIC_OVERRIDES.get(model_type, {})}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type in FAMILY_KWARGS:
        return AutoConfig.for_model(model_type, **{**BASE, **FAMILY_KWARGS[model_type], **overrides})
    config = AutoConfig.for_model(model_type, **{**BASE, **_generic_kwargs(model_type), **overrides})
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types and all("linear" in str(t) or "mamba" in str(t) for t in types) and \
            "layer_types" not in overrides:  # hybrids: make the last layer full attention (caches need one)
        config.layer_types = [*types[:-1], "full_attention"]
    return config


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random-weight CausalLM of the family, with routing skew so loads are uneven."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08, generator=g)
            elif "norm" in name or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        # skew the routers so a few experts are hot, as in trained models
        for mod_name, mod in model.named_modules():
            if mod_name.endswith((".gate", ".router")) and hasattr(mod, "weight") and mod.weight.dim() == 2:
                mod.weight[0] += 0.3
                mod.weight[1] += 0.15
    return model


class _CharTokenizerFiles:
    """Writes a minimal byte-level tokenizer (tokenizers library) so calibration can run."""

    @staticmethod
    def save(path: Path, vocab_size: int) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders
        from transformers import PreTrainedTokenizerFast

        chars = [chr(c) for c in range(32, 32 + vocab_size - 2)]
        vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        tok.decoder = decoders.Fuse()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
        fast.save_pretrained(path)


def save_tiny(model_type: str, path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a tiny model + tokenizer to ``path`` (transformers' default on-disk key names)."""
    model = tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    model.config.eos_token_id = 0
    model.config.pad_token_id = 0
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    _CharTokenizerFiles.save(path, model.config.vocab_size)
    return path


def write_texts(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A small JSONL calibration file of pseudo-random words."""
    import random

    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "moe", "expert", "route", "load", "token", "sum", "x", "=", "1", "2"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 60)))}) + "\n")
    return path


def _fp8_eligible(key: str, t: torch.Tensor) -> bool:
    """Which tensors an FP8 release stores in float8: the Linear weights of the decoder layers
    (attention, dense MLPs, shared and routed experts), not embeddings, head, norms or routers."""
    return (t.dim() == 2 and key.endswith(".weight") and ".layers." in key and "norm" not in key
            and not key.endswith((".mlp.gate.weight", ".router.weight")))


def save_tiny_quantized(model_type: str, path: Path, method: str, block=(32, 32), shards: int = 2, **kw) -> Path:
    """A tiny checkpoint stored as an FP8 (``method="fp8"``, block-quantized) or MXFP4 (gpt-oss) release.

    Built from ``save_tiny`` (fp32): FP8 replaces every eligible Linear weight by float8 + per-block
    ``weight_scale_inv``; MXFP4 replaces gpt-oss's fused expert tensors by ``*_blocks`` / ``*_scales``.
    The tensors are spread over ``shards`` files so that a weight and its scales can be split apart.
    """
    from safetensors.torch import load_file, save_file

    from rq_tool.quant.sources import fp8_quantize, mxfp4_quantize

    save_tiny(model_type, path, **kw)
    sd = load_file(str(path / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if method == "fp8" and _fp8_eligible(key, t):
            q, s = fp8_quantize(t, tuple(block))
            out[key], out[key + "_scale_inv"] = q, s
        elif method == "mxfp4" and key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = mxfp4_quantize(t.transpose(1, 2))
            out[key + "_blocks"], out[key + "_scales"] = blocks, scales
        else:
            out[key] = t
    (path / "model.safetensors").unlink()
    keys = list(out)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: out[k] for k in keys[i * per:(i + 1) * per]}
        # keys are split in order, so a weight and its scales can land in different shards
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((path / "config.json").read_text())
    if method == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}
    else:
        cfg["quantization_config"] = {"quant_method": "mxfp4",
                                      "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                 "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path

"""``rq_tool.calibrate(...)``: run a model over calibration data and return a ``Profile``."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import defaults
from ..errors import RQError
from ..lis import lis_by_batch
from ..source import load_model, load_tokenizer, resolve_model_path
from ..quant import QUANT_SCHEMES, scheme_for_dtype
from .data import CalibrationData, load_tags, load_texts, pack, source_record
from .profile import LayerProfile, Profile, config_fingerprint
from .recorder import ExpertRecorder
from ..rewrite.layout import source_layout_record


def calibrate(
    model: str | Path | None = None,
    dataset: str = defaults.DEFAULT_DATASET,
    *,
    num_samples: int = defaults.NUM_SAMPLES,
    seq_len: int = defaults.SEQ_LEN,
    batch_size: int = defaults.BATCH_SIZE,
    seed: int = defaults.SEED,
    schemes=QUANT_SCHEMES,
    quant_error: bool = True,
    lis_batch_sizes=defaults.LIS_BATCH_SIZES,
    progress: bool = True,
    max_memory: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
    chunk_tokens: int | None = None,
) -> Profile:
    """Profile expert load and importance of an MoE model (``None`` = the bundled tiny MoE).

    ``dataset`` / ``dataset_config`` / ``split`` / ``text_field``: see ``rq_tool.calibrate.load_texts``;
    the profile records them (``calibration.source``) so ``rq eval`` can find the data again.

    ``chunk_tokens`` (must divide ``seq_len``): record the per-row loads (``seq_loads``) per chunk of
    that many tokens instead of per sequence, for planning steps finer than a sequence.

    ``max_memory`` (e.g. ``"8GB"``): calibrate a model larger than RAM by offloading the weights
    that do not fit to a temporary folder on disk (loaded layer by layer during the forward).
    """
    path = resolve_model_path(model)
    if chunk_tokens is not None and not (1 <= chunk_tokens <= seq_len and seq_len % chunk_tokens == 0):
        raise RQError(f"--chunk-tokens {chunk_tokens} must divide --seq-len {seq_len}")
    dataset = (dataset, dataset_config, split, text_field)
    if max_memory is None:
        return _calibrate(path, load_model(path), dataset, num_samples, seq_len, batch_size, seed, schemes,
                          quant_error, lis_batch_sizes, progress, chunk_tokens)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rq-offload-") as offload:
        loaded = load_model(path, max_memory=max_memory, offload_folder=offload)
        return _calibrate(path, loaded, dataset, num_samples, seq_len, batch_size, seed, schemes, quant_error,
                          lis_batch_sizes, progress, chunk_tokens)


def _calibrate(path, loaded, dataset, num_samples, seq_len, batch_size, seed, schemes, quant_error, lis_batch_sizes,
               progress, chunk_tokens) -> Profile:
    hf_model, family = loaded
    tokenizer = load_tokenizer(path)
    max_pos = getattr(hf_model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise RQError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    if batch_size < 1:
        raise RQError(f"--batch-size must be >= 1 (got {batch_size})")
    spec, config, split, text_field = dataset
    name, texts = load_texts(spec, config=config, split=split, text_field=text_field)
    data = pack(texts, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed, name=name,
                tags=load_tags(spec, texts) if text_field is None else None, chunk_tokens=chunk_tokens)
    layers, seq_loads = profile_model(hf_model, family, data, batch_size=batch_size, schemes=schemes,
                                      quant_error=quant_error, lis_batch_sizes=lis_batch_sizes, progress=progress,
                                      return_seq_loads=True, rows_per_seq=seq_len // (chunk_tokens or seq_len))
    first = family.canonical_experts(family.moe_blocks(hf_model)[0][1].experts)
    activation = family.activation(hf_model.config)
    return Profile(
        model={
            "path": str(path),
            "model_type": hf_model.config.model_type,
            "family": family.name,
            "config_sha256": config_fingerprint(hf_model.config),
            "num_experts": int(first["gate_up"].shape[0]),
            "top_k": family.top_k(family.router(family.moe_blocks(hf_model)[0][1])),
            "num_hidden_layers": int(hf_model.config.num_hidden_layers),
            "moe_layers": [layer for layer, _ in family.moe_blocks(hf_model)],  # so a missing layer is caught
            "expert_dtype": scheme_for_dtype(first["gate_up"].dtype),
            "activation": activation,
            # the checkpoint's expert layout, so `rq rewrite --dry-run` plans without building the model
            "layout": source_layout_record(path, family, activation),
        },
        calibration={
            "dataset": data.name,
            "sha256": data.sha256,
            "texts": data.num_texts,
            "texts_used": data.texts_used,
            "source": source_record(spec, config, split, text_field),
            "sequences": int(data.input_ids.shape[0]),
            "seq_len": int(data.input_ids.shape[1]),
            "tokens": data.num_tokens,
            "batch_size": batch_size,
            "seed": seed,
            **({} if chunk_tokens is None else {"chunk_tokens": chunk_tokens}),
        },
        schemes=list(schemes) if quant_error else [],
        layers=layers,
        seq_loads=seq_loads,
        seq_domain=data.seq_domain,
        domains=None if data.domains is None else list(data.domains),
    )


def profile_model(hf_model, family, data: CalibrationData, *, batch_size: int, schemes=QUANT_SCHEMES,
                  quant_error: bool = True, lis_batch_sizes=defaults.LIS_BATCH_SIZES,
                  progress: bool = True, return_seq_loads: bool = False, rows_per_seq: int = 1):
    """Run ``data.input_ids [N, S]`` through an already loaded model under the recorder.

    Returns the ``LayerProfile`` list, and with ``return_seq_loads`` also ``seq_loads [N * r, L, E]``
    int64 (the routed token-slots per layer and expert of each sequence, or with ``rows_per_seq`` r > 1
    of each of its r chunks of S / r tokens, in order).
    """
    ids = data.input_ids
    with torch.inference_mode(), ExpertRecorder(hf_model, family, schemes, quant_error) as rec:
        # disable=None: no bar when stderr is not a terminal (logs, pipes)
        bar = tqdm(total=ids.shape[0], desc="calibrating", unit="seq", disable=None if progress else True, leave=False)
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size]
            rec.batch_size = batch.shape[0] * rows_per_seq  # rows of loads in this forward
            hf_model(input_ids=batch, use_cache=False)
            bar.update(batch.shape[0])
        bar.close()
    out, per_layer = [], []
    for st in rec.stats:
        seq_load = torch.cat(st.seq_load) if st.seq_load else torch.zeros(0, st.num_experts, dtype=torch.int64)
        per_layer.append(seq_load)
        out.append(LayerProfile(
            layer=st.layer,
            load=st.load,
            gate_mass=st.gate_mass,
            output_energy=st.output_energy,
            output_power=st.output_power,
            quant_error=dict(st.quant_error),
            lis_by_batch=lis_by_batch(seq_load.view(-1, rows_per_seq, st.num_experts).sum(1), lis_batch_sizes),
            shared={"tokens": st.shared_tokens, "output_energy": st.shared_energy} if st.has_shared else None,
        ))
    if return_seq_loads:
        return out, torch.stack(per_layer, dim=1) if per_layer else None
    return out

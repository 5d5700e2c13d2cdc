"""Calibration data: bundled sets, local JSONL / text / parquet files, or a `datasets` name.

Texts are tokenized, joined with the EOS token and packed into ``[N, seq_len]`` sequences with
no padding, so every token position is a real token routed through every MoE layer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults
from ..errors import RQError

TEXT_COLUMNS = ("text", "content", "code", "document", "body")


@dataclass(frozen=True)
class CalibrationData:
    """Packed token ids ``input_ids [N, S]`` with the identity of where they came from."""

    name: str
    sha256: str  # of the raw texts, in order
    input_ids: torch.Tensor
    num_texts: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def bundled_sets() -> list[str]:
    return sorted(p.stem for p in defaults.calibration_sets_dir().glob("*.jsonl"))


def _bundled_names() -> str:
    return ", ".join(bundled_sets()) or "none installed"


def _texts_from_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open("rb") as f:  # decoded line by line, so an encoding error names its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RQError(f"{path}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RQError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(row, str):
                texts.append(row)
                continue
            col = next((c for c in TEXT_COLUMNS if isinstance(row, dict) and isinstance(row.get(c), str)), None)
            if col is None:
                raise RQError(f"{path}:{n}: no text field (expected one of {', '.join(TEXT_COLUMNS)})")
            texts.append(row[col])
    return texts


def _texts_from_dataset(ds, where: str) -> list[str]:
    col = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if col is None:
        raise RQError(f"{where}: no text column (columns: {', '.join(ds.column_names)}; expected one of "
                      f"{', '.join(TEXT_COLUMNS)})")
    return [t for t in ds[col] if isinstance(t, str)]


def load_texts(spec: str) -> tuple[str, list[str]]:
    """Resolve ``spec`` to ``(name, texts)``.

    ``spec`` is a bundled set name (``mix``, ``code``...), a local ``.jsonl``/``.json``,
    ``.txt``/``.md`` (blank-line separated documents) or ``.parquet`` file, or a Hugging Face
    ``datasets`` name (``name`` or ``name:config:split``; needs the hub or a local cache).
    """
    bundled = defaults.calibration_sets_dir() / f"{spec}.jsonl"
    path = Path(spec)
    if "/" not in spec and "." not in spec and bundled.is_file():
        return spec, _texts_from_jsonl(bundled)
    if path.suffix in (".jsonl", ".json", ".txt", ".md", ".parquet") or path.exists():
        if not path.is_file():
            raise RQError(f"calibration data {spec!r} not found (no such file; bundled sets: {_bundled_names()})")
        if path.suffix in (".jsonl", ".json"):
            return path.name, _texts_from_jsonl(path)
        if path.suffix == ".parquet":
            import datasets

            try:
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            except Exception as e:  # corrupt parquet: name it
                raise RQError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
            return path.name, _texts_from_dataset(ds, str(path))
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RQError(f"{path}: not UTF-8 text") from None
        return path.name, [d.strip() for d in raw.split("\n\n") if d.strip()]
    import datasets

    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:
        raise RQError(f"cannot load dataset {spec!r} ({type(e).__name__}); bundled sets: {_bundled_names()}, "
                      "or pass a local .jsonl/.txt/.parquet file") from None
    return spec, _texts_from_dataset(ds, spec)


def texts_sha256(texts: list[str]) -> str:
    """Identity of an ordered list of texts: sha256 over each text's UTF-8 bytes and a NUL after it.

    The profile records it for the calibration set; held-out data with the same hash is refused.
    """
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    return digest.hexdigest()


def pack(texts: list[str], tokenizer, *, num_samples: int, seq_len: int, seed: int, name: str) -> CalibrationData:
    """Shuffle documents with ``seed``, tokenize, join with EOS, pack into ``[N, seq_len]``."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise RQError(f"calibration data {name!r} has no non-empty texts")
    if num_samples < 1 or seq_len < 2:
        raise RQError(f"--num-samples must be >= 1 and --seq-len >= 2 (got {num_samples}, {seq_len})")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = tokenizer.eos_token_id
    need = num_samples * seq_len
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= need:
            break
    n = min(num_samples, len(ids) // seq_len)
    if n == 0:
        raise RQError(f"calibration data {name!r} has {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}")
    if n < num_samples:
        import warnings

        warnings.warn(f"calibration data {name!r} yields {n} sequences of {seq_len} tokens, not {num_samples}")
    input_ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return CalibrationData(name=name, sha256=texts_sha256(texts), input_ids=input_ids, num_texts=len(texts))

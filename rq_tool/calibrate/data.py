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
    seq_domain: torch.Tensor | None = None  # [N] int64 majority domain (by tokens) of each sequence
    domains: tuple[str, ...] | None = None  # names seq_domain indexes

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


def _tags_from_jsonl(path: Path) -> list[str | None]:
    """Per text row of a JSONL file, its ``domain``/``source`` field (``defaults.TAG_FIELDS``) or None."""
    tags = []
    with path.open("rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            row = json.loads(line)
            tag = next((row[k] for k in defaults.TAG_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)),
                       None)
            tags.append(tag)
    return tags


def load_tags(spec: str, texts: list[str]) -> list[str] | None:
    """Domain tag of each text of ``load_texts(spec)``, or None when the data has none.

    A JSONL row's ``domain`` / ``source`` field; a bundled per-domain set is that domain; a
    bundled mixed set (``mix``) traces each document back to the per-domain set holding it.
    """
    bundled = defaults.calibration_sets_dir() / f"{spec}.jsonl"
    path = bundled if ("/" not in spec and "." not in spec and bundled.is_file()) else Path(spec)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None
    tags = _tags_from_jsonl(path)
    if len(tags) == len(texts) and all(t is not None for t in tags):
        return tags
    if path != bundled:
        return [t if t is not None else "untagged" for t in tags] if any(tags) and len(tags) == len(texts) else None
    others = [d for d in bundled_sets() if d != spec]
    owner: dict[str, str] = {}
    for d in others:
        for t in _texts_from_jsonl(defaults.calibration_sets_dir() / f"{d}.jsonl"):
            owner.setdefault(t, d)
    if texts and all(t in owner for t in texts):
        # a per-domain set owns only its own texts; a mixed set's texts are owned by the per-domain ones
        if all(owner[t] == spec for t in texts):
            return [spec] * len(texts)
        return [owner[t] for t in texts]
    return [spec] * len(texts)


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


def pack(texts: list[str], tokenizer, *, num_samples: int, seq_len: int, seed: int, name: str,
         tags: list[str] | None = None) -> CalibrationData:
    """Shuffle documents with ``seed``, tokenize, join with EOS, pack into ``[N, seq_len]``.

    ``tags [len(texts)]``: a domain per text; each sequence then records its majority domain.
    """
    if tags is not None:
        assert len(tags) == len(texts), "one tag per text"
        kept = [(t, g) for t, g in zip(texts, tags) if t and t.strip()]
        texts, tags = [t for t, _ in kept], [g for _, g in kept]
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
    owner: list[int] = []  # text index of every token
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        owner.extend([i] * (len(ids) - len(owner)))
        if len(ids) >= need:
            break
    n = min(num_samples, len(ids) // seq_len)
    if n == 0:
        raise RQError(f"calibration data {name!r} has {len(ids)} tokens, fewer than one sequence of --seq-len {seq_len}")
    if n < num_samples:
        import warnings

        warnings.warn(f"calibration data {name!r} yields {n} sequences of {seq_len} tokens, not {num_samples}")
    input_ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    seq_domain = domains = None
    if tags is not None:
        domains = tuple(sorted(set(tags)))
        tag_id = torch.tensor([domains.index(tags[i]) for i in owner[: n * seq_len]]).view(n, seq_len)
        hist = torch.zeros(n, len(domains), dtype=torch.int64).scatter_add_(1, tag_id, torch.ones_like(tag_id))
        seq_domain = hist.argmax(-1)  # ties: the first domain name
    return CalibrationData(name=name, sha256=texts_sha256(texts), input_ids=input_ids, num_texts=len(texts),
                           seq_domain=seq_domain, domains=domains)

"""Calibration data: bundled sets, local JSONL / text / parquet files, dataset folders, or a `datasets` name.

Texts are tokenized, joined with the EOS token and packed into ``[N, seq_len]`` sequences with
no padding, so every token position is a real token routed through every MoE layer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults
from ..errors import RQError

from . import folders
from .folders import TEXT_COLUMNS


@dataclass(frozen=True)
class CalibrationData:
    """Packed token ids ``input_ids [N, S]`` with the identity of where they came from."""

    name: str
    sha256: str  # of the raw texts, in order
    input_ids: torch.Tensor
    num_texts: int
    seq_domain: torch.Tensor | None = None  # [N * S / C] int64 majority domain (by tokens) of each row (sequence or chunk)
    domains: tuple[str, ...] | None = None  # names seq_domain indexes
    texts_used: int | None = None  # the first this many texts of shuffled_order(num_texts, seed) gave the tokens

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def bundled_sets() -> list[str]:
    return sorted(p.stem for p in defaults.calibration_sets_dir().glob("*.jsonl"))


def _bundled_names() -> str:
    return ", ".join(bundled_sets()) or "none installed"


def _texts_from_jsonl(path: Path, text_field: str | None = None) -> list[str]:
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
            if isinstance(row, str) and text_field is None:
                texts.append(row)
                continue
            if text_field is not None:
                col = text_field if isinstance(row, dict) and isinstance(row.get(text_field), str) else None
                if col is None:
                    raise RQError(f"{path}:{n}: no text field {text_field!r} (--text-field)")
            else:
                col = next((c for c in TEXT_COLUMNS if isinstance(row, dict) and isinstance(row.get(c), str)), None)
            if col is None:
                raise RQError(f"{path}:{n}: no text field (expected one of {', '.join(TEXT_COLUMNS)}, or pass "
                              "--text-field)")
            texts.append(row[col])
    return texts


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


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # --dataset-config / --split


def check_options(config: str | None, split: str | None, text_field: str | None) -> None:
    """``--dataset-config`` / ``--split`` / ``--text-field``: bounded, no path tricks (one line on a bad one)."""
    for flag, value in (("--dataset-config", config), ("--split", split)):
        if value is not None and (not _NAME.fullmatch(value) or ".." in value):
            raise RQError(f"{flag} must be 1-64 letters, digits, '_', '-' or '.' (got {value[:80]!r})")
    if text_field is not None and not (0 < len(text_field) <= 256 and text_field.isprintable()):
        raise RQError(f"--text-field must be 1-256 printable characters (got {text_field[:80]!r})")


def source_kind(spec: str) -> str:
    """What ``spec`` names: ``bundled``, ``jsonl``, ``text``, ``parquet`` (a file), ``saved-dataset``
    (a ``datasets.save_to_disk`` folder), ``parquet-folder``, ``folder`` (neither) or ``hub``."""
    bundled = defaults.calibration_sets_dir() / f"{spec}.jsonl"
    path = Path(spec)
    if "/" not in spec and "." not in spec and bundled.is_file():
        return "bundled"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved-dataset"
        return "parquet-folder" if next(path.rglob("*.parquet"), None) is not None else "folder"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".txt", ".md") or path.exists():
        return "text"
    return "hub"


def source_record(spec: str, config: str | None = None, split: str | None = None,
                  text_field: str | None = None) -> dict:
    """Where calibration data came from, for the profile: enough for ``rq eval`` to read it again."""
    kind = source_kind(spec)
    local = kind not in ("bundled", "hub")
    return {"spec": spec, "kind": kind, "path": str(Path(spec).resolve()) if local else None,
            "config": config, "split": split, "text_field": text_field}


def load_texts(spec: str, *, config: str | None = None, split: str | None = None,
               text_field: str | None = None) -> tuple[str, list[str]]:
    """Resolve ``spec`` to ``(name, texts)``.

    ``spec`` is a bundled set name (``mix``, ``code``...), a local ``.jsonl``/``.json``,
    ``.txt``/``.md`` (blank-line separated documents) or ``.parquet`` file, a folder written by
    ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), a folder of parquet files
    (split ``--split`` picked by folder or file-name prefix, ``train`` by default; config
    ``--dataset-config`` = a subfolder), or a Hugging Face ``datasets`` name (``name`` or
    ``name:config:split``; needs the hub or a local cache). ``text_field``: the column / JSON field
    holding the text (default: the first of ``TEXT_COLUMNS`` present).
    """
    check_options(config, split, text_field)
    kind = source_kind(spec)
    path = Path(spec)
    if kind == "bundled":
        _no_options(spec, "a bundled set", config, split)
        return spec, _texts_from_jsonl(defaults.calibration_sets_dir() / f"{spec}.jsonl", text_field)
    if kind in ("jsonl", "text", "parquet"):
        if not path.is_file():
            raise RQError(f"calibration data {spec!r} not found (no such file; bundled sets: {_bundled_names()})")
        _no_options(spec, "a file", config, split)
        if kind == "jsonl":
            return path.name, _texts_from_jsonl(path, text_field)
        if kind == "parquet":
            return path.name, folders.texts_from_parquet([path], str(path), text_field)
        if text_field is not None:
            raise RQError(f"--text-field does not apply to {spec!r} (a plain-text file: one document per blank-line "
                          "separated block)")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RQError(f"{path}: not UTF-8 text") from None
        return path.name, [d.strip() for d in raw.split("\n\n") if d.strip()]
    name = path.name + (f":{split}" if split else "")
    if kind == "saved-dataset":
        if config is not None:
            raise RQError(f"--dataset-config does not apply to {spec!r} (a save_to_disk folder holds one config)")
        return name, folders.texts_from_dataset(folders.load_saved(path, split), spec, text_field)
    if kind == "parquet-folder":
        root = path
        if config is not None:
            root = path / config
            if not root.is_dir():
                subs = sorted(p.name for p in path.iterdir() if p.is_dir())[:20]
                raise RQError(f"{spec}: no config folder {config!r} (subfolders: {', '.join(subs) or 'none'})")
        return name, folders.texts_from_parquet(folders.parquet_split(root, split), spec, text_field)
    if kind == "folder":
        raise RQError(f"{spec}: a folder, but neither a datasets save_to_disk folder (dataset_info.json + state.json "
                      "or dataset_dict.json) nor a folder of .parquet files")
    import datasets

    hub_name, _, rest = spec.partition(":")
    hub_config, _, hub_split = rest.partition(":")
    for flag, a, b in (("--dataset-config", config, hub_config), ("--split", split, hub_split)):
        if a and b and a != b:
            raise RQError(f"{flag} {a!r} contradicts {spec!r}")
    config, split = config or hub_config or None, split or hub_split or "train"
    try:
        ds = datasets.load_dataset(hub_name, config, split=split)
    except Exception as e:
        raise RQError(f"cannot load dataset {spec!r} ({type(e).__name__}); bundled sets: {_bundled_names()}, "
                      "or pass a local .jsonl/.txt/.parquet file or dataset folder") from None
    return spec if split == "train" or hub_split else f"{spec}:{split}", folders.texts_from_dataset(ds, spec, text_field)


def _no_options(spec: str, what: str, config: str | None, split: str | None) -> None:
    for flag, value in (("--dataset-config", config), ("--split", split)):
        if value is not None:
            raise RQError(f"{flag} does not apply to {spec!r} ({what}; splits and configs are for dataset folders "
                          "and datasets names)")


def texts_sha256(texts: list[str]) -> str:
    """Identity of an ordered list of texts: sha256 over each text's UTF-8 bytes and a NUL after it.

    The profile records it for the calibration set; held-out data with the same hash is refused.
    """
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    return digest.hexdigest()


def shuffled_order(n: int, seed: int) -> list[int]:
    """The order ``pack`` reads ``n`` (non-empty) texts in."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_used(texts: list[str], seed: int, texts_used: int) -> tuple[list[str], list[str]]:
    """``(used, unused)``: the texts ``pack(texts, seed=seed)`` took its tokens from (in the order it
    read them) and the rest (in their original order): the calibration source's held-out part."""
    texts = [t for t in texts if t and t.strip()]
    order = shuffled_order(len(texts), seed)
    used = set(order[:texts_used])
    return [texts[i] for i in order[:texts_used]], [t for i, t in enumerate(texts) if i not in used]


def pack(texts: list[str], tokenizer, *, num_samples: int, seq_len: int, seed: int, name: str,
         tags: list[str] | None = None, chunk_tokens: int | None = None) -> CalibrationData:
    """Shuffle documents with ``seed``, tokenize, join with EOS, pack into ``[N, seq_len]``.

    ``tags [len(texts)]``: a domain per text; each row of loads (a sequence, or each ``chunk_tokens``
    chunk of one) then records its majority domain: ``seq_domain [N * seq_len / chunk_tokens]``.
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
    order = shuffled_order(len(texts), seed)
    sep = tokenizer.eos_token_id
    need = num_samples * seq_len
    ids: list[int] = []
    owner: list[int] = []  # position in ``order`` of the text of every token
    for j, i in enumerate(order):
        ids.extend(tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        owner.extend([j] * (len(ids) - len(owner)))
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
        row = chunk_tokens or seq_len
        tag_id = torch.tensor([domains.index(tags[order[j]]) for j in owner[: n * seq_len]]).view(-1, row)
        hist = torch.zeros(tag_id.shape[0], len(domains), dtype=torch.int64).scatter_add_(
            1, tag_id, torch.ones_like(tag_id))
        seq_domain = hist.argmax(-1)  # ties: the first domain name
    return CalibrationData(name=name, sha256=texts_sha256(texts), input_ids=input_ids, num_texts=len(texts),
                           seq_domain=seq_domain, domains=domains, texts_used=owner[n * seq_len - 1] + 1)

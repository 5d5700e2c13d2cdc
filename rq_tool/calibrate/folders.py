"""Text columns of dataset folders and parquet files, for ``rq_tool.calibrate.data.load_texts``.

A ``datasets.save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` whose split is picked),
a folder of parquet files (a split picked by folder name or file-name prefix, as on the hub), or
parquet files. Read with ``datasets.load_from_disk`` / pyarrow: Arrow, parquet and JSON only,
nothing unpickled, no cache written, no network.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import RQError

TEXT_COLUMNS = ("text", "content", "code", "document", "body")

# split names a folder of parquet files may use (a folder or a file-name prefix, as on the hub)
KNOWN_SPLITS = ("train", "validation", "valid", "dev", "test", "eval", "heldout")
MAX_PARQUET_FILES = 4096


def load_saved(path: Path, split: str | None):
    """A ``save_to_disk`` folder as one ``Dataset`` (a ``DatasetDict``'s ``split``, default ``train``
    or its only split). Arrow files and JSON only: nothing is unpickled."""
    import datasets

    single = not (path / "dataset_dict.json").is_file()
    if not single:
        from ..errors import read_json

        splits = read_json(path / "dataset_dict.json", f"{path}: no dataset_dict.json")
        splits = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise RQError(f"{path}/dataset_dict.json: malformed (expected a list of splits)")
        if split is None:
            split = "train" if "train" in splits or len(splits) != 1 else splits[0]
        if split not in splits or not (path / split).is_dir():
            raise RQError(f"{path}: no split {split!r} (splits: {', '.join(splits[:20])}); pass --split")
        path = path / split
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # damaged folder: name it
        raise RQError(f"{path}: cannot read the saved dataset ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ds, datasets.Dataset):
        raise RQError(f"{path}: not a saved Dataset ({type(ds).__name__})")
    if single and split is not None and str(ds.split) != split:
        has = "no splits" if ds.split is None else f"split {str(ds.split)!r}"
        raise RQError(f"{path}: one saved dataset with {has}, not {split!r} (drop --split)")
    return ds


def _split_named(rel: Path) -> str | None:
    """The split a parquet file's relative path names (a folder, or a file-name prefix), if any."""
    for part in rel.parent.parts:
        if part in KNOWN_SPLITS:
            return part
    m = re.match(r"([A-Za-z]+)(?:[-._0-9]|$)", rel.stem)
    return m.group(1) if m and m.group(1) in KNOWN_SPLITS else None


def parquet_split(root: Path, split: str | None) -> list[Path]:
    """The parquet files of ``root`` (recursively, sorted) in ``split``; default ``train``, the only
    split named, or every file when none names a split."""
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise RQError(f"{root}: no .parquet files")
    if len(files) > MAX_PARQUET_FILES:
        raise RQError(f"{root}: {len(files)} parquet files, more than rq reads ({MAX_PARQUET_FILES})")
    rels = [f.relative_to(root) for f in files]
    found = sorted({s for s in map(_split_named, rels) if s})
    if split is None:
        if not found:
            return files
        if "train" not in found and len(found) > 1:
            raise RQError(f"{root}: parquet files of splits {', '.join(found)}; pass --split")
        split = "train" if "train" in found else found[0]
    chosen = [f for f, r in zip(files, rels)
              if split in r.parent.parts or re.match(rf"{re.escape(split)}(?:[-._0-9]|$)", r.stem)]
    if not chosen:
        raise RQError(f"{root}: no parquet files of split {split!r} (splits named: {', '.join(found) or 'none'})")
    return chosen


def pick_column(columns: list[str], is_text, where: str, text_field: str | None) -> str:
    if text_field is not None:
        if text_field not in columns:
            raise RQError(f"{where}: no column {text_field!r} (--text-field; columns: {', '.join(columns[:30])})")
        if not is_text(text_field):
            raise RQError(f"{where}: column {text_field!r} does not hold text (--text-field)")
        return text_field
    col = next((c for c in TEXT_COLUMNS if c in columns and is_text(c)), None)
    if col is None:
        raise RQError(f"{where}: no text column (columns: {', '.join(columns[:30])}; expected one of "
                      f"{', '.join(TEXT_COLUMNS)}, or pass --text-field)")
    return col


def texts_from_parquet(files: list[Path], where: str, text_field: str | None) -> list[str]:
    """The text column of parquet ``files`` (read with pyarrow: no cache written, nothing unpickled)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[str] = []
    col = None
    for f in files:
        try:
            schema = pq.read_schema(f)
            if col is None:
                def is_text(c):
                    t = schema.field(c).type
                    return pa.types.is_string(t) or pa.types.is_large_string(t) or \
                        getattr(pa.types, "is_string_view", lambda _: False)(t)

                col = pick_column(list(schema.names), is_text, where, text_field)
            elif col not in schema.names:
                raise RQError(f"{f}: no column {col!r} (the other parquet files of {where} have it)")
            values = pq.read_table(f, columns=[col]).column(col).to_pylist()
        except RQError:
            raise
        except Exception as e:  # corrupt parquet: name it
            raise RQError(f"{f}: cannot read parquet ({type(e).__name__}: {str(e)[:200]})") from None
        texts.extend(t for t in values if isinstance(t, str))
    return texts


def texts_from_dataset(ds, where: str, text_field: str | None = None) -> list[str]:
    def is_text(c):
        return getattr(ds.features.get(c), "dtype", None) in ("string", "large_string")

    col = pick_column(list(ds.column_names), is_text, where, text_field)
    return [t for t in ds[col] if isinstance(t, str)]

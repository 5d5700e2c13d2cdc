#!/usr/bin/env python
"""Build rq's bundled calibration sets (calibration_sets/*.jsonl) from the project's own text.

    python scripts/make_calibration_sets.py            # writes calibration_sets/{code,math,prose,docs,mix}.jsonl

Every set is text this project wrote or generated, never copied, matched to the domains of the
bundled tiny MoE (rq_tool/corpus.py):

* ``code``  -- rq's own Python source (``rq_tool/**/*.py``, ``scripts/*.py``) at build time, cut
  into chunks at top-level ``def``/``class`` boundaries;
* ``math``  -- worksheets from rq_tool.corpus.math_documents with a seed the model never saw;
* ``prose`` -- calibration_sets/sources/prose.txt, paragraphs written for rq, grouped in threes;
* ``docs``  -- calibration_sets/sources/docs.txt, man-page-style entries written for rq
  (separated by ``----`` lines), one per document;
* ``mix``   -- every 2nd code chunk and all of math, prose and docs, interleaved round-robin
  (code, math, prose, docs, code, ...); rq's default calibration set.

Output is deterministic for a given tree (the ``code`` set changes when rq's source does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from itertools import zip_longest
from pathlib import Path

from rq_tool import corpus

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "calibration_sets"
SOURCES = OUT / "sources"
CALIBRATION_MATH_SEED = 20_260_000  # != corpus.MATH_SEED: no worksheet overlaps the model's data
MATH_DOCS = 110
CODE_CHUNK_CHARS = 1000  # a chunk closes at the first top-level boundary past this size
PROSE_GROUP = 3  # paragraphs per prose document
MIX_CODE_EVERY = 2  # mix takes every 2nd code chunk: rq's source alone would be over half the tokens
MAX_FILE_BYTES = 1_500_000


def code_documents(root: Path = ROOT) -> list[str]:
    """rq's Python files, each cut at top-level boundaries into chunks of >= CODE_CHUNK_CHARS."""
    files = sorted((root / "rq_tool").rglob("*.py")) + sorted((root / "scripts").glob("*.py"))
    docs = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            continue
        # split before each top-level def/class/decorator (keeping it with what follows)
        blocks = re.split(r"\n(?=(?:def |class |async def |@)\S)", text)
        chunk = ""
        for block in blocks:
            chunk = f"{chunk}\n{block}" if chunk else block
            if len(chunk) >= CODE_CHUNK_CHARS:
                docs.append(f"# {rel}\n{chunk.strip()}")
                chunk = ""
        if chunk.strip():
            if docs and docs[-1].startswith(f"# {rel}\n") and len(chunk) < CODE_CHUNK_CHARS // 2:
                docs[-1] += "\n" + chunk.rstrip()  # a short tail joins the previous chunk
            else:
                docs.append(f"# {rel}\n{chunk.strip()}")
    return docs


def prose_documents() -> list[str]:
    paras = [p.strip() for p in (SOURCES / "prose.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return ["\n\n".join(paras[i:i + PROSE_GROUP]) for i in range(0, len(paras), PROSE_GROUP)]


def docs_documents() -> list[str]:
    raw = (SOURCES / "docs.txt").read_text(encoding="utf-8")
    return [e.strip() for e in re.split(r"^----$", raw, flags=re.M) if e.strip()]


def math_documents() -> list[str]:
    return corpus.math_documents(seed=CALIBRATION_MATH_SEED, n_docs=MATH_DOCS)


def build() -> dict[str, list[str]]:
    sets = {"code": code_documents(), "math": math_documents(), "prose": prose_documents(),
            "docs": docs_documents()}
    parts = [sets["code"][::MIX_CODE_EVERY], sets["math"], sets["prose"], sets["docs"]]
    sets["mix"] = [d for group in zip_longest(*parts) for d in group if d is not None]
    return sets


def write_jsonl(path: Path, texts: list[str]) -> None:
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    if len(data.encode()) > MAX_FILE_BYTES:
        raise SystemExit(f"{path.name}: {len(data.encode())} bytes, over the {MAX_FILE_BYTES} limit")
    path.write_text(data, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="directory for the .jsonl files (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir to report token counts with (default: the bundled tiny MoE's)")
    a = p.parse_args(argv)
    sets = build()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, texts in sets.items():
        write_jsonl(a.out / f"{name}.jsonl", texts)
    try:
        from transformers import AutoTokenizer

        from rq_tool import defaults

        tok = AutoTokenizer.from_pretrained(a.tokenizer or defaults.default_model_path())
    except Exception as e:  # the sets are written either way; token counts are a report only
        print(f"(no token counts: {type(e).__name__}: {e})")
        tok = None
    for name, texts in sets.items():
        line = f"{name:6s} {len(texts):4d} docs {sum(map(len, texts)):8d} chars"
        if tok is not None:
            lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            line += f" {sum(lens):7d} tokens (min {min(lens)}, median {sorted(lens)[len(lens) // 2]})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Build rq's bundled calibration sets (calibration_sets/*.jsonl) from the project's own text.

    python scripts/make_calibration_sets.py            # writes calibration_sets/{code,math,prose,docs,mix}.jsonl

Every set is text this project wrote or generated, never copied, matched to the domains of the
bundled tiny MoE (rq_tool/eval/corpus.py):

* ``code``  -- rq's own Python source (``rq_tool/**/*.py``, ``scripts/*.py``) at build time, cut
  into chunks at top-level ``def``/``class`` boundaries;
* ``math``  -- worksheets from rq_tool.corpus.math_documents with a seed the model never saw;
* ``prose`` -- calibration_sets/sources/prose.txt, paragraphs written for rq, grouped in threes;
* ``docs``  -- calibration_sets/sources/docs.txt, man-page-style entries written for rq
  (separated by ``----`` lines), one per document;
* ``mix``   -- rq's default calibration set: about EQUAL numbers of tokens from each of the four
  domains (counted with the tiny MoE's tokenizer, ``--tokenizer``). The smallest domain goes in
  whole; each larger one is down-sampled to the same token count by taking its documents in a
  seeded random order (MIX_SEED), skipping any document that would move its total further from
  the target. The chosen documents keep their original order within a domain and are
  interleaved by token position, so every stretch of the file holds all four domains in equal
  parts. The per-domain files always hold every document.

Output is deterministic for a given tree and tokenizer (the ``code`` set changes when rq's
source does).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from rq_tool import defaults
from rq_tool.eval import corpus

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "calibration_sets"
SOURCES = OUT / "sources"
CALIBRATION_MATH_SEED = 20_260_000  # != corpus.MATH_SEED: no worksheet overlaps the model's data
MATH_DOCS = 110
CODE_CHUNK_CHARS = 1000  # a chunk closes at the first top-level boundary past this size
PROSE_GROUP = 3  # paragraphs per prose document
DOMAINS = ("code", "math", "prose", "docs")  # the tiny MoE's training domains, in mix order
MIX_SEED = 0  # order in which a larger domain's documents are offered to the mix
MIX_MIN_TOKENS = 2 * defaults.NUM_SAMPLES * defaults.SEQ_LEN  # room for other seeds' shuffles (tests check it)
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


def load_tokenizer(path=None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or defaults.default_model_path())


def token_counts(tok, texts: list[str]) -> list[int]:
    """Tokens per document, without special tokens (packing adds one EOS per document)."""
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def sample_to_tokens(lens: list[int], target: int, seed: int) -> list[int]:
    """Indices (ascending) of documents whose token total is as close to `target` as greedy gets.

    Documents are offered in a seeded random order; one is taken when it brings the total
    closer to the target, so small documents later in the order fill the last gap."""
    order = list(range(len(lens)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if abs(total + lens[i] - target) < abs(total - target):
            chosen.append(i)
            total += lens[i]
    return sorted(chosen)


def interleave(parts: list[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """Merge (text, tokens) lists so that each part's documents are spread over the whole
    output: the next document comes from the part that has emitted the smallest fraction of its
    tokens so far (ties: the earlier part)."""
    totals = [sum(n for _, n in p) or 1 for p in parts]
    pos, done, out = [0] * len(parts), [0] * len(parts), []
    while True:
        live = [k for k in range(len(parts)) if pos[k] < len(parts[k])]
        if not live:
            return out
        k = min(live, key=lambda k: (done[k] / totals[k], k))
        out.append(parts[k][pos[k]])
        done[k] += parts[k][pos[k]][1]
        pos[k] += 1


def build(tok=None) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """All five sets, and the token count of every document of every set."""
    tok = tok if tok is not None else load_tokenizer()
    sets = {"code": code_documents(), "math": math_documents(), "prose": prose_documents(),
            "docs": docs_documents()}
    lens = {name: token_counts(tok, sets[name]) for name in DOMAINS}
    target = min(sum(lens[name]) for name in DOMAINS)  # the smallest domain goes in whole
    parts = []
    for k, name in enumerate(DOMAINS):
        keep = sample_to_tokens(lens[name], target, seed=MIX_SEED + k)
        parts.append([(sets[name][i], lens[name][i]) for i in keep])
    mix = interleave(parts)
    sets["mix"], lens["mix"] = [t for t, _ in mix], [n for _, n in mix]
    if sum(lens["mix"]) < MIX_MIN_TOKENS:
        raise SystemExit(f"mix: {sum(lens['mix'])} tokens, under {MIX_MIN_TOKENS} (twice the default "
                         f"calibration batch); the smallest domain holds only {target}: write more of it")
    return sets, lens


def write_jsonl(path: Path, texts: list[str]) -> None:
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    if len(data.encode()) > MAX_FILE_BYTES:
        raise SystemExit(f"{path.name}: {len(data.encode())} bytes, over the {MAX_FILE_BYTES} limit")
    path.write_text(data, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="directory for the .jsonl files (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir to count tokens with, for balancing mix and for the report"
                        " (default: the bundled tiny MoE's)")
    a = p.parse_args(argv)
    sets, lens = build(load_tokenizer(a.tokenizer))
    a.out.mkdir(parents=True, exist_ok=True)
    for name, texts in sets.items():
        write_jsonl(a.out / f"{name}.jsonl", texts)
    for name, texts in sets.items():
        n = lens[name]
        print(f"{name:6s} {len(texts):4d} docs {sum(map(len, texts)):8d} chars {sum(n):7d} tokens"
              f" (min {min(n)}, median {sorted(n)[len(n) // 2]})")
    mix = set(sets["mix"])
    mix_total = sum(lens["mix"])
    shares = []
    for name in DOMAINS:
        in_mix = [n for t, n in zip(sets[name], lens[name]) if t in mix]
        shares.append(f"{name} {sum(in_mix)} ({100 * sum(in_mix) / mix_total:.1f}%,"
                      f" {len(in_mix)}/{len(sets[name])} docs)")
    print("mix tokens by domain: " + ", ".join(shares))
    return 0


if __name__ == "__main__":
    sys.exit(main())

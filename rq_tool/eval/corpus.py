"""The tiny MoE's multi-domain corpus, read at run time from text already on a Debian machine.

Nothing here is shipped: every document is read (or generated) when asked for, so the repo
holds only the trained weights. Domains and where they come from:

============  =======================================================================  ===========
domain        source                                                                   licence
============  =======================================================================  ===========
code          the running Python's standard library ``.py`` files (``sysconfig``        PSF
              ``stdlib`` path), excluding tests, site-packages and generated tables
prose         the King James Bible, one document per chapter, via the ``bible``         public domain
              reader of Debian ``bible-kjv`` (data in ``bible-kjv-text``)
docs          man pages owned by Debian ``manpages`` (sections 1-8), roff stripped      various (free)
              to plain text by :func:`render_roff`
math          arithmetic / algebra worksheets from a seeded generator (this file)       rq's own
c_headers     ``/usr/include/*.h`` (top level; Debian ``libc6-dev``) — never trained    LGPL / GPL
============  =======================================================================  ===========

``c_headers`` is in :data:`UNSEEN_DOMAINS`: the model never trains on it, so calibration studies
can check that a plan made on one distribution holds on another.

Every function is deterministic on a given machine: documents come in sorted-path (or canonical
book) order, and :func:`split_documents` assigns each document to train or held-out by a hash
of its text, so the split does not depend on order or on the other documents. Contents do
depend on the installed versions (Python, ``manpages``, libc headers); eval files record a
hash of the held-out texts so a different corpus is detected rather than silently compared.
"""

from __future__ import annotations

import fractions
import functools
import gzip
import hashlib
import math
import random
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

from ..errors import RQError

DOMAINS = ("code", "prose", "docs", "math")  # trained on
UNSEEN_DOMAINS = ("c_headers",)  # held-out only, never trained on
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0
MATH_SEED = 1234  # training + held-out math; calibration sets use a different seed
MATH_DOCS = 3000

# Directory names under the stdlib that are not hand-written library code: tests, third-party
# packages, build config, generated codec tables and pydoc's rendered-help dump.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                     "encodings", "pydoc_data", "ensurepip"}
_MANPAGES_LIST = Path("/var/lib/dpkg/info/manpages.list")
_KJV_DATA = Path("/usr/lib/bible.data")
_KJV_ALL = "Gen1:1-Rev22:21"


def _missing(what: str, packages: str) -> RQError:
    return RQError(f"corpus {what} is not installed on this machine",
                   hint=f"install it with: apt-get install -y {packages}")


# ---- code -----------------------------------------------------------------------------------
def _code_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise RQError(f"corpus 'code': Python standard library not found at {root}")
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):  # machine-specific build variables
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(text)
    return docs


# ---- prose ----------------------------------------------------------------------------------
def _prose_documents() -> list[str]:
    reader = shutil.which("bible") or ("/usr/bin/bible" if Path("/usr/bin/bible").exists() else None)
    if reader is None or not _KJV_DATA.exists():
        raise _missing("'prose' (King James Bible)", "bible-kjv-text bible-kjv")
    out = subprocess.run([reader, "-l100000", _KJV_ALL], capture_output=True, text=True, check=True).stdout
    docs: list[str] = []
    title, verses = None, []
    for line in out.splitlines():
        if not line.strip():
            continue
        if line.startswith(" "):  # "  12 verse text" (one line per verse at this width)
            verses.append(line.strip().split(" ", 1)[-1])
        else:  # chapter header, e.g. "1 Kings 3"
            if title is not None:
                docs.append(title + "\n\n" + "\n".join(verses))
            title, verses = line.strip(), []
    if title is not None:
        docs.append(title + "\n\n" + "\n".join(verses))
    if len(docs) < 1000:  # 1189 chapters
        raise RQError(f"corpus 'prose': the bible reader returned {len(docs)} chapters, expected 1189")
    return docs


# ---- docs (man pages) -----------------------------------------------------------------------
_ESCAPES = {
    r"\-": "-", r"\(em": "--", r"\(en": "-", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"', r"\(rq": '"',
    r"\(oq": "'", r"\(cq": "'", r"\(bu": "*", r"\(co": "(C)", r"\(rg": "(R)", r"\(ti": "~",
    r"\(ha": "^", r"\(mu": "x", r"\(>=": ">=", r"\(<=": "<=", r"\(!=": "!=", r"\(->": "->",
    r"\(<-": "<-", r"\(+-": "+-", r"\(pc": ".", r"\(de": " degrees", r"\e": "\0", r"\\": "\0",
    r"\(rs": "\0", r"\ ": " ",
    r"\~": " ", r"\0": " ",
}  # "\0" marks a literal backslash until the stray escapes are gone
_ESCAPE_RE = re.compile("|".join(re.escape(k) for k in sorted(_ESCAPES, key=len, reverse=True)))
# fonts, named strings, zero-width and spacing escapes, any other \(xx or \[name] glyph
_DROP_RE = re.compile(r"\\f(\(..|\[[^\]]*\]|.)|\\\*(\(..|\[[^\]]*\]|.)|\\[&|^%c:)]|\\\(..|\\\[[^\]]*\]"
                      r"|\\[sh]'[^']*'|\\s[-+]?\d")
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}


def _roff_args(rest: str) -> list[str]:
    """Split a request's arguments: whitespace-separated, double quotes group (``""`` is a quote)."""
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
            for m in re.finditer(r'"((?:[^"]|"")*)"?|(\S+)', rest)]


def _inline(text: str) -> str:
    text = _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], _DROP_RE.sub("", text))
    return text.replace("\\", "").replace("\0", "\\")


def render_roff(src: str) -> str:
    """Render a man page's roff source to plain text, simply and deterministically.

    Comments and unknown requests are dropped; text lines are joined into paragraphs (kept as
    lines inside ``.nf``/``.EX`` blocks); section headings get their own lines; font macros
    (``.B``, ``.BR``...) keep their words; inline escapes become ASCII. Not a typesetter:
    tables come out as their raw cells.
    """
    src = re.sub(r"\\\n", "", src)  # continuation lines
    out: list[str] = []
    para: list[str] = []
    nofill = False

    def brk(blank: bool) -> None:
        if para:
            out.append(" ".join(para))
            para.clear()
        if blank and out and out[-1]:
            out.append("")

    def emit(text: str) -> None:
        if nofill:
            out.append(text)
        elif text.strip():
            para.append(text.strip())

    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"', '.\\#')) or line.strip() in (".", "'"):
            continue
        if not line.startswith((".", "'")):
            emit(_inline(line))
            continue
        m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
        if m is None:
            continue
        req, args = m.group(1), _roff_args(m.group(2))
        if req == "TH":
            out += [f"{args[0]}({args[1]})" if len(args) > 1 else " ".join(args), ""]
        elif req in ("SH", "SS"):
            brk(True)
            out += [_inline(" ".join(args)), ""]
        elif req in ("B", "I", "SM", "SB", "UR", "MT"):
            emit(_inline(" ".join(args)))
        elif req in _ALTERNATING:
            emit(_inline("".join(args)))
        elif req == "IP":
            brk(True)
            if args and args[0].strip():
                out.append(_inline(args[0]))
        elif req in ("PP", "P", "LP", "sp", "TP", "HP"):
            brk(True)
        elif req in ("br", "TQ"):
            brk(False)
        elif req in ("nf", "EX", "TS"):  # tables: one row per line
            brk(False)
            nofill = True
        elif req in ("fi", "EE", "TE"):
            nofill = False
        # every other request (.RS, .in, .ft, .de, .ad, .TS ...) is layout: dropped
    brk(False)
    text = "\n".join(l.rstrip() for l in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _manpage_paths() -> list[Path]:
    if not _MANPAGES_LIST.exists():
        raise _missing("'docs' (man pages)", "manpages")
    paths = []
    for line in _MANPAGES_LIST.read_text().splitlines():
        p = Path(line)
        if re.fullmatch(r"/usr/share/man/man\d/[^/]+\.gz", line) and p.is_file() and not p.is_symlink():
            paths.append(p)
    if not paths:
        raise _missing("'docs' (man pages)", "manpages")
    return sorted(paths)


def _docs_documents() -> list[str]:
    docs = []
    for path in _manpage_paths():
        src = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if src.lstrip().startswith(".so "):  # a redirect to another page
            continue
        text = render_roff(src)
        if len(text) > 200:
            docs.append(text)
    return docs


# ---- math -----------------------------------------------------------------------------------
def _signed(v: int) -> str:
    return f"+ {v}" if v >= 0 else f"- {-v}"


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(9)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        hi, lo = max(a, b) + rng.randint(0, 900), min(a, b)
        return f"{hi} - {lo} = {hi - lo}"
    if kind == 2:
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        q, r = divmod(a * rng.randint(2, 30) + rng.randint(0, a - 1), a)
        n = q * a + r
        return f"{n} / {a} = {q} remainder {r}" if r else f"{n} / {a} = {q}"
    if kind == 4:  # linear equation, worked
        x, m, c = rng.randint(-20, 20), rng.randint(2, 12), rng.randint(-50, 50)
        rhs = m * x + c
        sign = "+" if c >= 0 else "-"
        return (f"Solve {m}x {sign} {abs(c)} = {rhs}. "
                f"{'Subtract' if c >= 0 else 'Add'} {abs(c)} on both sides: {m}x = {rhs - c}. "
                f"Divide by {m}: x = {x}.")
    if kind == 5:
        return f"gcd({a}, {b}) = {math.gcd(a, b)} and lcm({a}, {b}) = {a * b // math.gcd(a, b)}"
    if kind == 6:
        e = rng.randint(2, 5)
        base = rng.randint(2, 12)
        return f"{base}^{e} = {base ** e}"
    if kind == 7:  # expand a product of binomials
        p, q = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"(x {_signed(p)})(x {_signed(q)}) = x^2 {_signed(p + q)}x {_signed(p * q)}"
    n1, d1, n2, d2 = rng.randint(1, 9), rng.randint(2, 9), rng.randint(1, 9), rng.randint(2, 9)
    f = fractions.Fraction(n1, d1) + fractions.Fraction(n2, d2)
    return f"{n1}/{d1} + {n2}/{d2} = {f.numerator}/{f.denominator}" if f.denominator != 1 else \
        f"{n1}/{d1} + {n2}/{d2} = {f.numerator}"


def math_documents(seed: int = MATH_SEED, n_docs: int = MATH_DOCS) -> list[str]:
    """``n_docs`` generated worksheets of 12-40 numbered problems; a pure function of ``seed``."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        lines = [f"Exercise set {i + 1}."]
        for j in range(rng.randint(12, 40)):
            lines.append(f"{j + 1}. {_math_problem(rng)}")
        docs.append("\n".join(lines))
    return docs


# ---- c_headers (unseen) ---------------------------------------------------------------------
def _c_header_documents() -> list[str]:
    paths = sorted(p for p in Path("/usr/include").glob("*.h") if p.is_file())
    if not paths:
        raise _missing("'c_headers' (/usr/include/*.h)", "libc6-dev")
    docs = [p.read_text(encoding="utf-8", errors="replace").strip() for p in paths]
    return [d for d in docs if d]


# ---- API ------------------------------------------------------------------------------------
_SOURCES = {
    "code": _code_documents,
    "prose": _prose_documents,
    "docs": _docs_documents,
    "math": math_documents,
    "c_headers": _c_header_documents,
}


@functools.lru_cache(maxsize=None)
def _cached_documents(domain: str) -> tuple[str, ...]:
    return tuple(_SOURCES[domain]())


# Debian packages each domain reads (none: always available).
DOMAIN_PACKAGES: dict[str, tuple[str, ...]] = {
    "code": (), "prose": ("bible-kjv-text", "bible-kjv"), "docs": ("manpages",), "math": (),
    "c_headers": ("libc6-dev",),
}


def missing_packages(domain: str) -> tuple[str, ...]:
    """The Debian packages ``domain`` needs that this machine lacks (``()`` when it is readable)."""
    if domain not in _SOURCES:
        raise RQError(f"unknown corpus domain {domain!r} (known: {', '.join(_SOURCES)})")
    present = {
        "prose": lambda: _KJV_DATA.exists() and (shutil.which("bible") or Path("/usr/bin/bible").exists()),
        "docs": _MANPAGES_LIST.exists,
        "c_headers": lambda: any(Path("/usr/include").glob("*.h")),
    }.get(domain)
    return () if present is None or present() else DOMAIN_PACKAGES[domain]


def domain_documents(domain: str) -> list[str]:
    """All documents of ``domain`` in a deterministic order (raises RQError if not installed)."""
    if domain not in _SOURCES:
        raise RQError(f"unknown corpus domain {domain!r} (known: {', '.join(_SOURCES)})")
    return list(_cached_documents(domain))


def _unit_hash(doc: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}\0{doc}".encode("utf-8", errors="replace")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(docs: list[str], heldout_fraction: float = HELDOUT_FRACTION,
                    seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """``(train, heldout)``: a document is held out iff hash(seed, text) < ``heldout_fraction``.

    Order within each part follows ``docs``; identical documents always land on the same side.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train, heldout = [], []
    for d in docs:
        (heldout if _unit_hash(d, seed) < heldout_fraction else train).append(d)
    return train, heldout


def train_texts(domain: str) -> list[str]:
    """The training part of a training domain."""
    if domain not in DOMAINS:
        raise RQError(f"{domain!r} is not a training domain (training domains: {', '.join(DOMAINS)})")
    return split_documents(domain_documents(domain))[0]


def heldout_texts(domain: str, n_docs: int | None = None) -> list[str]:
    """Held-out documents of ``domain`` (all of an unseen domain's), first ``n_docs`` if given."""
    docs = domain_documents(domain)
    held = docs if domain in UNSEEN_DOMAINS else split_documents(docs)[1]
    return held if n_docs is None else held[:n_docs]

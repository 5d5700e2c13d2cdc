"""Evaluation data: per-domain packed token windows, and whether they are held out.

With ``--dataset``: one domain per spec (a local file or folder, or anything
``rq_tool.calibrate.load_texts`` reads), refused when it is the calibration set itself.

Without, the data the plan was made for, read from the profile (``calibration.source``):

- a bundled set (``mix``, ``code``...): the bundled corpus's held-out split (``rq_tool.eval.corpus``)
  of the set's domains plus every unseen domain (never trained on, reported apart) -- the same
  domains, none of the set's texts (where the corpus cannot be read, as for any other source);
- any other source (a file, a dataset folder, a datasets name): its texts that calibration did
  not use (``rq_tool.calibrate.data.split_used``) -- held out; when too few are left for one
  window (or the profile does not say which were used), the calibration texts themselves,
  marked in-sample (``held_out = False``) so no number is passed off as held-out.
- no profile at all: the bundled corpus's held-out split, said to be of unknown relation to the plan.

Texts are packed in order by ``rq_tool.eval.perplexity.pack_tokens`` into ``[N, S]`` windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import defaults
from ..calibrate.data import texts_sha256 as _sha
from ..errors import RQError
from .perplexity import pack_tokens



@dataclass(frozen=True)
class HeldOut:
    """``domains[name] = input_ids [N, S]``; ``unseen`` names domains the model never trained on;
    ``held_out``: False when the windows are the calibration texts themselves (in-sample numbers)."""

    source: str
    domains: dict[str, torch.Tensor]
    sha256: dict[str, str]  # of each domain's raw texts, in order
    unseen: tuple[str, ...] = field(default=())
    held_out: bool = True
    note: str = ""  # how the data relates to the calibration, for people

    @property
    def label(self) -> str:
        return "held-out" if self.held_out else "in-sample"

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains if d not in self.unseen)

    def describe(self) -> dict:
        return {"source": self.source, "held_out": self.held_out, "data": self.label, "note": self.note,
                "unseen": list(self.unseen),
                "domains": {d: {"sequences": int(x.shape[0]), "seq_len": int(x.shape[1]), "sha256": self.sha256[d]}
                            for d, x in self.domains.items()}}


def _pack(tokenizer, texts: list[str], name: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    try:
        return pack_tokens(tokenizer, texts, seq_len, max_tokens)
    except ValueError as e:
        raise RQError(f"held-out data {name!r}: {e}") from None


def load_heldout(tokenizer, datasets=(), *, seq_len: int = defaults.HELDOUT_SEQ_LEN, max_tokens: int = defaults.HELDOUT_TOKENS,
                 calibration_sha256: str | None = None, calibration: dict | None = None, config: str | None = None,
                 split: str | None = None, text_field: str | None = None) -> HeldOut:
    """Resolve evaluation data (see module docstring).

    ``calibration``: the profile's ``calibration`` block (the default data comes from it);
    ``calibration_sha256``: its hash (default: ``calibration["sha256"]``); a dataset with the same
    texts is refused (evaluating on the calibration data would flatter the plan).
    ``config`` / ``split`` / ``text_field``: applied to every dataset; with no dataset, to the
    calibration source (e.g. ``split="validation"`` scores that split of the calibration folder).
    """
    if max_tokens < seq_len:
        raise RQError(f"held-out size {max_tokens} tokens is below one window of {seq_len}")
    if calibration_sha256 is None and calibration is not None:
        calibration_sha256 = calibration.get("sha256")
    src = (calibration or {}).get("source") if isinstance((calibration or {}).get("source"), dict) else None
    if not datasets and (config or split or text_field):
        if src is None:
            raise RQError("--dataset-config / --split / --text-field without --dataset need a profile that records "
                          "its calibration source", hint="pass --dataset")
        datasets = (src.get("path") or src["spec"],)
        config, split = config or src.get("config"), split or src.get("split")
        text_field = text_field or src.get("text_field")
    if datasets:
        return _given(tokenizer, tuple(datasets), seq_len, max_tokens, calibration_sha256, config, split, text_field)
    if calibration is None:
        return _corpus(tokenizer, seq_len, max_tokens, None,
                       "the bundled corpus's held-out split (no profile given: how it relates to the plan's "
                       "calibration data is unknown)")
    return _from_calibration(tokenizer, calibration, src, seq_len, max_tokens)


def _given(tokenizer, datasets, seq_len, max_tokens, calibration_sha256, config, split, text_field) -> HeldOut:
    from ..calibrate import load_texts

    domains, shas = {}, {}
    for spec in datasets:
        name, texts = load_texts(spec, config=config, split=split, text_field=text_field)
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise RQError(f"held-out data {spec!r} has no non-empty texts")
        sha = _sha(texts)
        if calibration_sha256 is not None and sha == calibration_sha256:
            raise RQError(f"held-out data {spec!r} is the calibration set the plan was made on",
                          hint="evaluate on data the profile never saw")
        if name in domains:
            raise RQError(f"held-out data named {name!r} given twice")
        domains[name], shas[name] = _pack(tokenizer, texts, name, seq_len, max_tokens), sha
    return HeldOut(", ".join(datasets), domains, shas, note="given with --dataset (not the calibration texts)")


def _corpus(tokenizer, seq_len, max_tokens, only: str | None, note: str) -> HeldOut:
    from . import corpus

    domains, shas = {}, {}
    for d in (*((only,) if only else corpus.DOMAINS), *corpus.UNSEEN_DOMAINS):
        try:
            texts = corpus.heldout_texts(d)
        except RQError as e:
            raise RQError(f"default held-out data unavailable: {e}", hint="or pass --dataset FILE") from None
        domains[d], shas[d] = _pack(tokenizer, texts, d, seq_len, max_tokens), _sha(texts)
    return HeldOut("rq_tool.eval.corpus held-out split", domains, shas, tuple(corpus.UNSEEN_DOMAINS), note=note)


def _from_calibration(tokenizer, cal: dict, src: dict | None, seq_len: int, max_tokens: int) -> HeldOut:
    """The calibration source's unused texts (held out), else its used ones (in-sample)."""
    from . import corpus
    from ..calibrate.data import load_texts, source_kind, split_used

    name = str(cal.get("dataset"))
    spec = (src.get("path") or src.get("spec")) if src else name
    kind = src.get("kind") if src else source_kind(spec)
    if kind == "bundled":
        only = spec if spec in corpus.DOMAINS else None
        try:
            return _corpus(tokenizer, seq_len, max_tokens, only,
                           f"the bundled corpus's held-out split for the domains of the bundled calibration set "
                           f"{spec!r} (none of its texts)")
        except RQError:  # the corpus's Debian packages are missing here: the set's own unused texts
            pass
    hint = "pass --dataset with held-out data like the calibration's"
    if src is None and not Path(spec).exists():
        raise RQError(f"the profile does not record where its calibration data {name!r} is (written before rq "
                      "recorded it), so rq eval has no default data", hint=hint)
    opts = {k: src.get(k) for k in ("config", "split", "text_field")} if src else {}
    try:
        _, texts = load_texts(spec, **opts)
    except RQError as e:
        raise RQError(f"the calibration data the profile records cannot be read here: {e}", hint=hint) from None
    texts = [t for t in texts if t and t.strip()]
    if _sha(texts) != cal.get("sha256"):
        raise RQError(f"calibration data {spec!r} changed since calibration (its texts' sha256 differs from the "
                      "profile's), so rq cannot tell which of its texts are held out", hint=hint)
    used_n, seed = cal.get("texts_used"), cal.get("seed")
    if isinstance(used_n, int) and isinstance(seed, int) and 0 < used_n <= len(texts):
        used, unused = split_used(texts, seed, used_n)
        if unused:
            try:
                ids = pack_tokens(tokenizer, unused, seq_len, max_tokens)
            except ValueError:
                why = f"the {len(unused)} texts calibration did not use hold less than one {seq_len}-token window"
            else:
                short = "" if ids.numel() >= max_tokens else f"; only {ids.numel()} tokens, fewer than --max-tokens"
                return HeldOut(f"{spec} (texts calibration did not use)", {name: ids}, {name: _sha(unused)},
                               note=f"the {len(unused)} of {len(texts)} texts of the calibration data that "
                                    f"calibration did not use{short}")
        else:
            why = f"calibration used all {len(texts)} texts"
    else:
        used, why = texts, "the profile does not record which texts calibration used"
    return HeldOut(f"{spec} (the calibration texts)", {name: _pack(tokenizer, used, name, seq_len, max_tokens)},
                   {name: _sha(used)}, held_out=False,
                   note=f"IN-SAMPLE: the calibration texts themselves ({why}); these numbers are not held-out "
                        "-- pass --dataset for held-out data")

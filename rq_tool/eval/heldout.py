"""Held-out evaluation data: per-domain packed token windows, never the calibration set.

Default: the bundled model's corpus (``rq_tool.corpus``), one domain per training domain (its
held-out split) plus every unseen domain (never trained on, reported apart). Otherwise one
domain per ``--dataset`` spec (a local file or anything ``rq_tool.calibrate.load_texts`` reads).
Texts are packed in order by ``rq_tool.eval.perplexity.pack_tokens`` into ``[N, S]`` windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import defaults
from ..calibrate.data import texts_sha256 as _sha
from ..errors import RQError
from .perplexity import pack_tokens



@dataclass(frozen=True)
class HeldOut:
    """``domains[name] = input_ids [N, S]``; ``unseen`` names domains the model never trained on."""

    source: str
    domains: dict[str, torch.Tensor]
    sha256: dict[str, str]  # of each domain's raw texts, in order
    unseen: tuple[str, ...] = field(default=())

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains if d not in self.unseen)

    def describe(self) -> dict:
        return {"source": self.source, "unseen": list(self.unseen),
                "domains": {d: {"sequences": int(x.shape[0]), "seq_len": int(x.shape[1]), "sha256": self.sha256[d]}
                            for d, x in self.domains.items()}}


def _pack(tokenizer, texts: list[str], name: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    try:
        return pack_tokens(tokenizer, texts, seq_len, max_tokens)
    except ValueError as e:
        raise RQError(f"held-out data {name!r}: {e}") from None


def load_heldout(tokenizer, datasets=(), *, seq_len: int = defaults.HELDOUT_SEQ_LEN, max_tokens: int = defaults.HELDOUT_TOKENS,
                 calibration_sha256: str | None = None) -> HeldOut:
    """Resolve held-out data (see module docstring).

    ``calibration_sha256``: the profile's calibration-set hash; a dataset with the same texts is
    refused (evaluating on the calibration data would flatter the plan).
    """
    if max_tokens < seq_len:
        raise RQError(f"held-out size {max_tokens} tokens is below one window of {seq_len}")
    domains, shas = {}, {}
    if datasets:
        from ..calibrate import load_texts

        for spec in datasets:
            name, texts = load_texts(spec)
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
        return HeldOut(", ".join(datasets), domains, shas)
    from .. import corpus

    for d in (*corpus.DOMAINS, *corpus.UNSEEN_DOMAINS):
        try:
            texts = corpus.heldout_texts(d)
        except RQError as e:
            raise RQError(f"default held-out data unavailable: {e}", hint="or pass --dataset FILE") from None
        domains[d], shas[d] = _pack(tokenizer, texts, d, seq_len, max_tokens), _sha(texts)
    return HeldOut("rq_tool.corpus held-out split", domains, shas, tuple(corpus.UNSEEN_DOMAINS))

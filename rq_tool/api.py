"""The Python API: one plain function per stage, each importing its stage only when called.

``rq_tool.calibrate`` / ``rq_tool.rewrite`` are these functions; the stage packages of the same
names stay importable beside them (``from rq_tool.calibrate import Profile``,
``import rq_tool.rewrite.writer``), as llm-compressor exposes ``model_free_ptq`` beside its
pipelines. Arguments and defaults are the stage functions' own (linked in each docstring).
"""

from __future__ import annotations


def calibrate(*args, **kwargs):
    """Profile a model on calibration data -> ``Profile`` (``rq_tool.calibrate.run.calibrate``)."""
    from .calibrate.run import calibrate as run

    return run(*args, **kwargs)


def rewrite(*args, **kwargs):
    """Plan and write a rewritten checkpoint -> ``RewriteResult`` (``rq_tool.rewrite.writer.rewrite``)."""
    from .rewrite.writer import rewrite as run

    return run(*args, **kwargs)


def verify(out) -> list[str]:
    """Problems found in a rewritten model directory, ``[]`` if none (``rq_tool.rewrite.verify.verify``)."""
    from .rewrite.verify import verify as run

    return run(out)


def load(*args, **kwargs):
    """A rewritten model directory as a transformers CausalLM with RQ experts (``rq_tool.runtime.hf.load``)."""
    from .runtime.hf import load as run

    return run(*args, **kwargs)

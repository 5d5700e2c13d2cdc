"""Streaming rewrite: safetensors in, rewritten model directory out (``verify`` checks one).

Exports load lazily (``rq_tool._lazy``); ``rq_tool.rewrite`` itself is the API function
(``rq_tool.api``). The verify function is ``rq_tool.verify`` (or ``rq_tool.rewrite.verify.verify``:
the name ``verify`` in this package is its module).
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"RewriteResult": ".writer", "rewrite": ".writer"})
__all__ = ["RewriteResult", "rewrite"]

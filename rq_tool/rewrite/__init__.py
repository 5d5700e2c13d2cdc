"""Streaming rewrite: safetensors in, rewritten model directory out (plus verify)."""

from .verify import verify
from .writer import RewriteResult, rewrite

__all__ = ["RewriteResult", "rewrite", "verify"]

from .._callable import make_callable  # noqa: E402

make_callable(__name__, rewrite)  # rq_tool.rewrite(...) is the API, the package stays importable

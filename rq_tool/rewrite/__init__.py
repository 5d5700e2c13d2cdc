"""Streaming rewrite: safetensors in, rewritten model directory out (plus verify)."""

from .verify import verify
from .writer import RewriteResult, rewrite

__all__ = ["RewriteResult", "rewrite", "verify"]

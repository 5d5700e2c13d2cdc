"""Reading a source checkpoint: safetensors shards only, validated before anything is written.

The reader lives in ``rq_tool.checkpoint`` (shared with the runtime's integrity check); these
names are kept here for the rewrite's callers.
"""

from __future__ import annotations

from ..checkpoint import INDEX_FILE, SafetensorsCheckpoint, TensorInfo

__all__ = ["INDEX_FILE", "SafetensorsCheckpoint", "TensorInfo"]

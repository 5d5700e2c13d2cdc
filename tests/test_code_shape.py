"""Code shape: import graph facts that keep the package light and unambiguous."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _local_imports(path: Path) -> set[str]:
    """Names of the sibling modules a kernels/ file imports (``from .x import`` / ``from . import x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module] if node.module else [a.name for a in node.names])
    return out


@pytest.mark.parametrize("kernel,wrapper", [("dispatch_triton", "dispatch"), ("experts_triton", "experts")])
def test_kernels_import_no_cycles(kernel, wrapper):
    """A Triton module and its torch wrapper share types.py and never import each other back."""
    assert wrapper not in _local_imports(REPO / "kernels" / f"{kernel}.py")
    assert {"dispatch", "dispatch_triton", "experts", "experts_triton"}.isdisjoint(
        _local_imports(REPO / "kernels" / "types.py"))


def test_repo_kernels_folder_is_not_top_level_kernels():
    """Only ``rq_tool.kernels`` exists; our source folder never passes for PyPI's ``kernels``."""
    import transformers  # noqa: F401  (probes for the ``kernels`` package)

    spec = importlib.util.find_spec("kernels")
    assert spec is None or not str(spec.origin).startswith(str(REPO / "kernels"))
    mod = sys.modules.get("kernels")
    assert mod is None or not str(getattr(mod, "__file__", "")).startswith(str(REPO / "kernels"))
    import rq_tool.kernels

    assert Path(rq_tool.kernels.__file__).resolve().parent == REPO / "kernels"

"""Which implementation runs: Triton kernels or their pure-torch references.

Chosen per call from ``impl`` (``"triton"`` / ``"torch"`` / ``None``), else from the ``RQ_KERNEL``
environment variable (``triton`` / ``torch`` / ``auto``, default ``auto``). ``auto`` picks Triton
for CUDA tensors when triton is importable, torch otherwise. Triton on CPU tensors runs only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported): slow, for tests.
Triton is imported lazily, so ``rq_tool.kernels`` imports without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from rq_tool.errors import RQError

IMPLS = ("triton", "torch", "auto")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_import_failed(e: ImportError) -> RQError:
    """The error of a Triton kernel module that does not import (triton found but broken, or a
    bundled model directory running without it). Triton kernel imports sit in ``try`` blocks:
    the model-directory bundle (``rq_tool.runtime.bundle``) treats them as optional."""
    return RQError(f"the Triton kernels cannot be imported ({e})", hint="use RQ_KERNEL=torch")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_usable() -> bool:
    """TRITON_INTERPRET=1 is set and was set before triton was imported (else triton's own jit'd
    helpers such as ``tl.zeros`` were compiled for a GPU and the interpreter fails inside them)."""
    if not interpreter_enabled():
        return False
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False

    return isinstance(std.zeros, InterpretedFunction)


def resolve_impl(impl: str | None, is_cuda: bool) -> str:
    """``"triton"`` or ``"torch"`` for tensors on CUDA (``is_cuda``) or CPU; raises RQError if impossible."""
    choice = impl if impl is not None else os.environ.get("RQ_KERNEL", "auto").strip().lower() or "auto"
    if choice not in IMPLS:
        source = "impl" if impl is not None else "RQ_KERNEL"
        raise RQError(f"{source}={choice!r} is not a kernel implementation; choose one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "triton" if is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RQError("the Triton kernels were requested but triton is not installed",
                          hint="pip install 'rq-tool[kernels]' or use RQ_KERNEL=torch")
        if not is_cuda and not interpreter_enabled():
            raise RQError("the Triton kernels need CUDA tensors; on CPU they run only in Triton's interpreter",
                          hint="set TRITON_INTERPRET=1 before importing rq_tool, or use RQ_KERNEL=torch")
        if not is_cuda and not interpreter_usable():
            raise RQError("TRITON_INTERPRET=1 was set after triton had been imported (bitsandbytes and transformers "
                          "import it), so Triton's interpreter cannot run",
                          hint="set TRITON_INTERPRET=1 in the environment before the process imports anything")
    return choice

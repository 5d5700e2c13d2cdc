"""Lazy package exports: ``from rq_tool.plan import make_plan`` imports ``plan.strategies`` only then.

A package ``__init__`` declares ``__getattr__, __dir__ = lazy_exports(__name__, {name: ".module"})``
and imports nothing else at module level, so importing one submodule (say
``rq_tool.runtime.routing_map``) never drags in its siblings (``runtime.hf`` and transformers).
An exported name must differ from every submodule's name: Python binds a submodule to its
package attribute when it is first imported, which would shadow a lazy export of the same name.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``exports[name]`` is the relative module holding ``name``."""

    def __getattr__(name: str):
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def __dir__():
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__

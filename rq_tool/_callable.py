"""Make a stage package callable, so ``rq_tool.calibrate(...)`` works although
``rq_tool.calibrate`` is also a subpackage (importing it rebinds the attribute to the module)."""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, func) -> None:
    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return func(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule

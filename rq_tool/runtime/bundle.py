"""The self-contained runtime a rewritten model directory carries (its transformers remote code).

Transformers' remote-code loader copies the entry file (``modeling_rq.py``) and, recursively,
every file it imports as ``from .name import ...`` from the same directory; nothing else. So at
rewrite time rq bundles its own runtime: starting from ``rq_tool.runtime.hf`` it walks the
import graph of rq's modules (every ``import`` statement, function-level ones included), copies
each module reached as one flat file ``rq_<dotted path>.py`` (``rq_tool.kernels.slots`` ->
``rq_kernels_slots.py``) and rewrites rq's imports to those flat names. The file set is derived,
never listed by hand, so a new runtime module is bundled as soon as the runtime imports it.

Rules, checked on every rewrite (a violation is an RQError and nothing is written):
- a module reached through required imports may import only torch, transformers, safetensors and
  the standard library; imports inside a ``try:`` block are optional (transformers' own check
  skips them too), and rq modules reached only that way (the Triton kernels) are bundled but may
  need more (triton), used where present;
- no dynamic imports (``importlib.import_module``, ``__import__``) in bundled modules; no
  ``import rq_tool...`` without ``as``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, defaults
from ..errors import RQError

ENTRY = "rq_tool.runtime.hf"
ENTRY_NAMES = ("RQConfig", "RQForCausalLM")
ALLOWED = frozenset({"torch", "transformers", "safetensors"}) | frozenset(sys.stdlib_module_names)
_PKG = "rq_tool"


def flat_name(module: str) -> str:
    """``rq_tool.kernels.slots`` -> ``rq_kernels_slots`` (``rq_tool`` itself -> ``rq_init``)."""
    parts = module.split(".")[1:]
    return "rq_" + ("_".join(parts) if parts else "init")


def _origin(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@dataclass
class _Module:
    name: str
    path: Path
    tree: ast.Module
    required: bool = False
    imports: list = field(default_factory=list)  # (node, in_try, target, [(alias, is_module)])


def _package(m: _Module) -> str:
    return m.name if m.path.name == "__init__.py" else m.name.rpartition(".")[0]


def _resolve(m: _Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package(m).split(".")
    if node.level - 1 >= len(base):
        raise RQError(f"{m.path}: relative import beyond the {_PKG} package")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=None)
def lazy_exports_of(package: str) -> dict[str, str]:
    """``{name: absolute module}`` a package ``__init__`` declares with ``rq_tool._lazy.lazy_exports``
    (read from its source, nothing imported); ``{}`` for a package without lazy exports."""
    path = _origin(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        call = getattr(node, "value", None)
        if (isinstance(node, ast.Assign) and isinstance(call, ast.Call) and getattr(call.func, "id", "") == "lazy_exports"
                and len(call.args) == 2 and isinstance(call.args[1], ast.Dict)):
            try:
                table = ast.literal_eval(call.args[1])
            except ValueError:
                raise RQError(f"{path}:{node.lineno}: lazy_exports needs a literal {{name: module}} table") from None
            return {name: importlib.util.resolve_name(mod, package) for name, mod in table.items()}
    return {}


def _source(target: str, name: str) -> tuple[bool, str]:
    """Where ``from target import name`` comes from: ``(True, module)`` when ``name`` is a submodule,
    else ``(False, module defining it)``; a lazy package's export resolves to its submodule, so the
    bundle imports it from there and never needs the package's lazy ``__init__``."""
    if _origin(f"{target}.{name}") is not None:
        return True, f"{target}.{name}"
    return False, lazy_exports_of(target).get(name, target)


def _scan(m: _Module) -> None:
    def visit(node, in_try):
        if isinstance(node, ast.Try):
            for child in node.body:
                visit(child, True)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, in_try)
            return
        if isinstance(node, ast.ImportFrom):
            target = _resolve(m, node)
            if target.split(".")[0] == _PKG:
                aliases = [(a, _source(target, a.name)) for a in node.names]
                m.imports.append((node, in_try, target, aliases))
            elif node.module != "__future__":
                m.imports.append((node, in_try, target, None))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == _PKG and a.asname is None:
                    raise RQError(f"{m.path}:{node.lineno}: 'import {a.name}' cannot be bundled; use 'from ... import'")
                m.imports.append((node, in_try, a.name, [(a, (True, a.name))] if a.name.split(".")[0] == _PKG else None))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                raise RQError(f"{m.path}:{node.lineno}: a dynamic import cannot be bundled into a model directory")
        for child in ast.iter_child_nodes(node):
            visit(child, in_try)

    visit(m.tree, False)


def runtime_modules(entry: str = ENTRY) -> dict[str, _Module]:
    """Every rq module the runtime entry reaches, with ``required`` set for those reached through
    imports outside ``try`` blocks. Raises RQError if a required one imports outside ``ALLOWED``."""
    mods: dict[str, _Module] = {}
    todo = [(entry, True)]
    while todo:
        name, required = todo.pop()
        if name in mods and (mods[name].required or not required):
            continue  # seen already, and this edge would not make it required
        if name not in mods:
            path = _origin(name)
            if path is None:
                raise RQError(f"the rq runtime imports {name!r}, which is not a Python module of {_PKG}")
            mods[name] = _Module(name, path, ast.parse(path.read_text(), filename=str(path)))
            _scan(mods[name])
        m = mods[name]
        m.required = required
        for node, in_try, target, aliases in m.imports:
            if aliases is None:
                continue
            edge = m.required and not in_try
            todo.extend((module, edge) for _, (_, module) in aliases)
    bad = sorted({(m.name, target.split(".")[0]) for m in mods.values() if m.required
                  for _, in_try, target, aliases in m.imports
                  if aliases is None and not in_try and target.split(".")[0] not in ALLOWED})
    if bad:
        raise RQError("the rq runtime cannot be bundled into the model directory: "
                      + "; ".join(f"{mod} imports {pkg}" for mod, pkg in bad),
                      hint="the runtime may import only torch, transformers, safetensors and the standard library "
                           "(optional imports go inside try/except ImportError)")
    return mods


def _import_text(node, aliases) -> tuple[str, list[str]]:
    """One-line flat replacement of an import of rq modules/names, and the flat modules it reads."""
    parts, names, used = [], {}, []
    for a, (is_mod, module) in aliases:
        used.append(flat_name(module))
        if is_mod:
            parts.append(f"from . import {flat_name(module)} as {a.asname or a.name}")
        else:
            names.setdefault(module, []).append(a.name if a.asname is None else f"{a.name} as {a.asname}")
    parts[:0] = [f"from .{flat_name(module)} import " + ", ".join(ns) for module, ns in names.items()]
    return "; ".join(parts), used


def flatten(m: _Module) -> str:
    """The module's source with rq imports rewritten to flat sibling files (line numbers kept).

    Transformers' remote-code copier finds sibling files by ``from .name import`` at the start of a
    line, one per line; a rewritten import may read several flat modules on one line (a lazy
    package's names come from their submodules), so a footer that never runs (``if False:``; optional
    modules such as the Triton kernels must not be imported by it) names each on its own line.
    """
    lines = m.path.read_text().splitlines(keepends=True)
    deps: list[str] = []
    for node, _, target, aliases in sorted(m.imports, key=lambda t: -t[0].lineno):
        if aliases is None:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        head, tail = lines[first][: node.col_offset], lines[last][node.end_col_offset:]
        if head.strip() or tail.strip().split("#")[0].strip(" ;"):
            raise RQError(f"{m.path}:{node.lineno}: an rq import sharing its line with other code cannot be bundled")
        text, used = _import_text(node, aliases)
        deps.extend(used)
        lines[first:last + 1] = [head + text + "\n" + "\n" * (last - first)]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    rel = m.path.name if m.name.count(".") == 0 else "/".join(m.name.split(".")[1:]) + ".py"
    header = f"# rq-tool {__version__} runtime, bundled from {m.name} ({rel}); generated, do not edit.\n"
    if not deps:
        return header + "".join(lines)
    footer = "".join(f"    from .{d} import __name__ as _  # noqa: F401\n" for d in sorted(set(deps)))
    return (header + "".join(lines) + "\n\nif False:  # never runs: names every rq module this one reads, one per line, "
            "for transformers' remote-code copier\n" + footer)


def bundle_files(entry: str = ENTRY) -> dict[str, str]:
    """``{file name: source}`` of the self-contained runtime: the entry ``modeling_rq.py`` plus
    one flat file per rq module the runtime reaches."""
    mods = runtime_modules(entry)
    files = {f"{flat_name(name)}.py": flatten(m) for name, m in sorted(mods.items())}
    names = ", ".join(ENTRY_NAMES)
    files[defaults.REMOTE_CODE_FILE] = f'''"""rq runtime entry point (written by rq-tool {__version__}): self-contained, needs only torch and
transformers.

The rq_*.py files beside it are rq-tool's runtime modules, bundled at rewrite time. Where the rq-tool
that wrote this directory is installed, its own modules are used instead (same code), so a process
that also calls rq_tool (expert-parallel counters, rq_tool.load) sees one RQExperts class.
"""

try:
    from rq_tool import __version__ as _installed

    if _installed != {__version__!r}:
        raise ImportError(f"rq-tool {{_installed}} is installed; this directory was written by {__version__}")
    from {entry} import {names}  # noqa: F401
except ImportError:
    from .{flat_name(entry)} import {names}  # noqa: F401
'''
    return files


def write_bundle(out_dir: Path, entry: str = ENTRY) -> list[str]:
    """Write the runtime files into ``out_dir``; returns their names (sorted)."""
    files = bundle_files(entry)
    for name, text in files.items():
        (Path(out_dir) / name).write_text(text)
    return sorted(files)

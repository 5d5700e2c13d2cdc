"""Code shape: import graph facts that keep the package light and unambiguous."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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


def test_api_names_are_plain_functions():
    """``rq_tool.calibrate`` etc. are plain functions, whatever stage modules were imported before."""
    import inspect

    import rq_tool
    import rq_tool.calibrate.run  # noqa: F401  (a stage module, imported by its package path)
    import rq_tool.rewrite.writer  # noqa: F401
    from rq_tool import calibrate, load, rewrite, verify
    from rq_tool.calibrate import Profile  # the stage packages stay importable beside them
    from rq_tool.rewrite import RewriteResult

    for fn in (calibrate, rewrite, load, verify):
        assert inspect.isfunction(fn) and fn.__module__ == "rq_tool.api"
    assert rq_tool.calibrate is calibrate and rq_tool.rewrite is rewrite
    assert Profile.__module__ == "rq_tool.calibrate.profile" and RewriteResult.__module__ == "rq_tool.rewrite.writer"
    assert not (REPO / "rq_tool" / "_callable.py").exists()


def _modules_after(code: str) -> set[str]:
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=300, cwd=REPO.parent)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(mods: set[str], *packages: str) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in packages))


def test_runtime_import_is_light():
    """What transformers loads (``trust_remote_code``) pulls no CLI, datasets or offline stage."""
    mods = _modules_after("import rq_tool.runtime.hf")
    assert _loaded(mods, "click", "datasets", "matplotlib", "bitsandbytes") == []
    # the stage packages' lazy __init__s are loaded (rq_tool binds its API names over them), nothing in them
    assert _loaded(mods, "rq_tool.calibrate", "rq_tool.rewrite") == ["rq_tool.calibrate", "rq_tool.rewrite"]
    assert _loaded(mods, "rq_tool.eval", "rq_tool.export", "rq_tool.plan", "rq_tool.cli", "rq_tool.eval.corpus") == []


def test_cli_help_imports_no_torch():
    """``rq --help`` parses flags only: defaults and choices come from rq_tool.defaults, not the registries."""
    mods = _modules_after("import rq_tool.cli")
    assert _loaded(mods, "torch", "transformers", "safetensors") == []


def test_nf4_table_is_bitsandbytes():
    import warnings

    import torch

    from rq_tool.quant import NF4_CODE, nf4_code

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbf
    theirs = bnbf.get_4bit_type("nf4", device="cpu").float()
    assert torch.equal(nf4_code("cpu"), theirs) and len(NF4_CODE) == 16


def test_registry_names_match_defaults():
    """The CLI offers ``defaults``' names; each registry is exactly those names."""
    from rq_tool import defaults
    from rq_tool.export import ENGINES
    from rq_tool.plan import ERROR_WEIGHTS, STRATEGIES
    from rq_tool.quant import QUANT_SCHEMES, SCHEMES

    assert tuple(SCHEMES) == defaults.SCHEME_NAMES and QUANT_SCHEMES == defaults.QUANT_SCHEMES
    assert set(STRATEGIES) == set(defaults.STRATEGIES) and tuple(ENGINES) == defaults.EXPORT_ENGINES
    assert ERROR_WEIGHTS == defaults.IMPORTANCE


def test_rewrite_config_is_the_cli_defaults():
    """``rq rewrite``'s planning flags default to ``RewriteConfig``'s fields; the config round-trips."""
    import dataclasses

    from rq_tool.cli import rewrite as rewrite_cmd
    from rq_tool.errors import RQError
    from rq_tool.rewrite.config import RewriteConfig

    cfg = RewriteConfig()
    flags = {p.name: p.default for p in rewrite_cmd.params}
    assert cfg.global_budget is False  # --global is a flag: off unless given
    for field in dataclasses.fields(RewriteConfig):
        if field.name == "global_budget":
            continue
        want = getattr(cfg, field.name)
        want = ",".join(want) if field.name == "schemes" else str(want) if field.name == "budget" else want
        assert flags[field.name] == want, (field.name, flags[field.name], want)
    other = RewriteConfig(budget="0.9", strategy="paper", schemes=["int8"], max_error=1e-3, ep_devices=8)
    assert RewriteConfig.from_dict(other.to_dict()) == other and other.schemes == ("int8",)
    assert other.plan_options().strategy == "paper" and other.plan_options().error_weight == cfg.importance
    with pytest.raises(dataclasses.FrozenInstanceError):
        other.budget = 1.0
    with pytest.raises(RQError, match="unknown rewrite option"):
        RewriteConfig.from_dict({"budgett": 1.0})
    with pytest.raises(RQError, match="strategy"):
        RewriteConfig(strategy="nope")


# the project legend (rq_tool/__init__.py): a module's own "Legend:" may add letters, never redefine these
_CORE_LETTERS = {
    "T": "token", "K": "top-k", "M": ("= T*K", "routed pairs"), "N": ("row", "calibration sequence", "window"),
    "E": "expert", "P": ("physical", "= E +"), "L": "MoE layer", "D": "decoder layer",
    "G": ("device", "GPU"), "S": ("scheme", "quantization scheme"), "H": "hidden", "I": "intermediate",
    "B": ("step", "batch", "independent rows"),
}


def _legend_entries(text: str) -> list[tuple[str, str]]:
    """``(letter, meaning)`` pairs of a docstring's ``Legend:`` paragraph (up to its first full stop)."""
    import re

    start = text.find("Legend:")
    if start < 0:
        return []
    para = " ".join(text[start + len("Legend:"):].split("\n\n", 1)[0].split())
    para = para.split(". ", 1)[0]
    out = []
    for item in re.split(r",\s*(?![^()]*\))", para):
        m = re.match(r"\s*(?:``)?([A-Z])(?:``)?\s+(.*)", item)
        if m:
            out.append((m.group(1), m.group(2).rstrip(".")))
    return out


def test_one_legend_for_the_whole_project():
    """Every module's shape legend keeps the project's meaning of the core letters."""
    bad = []
    files = sorted((REPO / "rq_tool").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py"))
    for path in files:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for letter, meaning in _legend_entries(doc):
            want = _CORE_LETTERS.get(letter)
            if want is None:
                continue
            want = (want,) if isinstance(want, str) else want
            if not any(w.lower() in meaning.lower() for w in want):
                bad.append(f"{path.relative_to(REPO)}: {letter} {meaning!r}")
    assert not bad, "\n".join(bad)


def test_legend_parser_sees_a_redefinition():
    assert ("N", "= T*K") in _legend_entries("Legend: T tokens, N = T*K.")
    assert ("H", "decoder layers") in _legend_entries("x\n\nLegend: G devices,\nH decoder layers.\n\nmore")

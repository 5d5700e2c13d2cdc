"""The rewritten model directory is self-contained: its bundled runtime loads it where rq-tool is
not installed (a fresh process of the test's own interpreter, so it has the same torch + transformers,
in which rq-tool -- installed here, editable -- is blocked: importing it fails)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rq_tool.errors import RQError
from rq_tool.runtime import bundle

SCRIPT = textwrap.dedent('''
    import builtins, json, sys
    def no_prompt(*a, **k):
        raise AssertionError("transformers asked whether to run remote code")
    builtins.input = no_prompt
    sys.modules["rq_tool"] = None  # as if not installed: any "import rq_tool..." raises ImportError
    try:
        import rq_tool.runtime  # noqa: F401
        sys.exit("rq_tool is importable in the fresh process: the test would prove nothing")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, ids = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(out)  # plain: no trust_remote_code, no prompt
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map={"": "cpu"})
    assert type(model.model.layers[0].mlp.experts).__name__ == "RQExperts"
    assert type(model.model.layers[0].mlp.experts).__module__.startswith("transformers_modules")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(ids)).logits
    assert not [m for m, v in sys.modules.items() if m.startswith("rq_tool") and v is not None]
    print(json.dumps({"tokens": len(tok("hello world")["input_ids"]), "logits": logits.flatten().tolist()}))
''')


def test_model_dir_loads_without_rq_tool(rewritten_tiny, tmp_path, one_thread):  # same threads as the child: same numbers
    import rq_tool

    out = rewritten_tiny / "out"
    python = sys.executable  # same torch + transformers (a fresh machine has them only in the venv); rq_tool blocked
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ids = [[3, 1, 4, 1, 5, 9]]
    r = subprocess.run([str(python), "-s", "-c", SCRIPT, str(out), json.dumps(ids)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    with torch.inference_mode():
        want = rq_tool.load(out)(input_ids=torch.tensor(ids)).logits.flatten()
    assert got["tokens"] > 0
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=0, atol=0)  # same code, same numbers


def test_bundle_is_derived_from_the_import_graph(tmp_path):
    from transformers.dynamic_module_utils import get_relative_import_files

    mods = bundle.runtime_modules()
    assert "rq_tool.runtime.hf" in mods and "rq_tool.kernels.experts_cpu" in mods
    # what main's runtime reads: integrity check, model-dir reader, expert parallel, split policies
    assert {"rq_tool.runtime.integrity", "rq_tool.runtime.model_dir", "rq_tool.runtime.ep", "rq_tool.kernels.types",
            "rq_tool.kernels.replica_choice", "rq_tool.kernels.split"} <= set(mods)
    # lazy package __init__s are never bundled: their exports are imported from the submodules
    assert not {"rq_tool", "rq_tool._lazy", "rq_tool.kernels", "rq_tool.quant", "rq_tool.runtime"} & set(mods)
    # transformers' remote-code copier reaches every bundled file from the entry
    names = bundle.write_bundle(tmp_path)
    reached = {p.rpartition("/")[2] for p in get_relative_import_files(str(tmp_path / "modeling_rq.py"))}
    assert reached == set(names) - {"modeling_rq.py"}
    assert not mods["rq_tool.kernels.experts_triton"].required  # reached only inside try: optional
    files = bundle.bundle_files()
    for name, text in files.items():
        tree = ast.parse(text)
        if name == "modeling_rq.py":  # the entry: the installed rq-tool of its version first, in a try, else the bundle
            (attempt,) = [n for n in tree.body if isinstance(n, ast.Try)]
            assert any(isinstance(n, ast.ImportFrom) and n.module == "rq_tool.runtime.hf" for n in attempt.body)
            tree = ast.Module(body=attempt.handlers[0].body, type_ignores=[])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (node.module is None or (node.module + ".py") in files), (
                    f"{name}: {ast.unparse(node)}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not mod.startswith("rq_tool"), f"{name} still imports {mod}"


def test_remote_code_import_check_asks_only_for_torch_and_transformers(tmp_path):
    """transformers runs ``check_imports`` on every remote-code file fetched from the Hub: no bundled
    file may demand a package beyond torch / transformers / safetensors (triton is optional, in a try)."""
    from transformers.dynamic_module_utils import get_imports

    names = bundle.write_bundle(tmp_path)
    wanted = {name: sorted(set(get_imports(str(tmp_path / name))) - bundle.ALLOWED) for name in names}
    assert {n: w for n, w in wanted.items() if w} == {}
    assert any("triton" in (tmp_path / n).read_text() for n in names)  # the kernels are bundled, guarded


def test_bundling_rejects_a_runtime_that_needs_another_package(tmp_path, monkeypatch):
    pkg = tmp_path / "rq_tool_fake"
    (pkg).mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "entry.py").write_text("import numpy\nfrom .helper import f\n")
    (pkg / "helper.py").write_text("try:\n    import scipy\nexcept ImportError:\n    scipy = None\nf = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bundle, "_PKG", "rq_tool_fake")
    with pytest.raises(RQError, match="rq_tool_fake.entry imports numpy"):
        bundle.runtime_modules("rq_tool_fake.entry")
    (pkg / "entry.py").write_text("from .helper import f\n")
    assert set(bundle.runtime_modules("rq_tool_fake.entry")) == {"rq_tool_fake.entry", "rq_tool_fake.helper"}

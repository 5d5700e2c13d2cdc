import importlib.util
import os
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
# `python -m pytest` from the repo root puts the root on sys.path, where our `kernels/` source
# folder would pass for the PyPI package `kernels` (transformers and bitsandbytes probe for it
# and import it). The installed package maps it to `rq_tool.kernels`; keep the root off the path.
_kept = [p for p in sys.path if Path(p or os.curdir).resolve() != _REPO]
if len(_kept) < len(sys.path):
    sys.path[:] = _kept
    if importlib.util.find_spec("rq_tool") is None:  # pragma: no cover - not installed
        raise RuntimeError("rq_tool is not installed: pip install -e '.[test]' (see README)")
sys.path.insert(0, str(Path(__file__).parent))
# the same for the Python subprocesses tests start from the repo root (`python -c`, `-m`): without
# this, transformers (>= 5.25 depends on PyPI's `kernels`) would import our folder in its place
os.environ["PYTHONSAFEPATH"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Triton runs on CPU only in its interpreter, which must be chosen before triton is first
# imported (bitsandbytes and transformers import it); on a CUDA machine the real kernels run.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from threads, and extra threads oversubscribe a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rewritten_tiny(tmp_path_factory, request):
    """A tiny Qwen3-MoE, its calibration texts, a profile (``p.json``) and a rewrite (``out``)."""
    import rq_tool
    from tiny_models import save_tiny, write_texts

    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    src = save_tiny("qwen3_moe", root / "src")
    write_texts(root / "t.jsonl", getattr(request.module, "N_TEXTS", 60))
    rq_tool.calibrate(src, str(root / "t.jsonl"), num_samples=4, seq_len=32, progress=False).save(root / "p.json")
    rq_tool.rewrite(src, root / "p.json", root / "out", progress=False)
    return root

"""Expert parallelism on transformers' EP machinery: replica choice across ranks, placement
checks, and real multi-process runs (gloo, torchrun) against single-process references.

Exactness bound (fp32 compute, source-precision replicas vs the original): the EP run computes
every expert on a different set of rows than one process does, so BLAS may round differently;
the logits must agree within ``EP_RTOL`` of their largest magnitude (measured: about 1e-6).
Quantized slots vs the single-process rewritten model with the same policy: same bound.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rq_tool
from rq_tool.errors import RQError
from rq_tool.kernels.replica_choice import choose_slots
from rq_tool.runtime.ep_placement import write_placed_copy

EP_RTOL = 1e-5  # max |EP - reference| / max |reference| over the logits, fp32 rounding of reordered matmuls
WORKER = Path(__file__).parent / "ep_worker.py"
LA, RR = "load-aware", "round-robin-by-occurrence"


def _random_map(E, extra, G, gen):
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (extra,), generator=gen)])
    logcnt = torch.bincount(phy2log, minlength=E)
    log2phy = torch.full((E, int(logcnt.max())), -1, dtype=torch.int64)
    for e in range(E):
        s = (phy2log == e).nonzero().flatten()
        log2phy[e, : s.numel()] = s
    return log2phy, logcnt, torch.randint(0, G, (phy2log.numel(),), generator=gen)


@pytest.mark.parametrize("policy", [LA, RR])
@pytest.mark.parametrize("E,extra,G,T", [(8, 4, 2, 24), (16, 16, 4, 50), (5, 9, 3, 7)])
def test_rank_choice_equals_single_process(policy, E, extra, G, T):
    """Each rank choosing for its slice (counts before it, the step's counts) = one process on the whole step."""
    gen = torch.Generator().manual_seed(E * 100 + G)
    log2phy, logcnt, dev = _random_map(E, extra, G, gen)
    topk = torch.randint(0, E, (T, 2), generator=gen)
    whole = choose_slots(topk, log2phy, logcnt, policy, dev, G)
    cuts = sorted(torch.randint(0, T + 1, (G - 1,), generator=gen).tolist())
    parts = torch.tensor_split(topk, cuts)
    counts = torch.stack([torch.bincount(p.reshape(-1), minlength=E) for p in parts])
    got = [choose_slots(p, log2phy, logcnt, policy, dev, G, counts[:r].sum(0), counts.sum(0)) for r, p in enumerate(parts)]
    assert torch.equal(torch.cat(got), whole)
    assert ((whole >= 0) & (whole < dev.numel())).all()


@pytest.fixture(scope="module")
def ep_models(tmp_path_factory):
    from tiny_models import save_tiny, write_texts

    root = tmp_path_factory.mktemp("ep")
    src = save_tiny("qwen3_moe", root / "src")
    write_texts(root / "t.jsonl", 60)
    rq_tool.calibrate(src, str(root / "t.jsonl"), num_samples=4, seq_len=32, progress=False).save(root / "p.json")
    for strategy in ("replicate-only", "greedy"):
        rq_tool.rewrite(src, root / "p.json", root / strategy, strategy=strategy, progress=False)
        for G in (2, 4):
            for policy in (LA, RR):
                write_placed_copy(root / strategy, root / f"{strategy}-{G}-{policy}", G, policy)
    return root


def test_load_aware_single_process_replicas_exact(ep_models, one_thread):
    """A placed replicas-only map with the load-aware split, in one process: the original logits."""
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(ep_models / "src", dtype=torch.float32)
    ids = torch.randint(1, orig.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    model = rq_tool.load(ep_models / f"replicate-only-2-{LA}", dtype=torch.float32)
    assert all(e.split_policy == LA for e in model.modules() if hasattr(e, "split_policy"))
    with torch.no_grad():
        a, b = orig(ids).logits, model(ids).logits
    assert float((a - b).abs().max()) <= EP_RTOL * float(a.abs().max())


def test_placement_and_world_size_must_agree(ep_models, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RQError, match="no device placement"):
        rq_tool.load(ep_models / "greedy", ep_size=2)
    with pytest.raises(RQError, match="places slots on 2 devices but ep_size is 4"):
        rq_tool.load(ep_models / f"greedy-2-{LA}", ep_size=4)
    with pytest.raises(RQError, match="needs 2 processes"):
        rq_tool.load(ep_models / f"greedy-2-{LA}", ep_size=2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RQError, match=r"needs 2 processes \(or a multiple\), this run has WORLD_SIZE=3"):
        rq_tool.load(ep_models / f"greedy-2-{LA}", ep_size=2)


def _torchrun(G: int, out: Path, cases: list[str], timeout: float) -> list[list[dict]]:
    """Run the worker on G gloo ranks; bounded, and the whole process group is killed on any exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(G),
           str(WORKER), str(out), *cases]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{G}-rank run exceeded {timeout}s:\n{log[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(G)]


def _check_runs(root: Path, G: int, ranks: list[list[dict]]):
    for i, rows in enumerate(zip(*ranks)):
        for row in rows:
            assert row["max_abs_diff"] <= EP_RTOL * row["scale"], (row["placed"], row["max_abs_diff"])
        # measured pairs per rank, layer and step == the simulator's prediction
        predicted = rows[0]["predicted"]  # [L][B][G]
        for li, layer in enumerate(sorted(rows[0]["pairs"], key=int)):
            measured = [[row["pairs"][layer][b] for row in rows] for b in range(len(predicted[li]))]
            assert measured == predicted[li], (rows[0]["placed"], layer)
        # every slot materialised on exactly one rank
        full = rq_tool.load(rows[0]["placed"], dtype=torch.float32)
        total = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if ".experts." in n)
        assert sum(row["expert_bytes"] for row in rows) == total
        assert all(0 < row["expert_bytes"] < total for row in rows)


def _cases(root: Path, G: int) -> list[str]:
    return [f"{root}/replicate-only-{G}-{LA}={root}/src", f"{root}/replicate-only-{G}-{RR}={root}/src",
            f"{root}/greedy-{G}-{LA}={root}/greedy-{G}-{LA}", f"{root}/greedy-{G}-{RR}={root}/greedy-{G}-{RR}"]


def test_two_ranks_gloo(ep_models, tmp_path):
    ranks = _torchrun(2, tmp_path / "out", _cases(ep_models, 2), timeout=120)
    _check_runs(ep_models, 2, ranks)


@pytest.mark.slow
def test_four_ranks_gloo(ep_models, tmp_path):
    ranks = _torchrun(4, tmp_path / "out", _cases(ep_models, 4), timeout=240)
    _check_runs(ep_models, 4, ranks)

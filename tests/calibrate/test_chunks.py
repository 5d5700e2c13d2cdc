"""`rq calibrate --chunk-tokens C`: per-row loads per C-token chunk, consistent with the per-sequence
profile of the same data, and folds that never split a sequence."""

import json
import random

import pytest
import torch

import rq_tool
from rq_tool.calibrate.profile import Profile
from rq_tool.errors import RQError
from rq_tool.plan.balance import make_folds
from rq_tool.rewrite.planning import steps_per_profile
from tiny_models import save_tiny

S, C, N = 32, 8, 8


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunks")
    save_tiny("qwen3_moe", root / "src")
    rng = random.Random(0)
    words = {"a": "alpha beta gamma delta", "b": "one two three four five"}
    with open(root / "t.jsonl", "w") as f:
        for i in range(80):
            dom = "a" if i % 2 else "b"
            text = " ".join(rng.choice(words[dom].split()) for _ in range(rng.randint(3, 30)))
            f.write(json.dumps({"text": text, "domain": dom}) + "\n")
    kw = dict(num_samples=N, seq_len=S, batch_size=4, progress=False, schemes=("int8",))
    plain = rq_tool.calibrate(root / "src", str(root / "t.jsonl"), **kw)
    chunked = rq_tool.calibrate(root / "src", str(root / "t.jsonl"), chunk_tokens=C, **kw)
    chunked.save(root / "p.json")
    return root, plain, chunked


def test_chunk_rows_sum_to_the_sequences(profiles):
    root, plain, chunked = profiles
    n, L, E = plain.seq_loads.shape
    assert chunked.seq_loads.shape == (n * S // C, L, E)
    assert torch.equal(chunked.seq_loads.view(n, S // C, L, E).sum(1), plain.seq_loads)
    assert torch.equal(chunked.load_matrix(), plain.load_matrix())
    assert [lp.lis_by_batch for lp in chunked.layers] == [lp.lis_by_batch for lp in plain.layers]
    # each row holds C tokens' routed slots; each row has its own majority domain
    K = plain.model["top_k"]
    assert bool((chunked.seq_loads.sum(-1) == C * K).all())
    assert chunked.seq_domain.shape == (n * S // C,) and chunked.domains == plain.domains
    assert (chunked.tokens_per_row, chunked.rows_per_sequence) == (C, S // C)
    assert (plain.tokens_per_row, plain.rows_per_sequence) == (S, 1)


def test_saved_profile_keeps_the_chunking(profiles):
    root, _, chunked = profiles
    d = json.loads((root / "p.json").read_text())
    assert d["calibration"]["chunk_tokens"] == C
    assert d["loads"]["unit"] == "chunk" and d["loads"]["tokens_per_row"] == C
    back = Profile.load(root / "p.json")
    assert torch.equal(back.seq_loads, chunked.seq_loads) and back.rows_per_sequence == S // C
    # the default step is still 8 calibration sequences' worth of tokens; --batch-tokens counts tokens
    assert steps_per_profile(back, None) == 8 * S // C
    assert steps_per_profile(back, 4 * C) == 4


def test_rewrite_plans_from_a_chunked_profile(profiles):
    root, _, _ = profiles
    for opts in ({}, {"ep_size": 2}):
        res = rq_tool.rewrite(root / "src", root / "p.json", None, dry_run=True, progress=False, schemes=["int8"],
                              **opts)
        assert len(res.plan.layers) == 2


def test_folds_never_split_a_sequence():
    torch.manual_seed(0)
    r = 4
    seq = torch.randint(0, 50, (64 * r, 2, 8))
    fold, names = make_folds(seq, None, per_step=8, rows_per_seq=r)
    assert len(names) >= 2
    assert bool((fold.view(64, r) == fold.view(64, r)[:, :1]).all())


@pytest.mark.parametrize("chunk", [5, 0, 33])
def test_chunk_must_divide_the_sequence(profiles, chunk):
    root, _, _ = profiles
    with pytest.raises(RQError, match="--chunk-tokens"):
        rq_tool.calibrate(root / "src", str(root / "t.jsonl"), num_samples=2, seq_len=S, chunk_tokens=chunk,
                          progress=False)


def test_profile_with_a_bad_chunk_is_refused(profiles):
    root, _, _ = profiles
    d = json.loads((root / "p.json").read_text())
    d["calibration"]["chunk_tokens"] = 7
    with pytest.raises(RQError, match="chunk_tokens must divide"):
        Profile.from_dict(d)

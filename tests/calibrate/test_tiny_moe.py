"""The bundled tiny MoE reproduces its recorded held-out numbers; the calibration sets are usable.

The held-out checks need the run-time corpora: ``apt-get install -y bible-kjv-text bible-kjv
manpages libc6-dev``. Without them those tests skip, naming the packages; CI installs them and sets
``RQ_REQUIRE_CORPORA=1``, which turns a missing corpus into a failure instead.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from rq_tool import defaults
from rq_tool.eval import corpus
from rq_tool.calibrate import data as calib_data
from rq_tool.eval import perplexity as ev

MODEL_DIR = defaults.default_model_path()
# Same token ids, fp32 math from the same bf16 weights on CPU: only the order of float sums
# (thread count, kernel choice) can move the result, which is far below 2%.
PPL_RTOL = 0.02
TOP1_ATOL = 0.01
# A different Python / manpages / libc version changes the held-out *text* (detected by hash);
# the model must then still score in the same range, not identically.
CORPUS_DRIFT_RTOL = 0.25
MAX_MODEL_BYTES = 20 * 1024**2
MAX_SET_BYTES = 1_500_000


@pytest.fixture(scope="module")
def eval_json() -> dict:
    return json.loads((MODEL_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return model.eval(), tok


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()


def test_bundle_is_small_and_versioned(eval_json):
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size <= MAX_MODEL_BYTES, f"tiny MoE bundle is {size / 2**20:.1f} MiB"
    assert (eval_json["format"], eval_json["version"]) == ("rq-tiny-moe-eval", 1)
    assert set(eval_json["domains"]) == set(corpus.DOMAINS + corpus.UNSEEN_DOMAINS)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3_moe", 16, 2)


@pytest.mark.parametrize("domain", corpus.DOMAINS + corpus.UNSEEN_DOMAINS)
def test_heldout_perplexity_matches_eval_json(domain, model_and_tokenizer, eval_json):
    missing = corpus.missing_packages(domain)
    if missing and os.environ.get("RQ_REQUIRE_CORPORA") != "1":
        pytest.skip(f"held-out corpus {domain!r} needs Debian package(s) {' '.join(missing)} "
                    f"(apt-get install -y {' '.join(missing)})")
    model, tok = model_and_tokenizer
    sub = eval_json["test_subset"]
    want = sub["domains"][domain]
    ids = ev.pack_tokens(tok, corpus.heldout_texts(domain), eval_json["seq_len"], sub["tokens_per_domain"])
    got = ev.summarize(ev.evaluate_ids(model, ids))
    assert got["tokens"] == want["tokens"]
    rel = abs(got["ppl"] / want["ppl"] - 1)
    if _ids_sha256(ids) == want["input_sha256"]:
        assert rel <= PPL_RTOL, f"{domain}: ppl {got['ppl']:.3f} vs recorded {want['ppl']:.3f}"
        assert abs(got["top1_acc"] - want["top1_acc"]) <= TOP1_ATOL
    else:  # same model, different corpus version on this machine
        assert rel <= CORPUS_DRIFT_RTOL, (
            f"{domain}: held-out text differs from the one eval.json was made on (other Python / Debian "
            f"package versions?) and ppl {got['ppl']:.3f} is far from the recorded {want['ppl']:.3f}")


def test_split_is_deterministic_and_order_free():
    docs = [f"document {i}" for i in range(200)]
    train, held = corpus.split_documents(docs, 0.25, seed=3)
    assert (train, held) == corpus.split_documents(docs, 0.25, seed=3)
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    rtrain, rheld = corpus.split_documents(docs[::-1], 0.25, seed=3)
    assert set(rheld) == set(held) and rheld == held[::-1]
    assert 20 < len(held) < 80


def test_unknown_domain_is_a_clear_error():
    from rq_tool.errors import RQError

    with pytest.raises(RQError, match="unknown corpus domain"):
        corpus.domain_documents("poetry")


def test_missing_corpus_names_the_debian_package(monkeypatch, tmp_path):
    from rq_tool.errors import RQError

    monkeypatch.setattr(corpus, "_KJV_DATA", tmp_path / "no-bible.data")
    with pytest.raises(RQError, match="apt-get install -y bible-kjv-text"):
        corpus._prose_documents()
    monkeypatch.setattr(corpus, "_MANPAGES_LIST", tmp_path / "no-manpages.list")
    with pytest.raises(RQError, match="apt-get install -y manpages"):
        corpus._docs_documents()
    assert corpus.missing_packages("prose") == ("bible-kjv-text", "bible-kjv")
    assert corpus.missing_packages("docs") == ("manpages",)
    assert corpus.missing_packages("code") == corpus.missing_packages("math") == ()


def test_calibration_math_is_not_training_math():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "make_calibration_sets", Path(__file__).parents[2] / "scripts" / "make_calibration_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.CALIBRATION_MATH_SEED != corpus.MATH_SEED
    calib = {json.loads(l)["text"] for l in (defaults.calibration_sets_dir() / "math.jsonl").open()}
    assert calib and not calib & set(corpus.domain_documents("math"))


@pytest.mark.parametrize("name", ["code", "math", "prose", "docs", "mix"])
def test_calibration_sets_parse(name):
    path = defaults.calibration_sets_dir() / f"{name}.jsonl"
    assert path.stat().st_size < MAX_SET_BYTES
    spec_name, texts = calib_data.load_texts(name)
    assert spec_name == name and len(texts) >= 10 and all(t.strip() for t in texts)


def test_mix_packs_the_default_calibration_batch(model_and_tokenizer):
    _, tok = model_and_tokenizer
    _, texts = calib_data.load_texts(defaults.DEFAULT_DATASET)
    packed = calib_data.pack(texts, tok, num_samples=defaults.NUM_SAMPLES, seq_len=defaults.SEQ_LEN,
                             seed=defaults.SEED, name=defaults.DEFAULT_DATASET)
    assert packed.input_ids.shape == (defaults.NUM_SAMPLES, defaults.SEQ_LEN)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert total >= 2 * defaults.NUM_SAMPLES * defaults.SEQ_LEN  # room for other seeds' shuffles

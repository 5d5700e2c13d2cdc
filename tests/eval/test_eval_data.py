"""Which data rq calibrate reads and rq eval scores: dataset folders, --split / --text-field, the
default (the calibration source's unused texts, else in-sample and said so), progress bars, and the
after-rewrite heatmap's per-expert matrix. Everything local: datasets are built in the test."""

import io
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from rq_tool.calibrate import calibrate, load_texts, pack
from rq_tool.calibrate.data import split_used, texts_sha256
from rq_tool.cli import main
from rq_tool.errors import RQError
from rq_tool.eval import evaluate
from rq_tool.eval.heldout import load_heldout
from rq_tool.eval.perplexity import pack_tokens
from rq_tool.eval.report import expert_slot_share
from rq_tool.lis import slot_loads
from rq_tool.source import load_tokenizer
from rq_tool.rewrite import rewrite
from tiny_models import save_tiny, write_texts

SEQ, TOKENS, BATCH = 32, 32 * 8, 4
datasets = pytest.importorskip("datasets")


def _texts(n, seed):
    import random

    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "moe", "expert", "route", "load", "token", "sum"]
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(20, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    save_tiny("qwen3_moe", root / "src")
    write_texts(root / "cal.jsonl", 120, seed=0)
    prof = calibrate(root / "src", str(root / "cal.jsonl"), num_samples=16, seq_len=SEQ, batch_size=4, progress=False)
    rewrite(root / "src", prof, root / "greedy", progress=False)
    return root, prof


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A save_to_disk Dataset, a DatasetDict (train / validation) and a parquet folder (train / test)."""
    root = tmp_path_factory.mktemp("folders")
    train, val, test = _texts(60, 1), _texts(30, 2), _texts(20, 3)
    ds = datasets.Dataset.from_dict({"story": train, "n": list(range(len(train)))})
    ds.save_to_disk(str(root / "single"))
    datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"story": val})}).save_to_disk(
        str(root / "dd"))
    (root / "pq" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": train[:30]}).to_parquet(str(root / "pq" / "data" / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_dict({"text": train[30:]}).to_parquet(str(root / "pq" / "data" / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_dict({"text": test}).to_parquet(str(root / "pq" / "data" / "test-00000-of-00001.parquet"))
    (root / "flat").mkdir()
    datasets.Dataset.from_dict({"body": test}).to_parquet(str(root / "flat" / "part-0.parquet"))
    return root, train, val, test


# ------------------------------------------------------------------ dataset folders and options
def test_dataset_folders_and_options(folders):
    root, train, val, test = folders
    assert load_texts(str(root / "single"), text_field="story") == ("single", train)
    assert load_texts(str(root / "dd"), text_field="story") == ("dd", train)  # default split: train
    assert load_texts(str(root / "dd"), split="validation", text_field="story") == ("dd:validation", val)
    assert load_texts(str(root / "pq")) == ("pq", train)  # both train shards, in order; not the test split
    assert load_texts(str(root / "pq"), split="test") == ("pq:test", test)
    assert load_texts(str(root / "flat")) == ("flat", test)  # no split named: every file; 'body' found
    assert load_texts(str(root / "pq" / "data" / "test-00000-of-00001.parquet"))[1] == test
    bad = [((root / "single",), {}, "no text column"),  # 'story' is not a default text column
           ((root / "single",), {"text_field": "n"}, "does not hold text"),
           ((root / "single",), {"text_field": "nope"}, "no column 'nope'"),
           ((root / "single",), {"text_field": "story", "split": "test"}, "no splits"),
           ((root / "dd",), {"split": "test", "text_field": "story"}, "no split 'test'"),
           ((root / "pq",), {"split": "validation"}, "no parquet files of split 'validation'"),
           ((root / "pq",), {"config": "en"}, "no config folder 'en'"),
           ((root / "pq",), {"split": "../x"}, "--split must be"),
           ((root / "single",), {"text_field": "a\nb"}, "--text-field must be"),
           (("mix",), {"split": "train"}, "does not apply"),
           ((root / "empty",), {}, "neither a datasets save_to_disk folder"),
           ]
    (root / "empty").mkdir(exist_ok=True)
    for (spec,), kw, msg in bad:
        with pytest.raises(RQError, match=msg):
            load_texts(str(spec), **kw)
    (root / "mixed").mkdir(exist_ok=True)
    for s in ("train", "test"):
        datasets.Dataset.from_dict({"text": test}).to_parquet(str(root / "mixed" / f"{s}.parquet"))
    assert load_texts(str(root / "mixed"))[1] == test  # train is the default split
    (root / "twosplits").mkdir(exist_ok=True)
    for s in ("validation", "test"):
        datasets.Dataset.from_dict({"text": test}).to_parquet(str(root / "twosplits" / f"{s}.parquet"))
    with pytest.raises(RQError, match="pass --split"):
        load_texts(str(root / "twosplits"))


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "a", "q": "question one"}) + "\n" + json.dumps({"q": "question two"}) + "\n")
    assert load_texts(str(p), text_field="q")[1] == ["question one", "question two"]
    with pytest.raises(RQError, match=r"t.jsonl:2: no text field"):
        load_texts(str(p))
    with pytest.raises(RQError, match=r"t.jsonl:1: no text field 'z'"):
        load_texts(str(p), text_field="z")


def test_cli_calibrate_on_a_folder_and_bad_options(tiny, folders, tmp_path):
    root, _ = tiny
    fold = folders[0]
    args = ["calibrate", str(root / "src"), "--num-samples", "4", "--seq-len", str(SEQ), "--no-quant-error"]
    r = CliRunner().invoke(main, [*args, "-d", str(fold / "dd"), "--split", "validation", "--text-field", "story",
                                  "-o", str(tmp_path / "p.json"), "--json"])
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "p.json").read_text())["calibration"]
    assert cal["dataset"] == "dd:validation" and cal["source"]["kind"] == "saved-dataset"
    assert cal["source"]["split"] == "validation" and cal["source"]["text_field"] == "story"
    assert cal["sha256"] == texts_sha256(folders[2])
    for extra, msg in ((["--split", "nope"], "no split 'nope'"), (["--text-field", "nope"], "no column 'nope'"),
                       (["--split", "a/b"], "--split must be")):
        r = CliRunner().invoke(main, [*args, "-d", str(fold / "dd"), *extra, "-o", str(tmp_path / "q.json")])
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.output
        assert not (tmp_path / "q.json").exists()


# ------------------------------------------------------------------ what rq eval scores by default
def test_pack_records_exactly_the_texts_it_used(tiny):
    root, prof = tiny
    tok = load_tokenizer(root / "src")
    _, texts = load_texts(str(root / "cal.jsonl"))
    data = pack(texts, tok, num_samples=16, seq_len=SEQ, seed=0, name="cal")
    assert data.texts_used == prof.calibration["texts_used"] and 1 <= data.texts_used < len(texts)
    used, unused = split_used(texts, 0, data.texts_used)
    assert len(used) + len(unused) == len(texts) and not set(used) & set(unused)

    def ids(ts):
        return [i for t in ts for i in (*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id)]

    flat = data.input_ids.flatten().tolist()
    assert ids(used)[: len(flat)] == flat  # every calibration token came from the used texts...
    assert len(ids(used[:-1])) < len(flat)  # ...and the last one was needed


def test_eval_default_scores_the_calibration_texts_not_used(tiny, tmp_path):
    root, prof = tiny
    r = CliRunner().invoke(main, ["eval", str(root / "src"), str(root / "greedy"), "--seq-len", str(SEQ),
                                  "--max-tokens", str(TOKENS), "--batch-size", str(BATCH), "--devices", "2",
                                  "-o", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("scored on [held-out] ") and "calibration did not use" in r.output
    assert "== greedy vs original (held-out)" in r.output and "IN-SAMPLE" not in r.output
    h = json.loads((tmp_path / "e.json").read_text())["heldout"]
    assert h["held_out"] is True and h["data"] == "held-out" and list(h["domains"]) == ["cal.jsonl"]
    _, texts = load_texts(str(root / "cal.jsonl"))
    _, unused = split_used(texts, 0, prof.calibration["texts_used"])
    assert h["domains"]["cal.jsonl"]["sha256"] == texts_sha256(unused) != prof.calibration["sha256"]
    ho = load_heldout(load_tokenizer(root / "src"), calibration=prof.calibration, seq_len=SEQ, max_tokens=TOKENS)
    assert torch.equal(ho.domains["cal.jsonl"], pack_tokens(load_tokenizer(root / "src"), unused, SEQ, TOKENS))


def test_eval_in_sample_when_calibration_used_every_text(tiny, tmp_path):
    root, _ = tiny
    write_texts(tmp_path / "few.jsonl", 4, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "yields N sequences, not 64"
        prof = calibrate(root / "src", str(tmp_path / "few.jsonl"), num_samples=64, seq_len=SEQ, progress=False,
                         quant_error=False)
    assert prof.calibration["texts_used"] == 4
    rewrite(root / "src", prof, tmp_path / "rep", strategy="replicate-only", importance="frequency", progress=False)
    res = evaluate(root / "src", tmp_path / "rep", seq_len=SEQ, max_tokens=TOKENS, batch_size=BATCH,
                   device_counts=(2,), progress=False)
    h = res["heldout"]
    assert h["held_out"] is False and h["data"] == "in-sample" and "IN-SAMPLE" in h["note"]
    _, texts = load_texts(str(tmp_path / "few.jsonl"))
    used, unused = split_used(texts, 0, 4)
    assert not unused and sorted(used) == sorted(texts)  # the calibration texts themselves, in calibration's order
    assert h["domains"]["few.jsonl"]["sha256"] == texts_sha256(used)
    assert res["results"][1]["heldout"]["held_out"] is False
    from rq_tool.eval.baselines import markdown_table
    from rq_tool.eval.run import data_text, detail_text

    assert data_text(h).startswith("scored on [IN-SAMPLE] ")
    assert "(IN-SAMPLE)" in detail_text(res["results"][1]) and "in-sample data" in markdown_table(res["results"])


def test_eval_default_refuses_what_it_cannot_trust(tiny, monkeypatch):
    root, prof = tiny
    tok = load_tokenizer(root / "src")
    cal = prof.calibration
    with pytest.raises(RQError, match="changed since calibration"):
        load_heldout(tok, calibration=dict(cal, sha256="0" * 64), seq_len=SEQ, max_tokens=TOKENS)
    old = {k: v for k, v in cal.items() if k not in ("source", "texts_used")}
    with pytest.raises(RQError, match="does not record where"):
        load_heldout(tok, calibration=dict(old, dataset="gone.jsonl"), seq_len=SEQ, max_tokens=TOKENS)
    moved = dict(cal, source=dict(cal["source"], path=str(root / "moved.jsonl"), spec="moved.jsonl"))
    with pytest.raises(RQError, match="cannot be read here"):
        load_heldout(tok, calibration=moved, seq_len=SEQ, max_tokens=TOKENS)
    monkeypatch.chdir(root)  # an older profile naming a file that is here: in-sample (used texts unknown)
    ho = load_heldout(tok, calibration=old, seq_len=SEQ, max_tokens=TOKENS)
    assert ho.held_out is False and "does not record which texts" in ho.note
    from rq_tool.eval import corpus

    monkeypatch.setattr(corpus, "heldout_texts", lambda d: [f"{d} held out " * 40] * 3)
    ho = load_heldout(tok, calibration={"dataset": "code", "source": {"kind": "bundled", "spec": "code"}},
                      seq_len=SEQ, max_tokens=TOKENS)
    assert list(ho.domains) == ["code", *corpus.UNSEEN_DOMAINS] and ho.held_out and "bundled" in ho.note


def test_eval_split_of_the_calibration_folder(tiny, folders):
    root, _ = tiny
    fold, train, val, _ = folders
    prof = calibrate(root / "src", str(fold / "dd"), text_field="story", num_samples=8, seq_len=SEQ,
                     progress=False, quant_error=False)
    tok = load_tokenizer(root / "src")
    ho = load_heldout(tok, calibration=prof.calibration, seq_len=SEQ, max_tokens=TOKENS)  # unused train texts
    assert ho.held_out and list(ho.domains) == ["dd"]
    ho = load_heldout(tok, calibration=prof.calibration, split="validation", seq_len=SEQ, max_tokens=TOKENS)
    assert ho.held_out and list(ho.domains) == ["dd:validation"]  # --text-field story carried over
    assert ho.sha256["dd:validation"] == texts_sha256(val)
    with pytest.raises(RQError, match="is the calibration set"):
        load_heldout(tok, calibration=prof.calibration, split="train", seq_len=SEQ, max_tokens=TOKENS)


# ------------------------------------------------------------------ progress bars
def test_progress_bars_only_on_a_terminal(tiny, monkeypatch):
    root, _ = tiny
    from rq_tool.eval.measure import measure
    from rq_tool.source import load_model

    model, family = load_model(root / "src")
    ids = {"d": torch.randint(2, 60, (3, SEQ))}

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for tty, progress, drawn in ((False, True, False), (True, True, True), (True, False, False)):
        err = Tty() if tty else io.StringIO()
        monkeypatch.setattr("sys.stderr", err)
        measure(model, family, ids, batch_size=2, progress=progress, desc="original")
        assert ("scoring original" in err.getvalue()) is drawn, err.getvalue()


# ------------------------------------------------------------------ the after-rewrite heatmap
def test_expert_slot_share_is_the_heaviest_replica_on_the_before_scale():
    load = torch.tensor([12, 2, 6, 0])
    phy2log, logcnt = torch.tensor([0, 1, 2, 3, 0, 2, 0]), torch.tensor([3, 1, 2, 1])
    top = expert_slot_share(load, phy2log, logcnt)
    torch.testing.assert_close(top, torch.tensor([4.0, 2.0, 3.0, 0.0], dtype=torch.float64) / 20 * 100)
    before = expert_slot_share(load, torch.arange(4), torch.ones(4, dtype=torch.int64))
    torch.testing.assert_close(before, 100 * load.double() / 20)  # one slot each: the load share
    assert (top <= before).all() and float(top.max()) == pytest.approx(100 * float(slot_loads(load, phy2log, logcnt).max()) / 20)


def test_cli_eval_bad_data_options_one_line(tiny, folders, tmp_path):
    root, _ = tiny
    base = ["eval", str(root / "src"), str(root / "greedy"), "--seq-len", str(SEQ), "--max-tokens", str(TOKENS)]
    for extra, msg in ((["--split", "validation"], "--split does not apply"),  # the calibration source is a file
                       (["-d", str(folders[0] / "dd"), "--text-field", "nope"], "no column 'nope'"),
                       (["-d", str(folders[0] / "pq"), "--split", "dev"], "no parquet files of split 'dev'"),
                       (["--text-field", "x" * 300], "--text-field must be")):
        r = CliRunner().invoke(main, [*base, *extra])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and msg in lines[0], r.output
    with pytest.raises(RQError, match="contradicts"):  # checked before any hub access
        load_texts("some/name:en:train", config="fr")


def test_bundled_set_without_the_corpus_falls_back_to_its_unused_texts(tiny, monkeypatch):
    root, _ = tiny
    from rq_tool.eval import corpus

    def missing(d):
        raise RQError("corpus 'prose' is not installed on this machine")

    monkeypatch.setattr(corpus, "heldout_texts", missing)
    tok = load_tokenizer(root / "src")
    _, texts = load_texts("math")
    cal = {"dataset": "math", "sha256": texts_sha256(texts), "seed": 0, "texts_used": 10,
           "source": {"kind": "bundled", "spec": "math", "path": None}}
    ho = load_heldout(tok, calibration=cal, seq_len=SEQ, max_tokens=TOKENS)
    _, unused = split_used(texts, 0, 10)
    assert ho.held_out and list(ho.domains) == ["math"] and ho.sha256["math"] == texts_sha256(unused)

"""rq eval / rq report end to end on a tiny random Qwen3-MoE (small and quick)."""

import json

import pytest
import torch
from click.testing import CliRunner

from rq_tool.calibrate import calibrate
from rq_tool.errors import RQError
from rq_tool.eval import BASELINES, baseline_results, evaluate, markdown_table, target_checks
from rq_tool.eval.cli import _weights, eval_cmd, report
from rq_tool.eval.compare import compare, header_expert_bytes, score_original, score_rewritten
from rq_tool.eval.heldout import load_heldout
from rq_tool.source import load_tokenizer
from rq_tool.rewrite import rewrite
from tiny_models import save_tiny, write_texts

SEQ, TOKENS, BATCH = 32, 32 * 8, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny("qwen3_moe", root / "src")
    write_texts(root / "cal.jsonl", 120, seed=0)
    write_texts(root / "a.jsonl", 40, seed=1)
    write_texts(root / "b.jsonl", 40, seed=2)
    prof = calibrate(root / "src", str(root / "cal.jsonl"), num_samples=16, seq_len=SEQ, batch_size=4, progress=False)
    res = rewrite(root / "src", prof, root / "greedy", progress=False)
    return root, prof, res


def _eval(root, out, **kw):
    return evaluate(root / "src", root / out, datasets=[str(root / "a.jsonl"), str(root / "b.jsonl")], seq_len=SEQ,
                    max_tokens=TOKENS, batch_size=BATCH, **kw)


def test_eval_end_to_end(tiny):
    root, prof, res = tiny
    out = _eval(root, "greedy", domain_weights={"a.jsonl": 1.0, "b.jsonl": 1.0})
    orig, new = out["results"]
    # equal shares of equal-size domains: the mixture is the plain pool
    m = new["matched"]
    assert m["weights"] == {"a.jsonl": 0.5, "b.jsonl": 0.5}
    assert m["lis"]["mean_after"] == pytest.approx(new["lis"]["mean_after"])
    assert m["quality"]["ppl_delta_pct"] == pytest.approx(new["quality"]["heldout"]["ppl_delta_pct"])
    assert "| greedy |" in markdown_table(out["results"], pool="matched")
    assert orig["name"] == "original" and new["name"] == "greedy"
    for d in ("a.jsonl", "b.jsonl", "heldout"):
        q = new["quality"][d]
        assert q["candidate"]["ppl"] > 1 and 0 <= q["candidate"]["acc"] <= 1
        assert q["ppl_delta_pct"] == pytest.approx(100 * (q["candidate"]["ppl"] / q["original"]["ppl"] - 1))
    # the original against itself changes nothing
    assert orig["quality"]["heldout"]["ppl_delta_pct"] == 0 and orig["lis"]["excess_removed"] == 0
    # bytes from the headers are the plan's bytes, layer by layer
    assert [x["after"] for x in new["bytes"]["layers"]] == [lp.bytes_after for lp in res.plan.layers]
    assert new["bytes"]["before"] == sum(lp.bytes_before for lp in res.plan.layers)
    # slot-level LIS uses the runtime's P slots
    assert [x["slots"] for x in new["lis"]["layers"]] == [lp.num_physical for lp in res.plan.layers]
    li = new["lis"]
    assert li["excess_removed"] == pytest.approx((li["mean_before"] - li["mean_after"]) / (li["mean_before"] - 1))
    assert set(new["ep"]) == {"2", "4", "8"}
    assert orig["ep"]["8"]["before"] == pytest.approx(orig["lis"]["mean_before"])  # 8 experts on 8 devices
    assert new["placement_planned_on"] == "calibration"
    assert "| greedy |" in markdown_table(out["results"])
    json.dumps(out)  # JSON-ready


def test_replicas_only_keep_quality_and_counters_add_up(tiny, tmp_path):
    root, prof, _ = tiny
    rewrite(root / "src", prof, tmp_path / "rep", strategy="replicate-only", progress=False)
    ho = load_heldout(load_tokenizer(root / "src"), [str(root / "a.jsonl")], seq_len=SEQ, max_tokens=TOKENS)
    orig = score_original(root / "src", ho, batch_size=BATCH)
    s = score_rewritten(tmp_path / "rep", root / "src", ho, batch_size=BATCH)
    m = s.measure.domains["a.jsonl"]
    for l, p2l in enumerate(s.measure.phy2log):
        # every slot token is one logical token: per-expert sums of slot counts are the loads
        per_expert = torch.zeros(8, dtype=torch.int64).index_add_(0, p2l, m.slot_load[l])
        assert torch.equal(per_expert, m.load[l])
        assert torch.equal(m.load[l], orig.measure.domains["a.jsonl"].load[l])  # exact replicas: same routing
    res = compare(orig, s, ho)
    assert abs(res["quality"]["heldout"]["ppl_delta_pct"]) < 1e-3
    assert res["bytes"]["ratio"] > 1.0 and res["lis"]["mean_after"] < res["lis"]["mean_before"]


def test_eval_refuses_the_calibration_set(tiny):
    root, _, _ = tiny
    with pytest.raises(RQError, match="calibration set"):
        evaluate(root / "src", root / "greedy", datasets=[str(root / "cal.jsonl")], seq_len=SEQ, max_tokens=TOKENS)


def test_baselines_uniform_int8_and_laser(tiny, tmp_path):
    root, prof, _ = tiny
    ho = load_heldout(load_tokenizer(root / "src"), [str(root / "a.jsonl")], seq_len=SEQ, max_tokens=TOKENS)
    rows = baseline_results(root / "src", prof, ho, tmp_path, names=("original", "uniform-int8", "laser"),
                            batch_size=BATCH)
    assert [r["name"] for r in rows] == ["original", "uniform-int8", "laser"]
    uni = rows[1]
    # every expert int8, no replicas: int8 bytes of 8 experts, loads untouched by storage alone at layer 0
    hdr = header_expert_bytes(tmp_path / "uniform-int8")
    assert uni["bytes"]["after"] == sum(hdr.values())
    assert all(x["slots"] == 8 for x in uni["lis"]["layers"])
    assert uni["bytes"]["ratio"] == pytest.approx((2 * 32 * 64 + 4 * 2 * 32 + 64 * 32 + 4 * 64) / (3 * 32 * 64 * 4))
    assert uni["lis"]["layers"][0]["after"] == pytest.approx(uni["lis"]["layers"][0]["before"])
    assert rows[2]["bytes"]["ratio"] == 1.0 and rows[2]["policy_stats"]
    checks = target_checks(rows, name="uniform-int8")
    assert [c["met"] for c in checks][0] is True and len(checks) == 4
    assert set(BASELINES) >= {"original", "paper", "greedy", "replicate-only", "uniform-int8", "frequency", "laser"}


def test_cli_eval_json_and_report_pngs(tiny, tmp_path):
    root, _, _ = tiny
    r = CliRunner().invoke(eval_cmd, [str(root / "src"), str(root / "greedy"), "-d", str(root / "a.jsonl"),
                                      "--seq-len", str(SEQ), "--max-tokens", str(TOKENS), "--devices", "2,4",
                                      "--weights", "a.jsonl=1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res["results"][1]["ep"]) == {"2", "4"} and res["results"][1]["matched"]["weights"] == {"a.jsonl": 1.0}
    for bad in ("a=x", "a=-1", "=1", "a=0"):
        with pytest.raises(RQError, match="--weights"):
            _weights(bad)
    r = CliRunner().invoke(report, [str(root / "greedy" / "rq_profile.json"), "--compare", str(root / "greedy"),
                                    "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    for name in ("load_before.png", "load_after.png", "lis_per_layer.png"):
        png = (tmp_path / "rep" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

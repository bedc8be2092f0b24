"""Evaluation records and summaries, paired comparison, result round-trip."""

import pytest
from conftest import make_model, make_tokenizer

from lrs.errors import LRSError
from lrs.evaluate import compare, evaluate, load_result, summary_line
from lrs.tasks import Problem

PROBS = [Problem(id=f"p{i}", task="toy", question=f"q{i}", answer="7") for i in range(4)]


def test_evaluate_writes_and_reads_back(tmp_path, monkeypatch):
    import lrs.evaluate as ev
    from lrs.grading import Grade

    monkeypatch.setattr(
        ev, "grade", lambda outs, golds: [Grade("7", i < 3, "math-verify", False) for i in range(len(outs))]
    )
    res = evaluate(
        make_model("qwen2"), make_tokenizer(), PROBS, out_dir=tmp_path, max_new_tokens=3, progress=False
    )
    s = res["summary"]
    assert s["n"] == 4 and s["accuracy"] == 0.75 and s["ci95"][0] <= 0.75 <= s["ci95"][1]
    assert s["mean_tokens"] == 3 and s["truncated"] == 4 and s["max_new_tokens"] == 3
    back = load_result(tmp_path, "base")
    assert back["records"] == res["records"] and back["summary"]["accuracy"] == 0.75
    assert summary_line(s).startswith("base: accuracy 75.0%")


def test_compare_counts_fixed_and_broken():
    base = {"records": [{"id": i, "correct": c} for i, c in enumerate([0, 0, 1, 1, 0])]}
    other = {"records": [{"id": i, "correct": c} for i, c in enumerate([1, 1, 1, 0, 0])]}
    cmp = compare(base, other)
    assert (cmp["fixed"], cmp["broken"]) == (2, 1) and cmp["mcnemar_p"] == 1.0
    with pytest.raises(LRSError, match="different problem sets"):
        compare(base, {"records": other["records"][:2]})


def test_empty_problem_list_is_refused():
    with pytest.raises(LRSError, match="no problems"):
        evaluate(make_model("qwen2"), make_tokenizer(), [], progress=False)

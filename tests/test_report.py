"""Report: table values, CI width statement, plots written, clear error without results."""

import pytest

from lrs.errors import LRSError
from lrs.evaluate import write_result
from lrs.report import write_report


def _res(method, correct, steer=None):
    s = dict(
        method=method,
        n=len(correct),
        accuracy=sum(correct) / len(correct),
        ci95=[0.1, 0.9],
        mean_tokens=100,
        wall_time_s=10,
        model="m",
        dtype="float32",
        max_new_tokens=64,
        batch_size=4,
        seed=0,
        task="toy",
    )
    if steer is not None:
        s["steering"] = {"steer_rate": steer}
    recs = [dict(id=f"p{i}", correct=c, events=[{"r": 0.4}, {"r": 0.6}]) for i, c in enumerate(correct)]
    return {"summary": s, "records": recs}


def test_report_table_and_plots(tmp_path):
    out = tmp_path / "eval" / "test"
    write_result(_res("base", [0, 0, 1, 1]), out, "base")
    write_result(_res("lrs", [1, 0, 1, 0], steer=0.2), out, "lrs")
    text = write_report(out, tmp_path).read_text()
    assert "| base | 4 | 50.0% (10.0%–90.0%) |" in text
    assert "| lrs | 4 | 50.0% (10.0%–90.0%) | +0.0% | 1 / 1 | 1 | 100 | 20.0% | 10 |" in text
    assert "±40%" in text
    for png in ("accuracy.png", "steer_rate.png", "reward_trace.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(LRSError, match="no results"):
        write_report(tmp_path / "eval" / "test")

"""`lrs demo` end to end on a tiny saved model: every stage runs, the report has all methods, reruns reuse."""

import argparse

from conftest import make_model, make_tokenizer

import lrs.traces
from lrs.demo import run_demo
from lrs.grading import Grade

PRESET = dict(train=24, dev=4, test=6, tokens=96, latents=4, grid="tiny", batch=8)


def test_demo_runs_all_stages_and_writes_report(tmp_path, monkeypatch):
    d = tmp_path / "tiny"
    make_model("llama", hidden=32).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    monkeypatch.setattr(
        lrs.traces,
        "grade",
        lambda outs, golds: [Grade("1", i % 3 == 0, "numeric", False) for i in range(len(outs))],
    )
    args = argparse.Namespace(
        model=str(d), dtype="float32", task="arith", run=str(tmp_path / "run"), seed=0, preset="quick"
    )
    report = run_demo(args, PRESET)
    text = report.read_text()
    for method in ("base", "lrs", "lrs-basic", "random", "diffmean"):
        assert f"| {method} | 6 |" in text
    assert (tmp_path / "run" / "tune.json").exists() and (tmp_path / "run" / "accuracy.png").exists()
    assert "Reward model" in text and "±" in text
    mtime = (tmp_path / "run" / "eval" / "test" / "lrs.jsonl").stat().st_mtime
    run_demo(args, PRESET)  # cached: nothing is regenerated
    assert (tmp_path / "run" / "eval" / "test" / "lrs.jsonl").stat().st_mtime == mtime

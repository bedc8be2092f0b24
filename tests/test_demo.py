"""`lrs demo` end to end on a tiny saved model: every stage runs, the report has all methods, reruns reuse."""

import json

from conftest import make_model, make_tokenizer

import lrs.traces
from lrs.config import ModelConfig
from lrs.demo import Preset, run_demo
from lrs.grading import Grade

PRESET = Preset(train=24, dev=4, test=6, tokens=96, latents=4, grid="tiny", batch=8)


def test_demo_runs_all_stages_and_writes_report(tmp_path, monkeypatch):
    d = tmp_path / "tiny"
    make_model("llama", hidden=32).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    monkeypatch.setattr(
        lrs.traces,
        "grade",
        lambda outs, golds: [Grade("1", i % 3 == 0, "numeric", False) for i in range(len(outs))],
    )
    mc = ModelConfig(model=str(d), dtype="float32", device="cpu")
    run = tmp_path / "run"
    report = run_demo(mc, "arith", PRESET, str(run))
    text = report.read_text()
    for method in ("base", "lrs", "lrs-basic", "random", "diffmean"):
        assert f"| {method} | 6 |" in text
    tune_files = list((run / "tune").glob("*/tune.json"))
    assert len(tune_files) == 1 and (run / "accuracy.png").exists()
    assert "Reward model" in text and "±" in text
    lrs_summary = json.loads((run / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert lrs_summary["steering"]["generated_steps"] > 0  # the steerer saw decode steps
    assert lrs_summary["key_parts"]["steerer"]["encoder"] and lrs_summary["device"] == "cpu"
    mtime = (run / "eval" / "arith" / "test" / "lrs.jsonl").stat().st_mtime
    run_demo(mc, "arith", PRESET, str(run))  # cached: nothing is regenerated
    assert (run / "eval" / "arith" / "test" / "lrs.jsonl").stat().st_mtime == mtime

"""`lrs demo` end to end on a tiny saved model: every stage runs, the report has all methods, reruns reuse."""

import json

from conftest import make_model, make_tokenizer

import lrs.traces
from lrs.config import ModelConfig
from lrs.demo import Preset, run_demo
from lrs.grading import Grade

# the shape of the shipped quick preset: sampled train traces, identity encoder, calibrated (quantile) gate
PRESET = Preset(
    train=12,
    dev=4,
    test=6,
    tokens=96,
    latents=4,
    grid="quick",
    batch=8,
    encoder="identity",
    samples=2,
    temperature=0.7,
)


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
    tuned = json.loads(tune_files[0].read_text())["best"]
    assert tuned["lrs"]["tau_r_quantile"] == 0.3 and tuned["random"] == tuned["lrs"]  # matched control
    traces = lrs.traces.TraceSet(run / "traces")
    assert len(traces) == 24 and traces.config["samples_per_problem"] == 2  # 12 problems x 2 samples
    assert json.loads((run / "encoder.json").read_text())["config"]["kind"] == "identity"
    assert "Reward model" in text and "±" in text
    lrs_summary = json.loads((run / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert lrs_summary["steering"]["generated_steps"] > 0  # the steerer saw decode steps
    assert lrs_summary["key_parts"]["steerer"]["encoder"] and lrs_summary["device"] == "cpu"
    mtime = (run / "eval" / "arith" / "test" / "lrs.jsonl").stat().st_mtime
    run_demo(mc, "arith", PRESET, str(run))  # cached: nothing is regenerated
    assert (run / "eval" / "arith" / "test" / "lrs.jsonl").stat().st_mtime == mtime

"""The `lrs` command line end to end on a tiny saved model: files written, one-line errors, exit codes."""

import json

import pytest
from conftest import make_model, make_tokenizer

import lrs.traces
from lrs.cli import main
from lrs.grading import Grade


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_model("qwen2", hidden=32).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return str(d)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--task", "nope"], "unknown task"),
        (["eval", "--model", "/no/such/model.gguf", "--limit", "2"], "not found"),
        (["collect", "--task", "arith", "--limit", "0"], "no problems"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    line = _err_line(capsys)
    assert line.startswith("lrs: error:") and message in line


def test_eval_writes_records_and_summary(model_dir, tmp_path, capsys):
    out = tmp_path / "res"
    argv = [
        "eval",
        "--model",
        model_dir,
        "--dtype",
        "float32",
        "--task",
        "arith",
        "--split",
        "dev",
        "--limit",
        "5",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    lines = (out / "base.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 5 and all(r["tokens"] <= 4 and r["correct"] is False for r in recs)
    summary = json.loads((out / "base.summary.json").read_text())
    assert summary["n"] == 5 and summary["accuracy"] == 0.0 and summary["ci95"][0] == 0.0
    assert summary["ci95"][1] == pytest.approx(0.4345, abs=1e-3)  # Wilson at 0/5, never [0, 0]
    assert summary["versions"]["torch"] and summary["seed"] == 0 and summary["dtype"] == "float32"
    assert "base: accuracy 0.0%" in capsys.readouterr().out


def test_pipeline_collect_fit_train_eval_lrs(model_dir, tmp_path, monkeypatch, capsys):
    # the random model is never right: label every other trace correct so stage 2 has two classes
    monkeypatch.setattr(
        lrs.traces,
        "grade",
        lambda outs, golds: [Grade("1", i % 2 == 0, "numeric", False) for i in range(len(outs))],
    )
    run = str(tmp_path / "run")
    common = ["--model", model_dir, "--dtype", "float32", "--task", "arith", "--run", run]
    assert main(["collect", *common, "--limit", "40", "--max-new-tokens", "40", "--layer", "1"]) == 0
    assert "40 traces on 40 problems: 20 correct" in capsys.readouterr().out
    assert main(["fit-encoder", *common, "--kind", "identity"]) == 0
    assert main(["train-reward", *common, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "reward model" in out and "prompt" in out
    # a second, problem-disjoint set (dev, sampled) repeats the report on other problems
    dev = str(tmp_path / "dev")
    argv = ["collect", *common, "--split", "dev", "--limit", "6", "--max-new-tokens", "20", "--layer", "1"]
    assert main([*argv, "--samples-per-problem", "2", "--temperature", "0.7", "--out", dev]) == 0
    out_rm = str(tmp_path / "rm2.safetensors")
    assert main(["train-reward", *common, "--epochs", "1", "--eval-traces", dev, "--out", out_rm]) == 0
    assert "held-out AUROC" in capsys.readouterr().out
    held = json.loads((tmp_path / "rm2.json").read_text())["metrics"]["heldout"]
    assert held["n_val"] == 12 and held["n_val_problems"] == 6
    argv = [
        "eval",
        *common,
        "--method",
        "lrs",
        "--split",
        "test",
        "--limit",
        "3",
        "--max-new-tokens",
        "40",
        "--alpha",
        "0.5",
        "--tau-r",
        "1.0",
        "--warmup",
        "1",
        "--every",
        "1",
        "--log-events",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert summary["steering"]["steer_rate"] > 0.9 and summary["steering"]["config"]["alpha"] == 0.5
    rec = json.loads((tmp_path / "run" / "eval" / "arith" / "test" / "lrs.jsonl").read_text().splitlines()[0])
    assert rec["steers"] > 0 and rec["events"][-1]["steered"] in (True, False)
    # a single-class trace set is refused with counts
    monkeypatch.setattr(
        lrs.traces, "grade", lambda outs, golds: [Grade(None, False, "none", False)] * len(outs)
    )
    assert (
        main(
            [
                "collect",
                *common,
                "--limit",
                "4",
                "--max-new-tokens",
                "8",
                "--layer",
                "1",
                "--out",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    assert main(["train-reward", *common, "--traces", str(tmp_path / "one")]) == 2
    assert "found 0 correct and 4 wrong" in _err_line(capsys)

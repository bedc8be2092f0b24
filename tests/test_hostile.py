"""Hostile and careless input: every case gives one `lrs: error:` line and exit 2 (or the right behaviour),
before any model is loaded where possible, and nothing already done is lost."""

import json
import shutil

import pytest
import torch
from conftest import build_trained_run
from safetensors.torch import save_file

from lrs.artifacts import tensor_hash
from lrs.cli import main
from lrs.runs import exclusive


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on arith with a tiny model: traces, identity encoder, reward model."""
    return build_trained_run(tmp_path_factory.mktemp("hostile"), limit=12, tokens=24, layers="-1")


def _one_line_error(capsys, code, *fragments):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("lrs: error:"), err
    for f in fragments:
        assert f in line, line
    return line


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--batch-size", "-1"], "--batch-size must be an integer >= 1, got -1"),
        (["--method", "lrs", "--alpha", "nan"], "--alpha must be a finite number"),
        (["--method", "lrs", "--alpha", "inf"], "--alpha must be a finite number"),
        (["--method", "lrs", "--tau-r", "2"], "--tau-r must be [0.0, 1.0]"),
        (["--method", "fewshot", "--shots", "-2"], "--shots must be an integer >= 0, got -2"),
        (["--method", "lrs", "--tau-r-quantile", "1.5"], "--tau-r-quantile must be [0.0, 1.0]"),
        (["--method", "lrs", "--tau-r", "0.5", "--tau-r-quantile", "0.2"], "give one of them"),
        (["--limit", "-3"], "--limit must be an integer >= 0"),
    ],
)
def test_bad_budgets_and_settings_fail_before_loading_a_model(extra, fragment, capsys, tmp_path):
    # the model path does not exist: the error must come from validation, before any loading
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--run", str(tmp_path / "r"), *extra]
    _one_line_error(capsys, main(argv), fragment)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["collect", "--samples-per-problem", "0"], "--samples-per-problem must be an integer >= 1"),
        (["collect", "--samples-per-problem", "2"], "needs --temperature > 0"),
        (["collect", "--temperature", "nan"], "--temperature must be a finite number"),
        (["train-reward", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["fit-encoder", "--latents", "4", "--topk", "8"], "--topk 8 exceeds --latents 4"),
        (["tune", "--methods", "lrs,cot"], "'cot' has no settings to tune"),
        (["tune", "--methods", "lrs", "--inherit", "random"], "write METHOD=SOURCE"),
        (["tune", "--methods", "lrs", "--inherit", "random=diffmean"], "'diffmean' is not among --methods"),
        (["tune", "--methods", "nonsense"], "unknown method 'nonsense'"),
    ],
)
def test_bad_stage_settings_are_one_line(argv, fragment, capsys, tmp_path):
    _one_line_error(capsys, main([*argv, "--run", str(tmp_path / "r")]), fragment)


def test_budget_beyond_the_context_is_refused(run, capsys):
    argv = ["eval", *run["common"], "--limit", "1", "--max-new-tokens", "1000000000"]
    _one_line_error(capsys, main(argv), "does not fit the context", "512 positions")


def test_wrong_kinds_of_paths_are_refused_before_work(run, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(
        capsys, main(["eval", *run["common"][:-2], "--run", str(f), "--limit", "1"]), "--run", "is a file"
    )
    argv = ["eval", *run["common"], "--limit", "1", "--out", str(f)]
    _one_line_error(capsys, main(argv), "--out", "is a file, not a directory")
    d = tmp_path / "adir"
    d.mkdir()
    _one_line_error(capsys, main(["fit-encoder", *run["common"], "--out", str(d)]), "is a directory")
    _one_line_error(capsys, main(["train-reward", *run["common"], "--out", str(d)]), "is a directory")
    assert list(d.iterdir()) == []  # nothing half-written left behind
    argv = ["collect", *run["common"], "--limit", "1", "--out", str(f)]
    _one_line_error(capsys, main(argv), "is a file, not a directory")


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run["run"], dst)
    return [*run["common"][:-1], str(dst)], dst


def test_corrupt_or_empty_tuning_results_are_one_line(run, tmp_path, capsys):
    common, dst = _copy(run, tmp_path)
    from lrs.config import SteerOverrides
    from lrs.runs import RunDir
    from lrs.stages import artefact_key

    tune = RunDir(dst).tune_file(artefact_key(RunDir(dst), SteerOverrides()))
    tune.parent.mkdir(parents=True)
    tune.write_text(json.dumps({"best": {}}))
    argv = ["eval", *common, "--method", "lrs", "--tuned", "--limit", "1", "--max-new-tokens", "4"]
    _one_line_error(capsys, main(argv), "has no choice for 'lrs'")
    tune.write_text('{"best": ')
    _one_line_error(capsys, main(argv), "not a tuning result")


def test_corrupt_results_manifest_and_artefacts_are_one_line(run, tmp_path, capsys):
    common, dst = _copy(run, tmp_path)
    argv = ["eval", *common, "--limit", "2", "--max-new-tokens", "4"]
    assert main(argv) == 0
    res = dst / "eval" / "arith" / "test" / "base.jsonl"
    res.write_text(res.read_text()[:-20])
    _one_line_error(capsys, main(["report", *common]), "corrupt result")
    # a reward model with flipped bytes
    rm = dst / "reward.safetensors"
    raw = bytearray(rm.read_bytes())
    raw[-3] ^= 0x40
    rm.write_bytes(bytes(raw))
    lrs_argv = ["eval", *common, "--method", "lrs", "--limit", "1", "--max-new-tokens", "4"]
    _one_line_error(capsys, main(lrs_argv), "do not match the hash")
    # a reward model whose weights are NaN (with a matching hash): refused, not a silent 0 % steer rate
    side = json.loads(rm.with_suffix(".json").read_text())
    good, _ = _copy(run, tmp_path / "g")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "g" / "run" / "reward.safetensors"))
    tensors["head.weight"] = torch.full_like(tensors["head.weight"], float("nan"))
    save_file(tensors, str(rm))
    side["hash"] = tensor_hash(tensors)
    rm.with_suffix(".json").write_text(json.dumps(side))
    _one_line_error(capsys, main(lrs_argv), "holds NaN or inf")
    # a truncated traces manifest
    mf = dst / "traces" / "manifest.json"
    mf.write_text(mf.read_text()[:200])
    _one_line_error(capsys, main(["fit-encoder", *common]), "corrupt manifest")


def test_nan_states_are_refused_by_train_reward(run, tmp_path, capsys):
    common, dst = _copy(run, tmp_path)
    mf = json.loads((dst / "traces" / "manifest.json").read_text())
    shard = dst / "traces" / mf["batches"][0]["shard"]
    from safetensors.torch import load_file

    t = load_file(str(shard))
    key = next(k for k in t if k.startswith("h."))
    t[key][0, 0] = float("nan")
    save_file(t, str(shard))
    import hashlib

    mf["batches"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (dst / "traces" / "manifest.json").write_text(json.dumps(mf))
    _one_line_error(capsys, main(["train-reward", *common, "--epochs", "1"]), "NaN or inf hidden states")
    assert not (dst / "reward.safetensors.tmp").exists()


def test_a_null_gold_answer_is_refused(run, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": None}) + "\n")
    argv = ["eval", *run["common"], "--task", f"jsonl:{data}", "--split", "all"]
    line = _one_line_error(capsys, main(argv))
    assert "answer" in line and "line 1" in line


def test_a_second_job_on_the_same_output_is_locked_out(run, tmp_path, capsys):
    common, dst = _copy(run, tmp_path)
    from lrs.runs import RunDir, cache_key

    out = RunDir(dst).eval_dir("arith", "test")
    lock = dst / ".locks" / f"eval-base-{cache_key({'out': str(out.resolve())})}.lock"
    with exclusive(lock, "x"):
        argv = ["eval", *common, "--limit", "1", "--max-new-tokens", "4"]
        _one_line_error(capsys, main(argv), "is in use by pid")
    assert main(argv) == 0  # free again afterwards

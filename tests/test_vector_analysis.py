"""``lrs analyze vectors`` on tiny random models: first-token shift, the norm-matched control, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, make_tokenizer

from lrs.analysis.vectors import (
    analyse_vectors,
    distribution_shift,
    first_token_logprobs,
    markdown,
    show,
)
from lrs.cli import main
from lrs.steering.vectors import SteeringVectors
from lrs.tasks import build_prompts, load_task
from lrs.trainers.analysis import final_norm, layer_norms, matched_random_vectors

TOP_KEYS = {
    "format",
    "vectors",
    "control",
    "norms",
    "logit_lens",
    "lens_layers",
    "first_token",
    "notes",
    "inputs",
}
SHIFT_KEYS = {
    "kl_mean",
    "kl_median",
    "kl_max",
    "tv_mean",
    "argmax_changed",
    "mass_moved",
    "rising",
    "falling",
}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    return build_prompts(tokenizer, load_task("arith", "dev", limit=8), style="base")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_model("qwen2").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _cli_args(model_dir, vectors, *extra) -> list[str]:
    return ["analyze", "vectors", "--vectors", str(vectors), "--device", "cpu", "--dtype", "float32",
            "--limit", "6", "--top", "3", *extra, "--model", str(model_dir)]  # fmt: skip


def test_first_token_logprobs_match_the_first_generate_step(tokenizer, prompts):
    model = make_model("qwen2")
    lp = first_token_logprobs(model, tokenizer, prompts, batch_size=3, progress=False)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert torch.allclose(lp, torch.log_softmax(out.scores[0].float(), -1), atol=1e-5)


def test_zero_vectors_move_nothing(tokenizer, prompts):
    model = make_model("qwen2")
    zero = SteeringVectors({0: torch.zeros(32), 1: torch.zeros(32)}, positions="all")
    base = first_token_logprobs(model, tokenizer, prompts, progress=False)
    s = distribution_shift(
        base, first_token_logprobs(model, tokenizer, prompts, zero, progress=False), tokenizer
    )
    assert s["kl_mean"] == 0.0 and s["kl_max"] == 0.0 and s["tv_mean"] == 0.0
    assert s["argmax_changed"] == 0.0 and s["mass_moved"] == 0.0
    assert all(r["delta"] == 0.0 for r in s["rising"] + s["falling"]) and len(s["rising"]) == 10


def test_dominant_last_layer_vector_substitutes_the_first_token(tokenizer, prompts):
    model = make_model("qwen2")
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # sharp distributions: the steered one is near one-hot
    v = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 1e4
    with torch.no_grad():
        target = int((model.lm_head.weight @ final_norm(model)(v)).argmax())
    base = first_token_logprobs(model, tokenizer, prompts, progress=False)
    assert (base.argmax(-1) != target).all()
    big = SteeringVectors({1: v}, positions="all")
    s = distribution_shift(
        base, first_token_logprobs(model, tokenizer, prompts, big, progress=False), tokenizer, 5
    )
    assert s["kl_mean"] > 1.0 and s["tv_mean"] > 0.5 and s["argmax_changed"] == 1.0
    assert s["rising"][0]["id"] == target and s["rising"][0]["delta"] > 0.5
    assert s["argmax_top"] == [dict(token=tokenizer.decode([target]), id=target, share=1.0)]
    assert s["falling"][0]["delta"] < 0 and s["mass_moved"] >= s["rising"][0]["delta"]


def test_generated_only_vectors_cannot_move_the_first_token(tokenizer, prompts):
    model = make_model("qwen2")
    vecs = SteeringVectors({1: torch.full((32,), 100.0)})  # positions "generated": from the 2nd token on
    r = analyse_vectors(model, tokenizer, vecs, prompts[:4], top=3, progress=False)
    assert r["first_token"]["trained"]["kl_max"] == 0.0 and r["first_token"]["control"]["kl_max"] == 0.0
    assert r["notes"] and "generated positions only" in r["notes"][0]


def test_control_matches_norms_and_positions(tokenizer, prompts):
    model = make_model("qwen2", layers=3)
    g = torch.Generator().manual_seed(0)
    vecs = SteeringVectors({L: torch.randn(32, generator=g) * (L + 1) for L in range(3)}, positions="all")
    ctrl = matched_random_vectors(vecs, seed=3)
    assert ctrl.positions == "all" and ctrl.source == "rl-random"
    for L, n in layer_norms(vecs).items():
        assert abs(layer_norms(ctrl)[L] - n) <= 1e-5 * max(1.0, n)
    r = analyse_vectors(model, tokenizer, vecs, prompts[:4], top=3, control_seed=3, progress=False)
    assert set(r) == TOP_KEYS - {"inputs"}
    for row in r["norms"]:
        assert row["control"] == pytest.approx(row["trained"], abs=1e-5)
    assert r["lens_layers"] == [0, 1, 2] and r["first_token"]["control"]["kl_mean"] > 0
    assert r["first_token"]["trained"]["kl_mean"] > 0 and not r["notes"]
    text = markdown(r)
    assert "## Logit lens" in text and "| 2 |" in text and "argmax first token changed" in text


def test_tokens_are_shown_escaped():
    assert show(" the") == "`' the'`" and show("\n") == "`'\\n'`" and show("a|b") == "`'a\\|b'`"
    assert show("`") == "`` '`' ``"


def test_cli_writes_json_and_markdown(model_dir, tmp_path, capsys):
    vecs = SteeringVectors(
        {0: torch.ones(32), 1: torch.arange(32.0)}, source="rl", provenance=dict(positions="all")
    )
    path = vecs.save(tmp_path / "vectors.safetensors")
    assert main(_cli_args(model_dir, path)) == 0
    text = capsys.readouterr().out
    assert "# Steering vectors analysis" in text and "## First generated token (6 prompts)" in text
    out = tmp_path / "vectors.analysis"
    r = json.loads((out / "vectors_analysis.json").read_text())
    assert set(r) == TOP_KEYS and r["format"] == "lrs.vectors-analysis/1"
    assert SHIFT_KEYS <= set(r["first_token"]["trained"]) and SHIFT_KEYS <= set(r["first_token"]["control"])
    assert (
        r["inputs"]["split"] == "dev"
        and r["inputs"]["limit"] == 6
        and len(r["first_token"]["trained"]["rising"]) == 3
    )
    assert set(r["logit_lens"]) == {"0", "1"} and set(r["logit_lens"]["0"]) == {"raw", "norm"}
    assert r["vectors"]["positions"] == "all" and [n["layer"] for n in r["norms"]] == [0, 1]
    assert all(set(n) == {"layer", "trained", "control", "cos"} and abs(n["cos"]) < 0.9 for n in r["norms"])
    assert (out / "vectors_analysis.md").read_text().startswith("# Steering vectors analysis")


def test_cli_model_defaults_to_provenance_and_checks_fingerprint(model_dir, tmp_path, capsys):
    prov = dict(positions="all", model=str(model_dir))
    good = SteeringVectors({1: torch.ones(32)}, provenance=prov).save(tmp_path / "good.safetensors")
    argv = _cli_args(model_dir, good, "--out", str(tmp_path / "o"))[:-2]  # no --model: the provenance's
    assert "--model" not in argv and main(argv) == 0
    assert (tmp_path / "o" / "vectors_analysis.json").exists()
    capsys.readouterr()
    bad = SteeringVectors({1: torch.ones(32)}, provenance=dict(prov, model_fingerprint="0" * 16))
    assert main(_cli_args(model_dir, bad.save(tmp_path / "bad.safetensors"))) == 2
    assert "not the model the vectors were trained on" in _error_line(capsys)


def _error_line(capsys) -> str:
    """The last stderr line (model loading may print progress bars above it): lrs's one-line error."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("lrs: error:") and sum("lrs: error:" in e for e in err) == 1, err
    return err[-1]


@pytest.mark.parametrize("content", [None, b"not safetensors", "sidecar-only"])
def test_cli_missing_or_invalid_vectors_is_one_line_exit_2(model_dir, tmp_path, capsys, content):
    path = tmp_path / "vectors.safetensors"
    if content == "sidecar-only":
        path.with_suffix(".json").write_text('{"format": "lrs.encoder/1"}')
    elif content is not None:
        path.write_bytes(content)
    assert main(_cli_args(model_dir, path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrs: error:"), err  # before the model is loaded
    assert not (tmp_path / "vectors.analysis").exists()


def test_cli_bad_top_is_refused_before_the_model_loads(tmp_path, capsys):
    path = SteeringVectors({0: torch.ones(32)}).save(tmp_path / "v.safetensors")
    argv = ["analyze", "vectors", "--vectors", str(path), "--top", "0", "--model", str(tmp_path / "none")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "lrs: error: --top must be >= 1, got 0"

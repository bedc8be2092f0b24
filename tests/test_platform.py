"""Platform guarantees: artefacts that know what they belong to, caches keyed by what produced them, the
user's own data as a test set, explicit devices, and a package without import cycles."""

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import build_trained_run, make_model

import lrs.traces
from lrs.cli import main
from lrs.encoders import TopKSAE
from lrs.errors import LRSError
from lrs.grading import Grade
from lrs.reward import RewardConfig, RewardModel
from lrs.steering import LatentRewardSteerer, check_model, check_pair


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on arith with a tiny model: traces, identity encoder, reward model."""
    return build_trained_run(tmp_path_factory.mktemp("platform"))


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


LRS_FLAGS = ["--method", "lrs", "--max-new-tokens", "40", "--tau-r", "1.0", "--warmup", "1", "--every", "1"]


def test_eval_a_three_line_jsonl_file_with_a_run_trained_on_arith(run, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    rows = [
        {"question": "What is 2 + 2?", "answer": "4"},
        {"problem": "What is 3 * 3?", "target": "9"},
        {"input": "What is 10 - 7?", "final_answer": "3"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", *run["common"], "--task", f"jsonl:{data}", "--split", "all", *LRS_FLAGS]
    assert main(argv) == 0
    out = run["run"] / "eval" / "jsonl-mine" / "all"
    summary = json.loads((out / "lrs.summary.json").read_text())
    assert summary["n"] == 3 and summary["device"] == "cpu" and summary["split"] == "all"
    assert summary["steering"]["generated_steps"] > 0 and summary["steering"]["steered_tokens"] > 0
    ids = [json.loads(x)["id"] for x in (out / "lrs.jsonl").read_text().splitlines()]
    assert ids == ["mine/0", "mine/1", "mine/2"]
    assert "lrs: accuracy" in capsys.readouterr().out


def test_a_changed_encoder_never_reuses_a_cached_eval_or_tune_result(run, tmp_path, capsys, monkeypatch):
    common = [*run["common"][:-1], str(tmp_path / "run2")]
    # a private copy of the run so refitting does not disturb the other tests
    import shutil

    shutil.copytree(run["run"], tmp_path / "run2")
    ev = ["eval", *common, "--task", "arith", "--split", "test", "--limit", "2", *LRS_FLAGS]
    assert main(ev) == 0
    first = json.loads((tmp_path / "run2" / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert main(ev) == 0
    assert "(cached" in capsys.readouterr().out  # same artefacts: reused
    tune = ["tune", *common, "--task", "arith", "--limit", "2", "--max-new-tokens", "12", "--grid", "tiny"]
    assert main(tune) == 0
    assert "(cached)" not in capsys.readouterr().out
    assert main(tune) == 0
    assert "dev lrs-k2-a0.1-r0.5-c0.72: 0.0% (cached)" in capsys.readouterr().out  # same artefacts: reused
    # refit the encoder (another kind, same width) and retrain the reward model on it
    monkeypatch.setattr(
        lrs.traces,
        "grade",
        lambda outs, golds: [Grade("1", i % 2 == 0, "numeric", False) for i in range(len(outs))],
    )
    assert main(["fit-encoder", *common, "--kind", "pca", "--latents", "8"]) == 0
    # the old reward model no longer matches the new encoder: refused before any generation
    assert main(ev) == 2
    assert "reward model reads 32 latents but the encoder has 8" in _err(capsys)
    assert main(["train-reward", *common, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(ev) == 0
    assert "(cached" not in capsys.readouterr().out
    second = json.loads((tmp_path / "run2" / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert second["cache_key"] != first["cache_key"]
    assert second["key_parts"]["steerer"]["encoder"] != first["key_parts"]["steerer"]["encoder"]
    assert main(tune) == 0
    assert "(cached)" not in capsys.readouterr().out  # the new artefacts get their own tune results
    tunes = list((tmp_path / "run2" / "tune").glob("*/tune.json"))
    assert len(tunes) == 2
    t = json.loads(tunes[0].read_text())
    assert set(t["best"]) == {"lrs", "lrs-basic", "random", "diffmean"}  # every method tuned on its own grid
    assert set(t["best"]["lrs-basic"]) == {"k", "alpha"} and set(t["beats_base_on_dev"]) == set(t["best"])
    assert {r["method"] for r in t["runs"]} == {"lrs", "lrs-basic", "random", "diffmean"}
    assert all(len(r["ci95"]) == 2 for r in t["runs"])
    # all-zero dev accuracy: the tie goes to the weakest intervention (smallest alpha)
    assert t["best"]["lrs"]["alpha"] == 0.1 and t["beats_base_on_dev"]["lrs"] is None  # tiny grid: no base
    assert main([*ev, "--tuned"]) == 0
    # tune only lrs; the matched control takes lrs's choice instead of its own grid
    shutil.rmtree(tmp_path / "run2" / "tune")
    assert main([*tune, "--methods", "lrs", "--inherit", "random=lrs"]) == 0
    t = json.loads(next((tmp_path / "run2" / "tune").glob("*/tune.json")).read_text())
    assert {r["method"] for r in t["runs"]} == {"lrs"}
    assert set(t["best"]) == {"lrs", "random"} and t["best"]["random"] == t["best"]["lrs"]
    # the calibrated grid tunes the reward gate as a quantile of r; eval --tuned then gates at that quantile
    shutil.rmtree(tmp_path / "run2" / "tune")
    assert main([*tune, "--grid", "quantile", "--methods", "lrs", "--inherit", "random=lrs"]) == 0
    assert "dev lrs-k2-a0.1-q0.1-c0.72" in capsys.readouterr().out
    t = json.loads(next((tmp_path / "run2" / "tune").glob("*/tune.json")).read_text())
    assert (
        set(t["best"]["lrs"]) == {"k", "alpha", "tau_r_quantile", "tau_c"}
        and t["best"]["random"] == t["best"]["lrs"]
    )
    assert main([*ev, "--tuned", "--force"]) == 0  # an explicit --tau-r replaces the tuned quantile gate
    s = json.loads((tmp_path / "run2" / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert s["key_parts"]["steerer"]["config"]["tau_r_quantile"] is None
    quantile_ev = [a for a in ev if a not in ("--tau-r", "1.0")]
    assert main([*quantile_ev, "--tuned", "--force"]) == 0
    s = json.loads((tmp_path / "run2" / "eval" / "arith" / "test" / "lrs.summary.json").read_text())
    assert s["key_parts"]["steerer"]["config"]["tau_r_quantile"] == t["best"]["lrs"]["tau_r_quantile"]
    # the summary records the tau_r the gate used (the quantile's value), not the unused default
    from lrs.reward import load_reward_model
    from lrs.reward.model import reward_quantile

    rm = load_reward_model(tmp_path / "run2" / "reward.safetensors")
    q = reward_quantile(rm, t["best"]["lrs"]["tau_r_quantile"])
    assert s["steering"]["config"]["tau_r"] == float(q) != s["key_parts"]["steerer"]["config"]["tau_r"]
    # a tuned setting that lost to base on dev is still evaluated (the comparison needs it), with a warning
    tf = next((tmp_path / "run2" / "tune").glob("*/tune.json"))
    t["beats_base_on_dev"] = {"lrs": False}
    tf.write_text(json.dumps(t))
    capsys.readouterr()
    assert main([*quantile_ev, "--tuned"]) == 0
    err = capsys.readouterr().err
    assert "lrs's tuned setting did not beat base on dev" in err and err.count("warning") == 1


def test_tuned_without_a_tune_for_these_artefacts_is_one_line(run, tmp_path, capsys):
    argv = [
        "eval",
        *run["common"][:-1],
        str(tmp_path / "empty-run"),
        "--method",
        "lrs",
        "--tuned",
        "--limit",
        "1",
    ]
    import shutil

    shutil.copytree(run["run"], tmp_path / "empty-run", ignore=shutil.ignore_patterns("tune"))
    assert main(argv) == 2
    assert "no tuning result for these artefacts" in _err(capsys)


def test_device_cuda_without_cuda_is_one_line_and_exit_2(run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["eval", "--model", run["model"], "--device", "cuda", "--limit", "1", "--task", "arith"]
    assert main(argv) == 2
    line = _err(capsys)
    assert line.startswith("lrs: error: --device cuda") and "no CUDA" in line
    assert main(["doctor", "--device", "cuda"]) == 2
    assert main(["doctor", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "device        cpu" in out and "float32" in out


def _tiny_pair(n=8, layer=1, d=32):
    enc = TopKSAE(d, n_latents=n, k=3, layer=layer)
    rm = RewardModel(n, RewardConfig(d_model=16, n_layers=1, n_heads=2, window=16, dropout=0.0))
    return enc, rm


def test_mismatched_artefacts_are_refused_with_one_line_each():
    from lrs.encoders import encoder_hash

    enc, rm = _tiny_pair()
    rm.provenance = dict(encoder_hash=encoder_hash(enc), layer=1)
    check_pair(enc, rm)  # the matching pair passes
    other, _ = _tiny_pair()
    with torch.no_grad():
        other.W_enc.add_(1.0)
    cases = [
        (lambda: check_pair(other, rm), "trained on another encoder"),
        (lambda: check_pair(_tiny_pair(n=4)[0], rm), "reads 8 latents but the encoder has 4"),
        (lambda: check_pair(_tiny_pair(layer=0)[0], RewardModel(8)), None),  # no provenance: width only
    ]
    rm_layer = RewardModel(8)
    rm_layer.provenance = dict(layer=0)
    cases.append((lambda: check_pair(enc, rm_layer), "trained at layer 0 but the encoder reads layer 1"))
    model = make_model("qwen2", hidden=32)
    cases.append((lambda: check_model(_tiny_pair(d=64)[0], model), "encoder width 64 does not match"))
    cases.append((lambda: check_model(_tiny_pair(layer=5)[0], model), "reads layer 5 but the model has 2"))
    foreign = _tiny_pair()[0]
    foreign.provenance = dict(model_fingerprint="0123456789abcdef")
    cases.append((lambda: check_model(foreign, model), "fitted on another model"))
    for fn, message in cases:
        if message is None:
            fn()
            continue
        with pytest.raises(LRSError, match=message) as e:
            fn()
        assert "\n" not in str(e.value)
    with pytest.raises(LRSError, match="trained on another encoder"):
        LatentRewardSteerer(other, rm)


def test_no_import_cycles_in_the_package():
    """Every import between lrs modules (module-level and inside functions) forms a DAG."""
    root = Path(__file__).resolve().parents[1] / "src" / "lrs"
    mods = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = path
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lrs"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("lrs")]
            for t in targets:
                if t in mods and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    for pkg in [m for m in mods if mods[m].name == "__init__.py"]:
        graph[pkg] = {t for t in graph[pkg] if not t.startswith(pkg + ".")}  # re-exports of own submodules
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, t]))
            if t not in state:
                visit(t, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_train_vectors_then_evaluate_them_from_the_cli(run, tmp_path, capsys):
    common = [*run["common"][:-1], str(tmp_path / "rl-run")]
    argv = [
        "train-vectors",
        *common,
        "--task",
        "arith",
        "--limit",
        "8",
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
    ]
    assert main([*argv, "--k", "2", "--max-new-tokens", "8", "--checkpoint-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained bias (verifier) for 2 steps" in out
    vec = tmp_path / "rl-run" / "rl" / "bias-verifier" / "vectors.safetensors"
    assert vec.exists() and (tmp_path / "rl-run" / "rl" / "bias-verifier" / "train_log.jsonl").exists()
    ev = [
        "eval",
        *common,
        "--method",
        "vectors",
        "--vectors",
        str(vec),
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
    ]
    assert main(ev) == 0
    s = json.loads((tmp_path / "rl-run" / "eval" / "arith" / "test" / "vectors.summary.json").read_text())
    assert s["steering"]["source"] == "rl" and s["key_parts"]["steerer"]["positions"] == "all"
    assert s["steering"]["generated_steps"] > 0
    ev_rnd = ["eval", *common, "--method", "vectors-random", "--vectors", str(vec), "--limit", "2"]
    assert main([*ev_rnd, "--max-new-tokens", "6"]) == 0
    r = json.loads(
        (tmp_path / "rl-run" / "eval" / "arith" / "test" / "vectors-random.summary.json").read_text()
    )
    assert r["steering"]["source"] == "rl-random" and r["key_parts"]["steerer"]["positions"] == "all"
    assert main(["eval", *common, "--method", "vectors", "--limit", "1"]) == 2
    assert "needs --vectors FILE" in capsys.readouterr().err

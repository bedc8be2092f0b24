"""Best-of-N by the latent reward: selector semantics, hand-computed accuracies and p-values, the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import build_trained_run

from lrs.cli import main
from lrs.errors import LRSError
from lrs.selection import Candidate, best_of_n, pick
from lrs.stats import mcnemar_exact


def cand(sample, correct, answer, reward, conf=(0.5,)):
    return Candidate(sample, correct, answer, np.asarray(reward, float), np.asarray(conf, float))


def test_each_selector_picks_what_it_promises():
    cs = [
        cand(2, True, "7", reward=[0.0, 3.0], conf=[0.9, 0.9]),  # best at the end
        cand(0, False, "5", reward=[2.0, 2.0], conf=[0.1, 0.2]),  # best on average; sample 0
        cand(1, False, "5", reward=[-1.0, 1.0], conf=[0.95, 0.99]),  # most confident
        cand(3, True, "7", reward=[-4.0, -4.0]),
    ]
    assert pick(cs, "reward_end").sample == 2
    assert pick(cs, "reward_mean").sample == 0
    assert pick(cs, "confidence").sample == 1
    assert pick(cs, "random").sample == 0
    assert pick(cs, "majority").sample == 0  # "5" and "7" tie 2-2: the earliest sample among the tied answers
    cs.append(cand(4, True, "7", reward=[0.0]))
    assert pick(cs, "majority").sample == 2  # "7" now wins 3-2: its earliest sample
    none = [cand(1, False, None, [0.0]), cand(0, False, None, [1.0])]
    assert pick(none, "majority").sample == 0  # nothing extracted: the random pick
    with pytest.raises(LRSError, match="unknown selector"):
        pick(cs, "oracle")


def test_best_of_n_accuracies_and_paired_tests_equal_hand_computed_values():
    # p0: the reward picks the right one, random (sample 0) is wrong; p1: both right; p2: none right
    probs = {
        "p0": [cand(0, False, "1", [0.0]), cand(1, True, "2", [5.0]), cand(2, False, "1", [1.0])],
        "p1": [cand(0, True, "3", [0.0]), cand(1, True, "3", [1.0])],
        "p2": [cand(0, False, "4", [0.0]), cand(1, False, "5", [1.0])],
        "solo": [cand(0, True, "9", [0.0])],  # one sample: not usable
    }
    res = best_of_n(probs)
    assert res["n_problems"] == 3 and res["samples_per_problem"] == {2: 2, 3: 1}
    assert res["mixed_problems"] == 1
    assert res["random_expected"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert res["pass_at_n"] == pytest.approx(2 / 3)
    s = res["selectors"]
    assert s["reward_end"]["accuracy"] == pytest.approx(2 / 3) and s["random"]["accuracy"] == pytest.approx(
        1 / 3
    )
    assert s["majority"]["accuracy"] == pytest.approx(1 / 3)  # p0: "1" twice (wrong)
    assert s["reward_end"]["vs_random"] == dict(fixed=1, broken=0, mcnemar_p=mcnemar_exact(1, 0))
    assert s["reward_end"]["vs_majority"]["fixed"] == 1 and "vs_random" not in s["random"]
    lo, hi = s["reward_end"]["ci95"]
    assert lo < 2 / 3 < hi
    with pytest.raises(LRSError, match="at least 2 samples"):
        best_of_n({"solo": probs["solo"]})


def test_best_of_n_command_on_sampled_traces(tmp_path, capsys):
    run = build_trained_run(tmp_path, limit=12, tokens=24, layers="-1")
    sampled = tmp_path / "sampled"
    argv = ["collect", *run["common"], "--split", "dev", "--limit", "5", "--max-new-tokens", "24",
            "--layers", "-1", "--samples-per-problem", "3", "--temperature", "0.7", "--out", str(sampled)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["best-of-n", *run["common"], "--traces", str(sampled)]) == 0
    out = capsys.readouterr().out
    assert "best-of-N on 5 problems" in out and "reward_end" in out
    res = json.loads((sampled / "best-of-n.json").read_text())
    assert res["n_problems"] == 5 and res["samples_per_problem"] == {"3": 5}
    assert set(res["selectors"]) == {"reward_end", "reward_mean", "confidence", "majority", "random"}
    # greedy (one sample per problem) traces are refused with one line
    assert main(["best-of-n", *run["common"], "--traces", str(run["run"] / "traces")]) == 2
    assert "at least 2 samples" in capsys.readouterr().err


def test_eval_method_bon_keeps_the_sample_the_reward_picks_and_reuses_samples(tmp_path, capsys, monkeypatch):
    import lrs.traces
    from lrs.encoders import load_encoder
    from lrs.evaluate import load_result
    from lrs.grading import Grade
    from lrs.reward import load_reward_model, score_traces
    from lrs.traces import TraceSet

    run = build_trained_run(tmp_path, limit=12, tokens=24, layers="-1")
    # the random model is never right: call a completion right when its length is even (mixed problems)
    monkeypatch.setattr(
        lrs.traces,
        "grade",
        lambda outs, golds: [Grade(str(len(o) % 3), len(o) % 2 == 0, "numeric", False) for o in outs],
    )
    out = tmp_path / "ev"
    argv = ["eval", *run["common"], "--split", "dev", "--limit", "5", "--max-new-tokens", "24", "--method", "bon",
            "--n", "3", "--temperature", "0.9", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = load_result(out, "bon")
    recs, s = res["records"], res["summary"]
    assert len(recs) == 5 and s["samples_per_problem"] == 3 and s["select"] == "reward_end"
    (samples_dir,) = out.glob("bon-samples-*")
    ts = TraceSet(samples_dir)
    enc = load_encoder(run["run"] / "encoder.safetensors")
    rm = load_reward_model(run["run"] / "reward.safetensors")
    text = {(r["problem_id"], r["sample"]): r["text"] for r in ts.records}
    states = {(t.problem_id, r["sample"]): t.hidden[enc.layer] for t, r in zip(ts, ts.records, strict=True)}
    for r in recs:
        smp = r["bon"]["samples"]
        assert [x["sample"] for x in smp] == [0, 1, 2]
        ends = [x["reward_end"] for x in smp]
        assert r["bon"]["picked"] == ends.index(max(ends))  # the highest end-of-trace reward, ties: lowest
        picked = smp[r["bon"]["picked"]]
        assert r["correct"] == picked["correct"] and r["output"] == text[(r["id"], picked["sample"])]
        # the score is the reward model's on that very sample's recorded states
        with torch.no_grad():
            (sc,) = score_traces(rm, [enc.encode(states[(r["id"], picked["sample"])]).float()])
        assert float(sc[-1]) == pytest.approx(picked["reward_end"], abs=1e-5)
    assert s["accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs]))
    assert s["selectors"]["reward_end"]["accuracy"] == pytest.approx(s["accuracy"])
    assert s["selectors"]["random"]["accuracy"] == pytest.approx(
        np.mean([r["bon"]["samples"][0]["correct"] for r in recs])
    )
    assert s["generated_tokens"] == sum(x["tokens"] for r in recs for x in r["bon"]["samples"])
    assert 0 < s["mixed_problems"] <= 5
    capsys.readouterr()
    # the same command: the cached result; another selector: the same samples, picked again, no new generation
    assert main(argv) == 0 and "cached" in capsys.readouterr().out
    monkeypatch.setattr(lrs.traces, "_recorded", lambda *a, **k: pytest.fail("bon generated again"))
    assert main([*argv, "--select", "majority"]) == 0
    maj = load_result(out, "bon")
    assert maj["summary"]["select"] == "majority" and len(list(out.glob("bon-samples-*"))) == 1
    assert maj["summary"]["accuracy"] == pytest.approx(s["selectors"]["majority"]["accuracy"])
    # it pairs with greedy base in the report like any method
    monkeypatch.undo()
    i = argv.index("bon")
    assert main([*argv[:i], "base", *argv[i + 1 :]]) == 0
    assert main(["report", *run["common"], "--results", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert (
        "| bon | 5 | best-of-3 by majority (T = 0.9) |" in md
        and "bon: the pick among 3 samples at T = 0.9" in md
    )
    # best-of-N steers nothing: no rectification commands for it (it refuses --log-tokens)
    assert "Rectification pairs base with a steered run; this report has no steered run." in md
    assert "lrs eval --method lrs    --log-tokens" not in md and "bon carry no token ids" not in md


def test_eval_method_bon_refuses_bad_settings_with_one_line(tmp_path, capsys):
    run = build_trained_run(tmp_path, limit=8, tokens=16, layers="-1")
    capsys.readouterr()
    base = [
        "eval",
        *run["common"],
        "--split",
        "dev",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--method",
        "bon",
    ]
    for extra, msg in (
        (["--n", "1"], "--n 2 or more"),
        (["--temperature", "0"], "--temperature above 0"),
        (["--reward", str(tmp_path / "none.safetensors")], "needs a reward model"),
        (["--log-tokens"], "--log-tokens/--shadow do not apply"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "Loading weights" not in err  # refused before the model loads
        (line,) = [x for x in err.splitlines() if "error" in x]
        assert line.startswith("lrs: error: ") and msg in line
    assert main(["tune", *run["common"], "--methods", "bon", "--limit", "2"]) == 2
    assert "no settings to tune" in capsys.readouterr().err

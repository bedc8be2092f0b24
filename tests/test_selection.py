"""Best-of-N by the latent reward: selector semantics, hand-computed accuracies and p-values, the CLI."""

import json

import numpy as np
import pytest
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

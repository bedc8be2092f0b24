"""Paired behaviour statistics: Holm, rank-biserial, McNemar and the per-problem rates against hand-computed
values, and the ``lrs analyze behaviour-diff`` command."""

import json

import numpy as np
import pytest
from scipy.stats import binomtest, wilcoxon

from lrs.analysis.behaviour_stats import (
    behaviour_diff,
    holm,
    keyed_traces,
    paired_tag_stats,
    rank_biserial,
    wilcoxon_p,
)
from lrs.cli import main
from lrs.errors import LRSError
from lrs.stats import bootstrap_ci

VERIFY = "Let's verify the total."
PLAIN = "The total is 4. The answer is 4."

BASE = [
    dict(id="a", output=PLAIN, tokens=10),
    dict(id="b", output=f"{VERIFY} {PLAIN}", tokens=20),
    dict(id="c", output=PLAIN, tokens=10),
    dict(id="d", output=PLAIN, tokens=40),
    dict(id="only_base", output=PLAIN, tokens=10),
]
METHOD = [
    dict(id="a", output=f"{VERIFY} {PLAIN}", tokens=20),
    dict(id="b", output=PLAIN, tokens=10),
    dict(id="c", output=f"{VERIFY} {PLAIN}", tokens=25),
    dict(id="d", output=f"{VERIFY} {PLAIN}", tokens=50),
]


def test_holm_adjusts_in_step_down_order():
    # sorted: 0.01·4 = 0.04, 0.03·3 = 0.09, 0.04·2 = 0.08 → 0.09 (monotone), 0.5·1; None is not in the family
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert holm([0.6, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


def test_rank_biserial_and_wilcoxon_on_hand_values():
    # |d| = 1, 2, 3 get ranks 1, 2, 3: R+ = 1 + 3, R- = 2, r = (4 - 2) / 6
    assert rank_biserial(np.array([1.0, -2.0, 3.0, 0.0])) == pytest.approx(1 / 3)
    assert rank_biserial(np.zeros(3)) is None
    assert wilcoxon_p(np.zeros(4), np.zeros(4)) == 1.0  # nothing changed
    b, m = np.array([0.0, 0, 1, 2, 0, 1]), np.array([1.0, 0, 3, 2, 2, 4])
    assert wilcoxon_p(b, m) == pytest.approx(wilcoxon(m, b, zero_method="pratt").pvalue)


def test_paired_tag_stats_equal_hand_computed_values():
    base, method = [0.0, 0.0, 1.0, 2.0, 0.0], [1.0, 0.0, 3.0, 2.0, 2.0]
    bp, mp = [False, True, True, True, False], [True, False, True, True, True]
    s = paired_tag_stats(base, method, bp, mp, n_boot=2000, seed=3)
    assert s["n"] == 5 and s["base_mean"] == pytest.approx(0.6) and s["method_mean"] == pytest.approx(1.6)
    assert s["mean_diff"] == pytest.approx(1.0)
    assert s["mean_diff_ci95"] == list(bootstrap_ci([1.0, 0.0, 2.0, 0.0, 2.0], n_boot=2000, seed=3))
    assert s["rank_biserial"] == 1.0  # every change is an increase
    assert (s["gained"], s["lost"]) == (2, 1) and (s["base_present"], s["method_present"]) == (3, 4)
    assert s["mcnemar_p"] == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    with pytest.raises(LRSError, match="same problems"):
        paired_tag_stats([0.0], [0.0, 1.0], [False], [False, True])


def test_behaviour_diff_pairs_by_id_with_per_1k_and_sentence_rates():
    base, method = keyed_traces(BASE, "base", "base"), keyed_traces(METHOD, "lrs", "lrs")
    r = behaviour_diff(base, method, n_boot=500)
    assert (r["n_pairs"], r["base_only"], r["method_only"]) == (4, 1, 0)
    v = r["tags"]["verification"]
    # one verification instance: base 0, 1000/20, 0, 0; method 1000/20, 0, 1000/25, 1000/50 per 1k tokens
    assert v["base_mean"] == pytest.approx(50 / 4) and v["method_mean"] == pytest.approx((50 + 40 + 20) / 4)
    assert v["mean_diff"] == pytest.approx((50 - 50 + 40 + 20) / 4)
    assert (v["gained"], v["lost"]) == (3, 1) and v["mcnemar_p"] == pytest.approx(binomtest(3, 4, 0.5).pvalue)
    assert (v["base_instances"], v["method_instances"]) == (1, 3)
    assert r["problems"][0]["id"] == "a" and r["problems"][0]["rates"]["verification"] == [0.0, 50.0]
    ps = [r["tags"][t]["wilcoxon_p"] for t in r["tags"]]
    assert [r["tags"][t]["wilcoxon_p_holm"] for t in r["tags"]] == pytest.approx(holm(ps))
    assert r["tags"]["backtracking"]["mean_diff"] == 0.0 and r["tags"]["backtracking"]["wilcoxon_p"] == 1.0
    s = behaviour_diff(base, method, unit="sentence", n_boot=100)["tags"]["verification"]
    # sentences with the tag / sentences: base 0, 1/3, 0, 0; method 1/3, 0, 1/3, 1/3
    assert s["mean_diff"] == pytest.approx((1 / 3 - 1 / 3 + 1 / 3 + 1 / 3) / 4)
    assert r["lexicon"]["version"] and r["mean_tokens"] == {"base": 20.0, "method": 26.25}


def test_unpairable_inputs_are_refused():
    with pytest.raises(LRSError, match="occurs twice"):
        keyed_traces([BASE[0], BASE[0]], "base", "b.jsonl")
    other = keyed_traces([dict(id="zzz", output=PLAIN, tokens=3)], "lrs", "m")
    with pytest.raises(LRSError, match="share no problem ids"):
        behaviour_diff(keyed_traces(BASE, "base", "b"), other)
    with pytest.raises(LRSError, match="unknown rate unit"):
        behaviour_diff(keyed_traces(BASE, "base", "b"), other, unit="per-token")


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    b, m, out = tmp_path / "base.jsonl", tmp_path / "lrs.jsonl", tmp_path / "diff.json"
    b.write_text("".join(json.dumps(r) + "\n" for r in BASE))
    m.write_text("".join(json.dumps(r) + "\n" for r in METHOD))
    argv = ["analyze", "behaviour-diff", "--base", str(b), "--method", str(m)]
    assert main([*argv, "--out", str(out), "--n-boot", "200"]) == 0
    text = capsys.readouterr().out
    assert "lrs vs base: 4 paired problems" in text and "verification" in text and "1 only in base" in text
    r = json.loads(out.read_text())
    assert r["format"] == "lrs.behaviour-diff/1" and r["tags"]["verification"]["gained"] == 3
    assert r["inputs"] == {"base": str(b), "method": str(m)} and r["n_boot"] == 200
    assert main([*argv, "--out", str(tmp_path)]) == 2  # a directory
    assert (
        main(["analyze", "behaviour-diff", "--base", str(tmp_path / "nope.jsonl"), "--method", str(m)]) == 2
    )
    assert "no such file" in capsys.readouterr().err

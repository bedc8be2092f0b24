"""Proportion CIs (Wilson, Clopper-Pearson), bootstrap CI, paired comparison with exact McNemar, AUROC and within-group AUROC against hand-computed values."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lrs.errors import LRSError
from lrs.stats import (
    auroc,
    bootstrap_ci,
    format_comparison,
    grouped_auroc_ci,
    mcnemar_exact,
    paired_comparison,
    proportion_ci,
    within_group_auroc,
)


def test_bootstrap_ci_brackets_the_mean_with_the_expected_width():
    values = [1] * 50 + [0] * 50
    lo, hi = bootstrap_ci(values, seed=0)
    assert lo < 0.5 < hi
    assert 0.15 < hi - lo < 0.25  # normal approximation: 2 * 1.96 * 0.05 = 0.196
    assert bootstrap_ci(values, seed=0) == (lo, hi)  # seeded: reproducible
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_bootstrap_ci_of_nothing_is_nan():
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)


# reference values (95 %), checked against scipy.stats.binomtest(k, n).proportion_ci("wilson" / "exact")
@pytest.mark.parametrize(
    "k, n, method, expected",
    [
        (0, 10, "wilson", (0.0, 0.2775)),
        (5, 10, "wilson", (0.2366, 0.7634)),
        (10, 10, "wilson", (0.7225, 1.0)),
        (0, 10, "clopper-pearson", (0.0, 0.3085)),
        (5, 10, "clopper-pearson", (0.1871, 0.8129)),
        (10, 10, "clopper-pearson", (0.6915, 1.0)),
    ],
)
def test_proportion_ci_reference_values(k, n, method, expected):
    lo, hi = proportion_ci(k, n, method=method)
    assert lo == pytest.approx(expected[0], abs=1e-3)
    assert hi == pytest.approx(expected[1], abs=1e-3)
    assert isinstance(lo, float) and isinstance(hi, float)


def test_proportion_ci_ends_are_exact_at_zero_and_n():
    for method in ("wilson", "clopper-pearson"):
        assert proportion_ci(0, 10, method=method)[0] == 0.0
        assert proportion_ci(10, 10, method=method)[1] == 1.0


def test_wilson_is_never_degenerate_and_wider_than_the_bootstrap_at_extreme_counts():
    for n in (1, 5, 32, 500):
        lo, hi = proportion_ci(0, n)
        assert lo == 0.0 and hi > 0.0
        lo, hi = proportion_ci(n, n)
        assert lo < 1.0 and hi == 1.0
    assert bootstrap_ci([0] * 32) == (0.0, 0.0)  # what the bootstrap reports instead at 0/32
    for k in (0, 1, 2, 30, 31, 32):  # near 0 or n the percentile bootstrap is too narrow at n = 32
        w_lo, w_hi = proportion_ci(k, 32)
        b_lo, b_hi = bootstrap_ci([1] * k + [0] * (32 - k), seed=0)
        assert w_hi - w_lo > b_hi - b_lo + 0.02, k


def test_wilson_at_one_half_matches_the_normal_width():
    # at 16/32 neither is too narrow: Wilson (0.3274) is near 2 * 1.96 * sqrt(0.25 / 32) = 0.3465; the bootstrap's
    # width jumps between 0.3125 and 0.375 with the seed because k/32 is discrete
    lo, hi = proportion_ci(16, 32)
    assert lo == pytest.approx(0.3363, abs=1e-3) and hi == pytest.approx(0.6637, abs=1e-3)
    widths = [b[1] - b[0] for b in (bootstrap_ci([1] * 16 + [0] * 16, seed=s) for s in range(3))]
    assert all(abs((hi - lo) - w) < 0.05 for w in widths)


def test_proportion_ci_level_and_method_ordering():
    lo90, hi90 = proportion_ci(7, 20, level=0.90)
    lo99, hi99 = proportion_ci(7, 20, level=0.99)
    assert lo99 < lo90 < 0.35 < hi90 < hi99
    w_lo, w_hi = proportion_ci(7, 20)
    cp_lo, cp_hi = proportion_ci(7, 20, method="clopper-pearson")
    assert cp_hi - cp_lo > w_hi - w_lo  # exact interval is the conservative one


def test_proportion_ci_refuses_bad_input():
    with pytest.raises(LRSError, match="at least one trial"):
        proportion_ci(0, 0)
    with pytest.raises(LRSError, match="unknown method"):
        proportion_ci(1, 10, method="wald")
    with pytest.raises(LRSError, match="between 0 and n"):
        proportion_ci(11, 10)
    with pytest.raises(LRSError, match="level"):
        proportion_ci(1, 10, level=95)


def test_mcnemar_exact_matches_the_binomial_by_hand():
    assert mcnemar_exact(1, 7) == pytest.approx(0.0703125)  # 2 * (1 + 8) / 2**8
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)


def test_paired_comparison_counts_fixed_and_broken():
    base = [0] + [1] * 7 + [1, 0]
    method = [1] + [0] * 7 + [1, 0]
    r = paired_comparison(base, method)
    assert (r["fixed"], r["broken"], r["n"]) == (1, 7, 10)
    assert r["acc_base"] == pytest.approx(0.8) and r["acc_method"] == pytest.approx(0.2)
    assert r["delta"] == pytest.approx(-0.6)
    assert r["mcnemar_p"] == pytest.approx(0.0703125)
    lo, hi = r["delta_ci"]
    assert lo <= -0.6 <= hi and hi < 0
    line = format_comparison(r, name="lrs")
    assert "fixed 1 / broken 7" in line and "20.0% vs 80.0%" in line and "0.0703" in line


def test_paired_comparison_without_discordant_pairs_has_p_one():
    r = paired_comparison([1, 0, 1], [True, False, True])
    assert (r["fixed"], r["broken"], r["delta"], r["mcnemar_p"]) == (0, 0, 0.0, 1.0)


def test_paired_comparison_refuses_mismatched_lengths():
    with pytest.raises(LRSError, match="3 base and 2 method"):
        paired_comparison([1, 0, 1], [1, 0])


def test_auroc_hand_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0  # perfect ranking
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # all ties
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # 3 of 4 pairs ranked right
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_agrees_with_sklearn_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.integers(0, 2, 200)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_within_group_auroc_hand_example():
    # group a: right 0.9, 0.2 vs wrong 0.5 -> 1 of 2 pairs; group b: right 0.3 vs wrong 0.3 (tie), 0.1 -> 1.5 of 2;
    # group c has only right traces and is skipped
    scores = [0.9, 0.2, 0.5, 0.3, 0.3, 0.1, 0.7]
    labels = [1, 1, 0, 1, 0, 0, 1]
    groups = ["a", "a", "a", "b", "b", "b", "c"]
    v, pairs, used = within_group_auroc(scores, labels, groups)
    assert (v, pairs, used) == (0.625, 4, 2)
    assert auroc(scores, labels) != 0.625  # pooling across problems is a different quantity


def test_within_group_auroc_without_mixed_groups_is_nan():
    v, pairs, used = within_group_auroc([0.1, 0.9], [0, 1], ["a", "b"])
    assert math.isnan(v) and (pairs, used) == (0, 0)


def test_grouped_auroc_ci_brackets_the_value_and_widens_with_fewer_problems():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 100)
    s = y + rng.normal(0, 1.0, size=len(y))
    groups = np.repeat(np.arange(100), 2).tolist()
    lo, hi = grouped_auroc_ci(s, y, groups)
    assert lo < auroc(s, y) < hi
    few = [g // 10 for g in groups]  # same traces in 10 big problems: fewer independent units
    lo2, hi2 = grouped_auroc_ci(s, y, few)
    assert hi2 - lo2 > hi - lo


def test_grouped_auroc_ci_of_a_difference_excludes_zero_only_for_a_real_gap():
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 150)
    good, noise = y * 2 + rng.normal(0, 1, len(y)), rng.normal(0, 1, len(y))
    groups = np.repeat(np.arange(150), 2).tolist()
    lo, hi = grouped_auroc_ci(good, y, groups, minus=noise)
    assert lo > 0
    lo, hi = grouped_auroc_ci(noise, y, groups, minus=noise)
    assert lo == hi == 0.0
    assert all(math.isnan(v) for v in grouped_auroc_ci([0.1, 0.2], [1, 1], ["a", "b"]))


def test_grouped_auroc_ci_within_problems_ignores_the_difficulty_between_them():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(60), 4).tolist()
    y = np.tile([0, 1, 0, 1], 60)
    difficulty = np.repeat(rng.normal(0, 3, 60), 4)
    noise = difficulty + rng.normal(0, 1, len(y))  # ranks problems, not traces within one
    lo, hi = grouped_auroc_ci(noise, y, groups, within=True)
    assert lo < 0.5 < hi
    good = difficulty + y * 2 + rng.normal(0, 1, len(y))
    lo, hi = grouped_auroc_ci(good, y, groups, within=True)
    assert 0.7 < lo <= within_group_auroc(good, y, groups)[0] <= hi


def test_mcnemar_power_and_minimum_detectable_effect_match_exact_binomial_sums():
    from scipy.stats import binom

    from lrs.stats import mcnemar_mde, mcnemar_power

    # 20 discordant pairs: the exact test rejects at k <= 5 or k >= 15 (p = 0.041), not at 6 / 14 (p = 0.115)
    want = binom.sf(14, 20, 0.8) + binom.cdf(5, 20, 0.8)
    assert mcnemar_power(20, 0.8) == pytest.approx(want)
    assert mcnemar_power(20, 0.5) == pytest.approx(2 * binom.cdf(5, 20, 0.5))  # the test's own size
    assert mcnemar_power(0, 0.9) == 0.0
    mde = mcnemar_mde(300, 20 / 300)  # 20 discordant pairs among 300 problems
    q = (mde * 300 / 20 + 1) / 2  # the share of fixes that effect needs
    assert mcnemar_power(20, q) >= 0.8 > mcnemar_power(20, q - 0.002)
    assert 0.035 < mde < 0.045  # ~ 4 points: what n = 300 with a 7 % discordance rate can detect
    assert math.isnan(mcnemar_mde(10, 0.1))  # one discordant pair: never significant


def test_n_needed_is_where_the_exact_mde_crosses_the_effect():
    from lrs.stats import mcnemar_mde, mcnemar_n_needed

    n = mcnemar_n_needed(0.05, 0.10)
    assert mcnemar_mde(n, 0.10) <= 0.05 < mcnemar_mde(n - 1, 0.10)
    assert 300 < n < 400  # 30-40 discordant pairs: a 3:1 split of them is what 80 % power at 5 % needs
    big = mcnemar_n_needed(0.03, 0.10)
    assert mcnemar_mde(big, 0.10) <= 0.03 < mcnemar_mde(big - 1, 0.10) and big > 2 * n
    with pytest.raises(LRSError, match="effect <= discordant"):
        mcnemar_n_needed(0.2, 0.1)  # a net change larger than the share of problems that change

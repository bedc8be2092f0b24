"""Statistics every report needs: proportion and bootstrap CIs, paired comparison with exact McNemar, AUROC
helpers.

All functions take plain lists or arrays and return plain floats/dicts, so results stay JSON-able.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.stats import beta, binomtest, norm, rankdata

from lrs.errors import LRSError

_CHUNK = 1000  # bootstrap resamples drawn at once (bounds memory for long result lists)


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for i in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - i)
        out[i : i + m] = x[rng.integers(0, len(x), size=(m, len(x)))].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) when empty.

    Not for a single proportion (an accuracy from independent 0/1 values): there it gives [0, 0] at 0/n and is
    too narrow at small n, so use :func:`proportion_ci`. Keep this for means of other values (e.g. paired
    differences) and resampling schemes where traces are grouped."""
    x = np.asarray(values, dtype=float).reshape(-1)
    if len(x) == 0:
        return (math.nan, math.nan)
    means = _boot_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


_PROPORTION_METHODS = ("wilson", "clopper-pearson")


def proportion_ci(
    successes: int, n: int, *, level: float = 0.95, method: str = "wilson"
) -> tuple[float, float]:
    """Confidence interval of a single proportion (e.g. accuracy = successes / n over independent problems).

    ``"wilson"``: the Wilson score interval (good coverage at small n, never [0, 0] at 0/n).
    ``"clopper-pearson"``: the exact interval from beta quantiles (conservative: at least the nominal coverage).
    """
    if method not in _PROPORTION_METHODS:
        raise LRSError(
            f"proportion_ci: unknown method {method!r}; use one of {', '.join(_PROPORTION_METHODS)}"
        )
    if int(n) != n or int(successes) != successes:
        raise LRSError(f"proportion_ci needs whole counts, got successes={successes}, n={n}")
    k, n = int(successes), int(n)
    if n <= 0:
        raise LRSError(f"proportion_ci needs at least one trial, got n={n}")
    if not 0 <= k <= n:
        raise LRSError(f"proportion_ci: successes must be between 0 and n={n}, got {k}")
    if not 0 < level < 1:
        raise LRSError(f"proportion_ci: level must be between 0 and 1 (e.g. 0.95), got {level}")
    alpha = 1 - level
    if method == "wilson":
        z = float(norm.ppf(1 - alpha / 2))
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        lo, hi = centre - half, centre + half
    else:
        lo = float(beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
        hi = float(beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
    lo = 0.0 if k == 0 else min(max(lo, 0.0), 1.0)  # exact ends where rounding would miss them
    hi = 1.0 if k == n else min(max(hi, 0.0), 1.0)
    return (float(lo), float(hi))


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p: binomial test of ``fixed`` among the discordant pairs (1.0 if there are none)."""
    if fixed + broken == 0:
        return 1.0
    return float(binomtest(int(fixed), int(fixed + broken), 0.5).pvalue)


def paired_comparison(
    base_correct: Sequence[bool | int], method_correct: Sequence[bool | int], *, seed: int = 0
) -> dict:
    """Compare two methods on the same problems: accuracies, delta with a paired bootstrap CI, fixed/broken,
    exact McNemar p."""
    b = np.asarray(base_correct, dtype=bool).reshape(-1)
    m = np.asarray(method_correct, dtype=bool).reshape(-1)
    if len(b) != len(m):
        raise LRSError(
            f"paired comparison needs the same problems: got {len(b)} base and {len(m)} method results"
        )
    n = len(b)
    fixed, broken = int((~b & m).sum()), int((b & ~m).sum())
    acc_b = float(b.mean()) if n else math.nan
    acc_m = float(m.mean()) if n else math.nan
    return dict(
        n=n,
        acc_base=acc_b,
        acc_method=acc_m,
        delta=acc_m - acc_b,
        delta_ci=list(bootstrap_ci(m.astype(float) - b.astype(float), seed=seed)),
        fixed=fixed,
        broken=broken,
        mcnemar_p=mcnemar_exact(fixed, broken),
    )


def format_comparison(cmp: dict, name: str = "method") -> str:
    """One line a user reads: method vs base accuracy, delta with CI, fixed/broken and McNemar p."""
    lo, hi = cmp["delta_ci"]
    return (
        f"{name} vs base: {cmp['acc_method']:.1%} vs {cmp['acc_base']:.1%} (delta {cmp['delta']:+.1%}, "
        f"95% CI {lo:+.1%} to {hi:+.1%}), fixed {cmp['fixed']} / broken {cmp['broken']}, "
        f"exact McNemar p = {cmp['mcnemar_p']:.3g} (n={cmp['n']})"
    )


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC from average ranks (ties count 0.5); nan when a class is missing."""
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    r = rankdata(scores)
    return float((r[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """AUROC of ``scores`` for ``labels`` (1 = positive), ties averaged; nan when one class is missing."""
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if len(s) != len(y):
        raise LRSError(f"auroc needs one score per label: got {len(s)} scores and {len(y)} labels")
    return _rank_auc(s, y)


def _members(groups: Sequence) -> list[list[int]]:
    """Trace indices of each group (problem), in order of first appearance."""
    idx: dict = defaultdict(list)
    for i, g in enumerate(groups):
        idx[g].append(i)
    return list(idx.values())


def within_group_auroc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, groups: Sequence
) -> tuple[float, int, int]:
    """Fraction of (right, wrong) pairs from the same group (problem) where the right one scores higher
    (ties 0.5), pooled over groups holding both labels; returns (value, n_pairs, n_groups_used)."""
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if not (len(s) == len(y) == len(groups)):
        raise LRSError(
            f"within-group auroc needs equal lengths: {len(s)} scores, {len(y)} labels, {len(groups)} groups"
        )
    wins, pairs, used = 0.0, 0, 0
    for members in _members(groups):
        ys, ss = y[members], s[members]
        n1 = int(ys.sum())
        n0 = len(ys) - n1
        if n1 == 0 or n0 == 0:
            continue
        wins += _rank_auc(ss, ys) * n1 * n0
        pairs += n1 * n0
        used += 1
    return (wins / pairs if pairs else math.nan, pairs, used)


def grouped_auroc_ci(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    groups: Sequence,
    *,
    minus: Sequence[float] | np.ndarray | None = None,
    within: bool = False,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of AUROC(scores), or of AUROC(scores) - AUROC(minus) on the same traces, resampling whole
    groups (problems): traces of one problem share its difficulty, so they are not independent draws.
    ``within=True`` gives the CI of :func:`within_group_auroc` instead (a problem drawn twice counts twice)."""
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    m = None if minus is None else np.asarray(minus, dtype=float).reshape(-1)
    if not (len(s) == len(y) == len(groups)) or (m is not None and len(m) != len(s)):
        raise LRSError("grouped AUROC CI needs one score, label and group per trace")
    members = _members(groups)
    if len(members) < 2 or y.all() or not y.any():
        return (math.nan, math.nan)
    if within:
        members = [g for g in members if 0 < y[g].sum() < len(g)]  # only mixed problems hold pairs
        if not members:
            return (math.nan, math.nan)

    def stat(x: np.ndarray, pick: np.ndarray, draw_ids: np.ndarray | None) -> float:
        if draw_ids is None:
            return _rank_auc(x[pick], y[pick])
        return within_group_auroc(x[pick], y[pick], draw_ids)[0]

    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        draw = [members[j] for j in rng.integers(0, len(members), len(members))]
        pick = np.concatenate(draw)
        if y[pick].all() or not y[pick].any():
            continue  # a resample with one class has no AUROC
        # within: each draw is its own group, so a problem drawn twice counts as two problems
        draw_ids = np.repeat(np.arange(len(draw)), [len(g) for g in draw]) if within else None
        v = stat(s, pick, draw_ids)
        vals.append(v - stat(m, pick, draw_ids) if m is not None else v)
    if not vals:
        return (math.nan, math.nan)
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@lru_cache(maxsize=4096)
def _mcnemar_reject(m: int, alpha: float) -> np.ndarray:
    """Fix counts k of ``m`` discordant pairs at which the exact two-sided McNemar test rejects at ``alpha``."""
    return np.array([binomtest(int(k), m, 0.5).pvalue <= alpha for k in range(m + 1)])


def mcnemar_power(n_discordant: int, share_fixed: float, alpha: float = 0.05) -> float:
    """Power of the exact two-sided McNemar test with ``n_discordant`` discordant pairs when a discordant pair
    is a fix with probability ``share_fixed`` (computed exactly over the binomial outcomes)."""
    from scipy.stats import binom

    m = int(n_discordant)
    if m <= 0:
        return 0.0
    return float(binom.pmf(np.arange(m + 1), m, share_fixed)[_mcnemar_reject(m, float(alpha))].sum())


def mcnemar_mde(n: int, discordant_rate: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a paired comparison on ``n`` problems: the smallest net accuracy change
    (fixed − broken)/n that the exact McNemar test detects with ``power``, when a fraction ``discordant_rate``
    of problems change outcome. ``nan`` when no split of the discordant pairs reaches that power."""
    if n <= 0 or not 0 < discordant_rate <= 1:
        raise LRSError(f"mcnemar_mde needs n > 0 and 0 < discordant_rate <= 1, got n={n}, {discordant_rate}")
    m = max(1, round(n * discordant_rate))
    for q in np.linspace(0.5, 1.0, 501):
        if mcnemar_power(m, float(q), alpha) >= power:
            return float((2 * q - 1) * m / n)
    return math.nan


def mcnemar_n_needed(
    effect: float, discordant_rate: float, alpha: float = 0.05, power: float = 0.8, n_max: int = 1_000_000
) -> int:
    """Number of problems at which :func:`mcnemar_mde` at ``discordant_rate`` falls to ``effect`` (a net
    accuracy change, e.g. 0.03 for 3 points): bisection, then a step down to the start of that run of n. The
    exact test is discrete, so above the returned n the MDE still wobbles by about 0.1 points around ``effect``,
    and a few isolated smaller n reach it by luck of rounding (not a safe plan). Raises when even ``n_max``
    problems do not suffice, and when the effect exceeds the discordance (a net change cannot be larger than
    the share of problems that change)."""
    if not 0 < effect <= discordant_rate <= 1:
        raise LRSError(
            f"need 0 < effect <= discordant rate <= 1, got effect {effect}, discordant rate {discordant_rate}"
        )

    def ok(n: int) -> bool:
        mde = mcnemar_mde(n, discordant_rate, alpha, power)
        return not math.isnan(mde) and mde <= effect

    lo, hi = 1, 16
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > n_max:
            raise LRSError(f"an effect of {effect:.1%} needs more than {n_max} problems at this discordance")
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    while hi > 1 and ok(hi - 1):
        hi -= 1
    return hi

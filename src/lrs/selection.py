"""Best-of-N by the latent reward: the direct test of whether the reward knows good from bad within a problem.

Steering follows the reward's gradient among the states of one problem, so the reward must rank a problem's
own traces. Best-of-N asks exactly that, with no steering at all: from N sampled traces of each problem
(``lrs collect --samples-per-problem N --temperature 0.7``), pick one by the latent reward and compare the
pick with a random pick (sample 0; the samples are exchangeable), majority vote over answers, and the trace the
model was most confident in. If the reward cannot pick better than chance, its gradient cannot steer either;
if it can, best-of-N is a free in-model verifier.

Selectors:
- ``reward_end``: the reward logit after the last generated token (sees the whole trace);
- ``reward_mean``: the mean reward logit over the trace's tokens (less driven by the final tokens);
- ``confidence``: the mean top-token probability;
- ``majority``: the most frequent extracted answer (ties: the earliest sample among the tied answers);
- ``random``: sample 0; ``pass@N`` (any sample correct) bounds every selector from above.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from lrs.errors import LRSError
from lrs.stats import mcnemar_exact, proportion_ci

SELECTORS = ("reward_end", "reward_mean", "confidence", "majority", "random")


@dataclass
class Candidate:
    """One sampled trace of a problem, with what the selectors read."""

    sample: int
    correct: bool
    answer: str | None
    reward: np.ndarray  # per-token reward logits [T]
    conf: np.ndarray  # per-token top-token probabilities [T]


def pick(cands: list[Candidate], selector: str) -> Candidate:
    """The candidate ``selector`` chooses among one problem's samples (ties: the lowest sample index)."""
    cands = sorted(cands, key=lambda c: c.sample)
    if selector == "random":
        return cands[0]
    if selector == "majority":
        counts = Counter(c.answer for c in cands if c.answer is not None)
        if not counts:
            return cands[0]
        top = max(counts.values())
        return next(c for c in cands if c.answer is not None and counts[c.answer] == top)
    key = {
        "reward_end": lambda c: float(c.reward[-1]),
        "reward_mean": lambda c: float(c.reward.mean()),
        "confidence": lambda c: float(c.conf.mean()),
    }.get(selector)
    if key is None:
        raise LRSError(f"unknown selector '{selector}': use one of {', '.join(SELECTORS)}")
    best = max(key(c) for c in cands)
    return next(c for c in cands if key(c) == best)


def best_of_n(problems: dict[str, list[Candidate]], min_samples: int = 2) -> dict:
    """Accuracy of every selector over ``problems`` (id -> its samples), with Wilson CIs and exact McNemar
    p-values against the random pick and against majority vote (paired over problems)."""
    usable = {p: c for p, c in problems.items() if len(c) >= min_samples}
    if not usable:
        raise LRSError(
            f"best-of-N needs problems with at least {min_samples} samples: collect with "
            "--samples-per-problem 4 --temperature 0.7"
        )
    ids = sorted(usable)
    n_samples = Counter(len(usable[p]) for p in ids)
    right = {s: np.array([pick(usable[p], s).correct for p in ids]) for s in SELECTORS}
    oracle = np.array([any(c.correct for c in usable[p]) for p in ids])
    expected = float(np.mean([np.mean([c.correct for c in usable[p]]) for p in ids]))
    mixed = int(sum(0 < sum(c.correct for c in usable[p]) < len(usable[p]) for p in ids))
    rows = {}
    for s in SELECTORS:
        row = dict(accuracy=float(right[s].mean()), ci95=list(proportion_ci(int(right[s].sum()), len(ids))))
        for ref in ("random", "majority"):
            if ref != s:
                fixed = int((right[s] & ~right[ref]).sum())
                broken = int((~right[s] & right[ref]).sum())
                row[f"vs_{ref}"] = dict(fixed=fixed, broken=broken, mcnemar_p=mcnemar_exact(fixed, broken))
        rows[s] = row
    return dict(
        n_problems=len(ids),
        samples_per_problem=dict(sorted(n_samples.items())),
        mixed_problems=mixed,
        random_expected=expected,
        pass_at_n=float(oracle.mean()),
        selectors=rows,
    )


def candidates_from_traces(ts, enc, rm) -> dict[str, list[Candidate]]:
    """Score every trace of a collection with ``enc`` and ``rm``; group the candidates by problem."""
    from lrs.reward import score_traces
    from lrs.stages import reward_inputs

    x = reward_inputs(ts, enc)
    with torch.no_grad():
        scores = score_traces(rm, x["latents"])
    out: dict[str, list[Candidate]] = {}
    for rec, s, c in zip(ts.records, scores, x["conf"], strict=True):
        out.setdefault(rec["problem_id"], []).append(
            Candidate(
                sample=int(rec["sample"]),
                correct=bool(rec["label"]),
                answer=rec.get("answer"),
                reward=s.float().numpy(),
                conf=c.float().numpy(),
            )
        )
    return out


def format_best_of_n(res: dict) -> str:
    """The table a user reads: accuracy [CI] per selector, fixed/broken and p against random and majority."""
    lines = [
        f"best-of-N on {res['n_problems']} problems (samples per problem: {res['samples_per_problem']}; "
        f"{res['mixed_problems']} with both right and wrong samples); random-of-N expected "
        f"{res['random_expected']:.1%}, pass@N {res['pass_at_n']:.1%}",
        f"{'selector':<12} {'accuracy':>8}  {'95% CI':<15} {'vs random (fixed/broken, p)':<30} vs majority",
    ]
    for s, r in res["selectors"].items():
        lo, hi = r["ci95"]
        cmp = []
        for ref in ("random", "majority"):
            v = r.get(f"vs_{ref}")
            cmp.append(f"{v['fixed']}/{v['broken']}, p={v['mcnemar_p']:.3g}" if v else "-")
        lines.append(f"{s:<12} {r['accuracy']:>8.1%}  [{lo:.1%}, {hi:.1%}]  {cmp[0]:<30} {cmp[1]}")
    return "\n".join(lines)

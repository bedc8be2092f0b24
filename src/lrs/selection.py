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

:func:`evaluate_best_of_n` is the same pick as an evaluation method (``lrs eval --method bon``) on any split.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lrs.config import SELECTORS
from lrs.errors import LRSError
from lrs.stats import mcnemar_exact, proportion_ci

if TYPE_CHECKING:
    from lrs.tasks import Problem


@dataclass
class Candidate:
    """One sampled trace of a problem, with what the selectors read."""

    sample: int
    correct: bool
    answer: str | None
    reward: np.ndarray  # per-token reward logits [T]
    conf: np.ndarray  # per-token top-token probabilities [T]
    text: str = ""  # the completion (what an evaluation record shows for the pick)
    tokens: int = 0
    truncated: bool = False


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
    from lrs.reward.train import reward_inputs

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
                text=rec.get("text", ""),
                tokens=int(rec.get("length", len(s))),
                truncated=bool(rec.get("truncated", False)),
            )
        )
    return out


def check_settings(n: int, temperature: float, select: str) -> None:
    """Refuse best-of-N settings that cannot work, with one line: fewer than 2 samples, greedy sampling, or an
    unknown selector."""
    if select not in SELECTORS:
        raise LRSError(f"unknown selector '{select}': use one of {', '.join(SELECTORS)}")
    if n < 2 or temperature <= 0:
        raise LRSError(
            "best-of-N needs --n 2 or more and --temperature above 0 (greedy samples are identical)"
        )


def evaluate_best_of_n(
    model,
    tokenizer,
    problems: Sequence[Problem],
    enc,
    rm,
    out_dir: str | Path,
    *,
    n: int = 4,
    temperature: float = 0.7,
    select: str = "reward_end",
    max_new_tokens: int = 384,
    batch_size: int = 16,
    seed: int = 0,
    name: str = "bon",
    reuse: bool = True,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """``lrs eval --method bon``: sample ``n`` completions per problem, keep the one ``select`` picks, and
    write an ordinary evaluation result (``<name>.jsonl`` + ``.summary.json``) that pairs with base.

    The samples are a trace collection in ``<out_dir>/bon-samples-<key>`` (resumable like ``lrs collect``;
    the encoder's layer is recorded; the key covers only what changes the samples), so a killed run
    continues, another ``select`` or reward model reuses the samples, and ``lrs best-of-n --traces`` can
    re-pick them. Each record is the picked completion with the usual fields plus ``bon``: the
    selector, the picked sample, and every sample's correctness, answer and scores. The summary adds every
    selector's accuracy on the same samples (``selectors``: random pick, majority vote, confidence, both
    reward scores) and the tokens generated for all samples, since best-of-N costs n times a greedy run.
    """
    from lrs.artifacts import tensor_hash
    from lrs.distributed import share
    from lrs.encoders.base import encoder_hash
    from lrs.environment import git_revision, versions
    from lrs.evaluate import _ids_hash, load_result, model_fields, outcome_fields, write_result
    from lrs.models import model_dtype, model_fingerprint
    from lrs.runs import cache_key
    from lrs.tasks import build_prompts
    from lrs.traces import collect_traces

    check_settings(n, temperature, select)
    out_dir = Path(out_dir)
    parts = dict(
        method="bon",
        problems=_ids_hash(problems),
        model=model_fingerprint(model),
        dtype=model_dtype(model),
        n=n,
        temperature=temperature,
        select=select,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        encoder=encoder_hash(enc),
        reward=tensor_hash(rm.tensors()),
    )
    key = cache_key(parts)
    if reuse:
        old = load_result(out_dir, name)
        if old is not None and old["summary"].get("cache_key") == key:
            return old | {"cached": True}
    t0 = time.perf_counter()
    # the samples do not depend on the selector or the reward model: another --select reuses them
    gen = {
        k: parts[k]
        for k in ("problems", "model", "dtype", "n", "temperature", "max_new_tokens", "batch_size", "seed")
    }
    traces = out_dir / f"bon-samples-{cache_key(gen)}"
    ts = collect_traces(
        model, tokenizer, problems, traces, layers=[enc.layer], samples_per_problem=n,
        temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    cands = candidates_from_traces(ts, enc, rm)
    table = best_of_n(cands)
    prompts = build_prompts(tokenizer, problems, style="base")
    records = []
    for p, prompt in zip(problems, prompts, strict=True):
        cs = sorted(cands[p.id], key=lambda c: c.sample)
        c = pick(cs, select)
        samples = [
            dict(sample=x.sample, correct=x.correct, answer=x.answer, tokens=x.tokens,
                 reward_end=float(x.reward[-1]), reward_mean=float(x.reward.mean()),
                 confidence=float(x.conf.mean()))
            for x in cs
        ]  # fmt: skip
        records.append(
            dict(id=p.id, prompt=prompt, output=c.text, pred=c.answer, gold=p.answer, correct=c.correct,
                 tokens=c.tokens, truncated=c.truncated,
                 bon=dict(select=select, picked=c.sample, n=len(cs), samples=samples))
        )  # fmt: skip
    all_tokens = sum(x["tokens"] for r in records for x in r["bon"]["samples"])
    summary = dict(
        method="bon",
        name=name,
        **outcome_fields(records),
        generated_tokens=all_tokens,  # every sample's, the cost of best-of-N
        wall_time_s=wall,  # generation and recording in this launch (0-ish when the traces were complete)
        tokens_per_s=all_tokens / wall if wall > 0 else None,
        **model_fields(model),
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_style="base",
        greedy=False,
        samples_per_problem=n,
        temperature=temperature,
        select=select,
        selectors=table["selectors"],
        pass_at_n=table["pass_at_n"],
        mixed_problems=table["mixed_problems"],
        traces=str(traces),
        threads=torch.get_num_threads(),
        cache_key=key,
        key_parts=parts,
        versions=versions(),
        git=git_revision(),
        **(extra or {}),
    )
    result = {"summary": summary, "records": records}
    if share().main:  # data-parallel: every process collected its share and built the same result
        write_result(result, out_dir, name)
    return result


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

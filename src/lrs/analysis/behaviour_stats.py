"""Paired behaviour statistics: does a method change how often traces verbalise each behaviour, per problem?

Why: the tagger (:mod:`lrs.analysis.behaviours`) gives per-trace counts, but base and method answer the same
problems, so the right comparison is paired (ANALYSES.md §3.5). For every tag this module computes each
problem's rate in both runs (instances per 1k generated tokens, or the fraction of sentences with the tag:
steering changes length, so a raw count alone would mislead), then

- the mean difference (method − base) with a paired percentile bootstrap CI over problems;
- the Wilcoxon signed-rank p (``zero_method="pratt"``: most differences are zero) and the matched-pairs
  rank-biserial correlation;
- the exact McNemar p on presence (≥ 1 tagged sentence), from the gained / lost problems;
- Holm-adjusted p values across tags, one family for Wilcoxon and one for McNemar.

Reachable as ``lrs analyze behaviour-diff --base B.jsonl --method M.jsonl [--out F.json]``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from lrs.analysis.behaviours import TAGS, TraceTags, lexicon_info, read_jsonl, tag_record
from lrs.errors import LRSError
from lrs.stats import bootstrap_ci, mcnemar_exact

FORMAT = "lrs.behaviour-diff/1"
UNITS = ("per1k", "sentence")


# ---- per-problem rates -----------------------------------------------------------------------------------


def trace_rate(trace: TraceTags, tag: str, unit: str = "per1k") -> float | None:
    """One trace's rate of ``tag``: instances per 1k generated tokens (``per1k``) or the fraction of its
    taggable sentences carrying the tag (``sentence``); None when the trace has no tokens / sentences."""
    if unit == "per1k":
        if not trace.n_tokens:
            return None
        return 1000.0 * trace.instances()[tag] / trace.n_tokens
    if unit == "sentence":
        n = len(trace.taggable())
        return trace.counts()[tag] / n if n else None
    raise LRSError(f"unknown rate unit {unit!r}; use one of {', '.join(UNITS)}")


def present(trace: TraceTags, tag: str) -> bool:
    """Whether the trace has at least one taggable sentence with ``tag``."""
    return trace.counts()[tag] > 0


def keyed_traces(records: Sequence[Mapping], method: str, where: str) -> dict[str, TraceTags]:
    """Tag every record and key it by problem id (the record's line index when it has no id).

    Two records with one id would make the pairing ambiguous (sampled decoding): that is refused.
    """
    out: dict[str, TraceTags] = {}
    for no, rec in enumerate(records):
        key = str(rec["id"]) if "id" in rec else f"#{no}"
        if key in out:
            raise LRSError(
                f"{where}: problem id {key!r} occurs twice; paired statistics need one trace per problem"
            )
        out[key] = tag_record(rec, method, where=f"{where}: record {no + 1}")
    return out


# ---- tests and corrections -------------------------------------------------------------------------------


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p values (None stays None and is not counted in the family).

    Sorted ascending, the j-th smallest of m gets ``max_{i<=j} min(1, (m - i + 1) p_(i))``.
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def rank_biserial(diff: np.ndarray) -> float | None:
    """Matched-pairs rank-biserial correlation (R+ − R−)/(R+ + R−) over the non-zero differences (Kerby
    2014): +1 when every change is an increase, −1 when every change is a decrease; None without changes."""
    from scipy.stats import rankdata

    d = diff[diff != 0]
    if len(d) == 0:
        return None
    r = rankdata(np.abs(d))
    pos, neg = r[d > 0].sum(), r[d < 0].sum()
    return float((pos - neg) / (pos + neg))


def wilcoxon_p(base: np.ndarray, method: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of method − base (Pratt's zero handling); 1.0 when nothing changed."""
    d = method - base
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(method, base, zero_method="pratt").pvalue)


def paired_tag_stats(
    base: Sequence[float], method: Sequence[float], base_present: Sequence[bool],
    method_present: Sequence[bool], *, n_boot: int = 10000, seed: int = 0,
) -> dict:  # fmt: skip
    """The paired statistics of one tag from per-problem rates and presences (same problem order in all four).

    ``gained`` = problems with the tag only in the method, ``lost`` = only in base; McNemar is exact on them.
    """
    b, m = np.asarray(base, float), np.asarray(method, float)
    if len(b) != len(m):
        raise LRSError(f"paired statistics need the same problems: {len(b)} base vs {len(m)} method rates")
    bp, mp = np.asarray(base_present, bool), np.asarray(method_present, bool)
    gained, lost = int((~bp & mp).sum()), int((bp & ~mp).sum())
    d = m - b
    n = len(d)
    return dict(
        n=n,
        base_mean=float(b.mean()) if n else None,
        method_mean=float(m.mean()) if n else None,
        mean_diff=float(d.mean()) if n else None,
        mean_diff_ci95=list(bootstrap_ci(d, n_boot=n_boot, seed=seed)) if n else None,
        wilcoxon_p=wilcoxon_p(b, m) if n else None,
        rank_biserial=rank_biserial(d),
        base_present=int(bp.sum()),
        method_present=int(mp.sum()),
        gained=gained,
        lost=lost,
        mcnemar_p=mcnemar_exact(gained, lost),
    )


# ---- the comparison --------------------------------------------------------------------------------------


def behaviour_diff(
    base: Mapping[str, TraceTags], method: Mapping[str, TraceTags], *, unit: str = "per1k",
    n_boot: int = 10000, seed: int = 0,
) -> dict:  # fmt: skip
    """Per-tag paired statistics of ``method`` vs ``base`` traces keyed by problem id, plus per-problem rows.

    Only problems in both runs are paired (the others are counted). For a tag, a problem whose rate is
    undefined on either side (no tokens / sentences) is left out of the rate statistics but kept for presence.
    """
    if unit not in UNITS:
        raise LRSError(f"unknown rate unit {unit!r}; use one of {', '.join(UNITS)}")
    ids = [k for k in base if k in method]
    if not ids:
        raise LRSError("base and method share no problem ids: are they runs on the same split?")
    tags = {}
    for tag in TAGS:
        rates = [(trace_rate(base[k], tag, unit), trace_rate(method[k], tag, unit)) for k in ids]
        keep = [i for i, (x, y) in enumerate(rates) if x is not None and y is not None]
        stats = paired_tag_stats(
            [rates[i][0] for i in keep],
            [rates[i][1] for i in keep],
            [present(base[k], tag) for k in ids],
            [present(method[k], tag) for k in ids],
            n_boot=n_boot,
            seed=seed,
        )
        stats.update(
            n_undefined=len(ids) - len(keep),
            base_instances=sum(base[k].instances()[tag] for k in ids),
            method_instances=sum(method[k].instances()[tag] for k in ids),
        )
        tags[tag] = stats
    for key, adj in (("wilcoxon_p", "wilcoxon_p_holm"), ("mcnemar_p", "mcnemar_p_holm")):
        for tag, p in zip(TAGS, holm([tags[t][key] for t in TAGS]), strict=True):
            tags[tag][adj] = p
    return dict(
        format=FORMAT,
        lexicon=lexicon_info(),
        unit=unit,
        n_pairs=len(ids),
        base_only=sum(k not in method for k in base),
        method_only=sum(k not in base for k in method),
        mean_tokens=dict(base=_mean_tokens(base, ids), method=_mean_tokens(method, ids)),
        n_boot=n_boot,
        seed=seed,
        tags=tags,
        problems=[_problem_row(k, base[k], method[k], unit) for k in ids],
    )


def _mean_tokens(traces: Mapping[str, TraceTags], ids: Sequence[str]) -> float | None:
    toks = [traces[k].n_tokens for k in ids if traces[k].n_tokens is not None]
    return float(np.mean(toks)) if toks else None


def _problem_row(key: str, b: TraceTags, m: TraceTags, unit: str) -> dict:
    return dict(
        id=key,
        tokens=[b.n_tokens, m.n_tokens],
        counts={t: [b.counts()[t], m.counts()[t]] for t in TAGS},
        rates={t: [trace_rate(b, t, unit), trace_rate(m, t, unit)] for t in TAGS},
    )


def format_diff(result: Mapping, names: tuple[str, str] = ("base", "method")) -> str:
    """A plain-text table of :func:`behaviour_diff` output, one row per tag."""
    unit = "instances / 1k tokens" if result["unit"] == "per1k" else "fraction of sentences"
    lex = result["lexicon"]
    lines = [
        f"{names[1]} vs {names[0]}: {result['n_pairs']} paired problems, rate = {unit} "
        f"(lexicon v{lex['version']}, sha256 {lex['sha256'][:16]}…)",
        f"  {'tag':<18} {names[0][:9]:>9} {names[1][:9]:>9}  {'Δ [95% CI]':<26} {'Wilcoxon p (Holm)':<19} "
        f"{'present b→m':<12} {'McNemar p (Holm)':<17}",
    ]
    for tag, s in result["tags"].items():
        if s["n"] == 0:
            lines.append(f"  {tag:<18} no problem with a defined rate")
            continue
        lo, hi = s["mean_diff_ci95"]
        delta = f"{s['mean_diff']:+.3g} [{lo:+.3g}, {hi:+.3g}]"
        wil = _p(s["wilcoxon_p"], s["wilcoxon_p_holm"])
        pres = f"{s['base_present']}→{s['method_present']}"
        lines.append(
            f"  {tag:<18} {s['base_mean']:>9.3g} {s['method_mean']:>9.3g}  {delta:<26} {wil:<19} "
            f"{pres:<12} {_p(s['mcnemar_p'], s['mcnemar_p_holm'])}"
        )
    if result["base_only"] or result["method_only"]:
        lines.append(
            f"  unpaired: {result['base_only']} only in {names[0]}, {result['method_only']} only in {names[1]}"
        )
    return "\n".join(lines)


def _p(p: float | None, adj: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3g} ({adj:.3g})" if adj is not None else f"{p:.3g}"


# ---- CLI -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """``lrs analyze behaviour-diff``: tag both runs, print the paired table, optionally write JSON."""
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise LRSError(f"--out {out} is a directory: give a file name ending in .json")
    if args.n_boot < 1:
        raise LRSError(f"--n-boot must be at least 1, got {args.n_boot}")
    names = (Path(args.base).stem, Path(args.method).stem)
    base = keyed_traces(read_jsonl(args.base), names[0], str(args.base))
    method = keyed_traces(read_jsonl(args.method), names[1], str(args.method))
    result = behaviour_diff(base, method, unit=args.unit, n_boot=args.n_boot, seed=args.seed)
    result["inputs"] = dict(base=str(args.base), method=str(args.method))
    print(format_diff(result, names))
    if out is not None:
        from lrs.artifacts import atomic_write_json

        atomic_write_json(out, result)
        print(f"written: {out}")
    return result


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs analyze behaviour-diff`` to the ``lrs analyze`` sub-parsers."""
    p = sub.add_parser(
        "behaviour-diff",
        help="paired per-problem behaviour rates, base vs method (bootstrap CI, Wilcoxon, McNemar, Holm)",
        description="Tag both eval JSONL files, pair traces by problem id and test per tag whether the method "
        "changes the per-problem behaviour rate (bootstrap CI of the mean difference, Wilcoxon signed-rank) "
        "and presence (exact McNemar), with Holm correction across tags.",
    )
    p.add_argument("--base", required=True, metavar="B.jsonl", help="base run JSONL written by lrs eval")
    p.add_argument("--method", required=True, metavar="M.jsonl", help="method run JSONL on the same problems")
    p.add_argument("--out", metavar="F.json", help="also write the statistics and per-problem rows as JSON")
    p.add_argument(
        "--unit", default="per1k", choices=UNITS, help="rate: instances per 1k tokens, or sentence fraction"
    )
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=run)

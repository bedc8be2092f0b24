"""Error rectification: where a steered trace leaves the base trace on the same prompt, whether a steering event
caused it, and what changed (``docs/analysis.md``, spec in ANALYSES.md §3).

Reads the JSONL of ``lrs eval --log-tokens`` runs (base ideally with ``--shadow``), pairs records by problem id
and computes per pair: the divergence point ``d`` (first differing token id), the first steering event ``e1``,
the lag, the events up to ``d``, base's top-1 margin at ``d``, the flipped tokens, the outcome category, the
answer-change type, corrected-in-place vs avoided, and a heuristic error type of the base trace (the first false
equation found by a safe arithmetic evaluator, truncation, extraction, setup). A pair that diverges before its
first steering event cannot have been changed by steering: it is counted as nondeterminism and left out of the
rectification tables. A second base run (``--noise``, e.g. another batch size) gives the noise floor; a matched
random-direction run (``--control``) is compared with the method on net fixes with an exact McNemar test.

Everything here reads files and draws figures: no model is loaded (a ``--tokenizer`` only turns token ids
into text for the flip-token table).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lrs.artifacts import atomic_write_json
from lrs.errors import LRSError
from lrs.grading import to_number
from lrs.stats import mcnemar_exact, paired_comparison

FORMAT = "lrs.rectify/1"

# ---- the safe arithmetic evaluator ----------------------------------------------------------------------

#: longest expression the evaluator looks at (longer spans are prose, and the bound keeps parsing cheap)
MAX_EXPR_CHARS = 160
_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNOPS: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _NotArithmetic(Exception):
    """A node that is not a number, + - * /, a sign or parentheses."""


def _walk(node: ast.AST, depth: int) -> tuple[float, int]:
    """(value, number of binary operators) of an arithmetic node; raises on anything else."""
    if depth > 48:
        raise _NotArithmetic
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value), 0
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, na = _walk(node.left, depth + 1)
        b, nb = _walk(node.right, depth + 1)
        return _BINOPS[type(node.op)](a, b), na + nb + 1
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        a, na = _walk(node.operand, depth + 1)
        return _UNOPS[type(node.op)](a), na
    raise _NotArithmetic


def _arith(expr: str) -> tuple[float, int] | None:
    """(value, binary operators) of a plain arithmetic expression, else None (see :func:`safe_arith`)."""
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        value, ops = _walk(tree.body, 0)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError, ZeroDivisionError):
        return None
    except _NotArithmetic:
        return None
    return (value, ops) if math.isfinite(value) else None


def safe_arith(expr: str) -> float | None:
    """The value of ``expr`` if it is plain arithmetic (numbers, ``+ - * /``, signs, parentheses), else None.

    The text is parsed with :mod:`ast` and the tree is walked here: nothing is evaluated or executed, and
    any other node (a name, call, attribute, power, subscript, string, comparison, ...) gives None, as do
    division by zero, non-finite results and expressions longer than ``MAX_EXPR_CHARS``.
    """
    got = _arith(expr)
    return got[0] if got is not None else None


@dataclass
class Equation:
    """One ``lhs = rhs`` found in a trace: texts after normalisation, values, and where it starts (chars)."""

    start: int
    lhs: str
    rhs: str
    lhs_value: float
    rhs_value: float
    true: bool


# LaTeX and typography → plain arithmetic; each rule is (regex, replacement or function of the match)
_FRAC_RE = r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"
_NORM_RULES: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (_FRAC_RE, lambda m: f"(({normalize_math(m.group(1))[0]})/({normalize_math(m.group(2))[0]}))"),
    (r"\\text\s*\{([^{}]*)\}", lambda m: f" {m.group(1)} "),
    (r"\\(?:times|cdot)(?![A-Za-z])|[×·∙⋅]", "*"),
    (r"\\div(?![A-Za-z])|÷", "/"),
    (r"−", "-"),
    (r"\\left|\\right", ""),
    (r"\\[,!;: ]|\\\$|\$", ""),
    (r"\\[\[\]()]", " "),
    (r"(?<=\d),(?=\d{3}(?!\d))", ""),
    (r"(?<=\d)\s*[xX]\s*(?=[\d(])", "*"),
    (r"[{}]", ""),
]
_NORM_RE = re.compile("|".join(f"({rx})" for rx, _ in _NORM_RULES))
_GROUP_OF_RULE: list[int] = []  # the regex group that opens each rule's alternative
_g = 1
for _rx, _ in _NORM_RULES:
    _GROUP_OF_RULE.append(_g)
    _g += 1 + re.compile(_rx).groups


def normalize_math(text: str) -> tuple[str, list[int]]:
    """``text`` with LaTeX/typographic arithmetic made plain (``\\times`` → ``*``, ``\\frac{a}{b}`` → ``((a)/(b))``,
    ``1,000`` → ``1000``, ``$`` dropped, ``3 x 4`` → ``3*4``) and, per output character, its offset in ``text``."""
    out: list[str] = []
    origin: list[int] = []
    pos = 0
    for m in _NORM_RE.finditer(text):
        out.extend(text[pos : m.start()])
        origin.extend(range(pos, m.start()))
        k = next(k for k, g in enumerate(_GROUP_OF_RULE) if m.group(g) is not None)
        rule, sub = _NORM_RULES[k]
        # a function rule reads its own groups: match the rule alone on the matched text
        rep = sub(re.fullmatch(rule, m.group(0))) if callable(sub) else sub  # type: ignore[arg-type]
        out.extend(rep)
        origin.extend([m.start()] * len(rep))
        pos = m.end()
    out.extend(text[pos:])
    origin.extend(range(pos, len(text)))
    return "".join(out), origin


_EXPR_TAIL_RE = re.compile(r"[0-9.+\-*/() \t]*$")
_EXPR_HEAD_RE = re.compile(r"^[0-9.+\-*/() \t]*")
_NUMBER_HEAD_RE = re.compile(r"^\s*[-+]?\s*(?:\d+(?:\.\d*)?|\.\d+)")


def _lhs(part: str) -> tuple[int, str, float] | None:
    """The longest arithmetic tail of ``part`` with at least one operator: (offset in part, text, value)."""
    tail = _EXPR_TAIL_RE.search(part[-MAX_EXPR_CHARS:])
    if tail is None or not tail.group(0).strip():
        return None
    base = len(part) - len(part[-MAX_EXPR_CHARS:]) + tail.start()
    text = tail.group(0)
    for s in range(len(text)):
        if s and (text[s - 1].isdigit() or text[s - 1] == "."):
            continue  # never start inside a number
        got = _arith(text[s:])
        if got is not None and got[1] >= 1:
            lead = len(text[s:]) - len(text[s:].lstrip())
            return base + s + lead, text[s:].strip(), got[0]
    return None


def _rhs(part: str) -> list[tuple[str, float, int]]:
    """Readings of the value right of ``=``: the longest arithmetic head and the leading number alone.

    ``3+4 = 7 - 1 = 6`` is written by people who mean ``3+4 = 7`` then ``7-1 = 6``; ``a = 2*3 + 4 = 10`` by
    people who mean the whole expression. An equation counts as false only if no reading makes it true.
    Each reading is (text, value, decimals of its last number).
    """
    head = _EXPR_HEAD_RE.match(part[:MAX_EXPR_CHARS])
    text = head.group(0) if head else ""
    out: list[tuple[str, float, int]] = []
    for e in range(len(text), 0, -1):
        if e < len(text) and (
            text[e].isdigit() or text[e] == "." and e + 1 < len(text) and text[e + 1].isdigit()
        ):
            continue  # never end inside a number
        got = _arith(text[:e])
        if got is not None:
            out.append((text[:e].strip(), got[0], _decimals(text[:e])))
            break
    num = _NUMBER_HEAD_RE.match(part)
    if num is not None:
        v = _arith(num.group(0).rstrip("."))
        if v is not None and not any(abs(v[0] - o[1]) < 1e-12 for o in out):
            out.append((num.group(0).strip(), v[0], _decimals(num.group(0))))
    return out


def _decimals(s: str) -> int:
    """Decimal places of the last number in ``s`` (the precision the writer rounded to)."""
    nums = re.findall(r"\d+(?:\.(\d*))?", s)
    return len(nums[-1]) if nums else 0


def _agrees(lhs: float, rhs: float, decimals: int) -> bool:
    """``lhs = rhs`` holds, allowing the rhs's rounding or truncation to its last written decimal."""
    tol = max(1e-6 * max(1.0, abs(rhs)), 10.0**-decimals if decimals else 0.0)
    return abs(lhs - rhs) <= tol


def equations(text: str) -> list[Equation]:
    """Every checkable ``a op b = c`` in ``text`` (also chains ``a = b = c``, LaTeX and thousands commas), in
    order. Only pure arithmetic is checked: a side with a variable, a power, a percent sign or a word is not
    an equation here."""
    norm, origin = normalize_math(text)
    found: list[Equation] = []
    offset = 0
    for line in norm.split("\n"):
        cuts = [
            i
            for i, ch in enumerate(line)
            if ch == "="
            and (i == 0 or line[i - 1] not in "=<>!")
            and (i + 1 == len(line) or line[i + 1] not in "=>")
        ]
        bounds = [-1, *cuts, len(line)]
        parts = [line[bounds[k] + 1 : bounds[k + 1]] for k in range(len(bounds) - 1)]
        for k in range(len(parts) - 1):
            left = _lhs(parts[k])
            if left is None:
                continue
            readings = _rhs(parts[k + 1])
            if not readings:
                continue
            at, lhs, lv = left
            true = any(_agrees(lv, rv, dec) for _, rv, dec in readings)
            rhs, rv, _ = readings[0]
            start = origin[offset + bounds[k] + 1 + at] if origin else 0
            found.append(Equation(start, lhs, rhs, lv, rv, true))
        offset += len(line) + 1
    return found


def first_false_equation(text: str) -> Equation | None:
    """The first equation in ``text`` that does not hold (see :func:`equations`), or None."""
    return next((e for e in equations(text) if not e.true), None)


# ---- one pair -------------------------------------------------------------------------------------------

_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def divergence(a: Sequence[int], b: Sequence[int]) -> tuple[int | None, bool]:
    """(d, length_only): the first index where the token ids differ; if one is a prefix of the other, the
    shorter length with ``length_only``; (None, False) for identical sequences."""
    for j, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return j, False
    if len(a) == len(b):
        return None, False
    return min(len(a), len(b)), True


def steering_events(rec: dict) -> list[int] | None:
    """Token indices a record's run steered (from its logged ``events``), or None if it logged none."""
    ev = rec.get("events")
    if not isinstance(ev, list):
        return None
    return [int(e["t"]) for e in ev if e.get("steered")]


def lag_of(d: int | None, events: list[int] | None) -> tuple[int | None, int | None]:
    """(lag, events up to d): ``d - max{event <= d}`` (0 = the steered token itself flipped) and how many
    events happened at or before ``d``; (None, ...) when there is no divergence or no event before it."""
    if d is None or events is None:
        return None, None
    before = [e for e in events if e <= d]
    return (d - max(before) if before else None), len(before)


def _truncated(rec: dict) -> bool:
    """The generation ran out of tokens."""
    return rec.get("finish_reason") == "length" or bool(rec.get("truncated", False))


def answered(rec: dict) -> bool:
    """The record finished and has an extractable answer (else it is 'truncated' for the change type)."""
    return not _truncated(rec) and rec.get("pred") is not None


def _same_answer(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    na, nb = to_number(str(a)), to_number(str(b))
    if na is not None and nb is not None:
        return math.isclose(na, nb, rel_tol=1e-9, abs_tol=1e-12)
    return str(a).strip() == str(b).strip()


def extraction_miss(rec: dict) -> bool:
    """Graded wrong although the trace finished and the last number it wrote equals the gold answer (a format
    problem, not reasoning; a truncated trace's last number is only where it stopped)."""
    if rec.get("correct") or _truncated(rec):
        return False
    nums = _LAST_NUMBER_RE.findall(rec.get("output") or "")
    gold = to_number(str(rec.get("gold")))
    last = to_number(nums[-1]) if nums else None
    return gold is not None and last is not None and math.isclose(gold, last, rel_tol=1e-9, abs_tol=1e-12)


def outcome(base_ok: bool, method_ok: bool, d: int | None, base_pred, method_pred) -> tuple[str, str]:
    """(category, subcategory): fixed / broken / both_right (unchanged, diverged) / both_wrong (unchanged,
    same_answer, different_answer)."""
    if method_ok and not base_ok:
        return "fixed", "diverged" if d is not None else "unchanged"
    if base_ok and not method_ok:
        return "broken", "diverged" if d is not None else "unchanged"
    if base_ok:
        return "both_right", "unchanged" if d is None else "diverged"
    if d is None:
        return "both_wrong", "unchanged"
    return "both_wrong", "same_answer" if _same_answer(base_pred, method_pred) else "different_answer"


def answer_change(base: dict, method: dict, category: str) -> str:
    """How the answer changed: extraction_only (the flip is a format miss on the wrong side), finished /
    unfinished (answered ↔ truncated or unextractable: a length effect), answer_changed, answer_kept,
    neither_answered."""
    if (category == "fixed" and extraction_miss(base)) or (category == "broken" and extraction_miss(method)):
        return "extraction_only"
    a, b = answered(base), answered(method)
    if a != b:
        return "finished" if b else "unfinished"
    if not a:
        return "neither_answered"
    return "answer_kept" if _same_answer(base.get("pred"), method.get("pred")) else "answer_changed"


def common_prefix(a: str, b: str) -> int:
    """Length of the common character prefix (where two texts part, in characters)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def corrected_in_place(base: dict, method: dict, cut: int) -> bool | None:
    """For a fixed pair: does base's wrong answer appear in the steered text after the divergence (character
    ``cut``) and before the steered final answer? True = it reached the same wrong value and revised it
    (self-correction); False = it avoided it; None = base had no answer to correct."""
    wrong = base.get("pred")
    if wrong is None:
        return None
    text = method.get("output") or ""
    final = text.rfind(str(method.get("pred"))) if method.get("pred") is not None else -1
    segment = text[cut : final if final > cut else len(text)]
    target = to_number(str(wrong))
    if target is None:
        return str(wrong).strip() in segment
    for m in _LAST_NUMBER_RE.finditer(segment):
        v = to_number(m.group(0))
        if v is not None and math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12):
            return True
    return False


def error_type(rec: dict) -> tuple[str, Equation | None]:
    """Heuristic type of a wrong trace's error: ``extraction`` (the last number is the gold answer: only its
    format was off), ``arithmetic`` (a false equation, returned), ``truncation`` (ran out of tokens or gave
    no answer), else ``setup`` (the arithmetic holds but the reasoning set up the wrong computation)."""
    if extraction_miss(rec):
        return "extraction", None
    eq = first_false_equation(rec.get("output") or "")
    if eq is not None:
        return "arithmetic", eq
    if not answered(rec):
        return "truncation", None
    return "setup", None


def analyse_pair(base: dict, method: dict, show: Callable[[int], str] | None = None) -> dict:
    """Everything about one problem's base and method records (both logged with ``--log-tokens``)."""
    show = show or (lambda t: f"#{t}")
    bt, mt = base["token_ids"], method["token_ids"]
    d, length_only = divergence(bt, mt)
    events = steering_events(method)
    e1 = min(events) if events else None
    lag, n_before = lag_of(d, events)
    nondet = events is not None and d is not None and (e1 is None or d < e1)
    cat, sub = outcome(
        bool(base["correct"]), bool(method["correct"]), d, base.get("pred"), method.get("pred")
    )
    margin = None
    p1, p2 = base.get("p_top1"), base.get("p_top2")
    if d is not None and p1 and p2 and d < min(len(p1), len(p2)):
        margin = round(p1[d] - p2[d], 5)
    flip = None
    if d is not None and not length_only:
        flip = [show(bt[d]), show(mt[d])]
    cut = common_prefix(base.get("output") or "", method.get("output") or "")
    row = dict(
        id=base["id"],
        category=cat,
        subcategory=sub,
        base_correct=bool(base["correct"]),
        method_correct=bool(method["correct"]),
        base_pred=base.get("pred"),
        method_pred=method.get("pred"),
        d=d,
        length_only=length_only,
        d_rel=round(d / len(bt), 4) if d is not None and bt else None,
        base_tokens=len(bt),
        method_tokens=len(mt),
        base_finish=base.get("finish_reason"),
        method_finish=method.get("finish_reason"),
        e1=e1,
        events=events,
        events_to_d=n_before,
        lag=lag,
        margin=margin,
        flip=flip,
        nondeterministic=nondet,
        change=answer_change(base, method, cat),
        divergence_char=cut if d is not None else None,
    )
    if not base["correct"]:
        kind, eq = error_type(base)
        row["error_type"] = kind
        row["false_equation"] = asdict(eq) if eq is not None else None
        if cat == "fixed":
            row["corrected_in_place"] = corrected_in_place(base, method, cut)
            row["preemptive"] = (cut <= eq.start) if eq is not None and d is not None else None
    return row


# ---- a whole run ----------------------------------------------------------------------------------------

CATEGORIES = ("fixed", "broken", "both_right", "both_wrong")
CHANGES = ("answer_changed", "answer_kept", "finished", "unfinished", "extraction_only", "neither_answered")
ERROR_TYPES = ("arithmetic", "truncation", "extraction", "setup")


def load_records(path: str | Path, need_tokens: bool = True) -> dict[str, dict]:
    """Records of an ``lrs eval`` JSONL by problem id; one-line errors for a missing, corrupt or unlogged file."""
    path = Path(path)
    if not path.is_file():
        raise LRSError(f"no eval results at {path}")
    recs: dict[str, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            recs[str(r["id"])] = r
        except (ValueError, KeyError, TypeError):
            raise LRSError(f"{path}:{n}: not an lrs eval record") from None
    if not recs:
        raise LRSError(f"{path} holds no records")
    if need_tokens and any("token_ids" not in r for r in recs.values()):
        raise LRSError(
            f"{path}: records carry no token_ids; rerun `lrs eval` with --log-tokens (and --shadow for base)"
        )
    return recs


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def compare_runs(
    base: dict[str, dict],
    other: dict[str, dict],
    show: Callable[[int], str] | None = None,
    top_flips: int = 15,
) -> dict:
    """Pair two runs on the same problems and summarise: accuracy comparison on all pairs; categories,
    divergence, answer changes, error types and flips on the pairs not excluded as nondeterministic."""
    if set(base) != set(other):
        only = sorted(set(base) ^ set(other))
        raise LRSError(f"the runs cover different problems ({len(only)} not in both, e.g. {only[0]})")
    ids = sorted(base)
    pairs = [analyse_pair(base[i], other[i], show) for i in ids]
    logged = any(p["events"] is not None for p in pairs)
    kept = [p for p in pairs if not p["nondeterministic"]]
    diverged = [p for p in kept if p["d"] is not None]
    cats = {c: {} for c in CATEGORIES}
    for p in kept:
        cats[p["category"]][p["subcategory"]] = cats[p["category"]].get(p["subcategory"], 0) + 1
    cmp = paired_comparison([base[i]["correct"] for i in ids], [other[i]["correct"] for i in ids])
    lags = [p["lag"] for p in diverged]
    div = dict(
        n=len(kept),
        unchanged=sum(p["d"] is None for p in kept),
        diverged=len(diverged),
        length_only=sum(p["length_only"] for p in diverged),
        median_d=_median([p["d"] for p in diverged]),
        median_d_rel=_median([p["d_rel"] for p in diverged]),
        median_lag=_median(lags),
        lag0=sum(x == 0 for x in lags if x is not None),
        with_lag=sum(x is not None for x in lags),
        mean_events_to_d=_mean([p["events_to_d"] for p in diverged]),
        median_margin=_median([p["margin"] for p in diverged]),
    )
    changes: dict[str, dict[str, int]] = {}
    for p in diverged:
        changes.setdefault(p["category"], {}).setdefault(p["change"], 0)
        changes[p["category"]][p["change"]] += 1
    errors: dict[str, dict[str, int]] = {}
    for p in kept:
        if "error_type" in p and p["category"] in ("fixed", "both_wrong"):
            errors.setdefault(p["category"], {}).setdefault(p["error_type"], 0)
            errors[p["category"]][p["error_type"]] += 1
    fixed = [p for p in kept if p["category"] == "fixed"]
    rect = dict(
        corrected_in_place=sum(p.get("corrected_in_place") is True for p in fixed),
        avoided=sum(p.get("corrected_in_place") is False for p in fixed),
        no_base_answer=sum(p.get("corrected_in_place") is None for p in fixed),
        preemptive=sum(p.get("preemptive") is True for p in fixed),
        arithmetic_fixed=sum(p.get("error_type") == "arithmetic" for p in fixed),
    )
    flips = Counter(tuple(p["flip"]) for p in diverged if p["flip"] is not None)
    return dict(
        n=len(pairs),
        events_logged=logged,
        nondeterministic=sum(p["nondeterministic"] for p in pairs) if logged else None,
        comparison=cmp,
        net_fixes=cmp["fixed"] - cmp["broken"],
        categories=cats,
        divergence=div,
        changes=changes,
        error_types=errors,
        rectification=rect,
        flips=[dict(base=a, method=b, n=n) for (a, b), n in flips.most_common(top_flips)],
        pairs=pairs,
    )


def method_vs_control(method: dict[str, dict], control: dict[str, dict], base: dict[str, dict]) -> dict:
    """The method against the matched control on the same problems: net fixes of each vs base, and an exact
    McNemar (binomial) test on the problems where exactly one of the two steered runs is right."""
    if set(method) != set(control):
        raise LRSError("the method and control runs cover different problems")
    ids = sorted(method)
    m = np.array([bool(method[i]["correct"]) for i in ids])
    c = np.array([bool(control[i]["correct"]) for i in ids])
    b = np.array([bool(base[i]["correct"]) for i in ids])
    only_m, only_c = int((m & ~c).sum()), int((c & ~m).sum())
    net_m = int((m & ~b).sum()) - int((b & ~m).sum())
    net_c = int((c & ~b).sum()) - int((b & ~c).sum())
    return dict(
        n=len(ids),
        net_fixes_method=net_m,
        net_fixes_control=net_c,
        method_only_right=only_m,
        control_only_right=only_c,
        mcnemar_p=mcnemar_exact(only_m, only_c),
    )


def caveats(result: dict) -> list[str]:
    """Automatic warnings a reader needs next to the numbers."""
    out = []
    m = result["runs"]["method"]
    if not m["events_logged"]:
        out.append(
            "the method run logged no steering events (--log-tokens): lag, e1 and the nondeterminism check are missing"
        )
    elif m["nondeterministic"]:
        out.append(
            f"{m['nondeterministic']} pair(s) diverged before any steering event: nondeterminism, excluded"
        )
    disc = m["comparison"]["fixed"] + m["comparison"]["broken"]
    if disc < 10:
        out.append(f"only {disc} discordant pairs vs base: no accuracy claim is possible at this size")
    if m["n"] < 100:
        out.append(f"n = {m['n']} problems (< 100)")
    noise = result["runs"].get("noise")
    if noise is None:
        out.append("no --noise run: the divergence rate without steering is unknown")
    elif noise["divergence"]["diverged"]:
        out.append(
            f"the base rerun diverged on {noise['divergence']['diverged']}/{noise['n']} problems without steering"
        )
    return out


def rectify(
    base: dict[str, dict],
    method: dict[str, dict],
    control: dict[str, dict] | None = None,
    noise: dict[str, dict] | None = None,
    *,
    names: dict[str, str] | None = None,
    show: Callable[[int], str] | None = None,
) -> dict:
    """The whole analysis as one JSON-able dict: per run (method, control, noise) vs base, and method vs control."""
    runs = {"method": compare_runs(base, method, show)}
    if control is not None:
        runs["control"] = compare_runs(base, control, show)
    if noise is not None:
        runs["noise"] = compare_runs(base, noise, show)
    for role, r in runs.items():
        r["name"] = (names or {}).get(role, role)
    out: dict = dict(format=FORMAT, base=(names or {}).get("base", "base"), runs=runs)
    if control is not None:
        out["method_vs_control"] = method_vs_control(method, control, base)
    out["caveats"] = caveats(out)
    return out


# ---- the printed table ----------------------------------------------------------------------------------


def _fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def format_tables(result: dict) -> str:
    """The tables a user reads on the terminal (every number is also in the JSON)."""
    runs = result["runs"]
    w = max(12, *(len(r["name"]) for r in runs.values())) + 2  # the run-name column
    lines = [f"error rectification vs {result['base']}"]
    head = f"{'run':<{w}}{'n':>5}{'excl':>6}{'fixed':>7}{'broken':>8}{'net':>5}  {'delta acc [95% CI]':<24}{'p':>8}"
    lines += ["", head, "-" * len(head)]
    for r in runs.values():
        c = r["comparison"]
        lo, hi = c["delta_ci"]
        delta = f"{c['delta']:+.1%} [{lo:+.1%}, {hi:+.1%}]"
        lines.append(
            f"{r['name']:<{w}}{r['n']:>5}{_fmt(r['nondeterministic'], 'd'):>6}{c['fixed']:>7}{c['broken']:>8}"
            f"{r['net_fixes']:>+5}  {delta:<24}{c['mcnemar_p']:>8.3g}"
        )
    lines += ["", "categories (pairs not excluded)"]
    for r in runs.values():
        parts = []
        for cat in CATEGORIES:
            sub = r["categories"][cat]
            if sub:
                inner = ", ".join(f"{k} {v}" for k, v in sorted(sub.items()))
                parts.append(f"{cat} {sum(sub.values())} ({inner})")
        lines.append(f"  {r['name']:<{w}}" + "; ".join(parts))
    head = (
        f"{'run':<{w}}{'unch':>6}{'div':>5}{'len-only':>9}{'med d':>7}{'med d/T':>8}{'med lag':>8}"
        f"{'lag=0':>7}{'ev<=d':>7}{'margin':>8}"
    )
    lines += ["", "divergence", head, "-" * len(head)]
    for r in runs.values():
        v = r["divergence"]
        lag0 = f"{v['lag0']}/{v['with_lag']}" if v["with_lag"] else "-"
        lines.append(
            f"{r['name']:<{w}}{v['unchanged']:>6}{v['diverged']:>5}{v['length_only']:>9}{_fmt(v['median_d']):>7}"
            f"{_fmt(v['median_d_rel'], '.2f'):>8}{_fmt(v['median_lag']):>8}{lag0:>7}"
            f"{_fmt(v['mean_events_to_d'], '.1f'):>7}{_fmt(v['median_margin'], '.3f'):>8}"
        )
    lines += ["", "answer change (diverged pairs)"]
    for r in runs.values():
        for cat, ch in sorted(r["changes"].items()):
            lines.append(
                f"  {r['name']:<{w}}{cat:<12}" + ", ".join(f"{k} {v}" for k, v in sorted(ch.items()))
            )
    lines += ["", "base error type (base wrong)"]
    for r in runs.values():
        for cat, et in sorted(r["error_types"].items()):
            lines.append(
                f"  {r['name']:<{w}}{cat:<12}" + ", ".join(f"{k} {v}" for k, v in sorted(et.items()))
            )
        x = r["rectification"]
        if any(x.values()):
            lines.append(
                f"  {r['name']:<{w}}fixed: corrected in place {x['corrected_in_place']}, avoided {x['avoided']}, "
                f"no base answer {x['no_base_answer']}; diverged before base's false equation "
                f"{x['preemptive']}/{x['arithmetic_fixed']}"
            )
    m = runs["method"]
    if m["flips"]:
        lines += ["", f"flip tokens ({m['name']}: base -> steered at d)"]
        lines += [f"  {f['n']:>4}  {f['base']} -> {f['method']}" for f in m["flips"][:10]]
    mc = result.get("method_vs_control")
    if mc:
        lines += [
            "",
            f"{m['name']} vs {runs['control']['name']}: net fixes {mc['net_fixes_method']:+d} vs "
            f"{mc['net_fixes_control']:+d}; right only under {m['name']} {mc['method_only_right']}, only under "
            f"{runs['control']['name']} {mc['control_only_right']}, exact McNemar p = {mc['mcnemar_p']:.3g}",
        ]
    if result.get("caveats"):
        lines += ["", *[f"caveat: {c}" for c in result["caveats"]]]
    return "\n".join(lines)


# ---- figures (ANALYSES.md §3.4; F6, the HTML trace cards, belongs to the report) ------------------------

COLOURS = {"fixed": "#2a9d4a", "broken": "#c0392b", "both_right": "#4a7fb5", "both_wrong": "#999999"}


def _figure(w: float, h: float, ncols: int = 1):
    """A matplotlib figure on the Agg canvas (no pyplot state, no display needed) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, k + 1) for k in range(ncols)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path


def _flip_matrix(run: dict, path: Path) -> Path:
    """F1: 2×2 counts (base right/wrong × method right/wrong) over all pairs, with Δacc [CI] and McNemar p."""
    pairs = run["pairs"]
    m = np.zeros((2, 2), dtype=int)
    for p in pairs:
        m[0 if p["base_correct"] else 1, 0 if p["method_correct"] else 1] += 1
    fig, (ax,) = _figure(4.2, 3.9)
    ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, m.max()))
    n = max(1, m.sum())
    for i in range(2):
        for j in range(2):
            colour = "white" if m[i, j] > m.max() / 2 else "black"
            ax.text(
                j, i, f"{m[i, j]}\n{m[i, j] / n:.0%}", ha="center", va="center", fontsize=11, color=colour
            )
    ax.set_xticks([0, 1], [f"{run['name']} right", f"{run['name']} wrong"])
    ax.set_yticks([0, 1], ["base right", "base wrong"])
    c = run["comparison"]
    lo, hi = c["delta_ci"]
    ax.set_title(
        f"{run['name']} vs base (n={run['n']})\nΔacc {c['delta']:+.1%} [{lo:+.1%}, {hi:+.1%}], "
        f"exact McNemar p={c['mcnemar_p']:.3g}",
        fontsize=9,
    )
    return _save(fig, path)


def _forest(runs: dict, path: Path) -> Path:
    """F2: Δacc vs base with 95% CI per run, and fixed / broken counts."""
    names = [r["name"] for r in runs.values()]
    fig, (a1, a2) = _figure(7.5, 0.6 * len(names) + 1.6, ncols=2)
    for y, r in enumerate(runs.values()):
        c = r["comparison"]
        lo, hi = c["delta_ci"]
        a1.errorbar(
            [c["delta"]], [y], xerr=[[c["delta"] - lo], [hi - c["delta"]]], fmt="o", color="k", capsize=3
        )
        a2.barh(
            [y - 0.18], [c["fixed"]], height=0.35, color=COLOURS["fixed"], label="fixed" if y == 0 else None
        )
        a2.barh(
            [y + 0.18],
            [c["broken"]],
            height=0.35,
            color=COLOURS["broken"],
            label="broken" if y == 0 else None,
        )
    a1.axvline(0, color="#888888", lw=0.8)
    for ax in (a1, a2):
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
    a1.set_xlabel("accuracy change vs base (95% CI)")
    a2.set_xlabel("problems")
    a2.legend(fontsize=8)
    return _save(fig, path)


def _ecdf(ax, xs: list[float], **kw) -> None:
    xs = sorted(xs)
    if xs:
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", **kw)


def _divergence_ecdf(runs: dict, path: Path) -> Path | None:
    """F3: ECDF of d and d/T_base by category for the method, the noise floor overlaid, a rug of e1."""
    m = runs["method"]
    div = [p for p in m["pairs"] if p["d"] is not None and not p["nondeterministic"]]
    if not div:
        return None
    fig, axes = _figure(8, 3.2, ncols=2)
    for ax, key in zip(axes, ("d", "d_rel"), strict=True):
        for cat in CATEGORIES:
            xs = [p[key] for p in div if p["category"] == cat]
            _ecdf(ax, xs, color=COLOURS[cat], label=f"{cat} ({len(xs)})")
        noise = runs.get("noise")
        if noise is not None:
            xs = [p[key] for p in noise["pairs"] if p["d"] is not None]
            label = f"noise floor: {len(xs)}/{noise['n']} diverged"
            if xs:
                _ecdf(ax, xs, color="k", ls="--", label=label)
            else:
                ax.plot([], [], "k--", label=label)
        if key == "d":
            e1 = [p["e1"] for p in m["pairs"] if p["e1"] is not None]
            ax.plot(e1, np.zeros(len(e1)), "|", color="#d8853b", ms=10, label="first event")
        ax.set_xlabel("divergence token d" if key == "d" else "d / base length")
        ax.set_ylabel("share of diverged pairs")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _raster(run: dict, path: Path, limit: int = 200) -> Path | None:
    """F4: one row per diverged pair (sorted by d): ticks at steering events, a dot at d, coloured by category."""
    div = [
        p
        for p in run["pairs"]
        if p["d"] is not None and p["events"] is not None and not p["nondeterministic"]
    ]
    if not div:
        return None
    div = sorted(div, key=lambda p: p["d"])[:limit]
    fig, (ax,) = _figure(7, 0.08 * len(div) + 1.6)
    for y, p in enumerate(div):
        ax.plot(p["events"], [y] * len(p["events"]), "|", color="#555555", ms=4)
        ax.plot([p["d"]], [y], "o", color=COLOURS[p["category"]], ms=4)
    for cat in CATEGORIES:
        ax.plot([], [], "o", color=COLOURS[cat], label=cat)
    ax.set_xlabel("generated token (| steering event, ● divergence)")
    ax.set_ylabel("diverged pairs, sorted by d")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _series(rec: dict, key: str) -> dict[int, float]:
    """Per-token values of a record: ``r`` or ``c`` from its events, ``p`` from ``p_top1``."""
    if key == "p":
        return dict(enumerate(rec.get("p_top1") or []))
    return {int(e["t"]): e[key] for e in rec.get("events") or [] if e.get(key) is not None}


def _band(
    rows: list[list[float]], seed: int = 0, n_boot: int = 400
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over problems per offset and a 95% bootstrap band (problems resampled), NaN where none."""
    a = np.asarray(rows, dtype=float)
    mean = np.nanmean(a, axis=0)
    rng = np.random.default_rng(seed)
    boots = np.stack([np.nanmean(a[rng.integers(0, len(a), len(a))], axis=0) for _ in range(n_boot)])
    return mean, np.nanpercentile(boots, 2.5, axis=0), np.nanpercentile(boots, 97.5, axis=0)


def _fork(
    run: dict, base: dict[str, dict], method: dict[str, dict], path: Path, before: int = 64, after: int = 128
):
    """F5: r_t (and top-1 probability) around d for the steered run and the base shadow run, mean ± bootstrap
    band over pairs, by category; plus r before vs after every steering event."""
    div = [p for p in run["pairs"] if p["d"] is not None and not p["nondeterministic"]]
    div = [p for p in div if base[p["id"]].get("events") and method[p["id"]].get("events")]
    if not div:
        return None
    offsets = np.arange(-before, after + 1)
    fig, axes = _figure(11, 3.2, ncols=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN offsets far from d
        for ax, key, label in ((axes[0], "r", "reward r_t"), (axes[1], "p", "top-1 probability")):
            for cat in ("fixed", "broken", "both_wrong"):
                group = [p for p in div if p["category"] == cat]
                if not group:
                    continue
                for who, recs, ls in (("steered", method, "-"), ("base", base, "--")):
                    rows = []
                    for p in group:
                        s = _series(recs[p["id"]], key)
                        rows.append([s.get(p["d"] + k, np.nan) for k in offsets])
                    if not any(np.isfinite(rows).any(axis=1)):
                        continue
                    mean, lo, hi = _band(rows)
                    ax.plot(offsets, mean, ls=ls, color=COLOURS[cat], label=f"{cat} {who} ({len(group)})")
                    if who == "steered":
                        ax.fill_between(offsets, lo, hi, color=COLOURS[cat], alpha=0.15)
            ax.axvline(0, color="k", lw=0.6)
            ax.set_xlabel("tokens from divergence d")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=6)
    pre, post = [], []
    for rec in method.values():
        for e in rec.get("events") or []:
            if e.get("steered") and e.get("r_post") is not None:
                pre.append(e["r"])
                post.append(e["r_post"])
    if pre:
        axes[2].scatter(pre, post, s=4, alpha=0.4, color="#d8853b")
        axes[2].plot([0, 1], [0, 1], color="#888888", lw=0.6)
    axes[2].set_xlabel("r before the step")
    axes[2].set_ylabel("r after the step")
    return _save(fig, path)


def _lengths(run: dict, base: dict[str, dict], method: dict[str, dict], path: Path) -> Path:
    """F7: base vs steered generated tokens per problem, coloured by category, with truncation rates."""
    fig, (ax,) = _figure(4.2, 4)
    for cat in CATEGORIES:
        ps = [p for p in run["pairs"] if p["category"] == cat]
        ax.scatter(
            [p["base_tokens"] for p in ps],
            [p["method_tokens"] for p in ps],
            s=8,
            color=COLOURS[cat],
            label=cat,
        )
    hi = max([1] + [max(p["base_tokens"], p["method_tokens"]) for p in run["pairs"]])
    ax.plot([0, hi], [0, hi], color="#888888", lw=0.6)
    tb = np.mean([_truncated(r) for r in base.values()])
    tm = np.mean([_truncated(r) for r in method.values()])
    ax.set_title(f"truncated: base {tb:.0%}, {run['name']} {tm:.0%}", fontsize=9)
    ax.set_xlabel("base tokens")
    ax.set_ylabel(f"{run['name']} tokens")
    ax.legend(fontsize=7)
    return _save(fig, path)


def figures(
    result: dict,
    base: dict[str, dict],
    others: dict[str, dict[str, dict]],
    out: Path,
) -> list[Path]:
    """Draw every figure the data allows into ``out`` (PNG, 150 dpi); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    made: list[Path | None] = [_flip_matrix(r, out / f"F1-flip-{role}.png") for role, r in runs.items()]
    made.append(_forest(runs, out / "F2-forest.png"))
    made.append(_divergence_ecdf(runs, out / "F3-divergence.png"))
    made.append(_raster(runs["method"], out / "F4-raster.png"))
    made.append(_fork(runs["method"], base, others["method"], out / "F5-fork.png"))
    made.append(_lengths(runs["method"], base, others["method"], out / "F7-lengths.png"))
    return [p for p in made if p is not None]


# ---- command line ---------------------------------------------------------------------------------------


def _token_shower(tok) -> Callable[[int], str] | None:
    """Token id → its text (quoted) with a local tokenizer, for the flip table; None keeps ``#id``."""
    if tok is None:
        return None
    return lambda t: repr(tok.decode([t]))


def retokenize(recs: dict[str, dict], tok) -> dict[str, dict]:
    """Records without ``token_ids`` get the ids of their re-tokenised output text, marked ``retokenized``.

    For runs made without ``--log-tokens``: the divergence point is then exact wherever the tokenizer splits the
    decoded text as the model did (nearly always for BPE tokenizers), and lag/events stay unknown."""
    out = {}
    for k, r in recs.items():
        if "token_ids" not in r:
            ids = tok(r.get("output") or "", add_special_tokens=False)["input_ids"]
            r = {**r, "token_ids": ids, "retokenized": True}
        out[k] = r
    return out


def run(args: argparse.Namespace) -> dict:
    """``lrs analyze rectify``: read the runs, write ``rectify.json`` and figures, print the tables."""
    if args.retokenize and not args.tokenizer:
        raise LRSError(
            "--retokenize needs --tokenizer DIR (the model's folder) to turn the texts into token ids"
        )
    from lrs.models import load_tokenizer

    need = not args.retokenize
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None  # loaded once, for every file

    def load(path):
        recs = load_records(path, need_tokens=need)
        return retokenize(recs, tok) if args.retokenize else recs

    base, method = load(args.base), load(args.method)
    control = load(args.control) if args.control else None
    noise = load(args.noise) if args.noise else None
    names = dict(base=Path(args.base).stem, method=Path(args.method).stem)
    if args.control:
        names["control"] = Path(args.control).stem
    if args.noise:
        names["noise"] = f"noise ({Path(args.noise).stem})"
    result = rectify(base, method, control, noise, names=names, show=_token_shower(tok))
    out = Path(args.out) if args.out else Path(args.method).parent / "rectify" / Path(args.method).stem
    if out.exists() and not out.is_dir():
        raise LRSError(f"--out {out} is a file, not a directory")
    others = {"method": method}
    if not args.no_figures:
        result["figures"] = [p.name for p in figures(result, base, others, out)]
    result["inputs"] = {
        k: str(v) for k, v in vars(args).items() if k in ("base", "method", "control", "noise") and v
    }
    if args.retokenize:
        result["retokenized"] = (
            "runs made without --log-tokens: divergence from re-tokenised output text (exact where the tokenizer "
            "splits the text as the model generated it); steering events, lag and margins were not logged"
        )
    atomic_write_json(out / "rectify.json", result)
    if args.retokenize:
        print(f"note: {result['retokenized']}")
    print(format_tables(result))
    print(f"rectification: {out / 'rectify.json'}")
    return result


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs analyze rectify`` to the sub-parsers of ``lrs analyze``."""
    p = sub.add_parser(
        "rectify",
        help="where steered traces leave base traces, whether a steering event caused it, what changed",
        description=(
            "Pair base and method records by problem id (both from `lrs eval --log-tokens`; base with --shadow for "
            "the reward fork plot) and report divergence, lag, flips, outcome categories, answer changes and error "
            "types; --noise adds the base-vs-base noise floor, --control the matched random run."
        ),
    )
    p.add_argument("--base", required=True, help="base run JSONL (e.g. <run>/eval/<task>/<split>/base.jsonl)")
    p.add_argument("--method", required=True, help="steered run JSONL (e.g. .../lrs.jsonl)")
    p.add_argument("--control", default=None, help="matched control run JSONL (e.g. .../random.jsonl)")
    p.add_argument(
        "--noise", default=None, help="a second base run (e.g. another --batch-size): the noise floor"
    )
    p.add_argument(
        "--out", default=None, help="output directory (default <method dir>/rectify/<method name>)"
    )
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder: show flipped tokens as text")
    p.add_argument("--no-figures", action="store_true", help="write the JSON and tables only")
    p.add_argument(
        "--retokenize",
        action="store_true",
        help="runs made without --log-tokens: token ids from the output text with --tokenizer (approximate)",
    )
    p.set_defaults(func=run)

"""Trace-diff cards (ANALYSES.md §3.4, F6): base and steered text of one problem side by side.

Why: tables say how often steering fixed or broke a problem; a card shows what happened in one. Cards are
drawn by a seeded random choice among the fixed and among the broken problems (never hand-picked), so two
reports of the same run with the same seed show the same cards. Each card collapses the common prefix, marks
where the texts part (the divergence token when token ids were logged, else the first differing character),
underlines the steered tokens when token positions can be mapped to characters, draws a strip of the steering
events and the divergence over the trace, and puts the behaviour tagger's chips after each tagged sentence.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import numpy as np

from lrs.analysis.behaviour_stats import keyed_traces
from lrs.analysis.behaviours import TAGS, token_char_spans
from lrs.analysis.rectify import common_prefix, divergence, steering_events
from lrs.errors import LRSError

TAG_COLOURS = {
    "verification": "#2a9d4a",
    "backtracking": "#c0392b",
    "subgoal": "#4a7fb5",
    "backward_chaining": "#8e44ad",
    "reflection": "#d68910",
    "transition": "#16a085",
}
TAG_SHORT = {
    "verification": "verify",
    "backtracking": "backtrack",
    "subgoal": "subgoal",
    "backward_chaining": "backward",
    "reflection": "reflect",
    "transition": "transition",
}

#: decode a list of token ids to text (a tokenizer's ``decode``), used to place tokens in the text
Decoder = Callable[[list[int]], str]


def draw(base: dict[str, dict], method: dict[str, dict], seed: int = 0, k: int = 3) -> list[tuple[str, str]]:
    """``k`` fixed and ``k`` broken problem ids, drawn by ``numpy.random.default_rng(seed)`` from the sorted
    ids of each category (fewer when a category is smaller); returns (category, id) pairs."""
    ids = sorted(set(base) & set(method))
    fixed = [i for i in ids if method[i]["correct"] and not base[i]["correct"]]
    broken = [i for i in ids if base[i]["correct"] and not method[i]["correct"]]
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    for cat, pool in (("fixed", fixed), ("broken", broken)):
        if pool:
            pick = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
            out += [(cat, pool[int(j)]) for j in pick]
    return out


def token_spans(rec: dict, decode: Decoder | None = None) -> list[tuple[int, int]] | None:
    """Character span of each generated token in ``rec["output"]``: from ``token_offsets``, ``token_strs``,
    or prefix decoding of ``token_ids`` with ``decode``; None when none of these describes the text."""
    text = rec.get("output") or ""
    if isinstance(rec.get("token_offsets"), list):
        return [(int(a), int(b)) for a, b in rec["token_offsets"]]
    if isinstance(rec.get("token_strs"), list):
        try:
            return token_char_spans(rec["token_strs"], text)
        except LRSError:  # strings that do not rebuild the text: no spans
            return None
    ids = rec.get("token_ids")
    if decode is None or not isinstance(ids, list):
        return None
    spans, prev = [], 0
    for j in range(1, len(ids) + 1):
        end = len(decode(ids[:j]))
        spans.append((min(prev, end), end))
        prev = end
    return spans if prev == len(text) else None


def _word_end(text: str, start: int, limit: int = 24) -> int:
    end = start + 1
    while end < len(text) and end - start < limit and not text[end].isspace():
        end += 1
    return min(end, len(text))


def _annotate(text: str, lo: int, hi: int, marks: dict) -> str:
    """HTML of ``text[lo:hi]`` with the divergence highlighted, steered tokens underlined and chips inserted
    after tagged sentences (``marks``: ``div`` (a, b), ``events`` [(a, b)], ``chips`` [(pos, tags)])."""
    ev = np.zeros(len(text) + 1, dtype=bool)
    for a, b in marks.get("events", []):
        ev[max(a, 0) : max(b, a + 1)] = True
    dv = np.zeros(len(text) + 1, dtype=bool)
    if marks.get("div") is not None:
        a, b = marks["div"]
        dv[a:b] = True
    chips: dict[int, list[str]] = {}
    for pos, tags in marks.get("chips", []):
        if lo < pos <= hi:
            chips.setdefault(pos, []).extend(tags)
    cuts = sorted(
        {lo, hi, *chips, *[i for i in range(lo + 1, hi) if ev[i] != ev[i - 1] or dv[i] != dv[i - 1]]}
    )
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece = html.escape(text[a:b], quote=False)
        cls = " ".join(c for c, on in (("ev", ev[a]), ("div", dv[a])) if on)
        out.append(f'<span class="{cls}">{piece}</span>' if cls else piece)
        if b in chips:
            out.append(_chips(chips[b]))
    return "".join(out)


def _chips(tags: Sequence[str]) -> str:
    """Coloured chips for a sentence's tags; ``reflection`` is left out where verification or backtracking
    (which always imply it) is shown."""
    shown = [t for t in TAGS if t in tags]
    if "reflection" in shown and {"verification", "backtracking"} & set(shown):
        shown.remove("reflection")
    return "".join(
        f'<span class="chip" style="background:{TAG_COLOURS[t]}" title="{t}">{TAG_SHORT[t]}</span>'
        for t in shown
    )


def _strip(length: int, events: Sequence[int] | None, d: int | None) -> str:
    if length <= 0:
        return ""
    ticks = "".join(f'<i style="left:{100 * t / length:.2f}%"></i>' for t in events or [])
    mark = (
        f'<b style="left:{100 * min(d, length - 1) / length:.2f}%" title="divergence d={d}"></b>'
        if d is not None
        else ""
    )
    return f'<div class="strip">{ticks}{mark}</div>'


def build(cat: str, pid: str, base: dict, method: dict, name: str, decode: Decoder | None = None) -> dict:
    """Everything one card shows (JSON-able, also listed in ``summary.json``), plus its rendered HTML."""
    bt, mt = base.get("output") or "", method.get("output") or ""
    cut = common_prefix(bt, mt)
    d = None
    if isinstance(base.get("token_ids"), list) and isinstance(method.get("token_ids"), list):
        d, _ = divergence(base["token_ids"], method["token_ids"])
    events = steering_events(method)
    bspans, mspans = token_spans(base, decode), token_spans(method, decode)
    btags = keyed_traces([base], "base", "card")[str(pid)]
    mtags = keyed_traces([method], name, "card")[str(pid)]

    def chips(tt) -> list[tuple[int, list[str]]]:
        return [(s.segment.end, sorted(s.tags)) for s in tt.segments if s.tags]

    def div_span(text: str, spans) -> tuple[int, int] | None:
        if cut >= len(text):
            return None
        if d is not None and spans is not None and d < len(spans):
            a, b = spans[d]
            return (min(a, cut), max(b, cut + 1))
        return (cut, _word_end(text, cut))

    mev = [mspans[t] for t in events or [] if mspans is not None and t < len(mspans)]
    bmarks = dict(div=div_span(bt, bspans), chips=chips(btags))
    mmarks = dict(div=div_span(mt, mspans), chips=chips(mtags), events=mev)
    n_tok = method.get("tokens") or (len(method["token_ids"]) if "token_ids" in method else len(mt))
    n_before = sum(1 for t in events or [] if d is not None and t <= d)
    facts = [
        f"gold <b>{html.escape(str(base.get('gold')))}</b>",
        f"base <b>{html.escape(str(base.get('pred')))}</b> → {html.escape(name)} "
        f"<b>{html.escape(str(method.get('pred')))}</b>",
        f"tokens {base.get('tokens', '?')} → {method.get('tokens', '?')}",
        f"diverge at token {d}" if d is not None else f"diverge at char {cut}",
    ]
    if events is not None:
        facts.append(
            f"{len(events)} steering events ({n_before} up to d)"
            if d is not None
            else f"{len(events)} steering events"
        )
    legend = (
        '<div class="legend"><span style="color:#d8853b">▮</span> steering event '
        '<span style="color:#1d232b">▮</span> divergence; '
        + ("<u>underlined</u> = steered token; " if mev else "")
        + '<span class="div" style="background:#ffe08a">highlight</span> = first differing token</div>'
    )
    prefix = (
        f"<details><summary>common prefix ({cut} characters{f', {d} tokens' if d is not None else ''})</summary>"
        f'<div class="txt">{_annotate(mt, 0, cut, {**mmarks, "div": None})}</div></details>'
        if cut
        else '<p class="note">the texts differ from the first character</p>'
    )
    body = (
        f'<div class="body">{_strip(int(n_tok), events, d)}{legend}{prefix}<div class="cols">'
        f'<div><h5>base after the divergence</h5><div class="txt">{_annotate(bt, cut, len(bt), bmarks)}</div></div>'
        f'<div><h5>{html.escape(name)} after the divergence</h5><div class="txt">'
        f"{_annotate(mt, cut, len(mt), mmarks)}</div></div></div></div>"
    )
    head = (
        f'<header><span class="cat {cat}">{cat}</span><code>{html.escape(str(pid))}</code>'
        + "".join(f"<span>{f}</span>" for f in facts)
        + "</header>"
    )
    return dict(
        category=cat,
        id=pid,
        d=d,
        divergence_char=cut,
        events=len(events) if events is not None else None,
        base_pred=base.get("pred"),
        method_pred=method.get("pred"),
        gold=base.get("gold"),
        html=f'<article class="card">{head}{body}</article>',
    )


def chip_legend() -> str:
    """One line naming the behaviour chips' colours."""
    return '<p class="legend">behaviour chips: ' + "".join(_chips([t]) for t in TAGS) + "</p>"

"""Cognitive-behaviour tagger (issue 11): segment generated text into sentences and tag each with behaviours.

Why: the method's claim is that steering fosters verification, backtracking, subgoal setting and backward
chaining. This module measures those behaviours offline, deterministically and without any model, so base and
steered traces can be compared. Tags come from a versioned lexicon of regular expressions plus a few rules
(``shared/ANALYSES.md`` §2); every output records ``LEXICON_VERSION`` and the sha256 of the lexicon, and the
tagger is validated against a hand-labelled sentence set (``tests/data/behaviours/labelled.jsonl``).

Tags (multi-label, per sentence):

- ``verification``: checks a result (announces, performs, or reports the outcome of a check).
- ``backtracking``: says earlier reasoning is wrong or a dead end, or redoes it.
- ``subgoal``: states a plan or an intermediate goal to be reached.
- ``backward_chaining``: reasons from the goal or end state back to what is needed.
- ``reflection``: monitors the reasoning rather than advancing it (SEAL's "reflection"): every verification
  or backtracking sentence, plus pauses and doubts ("Wait,", "Hmm,", "I'm not sure").
- ``transition``: proposes or switches to a different approach (SEAL's "transition").
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lrs.errors import LRSError

TAGS: tuple[str, ...] = (
    "verification",
    "backtracking",
    "subgoal",
    "backward_chaining",
    "reflection",
    "transition",
)

# ---------------------------------------------------------------------------------------------------------
# Lexicon. Every pattern is matched case-insensitively against one sentence. Changing any pattern or rule
# must bump LEXICON_VERSION; the hash below changes by itself, so reports can tell lexicons apart.
# ---------------------------------------------------------------------------------------------------------

LEXICON_VERSION = "2"

# Version 1 is ANALYSES §2.3 verbatim; version 2 extends it using only the dev split of the labelled set
# (quoted text masked, a writer-voice guard on bare keywords, more phrasings of each behaviour).
LEXICON: dict[str, tuple[str, ...]] = {
    # quoted text is the question's or a character's words, never the writer's behaviour
    "quote": (r"\"[^\"\n]*\"", r"“[^”\n]*”"),
    # the writer speaks (first/second person) or the sentence opens with a verb: guards bare keywords
    # against story sentences ("The manager double-checks the till", "A verification code")
    "voice": (
        r"\b(?:i|i'm|i'll|i've|i'd|me|my|we|we're|we'll|we've|we'd|us|our|let's|you|your)\b",
        r"^\W*(?:(?:so|now|and|but|then|finally|first|next|also|okay|ok|alright|wait|hmm+|alternatively)\W+)*"
        r"(?:\w+ing\b|to (?:verify|double|re-?check|check|confirm|be sure)|verify|double|re-?check|check|"
        r"confirm|make sure|re-?calculate|re-?compute|re-?do|re-?consider|re-?examine|re-?count|note|"
        r"consider|use|observe|notice)",
    ),
    # spans removed before the verification patterns run ("check" as money, "checklist", ...)
    "verify_not": (
        r"\bchecks?\s+(?:for|of)\s+\$",
        r"\bchecking\s+account",
        r"\bpaychecks?\b",
        r"\bchecklists?\b",
    ),
    "verify": (
        r"\b(?:let(?:'s| us| me)|we(?:'ll| will| can| should| need to)|i(?:'ll| will| should| can)|now)\s+"
        r"(?:quickly\s+|also\s+|just\s+)?(?:double[- ]?check|re-?check|check|verify|confirm|validate|"
        r"make sure|ensure|test)\b",
        r"\b(?:plug\w*|substitut\w*|put\w*)\b[^.\n]{0,40}\bback\b",
        r"\b(?:checks out|is consistent with|satisf(?:y|ies) (?:all|both|the)|as expected|"
        r"matches (?:the|our))\b",
        r"\b(?:which|this|that|it)\s+(?:is|gives|equals)\s+(?:indeed\s+)?"
        r"(?:correct|right|consistent|the (?:target|given|original))\b",
        r"\b(?:write|run|use)\b[^.\n]{0,30}\b(?:python|code)\b[^.\n]{0,25}\b(?:verify|confirm|check)\b",
        r"\bconfirm(?:s|ed)\s+(?:that|our|the|this|it)\b",
        r"\bmakes? sense\b",
        r"\b(?:is|was) (?:that|this|it) (?:right|correct)\b",
        r"\b(?:are|is) (?:all |both )?(?:satisfied|consistent)\b",
        r"\b(?:which|this|that|it|they|doesn't|does not|don't|do not)\s+match(?:es)?\b",
        r"\bcontradicts (?:the|our|what|that|this)\b",
        r"\bas a (?:sanity )?check\b",
    ),
    # keywords that count only in the writer's voice
    "verify_voiced": (
        r"\b(?:double[- ]?check\w*|re-?check\w*|cross[- ]?check\w*|sanity[- ]check|verif(?:y|ied|ying|ication))\b",
    ),
    "backtrack_strong": (
        r"\b(?:i|we)\s+(?:made|have made|must have made)\s+(?:a|an)\s+(?:mistake|error|miscalculation)\b",
        r"\b(?:that|this|it)(?: case| approach| answer| result| value)?(?:'s| is| was)\s+"
        r"(?:not\s+(?:right|correct|possible)|wrong|incorrect|impossible)\b",
        r"\blet(?:'s| me| us)\s+(?:try|start|do (?:it|this|that))\s+(?:again|over|differently)\b",
        r"\b(?:go(?:ing)?|step(?:ping)?)\s+back\b",
        r"\bstart(?:ing)?\s+over\b",
        r"\bscratch that\b",
        r"\bon second thought\b",
        r"\bi was wrong\b",
        r"\bi (?:forgot|missed|misread|miscounted|misunderstood|overlooked|neglected)\b",
        r"\b(?:my|our|the|that|this) (?:earlier |previous |first |initial )?(?:answer|result|calculation|"
        r"approach|assumption|reasoning|step)\b[^.\n]{0,30}\b(?:was|is) (?:wrong|incorrect|not (?:right|correct))\b",
        r"\bcontradiction\b|\bcontradicts\b",
        r"\b(?:can't|cannot|can not|couldn't) be (?:right|correct)\b",
        r"\bsomething (?:is|went|was|must be) (?:wrong|off)\b",
        r"\b(?:that|this|it)(?:'s| is) (?:way )?too (?:large|big|small|high|low|much|many)\b",
        r"\b(?:need to|let me|let's|i'll|must) (?:correct|fix)\b",
        r"^\W*correction\b",
    ),
    "backtrack_voiced": (
        r"\b(?:re-?calculat|re-?comput|re-?evaluat|re-?examin|re-?consider|re-?think|re-?do|re-?assess|re-?count)\w*",
    ),
    "onset": (
        r"^\s*(?:but\s+)?(?:wait|hmm+|hold on(?!\s+to\b)|oops|whoa|actually|no|oh no|oh wait|uh-oh)\b",
    ),
    "neg": (
        r"\b(?:not|wrong|incorrect|mistake|error|doesn't|does not|can't|cannot|isn't|impossible|"
        r"contradict\w*)\b",
    ),
    # doubt is not an error signal
    "neg_not": (r"\bnot (?:entirely |quite |completely |totally |100% )?(?:sure|certain)\b",),
    # a bare "Wait," followed by a check verb or a question is a verification
    "check_cue": (r"\b(?:check|verify|confirm|make sure|double[- ]?check|re-?check)\b", r"\?"),
    "subgoal": (
        r"^\s*(?:(?:so,? )?first(?:ly)?,? (?:(?:we|i) (?:need|will|'ll|have to|must|should|want)|"
        r"let(?:'s| me| us))|to (?:start|begin)|let(?:'s| me| us) (?:start|begin) (?:by|with)|"
        r"(?:we|i) (?:first )?need to|our (?:first )?(?:goal|task) is|the (?:first|next|final|last) step is|"
        r"next,? (?:we|i|let(?:'s| me)) (?:need|will|'ll|have to|must|should)|"
        r"then,? (?:we|i) (?:need|will|can)|finally,? (?:we|i) (?:need|will|can))\b",
        r"\b(?:break (?:this|it|the problem) (?:down|into)|in (?:two|three|several|\d+) (?:steps|parts|stages)|"
        r"follow these steps|step[- ]by[- ]step|step \d+\s*[:.)])",
        r"\bto (?:find|determine|compute|calculate|solve for|get|figure out|work out)\b[^.\n]{3,80},\s*"
        r"(?:we|i|let(?:'s| me| us))\b",
        r"\b(?:we|i)\s+(?:first\s+|then\s+|now\s+|still\s+)?(?:need|have|want)\s+to\b(?!\s+(?:double|re-?check|"
        r"check|verify|confirm|make sure|correct|fix|be careful))",
        r"\b(?:we|i)(?:'ll| will)\s+(?:first\s+|then\s+|now\s+|next\s+)?(?:find|calculate|compute|determine|"
        r"figure out|work out|start|begin)\b",
        r"\blet(?:'s| me| us)\s+(?:first\s+|now\s+|then\s+|next\s+)?(?:find|calculate|compute|determine|"
        r"figure out|work out|set up|break)\b(?!\s+(?:this|it|that)\b)",
        r"\b(?:go|walk) through (?:each|the|every) steps?\b",
        r"\bthe (?:plan|goal|next thing|first thing|idea) (?:is|to)\b",
        r"\b(?:i|we)(?:'ll| will)? start (?:with|by)\b",
        r"\b(?:we|i)\s+(?:can|could|will|'ll|should)\b[^.\n]{0,60}\bto (?:find|determine|calculate|compute|"
        r"figure out|work out)\b",
    ),
    # a plan item or imperative step naming a quantity to obtain is a subgoal even when it is carried out
    "plan_goal": (
        r"^\s*(?:(?:\d+[.)]|[-*•])\s*)?(?:\*\*)?(?:first,?\s+|then,?\s+|next,?\s+)?(?:calculate|compute|"
        r"determine|find|identify|figure out|work out)\b",
    ),
    # an enumerated operation is a plan step only when not carried out (no "=")
    "plan_step": (
        r"^\s*(?:\d+[.)]|[-*•])\s*(?:\*\*)?(?:subtract|add|multiply|divide|convert|set up|write|express|sum|"
        r"count|solve)\b",
    ),
    "backward": (
        r"\bwork(?:ing|s)?\s+backwards?\b",
        r"\bbackwards?\s+from\b",
        r"\breason(?:ing)?\s+backwards?\b",
        r"\bstart(?:ing)?\s+(?:from|with)\s+the\s+(?:end|goal|target|desired|final|answer|result|conclusion)\b",
        r"\b(?:to|in order to)\s+(?:get|reach|obtain|make|end up with|arrive at|have)\b[^.\n]{0,50}\b"
        r"(?:we|i|he|she|they|you)\s+(?:need|needs|would need|must|has to|have to|should)\b",
        r"\bwhat\s+(?:do|would|must)\s+(?:we|i)\s+need\b",
        r"\bwhat\s+must\s+be\s+true\b",
        r"\b(?:reverse|undo|undoing|invert|inverting|reversing)\s+(?:the|these|each|all|this)\s+"
        r"(?:(?:last|two|three|previous|final)\s+)*(?:steps?|operations?)\b",
        r"\b(?:ended|ends|end up|ended up|was left|is left|left with|in the end)\b[^.\n]*\b(?:before|started|"
        r"originally|initially|at first|must have)\b",
        r"\bfor (?:the|this|that|it|our|each|both|all|[a-z])\b[^.\n,]{0,40}\bto (?:be|equal|reach|make|give|"
        r"work)\b[^.\n]{0,60}\b(?:must|needs? to|has to|have to|should)\b",
        r"\bfrom the (?:answer|end|goal|target|result|final \w+)\b[^.\n]{0,20}\bback\b",
        r"\bsteps? (?:is|are) reversed\b",
    ),
    # SEAL's check cues (typo-free), pauses and doubts
    "reflection": (
        r"^\s*wait\b",
        r"\b(?:hold on(?!\s+to\b)|think again|'s correct|'s incorrect|let me check|seems right)",
        r"\blet me (?:think(?! differently)|pause|reflect|re-?read)\b",
        r"\b(?:not (?:entirely |quite |completely )?sure|not certain|unsure|i wonder|i'm confused|"
        r"overcomplicat\w*|am i missing)\b",
    ),
    "reflection_voiced": (r"\b(?:verify|make sure)\b",),
    "transition": (
        r"\b(?:think differently|another (?:way|approach|method|solution|strategy|technique))\b",
        r"\bdifferent (?:way|approach|method|strategy|angle|technique)\b",
        r"\b(?:maybe|perhaps)\b[^.\n]{0,20}\b(?:easier|simpler|better|faster)\b",
        r"\bswitch(?:ing)? to\b",
        r"\b(?:smarter|easier|simpler|better|quicker|faster|more direct|more efficient) "
        r"(?:way|approach|method|strategy)\b",
        r"^\W*rather than\b|\brather than\b[^.\n]{0,60}\b(?:we|i|let's)\b",
        r"^\W*instead\b|\b(?:let(?:'s| me| us)|we|i)\b[^.\n]*\binstead\b|\binstead of\b[^.\n]{0,60}\b"
        r"(?:let(?:'s| me| us)|we|i)\b",
    ),
    # "Alternatively," opens a switch when the writer speaks or gives an instruction
    "transition_voiced": (r"^\s*alternatively\b",),
}

# Rules that combine the patterns (also hashed: a change here is a lexicon change). Text inside quotes is
# masked first; "voiced" lists count only when `voice` matches.
RULES = (
    "verification = verify (after masking verify_not) | voice & verify_voiced | onset & !neg & check_cue; "
    "backtracking = backtrack_strong | voice & backtrack_voiced | onset & neg (neg_not masked) | "
    "onset & neg(next sentence, same paragraph) | transition & (neg | backtracking) in the previous 2 "
    "sentences; subgoal = subgoal | plan_goal | plan_step without '='; backward_chaining = backward; "
    "transition = transition | voice & transition_voiced; "
    "reflection = reflection | voice & reflection_voiced | onset | verification | backtracking"
)


def _lexicon_payload() -> dict:
    return {"version": LEXICON_VERSION, "rules": RULES, "patterns": {k: list(v) for k, v in LEXICON.items()}}


LEXICON_SHA256 = hashlib.sha256(json.dumps(_lexicon_payload(), sort_keys=True).encode()).hexdigest()


def lexicon_info() -> dict:
    """The lexicon's version and sha256, as recorded in every output of this module."""
    return {"version": LEXICON_VERSION, "sha256": LEXICON_SHA256}


_RX: dict[str, re.Pattern] = {
    name: re.compile("|".join(f"(?:{p})" for p in pats), re.IGNORECASE) for name, pats in LEXICON.items()
}


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One sentence (or fenced code block) of a generated text: ``text == source[start:end]``.

    ``paragraph`` counts blank-line separated blocks over the whole text; ``region`` is ``"think"`` or
    ``"answer"`` when the text has ``<think>…</think>``, else ``"all"``; ``kind`` is ``"sentence"`` or
    ``"code"`` (code is never tagged).
    """

    start: int
    end: int
    text: str
    index: int
    paragraph: int
    region: str
    kind: str = "sentence"


_CODE_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
# math and inline code are never split; a span never crosses a blank line (an unclosed "\(" stays local)
_NO_BLANK = r"(?:(?!\n[ \t]*\n).)*?"
_PROTECTED = re.compile(rf"\\\[{_NO_BLANK}\\\]|\$\${_NO_BLANK}\$\$|\\\({_NO_BLANK}\\\)|`[^`\n]*`", re.DOTALL)
_DISPLAY_START = re.compile(r"\\\[|\$\$")
_DISPLAY_MATH = re.compile(r"\\\[.*?\\\]|\$\$.*?\$\$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
_LIST_START = re.compile(
    r"(?:\d{1,3}[.)](?:\s|\*)|[-*•+]\s|(?:\*\*)?step\s*\d+|#{1,6}\s|\*\*\d{1,3}[.)])", re.IGNORECASE
)
_HEADING_LINE = re.compile(r"[ \t]*(?:#{1,6}\s.*|\*\*[^*\n]+\*\*:?[ \t]*)")
_SENTENCE_START = re.compile(r"[^\W_a-z]|[\"'“‘(\\*#$]")
_ABBREVIATION = re.compile(r"(?:^|[^\w.])(?:e\.g|i\.e|vs|etc|approx|cf|mr|mrs|ms|dr|prof|fig|eq)\.$", re.I)
_ENUMERATOR = re.compile(r"[ \t]*(?:[-*•>#][ \t]*)*(?:\*\*)?(?:step[ \t]*)?\(?(?:\d{1,3}|[a-z])\.", re.I)
_CLOSERS = "\"')]*”’"
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[^\W_]+")
_MIN_CHARS, _MIN_WORDS = 10, 3


def regions(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, name)`` of the parts tagged separately: think and answer of an R1-style trace, or all.

    A ``</think>`` without ``<think>`` means the think block was opened in the prompt (R1 chat templates).
    """
    opened, closed = text.find("<think>"), text.find("</think>")
    if opened < 0 and closed < 0:
        return [(0, len(text), "all")]
    if closed >= 0 and opened > closed:
        opened = -1
    out = []
    if opened > 0:
        out.append((0, opened, "answer"))
    out.append((opened + len("<think>") if opened >= 0 else 0, closed if closed >= 0 else len(text), "think"))
    if closed >= 0:
        out.append((closed + len("</think>"), len(text), "answer"))
    return out


def _protected_period(text: str, j: int, lo: int) -> bool:
    """True when the period at ``j`` ends an abbreviation or a list enumerator, not a sentence."""
    if _ABBREVIATION.search(text, max(lo, j - 8), j + 1):
        return True
    line_start = max(lo, text.rfind("\n", 0, j) + 1)
    return _ENUMERATOR.fullmatch(text, line_start, j + 1) is not None


def _is_sentence_break(text: str, s: int, e: int, lo: int) -> bool:
    """Whether the single-newline-or-less whitespace run ``text[s:e]`` separates two sentences."""
    if _DISPLAY_START.match(text, e):
        return False  # display math belongs to the sentence before it
    if "\n" in text[s:e]:
        line_start = max(lo, text.rfind("\n", 0, s) + 1)
        if _LIST_START.match(text, e) or _HEADING_LINE.fullmatch(text, line_start, s):
            return True
    j = s - 1
    while j > lo and text[j] in _CLOSERS:
        j -= 1
    if text[j] not in ".?!" or not _SENTENCE_START.match(text, e):
        return False
    return not (text[j] == "." and _protected_period(text, j, lo))


def _split_prose(text: str, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    """Pieces ``(start, end, new_paragraph)`` of ``text[lo:hi]`` (already stripped) at sentence breaks."""
    protected = [m.span() for m in _PROTECTED.finditer(text, lo, hi)]
    pieces, start, new_para = [], lo, False
    for m in _WHITESPACE.finditer(text, lo, hi):
        s, e = m.span()
        if any(ps < s and e < pe for ps, pe in protected):
            continue
        para = text.count("\n", s, e) >= 2
        if para or _is_sentence_break(text, s, e, lo):
            pieces.append((start, s, new_para))
            start, new_para = e, para
    pieces.append((start, hi, new_para))
    return pieces


def _n_words(text: str) -> int:
    return len(_WORD.findall(_LATEX_COMMAND.sub(" ", text)))


def _math_only(text: str) -> bool:
    """A piece that is just display math (it is attached to the sentence before it)."""
    return bool(_DISPLAY_START.match(text)) and not re.search(r"[A-Za-z]", _DISPLAY_MATH.sub("", text))


def _is_short(text: str) -> bool:
    return len(text) < _MIN_CHARS or _n_words(text) < _MIN_WORDS


def _merge_pieces(text: str, pieces: list[list[int]]) -> list[list[int]]:
    """Attach display math to the previous piece, then merge short fragments ("Wait.") into the next one.

    Pieces are ``[start, end, paragraph]``; a merged piece keeps the paragraph of its first part.
    """
    out: list[list[int]] = []
    for p in pieces:
        if out and _math_only(text[p[0] : p[1]]):
            out[-1][1] = p[1]
        else:
            out.append(list(p))
    merged: list[list[int]] = []
    pending: list[int] | None = None
    for p in out:
        if pending is not None:
            p = [pending[0], p[1], pending[2]]
            pending = None
        if _is_short(text[p[0] : p[1]]):
            pending = p
        else:
            merged.append(p)
    if pending is not None:
        if merged:
            merged[-1][1] = pending[1]
        else:
            merged.append(pending)
    return merged


def segment(text: str) -> list[Segment]:
    """Split generated text into sentences and fenced code blocks, with exact character offsets.

    Deterministic and rule based (ANALYSES §2.1): paragraphs at blank lines; sentences after ``.?!`` when the
    next word starts with a capital, digit, quote, ``(``, ``\\``, ``*``, ``#`` or ``$``, and at a newline that
    starts a list item or heading. Decimals ("3.5"), money ("$2.50"), enumerators ("1. Calculate"),
    abbreviations ("e.g.") and math ``\\(…\\)``/``\\[…\\]`` are never split; display math is attached to the
    sentence before it and fragments under 10 characters or 3 words are merged into the next sentence.
    Everything between segments is whitespace or a ``<think>`` tag, so offsets reproduce the text.
    """
    out: list[Segment] = []
    para = -1
    for lo, hi, region in regions(text):
        blocks: list[tuple[int, int, str]] = []
        cursor = lo
        for m in _CODE_FENCE.finditer(text, lo, hi):
            blocks += [(cursor, m.start(), "sentence"), (m.start(), m.end(), "code")]
            cursor = m.end()
        blocks.append((cursor, hi, "sentence"))
        for a, b, kind in blocks:
            a, b = _strip_span(text, a, b)
            if a >= b:
                continue
            para += 1
            if kind == "code":
                out.append(Segment(a, b, text[a:b], len(out), para, region, "code"))
                continue
            pieces = []
            for s, e, new_para in _split_prose(text, a, b):
                para += int(new_para)
                pieces.append([s, e, para])
            for s, e, p in _merge_pieces(text, pieces):
                out.append(Segment(s, e, text[s:e], len(out), p, region))
    return out


def _strip_span(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


# ---------------------------------------------------------------------------------------------------------
# Token alignment (eval records may carry per-token strings or offsets; text-only input needs none)
# ---------------------------------------------------------------------------------------------------------


def token_char_spans(token_strings: Sequence[str], text: str | None = None) -> list[tuple[int, int]]:
    """Character span of each generated token, from the per-token decoded strings laid end to end.

    With ``text``, the concatenation must equal it (else the strings do not describe this text).
    """
    spans, pos = [], 0
    for s in token_strings:
        spans.append((pos, pos + len(s)))
        pos += len(s)
    if text is not None and "".join(token_strings) != text:
        raise LRSError("token strings do not concatenate to the generated text; cannot align tokens")
    return spans


def char_span_to_tokens(start: int, end: int, token_spans: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Half-open token range ``[t0, t1)`` of the tokens overlapping characters ``[start, end)``.

    ``token_spans`` are sorted ``(char_start, char_end)`` pairs, e.g. from ``token_char_spans`` or a fast
    tokenizer's ``offset_mapping``. An empty range (t0 == t1) means no token covers the span.
    """
    return align_segments([(start, end)], token_spans)[0]


def align_segments(
    char_spans: Sequence[tuple[int, int]], token_spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``char_span_to_tokens`` for many character spans at once (the token index is built once)."""
    ends = [e for _, e in token_spans]
    starts = [s for s, _ in token_spans]
    out = []
    for start, end in char_spans:
        t0 = bisect.bisect_right(ends, start)
        out.append((t0, max(t0, bisect.bisect_left(starts, end))))
    return out


# ---------------------------------------------------------------------------------------------------------
# Tagging
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaggedSegment:
    """A segment with its tags; ``echo`` marks a sentence that restates the question (left untagged)."""

    segment: Segment
    tags: frozenset[str]
    echo: bool = False
    tokens: tuple[int, int] | None = None


def _mask(text: str, rx: re.Pattern) -> str:
    return rx.sub(lambda m: " " * len(m.group()), text)


def _has(name: str, text: str) -> bool:
    return _RX[name].search(text) is not None


def _onset(text: str) -> bool:
    return _RX["onset"].match(text) is not None


def tag_segment(text: str) -> set[str]:
    """The behaviour tags of one sentence on its own (no context rules), as a set of names from ``TAGS``."""
    text = _mask(text, _RX["quote"])
    voiced = _has("voice", text)
    onset, neg = _onset(text), _has_neg(text)
    tags: set[str] = set()
    if (
        _has("verify", _mask(text, _RX["verify_not"]))
        or (voiced and _has("verify_voiced", text))
        or (onset and not neg and _has("check_cue", text))
    ):
        tags.add("verification")
    if _has("backtrack_strong", text) or (voiced and _has("backtrack_voiced", text)) or (onset and neg):
        tags.add("backtracking")
    if _has("subgoal", text) or _has("plan_goal", text) or (_has("plan_step", text) and "=" not in text):
        tags.add("subgoal")
    if _has("backward", text):
        tags.add("backward_chaining")
    if _has("transition", text) or (voiced and _has("transition_voiced", text)):
        tags.add("transition")
    if tags & {"verification", "backtracking"} or onset or _has("reflection", text):
        tags.add("reflection")
    elif voiced and _has("reflection_voiced", text):
        tags.add("reflection")
    return tags


def _has_neg(text: str) -> bool:
    """An error word ("not", "wrong", …), ignoring doubt ("not sure")."""
    return _has("neg", _mask(text, _RX["neg_not"]))


def _word_ngrams(text: str, n: int = 4) -> list[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def is_echo(sentence: str, question: str, threshold: float = 0.8) -> bool:
    """Whether a sentence mostly restates the question: ≥ 80 % of its word 4-grams occur in it.

    Sentences with fewer than three 4-grams are never echoes (too short to judge).
    """
    return _echo(sentence, set(_word_ngrams(question)), threshold)


def _echo(sentence: str, known: set[tuple[str, ...]], threshold: float = 0.8) -> bool:
    grams = _word_ngrams(sentence)
    return len(grams) >= 3 and sum(g in known for g in grams) / len(grams) >= threshold


def tag_text(
    text: str,
    question: str | None = None,
    token_spans: Sequence[tuple[int, int]] | None = None,
) -> list[TaggedSegment]:
    """Segment ``text`` and tag every sentence, applying the context rules of ANALYSES §2.3.

    Context rules: an onset ("Wait,", "Hmm,") followed by an error word in the next sentence of the same
    paragraph is backtracking; a transition with an error signal in the two sentences before it is
    backtracking too. With ``question``, sentences restating it are marked ``echo`` and left untagged; with
    ``token_spans`` (see ``token_char_spans``) each segment also gets its token range.
    """
    segs = segment(text)
    base = [set() if s.kind == "code" else tag_segment(s.text) for s in segs]
    tags = [set(t) for t in base]
    for i, s in enumerate(segs):
        if s.kind == "code":
            continue
        nxt = segs[i + 1] if i + 1 < len(segs) else None
        if (
            _onset(s.text)
            and nxt is not None
            and nxt.kind == "sentence"
            and nxt.paragraph == s.paragraph
            and _has_neg(nxt.text)
        ):
            tags[i] |= {"backtracking", "reflection"}
        if "transition" in base[i]:
            prev = range(max(0, i - 2), i)
            if any("backtracking" in base[k] or _has_neg(segs[k].text) for k in prev):
                tags[i] |= {"backtracking", "reflection"}
    known = set(_word_ngrams(question)) if question else set()
    spans: list = [None] * len(segs)
    if token_spans is not None:
        spans = align_segments([(s.start, s.end) for s in segs], token_spans)
    out = []
    for s, t, span in zip(segs, tags, spans, strict=True):
        echo = bool(known) and s.kind == "sentence" and _echo(s.text, known)
        out.append(TaggedSegment(s, frozenset() if echo else frozenset(t), echo, span))
    return out


def seal_label(paragraph: str, mode: str = "seal_fixed") -> str:
    """SEAL's paragraph label: ``"reflection"``, ``"transition"`` or ``"execution"`` (ANALYSES §1.2).

    ``"seal_upstream"`` uses the upstream keyword lists verbatim (including the ``think differenly`` typo);
    ``"seal_fixed"`` fixes the typo. Reflection is checked first, as upstream does.
    """
    if mode not in ("seal_fixed", "seal_upstream"):
        raise LRSError(f"unknown SEAL mode {mode!r}; use seal_fixed or seal_upstream")
    low = paragraph.strip().lower()
    check = ("verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect", "let me check")
    switch = ("think differently" if mode == "seal_fixed" else "think differenly",) + tuple(
        f"another {w}" for w in ("way", "approach", "method", "solution", "strategy", "technique")
    )
    if low.startswith("wait") or any(w in low for w in (*check, "seems right")):
        return "reflection"
    if low.startswith("alternatively") or any(w in low for w in switch):
        return "transition"
    return "execution"


# ---------------------------------------------------------------------------------------------------------
# Traces and rates
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TraceTags:
    """The tagged segments of one generated trace (one eval record)."""

    id: str
    method: str
    segments: list[TaggedSegment]
    n_tokens: int | None = None
    correct: bool | None = None

    def taggable(self) -> list[TaggedSegment]:
        """Sentences that count in rates: prose that does not restate the question."""
        return [t for t in self.segments if t.segment.kind == "sentence" and not t.echo]

    def counts(self) -> dict[str, int]:
        """Number of taggable sentences carrying each tag."""
        segs = self.taggable()
        return {tag: sum(tag in t.tags for t in segs) for tag in TAGS}

    def instances(self) -> dict[str, int]:
        """Instances per tag: a run of consecutive tagged sentences in one paragraph counts once (as in 4H)."""
        out = dict.fromkeys(TAGS, 0)
        for tag in TAGS:
            prev: TaggedSegment | None = None
            for t in self.segments:
                on = tag in t.tags
                prev_on = (
                    prev is not None and tag in prev.tags and prev.segment.paragraph == t.segment.paragraph
                )
                out[tag] += int(on and not prev_on)
                prev = t
        return out


def tag_record(record: Mapping, method: str, where: str = "record") -> TraceTags:
    """Tag one ``lrs eval`` record (generated text in ``output``; question taken from ``prompt``)."""
    text = record.get("output", record.get("text"))
    if not isinstance(text, str):
        raise LRSError(f"{where}: record has no generated text (expected a string field 'output')")
    prompt = record.get("prompt")
    question = question_from_prompt(prompt) if isinstance(prompt, str) else None
    spans = _record_token_spans(record, text, where)
    n_tok = record.get("tokens") if isinstance(record.get("tokens"), int) else None
    correct = record.get("correct") if isinstance(record.get("correct"), bool) else None
    rid = str(record.get("id", where))
    return TraceTags(rid, method, tag_text(text, question, spans), n_tok, correct)


def _record_token_spans(record: Mapping, text: str, where: str) -> list[tuple[int, int]] | None:
    """Token spans from an optional ``token_offsets`` ([[start, end], …]) or ``token_strs`` field."""
    if isinstance(record.get("token_offsets"), list):
        try:
            return [(int(a), int(b)) for a, b in record["token_offsets"]]
        except (TypeError, ValueError):
            raise LRSError(f"{where}: token_offsets must be a list of [start, end] pairs") from None
    if isinstance(record.get("token_strs"), list):
        try:
            return token_char_spans(record["token_strs"], text)
        except LRSError as e:
            raise LRSError(f"{where}: {e}") from None
    return None


_USER_TURN = re.compile(
    r"(?:<\|im_start\|>user\n|<\|start_header_id\|>user<\|end_header_id\|>\s*)(.*?)(?:<\|im_end\|>|<\|eot_id\|>)",
    re.DOTALL,
)


def question_from_prompt(prompt: str) -> str:
    """The last user turn of a chat-formatted prompt (the question), or the whole prompt if not chat."""
    turns = _USER_TURN.findall(prompt)
    return turns[-1] if turns else prompt


def _ci(k: int, n: int) -> list[float] | None:
    from lrs.stats import proportion_ci

    return list(proportion_ci(k, n, method="wilson")) if n > 0 else None


def behaviour_rates(traces: Sequence[TraceTags], include_segments: bool = False) -> dict:
    """Per-method and per-problem behaviour rates with Wilson 95 % CIs.

    Per method and tag: the fraction of taggable sentences with the tag (pooled over traces; the CI treats
    sentences as independent, so it is too narrow when tags cluster within traces), the mean of the
    per-problem fractions (each problem weighs the same, however long its trace), the fraction of traces
    with ≥ 1 tagged sentence (CI over traces), and instances per 1k generated tokens when token counts
    exist. Per problem: sentence counts, fractions and instances per tag (and, with ``include_segments``,
    every segment's offsets, tokens and tags).
    """
    methods = {}
    for method in dict.fromkeys(t.method for t in traces):
        methods[method] = _method_rates([t for t in traces if t.method == method])
    problems = [_problem_row(t, include_segments) for t in traces]
    return {"lexicon": lexicon_info(), "ci_method": "wilson", "methods": methods, "problems": problems}


def _method_rates(rows: Sequence[TraceTags]) -> dict:
    n_sents = [len(t.taggable()) for t in rows]
    counts = [t.counts() for t in rows]
    instances = [t.instances() for t in rows]
    n_seg = sum(n_sents)
    tokens = sum(t.n_tokens for t in rows if t.n_tokens is not None)
    per_tag = {}
    for tag in TAGS:
        k_seg = sum(c[tag] for c in counts)
        k_tr = sum(c[tag] > 0 for c in counts)
        fractions = [c[tag] / n for c, n in zip(counts, n_sents, strict=True) if n]
        inst = sum(i[tag] for i in instances)
        per_tag[tag] = dict(
            sentences=k_seg,
            sentence_rate=k_seg / n_seg if n_seg else None,
            sentence_ci95=_ci(k_seg, n_seg),
            mean_problem_rate=sum(fractions) / len(fractions) if fractions else None,
            traces=k_tr,
            trace_rate=k_tr / len(rows),
            trace_ci95=_ci(k_tr, len(rows)),
            instances=inst,
            instances_per_1k_tokens=1000 * inst / tokens if tokens else None,
        )
    return dict(n_traces=len(rows), n_sentences=n_seg, n_tokens=tokens, tags=per_tag)


def _problem_row(t: TraceTags, include_segments: bool = False) -> dict:
    n = len(t.taggable())
    counts = t.counts()
    row = dict(
        id=t.id,
        method=t.method,
        correct=t.correct,
        n_tokens=t.n_tokens,
        n_sentences=n,
        n_echo=sum(s.echo for s in t.segments),
        counts=counts,
        rates={tag: (c / n if n else None) for tag, c in counts.items()},
        instances=t.instances(),
    )
    if include_segments:
        row["segments"] = [
            dict(
                start=s.segment.start,
                end=s.segment.end,
                paragraph=s.segment.paragraph,
                region=s.segment.region,
                kind=s.segment.kind,
                echo=s.echo,
                tokens=list(s.tokens) if s.tokens is not None else None,
                tags=sorted(s.tags),
            )
            for s in t.segments
        ]
    return row


def format_rates(rates: Mapping) -> str:
    """A plain-text table of ``behaviour_rates`` output: one block per method, one row per tag."""
    lex = rates["lexicon"]
    lines = [f"behaviour tags (lexicon v{lex['version']}, sha256 {lex['sha256'][:16]}…; Wilson 95% CIs)"]
    for method, m in rates["methods"].items():
        lines.append(f"\n{method}: {m['n_traces']} traces, {m['n_sentences']} sentences")
        lines.append(
            f"  {'tag':<18} {'sentences with tag':<29} {'per-problem mean':<17} {'traces with ≥1':<28}"
        )
        for tag, r in m["tags"].items():
            sent = _fmt_prop(r["sentences"], m["n_sentences"], r["sentence_ci95"])
            mean = "n/a" if r["mean_problem_rate"] is None else f"{100 * r['mean_problem_rate']:.1f}%"
            tr = _fmt_prop(r["traces"], m["n_traces"], r["trace_ci95"])
            lines.append(f"  {tag:<18} {sent:<29} {mean:<17} {tr}")
    return "\n".join(lines)


def _fmt_prop(k: int, n: int, ci: Sequence[float] | None) -> str:
    if not n or ci is None:
        return f"{k}/{n}"
    return f"{k}/{n} {100 * k / n:5.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


# ---------------------------------------------------------------------------------------------------------
# Reading eval files
# ---------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line; a one-line LRSError on anything else."""
    path = Path(path)
    if not path.exists():
        raise LRSError(f"{path}: no such file")
    if path.is_dir():
        raise LRSError(f"{path} is a directory; give the .jsonl file that lrs eval wrote")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LRSError(f"{path}: not a JSONL file (not UTF-8 text)") from None
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LRSError(f"{path}:{no}: not a JSONL file (line is not valid JSON)") from None
        if not isinstance(obj, dict):
            raise LRSError(f"{path}:{no}: not a JSONL file of records (line is not a JSON object)")
        out.append(obj)
    if not out:
        raise LRSError(f"{path}: no records (empty file)")
    return out


def method_names(paths: Sequence[str | Path]) -> list[str]:
    """One label per eval file: the file stem (``lrs eval`` names it after the method), made unique."""
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{p.parent.name}/{s}" for p, s in zip(paths, stems, strict=True)]


def load_eval_files(paths: Sequence[str | Path]) -> list[TraceTags]:
    """Read and tag every record of the given ``lrs eval`` JSONL files."""
    traces = []
    for path, method in zip(paths, method_names(paths), strict=True):
        for no, rec in enumerate(read_jsonl(path), 1):
            traces.append(tag_record(rec, method, where=f"{path}: record {no}"))
    return traces


# ---------------------------------------------------------------------------------------------------------
# Validation against the hand-labelled set
# ---------------------------------------------------------------------------------------------------------

DEFAULT_LABELLED = Path(__file__).resolve().parents[3] / "tests" / "data" / "behaviours" / "labelled.jsonl"


@dataclass(frozen=True)
class LabelledSentence:
    """One hand-labelled sentence of the validation set."""

    id: str
    text: str
    tags: frozenset[str]
    source: str
    split: str


def load_labelled(path: str | Path | None = None) -> list[LabelledSentence]:
    """Read the labelled set (default: ``tests/data/behaviours/labelled.jsonl`` of a source checkout)."""
    path = Path(path) if path is not None else DEFAULT_LABELLED
    if not path.exists():
        raise LRSError(f"labelled set {path} not found; give --labelled PATH")
    out = []
    for no, r in enumerate(read_jsonl(path), 1):
        try:
            unknown = set(r["tags"]) - set(TAGS)
            if unknown:
                raise LRSError(f"{path}:{no}: unknown tags {sorted(unknown)}")
            out.append(
                LabelledSentence(
                    str(r.get("id", no)), r["text"], frozenset(r["tags"]), r["source"], r["split"]
                )
            )
        except (KeyError, TypeError):
            raise LRSError(f"{path}:{no}: needs text, tags, source and split") from None
    return out


@dataclass(frozen=True)
class TagScore:
    """Precision, recall and F1 of one tag; P and R with Wilson 95 % CIs, F1 with a bootstrap CI."""

    tag: str
    n_pos: int
    tp: int
    fp: int
    fn: int
    precision: float | None
    precision_ci95: tuple[float, float] | None
    recall: float | None
    recall_ci95: tuple[float, float] | None
    f1: float | None
    f1_ci95: tuple[float, float] | None


@dataclass
class ValidationReport:
    """Per-tag scores of the tagger on one split of the labelled set, plus the misclassified sentences."""

    split: str
    n: int
    lexicon: dict
    scores: dict[str, TagScore]
    errors: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def _f1_bootstrap(
    gold: Sequence[bool], pred: Sequence[bool], resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of F1 over sentences (seeded, so reports are reproducible)."""
    import numpy as np

    g, p = np.asarray(gold, bool), np.asarray(pred, bool)
    if not (g.any() or p.any()):
        return None
    idx = np.random.default_rng(seed).integers(0, len(g), size=(resamples, len(g)))
    gs, ps = g[idx], p[idx]
    tp = (gs & ps).sum(1)
    denom = 2 * tp + (ps & ~gs).sum(1) + (gs & ~ps).sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    lo, hi = np.percentile(f1, [2.5, 97.5])
    return float(lo), float(hi)


def score_tags(items: Sequence[LabelledSentence], predicted: Sequence[Iterable[str]]) -> dict[str, TagScore]:
    """Per-tag precision/recall/F1 of ``predicted`` tag sets against the gold labels of ``items``."""
    scores = {}
    for tag in TAGS:
        gold = [tag in it.tags for it in items]
        pred = [tag in set(p) for p in predicted]
        tp = sum(g and q for g, q in zip(gold, pred, strict=True))
        fp = sum(q and not g for g, q in zip(gold, pred, strict=True))
        fn = sum(g and not q for g, q in zip(gold, pred, strict=True))
        ci_p, ci_r = _ci(tp, tp + fp), _ci(tp, tp + fn)
        scores[tag] = TagScore(
            tag=tag,
            n_pos=tp + fn,
            tp=tp,
            fp=fp,
            fn=fn,
            precision=tp / (tp + fp) if tp + fp else None,
            precision_ci95=tuple(ci_p) if ci_p else None,
            recall=tp / (tp + fn) if tp + fn else None,
            recall_ci95=tuple(ci_r) if ci_r else None,
            f1=_f1(tp, fp, fn),
            f1_ci95=_f1_bootstrap(gold, pred),
        )
    return scores


def validate(path: str | Path | None = None, split: str = "test") -> ValidationReport:
    """Score ``tag_segment`` on one split (``"dev"``, ``"test"`` or ``"all"``) of the labelled set."""
    items = [it for it in load_labelled(path) if split == "all" or it.split == split]
    if not items:
        raise LRSError(f"labelled set has no sentences in split {split!r}")
    predicted = [tag_segment(it.text) for it in items]
    errors = [
        dict(id=it.id, text=it.text, gold=sorted(it.tags), predicted=sorted(p))
        for it, p in zip(items, predicted, strict=True)
        if set(p) != set(it.tags)
    ]
    return ValidationReport(split, len(items), lexicon_info(), score_tags(items, predicted), errors)


def format_validation(report: ValidationReport) -> str:
    """A plain-text P/R/F1 table of a ``ValidationReport``."""
    lex = report.lexicon
    lines = [
        f"tagger validation on the {report.split} split (n={report.n} sentences; "
        f"lexicon v{lex['version']}, sha256 {lex['sha256'][:16]}…)",
        f"  {'tag':<18} {'n+':>3}  {'precision [95% CI]':<22} {'recall [95% CI]':<22} {'F1 [95% CI]':<20}",
    ]
    for s in report.scores.values():
        lines.append(
            f"  {s.tag:<18} {s.n_pos:>3}  {_fmt_score(s.precision, s.precision_ci95):<22} "
            f"{_fmt_score(s.recall, s.recall_ci95):<22} {_fmt_score(s.f1, s.f1_ci95):<20}"
        )
    return "\n".join(lines)


def _fmt_score(x: float | None, ci: Sequence[float] | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """``lrs analyze behaviours``: tag eval JSONL files and/or validate the tagger; print and write JSON."""
    if not args.files and not args.validate:
        raise LRSError("give at least one eval JSONL file, or --validate")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise LRSError(f"--out {out} is a directory: give a file name ending in .json")
    if out is not None and out.parent.exists() and not out.parent.is_dir():
        raise LRSError(f"--out {out}: {out.parent} is a file, not a directory")
    result: dict = {"lexicon": lexicon_info()}
    if args.files:
        rates = behaviour_rates(load_eval_files(args.files), include_segments=args.segments)
        result.update(files=[str(f) for f in args.files], **rates)
        print(format_rates(rates))
    if args.validate:
        report = validate(args.labelled, split=args.split)
        result["validation"] = report.to_dict()
        print(format_validation(report))
    if out is not None:
        from lrs.artifacts import atomic_write_json

        atomic_write_json(out, result)
        print(f"written: {out}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs analyze behaviours`` to the ``lrs analyze`` sub-parsers."""
    p = sub.add_parser(
        "behaviours",
        help="tag cognitive behaviours (verification, backtracking, …) in eval outputs",
        description="Tag every sentence of the generated texts in lrs eval JSONL files with cognitive "
        "behaviours and print per-method rates with Wilson 95%% CIs; --validate scores the tagger on the "
        "hand-labelled sentence set.",
    )
    p.add_argument("files", nargs="*", metavar="EVAL_JSONL", help="JSONL files written by lrs eval")
    p.add_argument("--out", metavar="FILE.json", help="also write the rates (and validation) as JSON")
    p.add_argument("--validate", action="store_true", help="score the tagger on the labelled set")
    p.add_argument(
        "--labelled", metavar="PATH", help="labelled set (default: tests/data/behaviours/labelled.jsonl)"
    )
    p.add_argument(
        "--segments", action="store_true", help="include every segment's offsets and tags in --out"
    )
    p.add_argument("--split", default="test", choices=["dev", "test", "all"], help="labelled split to score")
    p.set_defaults(func=run)

"""The behaviour tagger: segmentation invariants, tag outcomes, lexicon hash, F1 floors, and the CLI."""

import hashlib
import json
from collections import Counter

import pytest

from lrs.analysis import behaviours as B
from lrs.cli import main
from lrs.errors import LRSError

QWEN_TRACE = r"""To determine how many groups of 5 students there are, we need to follow these steps:

1. Calculate the total number of students.
2. Subtract the students who stay at school.
3. Divide the remaining students by 5.

Let's go through each step in detail:

1. **Calculate the total number of students:**
   \[
   5 \times 19 = 95
   \]
   So, there are 95 students in total.

2. **Subtract the students who stay at school:**
   \[
   95 - 25 = 70
   \]

Let's verify this with Python code.

```python
total = 5 * 19  # verify: wait, this is not wrong
print((total - 25) // 5)
```

The output confirms that there are 14 groups.
Therefore, the final answer is \(\boxed{14}\)."""

R1_TRACE = r"""<think>
Okay, so I need to find how many apples are left. First, 3 baskets of 12 apples is 36.

Wait, that doesn't seem right. Let me recheck: 3 × 12 = 36, yes.

Hmm.

Alternatively, we could count what was removed: 10 + 4 = 14, and 36 - 14 = 22.
</think>
The answer is \boxed{22}."""

TRICKY = (
    "Each pen costs $2.50 and each pad 3.5 dollars, e.g. cheap. Mr. Lee pays i.e. 6 dollars.\n"
    "1. First, calculate the total cost: 3 × 4 = 12.\n"
    "2. Then find the change.\n"
    "### Step 3\n"
    'Wait. "Verify it?" she asked. No.\n\n\n'
    "```\nunclosed code"
)

# F1 on the test split measured for lexicon v2 (n=203 sentences), minus 0.05 and rounded down; measured:
# verification 0.863, backtracking 0.780, subgoal 0.897, backward_chaining 0.741, reflection 0.867,
# transition 0.815. Every tag has ≥ 10 positives in the test split.
F1_FLOORS = {
    "verification": 0.81,
    "backtracking": 0.73,
    "subgoal": 0.84,
    "backward_chaining": 0.69,
    "reflection": 0.81,
    "transition": 0.76,
}
LEXICON_V2_SHA256 = "b06ce73d6e728c73b80972825923924e04865c5d3fcfb41d7a97b89e3f22ab0c"


def _texts(text: str) -> list[str]:
    return [s.text for s in B.segment(text)]


# ---------------------------------------------------------------------------------------------------------
# (a) segmentation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [QWEN_TRACE, R1_TRACE, TRICKY, "  one line  ", "a\n\n\n b", "<think>x</think>"]
)
def test_offsets_reproduce_the_text(text):
    segs = B.segment(text)
    pos, rebuilt = 0, ""
    for i, s in enumerate(segs):
        assert s.index == i and s.text == text[s.start : s.end] and s.text == s.text.strip()
        gap = text[pos : s.start]
        assert gap.replace("<think>", "").replace("</think>", "").strip() == "", gap
        rebuilt += gap + s.text
        pos = s.end
    assert rebuilt + text[pos:] == text
    assert text[pos:].replace("</think>", "").strip() == ""


def test_segmentation_is_deterministic():
    assert B.segment(QWEN_TRACE) == B.segment(QWEN_TRACE)
    assert B.tag_text(R1_TRACE) == B.tag_text(R1_TRACE)


def test_empty_and_blank_text_have_no_segments():
    assert B.segment("") == [] and B.segment(" \n\n\t ") == [] and B.tag_text("") == []


def test_numbered_lists_split_per_item_and_keep_the_enumerator():
    segs = _texts("We need to:\n1. Calculate the total cost.\n2. Subtract the discount.\n3) Divide by 4.")
    assert segs == [
        "We need to:",
        "1. Calculate the total cost.",
        "2. Subtract the discount.",
        "3) Divide by 4.",
    ]


def test_decimals_money_and_abbreviations_are_not_split():
    segs = _texts(
        "It costs $2.50 for 3.5 kg, e.g. apples. Mr. Lee buys 2.5 kg, i.e. less. Then we stop here."
    )
    assert segs == [
        "It costs $2.50 for 3.5 kg, e.g. apples.",
        "Mr. Lee buys 2.5 kg, i.e. less.",
        "Then we stop here.",
    ]


def test_latex_boxed_and_display_math_stay_whole():
    text = "The total is:\n\\[\n3.5 \\times 4 = 14. \\text{So}\n\\]\n\nSo the answer is \\(\\boxed{14}\\). Done with it now."
    segs = _texts(text)
    assert segs[0].startswith("The total is:") and segs[0].endswith("\\]")
    assert segs[1] == "So the answer is \\(\\boxed{14}\\)."
    assert _texts("\\boxed{12}") == ["\\boxed{12}"]


def test_display_math_after_a_blank_line_is_attached_to_the_sentence_before():
    segs = _texts("Multiply the two numbers:\n\n\\[ 3 \\times 4 = 12 \\]\n\nSo the total is 12 apples.")
    assert len(segs) == 2 and segs[0].endswith("\\]")


def test_short_fragments_merge_into_the_next_sentence():
    assert _texts("Wait. That is not right at all.") == ["Wait. That is not right at all."]
    assert _texts("The total is twelve apples. Done.") == ["The total is twelve apples. Done."]


def test_code_blocks_are_one_untagged_segment_and_think_regions_are_marked():
    tagged = B.tag_text(QWEN_TRACE)
    code = [t for t in tagged if t.segment.kind == "code"]
    assert len(code) == 1 and code[0].segment.text.startswith("```python") and code[0].tags == frozenset()
    regions = {t.segment.region for t in B.tag_text(R1_TRACE)}
    assert regions == {"think", "answer"}
    assert B.segment(TRICKY)[-1].kind == "code"  # an unclosed fence runs to the end
    assert [r[2] for r in B.regions("no tags")] == ["all"]
    assert [r[2] for r in B.regions("thinking</think>answer")] == ["think", "answer"]


def test_token_offsets_map_segments_to_token_ranges():
    text = "First, we need the cost. Let me verify it now."
    toks = ["First", ",", " we", " need", " the", " cost", ".", " Let", " me", " verify", " it", " now", "."]
    spans = B.token_char_spans(toks, text)
    segs = B.segment(text)
    assert [B.char_span_to_tokens(s.start, s.end, spans) for s in segs] == [(0, 7), (7, 13)]
    rec = {"output": text, "token_strs": toks}
    trace = B.tag_record(rec, "base")
    assert [t.tokens for t in trace.segments] == [(0, 7), (7, 13)]
    with pytest.raises(LRSError, match="do not concatenate"):
        B.token_char_spans(["x"], text)


# ---------------------------------------------------------------------------------------------------------
# (b) tag outcomes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Wait, that doesn't match. Let me recheck the subtraction.", {"verification", "backtracking"}),
        ("Let me recheck the subtraction.", {"verification", "reflection"}),
        ("Let's use Python to verify the calculation.", {"verification"}),
        ("Plugging x = 3 back in, 2(3) + 1 = 7, which is correct.", {"verification"}),
        ("I think I made a mistake in the second step.", {"backtracking", "reflection"}),
        ("Scratch that, let's start over.", {"backtracking"}),
        ("1. First, calculate the total cost: 3 × 4 = 12.", {"subgoal"}),
        ("To find the total, we need to add the two amounts.", {"subgoal"}),
        ("Let's break the problem into two parts.", {"subgoal"}),
        ("Alternatively, we could work backwards from the answer.", {"transition", "backward_chaining"}),
        ("To reach 100, we need 100 - 64 = 36 more points.", {"backward_chaining"}),
        ("Another approach is to set up two equations.", {"transition"}),
        ("Hmm, let me think about this again.", {"reflection"}),
    ],
)
def test_clear_positives(text, expected):
    assert expected <= B.tag_segment(text)


@pytest.mark.parametrize(
    "text, absent",
    [
        ("Emma had to wait 15 minutes for the bus.", set(B.TAGS)),
        ("The customer wrote a check for $50 to pay for the groceries.", set(B.TAGS)),
        ("Tom's paycheck is $800 every two weeks.", set(B.TAGS)),
        ('The question says: "Verify that the angles add up to 180 degrees."', set(B.TAGS)),
        ("The store manager double-checks the cash register every night.", set(B.TAGS)),
        ("She walked backward for 10 steps and then forward for 25 steps.", set(B.TAGS)),
        ("In the first box there are 12 red balls.", set(B.TAGS)),
        ("First, 3 baskets of 12 apples is 36.", set(B.TAGS)),
        ("Next, we subtract the cookies she gave away: 36 - 10 = 26.", set(B.TAGS)),
        ("Hold on to the receipt in case you need a refund.", set(B.TAGS)),
        ("Hmm, I'm not entirely sure about this step.", {"backtracking", "verification"}),
        ("2. **Total number of students:** \\[ 5 \\times 19 = 95 \\]", set(B.TAGS)),
        ("So the answer is \\boxed{12}.", set(B.TAGS)),
    ],
)
def test_hard_negatives(text, absent):
    assert not (B.tag_segment(text) & absent)


def test_every_verification_or_backtracking_is_a_reflection():
    for text in ["Let me double-check that.", "That's wrong.", "Let me recalculate the sum."]:
        tags = B.tag_segment(text)
        assert tags & {"verification", "backtracking"} and "reflection" in tags


def test_context_rules_of_tag_text():
    # an onset followed by an error word in the next sentence of the paragraph is backtracking
    tagged = B.tag_text("Wait, let me look at this. The sum is not 40 but 38.")
    assert "backtracking" in tagged[0].tags
    assert "backtracking" not in B.tag_segment("Wait, let me look at this.")
    # a transition right after an error is backtracking too
    tagged = B.tag_text("The total of 45 is wrong here. Let me try another approach to the sum.")
    assert {"transition", "backtracking"} <= tagged[1].tags


def test_sentences_restating_the_question_are_echoes_and_untagged():
    q = "Sarah will verify how many cookies she baked in 3 batches of 12 cookies each."
    tagged = B.tag_text(
        "Sarah will verify how many cookies she baked in 3 batches of 12 cookies. She has 36.", q
    )
    assert tagged[0].echo and tagged[0].tags == frozenset() and not tagged[1].echo
    assert B.question_from_prompt("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n") == (
        "What is 2+2?"
    )


def test_seal_labels_keep_the_upstream_typo_only_in_upstream_mode():
    assert B.seal_label("Wait, let me see.") == "reflection"
    assert B.seal_label("Let's think differently now.") == "transition"
    assert B.seal_label("Let's think differently now.", mode="seal_upstream") == "execution"
    assert B.seal_label("So 3 + 4 = 7.") == "execution"


def test_instances_count_runs_within_a_paragraph_once():
    trace = B.TraceTags(
        "x", "m", B.tag_text("Let me verify it. Let me double-check it too.\n\nLet me verify once more.")
    )
    assert trace.counts()["verification"] == 3 and trace.instances()["verification"] == 2


# ---------------------------------------------------------------------------------------------------------
# (c) lexicon hash
# ---------------------------------------------------------------------------------------------------------


def test_lexicon_hash_is_stable_and_pinned():
    payload = json.dumps(B._lexicon_payload(), sort_keys=True).encode()
    assert hashlib.sha256(payload).hexdigest() == B.LEXICON_SHA256
    # A change to any pattern or rule changes this hash: bump LEXICON_VERSION, re-tune on dev only,
    # re-measure on test, and update F1_FLOORS, this constant and docs/analysis.md together.
    assert (B.LEXICON_VERSION, B.LEXICON_SHA256) == ("2", LEXICON_V2_SHA256)
    assert B.lexicon_info() == {"version": "2", "sha256": LEXICON_V2_SHA256}


# ---------------------------------------------------------------------------------------------------------
# (d) validation set and F1 floors
# ---------------------------------------------------------------------------------------------------------


def test_labelled_set_is_well_formed():
    items = B.load_labelled()
    assert len(items) >= 300
    assert len({it.id for it in items}) == len(items) and len({it.text for it in items}) == len(items)
    splits = Counter(it.split for it in items)
    assert set(splits) == {"dev", "test"} and abs(splits["dev"] - splits["test"]) <= 0.1 * len(items)
    assert {it.source for it in items} == {"ours", "reasoning-style", "hard-negative"}
    assert all(it.tags <= set(B.TAGS) for it in items)


def test_f1_on_the_test_split_stays_above_the_floor():
    report = B.validate(split="test")
    assert report.lexicon["sha256"] == B.LEXICON_SHA256
    for tag, floor in F1_FLOORS.items():
        score = report.scores[tag]
        assert score.n_pos >= 10
        assert score.f1 is not None and score.f1 >= floor, f"{tag}: F1 {score.f1:.3f} < floor {floor}"
        lo, hi = score.precision_ci95
        assert lo <= score.precision <= hi


# ---------------------------------------------------------------------------------------------------------
# (e) CLI
# ---------------------------------------------------------------------------------------------------------


def _write_eval(path, outputs):
    recs = [
        dict(
            id=f"t/{i}", prompt="q", output=o, pred=None, gold="1", correct=False, tokens=50, truncated=False
        )
        for i, o in enumerate(outputs)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_cli_prints_rates_and_writes_json(tmp_path, capsys):
    base = _write_eval(tmp_path / "base.jsonl", [QWEN_TRACE, "So the answer is 3. That is all we need."])
    lrs = _write_eval(tmp_path / "lrs.jsonl", [R1_TRACE, "Wait, that is wrong. Let me recalculate the sum."])
    out = tmp_path / "behaviours.json"
    assert main(["analyze", "behaviours", str(base), str(lrs), "--out", str(out), "--segments"]) == 0
    printed = capsys.readouterr().out
    assert "base: 2 traces" in printed and "lrs: 2 traces" in printed and B.LEXICON_SHA256[:16] in printed
    assert "backtracking" in printed and "[" in printed
    data = json.loads(out.read_text())
    assert data["lexicon"] == {"version": B.LEXICON_VERSION, "sha256": B.LEXICON_SHA256}
    assert set(data["methods"]) == {"base", "lrs"}
    lrs_bt = data["methods"]["lrs"]["tags"]["backtracking"]
    assert lrs_bt["traces"] == 2 and lrs_bt["trace_rate"] == 1.0 and len(lrs_bt["trace_ci95"]) == 2
    assert len(data["problems"]) == 4 and "segments" in data["problems"][0]


def test_cli_validate_prints_the_table(capsys):
    assert main(["analyze", "behaviours", "--validate", "--split", "dev"]) == 0
    printed = capsys.readouterr().out
    assert "dev split" in printed and all(tag in printed for tag in B.TAGS)


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_missing_file_is_one_line_exit_2(tmp_path, capsys):
    assert main(["analyze", "behaviours", str(tmp_path / "nope.jsonl")]) == 2
    line = _error_line(capsys)
    assert line.startswith("lrs: error:") and "no such file" in line


@pytest.mark.parametrize(
    "content, message",
    [
        ("this is not json\n", "not a JSONL file"),
        ("[1, 2]\n", "not a JSON object"),
        ('{"id": "x", "pred": 1}\n', "no generated text"),
        ("", "no records"),
    ],
)
def test_cli_bad_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main(["analyze", "behaviours", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("lrs: error:") and message in line


def test_cli_needs_a_file_or_validate(capsys):
    assert main(["analyze", "behaviours"]) == 2
    assert "--validate" in _error_line(capsys)


def test_cli_out_must_be_a_file(tmp_path, capsys):
    base = _write_eval(tmp_path / "base.jsonl", ["So the answer is 3. That is all we need."])
    assert main(["analyze", "behaviours", str(base), "--out", str(tmp_path)]) == 2
    assert "is a directory" in _error_line(capsys)

"""Answer extraction and grading on literal strings (no model): math-verify gold-first, numeric fallback,
and a checker that hangs must time out without hanging the caller."""

import time

import pytest

from lrs.errors import LRSError
from lrs.grading import Grade, extract_answer, grade, grade_one, last_boxed, to_number

HANG = r"so the answer is \boxed{9^{9^{9^{9}}}}"  # math-verify never finishes comparing this to 5


def test_extract_last_boxed_with_nested_braces():
    text = r"First \boxed{1}. Then \boxed{\frac{3}{\sqrt{2}}} is the result."
    assert extract_answer(text) == r"\frac{3}{\sqrt{2}}"
    assert extract_answer(r"the value is \fbox{7}") == "7"
    # an unfinished box at the end is ignored in favour of the last complete one
    assert last_boxed(r"\boxed{12} and then \boxed{1") == "12"


def test_extract_answer_phrases_and_gsm8k_lines():
    assert extract_answer("So 6 * 7 = 42.\nThe answer is 42.") == "42"
    assert extract_answer("Thus the final answer is: $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("She makes 9 * 2 = 18.\n#### 18") == "18"
    assert extract_answer(r"The answer is 3. Check: \boxed{4}") == "4"  # boxed wins


def test_truncated_trace_has_no_answer_unless_last_number_asked():
    text = "First she buys 3 packs of 12, which is 36. Then she gives away"
    assert extract_answer(text) is None
    assert extract_answer(text, last_number=True) == "36"
    assert extract_answer("") is None


def test_to_number_strips_gsm8k_decorations():
    assert to_number("1,000") == 1000.0
    assert to_number(r"\$18") == 18.0
    assert to_number(r"18 \text{ dollars}") == 18.0
    assert to_number("25%") == 25.0
    assert to_number("1{,}234.5") == 1234.5
    assert to_number(r"\frac{1}{2}") is None
    assert to_number("1,2,3") is None


@pytest.mark.parametrize(
    "output, gold",
    [
        (r"\boxed{\frac{1}{2}}", "0.5"),  # fraction vs decimal
        ("Adding up, the answer is 42.", "42"),
        (r"\boxed{42}", "42"),
        (r"\boxed{18 \text{ dollars}}", "18"),  # units
        (r"\boxed{\$18}", "18"),
        (r"\boxed{1,000}", "1000"),  # thousands separator
        (r"\boxed{25}", "025"),  # zero-padded AIME gold
        ("#### 1,200", "1200"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    ],
)
def test_equivalent_answers_are_correct(output, gold):
    g = grade_one(output, gold)
    assert g.correct, g
    assert not g.timed_out


@pytest.mark.parametrize(
    "output, gold",
    [
        (r"\boxed{43}", "42"),
        (r"\boxed{0.33}", r"\frac{1}{3}"),
        ("The answer is 1,001.", "1000"),
        (r"\boxed{24}", "025"),
    ],
)
def test_wrong_answers_are_wrong(output, gold):
    g = grade_one(output, gold)
    assert g.correct is False
    assert g.pred is not None


def test_numeric_fallback_decides_when_math_verify_cannot():
    g = grade_one(r"\boxed{18 dollars}", "18")
    assert g == Grade(pred="18 dollars", correct=True, method="numeric", timed_out=False)


def test_truncated_trace_counts_wrong():
    g = grade_one("Let me compute 12 * 7 = 84, and then subtract", "84")
    assert g == Grade(pred=None, correct=False, method="none", timed_out=False)


def test_batch_of_20_returns_in_order():
    outputs = [rf"\boxed{{{i}}}" for i in range(20)]
    golds = [str(i if i % 3 else i + 1) for i in range(20)]  # every third one is wrong
    grades = grade(outputs, golds)
    assert [g.pred for g in grades] == [str(i) for i in range(20)]
    assert [g.correct for g in grades] == [i % 3 != 0 for i in range(20)]


def test_hanging_check_times_out_and_next_call_still_works():
    t = time.monotonic()
    grades = grade([HANG, r"\boxed{7}"], ["5", "7"], timeout=1.5)
    elapsed = time.monotonic() - t
    assert grades[0] == Grade(pred="9^{9^{9^{9}}}", correct=False, method="timeout", timed_out=True)
    assert grades[1].correct  # the other job ran on the other worker meanwhile
    assert elapsed < 1.5 + 3.0
    t = time.monotonic()
    assert grade_one(r"The answer is \boxed{3/4}.", "0.75").correct
    assert time.monotonic() - t < 5.0


def test_mismatched_lengths_raise():
    with pytest.raises(LRSError, match="one gold per output"):
        grade(["a", "b"], ["1"])

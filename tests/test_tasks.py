"""Task loaders on small fixture files in every source format, fixed disjoint splits, the procedural arith
task (answers re-checked from its worked solutions) and prompt building."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
from conftest import make_tokenizer

from lrs.errors import LRSError
from lrs.tasks import (
    COT_SUFFIX,
    INSTRUCTION,
    TASKS,
    Problem,
    build_prompts,
    list_tasks,
    load_task,
    worked_solution,
)


def _write(root: Path, task: str, name: str, rows: list[dict]) -> None:
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _gsm(i: int) -> dict:
    return {
        "question": f"Q{i}: what is {i} * 1000?",
        "answer": f"{i} * 1000 = <<{i}*1000={i}000>>{i},000\n#### {i},000",
    }


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder with a few rows of every source format."""
    _write(tmp_path, "gsm8k", "test.jsonl", [_gsm(i) for i in range(10)])
    _write(tmp_path, "gsm8k", "train.jsonl", [_gsm(i) for i in range(100, 350)])
    _write(
        tmp_path,
        "amc23",
        "test.jsonl",
        [{"id": i, "problem": f"A{i}", "answer": 27.0 + i} for i in range(20)],
    )
    _write(
        tmp_path,
        "aime24",
        "test.jsonl",
        [{"problem": f"P{i}", "answer": f"{i:03d}", "solution": "s"} for i in range(10)],
    )
    _write(tmp_path, "aime25", "test.cleaned.jsonl", [{"problem": "\\frac{1}{2}", "answer": "070"}])
    _write(tmp_path, "multiarith", "test.jsonl", [{"input": "2 + 3 apples?", "target": 5}])
    sol = r"So $x = \boxed{\frac{1}{\sqrt{2}}}$ cm."
    _write(tmp_path, "minerva_math", "test.jsonl", [{"problem": "M", "solution": sol, "type": "t", "idx": 0}])
    olymp = [
        {"question": "O0", "final_answer": ["$2^{1009}$"], "solution": ["because"], "context": None},
        {"question": "O1", "final_answer": "['$\\\\frac{1}{2}$']", "solution": ["x"], "context": None},
    ]
    _write(tmp_path, "olympiadbench", "test.jsonl", olymp)
    return tmp_path


# ---------------------------------------------------------------- loaders and gold answers


def test_gold_answers_in_every_format(data):
    t = load_task("gsm8k", "test", data_dir=data)
    assert [p.id for p in t[:2]] == ["gsm8k/test/0", "gsm8k/test/1"]  # file order
    assert t[3].answer == "3000" and t[3].question.startswith("Q3")  # after ####, commas removed
    amc = {
        p.question: p.answer for s in ("train", "dev", "test") for p in load_task("amc23", s, data_dir=data)
    }
    assert amc["A0"] == "27" and amc["A5"] == "32"
    aime = {
        p.question: p.answer for s in ("train", "dev", "test") for p in load_task("aime24", s, data_dir=data)
    }
    assert aime["P7"] == "007"  # zero padding kept
    rows = {s: load_task("olympiadbench", s, data_dir=data) for s in ("train", "dev", "test")}
    olymp = {p.question: p for s in rows.values() for p in s}
    assert olymp["O0"].answer == "2^{1009}" and olymp["O1"].answer == "\\frac{1}{2}"
    assert olymp["O0"].solution == "because"
    mm = [p for s in ("train", "dev", "test") for p in load_task("minerva_math", s, data_dir=data)]
    assert mm[0].answer == r"\frac{1}{\sqrt{2}}"  # last \boxed{} with balanced braces


def test_real_shared_data_when_present():
    try:
        test = load_task("gsm8k", "test")
    except LRSError:
        pytest.skip("shared benchmark data not found")
    assert len(test) == 1319 and test[0].answer == "18" and test[0].id == "gsm8k/test/0"
    sizes = [len(load_task("math500", s)) for s in ("train", "dev", "test")]
    assert sizes == [250, 100, 150]
    aime25 = [p for s in ("train", "dev", "test") for p in load_task("aime25", s)]
    assert len(aime25) == 30 and not any("\x0c" in p.question or "\t" in p.question for p in aime25)


def test_lrs_data_env_is_used(data, monkeypatch):
    monkeypatch.setenv("LRS_DATA", str(data))
    assert len(load_task("gsm8k", "test")) == 10


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail
    with pytest.raises(LRSError, match=r"no data for task 'gsm8k': looked in .*set LRS_DATA"):
        load_task("gsm8k", data_dir=tmp_path)


def test_missing_data_falls_back_to_hub_when_datasets_exists(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "hub q", "answer": "x\n#### 1,234"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    [p] = load_task("gsm8k", "test", data_dir=tmp_path)
    assert (p.question, p.answer) == ("hub q", "1234")
    assert calls == [("openai/gsm8k", "main", "test")]


def test_bad_inputs_raise_clear_errors(data):
    (data / "amc23" / "test.jsonl").write_text("\n")
    with pytest.raises(LRSError, match="empty"):
        load_task("amc23", data_dir=data)
    with pytest.raises(LRSError, match="known tasks: .*gsm8k"):
        load_task("gsm9k")
    with pytest.raises(LRSError, match="unknown split"):
        load_task("arith", "validation")
    assert set(list_tasks()) == set(TASKS) >= {"gsm8k", "math500", "aime24", "aime25", "amc23", "arith"}


# ---------------------------------------------------------------- splits


def _splits(name, seed=0, **kw):
    return {s: load_task(name, s, seed=seed, **kw) for s in ("train", "dev", "test")}


@pytest.mark.parametrize("name", ["gsm8k", "amc23", "arith"])
def test_splits_are_fixed_and_disjoint(data, name):
    a, b = _splits(name, data_dir=data), _splits(name, data_dir=data)
    assert {s: [p.id for p in v] for s, v in a.items()} == {s: [p.id for p in v] for s, v in b.items()}
    for s, t in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not {p.id for p in a[s]} & {p.id for p in a[t]}
        assert not {p.question for p in a[s]} & {p.question for p in a[t]}
    other = _splits(name, seed=1, data_dir=data)
    assert [p.question for p in other["dev"]] != [p.question for p in a["dev"]]


def test_split_sizes(data):
    g = _splits("gsm8k", data_dir=data)
    assert [len(g[s]) for s in ("train", "dev", "test")] == [50, 200, 10]  # dev = first 200 of shuffled train
    assert [len(v) for v in _splits("amc23", data_dir=data).values()] == [10, 4, 6]  # 50/20/30 %
    assert len(load_task("gsm8k", "train", limit=7, data_dir=data)) == 7
    assert [len(v) for v in _splits("arith").values()] == [1000, 1000, 1000]


# ---------------------------------------------------------------- arith


def test_arith_answers_match_their_worked_solutions():
    probs = load_task("arith", "dev", limit=300)
    for p in probs:
        lines = p.solution.splitlines()
        for line in lines[:-1]:  # every step "a op b = c" is exact integer arithmetic
            a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", line).groups()
            assert eval(f"{a} {op} {b}") == int(c), line
        assert lines[-1] == f"The answer is \\boxed{{{p.answer}}}."
        assert p.answer.isdigit() and int(p.answer) > 0
        # each step uses the previous result
        nums = [re.search(r"(\d+) [-+*/] (\d+) = \$?(\d+)", ln).groups() for ln in lines[:-1]]
        assert all(cur[0] == prev[2] for prev, cur in zip(nums, nums[1:], strict=False))
    assert {p.meta["steps"] for p in probs} == {2, 3, 4}
    assert len({p.meta["template"] for p in probs}) >= 6
    assert any(int(p.answer) >= 100 for p in probs)


def test_arith_is_unlimited_and_prefix_stable():
    big = load_task("arith", "test", limit=1500)
    assert len(big) == 1500 and len({p.question for p in big}) == 1500
    assert [p.id for p in big[:5]] == [p.id for p in load_task("arith", "test", limit=5)]
    assert big[4].id == "arith/test/4"


# ---------------------------------------------------------------- prompts


def _p(i: int, task="arith") -> Problem:
    return Problem(
        f"{task}/train/{i}",
        task,
        f"Question number {i}?",
        str(i),
        f"Work {i}.\nThe answer is \\boxed{{{i}}}.",
    )


def test_base_and_cot_prompts_use_chat_template():
    tok = make_tokenizer()
    [base] = build_prompts(tok, [_p(1)])
    assert base == f"<|im_start|>user\nQuestion number 1?\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert "\\boxed{}" in INSTRUCTION
    [cot] = build_prompts(tok, [_p(1)], style="cot")
    assert cot == base + COT_SUFFIX
    with pytest.raises(LRSError, match="unknown prompt style"):
        build_prompts(tok, [_p(1)], style="zeroshot")


def test_fewshot_uses_pool_examples_but_never_the_problem_itself():
    tok = make_tokenizer()
    pool = [_p(i) for i in range(6)]
    prompts = build_prompts(tok, [pool[0], _p(99)], style="fewshot", shots=5, pool=pool, seed=3)
    assert prompts[0].count("<|im_start|>user") == 6 and prompts[0].count("<|im_start|>assistant") == 6
    assert "Question number 0?" in prompts[0].split("<|im_start|>user")[-1]  # asked last ...
    assert prompts[0].count("Question number 0?") == 1  # ... and never shown as an example
    assert prompts[1].count("The answer is \\boxed{") == 5 and prompts[1].endswith("<|im_start|>assistant\n")
    assert build_prompts(tok, [_p(99)], style="fewshot", shots=2, pool=pool, seed=3) == build_prompts(
        tok, [_p(99)], style="fewshot", shots=2, pool=pool, seed=3
    )
    with pytest.raises(LRSError, match="pool"):
        build_prompts(tok, [_p(1)], style="fewshot")


def test_gsm8k_worked_solution_is_cleaned(data):
    [p] = load_task("gsm8k", "train", limit=1, data_dir=data)
    text = worked_solution(p)
    assert "<<" not in text and "####" not in text
    assert text.endswith(f"The answer is \\boxed{{{p.answer}}}.")
    # a solution without a final box gets one appended
    q = Problem("x/1", "x", "q", "5", "because reasons")
    assert worked_solution(q) == "because reasons\nThe answer is \\boxed{5}."


def test_plain_text_prompts_without_chat_template():
    prompts = build_prompts(None, [_p(2)], style="fewshot", shots=1, pool=[_p(1)])
    assert prompts[0].startswith("Question: Question number 1?")
    assert prompts[0].endswith(f"Question: Question number 2?\n{INSTRUCTION}\nAnswer:")

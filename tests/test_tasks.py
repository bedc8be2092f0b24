"""Task loaders on small fixture files in every source format, fixed disjoint splits, the procedural arith
task (answers re-checked from its worked solutions), user tasks (jsonl:PATH, hf:REPO[:CONFIG]:SPLIT, split
"all", split seed vs sampling seed) and prompt building."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
from conftest import make_tokenizer

from lrs.errors import LRSError
from lrs.tasks import (
    ALL_SPLITS,
    COT_SUFFIX,
    INSTRUCTION,
    SPLITS,
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
    assert set(list_tasks()) == set(TASKS) | {"jsonl:PATH", "hf:REPO[:CONFIG]:SPLIT"}
    assert set(TASKS) >= {"gsm8k", "math500", "aime24", "aime25", "amc23", "arith"}


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


# ---------------------------------------------------------------- user tasks: jsonl:PATH and hf:


def _user_file(tmp_path: Path, rows: list, name: str = "mine.jsonl") -> str:
    """Write `rows` (dicts, or raw strings written as-is) to a JSONL file; return its `jsonl:` task name."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f"jsonl:{path}"


def test_jsonl_detects_question_and_answer_fields(tmp_path):
    rows = [
        {"question": "q0", "answer": "7"},
        {"problem": "q1", "target": 8.0},
        {"input": "q2", "final_answer": ["x^2"]},
        {"prompt": "q3", "solution": "so it is \\boxed{\\frac{1}{2}}."},
        {"question": "q4", "answer": None, "solution": "then \\boxed{9}"},  # null answer falls through
    ]
    probs = load_task(_user_file(tmp_path, rows), "all")
    assert [(p.question, p.answer) for p in probs] == [
        ("q0", "7"),
        ("q1", "8"),
        ("q2", "x^2"),
        ("q3", "\\frac{1}{2}"),
        ("q4", "9"),
    ]
    assert probs[3].solution == "so it is \\boxed{\\frac{1}{2}}." and probs[0].solution is None
    assert {p.task for p in probs} == {"mine"} and probs[1].meta["line"] == 2


def test_jsonl_field_override(tmp_path):
    rows = [{"question": "ignored", "text": "real q", "answer": "1", "gold": "2"}]
    [p] = load_task(_user_file(tmp_path, rows), "all", question_field="text", answer_field="gold")
    assert (p.question, p.answer) == ("real q", "2")
    with pytest.raises(LRSError, match=r"line 1: no answer field \(looked for nope;"):
        load_task(_user_file(tmp_path, rows), "all", answer_field="nope")
    with pytest.raises(LRSError, match="only apply to jsonl:PATH and hf: tasks"):
        load_task("arith", "dev", question_field="q")


def test_jsonl_answer_normalisation(tmp_path):
    rows = [
        {"question": "g", "answer": "3 * 4 = <<3*4=12>>12 apples\n#### 1,200"},
        {"question": "b", "answer": "first \\boxed{1} then \\boxed{\\sqrt{2}}"},
        {"question": "plain", "answer": "  42 "},
    ]
    g, b, plain = load_task(_user_file(tmp_path, rows), "all")
    assert (g.answer, b.answer, plain.answer) == ("1200", "\\sqrt{2}", "42")
    assert "<<" not in g.solution and g.solution.endswith("\\boxed{1200}.")  # usable as a few-shot example
    assert worked_solution(g) == g.solution


def test_jsonl_ids_and_duplicates(tmp_path):
    rows = [{"question": "a", "answer": "1"}, "", {"question": "b", "answer": "2", "id": "p-7"}]
    a, b = load_task(_user_file(tmp_path, rows, "my set.jsonl"), "all")
    assert (a.id, b.id) == ("my set/0", "p-7")  # stem/row index; a blank line is not a row
    dup = [{"id": "x", "question": "a", "answer": "1"}, {"id": "x", "question": "b", "answer": "2"}]
    with pytest.raises(LRSError, match=r"duplicate problem id 'x' \(lines 1 and 2\)"):
        load_task(_user_file(tmp_path, dup), "all")


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    rows = [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"q": "c", "answer": "3"}]
    name = _user_file(tmp_path, rows)
    with pytest.raises(LRSError) as e:
        load_task(name, "all")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'mine.jsonl'}, line 3: no question field")
    assert "looked for question, problem, input, prompt" in msg and "question_field=" in msg


def test_jsonl_bad_files(tmp_path):
    with pytest.raises(LRSError, match="jsonl task file not found: .*nope.jsonl") as e:
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")
    assert "\n" not in str(e.value)
    with pytest.raises(LRSError, match="is empty"):
        load_task(_user_file(tmp_path, [""]))
    with pytest.raises(LRSError, match=r"mine.jsonl:2: not valid JSON") as e:
        load_task(_user_file(tmp_path, [{"question": "a", "answer": "1"}, "{oops"]))
    assert "\n" not in str(e.value)
    with pytest.raises(LRSError, match="line 1: expected a JSON object"):
        load_task(_user_file(tmp_path, ["[1, 2]"]), "all")


def test_jsonl_all_split_is_file_order_and_splits_partition_it(tmp_path):
    name = _user_file(tmp_path, [{"question": f"q{i}", "answer": str(i)} for i in range(20)])
    every = load_task(name, "all")
    assert [p.question for p in every] == [f"q{i}" for i in range(20)]
    assert [p.question for p in load_task(name, "all", limit=3)] == ["q0", "q1", "q2"]
    parts = {s: load_task(name, s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [10, 4, 6]  # 50/20/30 %
    ids = [p.id for s in SPLITS for p in parts[s]]
    assert len(ids) == len(set(ids)) and set(ids) == {p.id for p in every}
    assert ALL_SPLITS == ("train", "dev", "test", "all")


def test_jsonl_splits_depend_only_on_the_split_seed(tmp_path):
    name = _user_file(tmp_path, [{"question": f"q{i}", "answer": str(i)} for i in range(30)])
    base = {s: [p.id for p in load_task(name, s)] for s in SPLITS}
    # a sampling seed (few-shot draws here) does not move problems between splits
    for sampling_seed in (0, 1, 7):
        build_prompts(None, load_task(name, "dev")[:1], style="fewshot", shots=2, pool=load_task(name, "train"),
                      seed=sampling_seed)  # fmt: skip
        assert {s: [p.id for p in load_task(name, s)] for s in SPLITS} == base
    assert {s: [p.id for p in load_task(name, s, split_seed=0)] for s in SPLITS} == base
    other = {s: [p.id for p in load_task(name, s, split_seed=1)] for s in SPLITS}
    assert other["test"] != base["test"] and sorted(sum(other.values(), [])) == sorted(sum(base.values(), []))
    # the file's name or place does not matter, only its rows and the split seed
    moved = _user_file(tmp_path, [{"question": f"q{i}", "answer": str(i)} for i in range(30)], "other.jsonl")
    assert [p.question for p in load_task(moved, "dev")] == [p.question for p in load_task(name, "dev")]


def test_seed_is_a_backwards_compatible_alias_of_split_seed(data):
    assert [p.id for p in load_task("amc23", "dev", seed=3, data_dir=data)] == [
        p.id for p in load_task("amc23", "dev", split_seed=3, data_dir=data)
    ]
    assert load_task("amc23", "dev", seed=3, split_seed=3, data_dir=data)
    with pytest.raises(LRSError, match="seed=1 and split_seed=2"):
        load_task("amc23", "dev", seed=1, split_seed=2, data_dir=data)


def test_all_split_of_builtin_tasks(data):
    assert [p.id for p in load_task("amc23", "all", data_dir=data)] == [
        p.id for s in SPLITS for p in load_task("amc23", s, data_dir=data)
    ]
    g = load_task("gsm8k", "all", data_dir=data)
    assert len(g) == 260 and len({p.id for p in g}) == 260 and g[-1].id == "gsm8k/test/9"
    assert len(load_task("gsm8k", "all", limit=5, data_dir=data)) == 5
    with pytest.raises(LRSError, match="split 'all' is not available for arith: the task is unlimited"):
        load_task("arith", "all")


def test_hub_task_without_datasets_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail
    with pytest.raises(LRSError, match=r"needs the optional `datasets` extra: pip install 'lrs\[hub\]'"):
        load_task("hf:openai/gsm8k:main:test", "all")


def _fake_datasets(monkeypatch, rows=None, error=None) -> list:
    calls: list = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        if error is not None:
            raise error
        return list(rows or [])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_spec_parsing_and_rows(monkeypatch):
    rows = [{"question": f"hq{i}", "answer": f"work\n#### {i}"} for i in range(10)]
    calls = _fake_datasets(monkeypatch, rows)
    probs = load_task("hf:openai/gsm8k:main:test", "all")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.id, p.question, p.answer) for p in probs[:2]] == [
        ("gsm8k/0", "hq0", "0"),
        ("gsm8k/1", "hq1", "1"),
    ]
    load_task("hf:user/ds:test", "dev")
    assert calls[-1] == ("user/ds", None, "test")
    parts = [p.id for s in SPLITS for p in load_task("hf:user/ds:validation", s)]
    assert sorted(parts) == sorted(f"ds/{i}" for i in range(10)) and calls[-1] == (
        "user/ds",
        None,
        "validation",
    )
    for bad in ("hf:user/ds", "hf:a:b:c:d", "hf:user/ds::test"):
        with pytest.raises(LRSError, match=r"bad hub task .*use hf:REPO\[:CONFIG\]:SPLIT"):
            load_task(bad)


def test_hub_missing_field_and_offline_errors(monkeypatch):
    _fake_datasets(monkeypatch, [{"question": "a", "answer": "1"}, {"text": "b", "answer": "2"}])
    with pytest.raises(LRSError, match=r"hf:user/ds:test, row 1: no question field"):
        load_task("hf:user/ds:test", "all")
    _fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'user/ds' on the Hub\nmore detail"))
    with pytest.raises(LRSError) as e:
        load_task("hf:user/ds:test")
    msg = str(e.value)
    assert "hub could not be reached" in msg and "not found" in msg and "Couldn't reach 'user/ds'" in msg
    assert "\n" not in msg and "more detail" not in msg


def test_unknown_task_mentions_user_forms():
    with pytest.raises(LRSError, match="jsonl:PATH or hf:REPO"):
        load_task("nope")


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

"""Reasoning tasks: benchmark loaders (offline JSONL copies), a seeded procedural arithmetic task, the
user's own problems (``jsonl:PATH`` or ``hf:REPO[:CONFIG]:SPLIT``), fixed train/dev/test splits, and chat
prompts (base, CoT suffix, few-shot).

Splits. gsm8k: test = test.jsonl in file order; train.jsonl shuffled once by the seed, dev = its first 200,
train = the rest. Tasks that ship only a test file, and user tasks: shuffled by the seed, then train 50 % /
dev 20 % / test 30 %. arith: each split is its own seeded stream (default 1000 problems, unlimited); a question
belongs to exactly one split by a hash of its text, so splits never overlap. The extra split ``all`` is every
problem of a task: for user tasks the rows in file order (the natural test set when the whole file is held
out), for built-in tasks train + dev + test concatenated; arith refuses it because it is unlimited.

Seeds. ``load_task(..., split_seed=...)`` (default 0) only fixes which problem lands in train, dev or test. It
is independent of any sampling seed (generation, few-shot draws, training), so changing the sampling seed never
moves a problem between splits and a dev-tuned setting is always scored on unseen test problems.

User tasks. ``jsonl:PATH`` reads one JSON object per line; ``hf:REPO[:CONFIG]:SPLIT`` reads a split of a
Hugging Face hub dataset through the optional ``datasets`` package (``pip install 'lrs[hub]'``). The question
is the first present field of question / problem / input / prompt, the answer the first of answer / target /
final_answer / solution (override with ``question_field`` / ``answer_field``); a GSM8K-style answer keeps the
part after ``####``, an answer holding ``\\boxed{...}`` keeps the last boxed content. Ids are the row's ``id``
field when present, else ``<file stem>/<row index>`` (``<dataset name>/<row index>`` for the hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lrs.errors import LRSError
from lrs.grading import last_boxed

SPLITS = ("train", "dev", "test")
ALL_SPLITS = (*SPLITS, "all")
QUESTION_FIELDS = ("question", "problem", "input", "prompt")
ANSWER_FIELDS = ("answer", "target", "final_answer", "solution")
USER_TASKS = {
    "jsonl:PATH": "your own problems, one JSON object per line (question/problem/input/prompt + "
    "answer/target/final_answer/solution fields)",
    "hf:REPO[:CONFIG]:SPLIT": "a Hugging Face hub dataset split, same fields (needs pip install 'lrs[hub]'), "
    "e.g. hf:openai/gsm8k:main:test",
}
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
COT_SUFFIX = "Let's think step by step."
STYLES = ("base", "cot", "fewshot")
GSM8K_DEV = 200
ARITH_DEFAULT = 1000


@dataclass(frozen=True)
class Problem:
    """One task item: a stable id ("gsm8k/test/17", "arith/train/5"), the question and the gold answer."""

    id: str
    task: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------- data files


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where task files are looked for: `data_dir`, else $LRS_DATA, else <repo>/../shared/data, ./data,
    ../shared/data (relative to the working directory)."""
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get("LRS_DATA"):
        return [Path(os.environ["LRS_DATA"])]
    root = Path(__file__).resolve().parents[2]
    return [root.parent / "shared" / "data", Path.cwd() / "data", Path.cwd().parent / "shared" / "data"]


def _find(task: str, names: Sequence[str], data_dir) -> Path | None:
    for d in data_dirs(data_dir):
        for name in names:
            if (d / task / name).is_file():
                return d / task / name
    return None


def _read_jsonl_lines(path: Path, *, fix: str | None = None) -> list[tuple[int, dict]]:
    """(1-based line number, row) for every non-blank line, so errors about a row can name its line.
    `fix` replaces the default advice (re-copy a shipped file) for files the user wrote."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise LRSError(
                            f"{path}:{n}: not valid JSON ({e.msg}); {fix or 're-copy the file'}"
                        ) from None
    except UnicodeDecodeError:
        raise LRSError(f"{path} is not UTF-8 text; {fix or 're-copy the file'}") from None
    if not rows:
        advice = fix or "re-copy the task's data file"
        raise LRSError(f"{path} is empty; {advice}")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    return [r for _, r in _read_jsonl_lines(path)]


def _hub_rows(task: str, hub: tuple[str, str | None] | None, split: str) -> list[dict] | None:
    """Rows from the Hugging Face hub via the optional `datasets` package, or None if unavailable."""
    if hub is None:
        return None
    try:
        import datasets
    except ImportError:
        return None
    try:
        ds = datasets.load_dataset(hub[0], hub[1], split=split)
    except Exception as e:
        raise LRSError(
            f"no local data for task '{task}' and loading {hub[0]} from the hub failed: {e}"
        ) from None
    return [dict(r) for r in ds]


def _rows(task: str, source: str, names: Sequence[str], data_dir, hub=None) -> list[dict]:
    path = _find(task, names, data_dir)
    if path is not None:
        rows = _read_jsonl(path)
        if path.name == "test.jsonl" and task == "aime25":  # restore under-escaped \frac / \triangle
            for r in rows:
                r["problem"] = r["problem"].replace("\x0c", "\\f").replace("\t", "\\t")
        return rows
    rows = _hub_rows(task, hub, source)
    if rows is None:
        dirs = ", ".join(str(d) for d in data_dirs(data_dir))
        raise LRSError(
            f"no data for task '{task}': looked in {dirs}; set LRS_DATA to a folder holding {task}/{names[0]}"
        )
    return rows


def _num_str(x) -> str:
    """27.0 -> "27", 2.5 -> "2.5", "025" stays "025" (strings are kept as given)."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def _first(x):
    """olympiadbench stores lists (sometimes as a string "['...']"): take the first element."""
    if isinstance(x, str) and x.startswith("[") and x.endswith("]"):
        try:
            x = json.loads(x)
        except json.JSONDecodeError:
            import ast

            try:
                x = ast.literal_eval(x)
            except (ValueError, SyntaxError):
                return x
    if isinstance(x, list):
        return x[0] if x else ""
    return x


def gsm8k_gold(answer: str) -> str:
    """The gold number after GSM8K's `####`, with thousands separators removed."""
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_solution(answer: str) -> str:
    """A GSM8K worked answer without <<calculator>> annotations, ending in "The answer is \\boxed{x}."."""
    body, _, gold = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is \\boxed{{{gold.strip().replace(',', '')}}}."


# ---------------------------------------------------------------- row -> Problem converters


def _conv_gsm8k(task, i, r, source):
    return Problem(f"{task}/{source}/{i}", task, r["question"], gsm8k_gold(r["answer"]), r["answer"], {})


def _conv_math500(task, i, r, source):
    meta = {k: r[k] for k in ("subject", "level", "unique_id") if k in r}
    return Problem(f"{task}/{i}", task, r["problem"], _num_str(r["answer"]), r.get("solution"), meta)


def _conv_simple(task, i, r, source):  # aime24 / aime25 / amc23
    question = r.get("problem") or r.get("question")
    meta = {k: r[k] for k in ("id", "url") if k in r}
    return Problem(f"{task}/{i}", task, question, _num_str(r["answer"]), r.get("solution"), meta)


def _conv_multiarith(task, i, r, source):
    return Problem(f"{task}/{i}", task, r["input"], _num_str(r["target"]), None, {})


def _conv_minerva(task, i, r, source):
    gold = last_boxed(r["solution"])
    if gold is None:
        raise LRSError(f"{task} item {i} has no \\boxed{{}} answer in its solution; re-copy the data file")
    return Problem(f"{task}/{i}", task, r["problem"], gold, r["solution"], {"type": r.get("type")})


def _conv_olympiad(task, i, r, source):
    gold = str(_first(r["final_answer"])).strip().strip("$").strip()
    question = r["question"] if not r.get("context") else f"{r['context']}\n\n{r['question']}"
    meta = {k: r.get(k) for k in ("id", "subfield", "answer_type", "unit", "is_multiple_answer")}
    solution = _first(r.get("solution"))
    return Problem(f"{task}/{i}", task, question, gold, solution or None, meta)


# ---------------------------------------------------------------- splits


def _split_test_only(problems: list[Problem], split: str, seed: int, task: str) -> list[Problem]:
    """Shuffle once by the seed, then train 50 % / dev 20 % / test 30 %."""
    order = list(problems)
    random.Random(f"{task}:{seed}").shuffle(order)
    n_train, n_dev = int(0.5 * len(order)), int(0.2 * len(order))
    return {
        "train": order[:n_train],
        "dev": order[n_train : n_train + n_dev],
        "test": order[n_train + n_dev :],
    }[split]


def _file_loader(
    conv: Callable, names: Sequence[str], hub: tuple[str, str | None] | None = None
) -> Callable[..., list[Problem]]:
    def load(task: str, split: str, seed: int, data_dir, limit: int | None) -> list[Problem]:
        rows = _rows(task, "test", names, data_dir, hub)
        return _split_test_only([conv(task, i, r, "test") for i, r in enumerate(rows)], split, seed, task)

    return load


def _load_gsm8k(task: str, split: str, seed: int, data_dir, limit: int | None) -> list[Problem]:
    hub = ("openai/gsm8k", "main")
    if split == "test":
        rows = _rows(task, "test", ["test.jsonl"], data_dir, hub)
        return [_conv_gsm8k(task, i, r, "test") for i, r in enumerate(rows)]
    rows = _rows(task, "train", ["train.jsonl"], data_dir, hub)
    order = [_conv_gsm8k(task, i, r, "train") for i, r in enumerate(rows)]
    random.Random(f"{task}:{seed}").shuffle(order)
    return order[:GSM8K_DEV] if split == "dev" else order[GSM8K_DEV:]


# ---------------------------------------------------------------- procedural task: arith

_PEOPLE = [
    ("Maya", "she", "her"),
    ("Liam", "he", "his"),
    ("Aisha", "she", "her"),
    ("Diego", "he", "his"),
    ("Chen", "he", "his"),
    ("Olga", "she", "her"),
    ("Tom", "he", "his"),
    ("Priya", "she", "her"),
    ("Kofi", "he", "his"),
    ("Sara", "she", "her"),
    ("Ben", "he", "his"),
    ("Yuki", "she", "her"),
]


class _Retry(Exception):
    """The drawn numbers do not fit; draw again."""


def _minus_to_multiple(rng: random.Random, x: int, d: int) -> int:
    """An amount c >= 1 to take from x so that x - c is a positive multiple of d (keeping >= ~40 % of x)."""
    hi = (x - 1) // d
    if hi < 1:
        raise _Retry
    return x - d * rng.randint(max(1, min(hi, 2 * x // (5 * d))), hi)


def _plus_to_multiple(rng: random.Random, x: int, d: int, most: int) -> int:
    """An amount 1 <= c <= most to add to x so that x + c is a multiple of d."""
    first = d - x % d
    options = list(range(first, most + 1, d))
    if not options:
        raise _Retry
    return rng.choice(options)


def _t_shopping(rng):
    n, he, his = rng.choice(_PEOPLE)
    item = rng.choice(["stickers", "pencils", "marbles", "stamps", "erasers", "trading cards"])
    a, b, d, e = rng.randint(3, 16), rng.randint(4, 30), rng.randint(3, 9), rng.randint(2, 15)
    x1 = a * b
    c = _minus_to_multiple(rng, x1, d)
    x2 = x1 - c
    x3 = x2 // d
    return [
        (f"{n} buys {a} packs of {item} with {b} {item} in each pack.", f"{n} buys {a} * {b} = {x1} {item}.", x1,
         f"How many {item} does {n} buy?"),
        (f"{he.capitalize()} gives {c} of them to {his} brother.", f"{n} has {x1} - {c} = {x2} {item} left.", x2,
         f"How many {item} does {n} have left?"),
        (f"{he.capitalize()} shares the rest equally among {d} friends.", f"Each friend gets {x2} / {d} = {x3} {item}.",
         x3, f"How many {item} does each friend get?"),
        (f"Later, each friend gets {e} more {item} from the teacher.",
         f"Each friend now has {x3} + {e} = {x3 + e} {item}.", x3 + e, f"How many {item} does each friend have now?"),
    ]  # fmt: skip


def _t_savings(rng):
    n, he, his = rng.choice(_PEOPLE)
    a, b, d, k = rng.randint(5, 60), rng.randint(4, 20), rng.choice([2, 3, 4, 5]), rng.choice([2, 3])
    thing = rng.choice(["bike helmet", "video game", "pair of shoes", "backpack", "concert ticket"])
    x1 = a * b
    c = _minus_to_multiple(rng, x1, d)
    x2 = x1 - c
    x3 = x2 // d
    word = {2: "doubles", 3: "triples"}[k]
    return [
        (f"{n} saves ${a} every week for {b} weeks.", f"{n} saves {a} * {b} = ${x1}.", x1,
         f"How many dollars does {n} save?"),
        (f"{he.capitalize()} spends ${c} on a {thing}.", f"{n} has {x1} - {c} = ${x2} left.", x2,
         f"How many dollars does {n} have left?"),
        (f"{he.capitalize()} splits the remaining money equally into {d} envelopes.",
         f"Each envelope holds {x2} / {d} = ${x3}.", x3, "How many dollars are in each envelope?"),
        (f"Then {his} grandmother {word} the money in one of the envelopes.",
         f"That envelope now holds {x3} * {k} = ${x3 * k}.", x3 * k, "How many dollars are in that envelope now?"),
    ]  # fmt: skip


def _t_travel(rng):
    a, b = rng.randint(30, 120), rng.randint(2, 9)
    d, e = rng.choice([4, 5, 6, 8, 10, 12]), rng.randint(2, 9)
    x1 = a * b
    c = _plus_to_multiple(rng, x1, d, most=6 * d)
    x2 = x1 + c
    x3 = x2 // d
    return [
        (f"A delivery truck drives {a} km each day for {b} days.", f"The truck drives {a} * {b} = {x1} km.", x1,
         "How many km does the truck drive?"),
        (f"On the last day it also makes a detour of {c} km.", f"In total it drives {x1} + {c} = {x2} km.", x2,
         "How many km does the truck drive in total?"),
        (f"The truck uses 1 liter of fuel for every {d} km.", f"It uses {x2} / {d} = {x3} liters of fuel.", x3,
         "How many liters of fuel does the truck use?"),
        (f"Fuel costs ${e} per liter.", f"The fuel costs {x3} * {e} = ${x3 * e}.", x3 * e,
         "How many dollars does the fuel cost?"),
    ]  # fmt: skip


def _t_baking(rng):
    food = rng.choice(["cookies", "muffins", "cupcakes", "bread rolls", "scones"])
    a, b, d, e = rng.randint(3, 12), rng.randint(6, 36), rng.randint(4, 12), rng.randint(3, 15)
    x1 = a * b
    c = _minus_to_multiple(rng, x1, d)
    x2 = x1 - c
    x3 = x2 // d
    return [
        (f"A baker bakes {a} trays of {food} with {b} {food} on each tray.", f"The baker bakes {a} * {b} = {x1} {food}.",
         x1, f"How many {food} does the baker bake?"),
        (f"{c} of them break and are thrown away.", f"{x1} - {c} = {x2} {food} are left.", x2,
         f"How many {food} are left?"),
        (f"The rest are packed into boxes of {d}.", f"That fills {x2} / {d} = {x3} boxes.", x3,
         "How many boxes are filled?"),
        (f"Each box is sold for ${e}.", f"The baker earns {x3} * {e} = ${x3 * e}.", x3 * e,
         "How many dollars does the baker earn?"),
    ]  # fmt: skip


def _t_classroom(rng):
    a, b, d, e = rng.randint(3, 12), rng.randint(18, 35), rng.randint(3, 8), rng.randint(2, 9)
    x1 = a * b
    c = _minus_to_multiple(rng, x1, d)
    x2 = x1 - c
    x3 = x2 // d
    return [
        (f"A school has {a} classes with {b} students in each class.", f"There are {a} * {b} = {x1} students.", x1,
         "How many students does the school have?"),
        (f"On the day of a museum trip, {c} students stay at school.", f"{x1} - {c} = {x2} students go on the trip.",
         x2, "How many students go on the trip?"),
        (f"At the museum the students are split into groups of {d}.", f"That makes {x2} / {d} = {x3} groups.", x3,
         "How many groups are there?"),
        (f"Each group gets {e} worksheets.", f"They hand out {x3} * {e} = {x3 * e} worksheets.", x3 * e,
         "How many worksheets are handed out?"),
    ]  # fmt: skip


def _t_garden(rng):
    n, he, _ = rng.choice(_PEOPLE)
    flower = rng.choice(["tulips", "roses", "daisies", "sunflowers", "lilies"])
    a, b, d = rng.randint(4, 20), rng.randint(5, 25), rng.randint(3, 12)
    x1 = a * b
    c = rng.randint(1, max(1, x1 // 3))
    x2 = x1 - c
    e = _plus_to_multiple(rng, x2, d, most=8 * d)
    x3 = x2 + e
    return [
        (f"{n} plants {a} rows of {flower} with {b} {flower} in each row.", f"{n} plants {a} * {b} = {x1} {flower}.",
         x1, f"How many {flower} does {n} plant?"),
        (f"Rabbits eat {c} of them.", f"{x1} - {c} = {x2} {flower} are left.", x2, f"How many {flower} are left?"),
        (f"Then {he} plants {e} more {flower}.", f"Now there are {x2} + {e} = {x3} {flower}.", x3,
         f"How many {flower} are there now?"),
        (f"{he.capitalize()} cuts all of them and makes bouquets of {d} {flower} each.",
         f"That makes {x3} / {d} = {x3 // d} bouquets.", x3 // d, "How many bouquets does " + n + " make?"),
    ]  # fmt: skip


def _t_library(rng):
    a, b, d = rng.randint(3, 15), rng.randint(8, 40), rng.randint(4, 12)
    x1 = a * b
    c = _plus_to_multiple(rng, x1, d, most=300)
    x2 = x1 + c
    x3 = x2 // d
    if x3 < 3:
        raise _Retry
    e = rng.randint(1, x3 - 1)
    return [
        (f"A library receives {a} boxes of new books with {b} books in each box.",
         f"The library receives {a} * {b} = {x1} new books.", x1, "How many new books does the library receive?"),
        (f"It already had {c} books.", f"Now it has {x1} + {c} = {x2} books.", x2,
         "How many books does the library have now?"),
        (f"All the books are shared equally among {d} shelves.", f"Each shelf holds {x2} / {d} = {x3} books.", x3,
         "How many books are on each shelf?"),
        (f"Then {e} books are taken off each shelf for repair.", f"Each shelf now holds {x3} - {e} = {x3 - e} books.",
         x3 - e, "How many books are on each shelf now?"),
    ]  # fmt: skip


def _t_farm(rng):
    n, _, his = rng.choice(_PEOPLE)
    a, b, w, d = rng.randint(4, 30), rng.randint(3, 6), rng.randint(2, 4), rng.choice([6, 10, 12])
    x1 = a * b
    x2 = x1 * w
    c = _minus_to_multiple(rng, x2, d)
    x3 = x2 - c
    return [
        (f"{n} has {a} hens, and each hen lays {b} eggs a week.", f"The hens lay {a} * {b} = {x1} eggs a week.", x1,
         "How many eggs do the hens lay in a week?"),
        (f"{n} collects the eggs for {w} weeks.", f"In {w} weeks that is {x1} * {w} = {x2} eggs.", x2,
         f"How many eggs does {n} collect?"),
        (f"{n} keeps {c} eggs for {his} family.", f"{x2} - {c} = {x3} eggs are left to sell.", x3,
         "How many eggs are left to sell?"),
        (f"The eggs left are sold in cartons of {d}.", f"That fills {x3} / {d} = {x3 // d} cartons.", x3 // d,
         "How many cartons are filled?"),
    ]  # fmt: skip


ARITH_TEMPLATES: dict[str, Callable] = {
    "shopping": _t_shopping,
    "savings": _t_savings,
    "travel": _t_travel,
    "baking": _t_baking,
    "classroom": _t_classroom,
    "garden": _t_garden,
    "library": _t_library,
    "farm": _t_farm,
}


def arith_problem(rng: random.Random) -> tuple[str, str, int, dict]:
    """One procedural word problem: (question, worked solution, answer, meta) with 2-4 dependent steps."""
    while True:
        name = rng.choice(sorted(ARITH_TEMPLATES))
        steps = rng.choice([2, 3, 4])
        try:
            ops = ARITH_TEMPLATES[name](rng)[:steps]
        except _Retry:
            continue
        if all(v >= 0 for _, _, v, _ in ops) and ops[-1][2] > 0:
            break
    question = " ".join(s for s, _, _, _ in ops) + " " + ops[-1][3]
    answer = ops[-1][2]
    solution = "\n".join(line for _, line, _, _ in ops) + f"\nThe answer is \\boxed{{{answer}}}."
    return question, solution, answer, {"template": name, "steps": steps}


def _arith_split_of(question: str) -> str:
    """Every question text belongs to exactly one split (by hash), so split streams can never overlap."""
    return SPLITS[hashlib.sha256(question.encode()).digest()[0] % 3]


def _load_arith(task: str, split: str, seed: int, data_dir, limit: int | None) -> list[Problem]:
    n = ARITH_DEFAULT if limit is None else limit
    rng = random.Random(f"arith:{seed}:{split}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        q, sol, ans, meta = arith_problem(rng)
        if q in seen or _arith_split_of(q) != split:
            continue
        seen.add(q)
        out.append(Problem(f"{task}/{split}/{len(out)}", task, q, str(ans), sol, {**meta, "seed": seed}))
    return out


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its loader `(task, split, seed, data_dir, limit) -> problems` and a description."""

    loader: Callable[..., list[Problem]]
    description: str


TASKS: dict[str, TaskSpec] = {
    "arith": TaskSpec(_load_arith, "procedural 2-4 step arithmetic word problems (seeded, unlimited)"),
    "gsm8k": TaskSpec(_load_gsm8k, "GSM8K grade-school maths (1319 test, 7473 train)"),
    "multiarith": TaskSpec(
        _file_loader(_conv_multiarith, ["test.jsonl"]), "MultiArith 2-step problems (600)"
    ),
    "math500": TaskSpec(
        _file_loader(_conv_math500, ["test.jsonl"], ("HuggingFaceH4/MATH-500", None)), "MATH-500 (500)"
    ),
    "aime24": TaskSpec(_file_loader(_conv_simple, ["test.jsonl"]), "AIME 2024 (30)"),
    "aime25": TaskSpec(_file_loader(_conv_simple, ["test.cleaned.jsonl", "test.jsonl"]), "AIME 2025 (30)"),
    "amc23": TaskSpec(_file_loader(_conv_simple, ["test.jsonl"]), "AMC 12 2023 (40)"),
    "minerva_math": TaskSpec(_file_loader(_conv_minerva, ["test.jsonl"]), "Minerva OCW courses (272)"),
    "olympiadbench": TaskSpec(
        _file_loader(_conv_olympiad, ["test.jsonl"]), "OlympiadBench maths, English (675)"
    ),
}


def list_tasks() -> dict[str, str]:
    """Known task names with a one-line description each, plus the `jsonl:` / `hf:` forms for user data."""
    return {**{name: spec.description for name, spec in TASKS.items()}, **USER_TASKS}


# ---------------------------------------------------------------- user tasks: jsonl:PATH and hf:REPO[:CONFIG]:SPLIT


def _present(row: dict, key: str) -> bool:
    """A field counts as present when it exists and is not null / blank (so an empty `answer` falls through
    to e.g. `solution`)."""
    v = row.get(key)
    return v is not None and not (isinstance(v, str) and not v.strip())


def _pick(row: dict, forced: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    """The field of `row` to read `what` from: `forced` if given, else the first present candidate."""
    names = (forced,) if forced is not None else tuple(candidates)
    for k in names:
        if _present(row, k):
            return k
    hint = f"{what}_field=" if forced is None else f"a different {what}_field="
    raise LRSError(
        f"{where}: no {what} field (looked for {', '.join(names)}; present: {', '.join(map(str, row)) or 'none'}); "
        f"pass {hint}<name> to load_task"
    )


def _user_gold(value) -> tuple[str, str | None]:
    """(gold answer, worked solution or None) from a raw answer value: numbers as in the benchmarks
    (27.0 -> "27"), a GSM8K "... #### 42" keeps "42", text with \\boxed{...} keeps the last boxed content."""
    value = _first(value)
    if not isinstance(value, str):
        return _num_str(value), None
    text = value.strip()
    if "####" in text:
        return gsm8k_gold(text), gsm8k_solution(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, text
    return text, None


def _user_problems(
    rows: Sequence[tuple[int, dict]],
    *,
    task: str,
    origin: str,
    unit: str,
    question_field: str | None,
    answer_field: str | None,
) -> list[Problem]:
    """Rows of a user file / hub split -> problems in row order. `origin` and `unit` ("line" / "row") name
    where a bad row is, so one error line is enough to find and fix it."""
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for i, (n, row) in enumerate(rows):
        where = f"{origin}, {unit} {n}"
        if not isinstance(row, dict):
            raise LRSError(
                f"{where}: expected a JSON object with question and answer fields, got {type(row).__name__}"
            )
        qk = _pick(row, question_field, QUESTION_FIELDS, "question", where)
        ak = _pick(row, answer_field, ANSWER_FIELDS, "answer", where)
        gold, worked = _user_gold(row[ak])
        if not gold:
            raise LRSError(
                f"{where}: the {ak} field holds no answer (empty \\boxed{{}} or nothing after ####)"
            )
        solution = worked
        if solution is None and ak != "solution" and isinstance(row.get("solution"), str):
            solution = row["solution"]
        pid = str(row["id"]).strip() if _present(row, "id") else f"{task}/{i}"
        if pid in seen:
            raise LRSError(
                f"{origin}: duplicate problem id '{pid}' ({unit}s {seen[pid]} and {n}); ids must be unique"
            )
        seen[pid] = n
        meta = {k: v for k, v in row.items() if k not in (qk, ak, "solution")}
        meta[unit] = n
        out.append(Problem(pid, task, str(row[qk]).strip(), gold, solution, meta))
    return out


def _load_jsonl_rows(spec: str) -> tuple[str, str, list[tuple[int, dict]]]:
    """(task name = file stem, path text, numbered rows) of a `jsonl:PATH` task."""
    raw = spec[len("jsonl:") :].strip()
    if not raw:
        raise LRSError("jsonl task needs a path: use jsonl:PATH, e.g. jsonl:data/my_problems.jsonl")
    path = Path(raw).expanduser()
    if not path.exists():
        raise LRSError(f"jsonl task file not found: {path} (resolved to {path.resolve()})")
    if not path.is_file():
        raise LRSError(f"jsonl task path is not a file: {path}")
    return path.stem, str(path), _read_jsonl_lines(path, fix="write one JSON object per line")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:REPO[:CONFIG]:SPLIT` -> (repo, config or None, hub split): hf:openai/gsm8k:main:test ->
    ("openai/gsm8k", "main", "test"); hf:user/ds:test -> ("user/ds", None, "test")."""
    parts = spec[len("hf:") :].split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise LRSError(
            f"bad hub task '{spec}': use hf:REPO[:CONFIG]:SPLIT, e.g. hf:openai/gsm8k:main:test or hf:user/ds:test"
        )
    parts = [p.strip() for p in parts]
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def _load_hub_rows(spec: str) -> tuple[str, str, list[tuple[int, dict]]]:
    """(task name = dataset name, spec, numbered rows) of an `hf:` task, via the optional `datasets` package."""
    repo, config, hub_split = parse_hub_spec(spec)
    try:
        import datasets
    except ImportError:
        raise LRSError(f"task '{spec}' needs the optional `datasets` extra: pip install 'lrs[hub]'") from None
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
        rows = [(i, dict(r)) for i, r in enumerate(ds)]
    except Exception as e:  # network, auth, unknown repo/config/split: all surface as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(
            f"could not load '{spec}': the Hugging Face hub could not be reached or the dataset/config/split "
            f"was not found ({type(e).__name__}: {first})"
        ) from None
    if not rows:
        raise LRSError(f"hub dataset '{spec}' has no rows")
    return repo.rstrip("/").split("/")[-1], spec, rows


def _load_user_task(
    name: str, split: str, split_seed: int, question_field: str | None, answer_field: str | None
) -> list[Problem]:
    """A `jsonl:` or `hf:` task: `all` = every row in file order, train/dev/test = the seeded 50/20/30 split.
    The shuffle is keyed on the split seed only (not the file's name or place), so moving or renaming the
    file keeps its split."""
    if name.startswith("jsonl:"):
        task, origin, rows = _load_jsonl_rows(name)
        unit = "line"
    else:
        task, origin, rows = _load_hub_rows(name)
        unit = "row"
    problems = _user_problems(
        rows, task=task, origin=origin, unit=unit, question_field=question_field, answer_field=answer_field
    )
    return problems if split == "all" else _split_test_only(problems, split, split_seed, "user")


def load_task(
    name: str,
    split: str = "test",
    *,
    split_seed: int | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    seed: int | None = None,
) -> list[Problem]:
    """The problems of one fixed split of a task.

    `name` is a built-in task (see `list_tasks()`), `jsonl:PATH` (your own JSONL file) or
    `hf:REPO[:CONFIG]:SPLIT` (a hub dataset split). `split` is train, dev, test or all (every problem; refused
    for the unlimited arith). `split_seed` (None = 0) fixes the train/dev/test assignment and nothing else: the
    same split seed always gives the same, disjoint splits whatever sampling seed a run uses. `seed` is the old
    name of `split_seed`, still accepted. `limit` keeps the first N (for arith it may exceed the default 1000:
    the task is unlimited). `question_field` / `answer_field` override the field detection of user tasks."""
    if seed is not None and split_seed is not None and seed != split_seed:
        raise LRSError(
            f"load_task got seed={seed} and split_seed={split_seed}; seed is the old name of split_seed, pass only one"
        )
    split_seed = split_seed if split_seed is not None else seed if seed is not None else 0
    user = name.startswith(("jsonl:", "hf:"))
    if not user and name not in TASKS:
        raise LRSError(
            f"unknown task '{name}'; known tasks: {', '.join(TASKS)}; or your own data as jsonl:PATH or "
            "hf:REPO[:CONFIG]:SPLIT"
        )
    if split not in ALL_SPLITS:
        raise LRSError(f"unknown split '{split}'; use one of {', '.join(ALL_SPLITS)}")
    if limit is not None and limit < 0:
        raise LRSError(f"limit must be >= 0, got {limit}")
    if user:
        problems = _load_user_task(name, split, split_seed, question_field, answer_field)
        return problems if limit is None else problems[:limit]
    if question_field is not None or answer_field is not None:
        raise LRSError(
            f"question_field / answer_field only apply to jsonl:PATH and hf: tasks, not the built-in '{name}'"
        )
    if split == "all":
        if name == "arith":
            raise LRSError(
                "split 'all' is not available for arith: the task is unlimited; use train, dev or test"
            )
        problems = [p for s in SPLITS for p in TASKS[name].loader(name, s, split_seed, data_dir, None)]
    else:
        problems = TASKS[name].loader(name, split, split_seed, data_dir, limit)
    problems = problems if limit is None else problems[:limit]
    for p in problems:
        if p.answer is None or str(p.answer).strip() in ("", "None", "null"):
            raise LRSError(f"task '{name}': problem {p.id} has no gold answer; fix or remove that row")
    return problems


# ---------------------------------------------------------------- prompts


def worked_solution(p: Problem) -> str:
    """The few-shot answer for `p`: its worked solution ending with \\boxed{gold} (gsm8k annotations removed)."""
    if p.task == "gsm8k" and p.solution and "####" in p.solution:
        return gsm8k_solution(p.solution)
    sol = (p.solution or "").strip()
    if sol and last_boxed(sol) == p.answer.strip() and len(sol) - sol.rfind("\\boxed") < 40:
        return sol
    return (sol + "\n" if sol else "") + f"The answer is \\boxed{{{p.answer}}}."


def user_message(p: Problem) -> str:
    """The user turn of a problem's prompt: the question and the answer-format instruction."""
    return f"{p.question}\n{INSTRUCTION}"


def _render(tokenizer, messages: list[dict]) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [
        f"Question: {m['content']}\nAnswer:" if m["role"] == "user" else f" {m['content']}\n\n"
        for m in messages
    ]
    return "".join(parts)


def build_prompts(
    tokenizer,
    problems: Sequence[Problem],
    *,
    style: str = "base",
    shots: int = 4,
    pool: Sequence[Problem] | None = None,
    seed: int = 0,
) -> list[str]:
    """Prompt strings through the tokenizer's chat template. base: question + "reason step by step, answer in
    \\boxed{}"; cot: base + "Let's think step by step." opening the answer; fewshot: `shots` worked examples
    from `pool` (the task's train split, drawn with the seed, never the problem itself) before the question."""
    if style not in STYLES:
        raise LRSError(f"unknown prompt style '{style}'; use one of {', '.join(STYLES)}")
    examples: list[Problem] = []
    if style == "fewshot" and shots > 0:
        if not pool:
            raise LRSError(
                "style 'fewshot' needs pool=<the task's train split>, e.g. load_task(name, 'train')"
            )
        examples = list(pool)
        random.Random(f"fewshot:{seed}").shuffle(examples)
    out = []
    for p in problems:
        messages: list[dict] = []
        if examples:
            chosen = [e for e in examples if e.id != p.id and e.question != p.question][:shots]
            if len(chosen) < shots:
                raise LRSError(f"few-shot pool has too few problems for {shots} shots; pass a larger pool")
            for e in chosen:
                messages += [
                    {"role": "user", "content": user_message(e)},
                    {"role": "assistant", "content": worked_solution(e)},
                ]
        messages.append({"role": "user", "content": user_message(p)})
        text = _render(tokenizer, messages)
        if style == "cot":
            text += COT_SUFFIX if text.endswith(("\n", " ")) else " " + COT_SUFFIX
        out.append(text)
    return out

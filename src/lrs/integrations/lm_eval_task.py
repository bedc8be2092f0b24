"""An lrs task as an lm-eval task: the same problems, the same prompt and the same answer checker.

``lrs export-task --task arith --split test --limit 300 --out tasks/`` writes three files into ``--out``:

- ``<name>.jsonl``: one document per problem (``id``, ``question``, ``answer`` and ``prompt``, the user turn
  ``lrs eval`` sends: the question and the ``\\boxed{}`` instruction);
- ``<name>.yaml``: a ``generate_until`` task over that file (absolute path, so it runs from any directory),
  greedy, ``max_gen_toks`` = the budget, stopping at the model's end-of-turn only;
- ``lrs_grading.py``: ``process_results`` grading with :func:`lrs.grading.grade` (math-verify plus the
  numeric fallback), so lm-eval's ``acc`` is the same number ``lrs eval`` reports; ``boxed`` is the share of
  answers with a ``\\boxed{}``.

Run with ``--apply_chat_template``: lm-eval then renders the user turn through the tokenizer's chat template
exactly as ``lrs eval`` does (same system prompt, same generation prompt), so the two harnesses see the same
token ids. Nothing here imports lm-eval; the files are plain text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lrs.artifacts import atomic_write_text
from lrs.errors import LRSError
from lrs.tasks import Problem, user_message

GRADER = "lrs_grading"

_GRADER_SOURCE = '''"""lm-eval metrics for a task written by `lrs export-task`: the answer checker of `lrs eval`."""

from lrs.grading import last_boxed, grade_one


def process_results(doc, results):
    out = results[0]
    return {"acc": float(grade_one(out, doc["answer"]).correct), "boxed": float(last_boxed(out) is not None)}
'''


def _yaml(name: str, data: Path, max_gen_toks: int) -> str:
    return (
        f"# written by `lrs export-task`: {name}\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        f"process_results: !function {GRADER}.process_results\n"
        "generation_kwargs:\n"
        "  until: []\n"
        f"  max_gen_toks: {max_gen_toks}\n"
        "  do_sample: false\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: boxed\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def export_task(problems: Sequence[Problem], out_dir: str | Path, name: str, max_gen_toks: int) -> Path:
    """Write ``problems`` as the lm-eval task ``name`` into ``out_dir`` (JSONL, YAML, grader); returns the
    YAML's path. The task directory is what lm-eval's ``--include_path`` takes."""
    if not problems:
        raise LRSError("export-task: no problems to write (empty split or --limit 0)")
    if not name.replace("_", "").isalnum():
        raise LRSError(f"export-task: task name {name!r} must be letters, digits and underscores")
    if max_gen_toks < 1:
        raise LRSError(f"export-task: --max-gen-toks must be at least 1, got {max_gen_toks}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LRSError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    data = (out / f"{name}.jsonl").resolve()
    docs = [dict(id=p.id, question=p.question, answer=p.answer, prompt=user_message(p)) for p in problems]
    atomic_write_text(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    atomic_write_text(out / f"{GRADER}.py", _GRADER_SOURCE)
    yaml = out / f"{name}.yaml"
    atomic_write_text(yaml, _yaml(name, data, max_gen_toks))
    return yaml

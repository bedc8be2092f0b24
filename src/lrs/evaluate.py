"""Run one method on one split and write what the protocol asks for: per-problem JSONL + a summary JSON.

A method is a prompt style (``base``, ``cot``, ``fewshot``) optionally combined with a steerer (any object
with ``context(batch, indices, tracker)`` returning a context manager, and ``stats()`` returning a dict);
steering methods use the ``base`` prompt so comparisons against base isolate the steering.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from lrs import __version__
from lrs.errors import LRSError
from lrs.generation import generate
from lrs.grading import grade
from lrs.models import model_name
from lrs.stats import bootstrap_ci, paired_comparison
from lrs.tasks import Problem, build_prompts

PROMPT_METHODS = ("base", "cot", "fewshot")


def versions() -> dict[str, str]:
    """Library versions recorded in every result file."""
    out = {"lrs": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "math-verify", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    method: str = "base",
    steerer=None,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    seed: int = 0,
    shots: int = 4,
    fewshot_pool: Sequence[Problem] | None = None,
    extra: dict | None = None,
    progress: bool = True,
) -> dict:
    """Generate greedily for ``problems``, grade, and return (and optionally write) records and a summary."""
    if not problems:
        raise LRSError("no problems to evaluate (empty split or --limit 0)")
    style = method if method in PROMPT_METHODS else "base"
    if style == "fewshot" and not fewshot_pool:
        raise LRSError("few-shot prompting needs a pool of train problems to draw examples from")
    prompts = build_prompts(tokenizer, problems, style=style, shots=shots, pool=fewshot_pool, seed=seed)
    ctx = steerer.context if steerer is not None else None
    t0 = time.perf_counter()
    gens = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        context=ctx,
        progress=progress,
        desc=f"eval {method}",
    )
    wall = time.perf_counter() - t0
    grades = grade([g.text for g in gens], [p.answer for p in problems])
    steer_rows = steerer.row_stats() if steerer is not None and hasattr(steerer, "row_stats") else {}
    records = []
    for i, (p, g, gr) in enumerate(zip(problems, gens, grades, strict=True)):
        rec = dict(
            id=p.id,
            prompt=prompts[i],
            output=g.text,
            pred=gr.pred,
            gold=p.answer,
            correct=gr.correct,
            tokens=g.n_tokens,
            truncated=not g.finished,
            check=gr.method,
        )
        rec.update(steer_rows.get(i, {}))
        records.append(rec)
    correct = [r["correct"] for r in records]
    n_tok = sum(r["tokens"] for r in records)
    lo, hi = bootstrap_ci(correct, seed=seed)
    summary = dict(
        method=method,
        n=len(records),
        accuracy=sum(correct) / len(records),
        ci95=[lo, hi],
        mean_tokens=n_tok / len(records),
        truncated=sum(r["truncated"] for r in records),
        wall_time_s=wall,
        tokens_per_s=n_tok / wall if wall > 0 else None,
        model=model_name(model),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_style=style,
        greedy=True,
        threads=os.environ.get("OMP_NUM_THREADS"),
        versions=versions(),
        **(extra or {}),
    )
    if steerer is not None:
        summary["steering"] = steerer.stats()
    result = {"summary": summary, "records": records}
    if out_dir is not None:
        write_result(result, Path(out_dir), method)
    return result


def write_result(result: dict, out_dir: Path, name: str) -> None:
    """Write ``name.jsonl`` (one record per problem) and ``name.summary.json`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (out_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in result["records"])),
        (out_dir / f"{name}.summary.json", json.dumps(result["summary"], indent=1)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def load_result(out_dir: str | Path, name: str) -> dict | None:
    """Read a result written by :func:`write_result`, or None if absent."""
    out_dir = Path(out_dir)
    s, j = out_dir / f"{name}.summary.json", out_dir / f"{name}.jsonl"
    if not (s.exists() and j.exists()):
        return None
    return {
        "summary": json.loads(s.read_text()),
        "records": [json.loads(x) for x in j.read_text().splitlines()],
    }


def compare(base: dict, other: dict) -> dict:
    """Paired comparison of two results on the same problems: accuracies, fixed/broken, exact McNemar p."""
    a = {r["id"]: r["correct"] for r in base["records"]}
    b = {r["id"]: r["correct"] for r in other["records"]}
    if set(a) != set(b):
        raise LRSError("cannot compare results on different problem sets")
    ids = sorted(a)
    return paired_comparison([a[i] for i in ids], [b[i] for i in ids])


def summary_line(summary: dict) -> str:
    """One line a user reads at the end of a run."""
    lo, hi = summary["ci95"]
    line = (
        f"{summary['method']}: accuracy {summary['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}, n={summary['n']}), "
        f"{summary['mean_tokens']:.0f} tokens/problem, {summary['tokens_per_s']:.1f} tok/s, "
        f"{summary['wall_time_s']:.0f} s"
    )
    if "steering" in summary:
        line += f", steer rate {summary['steering'].get('steer_rate', 0):.1%}"
    return line

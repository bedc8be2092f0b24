"""Run one method on one split and write what the protocol asks for: per-problem JSONL + a summary JSON.

A method is a prompt style (``base``, ``cot``, ``fewshot``) optionally combined with a steerer (any object
with ``context(batch, indices, tracker)`` returning a context manager, and ``stats()`` returning a dict);
steering methods use the ``base`` prompt so comparisons against base isolate the steering.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lrs.artifacts import atomic_write_json, atomic_write_text
from lrs.environment import git_revision, versions
from lrs.errors import LRSError
from lrs.generation import generate
from lrs.grading import grade
from lrs.models import model_fingerprint, model_name
from lrs.runs import cache_key
from lrs.stats import paired_comparison, proportion_ci
from lrs.tasks import Problem, build_prompts

PROMPT_METHODS = ("base", "cot", "fewshot")


def _ids_hash(problems: Sequence[Problem]) -> str:
    return cache_key({"ids": [p.id for p in problems], "answers": [p.answer for p in problems]})


def result_key(
    model,
    problems: Sequence[Problem],
    *,
    method: str,
    steerer=None,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    shots: int = 4,
    fewshot_pool: Sequence[Problem] | None = None,
) -> tuple[str, dict]:
    """The cache key of a result and the parts it hashes (recorded in the summary)."""
    style = method if method in PROMPT_METHODS else "base"
    parts = dict(
        method=method,
        prompt_style=style,
        problems=_ids_hash(problems),
        model=model_fingerprint(model),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        steerer=steerer.fingerprint() if steerer is not None else None,
    )
    if style == "fewshot":
        parts.update(shots=shots, pool=_ids_hash(fewshot_pool or []))
    return cache_key(parts), parts


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    method: str = "base",
    steerer=None,
    out_dir: str | Path | None = None,
    name: str | None = None,
    reuse: bool = True,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    seed: int = 0,
    shots: int = 4,
    fewshot_pool: Sequence[Problem] | None = None,
    extra: dict | None = None,
    progress: bool = True,
) -> dict:
    """Generate greedily for ``problems``, grade, and return (and optionally write) records and a summary.

    With ``out_dir``, the result is written as ``<name>.jsonl`` + ``<name>.summary.json`` (``name`` defaults
    to the method). With ``reuse``, an existing result whose cache key equals this run's (same method
    config, problems, model, artefacts, budget, batch size, seed) is returned without generating.
    """
    if not problems:
        raise LRSError("no problems to evaluate (empty split or --limit 0)")
    name = name or method
    style = method if method in PROMPT_METHODS else "base"
    if style == "fewshot" and not fewshot_pool:
        raise LRSError("few-shot prompting needs a pool of train problems to draw examples from")
    key, parts = result_key(
        model,
        problems,
        method=method,
        steerer=steerer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        shots=shots,
        fewshot_pool=fewshot_pool,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise LRSError(f"--out {out_dir} is a file, not a directory")
        if reuse:
            old = load_result(out_dir, name)
            if old is not None and old["summary"].get("cache_key") == key:
                old["cached"] = True
                return old
    prompts = build_prompts(tokenizer, problems, style=style, shots=shots, pool=fewshot_pool, seed=seed)
    if steerer is not None:
        steerer.reset()
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
        desc=f"eval {name}",
    )
    wall = time.perf_counter() - t0
    grades = grade([g.text for g in gens], [p.answer for p in problems])
    steer_rows = steerer.row_stats() if steerer is not None else {}
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
    lo, hi = proportion_ci(sum(correct), len(records), method="wilson")
    summary = dict(
        method=method,
        name=name,
        n=len(records),
        accuracy=sum(correct) / len(records),
        ci95=[lo, hi],
        ci_method="wilson",
        mean_tokens=n_tok / len(records),
        truncated=sum(r["truncated"] for r in records),
        wall_time_s=wall,
        tokens_per_s=n_tok / wall if wall > 0 else None,
        model=model_name(model),
        device=str(next(model.parameters()).device),
        dtype=parts["dtype"],
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_style=style,
        greedy=True,
        threads=torch.get_num_threads(),
        cache_key=key,
        key_parts=parts,
        versions=versions(),
        git=git_revision(),
        **(extra or {}),
    )
    if steerer is not None:
        summary["steering"] = steerer.stats()
    result = {"summary": summary, "records": records}
    if out_dir is not None:
        write_result(result, out_dir, name)
    return result


def write_result(result: dict, out_dir: Path, name: str) -> None:
    """Write ``name.jsonl`` (one record per problem) and ``name.summary.json`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in result["records"]))
    atomic_write_json(out_dir / f"{name}.summary.json", result["summary"])


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

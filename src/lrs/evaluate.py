"""Run one method on one split and write what the protocol asks for: per-problem JSONL + a summary JSON.

A method is a prompt style (``base``, ``cot``, ``fewshot``) optionally combined with a steerer (any object
with ``context(batch, indices, tracker)`` returning a context manager, and ``stats()`` returning a dict);
steering methods use the ``base`` prompt so comparisons against base isolate the steering.
"""

from __future__ import annotations

import json
import os
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

    With ``out_dir``, a run also resumes: each graded batch is appended (fsync'd) to ``<name>.partial.jsonl``
    under this run's cache key; a rerun with the same key (and ``reuse``) generates only the missing batches,
    and the final files are those of an uninterrupted run (records in problem order; steering totals
    recomputed from all records). Only ``wall_time_s``/``tokens_per_s`` are this process's, and
    ``resumed_from`` counts the problems loaded. The partial file is deleted once the result is written.
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
    partial: Path | None = None
    done: dict[int, dict] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise LRSError(f"--out {out_dir} is a file, not a directory")
        if reuse:
            old = load_result(out_dir, name)
            if old is not None and old["summary"].get("cache_key") == key:
                old["cached"] = True
                return old
        partial = partial_path(out_dir, name)
        # without reuse (--force) an unfinished run is not resumed either: start over
        done = load_partial(partial, key, problems) if reuse else {}
        _start_partial(partial, key, name, len(problems), done)
    resumed_from = len(done)
    prompts = build_prompts(tokenizer, problems, style=style, shots=shots, pool=fewshot_pool, seed=seed)
    if steerer is not None:
        steerer.reset()
    ctx = steerer.context if steerer is not None else None
    records: dict[int, dict] = dict(done)
    new_tokens = 0

    def finish_batch(idx: list[int], gens: list) -> None:
        nonlocal new_tokens
        grades = grade([g.text for g in gens], [problems[i].answer for i in idx])
        steer_rows = steerer.row_stats() if steerer is not None else {}
        batch = {}
        for i, g, gr in zip(idx, gens, grades, strict=True):
            p = problems[i]
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
            batch[i] = rec
            new_tokens += g.n_tokens
        if partial is not None:
            _append_partial(partial, batch)
        records.update(batch)

    t0 = time.perf_counter()
    generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        context=ctx,
        progress=progress,
        desc=f"eval {name}",
        on_batch=finish_batch,
        skip=set(done),
    )
    wall = time.perf_counter() - t0
    recs = [records[i] for i in range(len(problems))]
    correct = [r["correct"] for r in recs]
    n_tok = sum(r["tokens"] for r in recs)
    lo, hi = proportion_ci(sum(correct), len(recs), method="wilson")
    summary = dict(
        method=method,
        name=name,
        n=len(recs),
        accuracy=sum(correct) / len(recs),
        ci95=[lo, hi],
        ci_method="wilson",
        mean_tokens=n_tok / len(recs),
        truncated=sum(r["truncated"] for r in recs),
        wall_time_s=wall,  # this process only when resumed
        tokens_per_s=new_tokens / wall if wall > 0 else None,  # tokens generated by this process
        resumed_from=resumed_from,
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
        summary["steering"] = {**steerer.stats(), **steering_totals(recs)}
    result = {"summary": summary, "records": recs}
    if out_dir is not None:
        write_result(result, out_dir, name)
        if partial is not None:
            partial.unlink(missing_ok=True)
    return result


def steering_totals(records: Sequence[dict]) -> dict:
    """Steering totals recomputed from the per-record fields, so a resumed run covers every problem.

    ``steer_rate``, ``steered_tokens`` and ``generated_steps`` from ``steer_steps``/``steers``; ``nan_skipped``
    and ``mean_dh_norm`` (steer-weighted mean of ``mean_dh``) only when the records carry those fields.
    """
    rows = [r for r in records if "steer_steps" in r]
    if not rows:
        return {}
    steps = sum(r["steer_steps"] for r in rows)
    steers = sum(r.get("steers", 0) for r in rows)
    out = dict(steer_rate=steers / steps if steps else 0.0, steered_tokens=steers, generated_steps=steps)
    if any("nan_skipped" in r for r in rows):
        out["nan_skipped"] = sum(r.get("nan_skipped", 0) for r in rows)
    if any("mean_dh" in r for r in rows):
        dh = sum(r.get("mean_dh", 0.0) * r.get("steers", 0) for r in rows)
        out["mean_dh_norm"] = dh / steers if steers else 0.0
    return out


# ---- the partial file of an unfinished run -------------------------------------------------------------
# ``<name>.partial.jsonl``: a header line {"format", "cache_key", "name", "n"} then one line per finished
# problem {"i": problem index, "record": {...}}, appended per graded batch with an fsync. A run killed at any
# moment leaves at most a truncated last line, which is ignored (its batch is generated again).

PARTIAL_FORMAT = "lrs.eval-partial/1"


def partial_path(out_dir: str | Path, name: str) -> Path:
    """Where an unfinished run of ``name`` keeps its finished problems."""
    return Path(out_dir) / f"{name}.partial.jsonl"


def load_partial(path: Path, key: str, problems: Sequence[Problem]) -> dict[int, dict]:
    """Records of a partial file written by a run with cache key ``key`` (by problem index), else {}.

    Reading stops at the first line that is not a whole, valid record (a kill mid-write); a file of another
    run (other cache key, or unreadable header) gives {}.
    """
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (FileNotFoundError, UnicodeDecodeError):
        return {}
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        return {}
    if not isinstance(head, dict) or head.get("format") != PARTIAL_FORMAT or head.get("cache_key") != key:
        return {}
    done: dict[int, dict] = {}
    # a line counts only if the newline after it was written too
    for line in lines[1:-1]:
        try:
            row = json.loads(line)
            i, rec = row["i"], row["record"]
        except (json.JSONDecodeError, TypeError, KeyError):
            break
        if not (isinstance(i, int) and 0 <= i < len(problems) and isinstance(rec, dict)):
            break
        if rec.get("id") != problems[i].id:
            break
        done[i] = rec
    return done


def _partial_line(i: int, rec: dict) -> str:
    return json.dumps({"i": i, "record": rec}) + "\n"


def _start_partial(path: Path, key: str, name: str, n: int, done: dict[int, dict]) -> None:
    """(Re)write the partial file: header + the records kept (drops a truncated tail or another run's file)."""
    head = json.dumps(dict(format=PARTIAL_FORMAT, cache_key=key, name=name, n=n)) + "\n"
    atomic_write_text(path, head + "".join(_partial_line(i, r) for i, r in sorted(done.items())))


def _append_partial(path: Path, batch: dict[int, dict]) -> None:
    """Append one graded batch to the partial file (one write, then fsync)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_partial_line(i, r) for i, r in batch.items()))
        f.flush()
        os.fsync(f.fileno())


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
    try:
        return {
            "summary": json.loads(s.read_text()),
            "records": [json.loads(x) for x in j.read_text().splitlines() if x.strip()],
        }
    except ValueError as e:
        raise LRSError(f"corrupt result {j} or {s.name} ({e}); rerun `lrs eval --force`") from None


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

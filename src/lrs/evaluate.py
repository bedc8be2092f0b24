"""Run one method on one split and write what the protocol asks for: per-problem JSONL + a summary JSON.

A method is a prompt style (``base``, ``cot``, ``fewshot``) optionally combined with a steerer (any object
with ``context(batch, indices, tracker)`` returning a context manager, and ``stats()`` returning a dict);
steering methods use the ``base`` prompt so comparisons against base isolate the steering.

Logging (:class:`EvalLog`, ``lrs eval --log-tokens`` / ``--shadow``) adds per-token fields to each record:
``token_ids``, ``finish_reason``, ``p_top1``/``p_top2``, and for latent steering (or a shadow scorer on an
unsteered run) ``events`` with every token's reward and each steering event's details. It only reads: the
generated tokens are the same with and without it, and without it the decode loop runs the same code.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lrs.artifacts import atomic_save_tensors, atomic_write_json, atomic_write_text
from lrs.distributed import Share, barrier
from lrs.environment import git_revision, versions
from lrs.errors import LRSError
from lrs.generation import batches_of, generate
from lrs.grading import grade, last_boxed
from lrs.models import model_dtype, model_fingerprint, model_name
from lrs.runs import cache_key
from lrs.stats import paired_comparison, proportion_ci
from lrs.tasks import Problem, build_prompts

if TYPE_CHECKING:
    from lrs.steering.base import Steerer

PROMPT_METHODS = ("base", "cot", "fewshot")

#: encoders up to this width log an event's latents inline in the JSONL; wider ones in ``<name>.latents.safetensors``
INLINE_LATENTS = 64


@dataclass(frozen=True)
class EvalLog:
    """What an evaluation logs beyond the default record (part of the cache key only when it adds something).

    ``tokens``: per record ``token_ids`` (generated only), ``finish_reason`` (eos / stop / length), and per
    generated token ``p_top1``/``p_top2`` (the two largest next-token probabilities of the raw logits).
    ``shadow``: for an unsteered run, a never-firing latent scorer (:meth:`LatentRewardSteerer.shadow`) whose
    per-token ``events`` (r, c) go into the records: the base side of a base-vs-LRS comparison.
    A latent steerer's own ``log_events`` adds its ``events`` whatever this says.
    """

    tokens: bool = False
    shadow: Steerer | None = None


def log_parts(log: EvalLog | None, steerer=None) -> dict:
    """The logging that changes a result's file: {} for none, else what is logged (shadow by fingerprint)."""
    parts: dict = {}
    if log is not None and log.tokens:
        parts["tokens"] = True
    if getattr(steerer, "log_events", False):
        parts["events"] = True
    if log is not None and log.shadow is not None:
        parts["shadow"] = log.shadow.fingerprint()
    return parts


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
    log: EvalLog | None = None,
) -> tuple[str, dict]:
    """The cache key of a result and the parts it hashes (recorded in the summary).

    Logging that adds fields to the records is a part (``log``) only when there is some, so results
    without logging keep the keys they always had, and a result without logs never answers a run that asks
    for them."""
    style = method if method in PROMPT_METHODS else "base"
    parts = dict(
        method=method,
        prompt_style=style,
        problems=_ids_hash(problems),
        model=model_fingerprint(model),
        dtype=model_dtype(model),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        steerer=steerer.fingerprint() if steerer is not None else None,
    )
    if style == "fewshot":
        parts.update(shots=shots, pool=_ids_hash(fewshot_pool or []))
    logged = log_parts(log, steerer)
    if logged:
        parts["log"] = logged
    return cache_key(parts), parts


def _unlogged_key(parts: dict) -> str:
    """The key the same result would have without any logging."""
    return cache_key({k: v for k, v in parts.items() if k != "log"})


def _reusable(summary: dict, key: str, parts: dict) -> bool:
    """An existing result answers this run: same key, or the same result logged with at least what is asked."""
    if summary.get("cache_key") == key:
        return True
    have = summary.get("key_parts") or {}
    if "grown_from" in have and _without(have, "grown_from") == parts:  # a grown result answers its run
        return True
    if summary.get("unlogged_key") != _unlogged_key(parts):
        return False
    logged = have.get("log") or {}
    return all(logged.get(k) == v for k, v in (parts.get("log") or {}).items())


# ---- growing a finished result to more problems ---------------------------------------------------------
# ``lrs eval --limit 600`` after a finished ``--limit 300`` run with the same settings and output folder
# generates only the 300 new problems (as their own run, ``<name>.grow``: resumable, data-parallel like any
# run) and writes the 600-problem result. Its records for the first 300 are the earlier run's, so it is not
# bit-for-bit what one 600-problem run would give (batches are formed from the prompts a run holds, and bf16
# sums depend on the batch), and its key says so: ``key_parts["grown_from"]`` is the earlier result's key.

GROW_SUFFIX = ".grow"


def _without(parts: dict, *names: str) -> dict:
    return {k: v for k, v in parts.items() if k not in names}


def _grows(old: dict, parts: dict, problems, tokenizer, style, shots, pool, seed) -> bool:
    """A finished result can be grown into this run: the same settings (every key part but the problems),
    its problems a strict subset of this run's with the same answers, and its records' prompts the ones this
    run would build (a changed prompt template must not be mixed in)."""
    have = old["summary"].get("key_parts") or {}
    if _without(have, "problems", "grown_from") != _without(parts, "problems"):
        return False
    by_id = {p.id: p for p in problems}
    recs = old["records"]
    ids = [r.get("id") for r in recs]
    if not recs or len(set(ids)) != len(ids) or len(ids) >= len(problems) or any(i not in by_id for i in ids):
        return False
    mine = [by_id[i] for i in ids]
    prompts = build_prompts(tokenizer, mine, style=style, shots=shots, pool=pool, seed=seed)
    return all(
        r.get("gold") == p.answer and r.get("prompt") == q
        for r, p, q in zip(recs, mine, prompts, strict=True)
    )


def _grown_result(old: dict, rest: dict, problems, out_dir: Path, name: str, parts: dict, sh: Share) -> dict:
    """The earlier result and the run on the new problems as one result over ``problems`` (in their order):
    summary fields recomputed from all records, steering totals too; time, speed and counters are the new
    run's. Written under ``name``; the new run's own files are removed after."""
    if not sh.main:
        barrier(sh)
        return _read_back(out_dir, name)
    by_id = {r["id"]: r for r in old["records"]}
    wide = load_latents(out_dir, name)
    kept = {pid: z for pid, z in wide.items() if pid in by_id}
    here = latents_path(Path("."), name).name
    for r in rest["records"]:
        by_id[r["id"]] = {**r, "latents": here} if "latents" in r else r
    kept.update(rest.get("latents") or {})
    recs = [by_id[p.id] for p in problems]
    grown_parts = {**parts, "grown_from": old["summary"]["cache_key"]}
    summary = {
        **rest["summary"],
        "name": name,
        **outcome_fields(recs),
        "grown_from": {"n": len(old["records"]), "cache_key": old["summary"]["cache_key"]},
        "cache_key": cache_key(grown_parts),
        "unlogged_key": _unlogged_key(grown_parts),
        "key_parts": grown_parts,
    }
    if "steering" in summary:
        summary["steering"] = {**summary["steering"], **steering_totals(recs)}
    result = {"summary": summary, "records": recs}
    if kept:
        result["latents"] = {p.id: kept[p.id] for p in problems if p.id in kept}
    write_result(result, out_dir, name)
    for f in (out_dir / f"{name}{GROW_SUFFIX}.jsonl", out_dir / f"{name}{GROW_SUFFIX}.summary.json"):
        f.unlink(missing_ok=True)
    latents_path(out_dir, name + GROW_SUFFIX).unlink(missing_ok=True)
    barrier(sh)
    return result


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
    log: EvalLog | None = None,
    ranks: Share | None = None,
) -> dict:
    """Generate greedily for ``problems``, grade, and return (and optionally write) records and a summary.

    ``log`` (default: none) adds per-token fields to the
    records (see :class:`EvalLog`). A wide encoder's event latents are returned under ``result["latents"]``
    ({problem id: {"z_pre", "z_post"}}, one row per steering event) and written to ``<name>.latents.safetensors``.

    With ``out_dir``, the result is written as ``<name>.jsonl`` + ``<name>.summary.json`` (``name`` defaults
    to the method). With ``reuse``, an existing result whose cache key equals this run's (same method
    config, problems, model, artefacts, budget, batch size, seed) is returned without generating.

    With ``out_dir``, a run also resumes: each graded batch is appended (fsync'd) to ``<name>.partial.jsonl``
    under this run's cache key; a rerun with the same key (and ``reuse``) generates only the missing batches,
    and the final files are those of an uninterrupted run (records in problem order; steering totals
    recomputed from all records). Only ``wall_time_s``/``tokens_per_s`` are this process's, and
    ``resumed_from`` counts the problems loaded. The partial file is deleted once the result is written.

    Data-parallel (``ranks``: this process's :class:`~lrs.distributed.Share`, needs ``out_dir``): process R
    generates only the batches of a one-process run that it owns (round robin), appends them to its own
    ``<name>.partial.rank{R}.jsonl`` (resumable like the one-process file) and, before the first barrier,
    writes its run totals and ``steerer.stats()`` next to it (``.run.json``). Process 0 then builds the result
    one process would build from all of them (records in problem order; steering totals from the records,
    other integer ``stats()`` values summed, the rest its own), writes it, deletes the partial files and adds
    ``processes: N`` to the summary; after a second barrier the other processes read that result back.
    ``resumed_from`` and the tokens generated are summed over the processes, ``wall_time_s`` is the slowest
    process's generation time, and ``threads`` and ``device`` are process 0's.
    """
    if not problems:
        raise LRSError("no problems to evaluate (empty split or --limit 0)")
    sh = ranks or Share()
    if sh.world > 1 and out_dir is None:
        raise LRSError(
            "a data-parallel evaluation needs an output directory: its processes meet in files there"
        )
    name = name or method
    style = method if method in PROMPT_METHODS else "base"
    if style == "fewshot" and not fewshot_pool:
        raise LRSError("few-shot prompting needs a pool of train problems to draw examples from")
    shadow = log.shadow if log is not None else None
    if shadow is not None and steerer is not None:
        raise LRSError(
            "shadow scoring is for unsteered runs (base, cot, fewshot); a latent steering method logs its own "
            "scores (--log-tokens)"
        )
    tokens = bool(log is not None and log.tokens)
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
        log=log,
    )
    partial: Path | None = None
    done: dict[int, dict] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise LRSError(f"--out {out_dir} is a file, not a directory")
        if reuse:
            old = load_result(out_dir, name)
            if old is not None and _reusable(old["summary"], key, parts):
                old["cached"] = True
                return old
            if old is not None and _grows(old, parts, problems, tokenizer, style, shots, fewshot_pool, seed):
                have = {r["id"] for r in old["records"]}
                rest = evaluate(
                    model,
                    tokenizer,
                    [p for p in problems if p.id not in have],
                    method=method,
                    steerer=steerer,
                    out_dir=out_dir,
                    name=name + GROW_SUFFIX,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    seed=seed,
                    shots=shots,
                    fewshot_pool=fewshot_pool,
                    extra=extra,
                    progress=progress,
                    log=log,
                    ranks=ranks,
                )
                return _grown_result(old, rest, problems, out_dir, name, parts, sh)
        partial = partial_path(out_dir, name, sh.rank if sh.world > 1 else None)
        # without reuse (--force) an unfinished run is not resumed either: start over
        done = load_partial(partial, key, problems) if reuse else {}
        wide = _load_partial_latents(partial, done)
        _start_partial(partial, key, name, len(problems), done)
    else:
        wide = {}
    resumed_from = len(done)
    prompts = build_prompts(tokenizer, problems, style=style, shots=shots, pool=fewshot_pool, seed=seed)
    skip = set(done)
    if sh.world > 1:  # the other processes' batches (batches and seeds are those of a one-process run)
        skip.update(i for b, idx in enumerate(batches_of(prompts, batch_size)) if not sh.owns(b) for i in idx)
    hooks = steerer if steerer is not None else shadow
    if hooks is not None:
        hooks.reset()
    ctx = hooks.context if hooks is not None else None
    # any object with context() and stats() may steer; only Steerer subclasses log events
    take_events = getattr(hooks, "take_events", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    records: dict[int, dict] = dict(done)
    new_tokens = 0

    def finish_batch(idx: list[int], gens: list) -> None:
        nonlocal new_tokens
        grades = grade([g.text for g in gens], [problems[i].answer for i in idx])
        steer_rows = steerer.row_stats() if steerer is not None else {}
        batch, batch_wide = {}, {}
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
            if tokens:
                rec.update(_token_fields(g, eos))
            events = take_events(i) if take_events is not None else None
            if events is not None:
                rec["events"], z = _split_latents(events)
                if z is not None:
                    rec["latents"] = latents_path(Path("."), name).name
                    batch_wide[p.id] = z
            batch[i] = rec
            new_tokens += g.n_tokens
        if partial is not None:
            if batch_wide:  # the tensors first: a record that names them is only kept if they are there
                atomic_save_tensors(
                    _partial_latents_dir(partial) / f"{min(idx)}.safetensors", _flat(batch_wide)
                )
            _append_partial(partial, batch)
        wide.update(batch_wide)
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
        desc=f"eval {name}" if sh.world == 1 else f"eval {name} (process {sh.rank})",
        on_batch=finish_batch,
        skip=skip,
        record_top2=tokens,
    )
    run = dict(wall_time_s=time.perf_counter() - t0, new_tokens=new_tokens, resumed_from=resumed_from)
    stats = steerer.stats() if steerer is not None else {}
    if sh.world > 1:
        assert out_dir is not None and partial is not None
        atomic_write_json(_run_path(partial), {**run, "stats": stats})
        barrier(sh)
        if not sh.main:
            barrier(sh)  # process 0 writes the result
            return _read_back(out_dir, name)
        records, wide, run, stats = _merge_processes(out_dir, name, key, problems, sh.world)
    wall = run["wall_time_s"]
    recs = [records[i] for i in range(len(problems))]
    summary = dict(
        method=method,
        name=name,
        **outcome_fields(recs),
        wall_time_s=wall,  # this launch only when resumed
        tokens_per_s=run["new_tokens"] / wall if wall > 0 else None,  # tokens generated by this launch
        resumed_from=run["resumed_from"],
        **({"processes": sh.world} if sh.world > 1 else {}),
        **model_fields(model),
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_style=style,
        greedy=True,
        threads=torch.get_num_threads(),
        cache_key=key,
        unlogged_key=_unlogged_key(parts),
        key_parts=parts,
        versions=versions(),
        git=git_revision(),
        **(extra or {}),
    )
    if steerer is not None:
        summary["steering"] = {**stats, **steering_totals(recs)}
    if parts.get("log"):
        summary["logging"] = parts["log"]
    result = {"summary": summary, "records": recs}
    if wide:
        result["latents"] = {p.id: wide[p.id] for p in problems if p.id in wide}
    if out_dir is not None:
        write_result(result, out_dir, name)
        _remove_partials(out_dir, name)
    barrier(sh)  # the others read the result back now
    return result


# ---- logged fields ---------------------------------------------------------------------------------------


def outcome_fields(recs: Sequence[dict]) -> dict:
    """What every result's summary says of its records: n, accuracy with its Wilson 95 % CI, mean tokens,
    truncated and ``\\boxed{}`` counts (format, apart from reasoning)."""
    k = sum(r["correct"] for r in recs)
    lo, hi = proportion_ci(k, len(recs), method="wilson")
    return dict(
        n=len(recs),
        accuracy=k / len(recs),
        ci95=[lo, hi],
        ci_method="wilson",
        mean_tokens=sum(r["tokens"] for r in recs) / len(recs),
        truncated=sum(r["truncated"] for r in recs),
        boxed=sum(last_boxed(r["output"]) is not None for r in recs),
    )


def model_fields(model) -> dict:
    """The model a result came from: name, device and dtype."""
    return dict(
        model=model_name(model),
        device=str(next(model.parameters()).device),
        dtype=model_dtype(model),
    )


def finish_reason(g, eos_id: int | None) -> str:
    """``eos`` (ended with the tokenizer's end-of-sequence token), ``stop`` (another stop id of the model's
    generation config), or ``length`` (the token budget ran out)."""
    if not g.finished:
        return "length"
    return "eos" if eos_id is not None and g.token_ids and g.token_ids[-1] == eos_id else "stop"


def _token_fields(g, eos_id: int | None) -> dict:
    """The ``--log-tokens`` fields of one generation."""
    return dict(
        token_ids=list(g.token_ids),
        finish_reason=finish_reason(g, eos_id),
        p_top1=[round(x, 5) for x in g.conf],
        p_top2=[round(x, 5) for x in g.top2],
    )


def _split_latents(events: list[dict]) -> tuple[list[dict], dict[str, torch.Tensor] | None]:
    """Events ready for JSON: latents inline (rounded) for narrow encoders, else taken out as [E, n] tensors."""
    steered = [e for e in events if "z_pre" in e]
    if not steered:
        return events, None
    n = int(torch.as_tensor(steered[0]["z_pre"]).numel())
    if n <= INLINE_LATENTS:
        out = []
        for e in events:
            if "z_pre" in e:
                e = {
                    **e,
                    "z_pre": [round(float(v), 5) for v in torch.as_tensor(e["z_pre"]).tolist()],
                    "z_post": [round(float(v), 5) for v in torch.as_tensor(e["z_post"]).tolist()],
                }
            out.append(e)
        return out, None
    z = {
        k: torch.stack([torch.as_tensor(e[k], dtype=torch.float32) for e in steered])
        for k in ("z_pre", "z_post")
    }
    return [{k: v for k, v in e.items() if k not in ("z_pre", "z_post")} for e in events], z


def latents_path(out_dir: str | Path, name: str) -> Path:
    """The sidecar of a result's wide event latents: ``<name>.latents.safetensors`` next to the JSONL."""
    return Path(out_dir) / f"{name}.latents.safetensors"


def _flat(wide: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{id: {"z_pre", "z_post"}}`` as safetensors keys ``"<id>/z_pre"``, ``"<id>/z_post"``."""
    return {f"{pid}/{k}": t for pid, z in wide.items() for k, t in z.items()}


def load_latents(out_dir: str | Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """A result's wide event latents: {problem id: {"z_pre": [E, n], "z_post": [E, n]}} in event order
    (the records' steered events, in token order); {} when the result keeps them inline or has none."""
    from safetensors.torch import load_file

    path = latents_path(out_dir, name)
    if not path.exists():
        return {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in load_file(str(path)).items():
        pid, _, part = k.rpartition("/")
        out.setdefault(pid, {})[part] = t
    return out


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


def partial_path(out_dir: str | Path, name: str, rank: int | None = None) -> Path:
    """Where an unfinished run of ``name`` keeps its finished problems (``rank``: process R of a data-parallel
    run, which keeps its own file, ``<name>.partial.rank{R}.jsonl``)."""
    return Path(out_dir) / (f"{name}.partial.jsonl" if rank is None else f"{name}.partial.rank{rank}.jsonl")


def _run_path(path: Path) -> Path:
    """Where process R of a data-parallel run leaves its run totals and steerer stats for process 0."""
    return path.with_name(path.name.removesuffix(".jsonl") + ".run.json")


def _merge_processes(
    out_dir: Path, name: str, key: str, problems: Sequence[Problem], world: int
) -> tuple[dict[int, dict], dict, dict, dict]:
    """Process 0 of a data-parallel run: every process's records and wide latents, the run totals (tokens and
    resumed problems summed, the slowest wall time) and the steerer stats (integer values, i.e. counters,
    summed; the rest process 0's)."""
    records: dict[int, dict] = {}
    wide: dict = {}
    runs = []
    for r in range(world):
        path = partial_path(out_dir, name, r)
        recs = load_partial(path, key, problems)
        wide.update(_load_partial_latents(path, recs))
        records.update(recs)
        try:
            runs.append(json.loads(_run_path(path).read_text()))
        except (OSError, ValueError):
            raise LRSError(
                f"process {r} left no run totals in {_run_path(path)}; run again to resume"
            ) from None
    if len(records) < len(problems):
        raise LRSError(
            f"the processes' partial files in {out_dir} miss {len(problems) - len(records)} of {len(problems)} "
            "problems; run again to resume"
        )
    run = dict(
        wall_time_s=max(x["wall_time_s"] for x in runs),
        new_tokens=sum(x["new_tokens"] for x in runs),
        resumed_from=sum(x["resumed_from"] for x in runs),
    )
    stats = dict(runs[0]["stats"])
    for k, v in stats.items():
        if isinstance(v, int) and not isinstance(v, bool):
            stats[k] = sum(x["stats"].get(k, 0) for x in runs)
    return records, wide, run, stats


def _read_back(out_dir: Path, name: str) -> dict:
    """The result process 0 of a data-parallel run wrote, as :func:`evaluate` returns it."""
    res = load_result(out_dir, name)
    if res is None:
        raise LRSError(f"process 0 wrote no result {name} in {out_dir}")
    wide = load_latents(out_dir, name)
    if wide:
        res["latents"] = wide
    return res


def _remove_partials(out_dir: Path, name: str) -> None:
    """Delete every partial file of ``name`` once its result is written: the one-process file, each process's
    file, their latents folders and run totals (also those left by an earlier run with other processes)."""
    single = partial_path(out_dir, name)
    for p in [single, _partial_latents_dir(single), *out_dir.glob(f"{glob.escape(name)}.partial.rank*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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


def _partial_latents_dir(path: Path) -> Path:
    """Where an unfinished run keeps the wide latents of its finished batches (one safetensors per batch)."""
    return path.with_name(path.name + ".latents")


def _load_partial_latents(path: Path, done: dict[int, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """The wide latents of the resumed records; a record that names latents it does not find is dropped
    from ``done`` (its batch is generated again)."""
    from safetensors.torch import load_file

    folder = _partial_latents_dir(path)
    wide: dict[str, dict[str, torch.Tensor]] = {}
    if done and folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            try:
                tensors = load_file(str(f))
            except Exception:  # a file cut by a kill: its batch is redone
                continue
            for k, t in tensors.items():
                pid, _, part = k.rpartition("/")
                wide.setdefault(pid, {})[part] = t
    for i in [i for i, r in done.items() if "latents" in r]:
        z = wide.get(done[i]["id"], {})
        if not ("z_pre" in z and "z_post" in z):
            del done[i]
    if not done:
        shutil.rmtree(folder, ignore_errors=True)
    ids = {r["id"] for r in done.values()}
    return {pid: z for pid, z in wide.items() if pid in ids}


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
    """Write ``name.jsonl`` (one record per problem) and ``name.summary.json`` atomically, and the wide event
    latents (``result["latents"]``) to ``name.latents.safetensors`` first (a stale one is removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    side = latents_path(out_dir, name)
    if result.get("latents"):
        atomic_save_tensors(side, _flat(result["latents"]), metadata={"format": "lrs.event-latents/1"})
    else:
        side.unlink(missing_ok=True)
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
    n = summary["n"]
    if "truncated" in summary and "boxed" in summary:  # older summaries have no boxed count
        line += f", truncated {summary['truncated'] / n:.1%}, \\boxed{{}} {summary['boxed'] / n:.1%}"
    if "steering" in summary:
        line += f", steer rate {summary['steering'].get('steer_rate', 0):.1%}"
    if "grown_from" in summary:
        line += (
            f" ({summary['grown_from']['n']} problems from the earlier result, time and speed of the rest)"
        )
    return line

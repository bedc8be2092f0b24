"""Monte-Carlo value labels: how often does a trace's prefix still end correct?

For the ``value`` reward objective, a prefix of t generated tokens is labelled with the fraction of M sampled
continuations (from exactly those t token ids, no re-tokenisation) whose full text grades correct. Those labels
say which *states* of one problem are going wrong, which a trace's final label cannot. The continuations of
many prefixes share one batched ``generate`` call; each row keeps only the tokens its own budget allows
(``max_new_tokens - t``), so a continued trace is never longer than the original could have been.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lrs.errors import LRSError
from lrs.generation import _split_completion, eos_ids
from lrs.grading import grade


@dataclass(frozen=True)
class RolloutJob:
    """One sampled continuation: trace ``trace`` continued after its first ``t`` generated tokens."""

    trace: int
    t: int
    j: int


def prefix_positions(length: int, every: int, max_new_tokens: int) -> list[int]:
    """Prefix lengths that get value labels: every ``every`` tokens, strictly inside the trace and the budget."""
    if every < 1:
        raise LRSError(f"--rollout-every must be >= 1, got {every}")
    return list(range(every, min(length, max_new_tokens), every))


def rollout_values(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[Sequence[int]],
    golds: Sequence[str],
    *,
    m: int,
    every: int,
    max_new_tokens: int,
    temperature: float = 0.7,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[list[list[float]]]:
    """Per trace, ``[[t, value], ...]``: the fraction of ``m`` continuations of the first ``t`` tokens that end
    correct (graded like the traces themselves). Deterministic for a fixed ``seed`` and batch composition."""
    if not (len(prompts) == len(completions) == len(golds)):
        raise LRSError("rollout_values needs one prompt, completion and gold answer per trace")
    if m < 1 or not temperature > 0:
        raise LRSError("value rollouts need --rollouts >= 1 and a sampling temperature > 0")
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = [
        RolloutJob(i, t, j)
        for i, c in enumerate(completions)
        for t in prefix_positions(len(c), every, max_new_tokens)
        for j in range(m)
    ]
    jobs.sort(key=lambda r: (len(prompt_ids[r.trace]) + r.t, r.trace, r.t, r.j))
    correct: dict[tuple[int, int], list[bool]] = {}
    bar = tqdm(total=len(jobs), desc="rollouts", unit="seq", disable=not progress, leave=False)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b : b + batch_size]
        inputs = [prompt_ids[r.trace] + list(completions[r.trace][: r.t]) for r in batch]
        width = max(len(x) for x in inputs)
        ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in inputs], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in inputs], device=model.device)
        budget = max_new_tokens - min(r.t for r in batch)
        torch.manual_seed(seed * 1_000_003 + b)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=True,
                temperature=temperature, top_p=1.0, top_k=0, pad_token_id=pad_id, eos_token_id=stop,
                use_cache=True,
            )  # fmt: skip
        new = out[:, width:].tolist()
        texts = []
        for row, r in enumerate(batch):
            cont, _ = _split_completion(new[row][: max_new_tokens - r.t], set(stop), pad_id)
            texts.append(tokenizer.decode(list(completions[r.trace][: r.t]) + cont, skip_special_tokens=True))
        for r, g in zip(batch, grade(texts, [golds[r.trace] for r in batch]), strict=True):
            correct.setdefault((r.trace, r.t), []).append(bool(g.correct))
        bar.update(len(batch))
    bar.close()
    out_values: list[list[list[float]]] = [[] for _ in completions]
    for (i, t), v in sorted(correct.items()):
        out_values[i].append([t, sum(v) / len(v)])
    return out_values

"""Rewards, advantages and losses as plain functions on tensors (so tests can check them by hand).

- verifier (seed 004): +1 if the last ``\\boxed{}`` of a completion matches the gold answer, else -1.
- LaTRO (seed 003, Eq. 4 + released code): R = log p(y | x + z) with y the gold answer in a fixed
  template; rationales that never stopped get gamma x the batch-mean R; r = R - beta (log p(z|x) - log p0(z|x));
  loss = -mean(A log p(z|x)) - w mean(log p(y|x+z)).
- advantages per group of K: rloo (r - mean of the other K-1), mean (r - group mean), grpo (/ group std).
- KL: k3 per token (Schulman), exp(ref - pol) - (ref - pol) - 1, unbiased and >= 0.
"""

from __future__ import annotations

import torch

from lrs.errors import LRSError
from lrs.grading import MAX_SCAN_CHARS, grade, last_boxed

GRPO_EPS = 1e-4  # as TRL: an all-equal group gets exactly 0, not 0/0


def advantages(rewards: torch.Tensor, kind: str = "rloo") -> torch.Tensor:
    """Advantages of ``rewards`` shaped [groups, K]; an all-equal group gets exactly zero for every kind."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise LRSError(f"advantages need rewards shaped [groups, K >= 2], got {tuple(rewards.shape)}")
    K = rewards.shape[1]
    mean = rewards.mean(1, keepdim=True)
    if kind == "rloo":
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (K - 1)
    if kind == "mean":
        return rewards - mean
    if kind == "grpo":
        return (rewards - mean) / (rewards.std(1, keepdim=True) + GRPO_EPS)
    raise LRSError(f"unknown advantage '{kind}': use rloo, mean or grpo")


def verifier_rewards(
    texts: list[str], golds: list[str], timeout: float = 5.0
) -> tuple[list[float], list[bool]]:
    """(+1 / -1 per completion, correct flags): the last ``\\boxed{}`` checked by :func:`lrs.grading.grade`.

    Only the box counts (no "the answer is" fallback), as in seed 004; a completion without one is wrong.
    """
    boxes = [last_boxed((t or "")[-MAX_SCAN_CHARS:]) for t in texts]
    todo = [i for i, b in enumerate(boxes) if b]
    correct = [False] * len(texts)
    if todo:
        graded = grade(["\\boxed{" + boxes[i] + "}" for i in todo], [golds[i] for i in todo], timeout=timeout)
        for i, g in zip(todo, graded, strict=True):
            correct[i] = g.correct
    return [1.0 if c else -1.0 for c in correct], correct


def k3(pol: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from log-probs of the sampled tokens under both."""
    d = ref - pol
    return torch.exp(d) - d - 1


def policy_gradient_loss(
    logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """-sum_i A_i sum_t log pi(y_it) / n_tokens: token-sum normalised by ALL generated tokens of the step.

    ``logp``, ``mask``: [n, T]; ``adv``: [n]. Dividing by the step's total (not this micro-batch's) makes the
    micro-batches add up to the full-batch loss, and skipping zero-advantage groups leaves it unchanged.
    """
    return -(adv[:, None] * logp * mask).sum() / n_tokens


def latro_rewards(
    logp_y: torch.Tensor,
    logp_z: torch.Tensor,
    ref_logp_z: torch.Tensor,
    finished: torch.Tensor,
    gamma: float,
    beta: float,
) -> torch.Tensor:
    """LaTRO's reward per rationale: R = log p(y|x+z) (gamma x batch mean if unfinished) - beta log-ratio.

    As in the released code, the mean is over the whole batch (every rationale of the step, finished or not).
    """
    R = torch.where(finished, logp_y, gamma * logp_y.mean())
    return R - beta * (logp_z - ref_logp_z)


def latro_loss(
    logp_z: torch.Tensor, logp_y: torch.Tensor, adv: torch.Tensor, n_rollouts: int, answer_weight: float
) -> torch.Tensor:
    """-(sum_i A_i log p(z_i|x) + w sum_i log p(y|x+z_i)) / n_rollouts (per-sequence mean, as the paper)."""
    return -(adv * logp_z + answer_weight * logp_y).sum() / n_rollouts

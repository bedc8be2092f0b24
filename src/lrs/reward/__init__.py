"""Stage 2b: latent reward models, their training, and an honest quality report.

A reward model maps the latents z_1..z_T of a trace (one per generated token) to per-position logits with
sigmoid(logit_t) = P(trace ends correct | z_<=t). Kinds: ``causal`` (sliding-window Transformer, the default:
evaluable incrementally while decoding), ``mlp`` (per token, context-free: what the reference effectively
runs at inference) and ``bidirectional`` (the reference's training setup; its score at t is only honest on
the prefix z_<=t, which is how the report evaluates it).

Quality is reported at ABSOLUTE token positions next to confidence and prompt-only baselines: fractions of a
trace reveal its length, and length predicts the label.
"""

from lrs.reward.model import (
    BASELINES,
    FORMAT,
    KINDS,
    POSITIONS,
    RewardConfig,
    RewardModel,
    load_reward_model,
    reward_hash,
    save_reward_model,
    score_traces,
)
from lrs.reward.quality import format_report, verdict
from lrs.reward.train import split_by_group, train_reward_model

__all__ = [
    "BASELINES",
    "FORMAT",
    "KINDS",
    "POSITIONS",
    "RewardConfig",
    "RewardModel",
    "load_reward_model",
    "reward_hash",
    "save_reward_model",
    "score_traces",
    "format_report",
    "verdict",
    "split_by_group",
    "train_reward_model",
]

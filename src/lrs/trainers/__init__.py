"""RL-trained latent methods: bias-only steering vectors (seed 004) and LaTRO (seed 003) in one small loop.

- :mod:`lrs.trainers.config`: :class:`TrainConfig` (every setting, with CLI help)
- :mod:`lrs.trainers.params`: what is trained (fp32 bias vectors via forward hooks, or PEFT LoRA)
- :mod:`lrs.trainers.objectives`: verifier / LaTRO rewards, advantages, losses (plain tensor functions)
- :mod:`lrs.trainers.rl`: :func:`train` (sample, reward, advantages, micro-batched backward, AdamW; resumable)
- :mod:`lrs.trainers.checkpoint`: resumable checkpoints and the JSONL log
- :mod:`lrs.trainers.analysis`: per-layer norms, logit lens, norm-matched random control, training curves

RL_METHODS.md §4 explains why this is an own loop rather than TRL.
"""

from lrs.trainers.analysis import final_norm, layer_norms, logit_lens, matched_random_vectors, plot_curves
from lrs.trainers.checkpoint import load_checkpoint, read_log, save_checkpoint
from lrs.trainers.config import TrainConfig
from lrs.trainers.objectives import (
    advantages,
    k3,
    latro_loss,
    latro_rewards,
    policy_gradient_loss,
    verifier_rewards,
)
from lrs.trainers.params import BiasVectors, LoraAdapters, make_params
from lrs.trainers.rl import (
    TrainResult,
    answer_stops,
    answer_text,
    split_rationale,
    step_problems,
    token_logprobs,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "BiasVectors",
    "LoraAdapters",
    "make_params",
    "advantages",
    "k3",
    "latro_loss",
    "latro_rewards",
    "policy_gradient_loss",
    "verifier_rewards",
    "token_logprobs",
    "split_rationale",
    "answer_text",
    "answer_stops",
    "step_problems",
    "read_log",
    "save_checkpoint",
    "load_checkpoint",
    "plot_curves",
    "layer_norms",
    "logit_lens",
    "final_norm",
    "matched_random_vectors",
]

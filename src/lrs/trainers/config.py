"""The one configuration of an RL training run (bias vectors or LoRA; verifier or LaTRO objective).

Field ``help`` metadata becomes the CLI's flag help (same convention as :mod:`lrs.config`). Defaults follow
RL_METHODS.md §1.8 / §6 (seed 004 on CPU: B=8 prompts x K=4 samples, T=1, RLOO, lr 1e-3 after 3 % warm-up,
clip 2, no KL) and §2.5 for LaTRO (beta 0.05, gamma 2, answer weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from lrs.config import _at_least, _finite, opt
from lrs.errors import LRSError

PARAMS = ("bias", "lora")
OBJECTIVES = ("verifier", "latro")
ADVANTAGES = ("rloo", "mean", "grpo")
KL_MODES = ("loss", "reward")


@dataclass
class TrainConfig:
    """One on-policy training run: what is trained, against which reward, for how long."""

    param: str = opt(
        "bias", "bias: one fp32 vector per decoder layer (seed 004); lora: PEFT LoRA", choices=PARAMS
    )
    layers: list[int] | None = opt(
        None, "decoder layers to train (negative counts from the end; default: all)", nargs="+"
    )
    objective: str = opt(
        "verifier",
        "verifier: +1/-1 on the last \\boxed{}; latro: log p(gold answer | x + z)",
        choices=OBJECTIVES,
    )
    prompts_per_step: int = opt(8, "problems per step (B); every step takes fresh problems")
    k: int = opt(4, "samples per problem (K >= 2: the group baseline needs two)")
    steps: int = opt(50, "optimiser steps")
    lr: float = opt(1e-3, "AdamW learning rate (constant after the warm-up)")
    warmup: float = opt(0.03, "fraction of the steps with a linear learning-rate warm-up")
    max_new_tokens: int = opt(128, "sampling budget per completion (rationale for latro)")
    temperature: float = opt(1.0, "sampling temperature; log-probs are taken at the same temperature")
    advantage: str = opt(
        "rloo", "rloo: r - mean of the others; mean: r - group mean; grpo: / group std", choices=ADVANTAGES
    )
    kl_coef: float = opt(0.0, "KL weight to the frozen model (0 = off; seed 004 v1: 0.01 in the loss)")
    kl_mode: str = opt(
        "loss", "loss: per-token k3 in the loss; reward: sequence log-ratio in the reward", choices=KL_MODES
    )
    latro_beta: float = opt(0.05, "latro: weight of the sequence log-ratio inside the reward (paper: 0.05)")
    latro_gamma: float = opt(2.0, "latro: unfinished rationales get gamma x the batch-mean reward")
    answer_weight: float = opt(
        1.0, "latro: weight of the answer-likelihood term (paper 1; 0 = released script)"
    )
    answer_template: str = opt(
        "\\boxed{{gold}}",
        "latro: the answer y after a rationale, {gold} = the gold answer; the default is the format lrs prompts "
        "ask for (the paper: 'The answer is {gold}.' with --answer-end)",
    )
    answer_end: bool = opt(False, "latro: end y with the end-of-turn token (the paper's template does)")
    prompt_style: str = opt("base", "prompt style of lrs.tasks.build_prompts", choices=("base", "cot"))
    lora_rank: int = opt(8, "lora: rank r (alpha = r, dropout 0, all linear layers of the chosen blocks)")
    grad_clip: float = opt(2.0, "clip the gradient norm of the trained parameters (0 = off)")
    micro_batch: int = opt(4, "sequences per forward/backward")
    checkpoint_every: int = opt(5, "write a resumable checkpoint every N steps")
    seed: int = opt(0, "training seed: problem order, sampling, LoRA init")
    out: str | None = opt(None, "run directory (checkpoints, log, plots, artefact)")

    def __post_init__(self) -> None:
        for name, choices in (
            ("param", PARAMS),
            ("objective", OBJECTIVES),
            ("advantage", ADVANTAGES),
            ("kl_mode", KL_MODES),
            ("prompt_style", ("base", "cot")),
        ):
            if getattr(self, name) not in choices:
                raise LRSError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        _at_least(self, "prompts_per_step", 1)
        _at_least(self, "k", 2)
        _at_least(self, "steps", 1)
        _at_least(self, "max_new_tokens", 1)
        _at_least(self, "lora_rank", 1)
        _at_least(self, "micro_batch", 1)
        _at_least(self, "checkpoint_every", 1)
        _finite(self, "lr", low=0.0)
        _finite(self, "warmup", low=0.0, high=1.0)
        _finite(self, "kl_coef", low=0.0)
        _finite(self, "latro_beta", low=0.0)
        _finite(self, "latro_gamma")
        _finite(self, "answer_weight", low=0.0)
        _finite(self, "grad_clip", low=0.0)
        _finite(self, "temperature", low=0.0)
        if not self.temperature > 0:
            raise LRSError("--temperature must be > 0: on-policy training samples (T = 1 in both papers)")
        if self.layers is not None and not self.layers:
            raise LRSError("--layers needs at least one layer (or leave it out for all layers)")
        if self.objective == "latro" and "{gold}" not in self.answer_template:
            raise LRSError(f"--answer-template must contain {{gold}}, got {self.answer_template!r}")
        if self.objective == "latro" and self.kl_coef > 0 and self.kl_mode == "reward":
            raise LRSError("latro already puts the KL in the reward: use --latro-beta, not --kl-mode reward")

    @property
    def needs_reference(self) -> bool:
        """Whether a step runs the frozen model (trained parameters switched off) as a KL reference."""
        return self.kl_coef > 0 or (self.objective == "latro" and self.latro_beta > 0)

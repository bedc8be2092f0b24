"""The one list of evaluation methods: what prompt each uses, which steerer, which gate, what tuning picks.

The CLI's ``--method`` choices, ``lrs tune``, ``lrs report`` and ``lrs demo`` all read :data:`METHODS`; a new
method is one line here (plus its steerer class if it needs a new one).
"""

from __future__ import annotations

from dataclasses import dataclass

from lrs.errors import LRSError


@dataclass(frozen=True)
class Method:
    """One evaluation method.

    ``steerer`` is ``None`` (prompting only), ``"latent"`` (:class:`~lrs.steering.latent.LatentRewardSteerer`),
    ``"vector"`` (diffmean, built from the run's traces) ``"file"`` (a saved ``SteeringVectors`` artefact), ``"adapter"`` (a PEFT LoRA folder) or ``"select"`` (no steering: best-of-N by the latent reward); ``gate`` and ``control`` configure the latent
    steerer; ``tuned`` names the settings ``lrs tune`` chooses for it on dev.
    """

    name: str
    description: str
    prompt_style: str = "base"
    steerer: str | None = None
    gate: str = "gated"
    control: str = "reward"
    tuned: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("base", "zero-shot prompt, no steering"),
        Method("cot", "zero-shot prompt + 'Let's think step by step.'", prompt_style="cot"),
        Method("fewshot", "worked examples from the train split before the question", prompt_style="fewshot"),
        Method(
            "lrs", "latent reward steering, gated", steerer="latent", tuned=("k", "alpha", "tau_r", "tau_c")
        ),
        Method(
            "lrs-basic",
            "latent reward steering on every token (no gate)",
            steerer="latent",
            gate="always",
            tuned=("k", "alpha"),
        ),
        Method(
            "random",
            "matched control: LRS's gate, |dz| and |dh|, a random direction in latent space",
            steerer="latent",
            control="random",
            tuned=("k", "alpha", "tau_r", "tau_c"),
        ),
        Method(
            "diffmean", "difference-of-means vector added at every token", steerer="vector", tuned=("alpha",)
        ),
        Method(
            "vectors", "steering vectors from a file (e.g. RL-trained by lrs train-vectors)", steerer="file"
        ),
        Method(
            "lora",
            "a LoRA adapter folder (e.g. RL-trained by lrs train-vectors --param lora)",
            steerer="adapter",
        ),
        Method(
            "bon",
            "best of --n sampled completions, picked by the latent reward (--select; needs --encoder/--reward)",
            steerer="select",
        ),
        Method(
            "vectors-random",
            "control for --method vectors: random directions with the same per-layer norms",
            steerer="file-random",
        ),
    )
}

#: methods ``lrs demo`` evaluates on test, in report order
TEST_METHODS: tuple[str, ...] = ("base", "lrs", "lrs-basic", "random", "diffmean")


def get_method(name: str) -> Method:
    """The registered method ``name`` or a one-line error listing the known ones."""
    if name not in METHODS:
        raise LRSError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]

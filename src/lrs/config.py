"""Typed configurations of every stage. The CLI builds its flags from these dataclasses (each field's ``help``
metadata becomes the flag's help text), and library users build them directly or from a dict/YAML with
:func:`from_dict`. Stage functions in :mod:`lrs.stages` take these, never argparse objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lrs.errors import LRSError

#: best-of-N selectors (``lrs.selection`` implements them; ``EvalConfig.select`` offers them)
SELECTORS = ("reward_end", "reward_mean", "confidence", "majority", "random")

T = TypeVar("T")


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text (the CLI's ``--help``)."""
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class ModelConfig:
    """Which model to load, on which device, in which dtype."""

    model: str | None = opt(
        None, "packaged name, local folder, .gguf file or hub id (default: packaged 0.5B)"
    )
    device: str = opt("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    dtype: str = opt(
        "auto", "auto (bf16 on GPUs and bf16-native CPUs, else fp32), bfloat16, float16, float32"
    )


@dataclass
class TaskConfig:
    """Which problems: a task, a split and how many."""

    task: str = opt("arith", "arith, gsm8k, math500, ..., jsonl:PATH or hf:REPO[:CONFIG]:SPLIT")
    split: str = opt("test", "train, dev, test, or all (every problem of a file-only task)")
    limit: int | None = opt(None, "use the first N problems of the split")
    split_seed: int = opt(0, "seed of the fixed train/dev/test split (independent of the sampling seed)")
    question_field: str | None = opt(None, "JSONL/hub field holding the question (default: auto)")
    answer_field: str | None = opt(None, "JSONL/hub field holding the gold answer (default: auto)")

    def __post_init__(self) -> None:
        _at_least(self, "limit", 0, optional=True)


@dataclass
class GenConfig:
    """How to generate."""

    max_new_tokens: int = opt(384, "generation budget per problem")
    batch_size: int = opt(16, "prompts per generate() batch")
    seed: int = opt(0, "sampling / training seed (does not change the split)")

    def __post_init__(self) -> None:
        _at_least(self, "max_new_tokens", 1)
        _at_least(self, "batch_size", 1)


@dataclass
class CollectConfig:
    """Stage 1: traces with hidden states."""

    layers: list[int] | None = opt(None, "decoder layer(s) to record (default: the middle one)", nargs="+")
    samples_per_problem: int = opt(1, "sampled traces per problem")
    temperature: float = opt(0.0, "sampling temperature (0 = greedy)")
    out: str | None = opt(None, "trace directory (default <run>/traces)")
    rollouts: int = opt(0, "value labels: sampled continuations per prefix (0: none; for --objective value)")
    rollout_every: int = opt(64, "value labels: a prefix every N generated tokens")
    backend: str = opt(
        "transformers",
        "who generates: transformers (states recorded while decoding) or vllm (vLLM generates, one "
        "teacher-forced transformers forward recovers the states; needs vLLM installed)",
        choices=("transformers", "vllm"),
    )

    def __post_init__(self) -> None:
        _at_least(self, "samples_per_problem", 1)
        _at_least(self, "rollouts", 0)
        _at_least(self, "rollout_every", 1)
        _finite(self, "temperature", low=0.0)
        if self.samples_per_problem > 1 and self.temperature <= 0:
            raise LRSError(
                "--samples-per-problem > 1 needs --temperature > 0 (greedy samples would be identical)"
            )
        if self.backend not in ("transformers", "vllm"):
            raise LRSError(f"--backend {self.backend!r}: choose transformers or vllm")
        if self.backend == "vllm":  # here, so `lrs collect` fails before it loads the model
            from lrs.backends import require_vllm

            require_vllm()


@dataclass
class EncoderConfig:
    """Stage 2a: fit an encoder on collected states."""

    traces: str | None = opt(None, "trace directory (default <run>/traces)")
    layer: int | None = opt(None, "layer (default: the first collected)")
    kind: str = opt("topk", "encoder type", choices=("topk", "identity", "pca"))
    latents: int = opt(10, "latent width n (paper: 10)")
    topk: int = opt(3, "active latents while training the TopK SAE (paper: 3)")
    sparse: bool = opt(False, "keep top-k sparsity at use time (default: dense code)")
    rescale: bool = opt(True, "scale decoded deltas by |h - mu| (--no-rescale: reference behaviour)")
    max_states: int = opt(200_000, "subsample states for fitting")
    out: str | None = opt(None, "encoder path (default <run>/encoder.safetensors)")

    def __post_init__(self) -> None:
        _at_least(self, "latents", 1)
        _at_least(self, "topk", 1)
        _at_least(self, "max_states", 1)
        if self.kind == "topk" and self.topk > self.latents:
            raise LRSError(f"--topk {self.topk} exceeds --latents {self.latents}: a TopK SAE needs k <= n")


@dataclass
class RewardTrainConfig:
    """Stage 2b: train the latent reward model."""

    traces: str | None = opt(None, "trace directory (default <run>/traces)")
    encoder: str | None = opt(None, "encoder artefact (default <run>/encoder.safetensors)")
    kind: str = opt("causal", "reward model type", choices=("causal", "mlp", "bidirectional"))
    objective: str = opt(
        "trajectory",
        "trajectory: each token gets its trace's label; centred: label vs the problem's success rate; "
        "pairwise: right vs wrong traces of one problem (centred/pairwise need --samples-per-problem > 1); "
        "value: P(correct | prefix) from rollout labels (collect --rollouts)",
        choices=("trajectory", "centred", "pairwise", "value"),
    )
    eval_traces: str | None = opt(
        None, "second trace set on other problems: the report is repeated on it, with within-problem AUROC"
    )
    epochs: int | None = opt(None, "maximum epochs (early stopping on the selection problems' AUROC)")
    report_frac: float = opt(0.2, "problems held out for the report only, disjoint from fit and selection")
    drop_truncated: bool = opt(False, "leave traces that hit the token limit out of fitting and selection")
    position: bool = opt(True, "give the model the token index (--no-position: ablation)")
    out: str | None = opt(None, "reward model path (default <run>/reward.safetensors)")

    def __post_init__(self) -> None:
        _at_least(self, "epochs", 1, optional=True)
        _finite(self, "report_frac", low=0.0, high=0.6)


@dataclass
class SteerOverrides:
    """Explicit steering settings; ``None`` keeps the tuned (``--tuned``) or default value."""

    k: int | None = opt(None, "gradient steps per steered token")
    alpha: float | None = opt(None, "latent step size (LRS) or vector scale (diffmean)")
    tau_r: float | None = opt(None, "gate: steer when reward prob < tau_r")
    tau_c: float | None = opt(None, "gate: or when the previous top prob < tau_c")
    tau_r_quantile: float | None = opt(
        None, "gate on a calibrated scale: tau_r = this quantile of r on the reward model's selection traces"
    )
    warmup: int | None = opt(None, "no steering in the first N tokens")
    every: int | None = opt(None, "steer a row at most every N tokens")
    tuned: bool = opt(False, "use the settings `lrs tune` chose on dev for these artefacts")
    encoder: str | None = opt(None, "encoder artefact (default <run>/encoder.safetensors)")
    reward: str | None = opt(None, "reward model artefact (default <run>/reward.safetensors)")
    vectors: str | None = opt(
        None, "steering vectors artefact for --method vectors (e.g. from lrs train-vectors)"
    )
    adapter: str | None = opt(
        None, "PEFT LoRA adapter folder for --method lora (e.g. from lrs train-vectors)"
    )
    log_events: bool = opt(False, "record per-token r, c, steered, |dh| in the JSONL")

    def values(self) -> dict:
        """The explicitly set SteerConfig fields."""
        keys = ("k", "alpha", "tau_r", "tau_c", "tau_r_quantile", "warmup", "every")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def __post_init__(self) -> None:
        _at_least(self, "k", 1, optional=True)
        _at_least(self, "warmup", 0, optional=True)
        _at_least(self, "every", 1, optional=True)
        _finite(self, "alpha", low=0.0, optional=True)
        _finite(self, "tau_r", low=0.0, high=1.0, optional=True)
        _finite(self, "tau_c", low=0.0, high=1.0, optional=True)
        _finite(self, "tau_r_quantile", low=0.0, high=1.0, optional=True)
        if self.tau_r is not None and self.tau_r_quantile is not None:
            raise LRSError("--tau-r and --tau-r-quantile both set the reward gate: give one of them")


@dataclass
class EvalConfig:
    """Evaluate one method on one split."""

    method: str = opt("base", "evaluation method")
    shots: int = opt(4, "examples for --method fewshot (from the train split of --fewshot-task)")
    out: str | None = opt(None, "results directory (default <run>/eval/<task>/<split>)")
    force: bool = opt(False, "re-run even if a result with the same cache key exists")
    log_tokens: bool = opt(
        False,
        "log per record token ids, finish reason and per-token top-1/top-2 probabilities; with a latent "
        "steering method also every token's reward and each steering event (implies --log-events)",
    )
    shadow: bool = opt(
        False,
        "unsteered methods: also score every generated token with the encoder and reward model "
        "(--encoder/--reward, default the run's) exactly as LRS would, without steering (implies --log-tokens)",
    )

    n: int = opt(4, "--method bon: sampled completions per problem")
    temperature: float = opt(0.7, "--method bon: sampling temperature")
    select: str = opt(
        "reward_end",
        "--method bon: how to pick among the samples (reward_end: the reward after the last token; reward_mean; "
        "confidence; majority; random)",
        choices=SELECTORS,
    )

    def __post_init__(self) -> None:
        _at_least(self, "shots", 0)
        _at_least(self, "n", 1)


@dataclass
class TuneConfig:
    """Choose steering settings on the dev split."""

    grid: str = opt(
        "small",
        "size of the grid (quantile: like small, with the reward gate as a quantile of r instead of tau_r; quick: the quick demo's 5 points)",
        choices=("tiny", "quick", "small", "quantile", "full"),
    )
    methods: str = opt(
        "lrs,lrs-basic,random,diffmean", "comma-separated methods to tune, each on its own grid"
    )
    inherit: str = opt(
        "", "methods that take another's choice instead of a grid, e.g. 'random=lrs,lrs-basic=lrs'"
    )

    def method_list(self) -> tuple[str, ...]:
        """``methods`` as a tuple, empty entries dropped."""
        return tuple(m.strip() for m in self.methods.split(",") if m.strip())

    def inherit_map(self) -> dict[str, str]:
        """``inherit`` as ``{method: source}``; one-line error on a malformed entry."""
        out: dict[str, str] = {}
        for item in (s.strip() for s in self.inherit.split(",")):
            if not item:
                continue
            name, eq, src = item.partition("=")
            if not eq or not name.strip() or not src.strip():
                raise LRSError(f"--inherit '{item}': write METHOD=SOURCE, e.g. random=lrs")
            out[name.strip()] = src.strip()
        return out

    def __post_init__(self) -> None:
        from lrs.steering.registry import get_method

        methods, inherit = self.method_list(), self.inherit_map()
        if not methods:
            raise LRSError("--methods: name at least one method to tune")
        for m in (*methods, *inherit):
            if get_method(m).steerer is None:
                raise LRSError(f"--methods/--inherit: '{m}' has no settings to tune")
        for name, src in inherit.items():
            if src not in methods:
                raise LRSError(
                    f"--inherit {name}={src}: '{src}' is not among --methods ({', '.join(methods)})"
                )
            if name in methods:
                raise LRSError(f"--inherit {name}={src}: '{name}' is tuned itself; drop it from --methods")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(cfg: Any, name: str, low: int, optional: bool = False) -> None:
    """Refuse an integer setting below ``low`` (or a non-integer) with one line naming the flag."""
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise LRSError(f"{_flag(name)} must be an integer >= {low}, got {v!r}")


def _finite(cfg: Any, name: str, low: float | None = None, high: float | None = None, optional: bool = False):
    """Refuse a NaN/inf or out-of-range float setting with one line naming the flag."""
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if not isinstance(v, int | float) or math.isnan(v) or math.isinf(v):
        raise LRSError(f"{_flag(name)} must be a finite number, got {v!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise LRSError(f"{_flag(name)} must be {rng}, got {v}")


def from_dict(cls: type[T], data: dict) -> T:
    """Build a config from a plain dict (e.g. a parsed YAML file); unknown keys are a one-line error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise LRSError(
            f"unknown {cls.__name__} setting(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
        )
    return cls(**data)

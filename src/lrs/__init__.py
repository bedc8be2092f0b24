"""Latent Reward Steering: read a reasoning model's hidden state through a sparse autoencoder, score it with a
latent reward model, and where a gate says the state is fragile, nudge it along the reward gradient."""

__version__ = "0.1.0"

_EXPORTS = {
    "LRSError": "lrs.errors",
    "load_model": "lrs.models",
    "decoder_layers": "lrs.models",
    "load_task": "lrs.tasks",
    "build_prompts": "lrs.tasks",
    "grade": "lrs.grading",
    "generate": "lrs.generation",
    "collect_traces": "lrs.traces",
    "TraceSet": "lrs.traces",
    "fit_topk_sae": "lrs.encoders",
    "load_encoder": "lrs.encoders",
    "train_reward_model": "lrs.reward",
    "load_reward_model": "lrs.reward",
    "Gate": "lrs.steering",
    "LatentRewardSteerer": "lrs.steering",
    "DiffMeanSteerer": "lrs.steering",
    "evaluate": "lrs.evaluate",
}


def __getattr__(name: str):
    """Import public names lazily so `import lrs` stays fast and light."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lrs' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]

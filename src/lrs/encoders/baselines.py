"""Width baselines: the identity encoder (the raw state) and PCA of the normalised state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lrs.encoders.base import (
    EPS,
    _as_input,
    _centre,
    _check_states,
    _chunks,
    _finish,
    _mean,
)
from lrs.errors import LRSError


class IdentityEncoder(nn.Module):
    """z = (h − μ)/‖h − μ‖ (or h − μ): the raw state as a latent, for width comparisons (n = d)."""

    kind = "identity"

    def __init__(
        self, d_model: int, *, normalize: bool = True, rescale: bool = True, layer: int | None = None
    ):
        super().__init__()
        self.d_model = self.n_latents = d_model
        self.normalize, self.rescale, self.layer = normalize, rescale, layer
        self.register_buffer("mu", torch.zeros(d_model))
        self.metrics: dict = {}

    def encode(self, h: Tensor) -> Tensor:
        return _centre(_as_input(h, self.d_model, self.mu), self.mu, self.normalize)[0]

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        delta = (z_new - z_old).to(self.mu)
        if self.normalize and self.rescale:
            delta = delta * _centre(_as_input(h, self.d_model, self.mu), self.mu, False)[1]
        return _finish(delta, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        return c | {"normalize": self.normalize, "rescale": self.rescale}

    def tensors(self) -> dict[str, Tensor]:
        return {"mu": self.mu.detach().cpu().contiguous()}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> IdentityEncoder:
        enc = cls(
            config["d_model"], normalize=config["normalize"], rescale=config["rescale"], layer=config["layer"]
        )
        enc.load_state_dict(tensors)
        return enc


def fit_identity(
    states: Tensor,
    *,
    normalize: bool = True,
    rescale: bool = True,
    layer: int | None = None,
    min_states: int = 1,
) -> IdentityEncoder:
    """Identity encoder whose μ is the mean of `states`."""
    states = _check_states(states, min_states)
    enc = IdentityEncoder(states.shape[1], normalize=normalize, rescale=rescale, layer=layer)
    enc.mu.copy_(_mean(states, torch.arange(len(states))))
    return enc


class PCAEncoder(nn.Module):
    """Projection of the normalised state on its top-n principal directions (a linear width baseline)."""

    kind = "pca"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        *,
        normalize: bool = True,
        rescale: bool = True,
        layer: int | None = None,
    ):
        super().__init__()
        self.d_model, self.n_latents = d_model, n_latents
        self.normalize, self.rescale, self.layer = normalize, rescale, layer
        self.register_buffer("mu", torch.zeros(d_model))
        self.register_buffer("offset", torch.zeros(d_model))  # mean of the normalised states
        self.register_buffer("components", torch.zeros(n_latents, d_model))  # orthonormal rows
        self.metrics: dict = {}

    def encode(self, h: Tensor) -> Tensor:
        x = _centre(_as_input(h, self.d_model, self.mu), self.mu, self.normalize)[0]
        return (x - self.offset) @ self.components.T

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        delta = (z_new - z_old).to(self.mu) @ self.components
        if self.normalize and self.rescale:
            delta = delta * _centre(_as_input(h, self.d_model, self.mu), self.mu, False)[1]
        return _finish(delta, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        return c | {"normalize": self.normalize, "rescale": self.rescale}

    def tensors(self) -> dict[str, Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.named_buffers()}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> PCAEncoder:
        enc = cls(
            config["d_model"],
            config["n_latents"],
            normalize=config["normalize"],
            rescale=config["rescale"],
            layer=config["layer"],
        )
        enc.load_state_dict(tensors)
        return enc


@torch.no_grad()
def fit_pca(
    states: Tensor,
    n_latents: int = 10,
    *,
    normalize: bool = True,
    rescale: bool = True,
    layer: int | None = None,
    min_states: int = 2,
) -> PCAEncoder:
    """Exact PCA from the streamed covariance of the (normalised) states; metrics: FVU and explained ratios."""
    states = _check_states(states, min_states)
    N, d = states.shape
    if not 1 <= n_latents <= d:
        raise LRSError(f"PCA needs 1 <= n_latents <= {d} (the state width), got {n_latents}")
    enc = PCAEncoder(d, n_latents, normalize=normalize, rescale=rescale, layer=layer)
    idx = torch.arange(N)
    enc.mu.copy_(_mean(states, idx))
    s, ss = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for raw in _chunks(states, idx):
        x = _centre(raw, enc.mu, normalize)[0].double()
        s += x.sum(0)
        ss += x.T @ x
    mean = s / N
    cov = ss / N - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)[:, :n_latents].T
    evecs *= torch.sign(evecs[torch.arange(n_latents), evecs.abs().argmax(1)])[:, None]  # deterministic sign
    enc.offset.copy_(mean.float())
    enc.components.copy_(evecs.float())
    ratio = (evals / evals.sum().clamp_min(EPS)).tolist()
    enc.metrics = {"fvu": 1.0 - sum(ratio[:n_latents]), "explained_ratio": ratio[:n_latents], "n_states": N}
    return enc

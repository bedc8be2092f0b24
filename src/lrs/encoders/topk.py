"""The small TopK sparse autoencoder trained here on collected states (paper: 10 latents, k=3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

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


class TopKSAE(nn.Module):
    """TopK sparse autoencoder on centred (and L2-normalised) states; at use time the code is dense and linear."""

    kind = "topk_sae"

    def __init__(
        self,
        d_model: int,
        n_latents: int = 10,
        k: int = 3,
        *,
        normalize: bool = True,
        rescale: bool = True,
        layer: int | None = None,
    ):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise LRSError(f"TopK SAE needs 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.normalize, self.rescale, self.layer = normalize, rescale, layer
        self.W_enc = nn.Parameter(torch.zeros(n_latents, d_model))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(d_model, n_latents))  # unit-norm columns
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("mu", torch.zeros(d_model))
        self.metrics: dict = {}
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"d={self.d_model}, n={self.n_latents}, k={self.k}, normalize={self.normalize}, layer={self.layer}"

    def preprocess(self, h: Tensor) -> Tensor:
        """States -> the SAE's input space (centred, L2-normalised if `normalize`), float32."""
        return _centre(_as_input(h, self.d_model, self.mu), self.mu, self.normalize)[0]

    def _pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def _sparse(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass on preprocessed x: (reconstruction, sparse code)."""
        z = self._sparse(self._pre(x))
        return z @ self.W_dec.T + self.b_dec, z

    def encode(self, h: Tensor, sparse: bool = False) -> Tensor:
        """Dense linear code `pre` (all n latents, no top-k, no ReLU); `sparse=True` gives the training code."""
        pre = self._pre(self.preprocess(h))
        return self._sparse(pre) if sparse else pre

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        """Δh = (z_new − z_old) W_decᵀ, times ‖h − μ‖ when the input was normalised and `rescale` is on."""
        delta = (z_new - z_old).to(self.W_dec) @ self.W_dec.T
        if self.normalize and self.rescale:
            delta = delta * _centre(_as_input(h, self.d_model, self.mu), self.mu, False)[1]
        return _finish(delta, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        return c | {"k": self.k, "normalize": self.normalize, "rescale": self.rescale}

    def tensors(self) -> dict[str, Tensor]:
        return {
            n: t.detach().cpu().contiguous() for n, t in [*self.named_parameters(), *self.named_buffers()]
        }

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> TopKSAE:
        sae = cls(
            config["d_model"],
            config["n_latents"],
            config["k"],
            normalize=config["normalize"],
            rescale=config.get("rescale", True),
            layer=config["layer"],
        )
        sae.load_state_dict(tensors)
        return sae


@torch.no_grad()
def _fvu(sae: TopKSAE, states: Tensor, idx: Tensor, alive: Tensor | None = None) -> float:
    """Fraction of variance unexplained in the SAE's input space over rows idx (streamed)."""
    n, sx, sxx, err = 0, 0.0, 0.0, 0.0
    for raw in _chunks(states, idx):
        x = sae.preprocess(raw)
        rec, z = sae(x)
        if alive is not None:
            alive |= (z > 0).any(0)
        n += len(x)
        sx = sx + x.sum(0, dtype=torch.float64)
        sxx += x.double().pow(2).sum().item()
        err += (rec - x).double().pow(2).sum().item()
    total = sxx - (sx.pow(2).sum() / n).item()
    return err / max(total, EPS)


def fit_topk_sae(
    states: Tensor,
    *,
    n_latents: int = 10,
    k: int = 3,
    normalize: bool = True,
    rescale: bool = True,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 1024,
    val_frac: float = 0.1,
    auxk_alpha: float = 1 / 32,
    seed: int = 0,
    layer: int | None = None,
    min_states: int = 2000,
    progress: bool = True,
) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE on states [N, d] (any float dtype, streamed to fp32 per batch); returns (sae, metrics).

    Adam on the reconstruction MSE in the normalised space, unit-norm decoder columns, cosine LR decay, plus
    an AuxK term (weight `auxk_alpha`) fitting the residual with latents idle for half an epoch.
    Metrics: train / held-out FVU, dead-latent fraction, split sizes. Deterministic for a seed.
    """
    states = _check_states(states, min_states)
    N, d = states.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    n_val = max(1, int(round(N * val_frac))) if val_frac > 0 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    sae = TopKSAE(d, n_latents, k, normalize=normalize, rescale=rescale, layer=layer)
    sae.mu.copy_(_mean(states, train_idx))
    # b_dec at the data mean of x; W_enc random unit rows; W_dec = W_encᵀ (unit columns)
    sae.b_dec.copy_(sum(sae.preprocess(x).sum(0) for x in _chunks(states, train_idx)) / len(train_idx))
    W = torch.randn(n_latents, d, generator=g)
    sae.W_enc.copy_(W / W.norm(dim=1, keepdim=True))
    sae.W_dec.copy_(sae.W_enc.T)

    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, epochs * steps_per_epoch), eta_min=lr / 10
    )
    idle, dead_steps = torch.zeros(n_latents, dtype=torch.long), max(1, steps_per_epoch // 2)
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"TopK SAE n={n_latents} k={k}", disable=not progress)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), batch_size):
            x = sae.preprocess(states[order[i : i + batch_size]])
            pre = sae._pre(x)
            z = sae._sparse(pre)
            err = x - (z @ sae.W_dec.T + sae.b_dec)
            loss = err.pow(2).sum(-1).mean()
            idle = torch.where((z > 0).any(0), 0, idle + 1)
            dead = idle > dead_steps
            if auxk_alpha > 0 and dead.any():  # AuxK: dead latents learn to explain the residual
                vals, idx = pre.masked_fill(~dead, -torch.inf).topk(
                    min(int(dead.sum()), max(1, d // 2)), dim=-1
                )
                e_hat = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals)) @ sae.W_dec.T
                loss = loss + auxk_alpha * (e_hat - err.detach()).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=0, keepdim=True).clamp_min(EPS)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    sae.requires_grad_(False)

    alive = torch.zeros(n_latents, dtype=torch.bool)
    metrics = {
        "fvu_train": _fvu(sae, states, train_idx, alive),
        "fvu_val": _fvu(sae, states, val_idx) if n_val else None,
        "dead_frac": 1.0 - alive.float().mean().item(),
        "n_train": len(train_idx),
        "n_val": n_val,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "auxk_alpha": auxk_alpha,
        "seed": seed,
    }
    sae.metrics = metrics
    return sae, metrics

"""Stage 2a: encoders that map a residual-stream state h [.., d] to a latent z [.., n] and a latent change back to Δh.

Every encoder owns its input normalisation. `encode` gives the dense float32 latent the reward model sees;
`decode_delta(z_new, z_old, h)` gives the hidden-state change that moves the latent from z_old to z_new at h.
Implementations: a small TopK SAE trained here, an identity and a PCA baseline, and adapters for SAELens,
EleutherAI sparsify and the LRS / thinking-llms `.pt` dict. Saved as safetensors + a JSON sidecar.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lrs.artifacts import load_artifact, save_artifact, tensor_hash
from lrs.errors import LRSError

__all__ = [
    "Encoder",
    "TopKSAE",
    "IdentityEncoder",
    "PCAEncoder",
    "SAELensEncoder",
    "SparsifyEncoder",
    "fit_topk_sae",
    "fit_identity",
    "fit_pca",
    "from_saelens",
    "from_sparsify",
    "load_lrs_pt",
    "save_encoder",
    "load_encoder",
    "encoder_hash",
    "check_compatible",
]

FORMAT = "lrs.encoder/1"
EPS = 1e-8
CHUNK = 8192  # rows converted to float32 at a time when streaming over stored (bf16) states


@runtime_checkable
class Encoder(Protocol):
    """What the reward model and the steering hook need from an encoder."""

    layer: int | None
    d_model: int
    n_latents: int
    kind: str

    def encode(self, h: Tensor) -> Tensor: ...

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor: ...

    def config(self) -> dict: ...

    def tensors(self) -> dict[str, Tensor]: ...


# ---------------------------------------------------------------------------------------------- helpers


def _as_input(h: Tensor, d_model: int, ref: Tensor) -> Tensor:
    """Check the width and move h to the encoder's device as float32."""
    if h.shape[-1] != d_model:
        raise LRSError(f"encoder expects states of width {d_model} but got shape {tuple(h.shape)}")
    return h.to(device=ref.device, dtype=torch.float32)


def _centre(h: Tensor, mu: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """x = h − μ, L2-normalised if asked; also returns ‖h − μ‖ [.., 1]."""
    x = h - mu
    norm = x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return (x / norm if normalize else x), norm


def _finish(delta: Tensor, h: Tensor) -> Tensor:
    return delta.to(device=h.device, dtype=h.dtype)


def _check_states(states: Any, min_states: int) -> Tensor:
    if not isinstance(states, Tensor):
        raise LRSError(
            f"states must be a torch.Tensor [N, d] (e.g. TraceSet.states(layer)), got {type(states).__name__}"
        )
    if states.dim() != 2:
        raise LRSError(f"states must be 2-D [N, d], got shape {tuple(states.shape)}")
    if states.shape[0] < min_states:
        raise LRSError(
            f"got {states.shape[0]} states but fitting an encoder needs at least {min_states}: collect more traces"
        )
    return states


def _chunks(states: Tensor, idx: Tensor, size: int = CHUNK):
    for i in range(0, len(idx), size):
        yield states[idx[i : i + size]].float()


def _mean(states: Tensor, idx: Tensor) -> Tensor:
    """Float32 mean over the rows `idx`, streamed in chunks; rejects NaN/inf."""
    total = torch.zeros(states.shape[1], dtype=torch.float64)
    for x in _chunks(states, idx):
        total += x.sum(0, dtype=torch.float64)
    if not torch.isfinite(total).all():
        raise LRSError(
            "states contain NaN or inf: the traces are corrupt or the model overflowed (try bf16/fp32)"
        )
    return (total / len(idx)).float()


def _layer_cfg(c: dict) -> dict:
    return {"kind": c["kind"], "layer": c["layer"], "d_model": c["d_model"], "n_latents": c["n_latents"]}


# ---------------------------------------------------------------------------------------------- TopK SAE


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


# ---------------------------------------------------------------------------------------------- baselines


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


# ---------------------------------------------------------------------------------------------- adapters


def _layer_from_hook(hook: str | None, layer: int | None, what: str) -> int | None:
    """Block index whose output a hook name reads (HF convention: output of block L), or the given layer."""
    if layer is not None:
        return layer
    hook = hook or ""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook):
        return int(m.group(1))
    if (m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)) and int(m.group(1)) > 0:
        return int(m.group(1)) - 1
    if m := re.fullmatch(r"(?:(?:model|transformer|gpt_neox)\.)?(?:layers|h)\.(\d+)", hook):
        return int(m.group(1))
    raise LRSError(
        f"cannot tell which block output {what} hook {hook!r} reads: pass layer=L (output of block L)"
    )


class SAELensEncoder(nn.Module):
    """A SAELens `SAE`: encode is the SAE's own encode (faithful activation and normalisation)."""

    kind = "saelens"

    def __init__(self, sae: nn.Module, *, layer: int | None, source: dict | None = None):
        super().__init__()
        self.sae = sae
        self.d_model, self.n_latents = int(sae.cfg.d_in), int(sae.cfg.d_sae)
        self.layer, self.source, self.metrics = layer, source or {}, {}

    @property
    def _ref(self) -> Tensor:
        return self.sae.W_dec

    def encode(self, h: Tensor) -> Tensor:
        x = _as_input(h, self.d_model, self._ref).to(self._ref.dtype)
        return self.sae.encode(x).float()

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        """The SAE's decode(z_new) − decode(z_old), in float32 before casting to h's dtype."""
        dec = self.sae.decode
        delta = dec(z_new.to(self._ref)).float() - dec(z_old.to(self._ref)).float()
        return _finish(delta, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        return c | {"hook_name": _saelens_hook(self.sae), **self.source}

    def tensors(self) -> dict[str, Tensor]:
        names = ["W_enc", "b_enc", "W_dec", "b_dec"]
        return {n: getattr(self.sae, n).detach().float().cpu().contiguous() for n in names}


def _saelens_hook(sae: Any) -> str | None:
    cfg = sae.cfg
    hook = getattr(cfg, "hook_name", None)
    meta = getattr(cfg, "metadata", None)
    if hook is None and meta is not None:
        hook = meta.get("hook_name") if isinstance(meta, dict) else getattr(meta, "hook_name", None)
    return hook


def from_saelens(
    sae_or_release: Any, sae_id: str | None = None, *, layer: int | None = None, device: str = "cpu"
) -> SAELensEncoder:
    """Wrap a SAELens SAE object, or load `SAE.from_pretrained(release, sae_id)` (needs `lrs[saelens]`)."""
    source = None
    if isinstance(sae_or_release, str):
        if sae_id is None:
            raise LRSError("from_saelens(release, sae_id): give the SAE id inside the release too")
        try:
            from sae_lens import SAE
        except ImportError:
            raise LRSError("SAELens adapter needs `pip install lrs[saelens]`") from None
        try:
            out = SAE.from_pretrained(sae_or_release, sae_id, device=device)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LRSError(f"SAELens could not load {sae_or_release!r} / {sae_id!r}: {first}") from None
        sae = out[0] if isinstance(out, tuple) else out  # sae_lens < 6 returned (sae, cfg_dict, sparsity)
        source = {"release": sae_or_release, "sae_id": sae_id}
    else:
        sae = sae_or_release
    missing = [a for a in ("W_enc", "W_dec", "b_dec", "cfg", "encode", "decode") if not hasattr(sae, a)]
    if missing:
        raise LRSError(
            f"{type(sae).__name__} does not look like a SAELens SAE (missing {', '.join(missing)})"
        )
    return SAELensEncoder(sae, layer=_layer_from_hook(_saelens_hook(sae), layer, "SAELens"), source=source)


class SparsifyEncoder(nn.Module):
    """An EleutherAI sparsify SparseCoder, copied to float32 tensors (no library needed after construction).

    `encode` returns the dense pre-activation (x − b_dec) Wᵀ + b for all n latents: a top-k code is zero and
    has zero gradient off its support and changes support discontinuously, so gradient ascent in z could only
    rescale the k latents already active. This matches the dense code used for our own TopK SAE at use time.
    `encode(h, sparse=True)` gives the coder's own top-k code scattered into n dims.
    """

    kind = "sparsify"

    def __init__(
        self, d_model: int, n_latents: int, k: int, *, activation: str = "topk", layer: int | None = None
    ):
        super().__init__()
        self.d_model, self.n_latents, self.k, self.activation = d_model, n_latents, k, activation
        self.layer, self.source, self.metrics = layer, {}, {}
        self.register_buffer("W_enc", torch.zeros(n_latents, d_model))
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.register_buffer("W_dec", torch.zeros(n_latents, d_model))
        self.register_buffer("b_dec", torch.zeros(d_model))

    def encode(self, h: Tensor, sparse: bool = False) -> Tensor:
        pre = (_as_input(h, self.d_model, self.W_enc) - self.b_dec) @ self.W_enc.T + self.b_enc
        if not sparse:
            return pre
        acts = F.relu(pre)
        if self.activation == "groupmax":
            vals, idx = acts.unflatten(-1, (self.k, -1)).max(-1)
            idx = idx + torch.arange(0, self.n_latents, self.n_latents // self.k, device=idx.device)
        else:
            vals, idx = acts.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        return _finish((z_new - z_old).to(self.W_dec) @ self.W_dec, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        return c | {"k": self.k, "activation": self.activation, **self.source}

    def tensors(self) -> dict[str, Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.named_buffers()}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> SparsifyEncoder:
        enc = cls(
            config["d_model"],
            config["n_latents"],
            config["k"],
            activation=config["activation"],
            layer=config["layer"],
        )
        enc.load_state_dict(tensors)
        enc.source = {key: config[key] for key in ("name", "hookpoint") if key in config}
        return enc


def from_sparsify(
    coder_or_name: Any, hookpoint: str | None = None, *, layer: int | None = None, device: str = "cpu"
) -> SparsifyEncoder:
    """Wrap a sparsify SparseCoder, or load one by hub name / local dir + hookpoint (needs `lrs[sparsify]`)."""
    source = {}
    if isinstance(coder_or_name, str | Path):
        try:
            from sparsify import SparseCoder
        except ImportError:
            raise LRSError("sparsify adapter needs `pip install lrs[sparsify]`") from None
        local = Path(coder_or_name)
        try:
            if local.exists():
                coder = SparseCoder.load_from_disk(local / hookpoint if hookpoint else local, device=device)
            else:
                coder = SparseCoder.load_from_hub(str(coder_or_name), hookpoint=hookpoint, device=device)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LRSError(
                f"sparsify could not load {str(coder_or_name)!r} / {hookpoint!r}: {first}"
            ) from None
        source = {"name": str(coder_or_name), "hookpoint": hookpoint}
    else:
        coder = coder_or_name
    missing = [a for a in ("encoder", "W_dec", "b_dec", "cfg") if not hasattr(coder, a)]
    if missing:
        raise LRSError(
            f"{type(coder).__name__} does not look like a sparsify SparseCoder (missing {', '.join(missing)})"
        )
    if coder.W_dec is None:
        raise LRSError("this sparsify coder was loaded without its decoder: load it with decoder=True")
    if getattr(coder.cfg, "transcode", False):
        raise LRSError(
            "this sparsify coder is a transcoder (predicts another module's output), not an autoencoder"
        )
    W_enc = coder.encoder.weight.detach().float().cpu()
    enc = SparsifyEncoder(
        W_enc.shape[1],
        W_enc.shape[0],
        int(coder.cfg.k),
        activation=getattr(coder.cfg, "activation", "topk"),
        layer=_layer_from_hook(hookpoint, layer, "sparsify"),
    )
    b_enc = coder.encoder.bias
    enc.W_enc.copy_(W_enc)
    enc.b_enc.copy_(b_enc.detach().float().cpu() if b_enc is not None else torch.zeros(len(W_enc)))
    enc.W_dec.copy_(coder.W_dec.detach().float().cpu())
    enc.b_dec.copy_(coder.b_dec.detach().float().cpu())
    enc.source = source
    return enc.to(device)


LRS_PT_KEYS = ("encoder_weight", "encoder_bias", "decoder_weight", "b_dec", "topk", "activation_mean")


def load_lrs_pt(
    path: str | Path, *, layer: int | None = None, normalize: bool = True, rescale: bool = True
) -> TopKSAE:
    """Load the LRS / thinking-llms `.pt` SAE dict (weights_only, never unpickles objects) as a TopKSAE.

    The reference decodes without rescaling: pass `rescale=False` to reproduce it.
    """
    path = Path(path)
    if not path.is_file():
        raise LRSError(f"no SAE file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise LRSError(
                f"{path}: holds pickled Python objects that safe loading refuses; expected a plain dict of tensors"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(f"{path}: not a readable torch .pt file (truncated or corrupt?): {first}") from None
    if not isinstance(obj, dict):
        raise LRSError(
            f"{path}: expected a dict with keys {', '.join(LRS_PT_KEYS)}, got {type(obj).__name__}"
        )
    missing = [key for key in LRS_PT_KEYS if key not in obj]
    if missing:
        raise LRSError(f"{path}: missing key(s) {', '.join(missing)} of the LRS SAE format")
    W_enc = torch.as_tensor(obj["encoder_weight"]).float()
    n, d = W_enc.shape
    shapes = {"encoder_bias": (n,), "decoder_weight": (d, n), "b_dec": (d,), "activation_mean": (d,)}
    for key, shape in shapes.items():
        if tuple(torch.as_tensor(obj[key]).shape) != shape:
            raise LRSError(
                f"{path}: {key} has shape {tuple(torch.as_tensor(obj[key]).shape)}, expected {shape}"
            )
    sae = TopKSAE(
        d, n, int(torch.as_tensor(obj["topk"]).item()), normalize=normalize, rescale=rescale, layer=layer
    )
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(torch.as_tensor(obj["encoder_bias"]).float())
    sae.W_dec.copy_(torch.as_tensor(obj["decoder_weight"]).float())
    sae.b_dec.copy_(torch.as_tensor(obj["b_dec"]).float())
    sae.mu.copy_(torch.as_tensor(obj["activation_mean"]).float())
    sae.metrics = {"source": str(path)}
    return sae


# ---------------------------------------------------------------------------------------------- save / load


def encoder_hash(enc: Encoder) -> str:
    """sha256 over the encoder's tensors (names, dtypes, shapes, bytes), independent of device."""
    return tensor_hash(enc.tensors())


def save_encoder(
    enc: Encoder, path: str | Path, *, metrics: dict | None = None, provenance: dict | None = None
) -> Path:
    """Write `path` (safetensors) and `path.with_suffix('.json')` (config, metrics, provenance, hash), atomically."""
    c = enc.config()
    config = {**_layer_cfg(c), "options": {k: v for k, v in c.items() if k not in _layer_cfg(c)}}
    return save_artifact(
        path,
        enc.tensors(),
        format=FORMAT,
        config=config,
        provenance=provenance if provenance is not None else getattr(enc, "provenance", {}),
        metrics=metrics if metrics is not None else getattr(enc, "metrics", {}),
    )


KINDS = {cls.kind: cls for cls in (TopKSAE, IdentityEncoder, PCAEncoder, SparsifyEncoder)}


def load_encoder(path: str | Path) -> Encoder:
    """Load an encoder written by `save_encoder` (the tensor file or its .json sidecar); checks the hash."""
    path = Path(path)
    if path.suffix == ".pt":
        raise LRSError(f"{path}: not an lrs encoder (an LRS/thinking-llms .pt SAE loads with load_lrs_pt)")
    tensors, meta = load_artifact(path, format=FORMAT, what="encoder")
    c = meta["config"]
    config = {**c.get("options", {}), **_layer_cfg(c)}
    kind = c["kind"]
    if kind == "saelens":
        if "release" not in config:
            raise LRSError(
                f"{path}: a SAELens SAE wrapped from an object cannot be reloaded: use from_saelens()"
            )
        enc = from_saelens(config["release"], config["sae_id"], layer=config["layer"])
    elif kind in KINDS:
        try:
            enc = KINDS[kind].from_saved(config, tensors)
        except (KeyError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LRSError(f"{path}: tensors do not match the {kind} config ({first})") from None
    else:
        raise LRSError(f"{path}: unknown encoder kind {kind!r} (known: {', '.join([*KINDS, 'saelens'])})")
    enc.metrics, enc.provenance = meta.get("metrics", {}), meta.get("provenance", {})
    return enc


def check_compatible(enc: Encoder, d_model: int, layer: int | None) -> None:
    """Raise LRSError if the encoder was fitted for another hidden size or another layer."""
    if enc.d_model != d_model:
        raise LRSError(
            f"encoder width {enc.d_model} does not match the model's hidden size {d_model}: "
            "use an encoder fitted on this model's states"
        )
    if enc.layer is not None and layer is not None and enc.layer != layer:
        raise LRSError(
            f"encoder was fitted at layer {enc.layer} but steering asks for layer {layer}: "
            f"steer at layer {enc.layer} or fit an encoder at layer {layer}"
        )

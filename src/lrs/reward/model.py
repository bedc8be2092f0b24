"""Latent reward models (causal / mlp / bidirectional), saving and loading, and scoring traces."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrs.artifacts import load_artifact, save_artifact, tensor_hash
from lrs.errors import LRSError
from lrs.stats import auroc

FORMAT = "lrs.reward/1"
KINDS = ("causal", "mlp", "bidirectional")
POSITIONS = (16, 32, 64, 128, 256)  # absolute token counts at which quality is reported
PROBE_C = 0.1  # inverse L2 strength of the prompt / prompt+confidence logistic-regression baselines
BASELINES = {"confidence": "confidence", "prompt": "prompt-only", "prompt_conf": "prompt+conf"}


@dataclass
class RewardConfig:
    """Architecture and training settings of a latent reward model."""

    kind: str = "causal"
    """causal (sliding-window Transformer, scores z_<=t) | mlp (per token) | bidirectional (reference training)"""
    d_model: int = 64
    """hidden width"""
    n_layers: int = 2
    """Transformer layers (causal and bidirectional kinds)"""
    n_heads: int = 4
    """attention heads"""
    window: int = 128
    """causal: the logit at t sees only the last `window` latents (each of the n_layers attention layers looks
    back (window-1)//n_layers positions, so the stacked receptive field fits the window); keep the steering
    history at least this long and decode-time scores equal training-time scores"""
    dropout: float = 0.1
    """dropout inside the model during training"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    epochs: int = 40
    """maximum training epochs"""
    patience: int = 6
    """stop after this many epochs without a better validation score"""
    batch_size: int = 16
    """traces per optimisation step"""
    val_frac: float = 0.2
    """fraction of problems (not traces) held out for selecting the epoch (early stopping)"""
    report_frac: float = 0.2
    """fraction of problems held out for the report only, disjoint from fit and selection problems (0: report
    on the selection problems, which flatters the reward model against untuned baselines)"""
    drop_truncated: bool = False
    """leave traces that hit the token limit out of fitting and selection (their 'wrong' label may only mean
    'long'); the report still scores every trace"""
    use_position: bool = True
    """give the model the absolute token index (False: ablation, so it cannot learn 'long means wrong')"""
    objective: str = "trajectory"
    """trajectory: every token carries its trace's label (class-balanced BCE) | centred: BCE with the logit of the problem's
    success rate as a fixed offset, on problems with both right and wrong traces only, so the score only has to
    explain how a trace differs from the other traces of its problem | pairwise: within a problem, every (right, wrong) pair at every shared
    position, loss softplus(s_wrong - s_right). centred and pairwise need several traces per problem and
    select the epoch on within-problem AUROC | value: the logit after t tokens regresses (BCE with soft
    targets) on Monte-Carlo value labels P(correct | prefix) from ``lrs collect --rollouts``"""
    seed: int = 0
    """seeds the split, the initialisation, dropout and batch order"""
    max_len: int = 1024
    """traces longer than this are truncated to their first max_len tokens"""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LRSError(f"unknown reward model kind '{self.kind}': use one of {', '.join(KINDS)}")
        if self.d_model < 1 or self.d_model % self.n_heads:
            raise LRSError(
                f"reward model d_model={self.d_model} must be positive and divisible by n_heads={self.n_heads}"
            )
        if self.window < 1 or self.max_len < 1 or self.epochs < 1 or self.batch_size < 1:
            raise LRSError("reward model window, max_len, epochs and batch_size must all be >= 1")
        if (
            not 0 < self.val_frac < 1
            or not 0 <= self.report_frac < 1
            or self.val_frac + self.report_frac >= 1
        ):
            raise LRSError(
                f"val_frac ({self.val_frac}) and report_frac ({self.report_frac}) must be in [0, 1) and sum below 1"
            )


@dataclass
class RewardCache:
    """Per-row state of incremental causal scoring: each layer's keys/values of the last ``layer_window``
    positions (a ring: position j sits in slot j mod layer_window; older positions cannot reach new ones) and
    which of them are valid. Build with :meth:`RewardModel.new_cache`; advance with :meth:`append`."""

    k: torch.Tensor  # [L, B, H, Lw, d/H]
    v: torch.Tensor  # [L, B, H, Lw, d/H]
    valid: torch.Tensor  # [B, Lw] bool
    n: int = 0  # positions appended so far (the same for every row)

    @property
    def window(self) -> int:
        return self.valid.shape[1]

    def append(self, kv: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Store one new position per row (the keys/values [2, L, B, H, d/H] from :meth:`RewardModel.score_step`)."""
        slot = self.n % self.window
        self.k[:, :, :, slot] = kv[0].detach()
        self.v[:, :, :, slot] = kv[1].detach()
        self.valid[:, slot] = True if valid is None else valid
        self.n += 1

    def select(self, rows: torch.Tensor) -> RewardCache:
        """A copy holding only ``rows`` (index tensor)."""
        return RewardCache(self.k[:, rows], self.v[:, rows], self.valid[rows], self.n)


class RewardModel(nn.Module):
    """Latents [B,T,n] -> per-position reward logits [B,T]; standardises its inputs with stored train statistics."""

    def __init__(self, n_latents: int, cfg: RewardConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RewardConfig()
        self.n_latents = n_latents
        self.register_buffer("z_mean", torch.zeros(n_latents))
        self.register_buffer("z_std", torch.ones(n_latents))
        self.inp = nn.Linear(n_latents, cfg.d_model)
        self.pos = nn.Linear(1, cfg.d_model)  # feature of the absolute token index, known at decode time
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.kind != "mlp":
            layer = nn.TransformerEncoderLayer(
                cfg.d_model,
                cfg.n_heads,
                4 * cfg.d_model,
                cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.body = nn.TransformerEncoder(
                layer, cfg.n_layers, norm=nn.LayerNorm(cfg.d_model), enable_nested_tensor=False
            )
        self.head = nn.Linear(cfg.d_model, 1)

    @torch.no_grad()
    def set_standardisation(self, z: torch.Tensor) -> None:
        """Store per-latent mean/std of the training latents [N, n] (encoders differ wildly in scale)."""
        z = z.float()
        self.z_mean.copy_(z.mean(0))
        std = z.std(0) if len(z) > 1 else torch.ones_like(self.z_std)
        self.z_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    @property
    def layer_window(self) -> int:
        """Look-back of each attention layer: stacked, the n_layers layers see at most ``window`` latents."""
        return (self.cfg.window - 1) // self.cfg.n_layers + 1

    def _mask(self, valid: torch.Tensor) -> torch.Tensor:
        """[B*heads, T, T] bool, True = blocked: padding keys, plus (causal) keys outside the sliding window."""
        B, T = valid.shape
        allowed = valid[:, None, :].expand(B, T, T)
        if self.cfg.kind == "causal":
            i = torch.arange(T, device=valid.device)
            d = i[:, None] - i[None, :]
            allowed = allowed & ((d >= 0) & (d < self.layer_window))
        # every query may see itself, so padding queries never have an all-blocked row (no NaN)
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=valid.device)
        return (~allowed).repeat_interleave(self.cfg.n_heads, dim=0)

    def _embed(self, z: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Standardised latents (zero at invalid positions) through the input layer, plus the position feature."""
        x = (z.to(self.z_mean.dtype) - self.z_mean) / self.z_std
        x = torch.where(valid[..., None], x, torch.zeros_like(x))
        f = torch.log1p(positions.to(x.dtype).clamp_min(0)) / math.log1p(self.cfg.max_len)
        if not self.cfg.use_position:
            f = torch.zeros_like(f)
        return self.inp(x) + self.pos(f[..., None])

    def forward(
        self, z: torch.Tensor, valid: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B,T]; ``positions`` are absolute token indices (default: index among the valid tokens)."""
        if valid is None:
            valid = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        if positions is None:
            positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        x = self._embed(z, valid, positions)
        if self.cfg.kind == "mlp":
            x = self.drop(F.gelu(x))
        else:
            x = self.body(x, mask=self._mask(valid))
        return self.head(x).squeeze(-1)

    def score_last(self, z_hist: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logit [B] at the last valid position of each LEFT-padded history [B,W,n]; differentiable in z_hist."""
        if self.cfg.kind == "causal" and z_hist.shape[1] > self.cfg.window and bool(valid[:, -1].all()):
            w = self.cfg.window  # older columns cannot reach the last one through the sliding window
            z_hist, valid, positions = z_hist[:, -w:], valid[:, -w:], positions[:, -w:]
        logits = self.forward(z_hist, valid, positions)
        cols = torch.arange(valid.shape[1], device=valid.device)
        last = torch.where(valid, cols, torch.zeros_like(cols)).amax(1)
        return logits.gather(1, last[:, None]).squeeze(1)

    # ---- incremental scoring (causal kind) ----------------------------------------------------------------
    @property
    def incremental(self) -> bool:
        """Whether :meth:`score_step` applies: the causal kind in eval mode (dropout off)."""
        return self.cfg.kind == "causal" and not self.training

    def new_cache(self, batch: int, device: torch.device | str | None = None) -> RewardCache:
        """An empty :class:`RewardCache` for ``batch`` rows (on the model's device unless told)."""
        if self.cfg.kind != "causal":
            raise LRSError(f"incremental scoring needs a causal reward model, not '{self.cfg.kind}'")
        H = self.cfg.n_heads
        w = self.head.weight
        shape = (self.cfg.n_layers, batch, H, self.layer_window, self.cfg.d_model // H)
        dev = w.device if device is None else torch.device(device)
        return RewardCache(
            torch.zeros(shape, dtype=w.dtype, device=dev),
            torch.zeros(shape, dtype=w.dtype, device=dev),
            torch.zeros(batch, self.layer_window, dtype=torch.bool, device=dev),
        )

    def score_step(
        self,
        z: torch.Tensor,
        cache: RewardCache,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit [B] of one new position per row (latents ``z`` [B,n], absolute token indices ``positions`` [B]),
        given the cached keys/values of the positions before it, at constant cost per position.

        Returns the logit and the new position's per-layer keys/values [2, L, B, H, d/H]; pass them to
        :meth:`RewardCache.append` to advance the cache (the cache itself is not changed, so the logit can be
        differentiated in ``z`` and re-evaluated). The logit equals :meth:`forward` over the whole sequence at
        that position (float tolerance), padding positions (``valid`` False) included: only the new position's
        own path depends on ``z``.
        """
        if not self.incremental:
            raise LRSError("score_step needs a causal reward model in eval mode (call .eval())")
        if valid is None:
            valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        x = self._embed(z, valid, positions)
        here = torch.arange(cache.window, device=x.device) == cache.n % cache.window  # the slot it replaces
        # [B, 1, 1, Lw] keys it attends to: the valid ones, and always itself (as in forward's mask)
        seen = (cache.valid | here)[:, None, None, :]
        ks, vs = [], []
        for i, layer in enumerate(self.body.layers):
            x, k, v = self._layer_step(layer, x, cache.k[i], cache.v[i], here, seen)
            ks.append(k)
            vs.append(v)
        if self.body.norm is not None:
            x = self.body.norm(x)
        return self.head(x).squeeze(-1), torch.stack([torch.stack(ks), torch.stack(vs)])

    def _layer_step(self, layer, x, k_cache, v_cache, here, seen):
        """One norm-first encoder layer (eval mode) for one new position attending to its cached window."""
        B, d = x.shape
        H = self.cfg.n_heads
        attn = layer.self_attn
        qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(B, 3, H, d // H).unbind(1)  # [B, H, dh] each
        K = torch.where(here[:, None], k[:, :, None], k_cache)  # [B, H, Lw, dh]: the new key in its slot
        V = torch.where(here[:, None], v[:, :, None], v_cache)
        o = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=seen).reshape(B, d)
        x = x + attn.out_proj(o)
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        return x, k, v

    def score_next(
        self,
        z: torch.Tensor,
        cache: RewardCache,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`score_step` then append the new position to ``cache``; returns the logits [B] (no gradient)."""
        with torch.no_grad():
            logit, kv = self.score_step(z, cache, positions, valid)
        cache.append(kv, valid)
        return logit

    def config(self) -> dict:
        """Everything needed to rebuild the module (saved in the JSON sidecar)."""
        return dict(n_latents=self.n_latents, **asdict(self.cfg))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights and standardisation buffers, CPU and contiguous (saved as safetensors)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


# ---- saving and loading --------------------------------------------------------------------------------
def save_reward_model(
    rm: RewardModel, path: str | Path, provenance: dict | None = None, metrics: dict | None = None
) -> Path:
    """Write ``path`` (safetensors) and its ``.json`` sidecar (config, hash, metrics, provenance), atomically."""
    return save_artifact(
        path,
        rm.tensors(),
        format=FORMAT,
        config=rm.config(),
        provenance=provenance,
        metrics=metrics if metrics is not None else getattr(rm, "metrics", None),
    )


def reward_hash(rm: RewardModel) -> str:
    """sha256 over the reward model's tensors (what cache keys and provenance record)."""
    return tensor_hash(rm.tensors())


def load_reward_model(path: str | Path) -> RewardModel:
    """Load a reward model written by :func:`save_reward_model` (tensor file or sidecar), hash-checked, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise LRSError(f"no reward model file at {path}: train one with `lrs train-reward`")
    tensors, meta = load_artifact(path, format=FORMAT, what="reward model")
    c = meta["config"]
    try:
        cfg = RewardConfig(**{f.name: c[f.name] for f in fields(RewardConfig) if f.name in c})
        rm = RewardModel(int(c["n_latents"]), cfg)
        rm.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, LRSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(f"{path}: tensors do not match the reward model config ({first})") from None
    rm.metrics, rm.provenance = meta.get("metrics", {}), meta.get("provenance", {})
    return rm.eval()


# ---- data helpers ----------------------------------------------------------------------------------------
def _pad(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad traces [T_i, n] into z [B,T,n] and valid [B,T]."""
    T = max(len(x) for x in xs)
    z = torch.zeros(len(xs), T, xs[0].shape[1])
    valid = torch.zeros(len(xs), T, dtype=torch.bool)
    for i, x in enumerate(xs):
        z[i, : len(x)], valid[i, : len(x)] = x, True
    return z, valid


@torch.no_grad()
def score_traces(rm: RewardModel, latents: list[torch.Tensor], batch_size: int = 16) -> list[torch.Tensor]:
    """Per-position logits [T_i] of each trace from one pass over the (max_len-truncated) trace.

    For ``causal`` and ``mlp`` the logit at t uses only z_<=t; for ``bidirectional`` it also sees the future.
    """
    was = rm.training
    rm.eval()
    xs = [z[: rm.cfg.max_len].float() for z in latents]
    order = sorted(range(len(xs)), key=lambda i: len(xs[i]))  # similar lengths share a batch: less padding
    out: list[torch.Tensor] = [torch.empty(0)] * len(xs)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        z, valid = _pad([xs[i] for i in idx])
        logits = rm(z, valid)
        for j, i in enumerate(idx):
            out[i] = logits[j, : len(xs[i])]
    rm.train(was)
    return out


def _keys() -> list[str]:
    return [str(t) for t in POSITIONS] + ["end"]


def _prefix_scores(rm: RewardModel, latents: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Reward logit after t tokens (seeing only z_<=t) per trace and position key; nan where T_i <= t."""
    lens = np.array([min(len(z), rm.cfg.max_len) for z in latents])
    full = score_traces(rm, latents)
    out = {}
    for t in POSITIONS:
        v = np.full(len(latents), np.nan)
        idx = np.flatnonzero(lens > t)
        if len(idx) and rm.cfg.kind == "bidirectional":  # score on the prefix only: no peeking at the future
            pref = score_traces(rm, [latents[i][:t] for i in idx])
            v[idx] = [float(s[-1]) for s in pref]
        elif len(idx):
            v[idx] = [float(full[i][t - 1]) for i in idx]
        out[str(t)] = v
    out["end"] = np.array([float(s[-1]) for s in full])
    return out


SELECT_POSITIONS = (16, 32, 64, 128)  # epoch selection reads only these; "end" sees the answer and the length


def _val_score(aucs: dict[str, float]) -> float:
    """Mean AUROC over the fixed selection positions (never "end", never positions few traces reach)."""
    vals = [aucs[str(t)] for t in SELECT_POSITIONS if str(t) in aucs and not math.isnan(aucs[str(t)])]
    return float(np.mean(vals)) if vals else math.nan


def _aucs_at(scores: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    out = {}
    for k, s in scores.items():
        m = ~np.isnan(s)
        out[k] = auroc(s[m], y[m])
    return out


QUANTILE_FROM = 32  #: r quantiles are taken over positions >= this (the steerer's default warm-up)
QUANTILE_LEVELS = tuple(round(0.01 * i, 2) for i in range(1, 100))


def r_quantiles(rm: RewardModel, latents: list[torch.Tensor]) -> dict:
    """Quantiles of the reward probability r over every position >= QUANTILE_FROM of ``latents``.

    Stored with the reward model (``metrics["r_quantiles"]``) so the gate can be set on a calibrated scale.
    """
    scores = score_traces(rm, latents)
    parts = [torch.sigmoid(s[QUANTILE_FROM:]) for s in scores if len(s) > QUANTILE_FROM]
    if not parts:
        return dict(from_position=QUANTILE_FROM, n=0, levels=[], values=[])
    r = torch.cat(parts)
    vals = torch.quantile(r.double(), torch.tensor(QUANTILE_LEVELS, dtype=torch.float64))
    return dict(from_position=QUANTILE_FROM, n=len(r), levels=list(QUANTILE_LEVELS), values=vals.tolist())


def reward_quantile(rm, q: float) -> float:
    """The reward probability at quantile ``q`` of the reward model's calibration traces (interpolated)."""
    cal = (getattr(rm, "metrics", None) or {}).get("r_quantiles") or {}
    if not cal.get("values"):
        raise LRSError(
            "this reward model has no r quantiles (trained before calibration existed, or on traces shorter "
            f"than {QUANTILE_FROM} tokens): retrain it with `lrs train-reward`, or set tau_r instead"
        )
    levels, values = [0.0, *cal["levels"], 1.0], [0.0, *cal["values"], 1.0]
    return float(np.interp(q, levels, values))

"""Latent reward steering: steer the residual stream at decode time along the latent reward gradient.

A forward hook on decoder block L reads the current token's state h (one row per sequence), encodes it,
scores the row's latent history with the reward model, and where the gate fires takes K normalised
gradient-ascent steps on the reward logit in latent space; the decoded change is added to h at the current
position only. A causal reward model is scored incrementally (its per-layer keys/values over the window are
cached per row, so a token costs one position, and the gradient steps run through the newest position's own
path only); the scores equal the full-window ones, which equal the training-time ones. Prompt positions (the prefill call), padding and finished rows are never touched. The KV
cache stays on, so the corrected state flows into the cache of the layers above L. Every per-row tensor
(latent history, gate, gradient) lives on the model's device; nothing is copied to the host per token.

With ``log_events`` the steerer also keeps, per generated token, the reward of the (pre-steer) latent history
and the gate's inputs, and per steering event the reward after the change, the gate's reason, |Δh|/|h| and
the latent before and after; these stay on the device until the batch ends and are copied to the host once.
Logging only reads: the steered tokens are the same with and without it. :meth:`LatentRewardSteerer.shadow`
gives the same scorer with the gate forced off, to score an unsteered run exactly as LRS would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from lrs.artifacts import tensor_hash
from lrs.encoders import check_compatible, encoder_hash
from lrs.errors import LRSError
from lrs.generation import DecodeTracker, layer_output, replace_layer_output
from lrs.models import decoder_layers, hidden_size, model_fingerprint
from lrs.reward.model import reward_quantile
from lrs.steering.base import Steerer, hooked


@dataclass
class Gate:
    """Fire where the reward probability ``r < tau_r`` or the previous top-token probability ``c < tau_c``.

    ``mode="always"`` is LRS basic (no gate); ``mode="never"`` records scores without steering.
    """

    tau_r: float = 0.9
    tau_c: float = 0.72
    mode: str = "gated"

    def __post_init__(self) -> None:
        if self.mode not in ("gated", "always", "never"):
            raise LRSError(f"unknown gate mode '{self.mode}': use gated, always or never")

    def fires(self, r: torch.Tensor, c_prev: torch.Tensor) -> torch.Tensor:
        if self.mode == "always":
            return torch.ones_like(r, dtype=torch.bool)
        if self.mode == "never":
            return torch.zeros_like(r, dtype=torch.bool)
        return (r < self.tau_r) | (c_prev < self.tau_c)

    def reasons(self, r: torch.Tensor, c_prev: torch.Tensor) -> torch.Tensor:
        """Why the gate fired, as an index into :data:`GATE_REASONS` (logging only)."""
        if self.mode != "gated":
            return torch.zeros_like(r, dtype=torch.long)
        return (r < self.tau_r).long() + 2 * (c_prev < self.tau_c).long()


@dataclass
class SteerConfig:
    """Hyper-parameters of latent reward steering (choose them on dev data with ``lrs tune``)."""

    k: int = 2  #: gradient-ascent steps per steered token
    alpha: float = 0.3  #: step size in latent space (normalised gradient)
    tau_r: float = 0.9  #: gate: steer when the reward probability is below this
    tau_c: float = 0.72  #: gate: ... or when the previous token's top probability is below this
    gate: str = "gated"  #: gated | always (LRS basic) | never
    warmup: int = 32  #: no steering in the first N generated tokens
    every: int = 4  #: steer a row at most once every N tokens
    window: int | None = None  #: latent history kept per row (default: the reward model's window)
    max_dz: float | None = None  #: clip on the latent change norm
    control: str = "reward"  #: reward | random (same gate and |dh|, random direction)
    seed: int = 0  #: seed of the random control's directions
    #: gate on a calibrated scale: tau_r becomes this quantile of r on the reward model's selection traces
    #: (positions >= 32), so "steer the weakest 20 % of states" (0.2) means the same for any reward model
    tau_r_quantile: float | None = None

    def __post_init__(self) -> None:
        if self.control not in ("reward", "random"):
            raise LRSError(f"unknown steering control '{self.control}': use reward or random")
        Gate(self.tau_r, self.tau_c, self.gate)
        for name in ("alpha", "tau_r", "tau_c"):
            v = float(getattr(self, name))
            if v != v or v in (float("inf"), float("-inf")):
                raise LRSError(f"steering setting {name} must be a finite number, got {v}")
        if self.max_dz is not None and not (self.max_dz > 0 and self.max_dz != float("inf")):
            raise LRSError(f"max_dz must be a positive finite number, got {self.max_dz}")
        if self.k < 1 or self.alpha < 0 or self.every < 1 or (self.window is not None and self.window < 1):
            raise LRSError("steering needs k >= 1, alpha >= 0, every >= 1 and window >= 1")
        if self.warmup < 0:
            raise LRSError(f"warmup must be >= 0, got {self.warmup}")
        q = self.tau_r_quantile
        if q is not None and not (0.0 <= float(q) <= 1.0):
            raise LRSError(f"tau_r_quantile must be in [0, 1], got {q}")


def check_pair(encoder, reward_model) -> None:
    """Refuse an encoder and a reward model that were not trained together (one line each)."""
    n = getattr(reward_model, "n_latents", None)
    if n is not None and n != encoder.n_latents:
        raise LRSError(
            f"the reward model reads {n} latents but the encoder has {encoder.n_latents}: "
            "use the reward model trained on this encoder (`lrs train-reward --encoder ...`)"
        )
    prov = getattr(reward_model, "provenance", None) or {}
    want = prov.get("encoder_hash")
    if want and want != encoder_hash(encoder):
        raise LRSError(
            f"the reward model was trained on another encoder (hash {want[:12]}, this one "
            f"{encoder_hash(encoder)[:12]}): retrain it with `lrs train-reward --encoder <this encoder>`"
        )
    layer = prov.get("layer")
    if layer is not None and encoder.layer is not None and layer != encoder.layer:
        raise LRSError(
            f"the reward model was trained at layer {layer} but the encoder reads layer {encoder.layer}"
        )


def check_model(encoder, model) -> None:
    """Refuse an encoder fitted for another model width, a layer the model lacks, or another model."""
    check_compatible(
        encoder, hidden_size(model), None
    )  # width (the layer is checked against the model below)
    n = len(decoder_layers(model))
    if not 0 <= encoder.layer < n:
        raise LRSError(f"the encoder reads layer {encoder.layer} but the model has {n} decoder layers")
    want = (getattr(encoder, "provenance", None) or {}).get("model_fingerprint")
    have = model_fingerprint(model) if want else None
    if want and want != have:
        raise LRSError(
            f"the encoder was fitted on another model (fingerprint {want}, this model {have}): "
            "fit an encoder on this model's traces"
        )


#: gate reasons of a steering event, indexed by the code kept on the device (see :meth:`Gate.reasons`)
GATE_REASONS = ("always", "reward", "confidence", "both")


@dataclass
class _StepLog:
    """What one decode step logs (tensors on the model's device; copied to the host once, at the batch's end).

    ``r`` [B] reward probability of each row's newest (pre-steer) latent; ``c`` [B] previous top-token
    probability the gate read (None at the prefill); ``live`` [B]; for the ``rows`` steered at this step:
    ``dh`` |Δh|, ``dh_rel`` |Δh|/|h|, ``r_post`` reward after the change, ``gate`` reason code, ``z_pre`` /
    ``z_post`` [len(rows), n] the latent before and after (the latter re-encoded from the steered state: what
    the history holds from then on).
    """

    t: int
    r: torch.Tensor
    c: torch.Tensor | None
    live: torch.Tensor
    rows: torch.Tensor | None = None
    dh: torch.Tensor | None = None
    dh_rel: torch.Tensor | None = None
    r_post: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    z_pre: torch.Tensor | None = None
    z_post: torch.Tensor | None = None


class _BatchState:
    """Per-row state of one generate() batch: latent history, last steer step, counters, events.

    The latent history is a ring (one slot write per token instead of rolling the whole tensor); ``z``,
    ``valid`` and ``pos`` give it oldest-first, newest in the last column, as the full-window scorer reads it.
    With a causal reward model (``reward`` given) the state also holds its incremental cache: each layer's
    keys/values over the window, so a token costs one position of the reward model, not a window.
    """

    def __init__(self, batch: int, window: int, n_latents: int, device: torch.device, reward=None):
        self.batch, self.window, self.n = batch, window, 0
        self._z = torch.zeros(batch, window, n_latents, device=device)
        self._valid = torch.zeros(batch, window, dtype=torch.bool, device=device)
        self._pos = torch.zeros(batch, window, dtype=torch.long, device=device)
        self.last = torch.full((batch,), -(10**9), dtype=torch.long, device=device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.steers = torch.zeros(batch, dtype=torch.long, device=device)
        self.skipped = torch.zeros(batch, dtype=torch.long, device=device)
        self.dh_norm = torch.zeros(batch, device=device)
        self.cache = reward.new_cache(batch, device) if reward is not None else None
        self.kv: torch.Tensor | None = None  # the newest position's keys/values, appended after steering
        self.r_post: torch.Tensor | None = None  # steered rows' reward logit after the change (_commit)
        self.step = 0
        #: logging only: one :class:`_StepLog` per forward call, kept on the device until :meth:`_store`
        self.log: list[_StepLog] = []

    def _ordered(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, -(self.n % self.window), dims=1)

    @property
    def z(self) -> torch.Tensor:
        """Latent history [B, W, n], oldest first (a copy)."""
        return self._ordered(self._z)

    @property
    def valid(self) -> torch.Tensor:
        return self._ordered(self._valid)

    @property
    def pos(self) -> torch.Tensor:
        return self._ordered(self._pos)

    @property
    def slot(self) -> int:
        """Ring slot of the newest latent."""
        return (self.n - 1) % self.window

    def push(self, z: torch.Tensor, step: int) -> None:
        slot = self.n % self.window
        self._z[:, slot], self._valid[:, slot], self._pos[:, slot] = z, True, step
        self.n += 1
        self.step = step

    def newest(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The newest latent [B or len(rows), n]."""
        z = self._z[:, self.slot]
        return z if rows is None else z[rows]

    def set_newest(self, rows: torch.Tensor, z: torch.Tensor) -> None:
        self._z[rows, self.slot] = z

    def check_pending(self) -> None:
        """The reward cache must hold every latent but the newest (scored, steered, then committed)."""
        if self.cache.n != self.n - 1:
            raise RuntimeError(f"reward cache holds {self.cache.n} positions, history {self.n}: out of step")


class LatentRewardSteerer(Steerer):
    """Latent reward steering as a context manager: ``with steerer.apply(model): model.generate(...)``.

    ``control="random"`` in the config keeps the gate and the norm of every change but replaces its
    direction by a random one: the matched control that isolates the reward gradient's contribution.
    """

    def __init__(self, encoder, reward_model, config: SteerConfig | None = None, *, log_events: bool = False):
        super().__init__()
        if getattr(encoder, "layer", None) is None:
            raise LRSError("the encoder does not know its layer; fit or load it with a layer")
        check_pair(encoder, reward_model)
        self.encoder = encoder
        self.reward = reward_model.eval()
        self.cfg = config or SteerConfig()
        self.tau_r = self.cfg.tau_r
        if self.cfg.tau_r_quantile is not None:
            self.tau_r = reward_quantile(reward_model, self.cfg.tau_r_quantile)
        self.gate = Gate(self.tau_r, self.cfg.tau_c, self.cfg.gate)
        self.window = self.cfg.window or getattr(getattr(reward_model, "cfg", None), "window", 128)
        self.layer = encoder.layer
        self.log_events = log_events
        self._gen = torch.Generator().manual_seed(self.cfg.seed)

    # ---- public surface -------------------------------------------------------------------------
    def context(self, batch: int | None, indices: list[int] | None, tracker: DecodeTracker):
        """The per-batch hook used by :func:`lrs.generation.generate` (``indices`` map rows to problems)."""
        model = tracker.model
        check_model(self.encoder, model)
        self._to(next(model.parameters()).device, batch)
        block = decoder_layers(model)[self.layer]
        state: dict = {}

        def hook(module, args, output):
            return self._step(output, tracker, state, indices)

        self._flush_cb = lambda: self._store(state.pop("s", None), indices)
        return hooked(block, hook, self._flush_cb)

    def shadow(self) -> LatentRewardSteerer:
        """A scorer that never steers: same encoder, reward model and history window, gate forced off, events
        logged. Attached to an unsteered run it records every token's r exactly as this steerer would see it
        (LRS's own history holds its steered latents, so the two agree up to its first steering event)."""
        cfg = replace(self.cfg, gate="never", control="reward")
        return LatentRewardSteerer(self.encoder, self.reward, cfg, log_events=True)

    def fingerprint(self) -> dict:
        return dict(
            kind="latent",
            config=asdict(self.cfg),
            window=self.window,
            encoder=encoder_hash(self.encoder),
            reward=tensor_hash(self.reward.tensors()) if hasattr(self.reward, "tensors") else None,
        )

    def stats(self) -> dict:
        """Totals over everything steered so far: steer rate, steered tokens, skipped NaN steps, mean |dh|."""
        rows = self._rows.values()
        steps = sum(r["steer_steps"] for r in rows)
        steers = sum(r["steers"] for r in rows)
        dh = sum(r["mean_dh"] * r["steers"] for r in rows)
        return dict(
            steer_rate=steers / steps if steps else 0.0,
            steered_tokens=steers,
            generated_steps=steps,
            nan_skipped=sum(r["nan_skipped"] for r in rows),
            mean_dh_norm=dh / steers if steers else 0.0,
            # tau_r as the gate used it: with tau_r_quantile, the quantile's value, not the unused default
            config=asdict(self.cfg) | {"tau_r": float(self.tau_r)},
        )

    # ---- the hook ---------------------------------------------------------------------------------
    def _to(self, device: torch.device, batch: int | None = None) -> None:
        """Move encoder and reward model to ``device``; seed the random control per batch (so a resumed
        evaluation draws the same directions for a batch as an uninterrupted one)."""
        for m in (self.encoder, self.reward):
            if hasattr(m, "to"):
                m.to(device)
        if batch is not None or self._gen.device != device:
            seed = self.cfg.seed if batch is None else self.cfg.seed * 1_000_003 + batch
            self._gen = torch.Generator(device=device).manual_seed(seed)

    def _store(self, s: _BatchState | None, indices: list[int] | None) -> None:
        if s is None:
            return
        steps, steers, skipped, dh = (x.tolist() for x in (s.steps, s.steers, s.skipped, s.dh_norm))
        events = self._events(s) if self.log_events else None
        for row in range(len(steps)):
            n = steers[row]
            rec = dict(
                steer_steps=steps[row], steers=n, nan_skipped=skipped[row], mean_dh=dh[row] / n if n else 0.0
            )
            if events is not None:
                rec["events"] = events[row]
            self._rows[self._key(indices, row)] = rec

    @staticmethod
    def _events(s: _BatchState) -> list[list[dict]]:
        """Per row, one dict per generated token (``t`` = token index, from 0), copied to the host once per batch.

        Every entry has ``t``, ``r`` (reward probability of the pre-steer latent history), ``c`` (the previous
        token's top probability the gate read; None for token 0), ``steered`` and ``dh`` (|Δh|, 0 if not
        steered). Steered entries add ``r_post`` (reward after the change), ``gate`` (reward / confidence / both /
        always), ``dh_rel`` (|Δh|/|h|), ``z_pre`` and ``z_post`` (the latent before and after, float32 CPU
        tensors [n]; ``evaluate`` writes them inline or to a sidecar file).
        """
        out: list[list[dict]] = [[] for _ in range(s.batch)]
        if not s.log:
            return out
        nan = torch.full_like(s.log[0].r, float("nan"))
        r = torch.stack([e.r for e in s.log]).tolist()
        c = torch.stack([e.c if e.c is not None else nan for e in s.log]).tolist()
        live = torch.stack([e.live for e in s.log]).tolist()
        at: dict[tuple[int, int], dict] = {}
        for i, e in enumerate(s.log):
            for b in range(s.batch):
                if live[i][b]:
                    cb = c[i][b]
                    d = dict(
                        t=e.t,
                        r=round(r[i][b], 4),
                        c=None if cb != cb else round(cb, 4),
                        steered=False,
                        dh=0.0,
                    )
                    out[b].append(d)
                    at[(b, e.t)] = d
        ev = [e for e in s.log if e.rows is not None]
        if ev:
            ts = [e.t for e in ev for _ in range(len(e.rows))]
            rows, dh, dh_rel, r_post, gate = (
                torch.cat([getattr(e, k) for e in ev]).tolist()
                for k in ("rows", "dh", "dh_rel", "r_post", "gate")
            )
            # latents stay tensors (float32, on the host): a wide encoder's would be huge as Python lists
            z_pre, z_post = (
                torch.cat([getattr(e, k) for e in ev]).float().cpu() for k in ("z_pre", "z_post")
            )
            for j, (t, b) in enumerate(zip(ts, rows, strict=True)):
                at[(b, t)].update(
                    steered=True,
                    dh=round(dh[j], 4),
                    r_post=round(r_post[j], 4),
                    gate=GATE_REASONS[gate[j]],
                    dh_rel=round(dh_rel[j], 5),
                    z_pre=z_pre[j],
                    z_post=z_post[j],
                )
        return out

    def _encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(h.detach()).float()

    def _incremental_reward(self):
        """The reward model if it can score the newest position incrementally with scores equal to the
        full-window ones (causal, eval mode, history at least its window), else None (full-window path)."""
        rm = self.reward
        cfg = getattr(rm, "cfg", None)
        if cfg is None or not getattr(rm, "incremental", False) or self.window < cfg.window:
            return None
        return rm

    def _step(self, output, tracker: DecodeTracker, state: dict, indices: list[int] | None):
        h = layer_output(output)
        step = tracker.step
        if step == 0:  # prefill: record the last prompt position's latent, never steer prompt positions
            self._store(state.pop("s", None), indices)  # a previous generate() call under apply()
            state["s"] = s = _BatchState(
                h.shape[0], self.window, self.encoder.n_latents, h.device, self._incremental_reward()
            )
            s.push(self._encode(h[:, -1]), 0)
            logit = self._score(s) if s.cache is not None or self.log_events else None
            if s.cache is not None:
                self._commit(s)
            if self.log_events:  # token 0's reward (read-only: the full-window scorer keeps no state)
                s.log.append(_StepLog(0, torch.sigmoid(logit), None, tracker.live))
            return None
        s: _BatchState = state["s"]
        live = tracker.live
        cur = h[:, -1].detach()
        s.push(self._encode(cur), step)
        s.steps += live.long()
        need_r = self.gate.mode == "gated" or self.log_events
        ones = torch.ones(h.shape[0], device=h.device)
        # the incremental cache needs every position's keys/values, whatever the gate
        logit = self._score(s) if need_r or s.cache is not None else None
        r = torch.sigmoid(logit) if need_r else ones
        c_prev = tracker.conf_prev if tracker.conf_prev is not None else ones
        fire = (
            live & (step >= self.cfg.warmup) & (step - s.last >= self.cfg.every) & self.gate.fires(r, c_prev)
        )
        gated = fire.nonzero().flatten()
        rows = gated
        log = _StepLog(step, r, tracker.conf_prev, live) if self.log_events else None
        if len(gated):
            dh, ok = self._delta(s, gated, cur[gated])
            rows, dh = gated[ok], dh[ok]
            s.skipped[gated[~ok]] += 1
            if len(rows):
                if log is not None:
                    log.z_pre = s.newest(rows).clone()
                h = h.clone()
                h[rows, -1] += dh.to(h.dtype)
                s.set_newest(rows, self._encode(h[rows, -1]))
                s.last[rows] = step
                s.steers[rows] += 1
                norms = dh.float().norm(dim=-1)
                s.dh_norm[rows] += norms
                if log is not None:
                    log.rows, log.dh, log.z_post = rows, norms, s.newest(rows).clone()
                    log.dh_rel = norms / cur[rows].float().norm(dim=-1).clamp_min(1e-12)
                    log.gate = self.gate.reasons(r[rows], c_prev[rows])
        if s.cache is not None:
            self._commit(s, rows if len(rows) else None)
        if log is not None:
            if log.rows is not None:  # the reward the next tokens see: the history with the steered latent
                post = s.r_post if s.cache is not None else self._score_rows(s, rows)
                log.r_post = torch.sigmoid(post.float())
            s.log.append(log)
        return replace_layer_output(output, h) if len(rows) else None

    def _score_rows(self, s: _BatchState, rows: torch.Tensor) -> torch.Tensor:
        """Full-window reward logit of ``rows``' current history (logging only: read-only)."""
        with torch.no_grad():
            return self.reward.score_last(s.z[rows], s.valid[rows], s.pos[rows]).float()

    def _score(self, s: _BatchState) -> torch.Tensor:
        """Reward logit [B] of each row's newest latent. Incremental (causal): one position through the cached
        window, its keys/values kept in ``s.kv`` for :meth:`_commit`; else the full window (mlp, bidirectional)."""
        with torch.no_grad():
            if s.cache is None:
                return self.reward.score_last(s.z, s.valid, s.pos).float()
            s.check_pending()
            logit, s.kv = self.reward.score_step(s.newest(), s.cache, self._positions(s, s.batch))
            return logit.float()

    def _positions(self, s: _BatchState, n: int) -> torch.Tensor:
        return torch.full((n,), s.step, dtype=torch.long, device=s.cache.valid.device)

    def _commit(self, s: _BatchState, rows: torch.Tensor | None = None) -> None:
        """Append the newest position to the cache; ``rows`` were steered: their keys/values are recomputed from
        the steered latent first (the next tokens see the corrected state, as the full-window path does)."""
        s.check_pending()
        with torch.no_grad():
            if rows is not None:
                sub = s.cache if len(rows) == s.batch else s.cache.select(rows)
                s.r_post, kv = self.reward.score_step(s.newest(rows), sub, self._positions(s, len(rows)))
                s.kv[:, :, rows] = kv
        s.cache.append(s.kv)
        s.kv = None

    def _matched_random(self, z0: torch.Tensor, dz: torch.Tensor, dh: torch.Tensor, h: torch.Tensor):
        """The matched control: a random unit direction *in latent space* with LRS's |dz|, decoded through the
        same ``decode_delta`` (same span, same rescale), then scaled to LRS's |dh| on the same rows."""
        u = torch.randn(dz.shape, generator=self._gen, device=dz.device)
        dz_r = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) * dz.norm(dim=-1, keepdim=True)
        dh_r = self.encoder.decode_delta(z0 + dz_r, z0, h).float()
        return dh_r / dh_r.norm(dim=-1, keepdim=True).clamp_min(1e-12) * dh.norm(dim=-1, keepdim=True)

    def _delta(
        self, s: _BatchState, rows: torch.Tensor, h_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K normalised ascent steps on the reward logit for the gated rows; returns (dh, finite mask)."""
        z0 = s.newest(rows).clone()
        zk, ok = self._ascend(s, rows, z0)
        dz = zk - z0
        if self.cfg.max_dz is not None:
            n = dz.norm(dim=-1, keepdim=True)
            dz = dz * torch.clamp(self.cfg.max_dz / n.clamp_min(1e-12), max=1.0)
        dh = self.encoder.decode_delta(z0 + dz, z0, h_rows.float()).float()
        if self.cfg.control == "random":
            dh = self._matched_random(z0, dz, dh, h_rows.float())
        ok &= torch.isfinite(dh).all(dim=-1)
        return dh.to(h_rows.dtype), ok

    def _ascend(
        self, s: _BatchState, rows: torch.Tensor, z0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The K gradient steps from the newest latents ``z0`` of ``rows``; returns (z_K, finite mask).

        Incremental: only the newest position's own path depends on its latent (older positions' cached
        keys/values do not), so each step is one position forward and backward. Else the full window."""
        if s.cache is not None:
            s.check_pending()
            sub = s.cache if len(rows) == s.batch else s.cache.select(rows)
            pos = self._positions(s, len(rows))

            def logit_of(z):
                return self.reward.score_step(z, sub, pos)[0]

        else:
            hist, valid, pos = s.z[rows], s.valid[rows], s.pos[rows]

            def logit_of(z):
                return self.reward.score_last(torch.cat([hist[:, :-1], z.unsqueeze(1)], dim=1), valid, pos)

        zk = z0.clone()
        ok = torch.ones(len(rows), dtype=torch.bool, device=z0.device)
        with torch.enable_grad():
            for _ in range(self.cfg.k):
                zk = zk.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(logit_of(zk).sum(), zk)
                norm = g.norm(dim=-1, keepdim=True)
                good = torch.isfinite(norm).squeeze(-1) & (norm.squeeze(-1) > 0)
                ok &= good
                zk = zk.detach() + self.cfg.alpha * torch.where(good[:, None], g / norm.clamp_min(1e-12), 0.0)
        return zk.detach(), ok

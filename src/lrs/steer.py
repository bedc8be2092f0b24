"""Stage 3: steer the residual stream at decode time along the latent reward gradient.

A forward hook on decoder block L reads the current token's state h (one row per sequence), encodes it,
scores the row's latent history with the reward model, and where the gate fires takes K normalised
gradient-ascent steps on the reward logit in latent space; the decoded change is added to h at the current
position only. Prompt positions (the prefill call), padding and finished rows are never touched. The KV
cache stays on, so the corrected state flows into the cache of the layers above L.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from lrs.encoders import check_compatible
from lrs.errors import LRSError
from lrs.generation import DecodeTracker, eos_ids, layer_output, replace_layer_output
from lrs.models import decoder_layers, hidden_size


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


@dataclass
class SteerConfig:
    """Hyper-parameters of latent reward steering (choose them on dev data with ``lrs tune``)."""

    k: int = 2  # gradient-ascent steps per steered token
    alpha: float = 0.3  # step size in latent space (normalised gradient)
    tau_r: float = 0.9  # gate: steer when reward probability is below this
    tau_c: float = 0.72  # gate: ... or when the previous token's top probability is below this
    gate: str = "gated"  # gated | always (LRS basic) | never
    warmup: int = 32  # no steering in the first N generated tokens
    every: int = 4  # steer a row at most once every N tokens
    window: int | None = None  # latent history kept per row (default: the reward model's window)
    max_dz: float | None = None  # clip on the latent change norm
    control: str = "reward"  # reward | random (same gate and |dh|, random direction)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.control not in ("reward", "random"):
            raise LRSError(f"unknown steering control '{self.control}': use reward or random")
        if self.k < 1 or self.alpha < 0 or self.every < 1 or (self.window is not None and self.window < 1):
            raise LRSError("steering needs k >= 1, alpha >= 0, every >= 1 and window >= 1")


@contextlib.contextmanager
def _hooked(block, hook, on_exit):
    """Register ``hook`` on ``block`` for the duration of the block, then call ``on_exit`` (stats)."""
    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        on_exit()


class _Steerer:
    """Shared surface of the steerers: ``apply`` for plain ``model.generate`` and per-row stats."""

    _rows: dict[int, dict]
    _needs_conf = True  # whether the gate reads the previous step's top-token probability

    @contextlib.contextmanager
    def apply(self, model, tokenizer=None):
        """Steer every ``model.generate`` call inside the block (rows are keyed by batch position)."""
        stop = eos_ids(model, tokenizer) if tokenizer is not None else eos_ids(model, _NoTok())
        tracker = DecodeTracker(model, stop, record_conf=self._needs_conf)
        with tracker.attach(), self.context(0, None, tracker):
            yield self

    def context(self, batch: int, indices: list[int] | None, tracker: DecodeTracker):
        raise NotImplementedError

    def row_stats(self) -> dict[int, dict]:
        """Per-row counters (and events if logging) keyed by problem index; cleared by :meth:`reset`."""
        return self._rows

    def reset(self) -> None:
        self._rows = {}


class _BatchState:
    """Per-row state of one generate() batch: latent history, last steer step, counters, events."""

    def __init__(self, batch: int, window: int, n_latents: int):
        self.z = torch.zeros(batch, window, n_latents)
        self.valid = torch.zeros(batch, window, dtype=torch.bool)
        self.pos = torch.zeros(batch, window, dtype=torch.long)
        self.last = torch.full((batch,), -(10**9), dtype=torch.long)
        self.steps = torch.zeros(batch, dtype=torch.long)
        self.steers = torch.zeros(batch, dtype=torch.long)
        self.skipped = torch.zeros(batch, dtype=torch.long)
        self.dh_norm = torch.zeros(batch)
        self.events: list[list[dict]] = [[] for _ in range(batch)]

    def push(self, z: torch.Tensor, step: int) -> None:
        self.z = torch.roll(self.z, -1, dims=1)
        self.valid = torch.roll(self.valid, -1, dims=1)
        self.pos = torch.roll(self.pos, -1, dims=1)
        self.z[:, -1], self.valid[:, -1], self.pos[:, -1] = z, True, step


class LatentRewardSteerer(_Steerer):
    """Latent reward steering as a context manager: ``with steerer.apply(model): model.generate(...)``."""

    def __init__(self, encoder, reward_model, config: SteerConfig | None = None, *, log_events: bool = False):
        self.encoder = encoder
        self.reward = reward_model.eval()
        self.cfg = config or SteerConfig()
        self.gate = Gate(self.cfg.tau_r, self.cfg.tau_c, self.cfg.gate)
        self.window = self.cfg.window or getattr(getattr(reward_model, "cfg", None), "window", 128)
        self.layer = encoder.layer
        self.log_events = log_events
        self._rows: dict[int, dict] = {}
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        if self.layer is None:
            raise LRSError("the encoder does not know its layer; fit or load it with a layer")

    # ---- public surface -------------------------------------------------------------------------
    def context(self, batch: int, indices: list[int] | None, tracker: DecodeTracker):
        """The per-batch hook used by :func:`lrs.generation.generate` (``indices`` map rows to problems)."""
        model = tracker.model
        check_compatible(self.encoder, hidden_size(model), self.layer)
        block = decoder_layers(model)[self.layer]
        state: dict = {}

        def hook(module, args, output):
            return self._step(output, tracker, state)

        return _hooked(block, hook, lambda: self._store(state.get("s"), indices))

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
            config=asdict(self.cfg),
        )

    # ---- the hook ---------------------------------------------------------------------------------
    def _store(self, s: _BatchState | None, indices: list[int] | None) -> None:
        if s is None:
            return
        for row in range(s.steps.shape[0]):
            key = indices[row] if indices is not None else len(self._rows)
            n = int(s.steers[row])
            rec = dict(
                steer_steps=int(s.steps[row]),
                steers=n,
                nan_skipped=int(s.skipped[row]),
                mean_dh=float(s.dh_norm[row]) / n if n else 0.0,
            )
            if self.log_events:
                rec["events"] = s.events[row]
            self._rows[key] = rec

    def _step(self, output, tracker: DecodeTracker, state: dict):
        h = layer_output(output)
        step = tracker.step
        if step == 0:  # prefill: record the last prompt position's latent, never steer prompt positions
            state["s"] = s = _BatchState(h.shape[0], self.window, self.encoder.n_latents)
            s.push(self.encoder.encode(h[:, -1].detach()).float().cpu(), 0)
            return None
        s: _BatchState = state["s"]
        live = tracker.live
        cur = h[:, -1].detach()
        z = self.encoder.encode(cur).float().cpu()
        s.push(z, step)
        s.steps += live.long()
        need_r = self.gate.mode == "gated" or self.log_events
        r = torch.sigmoid(self._score(s.z, s.valid, s.pos)) if need_r else torch.ones(h.shape[0])
        c_prev = tracker.conf_prev if tracker.conf_prev is not None else torch.ones(h.shape[0])
        fire = (
            live & (step >= self.cfg.warmup) & (step - s.last >= self.cfg.every) & self.gate.fires(r, c_prev)
        )
        rows = fire.nonzero().flatten()
        dh_rows = torch.zeros(h.shape[0])
        if len(rows):
            dh, ok = self._delta(s, rows, cur[rows])
            rows, dh = rows[ok], dh[ok]
            s.skipped[fire.nonzero().flatten()[~ok]] += 1
            if len(rows):
                h = h.clone()
                h[rows.to(h.device), -1] += dh.to(h.device)
                s.z[rows, -1] = self.encoder.encode(h[rows.to(h.device), -1]).float().cpu()
                s.last[rows] = step
                s.steers[rows] += 1
                norms = dh.float().norm(dim=-1).cpu()
                s.dh_norm[rows] += norms
                dh_rows[rows] = norms
        if self.log_events:
            for b in live.nonzero().flatten().tolist():
                s.events[b].append(
                    dict(
                        t=step,
                        r=round(float(r[b]), 4),
                        c=round(float(c_prev[b]), 4),
                        steered=bool(dh_rows[b] > 0),
                        dh=round(float(dh_rows[b]), 4),
                    )
                )
        return replace_layer_output(output, h) if len(rows) else None

    def _score(self, z, valid, pos) -> torch.Tensor:
        with torch.no_grad():
            return self.reward.score_last(z, valid, pos).float()

    def _delta(
        self, s: _BatchState, rows: torch.Tensor, h_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K normalised ascent steps on the reward logit for the gated rows; returns (dh, finite mask)."""
        hist, valid, pos = s.z[rows].clone(), s.valid[rows], s.pos[rows]
        z0 = hist[:, -1].clone()
        zk = z0.clone()
        ok = torch.ones(len(rows), dtype=torch.bool)
        with torch.enable_grad():
            for _ in range(self.cfg.k):
                zk = zk.detach().requires_grad_(True)
                hist_k = torch.cat([hist[:, :-1], zk.unsqueeze(1)], dim=1)
                logit = self.reward.score_last(hist_k, valid, pos)
                (g,) = torch.autograd.grad(logit.sum(), zk)
                norm = g.norm(dim=-1, keepdim=True)
                good = torch.isfinite(norm).squeeze(-1) & (norm.squeeze(-1) > 0)
                ok &= good
                zk = zk.detach() + self.cfg.alpha * torch.where(good[:, None], g / norm.clamp_min(1e-12), 0.0)
        dz = zk - z0
        if self.cfg.max_dz is not None:
            n = dz.norm(dim=-1, keepdim=True)
            dz = dz * torch.clamp(self.cfg.max_dz / n.clamp_min(1e-12), max=1.0)
        dh = self.encoder.decode_delta(z0 + dz, z0, h_rows.float().cpu()).float()
        if self.cfg.control == "random":
            rnd = torch.randn(dh.shape, generator=self._gen)
            dh = rnd / rnd.norm(dim=-1, keepdim=True) * dh.norm(dim=-1, keepdim=True)
        ok &= torch.isfinite(dh).all(dim=-1)
        return dh.to(h_rows.dtype), ok


class DiffMeanSteerer(_Steerer):
    """Difference-of-means steering (RepE/CAA/SEAL family): add ``alpha * v`` at every generated token."""

    _needs_conf = False  # no gate: skip the per-step softmax over the vocabulary

    def __init__(self, vector: torch.Tensor, layer: int, alpha: float = 1.0):
        self.vector, self.layer, self.alpha = vector.float(), layer, alpha
        self._rows: dict[int, dict] = {}

    @classmethod
    def from_traces(cls, traces, layer: int, alpha: float = 1.0) -> DiffMeanSteerer:
        """v = mean state over correct-trace tokens minus mean over wrong-trace tokens, at ``layer``."""
        sums = {0: None, 1: None}
        counts = {0: 0, 1: 0}
        for t in traces:
            x = t.hidden[layer].float().sum(0)
            sums[t.label] = x if sums[t.label] is None else sums[t.label] + x
            counts[t.label] += t.length
        if not counts[0] or not counts[1]:
            raise LRSError(
                f"diffmean needs correct and wrong traces: found {counts[1]} and {counts[0]} tokens"
            )
        return cls(sums[1] / counts[1] - sums[0] / counts[0], layer, alpha)

    def context(self, batch: int, indices: list[int] | None, tracker: DecodeTracker):
        if self.vector.shape[0] != hidden_size(tracker.model):
            raise LRSError(
                f"diffmean vector width {self.vector.shape[0]} does not match the model's hidden size"
            )
        block = decoder_layers(tracker.model)[self.layer]
        counts = {"steps": None}

        def hook(module, args, output):
            if tracker.step == 0:
                counts["steps"] = torch.zeros(tracker.live.shape[0], dtype=torch.long)
                return None
            h = layer_output(output).clone()
            live = tracker.live.to(h.device)
            h[:, -1] += (self.alpha * self.vector).to(h.dtype).to(h.device) * live[:, None].to(h.dtype)
            counts["steps"] += tracker.live.long()
            return replace_layer_output(output, h)

        def store():
            if counts["steps"] is not None:
                for row, n in enumerate(counts["steps"].tolist()):
                    key = indices[row] if indices is not None else len(self._rows)
                    self._rows[key] = dict(steer_steps=n, steers=n)

        return _hooked(block, hook, store)

    def stats(self) -> dict:
        steps = sum(r["steer_steps"] for r in self._rows.values())
        return dict(
            steer_rate=1.0 if steps else 0.0,
            steered_tokens=steps,
            generated_steps=steps,
            alpha=self.alpha,
            vector_norm=float(self.vector.norm()),
        )


class _NoTok:
    eos_token_id = None

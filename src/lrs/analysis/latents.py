"""Latent interpretability (issue 11, ANALYSES.md §4): what the encoder's latents mean and what steering moves.

Why: LRS edits the residual stream along the reward gradient in latent space. Whether that is a state-specific
correction or, in effect, one fixed vector, and whether the latents it moves relate to verbalised behaviours,
decides how the method's accuracy changes should be read. Four views, all offline:

1. **Activations** per unit over every generated token of a trace collection: mean, std, % > 0, and the
   top contexts from *both* tails (the code is dense and signed), at most 2 per trace, plus random examples
   per activation decile so the extremes do not stand for the whole distribution.
2. **Logit lens** of each unit's decoder direction (needs the model): the direct path W_U·norm(d) through the
   final norm (a positive scale apart, W_U(γ ⊙ d)), and the in-context change W_U·[norm(h + αd) − norm(h)]
   averaged over real layer-L states; the share of the top-50 promoted tokens that open behaviour phrases,
   with its percentile among random unit directions.
3. **Latents × behaviour tags**: AUROC of the unit's value at the state that predicts a sentence's first token
   (computed at the token just before the sentence, so the sentence's own words cannot leak in), with a
   bootstrap CI that resamples whole traces.
4. **What the reward gradient moves**, from logged steering events (``lrs eval --log-tokens`` on a latent
   steering method): per-unit energy share, sign consistency and mean Δz; the share of the first principal
   component of Δh (a fixed vector has all its energy there); the cosine of mean Δh with the diffmean vector.

A *unit* is one latent, or, for dense encoders (identity, n ≥ d) whose single dimensions mean nothing, one of
the top-16 principal directions of the event Δz (of the states when there are no events).

Step alignment (docs/architecture.md): state ``h[s]`` is computed at generated token ``s − 1`` (the last
prompt token for s = 0) and predicts token ``s``. A context shows the tokens before, the state's own token in
⟦ ⟧, and the tokens after it (the first being the one the state predicted).
"""

from __future__ import annotations

import argparse
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrs.analysis.behaviours import TAGS, read_jsonl, tag_text, token_char_spans
from lrs.errors import LRSError
from lrs.stats import auroc, grouped_auroc_ci

FORMAT = "lrs.latents/1"
BEFORE, AFTER = 24, 8  #: context window in tokens
PER_TRACE = 2  #: at most this many top contexts per trace and tail
N_DIRECTIONS = 16  #: principal directions analysed for dense encoders
FIXED_VECTOR_PC1 = 0.9  #: above this PC1 share of Δh energy, steering acts like one gated fixed vector
#: words that open behaviour phrases of the tagger's lexicon (§2.3); the onset token set keeps the variants
#: ("Wait", " wait", …) that the tokenizer encodes as one token
ONSET_WORDS = (
    "wait", "hmm", "actually", "oops", "hold", "alternatively", "instead", "another", "different",
    "verify", "verifying", "verification", "check", "checking", "confirm", "double", "recheck", "validate",
    "ensure", "mistake", "wrong", "incorrect", "error", "recalculate", "reconsider", "redo", "again",
    "first", "firstly", "next", "finally", "step", "plan", "goal", "backwards", "backward", "reverse",
)  # fmt: skip


# ---- units: what the per-unit views are computed on --------------------------------------------------------


@dataclass
class Units:
    """The analysed units: unit k's activation is ``z @ weights[k]`` (a one-hot row for a single latent)."""

    kind: str  #: "latent" or "direction"
    names: list[str]
    weights: np.ndarray  #: [m, n]
    source: str  #: how the units were chosen (one line for the report)

    def activations(self, z: np.ndarray) -> np.ndarray:
        """[T, m] unit activations of latents ``z`` [T, n]."""
        return z @ self.weights.T

    def __len__(self) -> int:
        return len(self.names)


def principal_directions(x: np.ndarray, k: int, *, centre: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` principal directions [k, n] of the rows of ``x`` and every component's energy share.

    Uncentred (``centre=False``) for deltas, so a fixed vector shows up as PC1 holding all the energy
    (centring would remove exactly that part). Signs are fixed: along the rows' mean when uncentred, else
    with the largest-magnitude coordinate positive.
    """
    x = np.asarray(x, dtype=np.float64)
    if centre:
        x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    energy = s**2
    shares = energy / energy.sum() if energy.sum() > 0 else np.zeros_like(energy)
    vt = vt[: min(k, len(vt))]
    if centre:
        sign = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
    else:
        sign = np.sign(vt @ x.mean(0))
    vt = vt * np.where(sign == 0, 1.0, sign)[:, None]
    return vt, shares


def is_dense(kind: str, n_latents: int, d_model: int) -> bool:
    """Whether single latents mean nothing on their own (identity, or at least as wide as the state)."""
    return kind == "identity" or n_latents >= d_model


def choose_units(
    n_latents: int,
    d_model: int,
    kind: str,
    *,
    dz: np.ndarray | None = None,
    z_sample: np.ndarray | None = None,
    max_latents: int = 256,
    n_directions: int = N_DIRECTIONS,
) -> Units:
    """Units for an encoder: every latent; the ``max_latents`` most moved (by events) or most variable ones
    of a wide encoder; or, for a dense encoder (identity, n ≥ d), the top principal directions of the event
    Δz (uncentred) or, without events, of the states (centred)."""
    if is_dense(kind, n_latents, d_model):
        if dz is not None and len(dz) >= 2:
            w, _ = principal_directions(dz, n_directions, centre=False)
            src = f"top-{len(w)} principal directions of the steering events' Δz (uncentred)"
        elif z_sample is not None and len(z_sample) >= 2:
            w, _ = principal_directions(z_sample, n_directions, centre=True)
            src = f"top-{len(w)} principal directions of the layer states (no steering events)"
        else:
            raise LRSError("a dense encoder needs steering events or trace states to find its directions")
        return Units("direction", [f"PC{i + 1}" for i in range(len(w))], w.astype(np.float32), src)
    idx = np.arange(n_latents)
    src = f"all {n_latents} latents"
    if n_latents > max_latents:
        if dz is not None and len(dz):
            score, why = (dz.astype(np.float64) ** 2).mean(0), "largest event energy"
        elif z_sample is not None:
            score, why = z_sample.astype(np.float64).var(0), "largest variance over states"
        else:
            raise LRSError("choosing among many latents needs steering events or trace states")
        idx = np.sort(np.argsort(-score, kind="stable")[:max_latents])
        src = f"{max_latents} of {n_latents} latents with the {why}"
    w = np.zeros((len(idx), n_latents), dtype=np.float32)
    w[np.arange(len(idx)), idx] = 1.0
    return Units("latent", [f"z{i}" for i in idx], w, src)


def _h_ref(encoder) -> torch.Tensor:
    """A state at distance 1 from the encoder's centre: decoding there gives Δh per unit Δz (no rescale)."""
    d = encoder.d_model
    mu = getattr(encoder, "mu", None)
    if isinstance(mu, torch.Tensor):
        return mu.detach().float().cpu() + torch.full((d,), 1 / math.sqrt(d))
    return torch.zeros(d)


@torch.no_grad()
def decode_changes(encoder, z_new: np.ndarray, z_old: np.ndarray | None = None) -> np.ndarray:
    """Δh [E, d] that moves the latent from ``z_old`` (default 0) to ``z_new``, at unit distance from the
    encoder's centre (so an encoder that rescales by ‖h − μ‖ adds no per-state factor)."""
    new = torch.as_tensor(np.asarray(z_new, dtype=np.float32))
    old = torch.zeros_like(new) if z_old is None else torch.as_tensor(np.asarray(z_old, dtype=np.float32))
    h = _h_ref(encoder).expand(len(new), -1)
    return encoder.decode_delta(new, old, h).float().cpu().numpy()


def unit_directions(encoder, units: Units) -> np.ndarray:
    """Each unit's decoder direction in the residual stream [m, d], unit norm (rows of zeros stay zero)."""
    d = decode_changes(encoder, units.weights)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


# ---- steering events ---------------------------------------------------------------------------------------


@dataclass
class Events:
    """Steering events of one eval JSONL: the latent before/after, |Δh|, |Δh|/|h|, gate reason, where."""

    z_pre: np.ndarray  #: [E, n]
    z_post: np.ndarray  #: [E, n]
    dh_norm: np.ndarray  #: [E] |Δh| (nan when not logged)
    dh_rel: np.ndarray  #: [E] |Δh|/|h| (nan when not logged)
    gate: list[str]
    problem: list[str]
    t: np.ndarray  #: [E] generated-token index of the event

    def __len__(self) -> int:
        return len(self.z_pre)


def load_events(path: str | Path) -> Events:
    """The steering events of an ``lrs eval`` JSONL whose records carry ``events`` (latents inline for narrow
    encoders, else in the ``<name>.latents.safetensors`` sidecar next to it)."""
    path = Path(path)
    records = read_jsonl(path)
    side = None
    rows: dict[str, list] = {k: [] for k in ("z_pre", "z_post", "dh", "dh_rel", "gate", "problem", "t")}
    for no, rec in enumerate(records, 1):
        steered = [e for e in rec.get("events") or [] if e.get("steered")]
        if not steered:
            continue
        pid = str(rec.get("id", no))
        if "z_pre" in steered[0]:
            pre = [e["z_pre"] for e in steered]
            post = [e["z_post"] for e in steered]
        else:
            if "latents" not in rec:
                raise LRSError(f"{path}: record {no} has steering events but no latents (z_pre / z_post)")
            if side is None:
                from lrs.evaluate import load_latents

                side = load_latents(path.parent, path.stem)
            if pid not in side:
                raise LRSError(f"{path}: record {no} names latents that its sidecar file does not hold")
            pre, post = side[pid]["z_pre"].numpy(), side[pid]["z_post"].numpy()
        if len(pre) != len(steered):
            raise LRSError(f"{path}: record {no} has {len(steered)} steering events but {len(pre)} latents")
        rows["z_pre"] += list(pre)
        rows["z_post"] += list(post)
        rows["dh"] += [e.get("dh", math.nan) for e in steered]
        rows["dh_rel"] += [e.get("dh_rel", math.nan) for e in steered]
        rows["gate"] += [str(e.get("gate", "?")) for e in steered]
        rows["problem"] += [pid] * len(steered)
        rows["t"] += [int(e.get("t", -1)) for e in steered]
    if not rows["z_pre"]:
        raise LRSError(
            f"{path}: no steering events with latents; evaluate a latent steering method with --log-tokens"
        )
    f = np.float32
    return Events(
        np.asarray(rows["z_pre"], f),
        np.asarray(rows["z_post"], f),
        np.asarray(rows["dh"], f),
        np.asarray(rows["dh_rel"], f),
        rows["gate"],
        rows["problem"],
        np.asarray(rows["t"]),
    )


def reconstruct_dh(encoder, events: Events) -> np.ndarray:
    """Δh [E, d] of the events: the decoded logged latent change, rescaled to the logged |Δh|.

    The log keeps the latent before and after (re-encoded from the steered state) and |Δh|, not Δh itself;
    for the linear encoders here the decoded change has Δh's direction up to the encoder's normalisation.
    """
    dh = decode_changes(encoder, events.z_post, events.z_pre)
    norm = np.linalg.norm(dh, axis=1)
    ok = np.isfinite(events.dh_norm) & (events.dh_norm > 0) & (norm > 0)
    dh[ok] *= (events.dh_norm[ok] / norm[ok])[:, None]
    return dh


def _mean_ci(x: np.ndarray) -> list[float]:
    """Normal-approximation 95 % CI of a mean per column."""
    n = len(x)
    half = 1.96 * x.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(x.shape[1], np.nan)
    m = x.mean(0)
    return [[float(a), float(b)] for a, b in zip(m - half, m + half, strict=True)]


def unit_event_stats(dz: np.ndarray, units: Units) -> dict:
    """Per unit from event latent changes ``dz`` [E, n]: mean Δ (with a 95 % CI), mean |Δ|, the share of the
    total ‖Δz‖² energy along the unit, and the sign consistency P(Δ > 0)."""
    da = units.activations(dz.astype(np.float64))
    total = float((dz.astype(np.float64) ** 2).sum(1).mean())
    return dict(
        mean=da.mean(0).tolist(),
        mean_ci95=_mean_ci(da),
        mean_abs=np.abs(da).mean(0).tolist(),
        energy_share=((da**2).mean(0) / total).tolist() if total > 0 else [None] * len(units),
        sign_consistency=(da > 0).mean(0).tolist(),
    )


def state_dependence(a_pre: np.ndarray, da: np.ndarray) -> float | None:
    """R² of a linear model Δa ~ a_pre (with intercept), pooled over units: how much of the change the state
    explains. None with too few events for the fit (fewer than twice the parameters)."""
    E, m = a_pre.shape
    if E < 2 * (m + 1):
        return None
    X = np.hstack([a_pre, np.ones((E, 1))])
    coef, *_ = np.linalg.lstsq(X, da, rcond=None)
    res = ((da - X @ coef) ** 2).sum()
    tot = ((da - da.mean(0)) ** 2).sum()
    return float(1 - res / tot) if tot > 0 else None


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine of two vectors; None when either is zero."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else None


def delta_geometry(dh: np.ndarray, diffmean: np.ndarray | None = None) -> dict:
    """Is Δh [E, d] nearly one fixed direction? PC1 share of the (uncentred) energy, the top shares, the mean
    pairwise cosine, the cosine of mean Δh with ``diffmean`` and what a random direction would give."""
    dh = np.asarray(dh, dtype=np.float64)
    E, d = dh.shape
    vt, shares = principal_directions(dh, 1, centre=False)
    u = dh / np.maximum(np.linalg.norm(dh, axis=1, keepdims=True), 1e-12)
    s = u.sum(0)
    pairwise = float((s @ s - E) / (E * (E - 1))) if E > 1 else None
    mean = dh.mean(0)
    out = dict(
        n_events=E,
        pc1_share=float(shares[0]),
        pc_shares=shares[:10].tolist(),
        mean_pairwise_cosine=pairwise,
        mean_dh_norm=float(np.linalg.norm(mean)),
        cos_mean_with_pc1=cosine(mean, vt[0]),
        cos_mean_with_diffmean=cosine(mean, diffmean) if diffmean is not None else None,
        cos_pc1_with_diffmean=cosine(vt[0], diffmean) if diffmean is not None else None,
        random_abs_cosine=math.sqrt(2 / (math.pi * d)),  # E|cos| of a random direction in d dimensions
    )
    out["verdict"] = verdict(out["pc1_share"])
    return out


def verdict(pc1_share: float) -> str:
    """The plain-language reading of the PC1 share of the steering deltas."""
    pct = f"{100 * pc1_share:.0f}%"
    if pc1_share > FIXED_VECTOR_PC1:
        return f"LRS behaves like a gated fixed vector: one direction holds {pct} of the steering deltas' energy."
    return f"The steering deltas are state-specific: the first principal component holds only {pct} of their energy."


def event_geometry(
    z_pre: np.ndarray,
    z_post: np.ndarray,
    dh: np.ndarray,
    units: Units,
    *,
    diffmean: np.ndarray | None = None,
) -> dict:
    """What the reward gradient moves: per-unit event statistics, the state dependence of the change, and the
    geometry of Δh (``dh`` [E, d]; the per-event latents ``z_pre``/``z_post`` [E, n])."""
    z_pre, z_post = np.asarray(z_pre, np.float64), np.asarray(z_post, np.float64)
    if z_pre.shape != z_post.shape or len(z_pre) != len(dh):
        raise LRSError("z_pre, z_post and dh need one row per event and equal latent widths")
    dz = z_post - z_pre
    return dict(
        units=unit_event_stats(dz, units),
        dz_norm_mean=float(np.linalg.norm(dz, axis=1).mean()),
        state_r2=state_dependence(units.activations(z_pre), units.activations(dz)),
        dh=delta_geometry(dh, diffmean),
    )


def event_summary(events: Events) -> dict:
    """Gate split (share of events by reason) and the |Δh|/|h| distribution."""
    reasons = sorted(set(events.gate))
    rel = events.dh_rel[np.isfinite(events.dh_rel)]
    q = np.percentile(rel, [10, 50, 90]).tolist() if len(rel) else [None] * 3
    return dict(
        n_events=len(events),
        n_problems=len(set(events.problem)),
        gate_share={r: events.gate.count(r) / len(events) for r in reasons},
        dh_rel=dict(p10=q[0], median=q[1], p90=q[2]),
        dh_norm_median=float(np.nanmedian(events.dh_norm)) if np.isfinite(events.dh_norm).any() else None,
    )


# ---- the reward gradient at real states ------------------------------------------------------------------


def reward_gradients(rm, z: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """∂ reward logit / ∂ z_t [P, n] at the given token indices of one trace's latents ``z`` [T, n], each
    scored over its own history window (as the steering hook scores the newest latent)."""
    W = int(getattr(getattr(rm, "cfg", None), "window", 128))
    n = z.shape[1]
    P = len(positions)
    hist = torch.zeros(P, W, n)
    valid = torch.zeros(P, W, dtype=torch.bool)
    pos = torch.zeros(P, W, dtype=torch.long)
    for i, t in enumerate(positions):
        lo = max(0, t - W + 1)
        k = t + 1 - lo
        hist[i, W - k :] = torch.as_tensor(z[lo : t + 1])
        valid[i, W - k :] = True
        pos[i, W - k :] = torch.arange(lo, t + 1)
    hist.requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(rm.score_last(hist, valid, pos).sum(), hist)
    return g[:, -1].detach().numpy()


def gradient_stats(g: np.ndarray, units: Units) -> dict:
    """Per unit, over reward gradients ``g`` [P, n] at real states: the mean component of the unit gradient
    (signed), the share of ‖g‖² along the unit, and P(component > 0)."""
    g = np.asarray(g, np.float64)
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    g = g[norm[:, 0] > 0]
    gu = units.activations(g / np.linalg.norm(g, axis=1, keepdims=True))
    return dict(
        n_states=len(g),
        mean=gu.mean(0).tolist(),
        energy_share=(gu**2).mean(0).tolist(),
        sign_consistency=(gu > 0).mean(0).tolist(),
    )


# ---- one streamed pass over the traces --------------------------------------------------------------------


@dataclass
class Sentence:
    """A tagged sentence of a trace: tokens [t0, t1), its tags, the unit values at the state that predicts
    token t0 (computed at the token before the sentence) and averaged over the sentence."""

    trace: int
    t0: int
    t1: int
    tags: frozenset[str]
    a_pre: np.ndarray
    a_mean: np.ndarray
    text: str


@dataclass
class Scan:
    """What one pass over the traces keeps: streamed moments, both tails per unit, a random sample of
    positions, the tokens (to show contexts), tagged sentences, real states and reward gradients."""

    m: int
    top_k: int
    count: int = 0
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    positive: np.ndarray | None = None
    high: list[list] = field(default_factory=list)
    low: list[list] = field(default_factory=list)
    sample: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    sentences: list[Sentence] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    gradients: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.total, self.total_sq = np.zeros(self.m), np.zeros(self.m)
        self.positive = np.zeros(self.m)
        self.high, self.low = [[] for _ in range(self.m)], [[] for _ in range(self.m)]

    def add(self, trace: int, a: np.ndarray) -> None:
        """Moments and the tails (at most ``PER_TRACE`` per trace) of one trace's activations [T, m]."""
        self.count += len(a)
        self.total += a.sum(0)
        self.total_sq += (a.astype(np.float64) ** 2).sum(0)
        self.positive += (a > 0).sum(0)
        k = min(PER_TRACE, len(a))
        for heaps, x in ((self.high, a), (self.low, -a)):
            best = np.argpartition(-x, k - 1, axis=0)[:k]
            for u in range(self.m):
                for t in best[:, u]:
                    item = (float(x[t, u]), -trace, int(t))
                    if len(heaps[u]) < self.top_k:
                        heapq.heappush(heaps[u], item)
                    elif item > heaps[u][0]:
                        heapq.heapreplace(heaps[u], item)

    def tail(self, u: int, side: str) -> list[tuple[float, int, int]]:
        """(value, trace, t) of unit ``u``'s tail ``high`` or ``low``, most extreme first."""
        heap = self.high[u] if side == "high" else self.low[u]
        sign = 1.0 if side == "high" else -1.0
        return [(sign * v, -tr, t) for v, tr, t in sorted(heap, reverse=True)]


Segmenter = Callable[[np.ndarray, str], list[tuple[int, int, frozenset[str], str]]]


def make_segmenter(tok) -> Segmenter:
    """Tagged sentences of a trace as (t0, t1, tags, text) from its token ids and generated text, aligning
    sentences to tokens by each token's decoded string (cumulative decoding when those do not add up)."""

    def segment(ids: np.ndarray, text: str) -> list[tuple[int, int, frozenset[str], str]]:
        spans = token_spans(tok, [int(i) for i in ids], text)
        out = []
        for ts in tag_text(text, token_spans=spans):
            if ts.segment.kind != "sentence" or ts.echo or ts.tokens is None:
                continue
            t0, t1 = ts.tokens
            if t0 < min(t1, len(ids)):
                out.append((t0, min(t1, len(ids)), ts.tags, ts.segment.text))
        return out

    return segment


def token_spans(tok, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span of each generated token in ``text`` (= the decoded ids, special tokens skipped)."""
    pieces = [tok.decode([i], skip_special_tokens=True) for i in ids]
    if "".join(pieces) == text:
        return token_char_spans(pieces)
    # multi-byte characters split across tokens: the end of token i is the length of the decoded prefix
    ends = [len(tok.decode(list(ids[: i + 1]), skip_special_tokens=True)) for i in range(len(ids))]
    ends = np.minimum(np.maximum.accumulate(np.asarray(ends, dtype=int)), len(text)).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


@torch.no_grad()
def scan_traces(
    traces,
    encoder,
    units: Units,
    layer: int,
    *,
    top_k: int = 20,
    sample_budget: int = 20000,
    state_budget: int = 500,
    segmenter: Segmenter | None = None,
    reward=None,
    grad_budget: int = 512,
    seed: int = 0,
) -> Scan:
    """One pass over a trace collection (``TraceSet`` or any iterable of traces with ``.hidden``, ``.tokens``,
    ``.id``; texts from ``traces.records`` when present): encode every state and keep what the views need."""
    scan = Scan(len(units), top_k)
    rng = np.random.default_rng(seed)
    records = getattr(traces, "records", None)
    total = sum(r["length"] for r in records) if records else None
    p_sample = min(1.0, sample_budget / total) if total else 1.0
    p_state = min(1.0, state_budget / total) if total else 1.0
    p_grad = min(1.0, grad_budget / total) if total else 1.0
    for i, tr in enumerate(traces):
        h = tr.hidden[layer]
        if len(h) == 0:
            continue
        z = encoder.encode(h).float().cpu().numpy()
        a = units.activations(z)
        scan.ids.append(str(tr.id))
        scan.tokens.append(tr.tokens.numpy().astype(np.int64))
        idx = len(scan.ids) - 1
        scan.add(idx, a)
        for t in np.flatnonzero(rng.random(len(a)) < p_sample):
            scan.sample.append((idx, int(t), a[t]))
        for t in np.flatnonzero(rng.random(len(a)) < p_state):
            scan.states.append(h[t].float().numpy())
        if reward is not None:
            at = np.flatnonzero(rng.random(len(a)) < p_grad)
            if len(at):
                scan.gradients.append(reward_gradients(reward, z, at.tolist()))
        text = records[i].get("text") if records else None
        if segmenter is not None and isinstance(text, str):
            for t0, t1, tags, s in segmenter(scan.tokens[-1], text):
                scan.sentences.append(Sentence(idx, t0, t1, tags, a[t0], a[t0:t1].mean(0), s))
    if scan.count == 0:
        raise LRSError("the trace collection holds no generated tokens")
    return scan


# ---- views computed from the scan ---------------------------------------------------------------------------


def activation_stats(scan: Scan) -> dict:
    """Per unit over every generated token: mean, std, fraction > 0; percentiles (1, 50, 99) and a 40-bin
    histogram of the random sample of positions."""
    mean = scan.total / scan.count
    std = np.sqrt(np.maximum(scan.total_sq / scan.count - mean**2, 0.0))
    sample = np.stack([a for *_, a in scan.sample]) if scan.sample else np.zeros((0, scan.m))
    q = np.percentile(sample, [1, 50, 99], axis=0) if len(sample) else np.full((3, scan.m), np.nan)
    hist = []
    for u in range(scan.m):
        counts, edges = np.histogram(sample[:, u], bins=40) if len(sample) else ([], [])
        hist.append(dict(counts=list(map(int, counts)), edges=[round(float(e), 6) for e in edges]))
    return dict(
        n_tokens=scan.count,
        mean=mean.tolist(),
        std=std.tolist(),
        frac_positive=(scan.positive / scan.count).tolist(),
        p01=q[0].tolist(),
        median=q[1].tolist(),
        p99=q[2].tolist(),
        histogram=hist,
    )


Shower = Callable[[Sequence[int]], str]


def show_ids(ids: Sequence[int]) -> str:
    """Token ids as text when no tokenizer is at hand: ``[12 7 301]``."""
    return "[" + " ".join(str(int(i)) for i in ids) + "]"


def context(scan: Scan, trace: int, t: int, value: float, show: Shower = show_ids) -> dict:
    """The context of state ``t`` of a trace: up to ``BEFORE`` tokens before the state's own token, that token,
    and up to ``AFTER`` tokens after it (the first is the token the state predicted)."""
    tok = scan.tokens[trace]
    own = [int(tok[t - 1])] if t > 0 else []
    return dict(
        trace=scan.ids[trace],
        t=int(t),
        value=round(float(value), 5),
        before=show(tok[max(0, t - 1 - BEFORE) : max(0, t - 1)].tolist()),
        token=show(own) if own else "<prompt end>",
        after=show(tok[t : t + AFTER].tolist()),
    )


def top_contexts(scan: Scan, show: Shower = show_ids, per_decile: int = 5, seed: int = 0) -> list[dict]:
    """Per unit: the top contexts of both tails, and ``per_decile`` random sampled contexts per decile."""
    rng = np.random.default_rng(seed)
    sample = np.stack([a for *_, a in scan.sample]) if scan.sample else np.zeros((0, scan.m))
    out = []
    for u in range(scan.m):
        entry = {
            side: [context(scan, tr, t, v, show) for v, tr, t in scan.tail(u, side)]
            for side in ("high", "low")
        }
        deciles: list[list[dict]] = []
        if len(sample) >= 10:
            edges = np.percentile(sample[:, u], np.arange(10, 100, 10))
            bucket = np.searchsorted(edges, sample[:, u], side="right")
            for b in range(10):
                members = np.flatnonzero(bucket == b)
                pick = (
                    rng.choice(members, size=min(per_decile, len(members)), replace=False)
                    if len(members)
                    else []
                )
                deciles.append([context(scan, *scan.sample[j][:2], sample[j, u], show) for j in sorted(pick)])
        entry["deciles"] = deciles
        out.append(entry)
    return out


def top_sentences(scan: Scan, k: int = 5) -> list[dict]:
    """Per unit: the ``k`` sentences with the highest and the lowest mean activation (the SAE was trained on
    sentence means, so this is the view closest to its training)."""
    if not scan.sentences:
        return []
    means = np.stack([s.a_mean for s in scan.sentences])
    out = []
    for u in range(scan.m):
        order = np.argsort(-means[:, u], kind="stable")
        row = {}
        for side, idx in (("high", order[:k]), ("low", order[::-1][:k])):
            row[side] = [
                dict(
                    trace=scan.ids[scan.sentences[j].trace],
                    value=round(float(means[j, u]), 5),
                    tags=sorted(scan.sentences[j].tags),
                    text=scan.sentences[j].text[:240],
                )
                for j in idx
            ]
        out.append(row)
    return out


def tag_auroc(
    scan: Scan,
    names: Sequence[str],
    *,
    n_boot: int = 500,
    min_class: int = 5,
    max_ci_cells: int = 96,
    seed: int = 0,
) -> dict:
    """AUROC per (unit, tag) of the unit's value at the state predicting each sentence's first token, with a
    95 % CI from a bootstrap over traces (for the ``max_ci_cells`` cells furthest from 0.5, when both classes
    have at least ``min_class`` sentences) and the point-biserial r."""
    if not scan.sentences:
        return dict(n_sentences=0, tags={})
    x = np.stack([s.a_pre for s in scan.sentences])
    groups = [s.trace for s in scan.sentences]
    cells = {}
    for tag in TAGS:
        y = np.array([tag in s.tags for s in scan.sentences])
        row = dict(positives=int(y.sum()), auroc=[], r=[], ci95=[None] * scan.m)
        for u in range(scan.m):
            row["auroc"].append(auroc(x[:, u], y))
            sd = x[:, u].std()
            row["r"].append(float(np.corrcoef(x[:, u], y)[0, 1]) if sd > 0 and 0 < y.sum() < len(y) else None)
        cells[tag] = row
    ranked = sorted(
        (
            (abs(a - 0.5), tag, u)
            for tag, row in cells.items()
            for u, a in enumerate(row["auroc"])
            if not math.isnan(a) and min(row["positives"], len(x) - row["positives"]) >= min_class
        ),
        reverse=True,
    )
    for _, tag, u in ranked[:max_ci_cells]:
        y = np.array([tag in s.tags for s in scan.sentences])
        lo, hi = grouped_auroc_ci(x[:, u], y, groups, n_boot=n_boot, seed=seed)
        cells[tag]["ci95"][u] = None if math.isnan(lo) else [lo, hi]  # nan: too few traces to resample
    return dict(n_sentences=len(x), n_traces=len(set(groups)), units=list(names), tags=cells)


# ---- logit lens (reuses lrs.trainers.analysis.logit_lens) --------------------------------------------------


def _lens_table(model, tok, vectors: Mapping[str, np.ndarray], kind: str, top: int) -> dict[str, dict]:
    """Promoted / suppressed tokens of each vector through ``logit_lens`` (``kind`` "norm": through the final
    norm; "raw": the vector itself), with the logits centred over the vocabulary."""
    from lrs.trainers.analysis import final_norm, logit_lens

    names = list(vectors)
    vecs = {i: torch.as_tensor(np.asarray(vectors[k], np.float32)) for i, k in enumerate(names)}
    lens = logit_lens(model, tok, vecs, top=top)
    W = model.get_output_embeddings().weight.detach().float()
    mean_row = W.mean(0)
    norm = final_norm(model) if kind == "norm" else None
    out = {}
    for i, name in enumerate(names):
        entry = lens[i][kind] or lens[i]["raw"]
        u = vecs[i].to(W.device)
        if norm is not None:
            p = next(norm.parameters(), None)
            u = norm(u[None].to(p.dtype if p is not None else u.dtype))[0].float()
        c = float(mean_row @ u)
        out[name] = dict(
            promoted=[(t, round(v - c, 5)) for t, v in entry["dot"]],
            suppressed=[(t, round(v - c, 5)) for t, v in entry["dot_bottom"]],
        )
    return out


@torch.no_grad()
def direct_lens(model, tok, directions: Mapping[str, np.ndarray], top: int = 20) -> dict[str, dict]:
    """Direct path: W_U·norm(d) for each direction d (W_U(γ ⊙ d) up to a positive scale for RMSNorm):
    the ``top`` promoted and suppressed tokens with centred logits."""
    return _lens_table(model, tok, directions, "norm", top)


@torch.no_grad()
def in_context_lens(
    model, tok, directions: Mapping[str, np.ndarray], states: np.ndarray, alpha: float, top: int = 20
) -> dict[str, dict]:
    """In context: mean over real states h of W_U·[norm(h + α d) − norm(h)], for unit directions d. The
    unembedding is linear, so the mean is taken in the residual stream first."""
    from lrs.trainers.analysis import final_norm

    norm = final_norm(model)
    if norm is None:
        raise LRSError("the in-context logit lens needs the model's final norm")
    p = next(norm.parameters())
    h = torch.as_tensor(np.asarray(states, np.float32)).to(p.device)
    base = norm(h.to(p.dtype)).float()
    shifts = {}
    for name, d in directions.items():
        u = torch.as_tensor(np.asarray(d, np.float32)).to(p.device)
        u = u / u.norm().clamp_min(1e-12)
        shifts[name] = (norm((h + alpha * u).to(p.dtype)).float() - base).mean(0).cpu().numpy()
    return _lens_table(model, tok, shifts, "raw", top)


def onset_strings(tok, words: Sequence[str] = ONSET_WORDS) -> set[str]:
    """Decoded strings of the single-token variants (``w``, `` w``, ``W``, `` W``) of behaviour onset words."""
    out = set()
    for w in words:
        for v in (w, " " + w, w.capitalize(), " " + w.capitalize()):
            ids = tok.encode(v, add_special_tokens=False)
            if len(ids) == 1:
                out.add(tok.decode(ids))
    return out


def overlap_score(promoted: Sequence[str], onset: set[str], k: int = 50) -> float:
    """Fraction of the top-``k`` promoted tokens that are behaviour onset tokens."""
    top = list(promoted)[:k]
    return sum(t in onset for t in top) / len(top) if top else 0.0


def percentile(score: float, null: Sequence[float]) -> float:
    """Percentile of ``score`` among ``null`` scores (ties count half)."""
    null = np.asarray(null, float)
    return float(100 * ((null < score).sum() + 0.5 * (null == score).sum()) / len(null))


@torch.no_grad()
def random_overlap(model, tok, onset: set[str], n: int = 1000, k: int = 50, seed: int = 0) -> np.ndarray:
    """Overlap scores of the direct-path lens of ``n`` random unit directions (the null distribution)."""
    d = model.get_output_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g)
    dirs = {str(i): (r[i] / r[i].norm()).numpy() for i in range(n)}
    lens = direct_lens(model, tok, dirs, top=k)
    return np.array([overlap_score([t for t, _ in lens[str(i)]["promoted"]], onset, k) for i in range(n)])


def lens_views(
    model,
    tok,
    directions: Mapping[str, np.ndarray],
    states: np.ndarray,
    alpha: float,
    *,
    top: int = 20,
    n_random: int = 1000,
    seed: int = 0,
) -> dict:
    """Direct and in-context lens of every direction, and the lexicon overlap of its top-50 promoted tokens
    with its percentile among ``n_random`` random unit directions."""
    from lrs.trainers.analysis import final_norm

    direct = direct_lens(model, tok, directions, top=max(top, 50))
    onset = onset_strings(tok)
    null = random_overlap(model, tok, onset, n_random, seed=seed) if onset and n_random else None
    out: dict = dict(alpha=alpha, n_states=len(states), onset_tokens=sorted(onset), n_random=n_random)
    has_norm = final_norm(model) is not None
    ctx = in_context_lens(model, tok, directions, states, alpha, top) if len(states) and has_norm else {}
    out["directions"] = {}
    for name, lens in direct.items():
        promoted = [t for t, _ in lens["promoted"]]
        score = overlap_score(promoted, onset) if onset else None
        out["directions"][name] = dict(
            direct=dict(promoted=lens["promoted"][:top], suppressed=lens["suppressed"][:top]),
            in_context=ctx.get(name),
            lexicon_overlap=score,
            lexicon_percentile=percentile(score, null) if null is not None else None,
        )
    return out


# ---- the whole analysis ------------------------------------------------------------------------------------


def diffmean_vector(traces, layer: int) -> np.ndarray | None:
    """The diffmean direction (mean state of correct minus wrong traces) at ``layer``; None with one class."""
    from lrs.steering.vectors import SteeringVectors

    try:
        return SteeringVectors.from_traces(traces, layer).vector.numpy()
    except LRSError:
        return None


def units_for(traces, encoder, events: Events | None, *, max_latents: int = 256, seed: int = 0) -> Units:
    """The units of an encoder (:func:`choose_units`), reading a sample of trace states only when needed."""
    dz = (events.z_post - events.z_pre) if events is not None else None
    dense = is_dense(encoder.kind, encoder.n_latents, encoder.d_model)
    z_sample = None
    if dz is None or len(dz) < 2 or (encoder.n_latents > max_latents and not dense):
        states = traces.states(encoder.layer, max_states=4096, seed=seed)
        z_sample = encoder.encode(states).float().cpu().numpy()
    return choose_units(
        encoder.n_latents, encoder.d_model, encoder.kind, dz=dz, z_sample=z_sample, max_latents=max_latents
    )


def analyse(
    traces,
    encoder,
    *,
    reward=None,
    events: Events | None = None,
    model=None,
    tok=None,
    top_k: int = 20,
    n_boot: int = 500,
    n_random: int = 1000,
    max_latents: int = 256,
    seed: int = 0,
) -> dict:
    """Every view of this module on a trace collection and an encoder (see the module docstring)."""
    layer = encoder.layer
    if layer is None or layer not in traces.layers:
        raise LRSError(f"the encoder reads layer {layer} but the traces hold layers {traces.layers}")
    units = units_for(traces, encoder, events, max_latents=max_latents, seed=seed)
    scan = scan_traces(
        traces,
        encoder,
        units,
        layer,
        top_k=top_k,
        seed=seed,
        reward=reward,
        segmenter=make_segmenter(tok) if tok is not None else None,
    )
    show = (lambda ids: tok.decode(list(ids))) if tok is not None else show_ids
    diffmean = diffmean_vector(traces, layer)
    result: dict = dict(
        format=FORMAT,
        layer=layer,
        encoder=dict(kind=encoder.kind, n_latents=encoder.n_latents, d_model=encoder.d_model),
        units=dict(
            kind=units.kind,
            names=units.names,
            source=units.source,
            weights=units.weights.tolist() if units.kind == "direction" else None,
        ),
        activations=activation_stats(scan),
        contexts=top_contexts(scan, show, seed=seed),
        sentences=top_sentences(scan),
        tags=tag_auroc(scan, units.names, n_boot=n_boot, seed=seed),
    )
    dh = reconstruct_dh(encoder, events) if events is not None else None
    if events is not None:
        result["events"] = dict(
            summary=event_summary(events),
            **event_geometry(events.z_pre, events.z_post, dh, units, diffmean=diffmean),
        )
    if scan.gradients:
        result["reward_gradient"] = gradient_stats(np.concatenate(scan.gradients), units)
    if model is not None:
        dirs = {n: d for n, d in zip(units.names, unit_directions(encoder, units), strict=True)}
        dirs.update(_extra_directions(dh, diffmean))
        states = np.stack(scan.states) if scan.states else np.zeros((0, encoder.d_model))
        result["lens"] = lens_views(
            model, tok, dirs, states, _lens_alpha(events, states), n_random=n_random, seed=seed
        )
    return result


def _extra_directions(dh: np.ndarray | None, diffmean: np.ndarray | None) -> dict[str, np.ndarray]:
    """Mean Δh and its PC1 (when there are events) and the diffmean vector: directions to read with the lens."""
    out = {}
    if dh is not None and len(dh):
        out["mean Δh"] = dh.mean(0)
        out["Δh PC1"] = principal_directions(dh, 1, centre=False)[0][0]
    if diffmean is not None:
        out["diffmean"] = diffmean
    return {k: v for k, v in out.items() if np.linalg.norm(v) > 0}


def _lens_alpha(events: Events | None, states: np.ndarray) -> float:
    """α of the in-context lens: the median logged |Δh|, else 10 % of the median state norm."""
    if events is not None and np.isfinite(events.dh_norm).any():
        return float(np.nanmedian(events.dh_norm))
    return float(0.1 * np.median(np.linalg.norm(states, axis=1))) if len(states) else 1.0


# ---- Markdown -------------------------------------------------------------------------------------------


def _md_tok(s: str) -> str:
    """A token (or context) safe inside a Markdown table cell."""
    s = str(s).replace("\n", "⏎").replace("`", "'").replace("|", "\\|")
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)  # control bytes as escapes
    return f"`{s}`" if s.strip() else f"`{s}` (space)" if s else "∅"


def _f(x, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _unit_rows(result: dict) -> list[str]:
    names = result["units"]["names"]
    act = result["activations"]
    ev = (result.get("events") or {}).get("units")
    grad = result.get("reward_gradient")
    lens = (result.get("lens") or {}).get("directions", {})
    rows = [
        "| unit | mean | std | % > 0 | top-5 promoted (direct lens) | lexicon overlap (pct) | Δz energy share "
        "| P(Δz > 0) | mean Δz | reward-gradient share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for u, name in enumerate(names):
        ln = lens.get(name)
        top5 = " ".join(_md_tok(t) for t, _ in ln["direct"]["promoted"][:5]) if ln else "–"
        ov = f"{_f(ln['lexicon_overlap'], '.2f')} ({_f(ln['lexicon_percentile'], '.0f')})" if ln else "–"
        rows.append(
            f"| {name} | {_f(act['mean'][u])} | {_f(act['std'][u])} | {_f(100 * act['frac_positive'][u], '.0f')} "
            f"| {top5} | {ov} | {_f(ev['energy_share'][u]) if ev else '–'} "
            f"| {_f(ev['sign_consistency'][u], '.2f') if ev else '–'} | {_f(ev['mean'][u], '+.3g') if ev else '–'} "
            f"| {_f(grad['energy_share'][u]) if grad else '–'} |"
        )
    return rows


def _events_lines(result: dict) -> list[str]:
    ev = result.get("events")
    if not ev:
        return [
            "No steering events given (`--events`): the gradient geometry needs an `lrs eval --log-tokens` run."
        ]
    s, g = ev["summary"], ev["dh"]
    gates = ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["gate_share"].items())
    rel = s["dh_rel"]
    return [
        f"**{g['verdict']}**",
        "",
        f"- {s['n_events']} steering events on {s['n_problems']} problems; gate: {gates}; |Δh|/|h| median "
        f"{_f(rel['median'])} (10–90 %: {_f(rel['p10'])}–{_f(rel['p90'])}).",
        f"- PC1 share of the Δh energy (uncentred) {_f(g['pc1_share'])}; next shares "
        f"{', '.join(_f(x) for x in g['pc_shares'][1:4])}; mean pairwise cosine of Δh {_f(g['mean_pairwise_cosine'])}.",
        f"- cos(mean Δh, diffmean) {_f(g['cos_mean_with_diffmean'])}, cos(Δh PC1, diffmean) "
        f"{_f(g['cos_pc1_with_diffmean'])}; a random direction gives |cos| ≈ {_f(g['random_abs_cosine'])}.",
        f"- State dependence: R² of Δz ~ z over the units {_f(ev['state_r2'])} (share of the change the state explains).",
        "- Δh is the decoded logged latent change rescaled to the logged |Δh| (the log keeps z before/after, not Δh).",
    ]


def _tag_rows(result: dict) -> list[str]:
    t = result["tags"]
    if not t.get("n_sentences"):
        return [
            "No tagged sentences (give `--model` so token ids can be aligned with the traces' sentences)."
        ]
    rows = [
        f"{t['n_sentences']} sentences in {t['n_traces']} traces; value at the state predicting each sentence's first "
        "token; * = the trace-clustered 95 % CI excludes 0.5.",
        "",
        "| unit | " + " | ".join(f"{tag} (n+={t['tags'][tag]['positives']})" for tag in TAGS) + " |",
        "|---|" + "---|" * len(TAGS),
    ]
    for u, name in enumerate(t["units"]):
        cells = []
        for tag in TAGS:
            c = t["tags"][tag]
            a, ci = c["auroc"][u], c["ci95"][u]
            star = "*" if ci and not ci[0] <= 0.5 <= ci[1] else ""
            cells.append(f"{_f(a, '.2f')}{star}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _lens_lines(result: dict) -> list[str]:
    lens = result.get("lens")
    if not lens:
        return ["No model given (`--model`): no logit lens."]
    lines = [
        f"Direct path W_U·norm(d); in context: mean of W_U·[norm(h + αd) − norm(h)] over {lens['n_states']} real "
        f"layer states, α = {_f(lens['alpha'], '.3g')}; logits centred over the vocabulary. Lexicon overlap = share of "
        f"the top-50 promoted tokens that open behaviour phrases ({len(lens['onset_tokens'])} onset tokens), with "
        f"its percentile among {lens['n_random']} random unit directions.",
        "",
        "| direction | promoted (direct) | suppressed (direct) | promoted (in context) | overlap (pct) |",
        "|---|---|---|---|---|",
    ]
    names = result["units"]["names"]
    extra = [n for n in lens["directions"] if n not in names]
    for name in extra + names:
        d = lens["directions"][name]
        ctx = d["in_context"]
        lines.append(
            f"| {name} | {' '.join(_md_tok(t) for t, _ in d['direct']['promoted'][:8])} "
            f"| {' '.join(_md_tok(t) for t, _ in d['direct']['suppressed'][:8])} "
            f"| {' '.join(_md_tok(t) for t, _ in ctx['promoted'][:8]) if ctx else '–'} "
            f"| {_f(d['lexicon_overlap'], '.2f')} ({_f(d['lexicon_percentile'], '.0f')}) |"
        )
    return lines


def _context_lines(result: dict, k: int = 3) -> list[str]:
    lines = []
    for name, c in zip(result["units"]["names"], result["contexts"], strict=True):
        lines.append(f"<details><summary>{name}: top contexts</summary>\n")
        for side in ("high", "low"):
            for x in c[side][:k]:
                lines.append(f"- {side} {x['value']:+.3g} ({x['trace']}, t={x['t']}): "
                             f"{_md_tok(x['before'] + '⟦' + x['token'] + '⟧' + x['after'])}")  # fmt: skip
        lines.append("\n</details>")
    return lines


def markdown(result: dict, figures: Sequence[str] = ()) -> str:
    """The ``## Latents`` report section of an :func:`analyse` result."""
    enc, u = result["encoder"], result["units"]
    out = [
        "## Latents",
        "",
        f"Encoder {enc['kind']} (n = {enc['n_latents']}, d = {enc['d_model']}) at layer {result['layer']}; "
        f"units: {u['source']}; {result['activations']['n_tokens']} generated tokens.",
        "",
        "### What steering moves",
        "",
        *_events_lines(result),
        "",
        "### Units",
        "",
        *_unit_rows(result),
        "",
        "### Units × behaviour tags (AUROC)",
        "",
        *_tag_rows(result),
        "",
        "### Logit lens",
        "",
        *_lens_lines(result),
        "",
        "### Top contexts (⟦state's token⟧, then the tokens it predicted)",
        "",
        *_context_lines(result),
    ]
    out += ["", *[f"![{Path(f).stem}](figures/{f})" for f in figures]] if figures else []
    return "\n".join(out) + "\n"


# ---- figures ----------------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path.name


def _activation_figure(result: dict, path: Path) -> str | None:
    names, hists = result["units"]["names"], result["activations"]["histogram"]
    m = min(16, len(names))
    if m == 0 or not hists[0]["counts"]:
        return None
    cols = min(4, m)
    rows = -(-m // cols)
    fig = _figure(3 * cols, 2.2 * rows)
    for u in range(m):
        ax = fig.add_subplot(rows, cols, u + 1)
        edges = np.asarray(hists[u]["edges"])
        ax.stairs(hists[u]["counts"], edges, fill=True, color="#4a7fb5")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_yscale("log")  # the tails hold the interesting contexts
        ax.set_title(names[u], fontsize=9)
    return _save(fig, path)


def _auroc_figure(result: dict, path: Path) -> str | None:
    t = result["tags"]
    if not t.get("n_sentences"):
        return None
    a = np.array([[np.nan if x is None else x for x in t["tags"][tag]["auroc"]] for tag in TAGS]).T
    fig = _figure(1.2 * len(TAGS) + 2, 0.3 * len(a) + 1.5)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(a, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(TAGS)), TAGS, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(a)), t["units"], fontsize=7)
    for j, tag in enumerate(TAGS):
        for u, ci in enumerate(t["tags"][tag]["ci95"]):
            if ci and not ci[0] <= 0.5 <= ci[1]:
                ax.text(j, u, "*", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, label="AUROC")
    return _save(fig, path)


def _events_figure(result: dict, path: Path) -> str | None:
    ev = result.get("events")
    if not ev:
        return None
    names, st = result["units"]["names"], ev["units"]
    fig = _figure(12, 3.5)
    x = np.arange(len(names))
    ax = fig.add_subplot(1, 3, 1)
    ax.bar(x, [v or 0 for v in st["energy_share"]], color="#4a7fb5")
    ax.set_title("share of Δz energy", fontsize=10)
    ax = fig.add_subplot(1, 3, 2)
    lo, hi = np.array(st["mean_ci95"]).T
    mean = np.array(st["mean"])
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", ms=3, color="#c0392b")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("mean Δz per unit (95% CI)", fontsize=10)
    for a in fig.axes:
        a.set_xticks(x, names, rotation=90, fontsize=6)
    ax = fig.add_subplot(1, 3, 3)
    shares = ev["dh"]["pc_shares"]
    ax.bar(np.arange(1, len(shares) + 1), shares, color="#2a9d4a")
    ax.axhline(FIXED_VECTOR_PC1, color="k", lw=0.5, ls="--")
    ax.set_title("Δh energy per principal component", fontsize=10)
    return _save(fig, path)


# ---- command line -------------------------------------------------------------------------------------------


def _load_model(spec: str, traces, encoder, args: argparse.Namespace):
    """The model and tokenizer of ``--model``, refused unless it is the model the traces were collected with."""
    from lrs.models import hidden_size, load_model, model_fingerprint

    model, tok = load_model(spec, dtype=args.dtype, device=args.device)
    want = traces.config.get("model_fingerprint")
    if want and model_fingerprint(model) != want:
        raise LRSError(f"--model {spec} is not the model the traces were collected with (fingerprint {want})")
    if hidden_size(model) != encoder.d_model:
        raise LRSError(
            f"--model {spec} has width {hidden_size(model)} but the encoder reads {encoder.d_model}"
        )
    return model, tok


def run(args: argparse.Namespace) -> dict:
    """``lrs analyze latents``: read traces, encoder (and reward model, events, model), write JSON, Markdown
    and figures to ``--out``, print a short summary."""
    from lrs.artifacts import atomic_write_json, atomic_write_text
    from lrs.encoders import load_encoder
    from lrs.traces import TraceSet

    traces = TraceSet(args.traces)
    encoder = load_encoder(args.encoder)
    reward = None
    if args.reward:
        from lrs.reward.model import load_reward_model
        from lrs.steering.latent import check_pair

        reward = load_reward_model(args.reward)
        check_pair(encoder, reward)
    events = load_events(args.events) if args.events else None
    if events is not None and events.z_pre.shape[1] != encoder.n_latents:
        raise LRSError(
            f"the events hold {events.z_pre.shape[1]} latents but the encoder has {encoder.n_latents}"
        )
    model, tok = _load_model(args.model, traces, encoder, args) if args.model else (None, None)
    out = Path(args.out) if args.out else Path(args.encoder).parent / "latents"
    if out.exists() and not out.is_dir():
        raise LRSError(f"--out {out} is a file, not a directory")
    result = analyse(
        traces,
        encoder,
        reward=reward,
        events=events,
        model=model,
        tok=tok,
        top_k=args.top_k,
        n_boot=args.n_boot,
        n_random=args.n_random,
        max_latents=args.max_latents,
        seed=args.seed,
    )
    result["inputs"] = {
        k: str(getattr(args, k))
        for k in ("traces", "encoder", "reward", "events", "model")
        if getattr(args, k)
    }
    figures = [] if args.no_figures else write_figures(result, out / "figures")
    result["figures"] = figures
    atomic_write_json(out / "latents.json", result)
    atomic_write_text(out / "latents.md", markdown(result, figures))
    if "events" in result:
        print(result["events"]["dh"]["verdict"])
    print(f"latents: {len(result['units']['names'])} units ({result['units']['source']}); written to {out}")
    return result


def write_figures(result: dict, folder: Path) -> list[str]:
    """The PNG figures of a result: activation histograms, the tag AUROC heatmap, the event geometry."""
    made = [
        _activation_figure(result, folder / "activations.png"),
        _auroc_figure(result, folder / "auroc.png"),
        _events_figure(result, folder / "events.png"),
    ]
    return [m for m in made if m]


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs analyze latents`` to the ``lrs analyze`` sub-parsers."""
    p = sub.add_parser(
        "latents",
        help="what the latents mean (contexts, logit lens, behaviour AUROC) and what steering moves",
        description="Per unit (latent, or principal direction of a dense encoder): activation statistics and "
        "top contexts from both tails over a trace collection; with --model the logit lens of decoder "
        "directions and the latent x behaviour-tag AUROC; with --events (an lrs eval --log-tokens run of a "
        "latent steering method) what the reward gradient moves and whether the deltas are one fixed vector.",
    )
    p.add_argument("--traces", required=True, metavar="DIR", help="trace collection (lrs collect)")
    p.add_argument("--encoder", required=True, metavar="E", help="encoder artefact (lrs fit-encoder)")
    p.add_argument("--reward", metavar="R", help="reward model: its gradient at real states, per unit")
    p.add_argument("--events", metavar="EVAL.jsonl", help="eval JSONL with logged steering events")
    p.add_argument("--model", metavar="M", help="the traces' model: token text, logit lens, behaviour tags")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <encoder dir>/latents)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="model device (default cpu)")
    p.add_argument("--top-k", type=int, default=20, help="top contexts per unit and tail (default 20)")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of the AUROC CIs")
    p.add_argument("--n-random", type=int, default=1000, help="random directions of the lexicon null")
    p.add_argument("--max-latents", type=int, default=256, help="analyse at most this many latents")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample and bootstrap")
    p.add_argument("--no-figures", action="store_true", help="write JSON and Markdown only")
    p.set_defaults(func=run)

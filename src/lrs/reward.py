"""Stage 2b: latent reward models, their training, and an honest quality report.

A reward model maps the latents z_1..z_T of a trace (one per generated token) to per-position logits with
sigmoid(logit_t) = P(trace ends correct | z_<=t). Kinds: ``causal`` (sliding-window Transformer, the default:
evaluable incrementally while decoding), ``mlp`` (per token, context-free: what the reference effectively
runs at inference) and ``bidirectional`` (the reference's training setup; its score at t is only honest on
the prefix z_<=t, which is how the report evaluates it).

Quality is reported at ABSOLUTE token positions next to confidence and prompt-only baselines: fractions of a
trace reveal its length, and length predicts the label.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrs.artifacts import jsonable, load_artifact, save_artifact, tensor_hash
from lrs.errors import LRSError
from lrs.stats import auroc, grouped_auroc_ci, within_group_auroc

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
    """fraction of problems (not traces) held out for early stopping and the report"""
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
        if not 0 < self.val_frac < 1:
            raise LRSError(f"val_frac must be between 0 and 1 (got {self.val_frac})")


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

    def forward(
        self, z: torch.Tensor, valid: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B,T]; ``positions`` are absolute token indices (default: index among the valid tokens)."""
        if valid is None:
            valid = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        if positions is None:
            positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        x = (z.to(self.z_mean.dtype) - self.z_mean) / self.z_std
        x = torch.where(valid[..., None], x, torch.zeros_like(x))
        f = torch.log1p(positions.to(x.dtype).clamp_min(0)) / math.log1p(self.cfg.max_len)
        x = self.inp(x) + self.pos(f[..., None])
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
        path, rm.tensors(), format=FORMAT, config=rm.config(), provenance=provenance, metrics=metrics
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


def _val_score(aucs: dict[str, float]) -> float:
    vals = [a for a in aucs.values() if not math.isnan(a)]
    return float(np.mean(vals)) if vals else math.nan


def _aucs_at(scores: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    out = {}
    for k, s in scores.items():
        m = ~np.isnan(s)
        out[k] = auroc(s[m], y[m])
    return out


def split_by_group(
    groups: list[str], labels: list[int] | np.ndarray, val_frac: float, seed: int, tries: int = 20
) -> tuple[list[int], list[int]]:
    """Split trace indices into (train, val) by group (problem id), both sides holding both labels."""
    y = np.asarray(labels, dtype=int)
    uniq = sorted(set(groups), key=str)
    if len(uniq) < 2:
        raise LRSError(
            f"need at least 2 problems to split train/val by problem, found {len(uniq)}: collect more problems"
        )
    n_val = min(len(uniq) - 1, max(1, round(val_frac * len(uniq))))
    for attempt in range(tries):
        perm = np.random.default_rng(seed + attempt).permutation(len(uniq))
        held = {uniq[i] for i in perm[:n_val]}
        val = [i for i, g in enumerate(groups) if g in held]
        train = [i for i, g in enumerate(groups) if g not in held]
        if len(set(y[val])) == 2 and len(set(y[train])) == 2:
            return train, val
    raise LRSError(
        f"could not split {len(uniq)} problems into train/val with both correct and wrong traces on each side "
        f"(tried {tries} shuffles): collect more problems or sample several traces per problem"
    )


def _check(latents, labels, groups, conf, prompt) -> None:
    if not latents:
        raise LRSError("no traces to train a reward model on: collect traces first (`lrs collect`)")
    if not (len(latents) == len(labels) == len(groups)):
        raise LRSError(
            f"reward training needs one label and group per trace: {len(latents)} traces, "
            f"{len(labels)} labels, {len(groups)} groups"
        )
    for name, xs in (("confidence", conf), ("prompt", prompt)):
        if xs is not None and len(xs) != len(latents):
            raise LRSError(f"reward training got {len(xs)} {name} entries for {len(latents)} traces")
    n = latents[0].shape[-1]
    for i, z in enumerate(latents):
        if z.ndim != 2 or z.shape[1] != n or len(z) == 0:
            raise LRSError(
                f"trace {i} has latents of shape {tuple(z.shape)}; expected [T>0, {n}] like trace 0"
            )
        if conf is not None and len(conf[i]) != len(z):
            raise LRSError(f"trace {i} has {len(conf[i])} confidences for {len(z)} latents")
    y = np.asarray(labels, dtype=int)
    if not set(y.tolist()) <= {0, 1}:
        raise LRSError("reward training labels must be 0 (wrong) or 1 (correct)")
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        raise LRSError(
            f"need both correct and wrong traces to train a reward model: found {pos} correct and {neg} wrong; "
            "collect more problems, sample several traces per problem (--samples-per-problem 4 --temperature 0.7), "
            "or use an easier task"
        )


def _check_heldout(h: dict, latents, groups, conf, prompt) -> None:
    """The held-out set must look like the training set (same width, same extras) and share no problem."""
    _check(h["latents"], h["labels"], h["groups"], h.get("conf"), h.get("prompt"))
    if h["latents"][0].shape[-1] != latents[0].shape[-1]:
        raise LRSError(
            f"held-out traces have {h['latents'][0].shape[-1]} latents, training traces {latents[0].shape[-1]}: "
            "encode both with the same encoder"
        )
    shared = set(groups) & set(h["groups"])
    if shared:
        raise LRSError(
            f"held-out traces share {len(shared)} problems with the training traces (e.g. {sorted(shared)[0]}): "
            "collect them from another split (e.g. --split dev)"
        )
    for name, a, b in (("confidence", conf, h.get("conf")), ("prompt", prompt, h.get("prompt"))):
        if (a is None) != (b is None):
            raise LRSError(f"held-out traces and training traces must both have or both lack {name} data")


# ---- training --------------------------------------------------------------------------------------------
def train_reward_model(
    latents: list[torch.Tensor],
    labels: list[int],
    groups: list[str],
    *,
    cfg: RewardConfig | None = None,
    conf: list[torch.Tensor] | None = None,
    prompt: list[torch.Tensor] | None = None,
    heldout: dict | None = None,
    progress: bool = True,
) -> tuple[RewardModel, dict]:
    """Train on traces split by problem, select on val AUROC at absolute positions; returns (model, report).

    ``heldout`` (keys latents, labels, groups, conf, prompt) is a second trace set on other problems, e.g.
    dev problems sampled several times each; the report is repeated on it (``report["heldout"]``), which gives
    within-problem AUROC many more mixed problems than the val split of a greedy trace set.
    """
    cfg = cfg or RewardConfig()
    _check(latents, labels, groups, conf, prompt)
    if heldout is not None:
        _check_heldout(heldout, latents, groups, conf, prompt)
    y = np.asarray(labels, dtype=int)
    tr, va = split_by_group(list(groups), y, cfg.val_frac, cfg.seed)
    xs = _prep(latents, cfg.max_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        rm = RewardModel(xs[0].shape[1], cfg)
        rm.set_standardisation(torch.cat([xs[i] for i in tr]))
        rm, best_epoch, history = _fit(rm, xs, y, tr, va, progress)
    report = _quality(rm, xs, y, list(groups), tr, va, conf, prompt)
    report.update(best_epoch=best_epoch, epochs_run=len(history), val_history=[round(h, 4) for h in history])
    report["verdict"] = verdict(report)
    if heldout is not None:  # append the held-out traces and score them as a second val side
        h = heldout
        xs_all = xs + _prep(h["latents"], cfg.max_len)
        y_all = np.concatenate([y, np.asarray(h["labels"], dtype=int)])
        cat = lambda a, b: None if a is None else list(a) + list(b)  # noqa: E731
        ho = list(range(len(xs), len(xs_all)))
        sub = _quality(
            rm, xs_all, y_all, list(groups) + list(h["groups"]), tr, ho,
            cat(conf, h.get("conf") or []), cat(prompt, h.get("prompt") or []),
        )  # fmt: skip
        sub["verdict"] = verdict(sub)
        report["heldout"] = sub
    return rm.eval(), jsonable(report)


def _prep(latents: list[torch.Tensor], max_len: int) -> list[torch.Tensor]:
    """Float32 CPU copies truncated to the first ``max_len`` tokens: what training and the report see."""
    return [z[:max_len].detach().float().cpu() for z in latents]


def _fit(rm, xs, y, tr, va, progress) -> tuple[RewardModel, int, list[float]]:
    cfg = rm.cfg
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tok = {c: sum(len(xs[i]) for i in tr if y[i] == c) for c in (0, 1)}
    w_cls = torch.tensor([(tok[0] + tok[1]) / (2 * tok[c]) for c in (0, 1)])  # both classes weigh the same
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_epoch, best_state, bad, history = -math.inf, 0, None, 0, []
    bar = tqdm(range(cfg.epochs), desc=f"reward model ({cfg.kind})", disable=not progress, leave=False)
    for epoch in bar:
        rm.train()
        order = [tr[i] for i in torch.randperm(len(tr), generator=gen).tolist()]
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            z, valid = _pad([xs[i] for i in idx])
            target = torch.tensor(y[idx], dtype=torch.float32)[:, None].expand_as(valid)
            w = w_cls[y[idx]][:, None] * valid
            loss = (
                F.binary_cross_entropy_with_logits(rm(z, valid), target, reduction="none") * w
            ).sum() / valid.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = _val_score(_aucs_at(_prefix_scores(rm, [xs[i] for i in va]), y[va]))
        history.append(score)
        if score > best:
            best, best_epoch, bad = score, epoch + 1, 0
            best_state = copy.deepcopy(rm.state_dict())
        else:
            bad += 1
        bar.set_postfix(val_auroc=f"{score:.3f}", best=f"{best:.3f}")
        if bad >= cfg.patience:
            break
    if best_state is not None:
        rm.load_state_dict(best_state)
    return rm.eval(), best_epoch, history


# ---- the quality report ----------------------------------------------------------------------------------
def _probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray) -> np.ndarray | None:
    """Standardised L2 logistic regression with fixed C; None when the train side has a single class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(x_tr) < 2 or len(set(y_tr.tolist())) < 2 or len(x_va) == 0:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000))
    return clf.fit(x_tr, y_tr).decision_function(x_va)


def _quality(rm, xs, y, groups, tr, va, conf, prompt) -> dict:
    """Val AUROC at absolute positions of the reward model and the baselines, plus within-problem AUROC."""
    keys, max_len = _keys(), rm.cfg.max_len
    cut = {str(t): t for t in POSITIONS} | {"end": max_len}
    lens = np.array([len(z) for z in xs])  # already truncated to max_len
    has = {k: lens[va] > cut[k] if k != "end" else np.ones(len(va), bool) for k in keys}
    has_tr = {k: lens[tr] > cut[k] if k != "end" else np.ones(len(tr), bool) for k in keys}
    scores = {"reward": _prefix_scores(rm, [xs[i] for i in va])}
    if conf is not None:  # mean top-token probability over the first t tokens
        mc = {k: np.array([float(c[: min(cut[k], max_len)].float().mean()) for c in conf]) for k in keys}
        scores["confidence"] = {k: np.where(has[k], mc[k][va], np.nan) for k in keys}
    if prompt is not None:  # probes trained on the train traces, scored on the val traces
        p = np.stack([x.detach().float().cpu().numpy().reshape(-1) for x in prompt])
        s = _probe(p[tr], y[tr], p[va])
        scores["prompt"] = {
            k: np.where(has[k], s, np.nan) if s is not None else np.full(len(va), np.nan) for k in keys
        }
        if conf is not None:
            scores["prompt_conf"] = {}
            for k in keys:
                x = np.column_stack([p, mc[k]])
                v = np.full(len(va), np.nan)
                s = _probe(x[tr][has_tr[k]], y[tr][has_tr[k]], x[va][has[k]])
                if s is not None:
                    v[has[k]] = s
                scores["prompt_conf"][k] = v
    y_va, g_va = y[va], [groups[i] for i in va]
    report = dict(
        kind=rm.cfg.kind,
        n_latents=rm.n_latents,
        window=rm.cfg.window if rm.cfg.kind == "causal" else None,
        n_train=len(tr),
        n_val=len(va),
        n_train_problems=len({groups[i] for i in tr}),
        n_val_problems=len(set(g_va)),
        pos_frac_train=float(y[tr].mean()),
        pos_frac_val=float(y_va.mean()),
        positions=list(POSITIONS),
        probe_c=PROBE_C,
        n_val_at={k: int(has[k].sum()) for k in keys},
        auroc={name: _aucs_at(s, y_va) for name, s in scores.items()},
        within={},
    )
    report["val_score"] = _val_score(report["auroc"]["reward"])
    report["ci64"] = _ci64(scores, y_va, g_va)
    for name in ("reward", "confidence"):
        if name in scores:
            report["within"][name] = {}
            for k in ("64", "end"):
                m = has[k]
                g = [gi for gi, ok in zip(g_va, m, strict=True) if ok]
                v, pairs, used = within_group_auroc(scores[name][k][m], y_va[m], g)
                ci = grouped_auroc_ci(scores[name][k][m], y_va[m], g, within=True) if pairs else None
                report["within"][name][k] = dict(auroc=v, pairs=pairs, groups=used, ci=ci)
    return report


def _ci64(scores: dict, y_va: np.ndarray, g_va: list) -> dict:
    """95% CIs at t=64, resampling val problems: each score's AUROC, and reward minus each baseline."""
    out: dict = {}
    r = scores["reward"]["64"]
    for name, s in scores.items():
        m = ~np.isnan(s["64"]) & ~np.isnan(r)
        g = [gi for gi, ok in zip(g_va, m, strict=True) if ok]
        out[name] = list(grouped_auroc_ci(s["64"][m], y_va[m], g))
        if name != "reward":
            out[f"reward-{name}"] = list(grouped_auroc_ci(r[m], y_va[m], g, minus=s["64"][m]))
    return out


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def verdict(report: dict) -> str:
    """One plain sentence: does the reward model beat the best baseline at t=64?"""
    a = report["auroc"]
    rm = _num(a["reward"].get("64"))
    base = {n: _num(a[n].get("64")) for n in BASELINES if n in a}
    base = {n: v for n, v in base.items() if v is not None}
    if rm is None:
        n = report.get("n_val_at", {}).get("64", 0)
        return (
            f"cannot judge at t=64: the {n} val traces longer than 64 tokens do not hold both labels; "
            "collect more traces or sample several per problem"
        )
    if not base:
        return f"reward model AUROC at t=64 is {rm:.2f}; no baseline to compare (pass conf and prompt)"
    name = max(base, key=base.get)
    w64 = report.get("within", {}).get("reward", {}).get("64", {})
    w, lo = _num(w64.get("auroc")), _num((w64.get("ci") or [None])[0])
    if w is None:
        within = ""
    elif lo is None:
        within = f"; within-problem AUROC at t=64 {w:.2f} (0.5 = chance)"
    else:
        within = f"; within-problem AUROC at t=64 {w:.2f} {_fmt_ci(w64['ci'])}: " + (
            "above chance, so it does rank a problem's own traces"
            if lo > 0.5
            else "not distinguishable from chance"
        )
    if rm > base[name]:
        lo = _num((report.get("ci64", {}).get(f"reward-{name}") or [None])[0])
        if lo is not None and lo <= 0:
            return (
                f"reward model scores above the best baseline ({BASELINES[name]}) at t=64 ({rm:.2f} vs "
                f"{base[name]:.2f}) but not significantly: the 95% CI of the difference includes 0{within}"
            )
        return f"reward model beats the best baseline ({BASELINES[name]}) at t=64 ({rm:.2f} vs {base[name]:.2f}){within}"
    why = (
        "it adds nothing over the model's own confidence"
        if name == "confidence"
        else "its signal is mostly problem difficulty"
    )
    return f"reward model does NOT beat the {BASELINES[name]} baseline at t=64 ({rm:.2f} vs {base[name]:.2f}): {why}; steering may not help{within}"


def _fmt(v) -> str:
    return "-" if _num(v) is None else f"{v:.3f}"


def format_report(report: dict) -> str:
    """A compact plain-text table of val AUROC by absolute position and baseline, CIs at t=64 and the
    verdict; the same again for the held-out trace set when there is one."""
    head = (
        f"reward model {report['kind']} on {report['n_latents']} latents: train {report['n_train']} traces "
        f"({report['n_train_problems']} problems, {report['pos_frac_train']:.0%} correct), val {report['n_val']} "
        f"traces ({report['n_val_problems']} problems, {report['pos_frac_val']:.0%} correct), best epoch "
        f"{report.get('best_epoch', '?')} of {report.get('epochs_run', '?')}"
    )
    lines = [head, *_table(report, "val AUROC")]
    h = report.get("heldout")
    if h:
        lines.append(
            f"held-out traces: {h['n_val']} traces on {h['n_val_problems']} other problems "
            f"({h['pos_frac_val']:.0%} correct), scored by the same model and probes"
        )
        lines += _table(h, "held-out AUROC")
    return "\n".join(lines)


def _table(report: dict, title: str) -> list[str]:
    keys = [str(t) for t in report["positions"]] + ["end"]
    cols = [f"t={k}" if k != "end" else "end" for k in keys] + ["within@64", "within@end"]
    row = lambda label, vals: f"{label:14s}" + "".join(f"{v:>11s}" for v in vals)  # noqa: E731
    lines = [row(title, cols)]
    for name, label in (("reward", "reward model"), *BASELINES.items()):
        if name in report["auroc"]:
            w = report["within"].get(name, {})
            vals = [report["auroc"][name].get(k) for k in keys] + [
                w.get(k, {}).get("auroc") for k in ("64", "end")
            ]
            lines.append(row(label, [_fmt(v) for v in vals]))
    w = report["within"].get("reward", {})
    pairs = [f"{w[k]['pairs']}p/{w[k]['groups']}g" if k in w else "-" for k in ("64", "end")]
    lines.append(row("n traces", [str(report["n_val_at"][k]) for k in keys] + pairs))
    ci = report.get("ci64") or {}
    if ci:
        parts = [f"reward {_fmt_ci(ci.get('reward'))}"] + [
            f"reward - {label} {_fmt_ci(ci.get(f'reward-{name}'), signed=True)}"
            for name, label in BASELINES.items()
            if f"reward-{name}" in ci
        ]
        w64 = report["within"].get("reward", {}).get("64", {})
        if w64.get("ci"):
            parts.append(f"within-problem reward {_fmt_ci(w64['ci'])}")
        lines.append("95% CI at t=64 (resampling problems): " + "; ".join(parts))
    lines.append("verdict: " + (report.get("verdict") or verdict(report)))
    return lines


def _fmt_ci(ci, signed: bool = False) -> str:
    if not ci or any(_num(v) is None for v in ci):
        return "[-]"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"

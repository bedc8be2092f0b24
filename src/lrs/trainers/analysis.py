"""Reading trained vectors (per-layer norms, logit lens per layer, norm-matched random control) and training curves.

The logit lens follows seed 004's ``metrics/logit_lens.py`` (RL_METHODS.md §1.6): for each layer's vector v,
the tokens whose unembedding rows W_U[t] have the largest dot product with v (what v alone adds to the logits)
and the largest cosine (direction only, so frequent tokens with large rows do not dominate). "raw" uses v
itself, as the paper does; "norm" first passes v through the model's final norm, as the last hidden state is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lrs.errors import LRSError
from lrs.steering.vectors import SteeringVectors

Vectors = SteeringVectors | dict[int, torch.Tensor]


def _as_dict(vectors: Vectors) -> dict[int, torch.Tensor]:
    vecs = vectors.vectors if isinstance(vectors, SteeringVectors) else vectors
    if not vecs:
        raise LRSError("no vectors to analyse")
    return {int(L): v.detach().float().cpu() for L, v in sorted(vecs.items())}


def layer_norms(vectors: Vectors) -> dict[int, float]:
    """L2 norm of each layer's vector."""
    return {L: float(v.norm()) for L, v in _as_dict(vectors).items()}


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the last hidden state before the unembedding (Llama/Qwen/Mistral/Gemma/Phi3), if found."""
    for path in ("model.norm", "model.language_model.norm", "language_model.model.norm", "norm"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.Module):
            return obj
    return None


def _top(scores: torch.Tensor, tok, k: int) -> list[tuple[str, float]]:
    vals, ids = scores.topk(min(k, scores.numel()))
    return [(tok.decode([int(i)]), round(float(v), 5)) for v, i in zip(vals, ids, strict=True)]


@torch.no_grad()
def logit_lens(model: nn.Module, tok, vectors: Vectors, top: int = 20) -> dict[int, dict]:
    """Per layer: ``{"raw": {...}, "norm": {...} | None}``, each with the ``top`` tokens by ``dot`` and by ``cos``
    with the unembedding rows, and the most suppressed ones (``dot_bottom``, most negative first)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise LRSError("logit lens needs the model's output embedding (lm_head)")
    W = head.weight.detach().float()
    Wn = F.normalize(W, dim=1)
    norm = final_norm(model)
    out: dict[int, dict] = {}
    for L, v in _as_dict(vectors).items():
        if v.shape[0] != W.shape[1]:
            raise LRSError(f"vector width {v.shape[0]} does not match the model's hidden size {W.shape[1]}")
        v = v.to(W.device)
        entry: dict = {}
        for kind in ("raw", "norm"):
            if kind == "norm":
                if norm is None:
                    entry[kind] = None
                    continue
                p = next(norm.parameters(), None)
                u = norm(v[None].to(p.dtype if p is not None else v.dtype))[0].float()
            else:
                u = v
            dot, cos = W @ u, Wn @ F.normalize(u, dim=0)
            bottom = [(t, -s) for t, s in _top(-dot, tok, top)]
            entry[kind] = dict(dot=_top(dot, tok, top), cos=_top(cos, tok, top), dot_bottom=bottom)
        out[L] = entry
    return out


def matched_random_vectors(vectors: Vectors, seed: int = 0) -> SteeringVectors:
    """Control: random Gaussian directions with the same per-layer norms (same alpha, source ``rl-random``)."""
    vecs = _as_dict(vectors)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for L, v in vecs.items():
        r = torch.randn(v.shape, generator=g)
        out[L] = r / r.norm() * v.norm()
    alpha = vectors.alpha if isinstance(vectors, SteeringVectors) else 1.0
    prov = dict(vectors.provenance) if isinstance(vectors, SteeringVectors) else {}
    prov.update(control="random directions, per-layer norms matched", control_seed=seed)
    if isinstance(vectors, SteeringVectors):
        prov["control_of"] = vectors.fingerprint()["vectors"]
    positions = vectors.positions if isinstance(vectors, SteeringVectors) else None
    return SteeringVectors(out, alpha, source="rl-random", provenance=prov, positions=positions)


MA = 10  # steps in the moving mean drawn over the reward (RL_METHODS.md's stopping rule uses 10)


def plot_curves(log: list[dict], path: str | Path) -> Path | None:
    """Training curves (reward, pass rate, length / truncation, KL, parameter norm) as one PNG."""
    if not log:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in log]
    panels = [
        ("reward", ["reward_mean"]),
        ("pass / finished rate", ["pass_rate", "finished_rate", "trunc_rate"]),
        ("mean generated tokens", ["mean_len"]),
        ("KL to the frozen model", ["kl"]),
        ("parameter norm", ["param_norm"]),
        ("zero-variance groups", ["zero_var_groups"]),
    ]
    fig = Figure(figsize=(12, 6.5))
    FigureCanvasAgg(fig)
    for n, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(2, 3, n + 1)
        drawn, legend = False, len(keys) > 1
        for key in keys:
            pts = [(s, r.get(key)) for s, r in zip(steps, log, strict=True) if r.get(key) is not None]
            if pts:
                drawn = True
                ax.plot(*zip(*pts, strict=True), marker=".", label=key)
            if key == "reward_mean" and len(pts) >= MA:  # the stopping rule reads the 10-step moving mean
                xs, ys = zip(*pts, strict=True)
                ma = [sum(ys[i - MA + 1 : i + 1]) / MA for i in range(MA - 1, len(ys))]
                ax.plot(xs[MA - 1 :], ma, color="black", lw=2, label=f"{MA}-step mean")
                legend = True
        if not drawn:
            ax.text(0.5, 0.5, "not measured (off)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if legend:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    return path

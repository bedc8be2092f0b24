"""What trained steering vectors do: per-layer norms, logit lens, and the shift of the first generated token.

The project spec (RL_METHODS.md §1.6, §1.8) asks for three readings of bias-only vectors trained by
``lrs train-vectors``, each next to a norm-matched random control (same per-layer norms, random directions):

1. the per-layer norms (the control matches them by construction);
2. the logit lens per layer (:func:`lrs.trainers.analysis.logit_lens`): the tokens each vector promotes on its
   own, by dot product and by cosine with the unembedding rows, raw and through the final norm;
3. the shift of the *first generated token's* distribution on the task's prompts (built as ``lrs eval``
   builds them): one left-padded forward per batch with and without the vectors, compared at the last prompt
   position by KL(steered ‖ base), total variation, the probability mass moved per token and the share of
   prompts whose most likely first token changes. The S004 follow-up found the last-layer vector acts as a
   token-substitution bias on exactly this token; the control tells whether any vectors of that size would.

Reachable as ``lrs analyze vectors --vectors FILE``; it writes ``vectors_analysis.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from lrs.errors import LRSError
from lrs.generation import batches_of

if TYPE_CHECKING:  # imported where used: `lrs --help` builds this parser and should stay light
    from lrs.steering.vectors import SteeringVectors

FORMAT = "lrs.vectors-analysis/1"


# ---- first-token distributions ----------------------------------------------------------------------------


@torch.no_grad()
def first_token_logprobs(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    steerer: SteeringVectors | None = None,
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "first token",
) -> torch.Tensor:
    """Log-probabilities ``[len(prompts), V]`` (fp32, CPU) of the first generated token of every prompt.

    Batches and padding are those of :func:`lrs.generation.generate` (prompts sorted by length, left padding,
    positions counted from each row's first real token), so the numbers are those of the first step of
    ``lrs eval``. With ``steerer`` the forward runs inside ``steerer.apply(model)``: the vectors are added
    exactly as during generation (only at prompt positions if their ``positions`` is ``"all"``).
    """
    if not prompts:
        raise LRSError("no prompts to analyse (empty split or --limit 0)")
    if batch_size < 1:
        raise LRSError(f"--batch-size must be >= 1, got {batch_size}")
    from lrs.models import logits_to_keep  # here: lrs.models imports transformers, `lrs --help` should not

    dev = next(model.parameters()).device
    keep = logits_to_keep(model, 1)
    side, tok.padding_side = tok.padding_side, "left"
    out: torch.Tensor | None = None
    ctx = steerer.apply(model, tok) if steerer is not None else contextlib.nullcontext()
    try:
        with ctx:
            for idx in tqdm(batches_of(prompts, batch_size), desc=desc, unit="batch", disable=not progress):
                enc = tok(
                    [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                )
                ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **keep).logits[:, -1]
                lp = torch.log_softmax(logits.float(), dim=-1).cpu()
                if out is None:
                    out = torch.empty(len(prompts), lp.shape[-1])
                out[idx] = lp
    finally:
        tok.padding_side = side
    return out  # type: ignore[return-value]


def _token(tok, i: int) -> str:
    return tok.decode([int(i)])


def argmax_counts(logprobs: torch.Tensor, tok, top: int = 5) -> list[dict]:
    """The most frequent most-likely first tokens: ``[{token, id, share}]``, most frequent first."""
    counts = Counter(logprobs.argmax(-1).tolist())
    n = logprobs.shape[0]
    return [dict(token=_token(tok, i), id=i, share=c / n) for i, c in counts.most_common(top)]


def distribution_shift(base: torch.Tensor, steered: torch.Tensor, tok, top: int = 10) -> dict:
    """How far ``steered`` moves each prompt's next-token distribution from ``base`` (``[N, V]`` log-probs).

    ``kl_*``: KL(steered ‖ base) per prompt (nats), its mean, median and max; ``tv_mean``: mean total
    variation distance (0 = same distribution, 1 = disjoint); ``argmax_changed``: share of prompts whose most
    likely token differs; ``mass_moved``: total variation between the two *mean* distributions, i.e. the
    probability mass the rising tokens gain; ``rising`` / ``falling``: the ``top`` tokens whose mean
    probability rises / falls most, each ``{token, id, base, steered, delta}``; ``argmax_top``: the most
    frequent steered argmax.
    """
    if base.shape != steered.shape:
        raise LRSError(f"distribution shapes differ: {tuple(base.shape)} vs {tuple(steered.shape)}")
    p, q = steered.exp(), base.exp()
    kl = (p * (steered - base)).sum(-1).clamp(min=0.0)
    tv = 0.5 * (p - q).abs().sum(-1)
    mp, mq = p.mean(0), q.mean(0)
    delta = mp - mq
    k = min(top, delta.numel())

    def rows(ids: torch.Tensor) -> list[dict]:
        return [
            dict(
                token=_token(tok, i),
                id=int(i),
                base=float(mq[i]),
                steered=float(mp[i]),
                delta=float(delta[i]),
            )
            for i in ids.tolist()
        ]

    return dict(
        kl_mean=float(kl.mean()),
        kl_median=float(kl.median()),
        kl_max=float(kl.max()),
        tv_mean=float(tv.mean()),
        argmax_changed=float((steered.argmax(-1) != base.argmax(-1)).float().mean()),
        mass_moved=float(delta.clamp(min=0).sum()),
        rising=rows(delta.topk(k).indices),
        falling=rows((-delta).topk(k).indices),
        argmax_top=argmax_counts(steered, tok),
    )


# ---- the whole analysis -----------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def lens_layers(norms: dict[int, float], n_largest: int = 6) -> list[int]:
    """The layers the markdown lens table shows: the ``n_largest`` norms and the last layer, in order."""
    largest = sorted(norms, key=lambda L: -norms[L])[:n_largest]
    return sorted(set(largest) | {max(norms)})


def analyse_vectors(
    model: nn.Module,
    tok,
    vectors: SteeringVectors,
    prompts: Sequence[str],
    *,
    top: int = 10,
    control_seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Norms, logit lens and first-token shift of ``vectors`` and of their norm-matched random control.

    Returns a plain dict (the JSON of ``lrs analyze vectors``): ``vectors`` (what was read), ``control`` (its
    seed and hash), ``norms`` (one row per layer: trained and control norm, and their cosine, near 0 for a
    random direction), ``logit_lens`` (per layer, :func:`logit_lens`), ``lens_layers`` (those the markdown
    shows), ``first_token`` (``n_prompts``, ``base.argmax_top`` and one :func:`distribution_shift` each for
    ``trained`` and ``control``) and ``notes`` (caveats worth printing).
    """
    from lrs.trainers.analysis import layer_norms, logit_lens, matched_random_vectors

    if top < 1:
        raise LRSError(f"--top must be >= 1, got {top}")
    control = matched_random_vectors(vectors, control_seed)
    norms, cnorms = layer_norms(vectors), layer_norms(control)
    lens = logit_lens(model, tok, vectors, top=top)
    base = first_token_logprobs(model, tok, prompts, batch_size=batch_size, progress=progress, desc="base")
    shift = {}
    for name, sv in (("trained", vectors), ("control", control)):
        lp = first_token_logprobs(
            model, tok, prompts, sv, batch_size=batch_size, progress=progress, desc=name
        )
        shift[name] = distribution_shift(base, lp, tok, top)
    notes = []
    if vectors.positions != "all":
        notes.append(
            f"these vectors are applied at generated positions only (positions={vectors.positions!r}): "
            "the first generated token is predicted from the prompt alone, so its distribution cannot move"
        )
    return dict(
        format=FORMAT,
        vectors=dict(
            source=vectors.source,
            alpha=vectors.alpha,
            positions=vectors.positions,
            layers=sorted(vectors.vectors),
            fingerprint=vectors.fingerprint()["vectors"],
            model=vectors.provenance.get("model"),
        ),
        control=dict(seed=control_seed, fingerprint=control.fingerprint()["vectors"]),
        norms=[
            dict(
                layer=L, trained=norms[L], control=cnorms[L], cos=_cos(vectors.vectors[L], control.vectors[L])
            )
            for L in sorted(norms)
        ],
        logit_lens=lens,
        lens_layers=lens_layers(norms),
        first_token=dict(n_prompts=len(prompts), base=dict(argmax_top=argmax_counts(base, tok)), **shift),
        notes=notes,
    )


# ---- markdown ---------------------------------------------------------------------------------------------


def show(token: str) -> str:
    """A token as a markdown code span with repr escaping, so leading spaces and newlines stay visible."""
    text = repr(token).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _tokens(pairs, n: int) -> str:
    return " ".join(show(t) for t, _ in (pairs or [])[:n]) or "–"


def markdown(result: dict, shown: int = 5) -> str:
    """The report section of an analysis result: norms, a compact lens table, the first-token shift."""
    v, ft = result["vectors"], result["first_token"]
    inp = result.get("inputs", {})
    lines = [
        "# Steering vectors analysis",
        "",
        f"Vectors `{inp.get('vectors', '?')}`: source {v['source']}, alpha {v['alpha']:g}, positions "
        f"{v['positions']}, {len(v['layers'])} layers. Model `{inp.get('model') or v.get('model') or '?'}`. "
        f"Control: random directions with the same per-layer norms (seed {result['control']['seed']}).",
        "",
        *[f"> **Note.** {n}\n" for n in result.get("notes", [])],
        "## Per-layer norms",
        "",
        "| layer | ‖v‖ | ‖control‖ | cos(v, control) |",
        "|---:|---:|---:|---:|",
        *[
            f"| {r['layer']} | {r['trained']:.4g} | {r['control']:.4g} | {r['cos']:+.2f} |"
            for r in result["norms"]
        ],
        "",
        "## Logit lens",
        "",
        f"Up to {shown} tokens each vector promotes most on its own (`W_U·v`: dot; cosine: direction "
        "only), through the final norm and raw; last column: most suppressed (raw dot). Layers: the 6 "
        "largest norms and the last.",
        "",
        "| layer | ‖v‖ | dot (norm) | cos (norm) | dot (raw) | cos (raw) | suppressed (raw) |",
        "|---:|---:|---|---|---|---|---|",
    ]
    norms = {r["layer"]: r["trained"] for r in result["norms"]}
    for L in result["lens_layers"]:
        e = result["logit_lens"][L] if L in result["logit_lens"] else result["logit_lens"][str(L)]
        n, raw = e.get("norm") or {}, e["raw"]
        cells = [_tokens(n.get("dot"), shown), _tokens(n.get("cos"), shown)]
        cells += [_tokens(raw["dot"], shown), _tokens(raw["cos"], shown), _tokens(raw["dot_bottom"], shown)]
        lines.append(f"| {L} | {norms[L]:.4g} | " + " | ".join(cells) + " |")
    tr, co = ft["trained"], ft["control"]
    lines += [
        "",
        f"## First generated token ({ft['n_prompts']} prompts)",
        "",
        "| | trained | control |",
        "|---|---:|---:|",
        f"| mean KL(steered ‖ base), nats | {tr['kl_mean']:.4g} | {co['kl_mean']:.4g} |",
        f"| median KL | {tr['kl_median']:.4g} | {co['kl_median']:.4g} |",
        f"| mean total variation | {tr['tv_mean']:.3f} | {co['tv_mean']:.3f} |",
        f"| probability mass moved | {tr['mass_moved']:.3f} | {co['mass_moved']:.3f} |",
        f"| argmax first token changed | {tr['argmax_changed']:.1%} | {co['argmax_changed']:.1%} |",
        "",
        "Most frequent argmax first token: base "
        + ", ".join(f"{show(a['token'])} {a['share']:.0%}" for a in ft["base"]["argmax_top"])
        + "; trained "
        + ", ".join(f"{show(a['token'])} {a['share']:.0%}" for a in tr["argmax_top"])
        + "; control "
        + ", ".join(f"{show(a['token'])} {a['share']:.0%}" for a in co["argmax_top"])
        + ".",
        "",
    ]
    for name, s in (("trained", tr), ("control", co)):
        lines += [
            f"**{name}**: mean probability, base → steered",
            "",
            "| rising | base | steered | falling | base | steered |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for up, down in zip(s["rising"], s["falling"], strict=True):
            lines.append(
                f"| {show(up['token'])} | {up['base']:.4f} | {up['steered']:.4f} "
                f"| {show(down['token'])} | {down['base']:.4f} | {down['steered']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """``lrs analyze vectors``: read vectors, prompts and model; write JSON and markdown; print the latter."""
    from lrs import config as C
    from lrs import stages
    from lrs.artifacts import atomic_write_json, atomic_write_text
    from lrs.cli_args import build
    from lrs.models import model_fingerprint, model_name
    from lrs.runs import check_dir_target
    from lrs.steering.vectors import SteeringVectors
    from lrs.tasks import build_prompts

    for flag, value in (("--top", args.top), ("--batch-size", args.batch_size)):
        if value < 1:
            raise LRSError(f"{flag} must be >= 1, got {value}")
    vectors = SteeringVectors.load(args.vectors)
    out = Path(args.out) if args.out else Path(args.vectors).with_name(Path(args.vectors).stem + ".analysis")
    check_dir_target(out, "--out")
    tc = build(C.TaskConfig, args)
    probs = stages.problems(tc)  # a bad task or split fails before the model is loaded
    if not probs:
        raise LRSError("no problems to analyse (empty split or --limit 0)")
    mc = build(C.ModelConfig, args)
    mc.model = mc.model or vectors.provenance.get("model")
    model, tok = stages.load(mc)
    want = vectors.provenance.get("model_fingerprint")
    if want and model_fingerprint(model) != want:
        raise LRSError(
            f"--model {mc.model} is not the model the vectors were trained on (fingerprint {want})"
        )
    result = analyse_vectors(
        model,
        tok,
        vectors,
        build_prompts(tok, probs, style="base"),
        top=args.top,
        control_seed=args.control_seed,
        batch_size=args.batch_size,
    )
    result["inputs"] = dict(
        vectors=str(args.vectors),
        model=model_name(model),
        task=tc.task,
        split=tc.split,
        limit=tc.limit,
        split_seed=tc.split_seed,
        top=args.top,
        control_seed=args.control_seed,
        batch_size=args.batch_size,
    )
    text = markdown(result)
    atomic_write_json(out / "vectors_analysis.json", result)
    atomic_write_text(out / "vectors_analysis.md", text + "\n")
    print(text)
    print(f"written to {out}")
    return result


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs analyze vectors`` to the ``lrs analyze`` sub-parsers."""
    from lrs import config as C
    from lrs.cli_args import add_config

    p = sub.add_parser(
        "vectors",
        help="what trained steering vectors do: norms, logit lens, first-token shift vs a random control",
        description="Per-layer norms and logit lens of a SteeringVectors artefact, and how much it moves the "
        "first generated token's distribution on the task's prompts (KL, total variation, mass moved, argmax "
        "changes), next to random vectors with the same per-layer norms.",
    )
    p.add_argument(
        "--vectors", required=True, metavar="FILE", help="steering vectors (e.g. from lrs train-vectors)"
    )
    p.add_argument(
        "--model",
        metavar="M",
        help="the vectors' model: packaged name, folder, .gguf or hub id (default: their provenance's)",
    )
    add_config(p, C.ModelConfig, skip=("model",))
    add_config(p, C.TaskConfig, defaults=dict(split="dev", limit=64))
    p.add_argument("--top", type=int, default=10, help="tokens per list (default 10)")
    p.add_argument("--control-seed", type=int, default=0, help="seed of the random control (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default <vectors stem>.analysis/ next to FILE)"
    )
    p.set_defaults(func=run)

"""Training a reward model: split by problem, class-balanced per-token BCE, selection on val AUROC."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lrs.artifacts import jsonable
from lrs.errors import LRSError
from lrs.reward.model import (
    SELECT_POSITIONS,
    RewardConfig,
    RewardModel,
    _aucs_at,
    _pad,
    _prefix_scores,
    _val_score,
    r_quantiles,
    score_traces,
)
from lrs.reward.quality import _quality, verdict
from lrs.stats import within_group_auroc


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


def split_three(
    groups: list[str],
    labels: list[int] | np.ndarray,
    val_frac: float,
    report_frac: float,
    seed: int,
    tries: int = 50,
) -> tuple[list[int], list[int], list[int]]:
    """Split trace indices by problem into (fit, select, report), each side holding both labels.

    With ``report_frac == 0`` the report side is the selection side (the old two-way split).
    """
    if report_frac == 0:
        tr, va = split_by_group(groups, labels, val_frac, seed, tries)
        return tr, va, va
    y = np.asarray(labels, dtype=int)
    uniq = sorted(set(groups), key=str)
    if len(uniq) < 3:
        raise LRSError(f"need at least 3 problems for a fit/select/report split, found {len(uniq)}")
    n_sel = max(1, round(val_frac * len(uniq)))
    n_rep = max(1, round(report_frac * len(uniq)))
    if n_sel + n_rep >= len(uniq):
        raise LRSError(
            f"{len(uniq)} problems are too few for a fit/select/report split: collect more problems"
        )
    for attempt in range(tries):
        perm = np.random.default_rng(seed + attempt).permutation(len(uniq))
        sel = {uniq[i] for i in perm[:n_sel]}
        rep = {uniq[i] for i in perm[n_sel : n_sel + n_rep]}
        parts = (
            [i for i, g in enumerate(groups) if g not in sel and g not in rep],
            [i for i, g in enumerate(groups) if g in sel],
            [i for i, g in enumerate(groups) if g in rep],
        )
        if all(len(set(y[p])) == 2 for p in parts):
            return parts
    raise LRSError(
        f"could not split {len(uniq)} problems into fit/select/report with both correct and wrong traces on "
        f"each side (tried {tries} shuffles): collect more problems, or pass report_frac=0 with a held-out set"
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
    truncated: list[bool] | None = None,
    values: list | None = None,
    progress: bool = True,
) -> tuple[RewardModel, dict]:
    """Train on traces split by problem, select on val AUROC at absolute positions; returns (model, report).

    ``heldout`` (keys latents, labels, groups, conf, prompt) is a second trace set on other problems, e.g.
    dev problems sampled several times each; the report is repeated on it (``report["heldout"]``), which gives
    within-problem AUROC many more mixed problems than the val split of a greedy trace set.

    ``values`` (per trace ``[[t, v], ...]`` or None, from ``lrs collect --rollouts``) are the Monte-Carlo value
    labels the ``value`` objective regresses on: the logit after t tokens is fitted to P(correct | prefix).
    """
    cfg = cfg or RewardConfig()
    if cfg.objective not in OBJECTIVES:
        raise LRSError(f"unknown reward objective '{cfg.objective}': use one of {', '.join(OBJECTIVES)}")
    _check(latents, labels, groups, conf, prompt)
    if heldout is not None:
        _check_heldout(heldout, latents, groups, conf, prompt)
    y = np.asarray(labels, dtype=int)
    tr, va, rep = split_three(list(groups), y, cfg.val_frac, cfg.report_frac, cfg.seed)
    if cfg.drop_truncated:
        if truncated is None or len(truncated) != len(latents):
            raise LRSError("drop_truncated needs one truncated flag per trace")
        tr = [i for i in tr if not truncated[i]]
        va = [i for i in va if not truncated[i]]
        for side, idx in (("fit", tr), ("selection", va)):
            if len(set(y[idx].tolist())) < 2:
                raise LRSError(
                    f"after dropping truncated traces the {side} problems lack correct or wrong traces"
                )
    vt = None
    if cfg.objective == "value":
        vt = value_targets(values, labels, [len(z) for z in latents], cfg.max_len)
        for side, idx in (("fit", tr), ("selection", va)):
            if not any(values[i] for i in idx):
                raise LRSError(
                    f"the value objective needs value labels and the {side} traces have none: collect with "
                    "--rollouts 4 --rollout-every 64"
                )
    elif cfg.objective != "trajectory":
        gs = list(groups)
        for side, idx in (("fit", tr), ("selection", va)):
            if not _mixed_groups([gs[i] for i in idx], y[idx]):
                raise LRSError(
                    f"the {cfg.objective} objective needs problems with both right and wrong traces, and the "
                    f"{side} problems have none: collect several samples per problem "
                    "(--samples-per-problem 4 --temperature 0.7)"
                )
    xs = _prep(latents, cfg.max_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        rm = RewardModel(xs[0].shape[1], cfg)
        rm.set_standardisation(torch.cat([xs[i] for i in tr]))
        rm, best_epoch, history = _fit(rm, xs, y, list(groups), tr, va, progress, vt)
    report = _quality(rm, xs, y, list(groups), tr, rep, conf, prompt)
    if vt is not None:
        report["value_fit"] = value_fit(rm, [xs[i] for i in rep], [values[i] for i in rep])
    report["r_quantiles"] = r_quantiles(rm, [xs[i] for i in va]) | dict(traces="select")
    rm.metrics = {"r_quantiles": report["r_quantiles"]}  # usable before the model is saved and loaded
    report.update(
        best_epoch=best_epoch, epochs_run=len(history), select_history=[round(h, 4) for h in history],
        selected_on=dict(positions=list(SELECT_POSITIONS), n_traces=len(va), n_problems=len({groups[i] for i in va}),
                         metric="AUROC" if cfg.objective == "trajectory" else "within-problem AUROC"),
        objective=cfg.objective,
        report_split="select" if cfg.report_frac == 0 else "report (problem-disjoint from fit and select)",
        drop_truncated=cfg.drop_truncated, use_position=cfg.use_position,
    )  # fmt: skip
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


OBJECTIVES = ("trajectory", "centred", "pairwise", "value")


def value_targets(values: list | None, labels, lengths: list[int], max_len: int) -> list[torch.Tensor]:
    """Per trace, a [T] target (nan where unlabelled): value v at position t - 1 (the logit after t tokens) for
    each rollout label ``[t, v]``, and the trace's own label at its last token (one rollout of the full prefix).
    """
    if values is None or len(values) != len(lengths):
        raise LRSError(
            "the value objective needs value labels for every trace: collect with --rollouts 4 --rollout-every 64"
        )
    out = []
    for vals, y, n in zip(values, labels, lengths, strict=True):
        T = min(n, max_len)
        tgt = torch.full((T,), math.nan)
        for t, v in vals or []:
            if 1 <= t <= T:
                tgt[int(t) - 1] = float(v)
        if n <= max_len:
            tgt[T - 1] = float(y)
        out.append(tgt)
    return out


def value_fit(rm, latents: list[torch.Tensor], values: list) -> dict:
    """How well the reward probability after t tokens matches held-out rollout values: Pearson r and Brier
    score over every ``[t, v]`` label (end-of-trace labels excluded), next to a constant predictor's Brier."""
    scores = score_traces(rm, latents)
    pred, target = [], []
    for s, vals in zip(scores, values, strict=True):
        for t, v in vals or []:
            if 1 <= t <= len(s):
                pred.append(float(torch.sigmoid(s[int(t) - 1])))
                target.append(float(v))
    if len(pred) < 3:
        return dict(n_points=len(pred), pearson=math.nan, brier=math.nan, brier_constant=math.nan)
    p, v = np.asarray(pred), np.asarray(target)
    r = float(np.corrcoef(p, v)[0, 1]) if p.std() > 0 and v.std() > 0 else math.nan
    return dict(
        n_points=len(pred), pearson=r, brier=float(np.mean((p - v) ** 2)), brier_constant=float(np.var(v))
    )


def _mixed_groups(groups: list[str], y: np.ndarray) -> set[str]:
    """The groups (problems) holding both a right and a wrong trace."""
    seen: dict[str, set[int]] = {}
    for g, v in zip(groups, y.tolist(), strict=True):
        seen.setdefault(g, set()).add(int(v))
    return {g for g, v in seen.items() if len(v) == 2}


def _problem_offsets(groups: list[str], y: np.ndarray, idx: list[int]) -> torch.Tensor:
    """Per trace, the logit of its problem's success rate k/n on the fit traces; nan for problems whose traces
    all agree (their advantage is zero everywhere: they say nothing about which states of a problem are better).
    """
    k: dict[str, float] = {}
    n: dict[str, int] = {}
    for i in idx:
        k[groups[i]] = k.get(groups[i], 0.0) + float(y[i])
        n[groups[i]] = n.get(groups[i], 0) + 1
    off = torch.full((len(groups),), math.nan)
    for i in idx:
        p = k[groups[i]] / n[groups[i]]
        if 0 < p < 1:
            off[i] = math.log(p / (1 - p))
    return off


def _batches(order: list[int], groups: list[str], size: int, by_problem: bool) -> list[list[int]]:
    """Trace batches of ``size``; with ``by_problem`` whole problems stay together (pairs need both sides)."""
    if not by_problem:
        return [order[s : s + size] for s in range(0, len(order), size)]
    members: dict[str, list[int]] = {}
    for i in order:
        members.setdefault(groups[i], []).append(i)
    out, cur = [], []
    for m in members.values():
        cur.extend(m)
        if len(cur) >= size:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def _loss(rm, objective, z, valid, yb, off, w_cls) -> torch.Tensor:
    """The training loss of one batch under ``objective`` (see :class:`RewardConfig`)."""
    s = rm(z, valid)
    if objective == "value":  # off: the padded [B, T] value targets, nan where unlabelled
        m = valid & ~torch.isnan(off)
        if not m.any():
            return s.sum() * 0.0
        return F.binary_cross_entropy_with_logits(s[m], off[m])
    target = yb.float()[:, None].expand_as(valid)
    if objective == "trajectory":
        w = w_cls[yb][:, None] * valid
        return (F.binary_cross_entropy_with_logits(s, target, reduction="none") * w).sum() / valid.sum()
    if objective == "centred":  # traces of problems whose traces all agree carry no weight (offset nan)
        keep = valid & ~torch.isnan(off)[:, None]
        if not keep.any():
            return s.sum() * 0.0
        bce = F.binary_cross_entropy_with_logits(s + off.nan_to_num()[:, None], target, reduction="none")
        return (bce * keep).sum() / keep.sum()
    return _pairwise_loss(s, valid, yb, off)


def _pairwise_loss(s, valid, yb, grp) -> torch.Tensor:
    """Mean softplus(s_wrong - s_right) over same-problem (right, wrong) pairs and their shared positions."""
    same = grp[:, None] == grp[None, :]
    pos, neg = torch.nonzero(same & yb.bool()[:, None] & ~yb.bool()[None, :], as_tuple=True)
    if len(pos) == 0:
        return s.sum() * 0.0
    m = valid[pos] & valid[neg]
    return (F.softplus(s[neg] - s[pos]) * m).sum() / m.sum().clamp(min=1)


def _select_score(rm, xs, y, groups, va, objective, vt=None) -> float:
    """Epoch-selection score on the selection problems at the fixed positions only (never "end").

    trajectory: AUROC across traces; centred/pairwise: within-problem AUROC (what those objectives target);
    value: minus the Brier score against the value labels.
    """
    if objective == "value":  # negative Brier score of r against the selection traces' value labels
        err = []
        for s, tgt in zip(score_traces(rm, [xs[i] for i in va]), [vt[i] for i in va], strict=True):
            m = ~torch.isnan(tgt)
            err.append(((torch.sigmoid(s[m]) - tgt[m]) ** 2).numpy())
        flat = np.concatenate(err) if err else np.array([])
        return -float(flat.mean()) if len(flat) else math.nan
    scores = _prefix_scores(rm, [xs[i] for i in va])
    if objective == "trajectory":
        return _val_score(_aucs_at(scores, y[va]))
    g = [groups[i] for i in va]
    vals = []
    for t in SELECT_POSITIONS:
        v = scores[str(t)]
        m = ~np.isnan(v)
        w, pairs, _ = within_group_auroc(v[m], y[va][m], list(np.asarray(g, dtype=object)[m]))
        if pairs:
            vals.append(w)
    return float(np.mean(vals)) if vals else math.nan


def _fit(rm, xs, y, groups, tr, va, progress, vt=None) -> tuple[RewardModel, int, list[float]]:
    cfg = rm.cfg
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tok = {c: sum(len(xs[i]) for i in tr if y[i] == c) for c in (0, 1)}
    w_cls = torch.tensor([(tok[0] + tok[1]) / (2 * tok[c]) for c in (0, 1)])  # both classes weigh the same
    off = _problem_offsets(groups, y, tr)
    gid = {g: j for j, g in enumerate(dict.fromkeys(groups))}
    grp = torch.tensor([gid[g] for g in groups])
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_epoch, best_state, bad, history = -math.inf, 0, None, 0, []
    bar = tqdm(
        range(cfg.epochs),
        desc=f"reward model ({cfg.kind}, {cfg.objective})",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        rm.train()
        order = [tr[i] for i in torch.randperm(len(tr), generator=gen).tolist()]
        for idx in _batches(order, groups, cfg.batch_size, by_problem=cfg.objective == "pairwise"):
            z, valid = _pad([xs[i] for i in idx])
            yb = torch.as_tensor(y[idx])
            if cfg.objective == "value":
                extra = torch.nn.utils.rnn.pad_sequence(
                    [vt[i] for i in idx], batch_first=True, padding_value=math.nan
                )
            else:
                extra = grp[idx] if cfg.objective == "pairwise" else off[idx]
            loss = _loss(rm, cfg.objective, z, valid, yb, extra, w_cls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = _select_score(rm, xs, y, groups, va, cfg.objective, vt)
        history.append(score)
        if score > best:
            best, best_epoch, bad = score, epoch + 1, 0
            best_state = copy.deepcopy(rm.state_dict())
        else:
            bad += 1
        bar.set_postfix(select=f"{score:.3f}", best=f"{best:.3f}")
        if bad >= cfg.patience:
            break
    if best_state is not None:
        rm.load_state_dict(best_state)
    return rm.eval(), best_epoch, history


def reward_inputs(ts, enc) -> dict:
    """Encode every trace's states: the reward trainer's inputs (latents, labels, groups, conf, prompt)."""
    L = enc.layer
    if L not in ts.layers:
        raise LRSError(f"encoder layer {L} was not collected in {ts.path} (collected: {ts.layers})")
    out: dict = dict(latents=[], labels=[], groups=[], conf=[], prompt=[])
    with torch.no_grad():
        for t in ts:
            if not torch.isfinite(t.hidden[L]).all():
                raise LRSError(f"trace {t.id} in {ts.path} holds NaN or inf hidden states; collect it again")
            out["latents"].append(enc.encode(t.hidden[L]).float())
            out["labels"].append(t.label)
            out["groups"].append(t.problem_id)
            out["conf"].append(t.conf.float())
            out["prompt"].append(t.prompt[L].float())
    out["values"] = [r.get("values") for r in ts.records]  # Monte-Carlo value labels (collect --rollouts)
    return out

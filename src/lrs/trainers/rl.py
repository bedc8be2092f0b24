"""The on-policy training loop (RL_METHODS.md §4): one update per batch of fresh rollouts, resumable.

One step:
1. B problems (the step's slice of a seeded shuffle: the data cursor is the step) x K samples in ONE batched
   :func:`lrs.generation.generate` at temperature T, stopping at the model's end tokens;
2. rewards: the verifier (+1/-1 on the last ``\\boxed{}``), a caller's ``reward_fn``, or LaTRO's self-reward
   (a no-grad scoring pass over x + z + y with the live policy; plus a reference pass if beta > 0);
3. advantages per group of K; a group whose advantages are all zero and that has no other loss term
   (no k3 KL, no LaTRO answer term) is skipped: its gradient is exactly zero;
4. micro-batched forward/backward over completion log-probs (logits only at completion positions), the loss
   normalised by the step's generated tokens (verifier) or rollouts (LaTRO, as the paper), optional k3 KL
   against the same model with the trained parameters switched off;
5. gradient clipping, AdamW (constant lr after a linear warm-up), one JSONL log line, a checkpoint every N steps.

Resuming: ``train`` called again on the same ``out_dir`` loads the newest checkpoint (parameters, optimiser,
torch RNG, step = data cursor) and continues; sampling seeds and problem order are pure functions of (seed,
step), so a killed run that is resumed ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lrs.artifacts import atomic_write_json, atomic_write_text
from lrs.errors import LRSError
from lrs.generation import Generation, eos_ids, generate
from lrs.models import check_budget, logits_to_keep, model_fingerprint, model_name
from lrs.runs import check_dir_target, exclusive
from lrs.steering.vectors import SteeringVectors
from lrs.tasks import Problem, build_prompts
from lrs.trainers.analysis import plot_curves
from lrs.trainers.checkpoint import load_checkpoint, read_log, save_checkpoint
from lrs.trainers.config import TrainConfig
from lrs.trainers.objectives import (
    advantages,
    k3,
    latro_loss,
    latro_rewards,
    policy_gradient_loss,
    verifier_rewards,
)
from lrs.trainers.params import BiasVectors, make_params

RewardFn = Callable[[list[Problem], list[Generation]], list[float]]


@dataclass
class Rollout:
    """One sample. ``completion`` is what the policy-gradient term scores (the rationale z for LaTRO)."""

    group: int
    prompt: list[int]
    completion: list[int]
    answer: list[int]  # LaTRO's y (gold answer in the template + end token); empty for the verifier
    finished: bool  # stopped by itself (end token / LaTRO stop string) rather than at max_new_tokens
    generated: int  # tokens sampled, whatever was kept


@dataclass
class TrainResult:
    """What a run produced: the artefact (vectors file or adapter folder) and the model carrying it."""

    out_dir: Path
    steps: int
    artefact: Path
    vectors: SteeringVectors | None  # bias runs
    model: nn.Module  # lora runs: the PeftModel (adapters stay injected in the model passed in)
    log: list[dict]


# ---------------------------------------------------------------- data and log-probs


def step_problems(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Problem indices of ``step``: consecutive slices of a seeded shuffle, reshuffled every epoch."""
    out: list[int] = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, off = divmod(pos, n)
        order = list(range(n))
        random.Random(f"lrs-rl:{seed}:{epoch}").shuffle(order)
        take = order[off : off + per_step - len(out)]
        out += take
        pos += len(take)
    return out


def token_logprobs(
    model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], temperature: float = 1.0, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (at ``temperature``) of each row's continuation given its prefix: ``([n, C], mask [n, C])``.

    One right-padded forward: positions run 0..len-1 as in ``generate`` (which derives them from the
    left-padded mask) and no query is left without keys; logits are computed only from the last prefix
    position on (``logits_to_keep``), not over the whole prompt.
    """
    dev = next(model.parameters()).device
    P = torch.tensor([len(p) for p, _ in rows])
    C = torch.tensor([len(c) for _, c in rows])
    S, Cmax, w0 = int((P + C).max()), max(int(C.max()), 1), int(P.min()) - 1
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
    keep = logits_to_keep(model, S - w0)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, **keep).logits
    if logits.shape[1] != S - w0:  # a model without the option: all positions came back
        logits = logits[:, -(S - w0) :]
    j = torch.arange(Cmax)
    pos = (P[:, None] - 1 - w0 + j).clamp(max=S - w0 - 1)  # kept logit that predicts continuation token j
    tgt = ids.gather(1, (P[:, None] + j).clamp(max=S - 1))
    valid = (j[None, :] < C[:, None]).to(dev)
    sel = logits[torch.arange(len(rows))[:, None].to(dev), pos.to(dev)].float() / temperature
    lp = sel.gather(-1, tgt.to(dev)[..., None]).squeeze(-1) - sel.logsumexp(-1)
    return torch.where(valid, lp, torch.zeros_like(lp)), valid


def split_rationale(
    tok, ids: list[int], stop_ids: set[int], stop_strings: Sequence[str]
) -> tuple[list[int], bool, str]:
    """LaTRO's rationale z: the sampled tokens before the first end token or stop string (both excluded).

    Returns (z, finished, leftover). The stop string is found in the decoded text; z keeps the tokens before
    the one holding its first character (found by bisection on prefix decodes), and ``leftover`` is the text
    of that token before the stop (``"$"`` when one token holds ``$\\``): the answer y starts with it, so the
    reward scores the answer where the model would have written it, not a join that drops a space or a ``$``.
    """
    end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    body = ids if end is None else ids[:end]
    text = tok.decode(body)
    hits = [text.find(s) for s in stop_strings if s and s in text]
    if not hits:
        return body, end is not None, ""
    c, lo, hi = min(hits), 0, len(body)
    while lo < hi:  # smallest m whose prefix decodes past character c
        mid = (lo + hi) // 2
        if len(tok.decode(body[:mid])) > c:
            hi = mid
        else:
            lo = mid + 1
    z = body[: max(lo - 1, 0)]
    return z, True, text[len(tok.decode(z)) : c]


def answer_text(template: str, gold: str) -> str:
    """LaTRO's y for ``gold``: ``{gold}`` in ``template`` replaced (no other brace handling, so
    ``\\boxed{{gold}}`` gives ``\\boxed{18}``)."""
    return template.replace("{gold}", gold)


def answer_stops(template: str) -> list[str]:
    """Where a sampled rationale is cut: the template's text before ``{gold}`` and ``\\boxed`` (the answer
    format every lrs prompt asks for), in that order, without duplicates or empty strings."""
    prefix = template.split("{gold}")[0].strip()
    return list(dict.fromkeys(s for s in (prefix, "\\boxed") if s))


# ---------------------------------------------------------------- the loop


class _Trainer:
    """State of one run; :func:`train` is the public entry point."""

    def __init__(self, model, tok, problems, cfg: TrainConfig, out: Path, reward_fn: RewardFn | None):
        self.model, self.tok, self.problems, self.cfg, self.out = model, tok, problems, cfg, out
        self.reward_fn = reward_fn
        torch.manual_seed(cfg.seed)  # LoRA init
        self.params = make_params(model, cfg.param, cfg.layers, cfg.lora_rank)
        self.named = list(self.params.named_parameters())
        self.opt = torch.optim.AdamW([p for _, p in self.named], lr=cfg.lr, weight_decay=0.0)
        self.stop = eos_ids(model, tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.stop[0]
        self.end = tok.eos_token_id if tok.eos_token_id is not None else self.stop[0]
        self.prompts = build_prompts(tok, problems, style=cfg.prompt_style)
        self.prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in self.prompts]
        self.stop_strings = answer_stops(cfg.answer_template)

    def lr_at(self, step: int) -> float:
        warm = max(1, math.ceil(self.cfg.warmup * self.cfg.steps))
        return self.cfg.lr * min(1.0, (step + 1) / warm)

    def rollouts(self, idx: list[int], gens: list[Generation]) -> list[Rollout]:
        K, out = self.cfg.k, []
        for n, g in enumerate(gens):
            p = self.problems[idx[n // K]]
            prompt = self.prompt_ids[idx[n // K]]
            if self.cfg.objective == "latro":
                z, fin, leftover = split_rationale(self.tok, g.token_ids, set(self.stop), self.stop_strings)
                y = self.tok(
                    leftover + answer_text(self.cfg.answer_template, p.answer), add_special_tokens=False
                )
                end = [self.end] if self.cfg.answer_end else []
                out.append(Rollout(n // K, prompt, z, y["input_ids"] + end, fin, g.n_tokens))
            else:
                out.append(Rollout(n // K, prompt, list(g.token_ids), [], g.finished, g.n_tokens))
        return out

    def sums(self, rolls: list[Rollout], reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad per-rollout sums of log p(completion) and log p(answer), micro-batched."""
        lpc, lpy = torch.zeros(len(rolls)), torch.zeros(len(rolls))
        ctx = self.params.reference() if reference else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for chunk in _chunks(list(range(len(rolls))), self.cfg.micro_batch):
                lp, zm, ym = self._forward([rolls[i] for i in chunk])
                lpc[chunk] = (lp * zm).sum(1).cpu()
                lpy[chunk] = (lp * ym).sum(1).cpu()
        return lpc, lpy

    def _forward(self, rolls: list[Rollout]):
        rows = [(r.prompt, r.completion + r.answer) for r in rolls]
        lp, valid = token_logprobs(self.model, rows, self.cfg.temperature, self.pad)
        n_c = torch.tensor([len(r.completion) for r in rolls], device=lp.device)
        zmask = torch.arange(lp.shape[1], device=lp.device)[None, :] < n_c[:, None]
        return lp, zmask.float(), (valid & ~zmask).float()

    def checked(self, rows: list[int], gens: list[Generation], rec: dict) -> list[float]:
        """The checker's ±1 per sample (last ``\\boxed{}`` against the gold answer); logs the pass rate."""
        vals, correct = verifier_rewards([g.text for g in gens], [self.problems[i].answer for i in rows])
        rec["pass_rate"] = sum(correct) / len(correct)
        return vals

    def rewards(
        self, rows: list[int], gens: list[Generation], rolls: list[Rollout], rec: dict
    ) -> torch.Tensor:
        """Per-rollout rewards (KL-in-reward included); adds reward-side metrics to ``rec``."""
        cfg = self.cfg
        rec["kl"] = None
        if cfg.objective == "latro":
            lpz, lpy = self.sums(rolls)
            ref = self.sums(rolls, reference=True)[0] if cfg.latro_beta > 0 else lpz
            fin = torch.tensor([r.finished for r in rolls])
            # not a training signal: the sampled text runs on past the cut to the model's own \boxed{} answer,
            # so its pass rate is a free accuracy curve for a self-rewarded run
            self.checked(rows, gens, rec)
            rec.update(logp_y=float(lpy.mean()), logp_z=float(lpz.mean()))
            if cfg.latro_beta > 0:
                rec["kl"] = float((lpz - ref).mean())
            return latro_rewards(lpy, lpz, ref, fin, cfg.latro_gamma, cfg.latro_beta)
        if self.reward_fn is not None:
            rewards = torch.tensor([float(r) for r in self.reward_fn([self.problems[i] for i in rows], gens)])
            rec["pass_rate"] = None
        else:
            rewards = torch.tensor(self.checked(rows, gens, rec))
        rec["reward_raw"] = float(rewards.mean())
        if cfg.kl_coef > 0 and cfg.kl_mode == "reward":
            lpc, ref = self.sums(rolls)[0], self.sums(rolls, reference=True)[0]
            rec["kl"] = float((lpc - ref).mean())
            rewards = rewards - cfg.kl_coef * (lpc - ref)
        return rewards

    def step(self, step: int) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        idx = step_problems(len(self.problems), cfg.prompts_per_step, step, cfg.seed)
        rows = [i for i in idx for _ in range(cfg.k)]
        gens = generate(
            self.model,
            self.tok,
            [self.prompts[i] for i in rows],
            max_new_tokens=cfg.max_new_tokens,
            batch_size=len(rows),
            temperature=cfg.temperature,
            seed=cfg.seed * 1_000_003 + step,
            progress=False,
        )
        t1 = time.perf_counter()
        rolls = self.rollouts(idx, gens)
        rec: dict = dict(step=step + 1, lr=self.lr_at(step))
        rewards = self.rewards(rows, gens, rolls, rec)
        t2 = time.perf_counter()
        adv = advantages(rewards.view(-1, cfg.k), cfg.advantage).view(-1)
        zero = (adv.view(-1, cfg.k) == 0).all(1)
        other_terms = (cfg.kl_coef > 0 and cfg.kl_mode == "loss") or (
            cfg.objective == "latro" and cfg.answer_weight > 0
        )
        active = [i for i, r in enumerate(rolls) if other_terms or not zero[r.group]]
        loss, k3_sum, k1_sum, fwd_tok = self.backward(rolls, adv, active)
        t3 = time.perf_counter()
        grad_norm = None
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        if active:
            params = [p for _, p in self.named]
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            )
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        n_tok = sum(r.generated for r in rolls)
        kl_loss = cfg.kl_coef > 0 and cfg.kl_mode == "loss"
        if kl_loss:
            rec["kl"] = k1_sum / max(1, len(active))
        norms = self.params.layer_norms()
        rec.update(
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()),
            zero_var_groups=int(zero.sum()),
            groups=len(idx),
            skipped_rollouts=len(rolls) - len(active),
            mean_len=n_tok / len(rolls),
            trunc_rate=sum(not g.finished for g in gens) / len(gens),
            finished_rate=sum(r.finished for r in rolls) / len(rolls),
            k3=k3_sum / max(1, sum(len(rolls[i].completion) for i in active)) if kl_loss else None,
            loss=loss,
            grad_norm=grad_norm,
            param_norm=math.sqrt(sum(v * v for v in norms.values())),
            layer_norms={str(L): v for L, v in norms.items()},
            t_generate=t1 - t0,
            t_reward=t2 - t1,
            t_fwd_bwd=t3 - t2,
            t_step=time.perf_counter() - t0,
            gen_tok_s=n_tok / max(t1 - t0, 1e-9),
            fwd_tokens=fwd_tok,
            fwd_tok_s=fwd_tok / max(t3 - t2, 1e-9),
        )
        return rec

    def backward(self, rolls: list[Rollout], adv: torch.Tensor, active: list[int]):
        """Accumulate the gradient of the step's loss over micro-batches of the active rollouts."""
        cfg = self.cfg
        n_tok = max(1, sum(len(r.completion) for r in rolls))
        kl_loss = cfg.kl_coef > 0 and cfg.kl_mode == "loss"
        total, k3_sum, k1_sum, fwd_tok = 0.0, 0.0, 0.0, 0
        order = sorted(
            active, key=lambda i: len(rolls[i].prompt) + len(rolls[i].completion) + len(rolls[i].answer)
        )
        for chunk in _chunks(order, cfg.micro_batch):
            mb = [rolls[i] for i in chunk]
            a = adv[chunk].to(next(self.model.parameters()).device)
            if kl_loss:
                with torch.no_grad(), self.params.reference():
                    ref = self._forward(mb)[0]
            lp, zm, ym = self._forward(mb)
            if cfg.objective == "latro":
                loss = latro_loss((lp * zm).sum(1), (lp * ym).sum(1), a, len(rolls), cfg.answer_weight)
            else:
                loss = policy_gradient_loss(lp, zm, a, n_tok)
            if kl_loss:
                kt = k3(lp, ref) * zm
                loss = loss + cfg.kl_coef * kt.sum() / n_tok
                k3_sum += float(kt.detach().sum())
                k1_sum += float(((lp.detach() - ref) * zm).sum())
            loss.backward()
            total += float(loss.detach())
            fwd_tok += sum(len(r.prompt) + len(r.completion) + len(r.answer) for r in mb)
        return total, k3_sum, k1_sum, fwd_tok

    def finish(self, log: list[dict]) -> tuple[Path, SteeringVectors | None]:
        """Write the artefact (vectors or adapter folder), the curves and ``result.json``."""
        cfg, prov = (
            self.cfg,
            dict(model=model_name(self.model), model_fingerprint=model_fingerprint(self.model)),
        )
        vectors = None
        if isinstance(self.params, BiasVectors):
            prov.update(positions="all", objective=cfg.objective, steps=cfg.steps, train=asdict(cfg))
            vectors = SteeringVectors(self.params.as_dict(), 1.0, source="rl", provenance=prov)
            artefact = vectors.save(self.out / "vectors.safetensors")
        else:
            artefact, tmp = self.out / "adapter", self.out / "adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.params.save(tmp)
            atomic_write_json(tmp / "lrs_train.json", dict(provenance=prov, train=asdict(cfg)))
            shutil.rmtree(artefact, ignore_errors=True)
            tmp.rename(artefact)
        plot_curves(log, self.out / "curves.png")
        tail = [r["reward_mean"] for r in log[-10:]]
        summary = dict(
            steps=cfg.steps,
            artefact=str(artefact),
            reward_first=log[0]["reward_mean"] if log else None,
            reward_last10=sum(tail) / len(tail) if tail else None,
            train=asdict(cfg),
            provenance=prov,
        )
        atomic_write_json(self.out / "result.json", summary)
        return artefact, vectors


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def train(
    model: nn.Module,
    tok,
    problems: Sequence[Problem],
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    reward_fn: RewardFn | None = None,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg.param`` on a frozen ``model`` for ``cfg.steps`` steps, resuming from ``out_dir`` if it holds a run.

    ``reward_fn(problems, generations) -> rewards`` replaces the verifier (objective ``verifier`` only); it gets
    one problem per generation (each repeated K times, groups consecutive). ``on_step(record)`` is called after
    each step's log line and checkpoint. Writes to ``out_dir``: ``checkpoints/``, ``train_log.jsonl``,
    ``curves.png``, ``result.json`` and ``vectors.safetensors`` (bias: a SteeringVectors artefact, source
    ``rl``, provenance ``positions='all'``) or ``adapter/`` (lora: a PEFT adapter folder).
    """
    if out_dir is None and cfg.out is None:
        raise LRSError("train needs an output directory (out_dir or --out)")
    out = check_dir_target(Path(out_dir if out_dir is not None else cfg.out), "--out")
    problems = list(problems)
    if len(problems) < cfg.prompts_per_step:
        raise LRSError(
            f"{len(problems)} training problems but --prompts-per-step {cfg.prompts_per_step}: give more problems"
        )
    if reward_fn is not None and cfg.objective != "verifier":
        raise LRSError("a custom reward_fn replaces the verifier; LaTRO computes its own reward")
    check_budget(model, cfg.max_new_tokens)
    model.eval()
    with exclusive(out / ".lock", f"training run {out}"):
        tr = _Trainer(model, tok, problems, cfg, out, reward_fn)
        try:
            start = load_checkpoint(out, tr.named, tr.opt, cfg, model)
            log_path = out / "train_log.jsonl"
            log = read_log(log_path, upto=start)
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
            bar = tqdm(
                total=cfg.steps, initial=start, desc=f"rl {cfg.param}", unit="step", disable=not progress
            )
            with bar, open(log_path, "a", encoding="utf-8") as f:
                for step in range(start, cfg.steps):
                    rec = tr.step(step)
                    log.append(rec)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                        save_checkpoint(out, step + 1, tr.named, tr.opt, cfg, model)
                        plot_curves(log, out / "curves.png")
                    bar.update(1)
                    bar.set_postfix(
                        r=f"{rec['reward_mean']:.3f}", len=f"{rec['mean_len']:.0f}", s=f"{rec['t_step']:.1f}"
                    )
                    if on_step is not None:
                        on_step(rec)
            artefact, vectors = tr.finish(log)
        finally:
            tr.params.close()
    peft = getattr(tr.params, "peft", None)
    return TrainResult(out, cfg.steps, artefact, vectors, peft if peft is not None else model, log)

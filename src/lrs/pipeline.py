"""The CLI's stage commands: collect, fit-encoder, train-reward, tune, demo, report (thin glue over the library).

Artefacts live in a run directory: ``traces/``, ``encoder.safetensors``, ``reward.safetensors``,
``tune.json``, ``eval/<split>/<method>.jsonl`` and ``report.md``; each step reuses what exists.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import fields
from pathlib import Path

import torch

from lrs.errors import LRSError

STEER_METHODS = {"lrs": "gated", "lrs-basic": "always", "random": "gated"}


def _rd(args) -> Path:
    from lrs.cli import run_dir

    return run_dir(args)


def _middle_layer(model) -> int:
    from lrs.models import decoder_layers

    return len(decoder_layers(model)) // 2


# ---- stage 1 ----------------------------------------------------------------------------------------
def cmd_collect(args) -> None:
    from lrs.models import load_model
    from lrs.tasks import load_task
    from lrs.traces import collect_traces

    problems = load_task(
        args.task, args.split, seed=args.seed, limit=300 if args.limit is None else args.limit
    )
    if not problems:
        raise LRSError("no problems to collect traces on (empty split or --limit 0)")
    model, tok = load_model(args.model, dtype=args.dtype)
    layers = args.layer or [_middle_layer(model)]
    out = Path(args.out) if args.out else _rd(args) / "traces"
    t0 = time.perf_counter()
    ts = collect_traces(
        model,
        tok,
        problems,
        out,
        layers=layers,
        samples_per_problem=args.samples_per_problem,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        meta=dict(task=args.task, split=args.split),
    )
    print(describe_traces(ts) + f" ({time.perf_counter() - t0:.0f} s)")
    print(f"traces: {out}")


def describe_traces(ts) -> str:
    """One line: how many traces, how many right, lengths by label, truncation."""
    rec = ts.records
    right = [r for r in rec if r["label"]]
    wrong = [r for r in rec if not r["label"]]

    def mean_len(rs):
        return sum(r["length"] for r in rs) / len(rs) if rs else float("nan")

    return (
        f"{len(rec)} traces on {len({r['problem_id'] for r in rec})} problems: {len(right)} correct "
        f"({len(right) / len(rec):.1%}); mean length {mean_len(right):.0f} (correct) vs {mean_len(wrong):.0f} "
        f"(wrong); {sum(r['truncated'] for r in rec)} hit the token limit"
    )


# ---- stage 2 ----------------------------------------------------------------------------------------
def _traces(args):
    from lrs.traces import TraceSet

    return TraceSet(Path(args.traces) if getattr(args, "traces", None) else _rd(args) / "traces")


def fit_encoder_from_traces(
    ts,
    layer: int,
    kind: str = "topk",
    latents: int = 10,
    topk: int = 3,
    sparse: bool = False,
    rescale: bool = True,
    max_states: int = 200_000,
    seed: int = 0,
):
    """Fit an encoder of ``kind`` on a trace set's states at ``layer``; returns (encoder, metrics)."""
    from lrs import encoders

    states = ts.states(layer, max_states=max_states, seed=seed)
    if kind == "topk":
        enc, metrics = encoders.fit_topk_sae(states, n_latents=latents, k=topk, seed=seed, layer=layer)
        enc.sparse = sparse
    elif kind == "identity":
        enc, metrics = encoders.fit_identity(states, layer=layer), {}
    else:
        enc, metrics = encoders.fit_pca(states, n_latents=latents, layer=layer), {}
    enc.rescale = rescale
    return enc, metrics


def cmd_fit_encoder(args) -> None:
    from lrs.encoders import save_encoder

    ts = _traces(args)
    layer = args.layer if args.layer is not None else ts.layers[0]
    enc, metrics = fit_encoder_from_traces(
        ts,
        layer,
        args.kind,
        args.latents,
        args.topk,
        args.sparse,
        not args.no_rescale,
        args.max_states,
        args.seed,
    )
    out = Path(args.out) if args.out else _rd(args) / "encoder.safetensors"
    save_encoder(enc, out, provenance=_provenance(ts, layer), metrics=metrics)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"{args.kind} encoder, {enc.n_latents} latents at layer {layer}: {shown or 'fitted'}")
    print(f"encoder: {out}")


def _provenance(ts, layer: int) -> dict:
    return dict(
        model=ts.config["model"],
        layer=layer,
        task=ts.config.get("task"),
        traces=str(ts.path),
        data_fingerprint=ts.fingerprint(),
    )


def reward_inputs(ts, enc) -> dict:
    """Encode every trace's states: the reward trainer's inputs (latents, labels, groups, conf, prompt)."""
    L = enc.layer
    if L not in ts.layers:
        raise LRSError(f"encoder layer {L} was not collected in {ts.path} (collected: {ts.layers})")
    out = dict(latents=[], labels=[], groups=[], conf=[], prompt=[])
    with torch.no_grad():
        for t in ts:
            out["latents"].append(enc.encode(t.hidden[L]).float())
            out["labels"].append(t.label)
            out["groups"].append(t.problem_id)
            out["conf"].append(t.conf.float())
            out["prompt"].append(t.prompt[L].float())
    return out


def train_reward_from_traces(
    ts, enc, kind: str = "causal", epochs: int | None = None, seed: int = 0, heldout=None
):
    """Train a reward model on a trace set through ``enc`` (report repeated on trace set ``heldout`` if given);
    returns (model, report)."""
    from lrs.reward import RewardConfig, train_reward_model

    cfg = RewardConfig(kind=kind, seed=seed)
    if epochs is not None:
        cfg.epochs = epochs
    x = reward_inputs(ts, enc)
    h = reward_inputs(heldout, enc) if heldout is not None else None
    return train_reward_model(
        x["latents"], x["labels"], x["groups"], cfg=cfg, conf=x["conf"], prompt=x["prompt"], heldout=h
    )


def cmd_train_reward(args) -> None:
    from lrs.encoders import encoder_hash, load_encoder
    from lrs.reward import format_report, save_reward_model

    rd = _rd(args)
    ts = _traces(args)
    enc = load_encoder(Path(args.encoder) if args.encoder else rd / "encoder.safetensors")
    held = None
    if args.eval_traces:
        from lrs.traces import TraceSet

        held = TraceSet(args.eval_traces)
    rm, report = train_reward_from_traces(ts, enc, args.kind, args.epochs, args.seed, heldout=held)
    out = Path(args.out) if args.out else rd / "reward.safetensors"
    prov = _provenance(ts, enc.layer) | dict(
        encoder_hash=encoder_hash(enc), encoder_kind=enc.kind, n_latents=enc.n_latents
    )
    save_reward_model(rm, out, provenance=prov, metrics=report)
    out.with_suffix(".report.txt").write_text(format_report(report) + "\n")
    print(format_report(report))
    print(f"reward model: {out}")


# ---- stage 3 ----------------------------------------------------------------------------------------
def steer_config(args, rd: Path, method: str):
    """SteerConfig from tune.json (with --tuned) overridden by explicit flags; gate mode set by method."""
    from lrs.steering import SteerConfig

    base: dict = {}
    if getattr(args, "tuned", False):
        tf = rd / "tune.json"
        if not tf.exists():
            raise LRSError(f"--tuned needs {tf}: run `lrs tune` on the dev split first")
        base = json.loads(tf.read_text())["best"].get(method, {})
    names = {f.name for f in fields(SteerConfig)}
    cfg = {k: v for k, v in base.items() if k in names}
    for flag, key in (
        ("k", "k"),
        ("alpha", "alpha"),
        ("tau_r", "tau_r"),
        ("tau_c", "tau_c"),
        ("warmup", "warmup"),
        ("every", "every"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            cfg[key] = v
    cfg["gate"] = STEER_METHODS[method]
    cfg["control"] = "random" if method == "random" else "reward"
    return SteerConfig(**cfg)


def make_steerer(args, rd: Path, model, method: str | None = None):
    """Build the steerer a steering method needs from the run directory's artefacts."""
    from lrs.encoders import check_compatible, load_encoder
    from lrs.models import hidden_size
    from lrs.reward import load_reward_model
    from lrs.steering import DiffMeanSteerer, LatentRewardSteerer

    method = method or args.method
    enc_path = Path(args.encoder) if getattr(args, "encoder", None) else rd / "encoder.safetensors"
    if method == "diffmean":
        from lrs.traces import TraceSet

        alpha = getattr(args, "diffmean_alpha", None)
        if alpha is None and getattr(args, "tuned", False) and (rd / "tune.json").exists():
            alpha = json.loads((rd / "tune.json").read_text())["best"].get("diffmean", {}).get("alpha")
        layer = load_encoder(enc_path).layer if enc_path.exists() else None
        ts = TraceSet(rd / "traces")
        return DiffMeanSteerer.from_traces(ts, layer if layer is not None else ts.layers[0], alpha or 1.0)
    for p, what in (
        (enc_path, "encoder"),
        (Path(args.reward) if getattr(args, "reward", None) else rd / "reward.safetensors", "reward model"),
    ):
        if not p.exists():
            raise LRSError(
                f"no {what} at {p}: run `lrs collect`, `lrs fit-encoder`, `lrs train-reward` first (or `lrs demo`)"
            )
    enc = load_encoder(enc_path)
    check_compatible(enc, hidden_size(model), enc.layer)
    rm = load_reward_model(Path(args.reward) if getattr(args, "reward", None) else rd / "reward.safetensors")
    return LatentRewardSteerer(
        enc, rm, steer_config(args, rd, method), log_events=getattr(args, "log_events", False)
    )


GRIDS = {
    "tiny": dict(k=[2], alpha=[0.1, 0.5], tau_r=[0.5], tau_c=[0.72], diffmean=[2.0], base=False),
    "small": dict(
        k=[2], alpha=[0.1, 0.3, 1.0], tau_r=[0.5, 0.9], tau_c=[0.72], diffmean=[0.5, 1.0, 4.0], base=True
    ),
    "full": dict(
        k=[1, 2, 4],
        alpha=[0.05, 0.1, 0.3, 1.0],
        tau_r=[0.3, 0.5, 0.7, 0.9],
        tau_c=[0.5, 0.72, 0.9],
        diffmean=[0.25, 0.5, 1.0, 2.0, 4.0],
        base=True,
    ),
}


def tune(
    model, tok, problems, rd: Path, grid: str = "small", *, args, max_new_tokens: int, batch_size: int
) -> dict:
    """Grid over K, alpha, tau_r, tau_c (LRS) and alpha (diffmean) on DEV problems; best = highest dev accuracy."""
    from lrs.evaluate import evaluate, load_result
    from lrs.steering import DiffMeanSteerer

    g = GRIDS[grid]
    out = rd / "tune"
    runs = []

    def run(name: str, steerer, params: dict, method: str) -> None:
        res = load_result(out, name)
        if res is None or res["summary"]["n"] != len(problems):
            res = evaluate(
                model,
                tok,
                problems,
                method=method,
                steerer=steerer,
                out_dir=out,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                seed=args.seed,
                progress=True,
            )
            os.replace(out / f"{method}.jsonl", out / f"{name}.jsonl")
            os.replace(out / f"{method}.summary.json", out / f"{name}.summary.json")
        s = res["summary"]
        runs.append(
            dict(
                name=name,
                method=method,
                params=params,
                accuracy=s["accuracy"],
                steer_rate=s.get("steering", {}).get("steer_rate", 0.0),
            )
        )
        print(f"  dev {name}: {s['accuracy']:.1%}")

    if g["base"]:
        run("base", None, {}, "base")
    for k, a, tr, tc in itertools.product(g["k"], g["alpha"], g["tau_r"], g["tau_c"]):
        params = dict(k=k, alpha=a, tau_r=tr, tau_c=tc)
        ns = argparse_namespace(args, tuned=False, **params)
        run(f"lrs-k{k}-a{a}-r{tr}-c{tc}", make_steerer(ns, rd, model, "lrs"), params, "lrs")
    dm = make_steerer(argparse_namespace(args, tuned=False, diffmean_alpha=1.0), rd, model, "diffmean")
    for a in g["diffmean"]:
        run(f"diffmean-a{a}", DiffMeanSteerer(dm.vector, dm.layer, a), dict(alpha=a), "diffmean")
    best = {}
    for method in ("lrs", "diffmean"):
        cands = [r for r in runs if r["method"] == method]
        top = max(cands, key=lambda r: (r["accuracy"], -r["steer_rate"]))
        best[method] = top["params"]
    best["lrs-basic"] = {k: v for k, v in best["lrs"].items() if k in ("k", "alpha")}
    best["random"] = dict(best["lrs"])
    result = dict(split="dev", n=len(problems), grid=grid, runs=runs, best=best)
    (rd / "tune.json").write_text(json.dumps(result, indent=1))
    return result


def argparse_namespace(args, **over):
    """A copy of ``args`` with some attributes replaced (for building steerers inside the tuner)."""
    import argparse

    d = dict(vars(args))
    d.update(over)
    d.setdefault("tuned", False)
    return argparse.Namespace(**d)


def cmd_tune(args) -> None:
    from lrs.models import load_model
    from lrs.tasks import load_task

    rd = _rd(args)
    problems = load_task(args.task, "dev", seed=args.seed, limit=40 if args.limit is None else args.limit)
    model, tok = load_model(args.model, dtype=args.dtype)
    res = tune(
        model,
        tok,
        problems,
        rd,
        args.grid,
        args=args,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    print(f"chosen on dev (n={res['n']}): " + json.dumps(res["best"]))
    print(f"saved: {rd / 'tune.json'}")


# ---- demo and report ---------------------------------------------------------------------------------
PRESETS = {
    "quick": dict(train=64, dev=16, test=32, tokens=224, latents=16, grid="tiny", batch=16),
    "full": dict(train=600, dev=100, test=300, tokens=512, latents=64, grid="small", batch=16),
}


def cmd_demo(args) -> None:
    from lrs.demo import run_demo

    run_demo(args, PRESETS[args.preset])


def cmd_report(args) -> None:
    from lrs.report import write_report

    path = write_report(_rd(args), args.split)
    print(f"report: {path}")

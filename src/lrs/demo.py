"""`lrs demo`: the whole method end to end on one task, every step cached in the run directory.

fetch model -> collect train traces -> fit encoder -> train reward model -> tune on dev -> evaluate base,
LRS, LRS basic, random-direction control and diffmean on test -> Markdown report with plots.
"""

from __future__ import annotations

import time
from pathlib import Path

from lrs.evaluate import evaluate, load_result, summary_line
from lrs.models import load_model
from lrs.pipeline import (
    argparse_namespace,
    describe_traces,
    fit_encoder_from_traces,
    make_steerer,
    train_reward_from_traces,
    tune,
)
from lrs.report import write_report
from lrs.tasks import load_task
from lrs.traces import collect_traces

TEST_METHODS = ("base", "lrs", "lrs-basic", "random", "diffmean")


def _say(msg: str) -> None:
    print(f"[lrs demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(args, preset: dict) -> Path:
    """Run (or resume) the demo pipeline and return the report path."""
    from lrs.encoders import encoder_hash, load_encoder, save_encoder
    from lrs.reward import format_report, save_reward_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    from lrs.cli import _slug
    from lrs.packaged import DEFAULT_MODEL

    rd = (
        Path(args.run)
        if args.run
        else Path("runs") / f"demo-{args.preset}-{args.task}-{_slug(args.model or DEFAULT_MODEL)}"
    )
    rd.mkdir(parents=True, exist_ok=True)
    from lrs.models import decoder_layers

    layer = len(decoder_layers(model)) // 2
    tokens, batch, seed = preset["tokens"], preset["batch"], args.seed

    _say(f"1/5 collecting {preset['train']} train traces at layer {layer} into {rd / 'traces'}")
    train = load_task(args.task, "train", seed=seed, limit=preset["train"])
    ts = collect_traces(
        model,
        tok,
        train,
        rd / "traces",
        layers=[layer],
        max_new_tokens=tokens,
        batch_size=batch,
        seed=seed,
        meta=dict(task=args.task, split="train"),
    )
    _say(describe_traces(ts))

    enc_path = rd / "encoder.safetensors"
    if not enc_path.exists():
        _say(f"2/5 fitting a TopK SAE encoder ({preset['latents']} latents, k=3) on the train states")
        enc, metrics = fit_encoder_from_traces(ts, layer, "topk", preset["latents"], 3, seed=seed)
        save_encoder(
            enc,
            enc_path,
            provenance=dict(model=ts.config["model"], layer=layer, data_fingerprint=ts.fingerprint()),
            metrics=metrics,
        )
    enc = load_encoder(enc_path)

    rm_path = rd / "reward.safetensors"
    if not rm_path.exists():
        _say("3/5 training the causal latent reward model (split by problem, selected on val AUROC)")
        rm, report = train_reward_from_traces(ts, enc, "causal", seed=seed)
        save_reward_model(
            rm,
            rm_path,
            provenance=dict(
                model=ts.config["model"],
                layer=layer,
                encoder_hash=encoder_hash(enc),
                data_fingerprint=ts.fingerprint(),
            ),
            metrics=report,
        )
        rm_path.with_suffix(".report.txt").write_text(format_report(report) + "\n")
    rm_text = rm_path.with_suffix(".report.txt").read_text()
    print(rm_text)

    ns = argparse_namespace(
        args, run=str(rd), encoder=None, reward=None, tuned=True, log_events=False, diffmean_alpha=None
    )
    if not (rd / "tune.json").exists():
        dev = load_task(args.task, "dev", seed=seed, limit=preset["dev"])
        _say(f"4/5 tuning on {len(dev)} dev problems (grid '{preset['grid']}'); test is not touched")
        tune(model, tok, dev, rd, preset["grid"], args=ns, max_new_tokens=tokens, batch_size=batch)

    test = load_task(args.task, "test", seed=seed, limit=preset["test"])
    out = rd / "eval" / "test"
    _say(f"5/5 evaluating {', '.join(TEST_METHODS)} on {len(test)} test problems")
    for method in TEST_METHODS:
        res = load_result(out, method)
        if res is None or res["summary"]["n"] != len(test):
            steerer = None
            if method != "base":
                steerer = make_steerer(argparse_namespace(ns, log_events=method == "lrs"), rd, model, method)
            res = evaluate(
                model,
                tok,
                test,
                method=method,
                steerer=steerer,
                out_dir=out,
                max_new_tokens=tokens,
                batch_size=batch,
                seed=seed,
                extra=dict(task=args.task, split="test"),
            )
        _say(summary_line(res["summary"]))
    extra = [
        "## Reward model (validation traces, train split)",
        "",
        "```",
        rm_text.rstrip(),
        "```",
        "",
        f"Tuning choice (dev split): see `tune.json`. Total demo time: {time.perf_counter() - t0:.0f} s.",
    ]
    path = write_report(rd, "test", extra=extra)
    _say(f"report: {path}")
    return path

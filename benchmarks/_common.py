"""Shared set-up for the benchmark scripts: the default model and a fixed set of prompts."""

from __future__ import annotations

import argparse
import time

import torch

from lrs.models import load_model
from lrs.tasks import build_prompts, load_task


def parser(desc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=desc)
    ap.add_argument("--model", default=None, help="model spec (default: the packaged default model)")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--n", type=int, default=32, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    return ap


def setup(args):
    """Load the model and build ``args.n`` dev prompts (never test problems)."""
    model, tok = load_model(args.model)
    problems = load_task(args.task, "dev", limit=args.n)
    return model, tok, problems, build_prompts(tok, problems)


def timed(fn):
    """Run ``fn`` and return (result, seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def threads() -> str:
    return f"{torch.get_num_threads()} torch threads"

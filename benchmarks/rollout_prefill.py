"""How much of value-rollout time is prefill, i.e. the most that reusing a trace's KV cache could save.

Value labels (`lrs collect --rollouts M --rollout-every N`) re-encode prompt + prefix for every continuation.
Reusing the KV cache of the trace would skip those prefill forwards and nothing else: the decode steps stay.
This script generates greedy traces for dev prompts, then labels them with `rollout_values` exactly as
collection does, timing every model forward; forwards over more than one new position are the prefills.
It prints the rollout time, the prefill time and their ratio (the upper bound of the saving), and the
rollout time against plain generation of the same traces (what value labels cost over a plain collection).

    python benchmarks/rollout_prefill.py                 # 16 problems, 192 tokens, M = 4, every 64
    python benchmarks/rollout_prefill.py --n 8 --m 2 --every 32
"""

from __future__ import annotations

import time

from _common import parser, setup, threads, timed

from lrs.generation import generate
from lrs.rollouts import rollout_values


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(n=16, max_new_tokens=192)
    ap.add_argument("--m", type=int, default=4, help="continuations per prefix")
    ap.add_argument("--every", type=int, default=64, help="prefix spacing in tokens")
    args = ap.parse_args()
    model, tok, problems, prompts = setup(args)
    gens, gen_secs = timed(lambda: generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.batch_size, progress=False))  # fmt: skip
    gen_tokens = sum(g.n_tokens for g in gens)
    prefill = {"s": 0.0, "calls": 0, "positions": 0}
    decode = {"s": 0.0, "calls": 0, "slots": 0}
    forward = model.forward

    def timed_forward(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        t0 = time.perf_counter()
        out = forward(*a, **k)
        dt = time.perf_counter() - t0
        if ids is not None and ids.shape[1] > 1:
            prefill["s"] += dt
            prefill["calls"] += 1
            prefill["positions"] += ids.numel()
        else:
            decode["s"] += dt
            decode["calls"] += 1
            decode["slots"] += 0 if ids is None else ids.shape[0]
        return out

    model.forward = timed_forward
    try:
        values, secs = timed(
            lambda: rollout_values(
                model, tok, prompts, [g.token_ids for g in gens], [p.answer for p in problems], m=args.m,
                every=args.every, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            )
        )  # fmt: skip
    finally:
        model.forward = forward
    n_prefixes = sum(len(v) for v in values)
    print(f"{len(prompts)} traces, {n_prefixes} prefixes x M={args.m}, every {args.every} tokens, budget "
          f"{args.max_new_tokens}, batch {args.batch_size}, {next(model.parameters()).dtype}, {threads()}")  # fmt: skip
    print(f"rollouts: {secs:.1f} s in all; model forwards: prefill {prefill['s']:.1f} s "
          f"({prefill['calls']} calls, {prefill['positions']} positions), decode {decode['s']:.1f} s "
          f"({decode['calls']} calls)")  # fmt: skip
    print(f"prefill / rollout time = {prefill['s'] / secs:.3f}: the most a reused KV cache could save")
    print(f"plain generation of the same traces: {gen_secs:.1f} s, {gen_tokens / gen_secs:.1f} tok/s; rollouts "
          f"{decode['slots'] / secs:.1f} decoded token slots/s; value labelling / plain collection time = "
          f"{secs / gen_secs:.2f}x ({secs / max(n_prefixes, 1):.2f} s per labelled prefix)")  # fmt: skip


if __name__ == "__main__":
    main()

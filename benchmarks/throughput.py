"""Batched vs batch-1 generation throughput on the same prompts, in one process; prints the ratio.

python benchmarks/throughput.py            # 32 prompts, 64 new tokens, batch 16 vs batch 1
"""

from _common import parser, setup, threads, timed

from lrs.generation import generate


def main() -> None:
    args = parser(__doc__).parse_args()
    model, tok, _, prompts = setup(args)
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    generate(model, tok, prompts[:2], batch_size=2, **kw)  # warm-up
    big, t_big = timed(lambda: generate(model, tok, prompts, batch_size=args.batch_size, **kw))
    one, t_one = timed(lambda: generate(model, tok, prompts, batch_size=1, **kw))
    n_big, n_one = sum(g.n_tokens for g in big), sum(g.n_tokens for g in one)
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens max, {threads()}")
    print(f"batch {args.batch_size}: {n_big} tokens in {t_big:.1f} s = {n_big / t_big:.1f} tok/s")
    print(f"batch 1:  {n_one} tokens in {t_one:.1f} s = {n_one / t_one:.1f} tok/s")
    print(f"throughput ratio batch {args.batch_size} / batch 1: {(n_big / t_big) / (n_one / t_one):.2f}x")


if __name__ == "__main__":
    main()

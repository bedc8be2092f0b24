"""Trace collection vs plain generation+grading (what `lrs eval` does) on the same problems; prints the ratio.

python benchmarks/collect_overhead.py      # 32 dev problems, 128 new tokens, batch 16, layer 12
"""

import tempfile

from _common import parser, setup, threads, timed

from lrs.evaluate import evaluate
from lrs.traces import collect_traces


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--layer", type=int, default=12)
    args = ap.parse_args()
    args.max_new_tokens = max(args.max_new_tokens, 128)
    model, tok, problems, _ = setup(args)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    evaluate(model, tok, problems[:2], **kw)  # warm-up
    ev, t_eval = timed(lambda: evaluate(model, tok, problems, **kw))
    with tempfile.TemporaryDirectory() as d:
        ts, t_col = timed(lambda: collect_traces(model, tok, problems, d, layers=[args.layer], **kw))
        n_col = sum(r["length"] for r in ts.records)
    n_eval = sum(r["tokens"] for r in ev["records"])
    print(f"{len(problems)} problems, batch {args.batch_size}, {threads()}")
    print(f"eval:    {n_eval} tokens in {t_eval:.1f} s = {n_eval / t_eval:.1f} tok/s")
    print(
        f"collect: {n_col} tokens in {t_col:.1f} s = {n_col / t_col:.1f} tok/s (layer {args.layer} states kept)"
    )
    print(f"collection / eval wall-time ratio: {t_col / t_eval:.3f}")


if __name__ == "__main__":
    main()

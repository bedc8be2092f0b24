"""Seconds per RL step, split into generate / reward / forward-backward, for bias vectors and LoRA on the same prompts.

Both parameterisations start at the base model (zero vectors; LoRA B = 0) and sample with the same seed, so
step 1 draws the same completions for both and the forward-backward figures compare like with like. The
reward is the real verifier plus a 1e-6 jitter, so no group is skipped and every rollout is back-propagated.
Defaults (4 problems x K=4, <= 128 new tokens, 1 step each) keep one run under ~5 minutes on a 2-core CPU.

    python benchmarks/rl_step.py
    python benchmarks/rl_step.py --n 8 --k 4 --max-new-tokens 128 --steps 2 --objective latro
"""

import tempfile
from pathlib import Path

from _common import parser, setup, threads

from lrs.generation import generate
from lrs.trainers import TrainConfig, train, verifier_rewards


def jittered_verifier(problems, gens):
    rewards, _ = verifier_rewards([g.text for g in gens], [p.answer for p in problems])
    return [r + 1e-6 * i for i, r in enumerate(rewards)]


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(n=4, max_new_tokens=128)
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument(
        "--steps", type=int, default=1, help="steps per parameterisation (the last one is reported)"
    )
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--objective", default="verifier", choices=("verifier", "latro"))
    ap.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL in the loss (adds a reference pass)")
    ap.add_argument("--params", nargs="+", default=["bias", "lora"], choices=("bias", "lora"))
    args = ap.parse_args()
    model, tok, problems, prompts = setup(args)
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up
    verifier_rewards(["\\boxed{1}"], ["1"])  # start the grading workers outside the timed steps
    dtype = next(model.parameters()).dtype
    print(f"{len(problems)} problems x K={args.k}, <= {args.max_new_tokens} new tokens, {args.objective}, ")
    print(f"micro-batch {args.micro_batch}, kl_coef {args.kl_coef}, {dtype}, {threads()}")
    print(f"{'param':6} {'step':>4} {'generate s':>10} {'reward s':>9} {'fwd-bwd s':>9} {'total s':>8} "
          f"{'gen tok/s':>9} {'fb tok/s':>8} {'gen tok':>7} {'fb tok':>7} {'trunc':>5}")  # fmt: skip
    for param in args.params:
        cfg = TrainConfig(
            param=param,
            objective=args.objective,
            prompts_per_step=len(problems),
            k=args.k,
            steps=args.steps,
            max_new_tokens=args.max_new_tokens,
            micro_batch=args.micro_batch,
            kl_coef=args.kl_coef,
            warmup=0.0,
        )
        reward = jittered_verifier if args.objective == "verifier" else None
        with tempfile.TemporaryDirectory() as tmp:
            res = train(model, tok, problems, cfg, Path(tmp), reward_fn=reward, progress=False)
        for r in res.log:
            n_gen = r["mean_len"] * len(problems) * args.k
            print(
                f"{param:6} {r['step']:>4} {r['t_generate']:>10.1f} {r['t_reward']:>9.1f} {r['t_fwd_bwd']:>9.1f} "
                f"{r['t_step']:>8.1f} {r['gen_tok_s']:>9.1f} {r['fwd_tok_s']:>8.1f} {n_gen:>7.0f} {r['fwd_tokens']:>7} {r['trunc_rate']:>5.2f}"
            )
        if res.vectors is not None:
            n_trained = sum(v.numel() for v in res.vectors.vectors.values())
        else:
            n_trained = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
        print(f"{param:6} trained parameters: {n_trained}")


if __name__ == "__main__":
    main()

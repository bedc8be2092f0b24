"""Steering cost: LRS (default gate) vs unsteered at batch 16, and batched LRS vs a batch-1 loop.

Uses the encoder and reward model of a run directory, given artefacts, or (``--random-artefacts``) a
randomly initialised 16-latent TopK SAE and causal reward model: their cost is what is measured, not their
quality (the printed steer rate says how often the gate fired). Same prompts, one process.

    python benchmarks/steering_overhead.py --random-artefacts
    python benchmarks/steering_overhead.py --encoder runs/arith/enc-id.safetensors --reward runs/arith/rm-id.safetensors
"""

from pathlib import Path

import torch
from _common import parser, setup, threads, timed

from lrs.generation import generate

try:  # lrs >= 0.2 (steering/ package); the fallback lets this script time older checkouts too
    from lrs.steering import LatentRewardSteerer, SteerConfig
except ImportError:  # pragma: no cover
    from lrs.steer import LatentRewardSteerer, SteerConfig


def random_artefacts(model, n_latents: int = 16, seed: int = 0):
    """A random TopK SAE at the middle layer and a random causal reward model (cost, not quality)."""
    from lrs.encoders import TopKSAE
    from lrs.models import decoder_layers
    from lrs.reward import RewardConfig, RewardModel

    torch.manual_seed(seed)
    d = model.config.hidden_size
    enc = TopKSAE(d, n_latents, 3, layer=len(decoder_layers(model)) // 2)
    with torch.no_grad():
        enc.W_enc.normal_(0, 1 / d**0.5)
        enc.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d, n_latents), dim=0))
    return enc, RewardModel(n_latents, RewardConfig()).eval()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", default="runs/demo-quick-arith-qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--encoder", default=None, help="encoder artefact (default <run>/encoder.safetensors)")
    ap.add_argument("--reward", default=None, help="reward model (default <run>/reward.safetensors)")
    ap.add_argument("--random-artefacts", action="store_true", help="random 16-latent SAE + reward model")
    ap.add_argument("--n-single", type=int, default=8, help="prompts for the batch-1 loop")
    args = ap.parse_args()
    args.max_new_tokens = max(args.max_new_tokens, 96)
    model, tok, _, prompts = setup(args)
    if args.random_artefacts:
        enc, rm = random_artefacts(model)
    else:
        from lrs.encoders import load_encoder
        from lrs.reward import load_reward_model

        enc = load_encoder(args.encoder or Path(args.run) / "encoder.safetensors")
        rm = load_reward_model(args.reward or Path(args.run) / "reward.safetensors")
    cfg = SteerConfig()
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    generate(model, tok, prompts[:2], batch_size=2, **kw)  # warm-up
    plain, t_plain = timed(lambda: generate(model, tok, prompts, batch_size=args.batch_size, **kw))
    st = LatentRewardSteerer(enc, rm, cfg)
    steered, t_lrs = timed(
        lambda: generate(model, tok, prompts, batch_size=args.batch_size, context=st.context, **kw)
    )
    rate = st.stats()["steer_rate"]
    n_plain, n_lrs = sum(g.n_tokens for g in plain), sum(g.n_tokens for g in steered)
    print(
        f"{len(prompts)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens max, {threads()}, "
        f"{str(next(model.parameters()).dtype).replace('torch.', '')}"
    )
    print(f"unsteered: {n_plain} tokens in {t_plain:.1f} s ({n_plain / t_plain:.1f} tok/s)")
    print(f"LRS:       {n_lrs} tokens in {t_lrs:.1f} s ({n_lrs / t_lrs:.1f} tok/s), steer rate {rate:.1%}")
    print(
        f"steered / unsteered wall time: {t_lrs / t_plain:.3f} (per token: {(t_lrs / n_lrs) / (t_plain / n_plain):.3f})"
    )
    sub = prompts[: args.n_single]
    st1 = LatentRewardSteerer(enc, rm, cfg)
    one, t_one = timed(lambda: generate(model, tok, sub, batch_size=1, context=st1.context, **kw))
    n_one = sum(g.n_tokens for g in one)
    print(f"LRS batch-1 loop on {len(sub)} prompts: {n_one / t_one:.1f} tok/s")
    print(f"batched LRS / batch-1 LRS throughput: {(n_lrs / t_lrs) / (n_one / t_one):.2f}x")


if __name__ == "__main__":
    main()

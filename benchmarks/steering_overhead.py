"""Steering cost at realistic lengths: LRS (default gate) vs unsteered, batch 16 and batch 1, with a time split.

Every row generates exactly ``--max-new-tokens`` tokens (``--min-new-tokens`` defaults to it, so the causal
reward model's window is full and the warm-up passed for most of the run). Without ``--encoder/--reward``
the artefacts are random (their cost is measured, not their quality; the printed steer rate says how often
the gate fired): a 16-latent TopK SAE (``topk``) and the 896-d identity encoder fitted on the prompts' own
states (``identity``), each with a random causal reward model. Same prompts, one process; the unsteered and
steered runs are interleaved ``--repeats`` times and the fastest repeat of each counts (a shared box's other
load only ever slows a run down). ``--baseline FILE`` also times the LatentRewardSteerer of another file (an
older ``latent.py``) in the same process, for before/after figures under the same conditions.

The split of one steered run: LLM forward (everything outside the steering hook, including generate()'s own
work and the tracker's confidence softmax, whose time is also shown alone), encode, reward scoring, gradient
steps, decode of dz, and bookkeeping (the rest of the hook).

    python benchmarks/steering_overhead.py                      # 16 prompts, 320 tokens, topk + identity
    python benchmarks/steering_overhead.py --encoders topk --n-single 0 --repeats 1
    python benchmarks/steering_overhead.py --baseline /path/to/old/latent.py
    python benchmarks/steering_overhead.py --encoder runs/x/encoder.safetensors --reward runs/x/reward.safetensors
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict

import torch
from _common import parser, setup, threads, timed

import lrs.generation
from lrs.generation import generate

try:  # lrs >= 0.2 (steering/ package); the fallback lets this script time older checkouts too
    from lrs.steering import LatentRewardSteerer, SteerConfig
except ImportError:  # pragma: no cover
    from lrs.steer import LatentRewardSteerer, SteerConfig

#: split category -> methods of the steerer ("st") or of its encoder ("enc") that belong to it
PARTS = {
    "encode": [("st", "_encode")],
    "reward scoring": [("st", "_score"), ("st", "_score_full"), ("st", "_commit")],
    "gradient steps": [("st", "_delta"), ("st", "_ascend")],
    "decode of dz": [("enc", "decode_delta"), ("st", "_matched_random")],
    "bookkeeping": [("st", "_step")],
}


class Clock:
    """Exclusive wall time per category (nested timed calls are subtracted from their caller)."""

    def __init__(self, sync):
        self.sync, self.total, self.calls, self.stack = sync, defaultdict(float), defaultdict(int), []

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed_fn(*a, **k):
            self.sync()
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                inner = self.stack.pop()
                self.total[name] += dt - inner
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1] += dt

        return timed_fn


@contextlib.contextmanager
def instrumented(clock: Clock, st=None):
    """Time the steerer's parts (instance attributes shadow the methods) and the tracker's softmax."""
    patched = []
    if st is not None:
        owners = {"st": st, "enc": st.encoder}
        for part, names in PARTS.items():
            for owner, name in names:
                obj = owners[owner]
                if hasattr(obj, name):
                    object.__setattr__(obj, name, clock.wrap(part, getattr(obj, name)))
                    patched.append((obj, name))
    cls = lrs.generation.DecodeTracker
    orig = cls._post_head
    cls._post_head = clock.wrap("confidence softmax", orig)
    try:
        yield
    finally:
        cls._post_head = orig
        for obj, name in patched:
            del obj.__dict__[name]


def random_topk(model, n_latents: int = 16, seed: int = 0):
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


random_artefacts = random_topk  # the old name


def random_identity(model, tok, prompts, seed: int = 0):
    """The identity encoder (n = d = 896 for the default model) fitted on the prompts' states at the middle
    layer, and a random causal reward model over those latents."""
    from lrs.encoders import fit_identity
    from lrs.models import decoder_layers
    from lrs.reward import RewardConfig, RewardModel

    layer = len(decoder_layers(model)) // 2
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model(**enc.to(model.device), output_hidden_states=True)
    states = out.hidden_states[layer + 1][enc["attention_mask"].bool()].float().cpu()
    ident = fit_identity(states, layer=layer)
    torch.manual_seed(seed)
    rm = RewardModel(ident.n_latents, RewardConfig()).eval()
    rm.set_standardisation(ident.encode(states))
    return ident, rm


def _sync(model):
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def run(model, tok, prompts, batch, kw, st=None):
    """One generate() pass; returns (tokens, seconds, clock)."""
    clock = Clock(_sync(model))
    ctx = st.context if st is not None else None
    with instrumented(clock, st):
        gens, t = timed(lambda: generate(model, tok, prompts, batch_size=batch, context=ctx, **kw))
    return sum(g.n_tokens for g in gens), t, clock


def split_lines(t: float, clock: Clock, t_ref: float, n_steps: int) -> list[str]:
    """The time split of one steered run, per decode call and as shares of the run and of the reference."""
    hook = sum(v for k, v in clock.total.items() if k != "confidence softmax")
    parts = {"LLM forward (rest)": t - hook, **{p: clock.total.get(p, 0.0) for p in PARTS}}
    out = [f"    {'part':<22}{'s':>8}{'ms/call':>9}{'% run':>8}{'% unst.':>9}"]
    for name, v in parts.items():
        out.append(f"    {name:<22}{v:8.2f}{1e3 * v / n_steps:9.2f}{100 * v / t:8.1f}{100 * v / t_ref:9.1f}")
    sm = clock.total.get("confidence softmax", 0.0)
    out.append(
        f"    {'(confidence softmax)':<22}{sm:8.2f}{1e3 * sm / n_steps:9.2f}{100 * sm / t:8.1f}"
        f"{100 * sm / t_ref:9.1f}   (inside LLM forward; paid unsteered too)"
    )
    out.append(
        f"    steering hook {hook:.2f} s: (run) / (run - hook) = {t / (t - hook):.3f} "
        "(the ratio if the LLM forward had taken the same time in both runs)"
    )
    return out


def compare(model, tok, prompts, batch, kw, steerers, repeats, label) -> dict[str, float]:
    """Unsteered and every steerer, interleaved ``repeats`` times (order rotated); the fastest repeat of each
    counts (the box is shared: slower repeats are other load). Prints ratios and splits; returns the ratios."""
    n_steps = -(-len(prompts) // batch) * kw["max_new_tokens"]
    names = ["unsteered", *steerers]
    runs: dict[str, list] = {k: [] for k in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            st = steerers[name]() if name != "unsteered" else None
            n, t, clock = run(model, tok, prompts, batch, kw, st)
            rate = st.stats()["steer_rate"] if st is not None else 0.0
            runs[name].append((t, n, clock, rate))
    best = {k: min(v, key=lambda r: r[0] / r[1]) for k, v in runs.items()}
    t_ref, n_ref = best["unsteered"][:2]
    print(f"\n== {label}: {len(prompts)} prompts, batch {batch}, {n_steps} decode calls, best of {repeats}")
    sm = best["unsteered"][2].total["confidence softmax"]
    print(
        f"unsteered: {n_ref} tokens in {t_ref:.1f} s ({n_ref / t_ref:.1f} tok/s); all repeats "
        f"{', '.join(f'{r[0]:.1f}' for r in runs['unsteered'])} s; confidence softmax {100 * sm / t_ref:.1f} % "
        f"({1e3 * sm / n_steps:.2f} ms/call)"
    )
    ratios = {}
    for name in steerers:
        t, n, clock, rate = best[name]
        ratios[name] = ratio = (t / n) / (t_ref / n_ref)
        print(
            f"LRS {name}: {n} tokens in {t:.1f} s ({n / t:.1f} tok/s), steer rate {rate:.1%}, "
            f"steered / unsteered per token: {ratio:.3f}; all repeats {', '.join(f'{r[0]:.1f}' for r in runs[name])} s"
        )
        print("\n".join(split_lines(t, clock, t_ref, n_steps)))
    return ratios


def load_baseline(path: str):
    """LatentRewardSteerer from another file (e.g. an older ``latent.py``), to time it in the same process."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("lrs_baseline_steering", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.LatentRewardSteerer


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(n=16, max_new_tokens=320)
    ap.add_argument("--min-new-tokens", type=int, default=None, help="default: --max-new-tokens")
    ap.add_argument("--encoders", default="topk,identity", help="random artefacts to time: topk, identity")
    ap.add_argument("--encoder", default=None, help="an encoder artefact (instead of random ones)")
    ap.add_argument("--reward", default=None, help="the reward model trained on --encoder")
    ap.add_argument("--random-artefacts", action="store_true", help="(the default without --encoder)")
    ap.add_argument("--n-single", type=int, default=1, help="prompts for the batch-1 runs (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each counts")
    ap.add_argument(
        "--baseline", default=None, help="a steering module file (e.g. an older latent.py) to time alongside"
    )
    args = ap.parse_args()
    model, tok, _, prompts = setup(args)
    if args.encoder or args.reward:
        from lrs.encoders import load_encoder
        from lrs.reward import load_reward_model

        if not (args.encoder and args.reward):
            ap.error("--encoder and --reward go together")
        arts = {"artefacts": (load_encoder(args.encoder), load_reward_model(args.reward))}
    else:
        makers = {
            "topk": lambda: random_topk(model),
            "identity": lambda: random_identity(model, tok, prompts),
        }
        arts = {k: makers[k]() for k in args.encoders.split(",")}
    classes = {"": LatentRewardSteerer}
    if args.baseline:
        classes[" [baseline]"] = load_baseline(args.baseline)
    variants = {
        f"{k} (n={enc.n_latents}){tag}": (cls, enc, rm)
        for tag, cls in classes.items()
        for k, (enc, rm) in arts.items()
    }
    steerers = {
        name: functools.partial(cls, enc, rm, SteerConfig()) for name, (cls, enc, rm) in variants.items()
    }
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    warm = dict(kw, max_new_tokens=8)
    generate(model, tok, prompts[:2], batch_size=2, **warm)
    for cls, enc, rm in variants.values():  # warm-up of the hook's code paths
        st = cls(enc, rm, SteerConfig(warmup=1, every=1, gate="always"))
        generate(model, tok, prompts[:2], batch_size=2, context=st.context, **warm)
    model.generation_config.min_new_tokens = args.min_new_tokens or args.max_new_tokens
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    print(
        f"{args.max_new_tokens} new tokens per row (min {model.generation_config.min_new_tokens}), "
        f"{threads()}, {dtype}, {SteerConfig()}"
    )
    label = f"batch {args.batch_size}"
    ratios = compare(model, tok, prompts, args.batch_size, kw, steerers, args.repeats, label)
    if args.n_single:
        compare(model, tok, prompts[: args.n_single], 1, kw, steerers, args.repeats, "batch 1")
    names = ", ".join(f"{k} {r:.3f}" for k, r in ratios.items())
    print(
        f"\nsteered / unsteered per token at batch {args.batch_size}, {args.max_new_tokens} tokens: {names}"
    )


if __name__ == "__main__":
    main()

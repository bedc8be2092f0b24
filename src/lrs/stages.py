"""The pipeline's stages as library functions over typed configs: collect, fit an encoder, train the reward
model, build a steerer, tune on dev, evaluate. The CLI and ``lrs demo`` are thin callers of these.

Every stage reads and writes inside a :class:`~lrs.runs.RunDir`; every cached result is keyed by what
produced it (see :mod:`lrs.runs`).
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from lrs.artifacts import atomic_write_json
from lrs.config import (
    CollectConfig,
    EncoderConfig,
    EvalConfig,
    GenConfig,
    ModelConfig,
    RewardTrainConfig,
    SteerOverrides,
    TaskConfig,
)
from lrs.errors import LRSError
from lrs.reward.train import reward_inputs
from lrs.runs import RunDir, cache_key
from lrs.steering import METHODS, LatentRewardSteerer, SteerConfig, SteeringVectors, get_method
from lrs.tasks import Problem, load_task


# ---- loading ------------------------------------------------------------------------------------------
def load(mc: ModelConfig):
    """(model, tokenizer) for a model config."""
    from lrs.models import load_model

    return load_model(mc.model, dtype=mc.dtype, device=mc.device)


def problems(tc: TaskConfig, split: str | None = None, limit: int | None = None) -> list[Problem]:
    """The problems a task config names (``split``/``limit`` override the config's)."""
    return load_task(
        tc.task,
        split or tc.split,
        split_seed=tc.split_seed,
        limit=tc.limit if limit is None else limit,
        question_field=tc.question_field,
        answer_field=tc.answer_field,
    )


def middle_layer(model) -> int:
    from lrs.models import decoder_layers

    return len(decoder_layers(model)) // 2


# ---- stage 1 ------------------------------------------------------------------------------------------
def collect(model, tok, probs: list[Problem], rd: RunDir, gc: GenConfig, cc: CollectConfig, meta: dict):
    """Stage 1: traces with hidden states into ``cc.out`` (default ``<run>/traces``); resumes."""
    from lrs.models import check_budget
    from lrs.traces import collect_traces

    if not probs:
        raise LRSError("no problems to collect traces on (empty split or --limit 0)")
    check_budget(model, gc.max_new_tokens)
    backend = cc.backend
    if backend == "vllm":  # built here (imports vLLM) so a broken install fails before any collection work
        from lrs.backends import VLLMGenerator, vllm_engine_args

        backend = VLLMGenerator(model, tok, seed=gc.seed, llm_kwargs=vllm_engine_args())
    return collect_traces(
        model,
        tok,
        probs,
        Path(cc.out) if cc.out else rd.traces,
        layers=cc.layers or [middle_layer(model)],
        samples_per_problem=cc.samples_per_problem,
        temperature=cc.temperature,
        max_new_tokens=gc.max_new_tokens,
        batch_size=gc.batch_size,
        seed=gc.seed,
        meta=meta,
        rollouts=cc.rollouts,
        rollout_every=cc.rollout_every,
        backend=backend,
    )


def describe_traces(ts) -> str:
    """One line: how many traces, how many right, lengths by label, truncation."""
    rec = ts.records
    right = [r for r in rec if r["label"]]
    wrong = [r for r in rec if not r["label"]]

    def mean_len(rs):
        return sum(r["length"] for r in rs) / len(rs) if rs else float("nan")

    return (
        f"{len(rec)} traces on {len({r['problem_id'] for r in rec})} problems: {len(right)} correct "
        f"({len(right) / len(rec):.1%}); mean length {mean_len(right):.0f} (correct) vs {mean_len(wrong):.0f} "
        f"(wrong); {sum(r['truncated'] for r in rec)} hit the token limit"
    )


# ---- stage 2 ------------------------------------------------------------------------------------------
def traces_provenance(ts, layer: int) -> dict:
    """What an artefact fitted on trace set ``ts`` at ``layer`` belongs to."""
    return dict(
        model=ts.config["model"],
        model_fingerprint=ts.config.get("model_fingerprint"),
        layer=layer,
        task=ts.config.get("task"),
        traces=str(ts.path),
        data_fingerprint=ts.fingerprint(),
    )


def normalise_layer(ts, layer: int) -> int:
    """A layer index as collection stored it: negative values count from the end, as in ``lrs collect``."""
    if layer < 0:
        n = ts.config.get("n_layers")
        if n is None:
            raise LRSError(
                f"layer {layer}: this trace set does not record the model's depth; give a layer >= 0"
            )
        layer += n
    if layer not in ts.layers:
        raise LRSError(f"layer {layer} was not collected in {ts.path}; collected layers: {ts.layers}")
    return layer


def fit_encoder(ts, ec: EncoderConfig, seed: int = 0):
    """Fit an encoder of ``ec.kind`` on a trace set's states; returns (encoder, metrics) with provenance set."""
    from lrs import encoders

    layer = normalise_layer(ts, ec.layer) if ec.layer is not None else ts.layers[0]
    states = ts.states(layer, max_states=ec.max_states, seed=seed)
    if ec.kind == "topk":
        enc, metrics = encoders.fit_topk_sae(states, n_latents=ec.latents, k=ec.topk, seed=seed, layer=layer)
        enc.sparse = ec.sparse
    elif ec.kind == "identity":
        enc, metrics = encoders.fit_identity(states, layer=layer), {}
    elif ec.kind == "pca":
        enc, metrics = encoders.fit_pca(states, n_latents=ec.latents, layer=layer), {}
    else:
        raise LRSError(f"unknown encoder kind '{ec.kind}': use topk, identity or pca")
    enc.rescale = ec.rescale
    enc.provenance = traces_provenance(ts, layer)
    return enc, metrics


def train_reward(ts, enc, rc: RewardTrainConfig, seed: int = 0, heldout=None):
    """Train a reward model on ``ts`` through ``enc`` (report repeated on ``heldout``); returns (model, report)."""
    from lrs.encoders import encoder_hash
    from lrs.reward import RewardConfig, train_reward_model

    cfg = RewardConfig(
        kind=rc.kind, objective=rc.objective, seed=seed, report_frac=rc.report_frac, drop_truncated=rc.drop_truncated,
        use_position=rc.position, **({"epochs": rc.epochs} if rc.epochs is not None else {}),
    )  # fmt: skip
    x = reward_inputs(ts, enc)
    h = reward_inputs(heldout, enc) if heldout is not None else None
    rm, report = train_reward_model(
        x["latents"], x["labels"], x["groups"], cfg=cfg, conf=x["conf"], prompt=x["prompt"], heldout=h,
        truncated=[bool(r["truncated"]) for r in ts.records], values=x["values"],
    )  # fmt: skip
    rm.provenance = traces_provenance(ts, enc.layer) | dict(
        encoder_hash=encoder_hash(enc), encoder_kind=enc.kind, n_latents=enc.n_latents
    )
    return rm, report


# ---- stage 3 ------------------------------------------------------------------------------------------
def artefact_key(rd: RunDir, so: SteerOverrides) -> str:
    """Key of the steering artefacts in use (encoder, reward model, traces): tune results are filed under it."""
    from lrs.artifacts import read_sidecar
    from lrs.encoders import FORMAT as ENC
    from lrs.reward import FORMAT as RM

    parts = {}
    for name, path, fmt in (
        ("encoder", Path(so.encoder) if so.encoder else rd.encoder, ENC),
        ("reward", Path(so.reward) if so.reward else rd.reward, RM),
    ):
        parts[name] = (
            read_sidecar(path, fmt, name.replace("reward", "reward model"))[1]["hash"]
            if path.exists()
            else None
        )
    mf = rd.traces / "manifest.json"
    parts["traces"] = cache_key({"manifest": mf.read_text()}) if mf.exists() else None
    return cache_key(parts)


def steer_config(method: str, so: SteerOverrides, tuned: dict | None = None) -> SteerConfig:
    """SteerConfig for a latent method: tuned settings (if any), overridden by explicit ones; gate from the registry."""
    m = get_method(method)
    names = {f.name for f in fields(SteerConfig)}
    cfg = {k: v for k, v in (tuned or {}).get(method, {}).items() if k in names}
    explicit = so.values()
    if "tau_r" in explicit:  # an explicit tau_r replaces a tuned quantile gate
        cfg.pop("tau_r_quantile", None)
    cfg.update(explicit)
    cfg["gate"], cfg["control"] = m.gate, m.control
    return SteerConfig(**cfg)


def build_steerer(method: str, model, rd: RunDir, so: SteerOverrides, tuned: dict | None = None):
    """The steerer a method needs, from the run directory's (or the given) artefacts; None for prompt methods.

    Refuses with one line: missing artefacts, an encoder/reward pair that was not trained together, an
    encoder fitted for another model, width or layer.
    """
    from lrs.encoders import load_encoder
    from lrs.reward import load_reward_model
    from lrs.steering import check_model

    m = get_method(method)
    if m.steerer is None:
        return None
    if m.steerer == "adapter":
        from lrs.steering.adapter import LoraAdapter

        if not so.adapter:
            raise LRSError(f"--method {method} needs --adapter DIR (e.g. <run>/rl/lora-verifier/adapter)")
        return LoraAdapter(so.adapter)
    if m.steerer in ("file", "file-random"):
        if not so.vectors:
            raise LRSError(
                f"--method {method} needs --vectors FILE (e.g. <run>/rl/bias-verifier/vectors.safetensors)"
            )
        sv = SteeringVectors.load(so.vectors)
        if m.steerer == "file-random":
            from lrs.trainers.analysis import matched_random_vectors

            sv = matched_random_vectors(sv, seed=0)
        return sv.scaled(so.alpha) if so.alpha is not None else sv
    enc_path = Path(so.encoder) if so.encoder else rd.encoder
    if m.steerer == "vector":
        from lrs.traces import TraceSet

        alpha = so.alpha if so.alpha is not None else (tuned or {}).get(method, {}).get("alpha", 1.0)
        ts = TraceSet(rd.traces)
        layer = load_encoder(enc_path).layer if enc_path.exists() else ts.layers[0]
        return SteeringVectors.from_traces(ts, layer, alpha)
    rm_path = Path(so.reward) if so.reward else rd.reward
    for p, what in ((enc_path, "encoder"), (rm_path, "reward model")):
        if not p.exists():
            raise LRSError(
                f"no {what} at {p}: run `lrs collect`, `lrs fit-encoder`, `lrs train-reward` first (or `lrs demo`)"
            )
    enc = load_encoder(enc_path)
    check_model(enc, model)
    rm = load_reward_model(rm_path)
    return LatentRewardSteerer(enc, rm, steer_config(method, so, tuned), log_events=so.log_events)


GRIDS = {
    "tiny": dict(k=[2], alpha=[0.1, 0.5], tau_r=[0.5], tau_c=[0.72], diffmean=[2.0], base=False),
    "small": dict(
        k=[2], alpha=[0.1, 0.3, 1.0], tau_r=[0.5, 0.9], tau_c=[0.72], diffmean=[0.5, 1.0, 4.0], base=True
    ),
    # the reward gate on a calibrated scale: steer the weakest 10 % / 30 % of states (any reward model)
    "quantile": dict(
        k=[2],
        alpha=[0.1, 0.3, 1.0],
        tau_r_quantile=[0.1, 0.3],
        tau_c=[0.72],
        diffmean=[0.5, 1.0, 4.0],
        base=True,
    ),
    # the quick demo: two step sizes at one calibrated gate (the weakest 30 % of states), two diffmean scales
    # (on 60 arith dev problems at 448 tokens, alpha 1.0 and diffmean 4.0 lost 13-18 points to base)
    "quick": dict(
        k=[2], alpha=[0.1, 0.3], tau_r_quantile=[0.3], tau_c=[0.72], diffmean=[0.5, 1.0], base=True
    ),
    "full": dict(
        k=[1, 2, 4],
        alpha=[0.05, 0.1, 0.3, 1.0],
        tau_r=[0.3, 0.5, 0.7, 0.9],
        tau_c=[0.5, 0.72, 0.9],
        diffmean=[0.25, 0.5, 1.0, 2.0, 4.0],
        base=True,
    ),
}


TUNED_METHODS = ("lrs", "lrs-basic", "random", "diffmean")
_SHORT = {
    "k": "k",
    "alpha": "a",
    "tau_r": "r",
    "tau_r_quantile": "q",
    "tau_c": "c",
}  # grid-point names: lrs-k2-a0.1-r0.5-c0.72


def _gate_param(p: str, g: dict) -> str:
    """A grid with ``tau_r_quantile`` tunes the reward gate on the calibrated scale instead of ``tau_r``."""
    return "tau_r_quantile" if p == "tau_r" and "tau_r_quantile" in g else p


def tune(
    model,
    tok,
    dev: list[Problem],
    rd: RunDir,
    grid: str,
    gc: GenConfig,
    so: SteerOverrides,
    methods: tuple[str, ...] = TUNED_METHODS,
    inherit: dict[str, str] | None = None,
) -> dict:
    """Grid over K, alpha, tau_r, tau_c (LRS) and alpha (diffmean) on DEV problems; best = highest dev accuracy.

    Every method in ``methods`` gets its own grid (its ``tuned`` settings in the registry); ``inherit`` maps a
    method that is not tuned to one whose choice it takes (``{"random": "lrs"}``). Ties go to the weakest
    intervention, and ``beats_base_on_dev`` says whether the choice beat base on dev at all. Results are filed
    under the artefacts' key (``<run>/tune/<key>/``); each grid point is reused only when its cache key
    matches, so other encoders or budgets never reuse these results.
    """

    if grid not in GRIDS:
        raise LRSError(f"unknown grid '{grid}': use one of {', '.join(GRIDS)}")
    from lrs.models import check_budget

    g = GRIDS[grid]
    check_budget(model, gc.max_new_tokens)
    key = artefact_key(rd, so)
    for m in [*methods, *(inherit or {})]:
        if get_method(m).steerer in (None, "select"):
            raise LRSError(f"'{m}' has no settings to tune; tune one of {', '.join(TUNED_METHODS)}")
    with rd.lock(f"tune-{key}"):
        return _tune(model, tok, dev, rd, g, gc, so, key, grid, tuple(methods), dict(inherit or {}))


def _tune(
    model,
    tok,
    dev,
    rd: RunDir,
    g: dict,
    gc: GenConfig,
    so: SteerOverrides,
    key: str,
    grid: str,
    methods: tuple[str, ...],
    inherit: dict[str, str],
) -> dict:
    from lrs.evaluate import evaluate

    out = rd.tune_dir(key)
    runs = []

    def run(name: str, steerer, params: dict, method: str) -> None:
        res = evaluate(
            model,
            tok,
            dev,
            method=method,
            steerer=steerer,
            out_dir=out,
            name=name,
            max_new_tokens=gc.max_new_tokens,
            batch_size=gc.batch_size,
            seed=gc.seed,
        )
        s = res["summary"]
        rate = s.get("steering", {}).get("steer_rate", 0.0)
        runs.append(
            dict(
                name=name,
                method=method,
                params=params,
                accuracy=s["accuracy"],
                ci95=s["ci95"],
                steer_rate=rate,
            )
        )
        print(f"  dev {name}: {s['accuracy']:.1%}" + (" (cached)" if res.get("cached") else ""))

    if g["base"]:
        run("base", None, {}, "base")
    plain = SteerOverrides(encoder=so.encoder, reward=so.reward)
    values = {p: g[p] for p in _SHORT if p in g}
    for method in methods:
        m = get_method(method)
        params_tuned = [_gate_param(p, g) for p in m.tuned]
        if m.steerer == "vector":
            dm = build_steerer(method, model, rd, plain)
            for a in g["diffmean"]:
                run(f"{method}-a{a}", dm.scaled(a), dict(alpha=a), method)
            continue
        for combo in itertools.product(*(values[p] for p in params_tuned)):
            params = dict(zip(params_tuned, combo, strict=True))
            st = build_steerer(method, model, rd, SteerOverrides(**{**asdict(plain), **params}))
            run(f"{method}-" + "-".join(f"{_SHORT[k]}{v}" for k, v in params.items()), st, params, method)
    base_acc = next((r["accuracy"] for r in runs if r["method"] == "base"), None)
    best, beats = {}, {}
    for method in methods:
        cands = [r for r in runs if r["method"] == method]
        # ties go to the weakest intervention: fewer steered tokens, then the smaller step
        top = max(cands, key=lambda r: (r["accuracy"], -r["steer_rate"], -r["params"].get("alpha", 0)))
        best[method] = top["params"]
        beats[method] = None if base_acc is None else top["accuracy"] > base_acc
    for method, source in inherit.items():  # e.g. the quick demo: the random control takes LRS's settings
        if source in best and method not in best:
            tuned = [_gate_param(p, g) for p in METHODS[method].tuned]
            best[method] = {k: v for k, v in best[source].items() if k in tuned}
    result = dict(
        split="dev",
        n=len(dev),
        grid=grid,
        artefact_key=key,
        max_new_tokens=gc.max_new_tokens,
        base_accuracy=base_acc,
        beats_base_on_dev=beats,
        inherited=dict(inherit),
        runs=runs,
        best=best,
    )
    atomic_write_json(rd.tune_file(key), result)
    return result


def run_eval(
    model, tok, tc: TaskConfig, gc: GenConfig, ev: EvalConfig, so: SteerOverrides, rd: RunDir
) -> dict:
    """Evaluate ``ev.method`` on ``tc``'s split; returns the result (reused when its cache key matches).

    Under a data-parallel launcher every process runs this and returns the same result; each generates its
    share of the batches (see :func:`lrs.evaluate.evaluate`), and only the first one warns on the terminal.
    """
    from lrs.distributed import share
    from lrs.evaluate import evaluate
    from lrs.models import check_budget
    from lrs.runs import check_dir_target

    m = get_method(ev.method)
    probs = problems(tc)
    out = check_dir_target(Path(ev.out) if ev.out else rd.eval_dir(tc.task, tc.split), "--out")
    check_budget(model, gc.max_new_tokens)
    if m.steerer == "select":
        return _run_best_of_n(model, tok, probs, tc, gc, ev, so, rd, out)
    tuned = None
    if so.tuned and m.steerer and m.steerer not in ("file", "file-random", "adapter"):
        tuned = rd.load_tuned(artefact_key(rd, so))
        if ev.method not in tuned:
            raise LRSError(
                f"--tuned: the tuning result for these artefacts has no choice for '{ev.method}'; run `lrs tune`"
            )
        if rd.tuned_beats_base(artefact_key(rd, so)).get(ev.method) is False and share().main:
            print(
                f"lrs: warning: {ev.method}'s tuned setting did not beat base on dev; evaluating it anyway "
                "(a comparison needs it), but expect no gain",
                file=sys.stderr,
            )
    log = None
    if ev.log_tokens or ev.shadow:
        from dataclasses import replace

        from lrs.evaluate import EvalLog

        if ev.shadow and m.steerer is not None:
            raise LRSError(
                f"--shadow scores an unsteered run; --method {ev.method} logs its own scores with --log-tokens"
            )
        so = replace(so, log_events=True)  # a latent steerer logs its per-token scores and events too
        # the shadow scorer: the artefacts LRS would use (--encoder/--reward), the gate forced off
        shadow = build_steerer("lrs", model, rd, so).shadow() if ev.shadow else None
        log = EvalLog(tokens=True, shadow=shadow)
    steerer = build_steerer(ev.method, model, rd, so, tuned)
    pool = None
    if m.prompt_style == "fewshot":
        pool = problems(tc, split="train", limit=200) if tc.split != "all" else None
        if not pool:
            raise LRSError(
                "few-shot prompting needs the task's train split; this task has none (use --split test)"
            )
    lock = f"eval-{ev.method}-{cache_key({'out': str(out.resolve())})}"
    sh = share()
    if not sh.main:  # process 0 takes the one-process lock, so a one-process run of the same result waits
        lock += f".rank{sh.rank}"
    with rd.lock(lock, f"{out} ({ev.method})"):
        res = evaluate(
            model,
            tok,
            probs,
            method=ev.method,
            steerer=steerer,
            out_dir=out,
            reuse=not ev.force,
            max_new_tokens=gc.max_new_tokens,
            batch_size=gc.batch_size,
            seed=gc.seed,
            shots=ev.shots,
            fewshot_pool=pool,
            extra=dict(task=tc.task, split=tc.split, limit=tc.limit, split_seed=tc.split_seed),
            log=log,
            ranks=sh,
        )
    if sh.main:
        warn_if_steering_skipped(res["summary"])
    return res


def check_best_of_n(ev: EvalConfig, so: SteerOverrides, rd: RunDir) -> tuple[Path, Path]:
    """``--method bon``'s settings and artefact paths, refused with one line before any model is loaded."""
    from lrs.selection import check_settings

    check_settings(ev.n, ev.temperature, ev.select)
    if ev.log_tokens or ev.shadow:
        raise LRSError(
            "--method bon keeps every sample's scores in its records; --log-tokens/--shadow do not apply"
        )
    enc_path = Path(so.encoder) if so.encoder else rd.encoder
    rm_path = Path(so.reward) if so.reward else rd.reward
    for p, what in ((enc_path, "encoder"), (rm_path, "reward model")):
        if not p.exists():
            raise LRSError(f"--method bon needs a{'n' if what == 'encoder' else ''} {what}: none at {p} "
                           "(--encoder/--reward, or run `lrs fit-encoder` and `lrs train-reward` first)")  # fmt: skip
    return enc_path, rm_path


def _run_best_of_n(model, tok, probs, tc: TaskConfig, gc: GenConfig, ev: EvalConfig, so: SteerOverrides, rd: RunDir,
                   out: Path) -> dict:  # fmt: skip
    """``--method bon``: the run's (or the given) encoder and reward model pick one of ``ev.n`` samples."""
    from lrs.encoders import load_encoder
    from lrs.reward import load_reward_model
    from lrs.selection import evaluate_best_of_n
    from lrs.steering import check_model
    from lrs.steering.latent import check_pair

    enc_path, rm_path = check_best_of_n(ev, so, rd)
    enc, rm = load_encoder(enc_path), load_reward_model(rm_path)
    check_pair(enc, rm)
    check_model(enc, model)
    with rd.lock(f"eval-bon-{cache_key({'out': str(out.resolve())})}", f"{out} (bon)"):
        return evaluate_best_of_n(
            model, tok, probs, enc, rm, out, n=ev.n, temperature=ev.temperature, select=ev.select,
            max_new_tokens=gc.max_new_tokens, batch_size=gc.batch_size, seed=gc.seed, reuse=not ev.force,
            extra=dict(task=tc.task, split=tc.split, limit=tc.limit, split_seed=tc.split_seed,
                       encoder=str(enc_path), reward=str(rm_path)),
        )  # fmt: skip


def warn_if_steering_skipped(summary: dict) -> None:
    """Say on the terminal when most steering attempts were skipped (NaN/zero gradients): not a silent 0 %."""
    st = summary.get("steering") or {}
    skipped, steered = st.get("nan_skipped", 0), st.get("steered_tokens", 0)
    if skipped and skipped >= steered:
        print(
            f"lrs: warning: {skipped} steering steps were skipped for non-finite or zero gradients "
            f"({steered} applied): check the encoder and reward model",
            file=sys.stderr,
        )


def train_vectors(model, tok, probs: list[Problem], rd: RunDir, cfg):
    """Train bias-only steering vectors or LoRA by RL (``lrs.trainers``); output under ``<run>/rl/`` by default."""
    from lrs.trainers import train

    out = Path(cfg.out) if cfg.out else rd.root / "rl" / f"{cfg.param}-{cfg.objective}"
    return train(model, tok, probs, cfg, out)


def timed(fn):
    """(result, seconds) of ``fn()``."""
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0

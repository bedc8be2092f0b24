"""Stage 1: generate on a task's train split and keep every generated token's hidden state, sharded and resumable.

A collection directory holds ``manifest.json`` and one ``shard-NNNNN.safetensors`` per generation batch.
A shard is written atomically and only then listed in the manifest (also replaced atomically), so a run
killed at any moment resumes by redoing the unlisted batches; batches are fixed by the settings and
sampling is seeded per batch, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from tqdm.auto import tqdm

from lrs import __version__
from lrs.artifacts import atomic_save_tensors, atomic_write_json
from lrs.backends import (
    Completion,
    GenRequest,
    StepStates,
    TokenGenerator,
    VLLMGenerator,
    request_seed,
    split_at_stop,
    teacher_forced_states,
)
from lrs.distributed import barrier, share
from lrs.errors import LRSError
from lrs.generation import DecodeTracker, Generation, eos_ids, generate, layer_output
from lrs.grading import grade
from lrs.models import decoder_layers, model_dtype, model_fingerprint, model_name, resolve_layer
from lrs.runs import exclusive
from lrs.tasks import Problem, build_prompts

MANIFEST = "manifest.json"


@dataclass
class Trace:
    """One generated trace: per-token hidden states at each collected layer, tokens, confidences, label."""

    id: str
    problem_id: str
    sample: int
    label: int
    truncated: bool
    hidden: dict[int, torch.Tensor]  # layer -> [T, d]
    prompt: dict[int, torch.Tensor]  # layer -> [d] mean prompt state
    tokens: torch.Tensor  # [T]
    conf: torch.Tensor  # [T]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


class TraceSet:
    """A collection directory opened for reading; iterating loads shards one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.exists():
            raise LRSError(
                f"no trace collection at {self.path} (missing {MANIFEST}); run `lrs collect` first"
            )
        try:
            self.manifest = json.loads(mf.read_text())
            self.config: dict = self.manifest["config"]
            self.records: list[dict] = [r for b in self.manifest["batches"] for r in b["traces"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LRSError(
                f"corrupt manifest {mf} ({type(e).__name__}: {e}); collect again into a new --out"
            ) from None
        if not self.records:
            raise LRSError(f"trace collection {self.path} holds no traces yet")

    @property
    def layers(self) -> list[int]:
        return list(self.config["layers"])

    @property
    def labels(self) -> list[int]:
        return [r["label"] for r in self.records]

    @property
    def complete(self) -> bool:
        return len(self.manifest["batches"]) == self.manifest["n_batches"]

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        """A short hash of what was collected (ids, labels, shard contents) for artefact provenance."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for b in self.manifest["batches"]:
            h.update(b["sha256"].encode())
        return h.hexdigest()[:16]

    def __iter__(self) -> Iterator[Trace]:
        for b in self.manifest["batches"]:
            shard = self.path / b["shard"]
            try:
                raw = shard.read_bytes()
                if hashlib.sha256(raw).hexdigest() != b["sha256"]:
                    raise LRSError(
                        f"shard {shard} does not match its sha256 in the manifest: changed or corrupted"
                    )
                data = safetensors_load(raw)
            except (SafetensorError, OSError) as e:
                raise LRSError(f"cannot read shard {shard}: {e}") from None
            for r in b["traces"]:
                i = r["index"]
                yield Trace(
                    id=r["id"],
                    problem_id=r["problem_id"],
                    sample=r["sample"],
                    label=r["label"],
                    truncated=r["truncated"],
                    hidden={L: data[f"h.{L}.{i}"] for L in self.layers},
                    prompt={L: data[f"p.{L}.{i}"] for L in self.layers},
                    tokens=data[f"tok.{i}"],
                    conf=data[f"conf.{i}"],
                )

    def states(self, layer: int, max_states: int | None = None, seed: int = 0) -> torch.Tensor:
        """All generated-token states at ``layer`` stacked to ``[N, d]`` (optionally a seeded subsample)."""
        if layer not in self.layers:
            raise LRSError(f"layer {layer} was not collected in {self.path}; collected layers: {self.layers}")
        x = torch.cat([t.hidden[layer] for t in self])
        if max_states is not None and x.shape[0] > max_states:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:max_states]]
        return x


class _Recorder:
    """Forward hooks on the collected layers: keep the last position's state each call, and the prompt mean."""

    def __init__(self, model, layers: Sequence[int], tracker: DecodeTracker):
        self.model, self.layers, self.tracker = model, list(layers), tracker
        self.steps: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
        self.prompt: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int):
        def fn(module, args, output):
            h = layer_output(output)
            self.steps[layer].append(h[:, -1].detach().cpu())
            if self.tracker.step == 0:
                m = self.tracker.prompt_mask[:, -h.shape[1] :].unsqueeze(-1).to(torch.float32)
                self.prompt[layer] = (h.detach().float().cpu() * m).sum(1) / m.sum(1).clamp_min(1)

        return fn

    @contextlib.contextmanager
    def attach(self):
        blocks = decoder_layers(self.model)
        handles = [blocks[L].register_forward_hook(self._hook(L)) for L in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _recorded(model, tokenizer, prompts: list[str], layers: list[int], *, max_new_tokens: int,
              temperature: float, seed: int) -> tuple[list[Generation], list[StepStates]]:  # fmt: skip
    """The ``transformers`` backend: one ``generate`` batch with hooks recording the states as it decodes."""
    rec: dict = {}

    def ctx(_b, _idx, tracker):
        rec["r"] = _Recorder(model, layers, tracker)
        return rec["r"].attach()

    gens = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=len(prompts),
        temperature=temperature,
        seed=seed,
        context=ctx,
        progress=False,
    )
    r: _Recorder = rec["r"]
    states = [
        StepStates(
            hidden={L: torch.stack([st[row] for st in r.steps[L][: g.n_tokens]]) for L in layers},
            prompt={L: r.prompt[L][row] for L in layers},
            conf=torch.tensor(g.conf, dtype=torch.float32),
        )
        for row, g in enumerate(gens)
    ]
    return gens, states


def _teacher_forced(model, tokenizer, req: GenRequest, comps: Sequence[Completion | Sequence[int]],
                    layers: list[int]) -> tuple[list[Generation], list[StepStates]]:  # fmt: skip
    """A generator's completions for one batch → generations (text, stop, conf), states by teacher forcing.

    ``conf`` is the generator's where it gave one, else the forward's; the forward computes logits only if
    some completion of the batch has no ``conf``.
    """
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    comps = [c if isinstance(c, Completion) else Completion(list(c)) for c in comps]
    cut = [split_at_stop(c.ids, stop) for c in comps]
    confs = [
        None if c.conf is None else c.conf[: len(ids)].clone() for c, (ids, _) in zip(comps, cut, strict=True)
    ]
    states = teacher_forced_states(model, req.prompt_ids, [c for c, _ in cut], layers, pad_id=pad_id,
                                   need_conf=any(c is None for c in confs))  # fmt: skip
    for st, conf in zip(states, confs, strict=True):
        if conf is not None:
            st.conf = conf
    gens = [
        Generation(tokenizer.decode(c, skip_special_tokens=True), c, finished, st.conf.tolist())
        for (c, finished), st in zip(cut, states, strict=True)
    ]
    return gens, states


def collect_traces(
    model,
    tokenizer,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    layers: Sequence[int] = (12,),
    samples_per_problem: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    seed: int = 0,
    prompt_style: str = "base",
    meta: dict | None = None,
    progress: bool = True,
    rollouts: int = 0,
    rollout_every: int = 64,
    rollout_temperature: float = 0.7,
    backend: str | TokenGenerator = "transformers",
) -> TraceSet:
    """Generate traces for ``problems`` and store hidden states at ``layers``; resumes an unfinished run.

    Rerunning with the same settings continues where a killed run stopped; different settings in an
    existing directory are refused (use a new directory). With ``rollouts`` M > 0, every ``rollout_every``
    tokens of each trace get a Monte-Carlo value label (fraction of M sampled continuations that end correct,
    :func:`lrs.rollouts.rollout_values`), stored in the trace's record as ``values`` with the batch's shard.

    ``backend`` says only how token ids are produced and how states are obtained; batching, grading,
    rollouts, shards, manifest and resume are the same code for all. ``"transformers"`` records the states
    with hooks while ``generate`` decodes. ``"vllm"`` generates with vLLM (:class:`lrs.backends.VLLMGenerator`,
    several batches per engine call; confidences from its logprobs) and recovers the states with one
    teacher-forced forward per batch that stops after the deepest layer
    (:func:`lrs.backends.teacher_forced_states`); so does any :class:`lrs.backends.TokenGenerator` object,
    whose forward also computes the confidences when it gives none. A backend other than ``"transformers"``
    is part of the collection's settings (its ``name``).
    """
    if not problems:
        raise LRSError("no problems to collect traces on (empty split or --limit 0)")
    if samples_per_problem > 1 and temperature <= 0:
        raise LRSError(
            "--samples-per-problem > 1 needs --temperature > 0 (greedy samples would be identical)"
        )
    if isinstance(backend, str) and backend not in ("transformers", "vllm"):
        raise LRSError(f"unknown collection backend {backend!r}: transformers or vllm")
    # built before any directory work, so a missing vLLM fails first, with the install line
    gen: TokenGenerator | None = (
        VLLMGenerator(model, tokenizer, seed=seed) if backend == "vllm" else None if backend == "transformers"
        else backend
    )  # fmt: skip
    layers = sorted({resolve_layer(model, L) for L in layers})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sh = share()
    lock = out / (".lock" if sh.world == 1 else f".lock.rank{sh.rank}")
    with exclusive(lock, f"trace directory {out}" + (f" (process {sh.rank})" if sh.world > 1 else "")):
        jobs = [(p, s) for p in problems for s in range(samples_per_problem)]
        prompts = build_prompts(tokenizer, [p for p, _ in jobs], style=prompt_style)
        order = sorted(range(len(jobs)), key=lambda i: (len(prompts[i]), i))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        config = dict(
            model=model_name(model),
            model_fingerprint=model_fingerprint(model),
            n_layers=len(decoder_layers(model)),
            dtype=model_dtype(model),
            layers=layers,
            problems=[p.id for p in problems],
            samples_per_problem=samples_per_problem,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            prompt_style=prompt_style,
            **(meta or {}),
        )
        if rollouts:  # only then: older collections keep resuming under their old config
            config.update(
                rollouts=rollouts, rollout_every=rollout_every, rollout_temperature=rollout_temperature
            )
        if gen is not None:  # likewise: transformers collections keep their old settings
            config.update(backend=gen.name)
        manifest = {"config": config, "n_batches": len(batches), "batches": [], "lrs_version": __version__}
        manifest["batches"] = list(_read_manifests(out, config).values())
        mf = out / (MANIFEST if sh.world == 1 else f"manifest.rank{sh.rank}.json")
        done = {b["batch"] for b in manifest["batches"]}
        mine = [b for b in range(len(batches)) if sh.owns(b)]
        todo = [b for b in mine if b not in done]
        bar = tqdm(total=sum(len(batches[b]) for b in mine), desc="collect", unit="trace", disable=not progress,
                   dynamic_ncols=True)  # fmt: skip
        bar.update(sum(len(batches[b]) for b in mine if b in done))

        def request(b: int) -> GenRequest:
            idx = batches[b]
            texts = [prompts[i] for i in idx]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return GenRequest(texts, [list(x) for x in ids], seed * 1_000_003 + b,
                              [request_seed(seed, i) for i in idx])  # fmt: skip

        ahead: dict[int, tuple[GenRequest, list[Completion]]] = {}
        for n, b in enumerate(todo):
            idx = batches[b]
            if gen is None:
                gens, states = _recorded(
                    model, tokenizer, [prompts[i] for i in idx], layers, max_new_tokens=max_new_tokens,
                    temperature=temperature, seed=seed * 1_000_003 + b,
                )  # fmt: skip
            else:
                if b not in ahead:  # the next window of this process's unfinished batches, one engine call
                    reqs = [request(w) for w in todo[n : n + gen.window]]
                    ids = gen.generate_ids(reqs, max_new_tokens=max_new_tokens, temperature=temperature)
                    ahead.update(zip(todo[n : n + gen.window], zip(reqs, ids, strict=True), strict=True))
                req, ids = ahead.pop(b)
                gens, states = _teacher_forced(model, tokenizer, req, ids, layers)
            grades = grade([g.text for g in gens], [jobs[i][0].answer for i in idx])
            values = None
            if rollouts:
                from lrs.rollouts import rollout_values

                values = rollout_values(
                    model, tokenizer, [prompts[i] for i in idx], [g.token_ids for g in gens],
                    [jobs[i][0].answer for i in idx], m=rollouts, every=rollout_every,
                    max_new_tokens=max_new_tokens, temperature=rollout_temperature, batch_size=batch_size,
                    seed=seed * 1_000_003 + b,
                )  # fmt: skip
            tensors, records = {}, []
            for row, (i, g, gr, st) in enumerate(zip(idx, gens, grades, states, strict=True)):
                p, s = jobs[i]
                T = g.n_tokens
                for L in layers:
                    tensors[f"h.{L}.{i}"] = st.hidden[L]
                    tensors[f"p.{L}.{i}"] = st.prompt[L]
                tensors[f"tok.{i}"] = torch.tensor(g.token_ids, dtype=torch.int32)
                tensors[f"conf.{i}"] = st.conf
                records.append(
                    dict(
                        index=i,
                        id=f"{p.id}#{s}",
                        problem_id=p.id,
                        sample=s,
                        label=int(gr.correct),
                        length=T,
                        truncated=not g.finished,
                        answer=gr.pred,
                        gold=p.answer,
                        text=g.text,
                    )
                )
                if values is not None:
                    records[-1]["values"] = values[row]
            shard = f"shard-{b:05d}.safetensors"
            atomic_save_tensors(out / shard, tensors)
            digest = hashlib.sha256((out / shard).read_bytes()).hexdigest()
            manifest["batches"].append(dict(batch=b, shard=shard, sha256=digest, traces=records))
            manifest["batches"].sort(key=lambda x: x["batch"])
            atomic_write_json(mf, manifest)
            bar.update(len(idx))
            n_done = sum(len(x["traces"]) for x in manifest["batches"])
            acc = sum(t["label"] for x in manifest["batches"] for t in x["traces"]) / max(n_done, 1)
            bar.set_postfix(acc=f"{acc:.2f}")
        bar.close()
    barrier(sh)
    if sh.main:  # one manifest.json, as one process writes it; the per-process manifests go
        with exclusive(out / ".lock", f"trace directory {out}"):
            _merge_manifests(out, manifest | {"batches": []})
    barrier(sh)
    return TraceSet(out)


def _read_manifests(out: Path, config: dict) -> dict[int, dict]:
    """Finished batches recorded in ``manifest.json`` and in any per-process manifest, by batch number.

    Every manifest found must hold the same settings (else one line: use a new directory)."""
    found: dict[int, dict] = {}
    for f in [out / MANIFEST, *sorted(out.glob("manifest.rank*.json"))]:
        if not f.exists():
            continue
        old = json.loads(f.read_text())
        if old["config"] != config:
            diff = sorted(
                k for k in set(config) | set(old["config"]) if config.get(k) != old["config"].get(k)
            )
            raise LRSError(
                f"{out} holds a collection with different settings ({', '.join(diff)}); use a new --out"
            )
        found.update({b["batch"]: b for b in old["batches"]})
    return dict(sorted(found.items()))


def _merge_manifests(out: Path, empty: dict) -> None:
    """Write ``manifest.json`` holding every finished batch (sorted), then remove the per-process manifests."""
    ranks = sorted(out.glob("manifest.rank*.json"))
    if not ranks:
        return
    merged = empty | {"batches": list(_read_manifests(out, empty["config"]).values())}
    atomic_write_json(out / MANIFEST, merged)
    for f in ranks:
        f.unlink()

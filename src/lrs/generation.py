"""Batched generation with the KV cache, plus a per-step tracker that hooks can read.

Step alignment (docs/architecture.md): forward call ``s`` of ``generate`` predicts generated token ``s``;
call 0 is the prefill. The :class:`DecodeTracker` knows, at any point inside call ``s``, the step index,
which rows are still generating, and each row's top-token probability from call ``s - 1``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lrs.errors import LRSError


@dataclass
class Generation:
    """One generated completion: text, token ids, and whether it stopped by itself (not truncated)."""

    text: str
    token_ids: list[int]
    finished: bool
    conf: list[float] = field(default_factory=list)
    #: second-largest token probability per generated token (only when ``generate(record_top2=True)``)
    top2: list[float] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def eos_ids(model, tokenizer) -> list[int]:
    """All token ids that end a completion (generation config + tokenizer), deduplicated."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class DecodeTracker:
    """Follows ``generate`` calls: step index, live rows, previous-step confidence (per row, on the model's device).

    It registers a forward pre-hook on the model (to see ``input_ids``, the KV cache and the attention mask)
    and a forward hook on the output embedding (to read the top-token probability). Layer hooks registered
    *after* entering the tracker see its state for the current call.

    Prefill and decode calls are told apart by how many positions the model has already seen, read from the
    KV cache object whatever keyword it is passed under (``past_key_values`` up to transformers 5.23,
    ``cache`` from 5.24), else from the attention mask (which covers past and new positions). Where neither
    is there, it raises instead of guessing; :meth:`verify` checks after each ``generate`` that one decode
    step was seen per generated token, so a release that changes the calling convention fails loudly.
    """

    def __init__(self, model, stop_ids: Sequence[int], record_conf: bool = True, record_top2: bool = False):
        self.model = model
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long)
        self.record_conf = record_conf
        #: also keep the second-largest probability per step (token logging); chosen once in :meth:`attach`
        self.record_top2 = record_top2
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.live: torch.Tensor | None = None  # [B] bool, rows still generating at this step
        self.conf_prev: torch.Tensor | None = None  # [B] float, top prob of the previous step
        self.conf_now: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None  # [B, P] attention mask of the prompt
        self.prompt_len = 0
        self.confs: list[torch.Tensor] = []
        self.top2s: list[torch.Tensor] = []  # [B] per step, only with ``record_top2``

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise LRSError("lrs hooks need generate() to pass input_ids (inputs_embeds is not supported)")
        if kwargs.get("use_cache") is False:
            raise LRSError("lrs hooks need the KV cache: call generate() with use_cache=True")
        past = past_length(ids, kwargs)
        if past == 0:
            self.reset()
            self.step = 0
            self.prompt_len = ids.shape[1]
            self.live = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
            mask = kwargs.get("attention_mask")
            self.prompt_mask = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        else:
            if self.live is None:
                raise LRSError(
                    "lrs saw a decode step before any prefill: enter the tracker before generate()"
                )
            if ids.shape[0] != self.live.shape[0]:
                raise LRSError(
                    f"the batch changed from {self.live.shape[0]} to {ids.shape[0]} rows during generate(): "
                    "beam search and other row-expanding modes are not supported"
                )
            self.step += 1
            if self.stop_ids.device != ids.device:
                self.stop_ids = self.stop_ids.to(ids.device)
            self.live = self.live & ~torch.isin(ids[:, -1], self.stop_ids)
        self.conf_prev = self.conf_now

    def _post_head(self, module, args, output):
        if not self.record_conf:
            return
        logits = output[0] if isinstance(output, tuple) else output
        conf = torch.softmax(logits[:, -1].float(), dim=-1).amax(dim=-1)
        self.conf_now = conf
        self.confs.append(conf)

    def _post_head_top2(self, module, args, output):
        """:meth:`_post_head` that also keeps the runner-up probability (the largest value is the same float)."""
        logits = output[0] if isinstance(output, tuple) else output
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        self.conf_now = top[:, 0]
        self.confs.append(top[:, 0])
        self.top2s.append(top[:, 1] if top.shape[-1] > 1 else torch.zeros_like(top[:, 0]))

    def verify(self, n_new: int) -> None:
        """Raise if the last ``generate`` produced ``n_new`` tokens but not ``n_new - 1`` decode steps were seen."""
        if n_new > 1 and self.step != n_new - 1:
            raise LRSError(
                f"lrs tracked {max(self.step, 0)} decode steps for {n_new} generated tokens: this transformers "
                f"release ({_tf_version()}) calls the model in a way lrs does not recognise; install the "
                "versions in constraints.txt (see `lrs doctor`)"
            )

    @contextlib.contextmanager
    def attach(self) -> Iterator[DecodeTracker]:
        """Register the hooks for the duration of the block."""
        head = self.model.get_output_embeddings()
        handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if head is not None:
            # picked here, not per step: without token logging the decode loop runs exactly the old code
            post = self._post_head_top2 if self.record_top2 else self._post_head
            handles.append(head.register_forward_hook(post))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _tf_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def _cache_len(past) -> int | None:
    """Positions held by a KV cache object (any transformers Cache, or a legacy tuple of tensors)."""
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)):
        try:
            return int(past[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError):
            return None
    return None


def past_length(ids: torch.Tensor, kwargs: dict) -> int:
    """How many positions the model has seen before this forward call (0 = prefill).

    Looks for a KV cache among *all* keyword values (no keyword name is assumed), then at the attention mask;
    raises a one-line :class:`LRSError` when neither tells.
    """
    for value in kwargs.values():
        if value is not None and hasattr(value, "get_seq_length"):
            return _cache_len(value) or 0
    legacy = kwargs.get("past_key_values")
    if legacy is not None:
        n = _cache_len(legacy)
        if n is not None:
            return n
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= ids.shape[1]:
        return int(mask.shape[1] - ids.shape[1])
    raise LRSError(
        f"cannot tell prefill from decode: the model's forward got neither a KV cache nor a 2-d attention "
        f"mask ({_tf_version()}); install the versions in constraints.txt"
    )


def check_generate_kwargs(model, kwargs: dict) -> None:
    """Refuse ``generate`` modes under which per-row steering or recording would silently be wrong."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
    if beams > 1:
        raise LRSError(f"beam search (num_beams={beams}) is not supported under lrs hooks: use num_beams=1")
    if kwargs.get("use_cache", getattr(gc, "use_cache", True)) is False:
        raise LRSError("lrs hooks need the KV cache: call generate() with use_cache=True")
    if kwargs.get("inputs_embeds") is not None:
        raise LRSError("lrs hooks need input_ids: generate() with inputs_embeds is not supported")
    for key in ("stop_strings", "stopping_criteria"):
        if kwargs.get(key):
            raise LRSError(
                f"{key} is not supported under lrs hooks (rows it ends would still count as live): "
                "use eos_token_id, or lrs.generation.generate"
            )
    ret = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
    if ret > 1:
        raise LRSError(
            f"num_return_sequences={ret} is not supported under lrs hooks: repeat the prompt in the batch instead"
        )


def call_stop_ids(model, kwargs: dict) -> list[int]:
    """The token ids that end a row in this ``generate`` call (its ``eos_token_id``, else the config's)."""
    ids = kwargs.get("eos_token_id")
    if ids is None:
        gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        ids = getattr(gc, "eos_token_id", None)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids or [])


def new_token_count(output, input_ids: torch.Tensor) -> int:
    """Generated positions in a ``generate`` output (a tensor or a ModelOutput with ``sequences``)."""
    seq = getattr(output, "sequences", output)
    return int(seq.shape[1]) - int(input_ids.shape[1])


def layer_output(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor in transformers 5, a tuple in 4.x)."""
    return output[0] if isinstance(output, tuple) else output


def replace_layer_output(output, hidden: torch.Tensor):
    """Return the layer output with its hidden states replaced, keeping the same structure."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _split_completion(ids: list[int], stop: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[: i + 1], True
    while pad_id is not None and ids and ids[-1] == pad_id and pad_id not in stop:
        ids = ids[:-1]
    return ids, False


def batches_of(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """The prompt indices of each batch :func:`generate` forms: all prompts sorted by length (ties in input
    order), cut into runs of ``batch_size``. Batch ``b`` of this list is batch ``b`` of ``generate`` (its seed,
    its ``context`` index), so a caller can tell which prompts a batch holds without generating, e.g. to give
    a data-parallel process only its own batches."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


BatchHook = Callable[[int, list[int], "DecodeTracker"], contextlib.AbstractContextManager]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    context: BatchHook | None = None,
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
    skip: Collection[int] | None = None,
    record_top2: bool = False,
) -> list[Generation]:
    """Generate a completion for every prompt (greedy unless ``temperature > 0``), batched, KV cache on.

    Prompts are grouped by length to limit padding (:func:`batches_of`); results come back in the input
    order. ``context`` is called as ``context(batch_index, prompt_indices, tracker)`` and entered around each
    batch's ``generate`` (this is how traces are recorded and steering is applied). Sampling is seeded per
    batch, so a batch's output does not depend on which batches ran before it.

    Resuming: ``on_batch(prompt_indices, generations)`` is called after each generated batch (after
    ``context`` has exited), so a caller can store finished work. ``skip`` holds prompt indices already
    done: batches are still formed from *all* prompts (composition and seeds are those of a full run), a
    batch whose indices are all in ``skip`` is not generated (nor passed to ``context`` or ``on_batch``), and
    a batch only partly in ``skip`` is generated whole. Entries of skipped batches are ``None`` in the
    returned list (never the case without ``skip``); the caller merges them with what it stored.

    ``record_top2`` also fills :attr:`Generation.top2` (the runner-up token probability per generated token,
    for token logging); it changes nothing else, and without it the decode loop is the same code as before.
    """
    if not prompts:
        raise LRSError("nothing to generate: the prompt list is empty")
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    batches = batches_of(prompts, batch_size)
    results: list[Generation | None] = [None] * len(prompts)
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        pad_token_id=pad_id,
        eos_token_id=stop,
        use_cache=True,
    )
    # sampling is plain whatever the model's generation_config holds (RL needs on-policy log-probs)
    if temperature > 0:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    tracker = DecodeTracker(model, stop, record_top2=record_top2)
    done = set(skip or ())
    todo = [(b, idx) for b, idx in enumerate(batches) if not all(i in done for i in idx)]
    n_skipped = len(prompts) - sum(len(idx) for _, idx in todo)
    bar = tqdm(
        total=len(prompts),
        initial=n_skipped,
        desc=desc,
        unit="prompt",
        disable=not progress,
        dynamic_ncols=True,
    )
    n_tok, t0 = 0, time.perf_counter()
    for b, idx in todo:
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        )
        # only what every causal LM accepts: some tokenizers add token_type_ids, which generate() refuses
        enc = {k: enc[k].to(model.device) for k in ("input_ids", "attention_mask")}
        torch.manual_seed(seed * 100003 + b)
        with torch.no_grad(), tracker.attach():
            ctx = context(b, idx, tracker) if context is not None else contextlib.nullcontext()
            with ctx:
                out = model.generate(**enc, **gen_kwargs)
        tracker.verify(new_token_count(out, enc["input_ids"]))
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        confs = torch.stack(tracker.confs, dim=1).cpu() if tracker.confs else None
        top2s = torch.stack(tracker.top2s, dim=1).cpu() if tracker.top2s else None
        for row, i in enumerate(idx):
            ids, finished = _split_completion(new[row], set(stop), pad_id)
            conf = confs[row, : len(ids)].tolist() if confs is not None else []
            top2 = top2s[row, : len(ids)].tolist() if top2s is not None else []
            results[i] = Generation(
                tokenizer.decode(ids, skip_special_tokens=True), ids, finished, conf, top2
            )
            n_tok += len(ids)
        if on_batch is not None:
            on_batch(list(idx), [results[i] for i in idx])  # type: ignore[misc]
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.1f}")
    bar.close()
    return results  # type: ignore[return-value]

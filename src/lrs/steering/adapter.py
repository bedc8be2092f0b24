"""A trained LoRA adapter (PEFT folder, e.g. from ``lrs train-vectors --param lora``) as a steerer.

It lets ``lrs eval --method lora --adapter DIR`` evaluate an RL-trained adapter in the same harness as every
steering method (same prompts, splits, CIs, paired tests, cache keys). The adapter is injected into the
model's own modules for the duration of each ``generate`` batch and removed afterwards, so the model is
unchanged outside :meth:`~lrs.steering.base.Steerer.apply` blocks, like every other steerer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from lrs.errors import LRSError
from lrs.generation import DecodeTracker
from lrs.steering.base import Steerer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class LoraAdapter(Steerer):
    """Apply a PEFT LoRA adapter folder to every token of every ``generate`` call made under ``apply()``."""

    needs_confidence = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        missing = [f for f in ADAPTER_FILES if not (self.path / f).is_file()]
        if missing:
            raise LRSError(
                f"--adapter {self.path}: not a PEFT adapter folder (missing {', '.join(missing)}); "
                "pass the adapter/ folder lrs train-vectors --param lora wrote"
            )
        try:
            self.config = json.loads((self.path / "adapter_config.json").read_text())
        except json.JSONDecodeError as e:
            raise LRSError(f"--adapter {self.path}: adapter_config.json is not JSON ({e})") from None
        if str(self.config.get("peft_type", "")).upper() != "LORA":
            raise LRSError(f"--adapter {self.path}: peft_type is {self.config.get('peft_type')!r}, not LORA")
        h = hashlib.sha256()
        for f in ADAPTER_FILES:
            h.update((self.path / f).read_bytes())
        self.hash = h.hexdigest()

    def fingerprint(self) -> dict:
        return dict(kind="lora", adapter=self.hash, r=self.config.get("r"))

    def context(self, batch: int | None, indices: list[int] | None, tracker: DecodeTracker):
        try:
            from peft import PeftModel
        except ImportError:
            raise LRSError("--method lora needs PEFT: pip install peft") from None
        model = tracker.model
        if any("lora_" in n for n, _ in model.named_parameters()):
            raise LRSError("the model already carries LoRA adapters: load a fresh model to apply this one")

        @contextlib.contextmanager
        def ctx():
            try:
                peft_model = PeftModel.from_pretrained(model, str(self.path), is_trainable=False)
            except (ValueError, KeyError, RuntimeError) as e:
                raise LRSError(
                    f"--adapter {self.path} does not fit this model: {str(e).splitlines()[0]}"
                ) from None
            try:
                yield
            finally:
                peft_model.unload()  # put the original modules back: the model is unchanged afterwards

        return ctx()

    def stats(self) -> dict:
        return dict(adapter=str(self.path), adapter_hash=self.hash[:12])

"""What is trained on a frozen model: per-layer bias vectors (forward hooks) or LoRA adapters (PEFT).

Both give the loop the same small interface: ``named_parameters()`` (what AdamW updates and checkpoints
hold), ``reference()`` (a context in which the trained parameters are switched off, so the frozen model is its
own KL reference: no second copy), ``layer_norms()`` and ``close()``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from lrs.errors import LRSError
from lrs.generation import layer_output, replace_layer_output
from lrs.models import decoder_layers, hidden_size, resolve_layer


def chosen_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    """Sorted 0-based layer indices (negative ones count from the end); ``None`` means every layer."""
    if layers is None:
        return list(range(len(decoder_layers(model))))
    return sorted({resolve_layer(model, int(L)) for L in layers})


class BiasVectors(nn.Module):
    """One fp32 vector per chosen decoder layer, added to that layer's output at EVERY position.

    Prompt positions are included: this is what a bias on the MLP's ``down_proj`` does (its output goes
    straight into the residual sum), which is where seed 004 puts it. The vectors stay fp32 on a bf16 model
    (the add is done in fp32, then rounded to the model's dtype) so that small lr x grad updates are not lost
    to bf16 resolution. Zero init: before the first update the model is exactly the base model.
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None):
        super().__init__()
        blocks = decoder_layers(model)
        self.layers = chosen_layers(model, layers)
        device = next(model.parameters()).device
        self.vectors = nn.Parameter(torch.zeros(len(self.layers), hidden_size(model), device=device))
        self.enabled = True
        self._handles = [blocks[L].register_forward_hook(self._hook(i)) for i, L in enumerate(self.layers)]

    @classmethod
    def from_vectors(
        cls, model: nn.Module, vectors: dict[int, torch.Tensor], alpha: float = 1.0
    ) -> BiasVectors:
        """Fixed vectors (e.g. a loaded artefact's ``.vectors``) applied exactly as in training: every position.

        For evaluating trained vectors until :class:`~lrs.steering.vectors.SteeringVectors` can apply at all
        positions; call :meth:`close` (or use ``contextlib.closing``) to remove them.
        """
        bias = cls(model, sorted(vectors))
        if len(bias.layers) != len(vectors):
            raise LRSError("two vectors resolve to the same decoder layer")
        with torch.no_grad():
            for i, L in enumerate(sorted(vectors)):
                bias.vectors[i].copy_(alpha * vectors[L].float())
        bias.vectors.requires_grad_(False)
        return bias

    def _hook(self, i: int):
        def hook(module, args, output):
            if not self.enabled:
                return None
            h = layer_output(output)
            return replace_layer_output(output, (h.float() + self.vectors[i]).to(h.dtype))

        return hook

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen model: hooks pass the output through unchanged."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def as_dict(self) -> dict[int, torch.Tensor]:
        """``{layer: vector}`` (fp32, CPU copies), the input of :class:`~lrs.steering.vectors.SteeringVectors`."""
        return {L: self.vectors[i].detach().float().cpu().clone() for i, L in enumerate(self.layers)}

    def layer_norms(self) -> dict[int, float]:
        return {L: float(self.vectors[i].detach().norm()) for i, L in enumerate(self.layers)}

    def close(self) -> None:
        """Remove the hooks (the model is the base model again)."""
        for h in self._handles:
            h.remove()
        self._handles = []


class LoraAdapters:
    """PEFT LoRA (r, alpha = r, dropout 0) on every linear layer of the chosen decoder blocks.

    The adapters are injected into ``model`` in place (``self.peft.base_model.model is model``), so the loop
    keeps calling the plain model; the reference is PEFT's ``disable_adapter()``. The adapters stay in the
    model after training (that is the trained model); PEFT keeps them fp32 on a bf16 model.
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None, rank: int = 8):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise LRSError("--param lora needs PEFT: pip install peft") from None
        if any("lora_" in n for n, _ in model.named_parameters()):
            raise LRSError("the model already carries LoRA adapters: load a fresh model to train new ones")
        self.layers = chosen_layers(model, layers)
        block = decoder_layers(model)[0]
        targets = sorted({n.split(".")[-1] for n, m in block.named_modules() if isinstance(m, nn.Linear)})
        if not targets:
            raise LRSError("--param lora found no linear layers in the decoder blocks")
        config = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, layers_to_transform=self.layers
        )
        self.peft = get_peft_model(model, config)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.peft.named_parameters() if p.requires_grad]

    def reference(self):
        return self.peft.disable_adapter()

    def layer_norms(self) -> dict[int, float]:
        """Norm of all adapter weights of each block (A and B together)."""
        sq: dict[int, float] = {}
        for n, p in self.named_parameters():
            m = re.search(r"\.layers\.(\d+)\.", n)
            if m:
                L = int(m.group(1))
                sq[L] = sq.get(L, 0.0) + float(p.detach().float().pow(2).sum())
        return {L: v**0.5 for L, v in sorted(sq.items())}

    def save(self, path) -> None:
        self.peft.save_pretrained(str(path))

    def close(self) -> None:
        """Nothing to undo: the adapters are the result (``result.model``)."""


def make_params(model: nn.Module, param: str, layers: list[int] | None, rank: int = 8):
    """Freeze ``model`` and attach the trained parameterisation (``bias`` or ``lora``)."""
    model.requires_grad_(False)
    if param == "bias":
        return BiasVectors(model, layers)
    if param == "lora":
        return LoraAdapters(model, layers, rank)
    raise LRSError(f"unknown parameterisation '{param}': use bias or lora")

"""Fixed steering vectors: one d-dimensional vector per decoder layer, added at every generated token.

:class:`SteeringVectors` is both the artefact (safetensors + sidecar through :mod:`lrs.artifacts`) and the
steerer (``with vectors.apply(model): model.generate(...)``). Difference-of-means vectors (the RepE / CAA /
SEAL family) are built from collected traces by :meth:`SteeringVectors.from_traces`; vectors trained by RL
(bias-only adaptation) are the same artefact with another ``source``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrs.artifacts import load_artifact, save_artifact, tensor_hash
from lrs.errors import LRSError
from lrs.generation import DecodeTracker, layer_output, replace_layer_output
from lrs.models import decoder_layers, hidden_size
from lrs.steering.base import Steerer

FORMAT = "lrs.steering-vectors/1"


class SteeringVectors(Steerer):
    """``alpha * vectors[L]`` added to the output of block ``L`` at each generated token.

    ``positions="all"`` also adds it at every prompt position, as a bias on the MLP's ``down_proj`` does: the
    setting RL-trained bias vectors were trained with (it is read from their provenance).
    """

    needs_confidence = False  # no gate: skip the per-step softmax over the vocabulary

    def __init__(
        self,
        vectors: dict[int, torch.Tensor],
        alpha: float = 1.0,
        *,
        source: str = "diffmean",
        provenance: dict | None = None,
        positions: str | None = None,
    ):
        super().__init__()
        prov = provenance or {}
        self.positions = positions or prov.get("positions") or "generated"
        if self.positions not in ("generated", "all"):
            raise LRSError(f"steering vector positions must be 'generated' or 'all', got {self.positions!r}")
        if not vectors:
            raise LRSError("steering vectors need at least one layer")
        if alpha != alpha or alpha in (float("inf"), float("-inf")):
            raise LRSError(f"steering scale alpha must be finite, got {alpha}")
        self.vectors = {int(L): v.detach().float() for L, v in vectors.items()}
        self.alpha, self.source, self.provenance = float(alpha), source, provenance or {}

    @property
    def layer(self) -> int:
        """The first steered layer (diffmean steers one)."""
        return min(self.vectors)

    @property
    def vector(self) -> torch.Tensor:
        return self.vectors[self.layer]

    def scaled(self, alpha: float) -> SteeringVectors:
        """The same vectors with another scale (for sweeps: the 'fractional reasoning' knob)."""
        return SteeringVectors(
            dict(self.vectors),
            alpha,
            source=self.source,
            provenance=self.provenance,
            positions=self.positions,
        )

    @classmethod
    def from_traces(cls, traces, layer: int, alpha: float = 1.0) -> SteeringVectors:
        """v = mean state over correct-trace tokens minus mean over wrong-trace tokens, at ``layer``."""
        sums: dict[int, torch.Tensor | None] = {0: None, 1: None}
        counts = {0: 0, 1: 0}
        for t in traces:
            x = t.hidden[layer].float().sum(0)
            sums[t.label] = x if sums[t.label] is None else sums[t.label] + x
            counts[t.label] += t.length
        if not counts[0] or not counts[1]:
            raise LRSError(
                f"diffmean needs correct and wrong traces: found {counts[1]} and {counts[0]} tokens"
            )
        v = sums[1] / counts[1] - sums[0] / counts[0]
        prov = dict(layer=layer, traces=str(getattr(traces, "path", "")))
        if hasattr(traces, "fingerprint"):
            prov.update(
                data_fingerprint=traces.fingerprint(),
                model=traces.config.get("model"),
                model_fingerprint=traces.config.get("model_fingerprint"),
            )
        return SteeringVectors({layer: v}, alpha, source="diffmean", provenance=prov)

    def fingerprint(self) -> dict:
        return dict(
            kind="vectors",
            positions=self.positions,
            alpha=self.alpha,
            source=self.source,
            vectors=tensor_hash({f"layer.{L}": v for L, v in self.vectors.items()}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the vectors as an artefact (safetensors + JSON sidecar with hash and provenance)."""
        return save_artifact(
            path,
            {f"layer.{L}": v for L, v in self.vectors.items()},
            format=FORMAT,
            config=dict(
                alpha=self.alpha, source=self.source, layers=sorted(self.vectors), positions=self.positions
            ),
            provenance=self.provenance,
        )

    @classmethod
    def load(cls, path: str | Path) -> SteeringVectors:
        """Read vectors written by :meth:`save` (hash verified)."""
        tensors, meta = load_artifact(path, format=FORMAT, what="steering vectors")
        vecs = {int(k.split(".")[1]): v for k, v in tensors.items()}
        c = meta["config"]
        return SteeringVectors(
            vecs,
            c.get("alpha", 1.0),
            source=c.get("source", "?"),
            provenance=meta.get("provenance"),
            positions=c.get("positions"),
        )

    def context(self, batch: int | None, indices: list[int] | None, tracker: DecodeTracker):
        import contextlib

        model = tracker.model
        d, blocks = hidden_size(model), decoder_layers(model)
        for L, v in self.vectors.items():
            if v.shape[0] != d:
                raise LRSError(
                    f"steering vector width {v.shape[0]} does not match the model's hidden size {d}"
                )
            if not 0 <= L < len(blocks):
                raise LRSError(
                    f"steering vector for layer {L} but the model has {len(blocks)} decoder layers"
                )
        state: dict = {}

        def make_hook(L: int):
            def hook(module, args, output):
                h = layer_output(output)
                if tracker.step == 0:
                    if L == self.layer:
                        self._store(state.pop("steps", None), indices)
                        state["steps"] = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
                    if (
                        self.positions == "all"
                    ):  # a bias: every prompt position too (padding is masked anyway)
                        v = (self.alpha * self.vectors[L]).to(h.device)
                        return replace_layer_output(output, (h.float() + v).to(h.dtype))
                    return None
                h = h.clone()
                v = (self.alpha * self.vectors[L]).to(h.device)  # added in fp32, as the RL trainer does
                h[:, -1] = (h[:, -1].float() + v * tracker.live[:, None].float()).to(h.dtype)
                if L == self.layer:
                    state["steps"] += tracker.live.long()
                return replace_layer_output(output, h)

            return hook

        self._flush_cb = lambda: self._store(state.pop("steps", None), indices)

        @contextlib.contextmanager
        def ctx():
            handles = [blocks[L].register_forward_hook(make_hook(L)) for L in sorted(self.vectors)]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                self._store(state.pop("steps", None), indices)

        return ctx()

    def _store(self, steps: torch.Tensor | None, indices: list[int] | None) -> None:
        if steps is not None:
            for row, n in enumerate(steps.tolist()):
                self._rows[self._key(indices, row)] = dict(steer_steps=n, steers=n)

    def stats(self) -> dict:
        steps = sum(r["steer_steps"] for r in self._rows.values())
        return dict(
            steer_rate=1.0 if steps else 0.0,
            steered_tokens=steps,
            generated_steps=steps,
            alpha=self.alpha,
            source=self.source,
            layers=sorted(self.vectors),
            vector_norm=float(self.vector.norm()),
        )


class DiffMeanSteerer(SteeringVectors):
    """Difference-of-means steering at one layer: ``DiffMeanSteerer(vector, layer, alpha)``."""

    def __init__(self, vector: torch.Tensor, layer: int, alpha: float = 1.0):
        super().__init__({layer: vector}, alpha, source="diffmean")

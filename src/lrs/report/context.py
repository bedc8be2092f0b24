"""The state one report is built from: the results, the roles of the methods, options, and what sections add.

Why a single object: every section reads the same results and roles (which run is the base, which steered run
the rectification and the cards follow, which run is its matched control) and adds to the same caveat list,
"missing" list and ``summary.json``; passing one context keeps the section builders' signatures short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lrs.report.cards import Decoder
from lrs.report.data import MATCHED_CONTROLS, UNSTEERED, by_id


@dataclass
class Context:
    """Inputs, roles and accumulated outputs of one report."""

    results: dict[str, dict]
    eval_dir: Path
    out: Path
    seed: int = 0
    n_boot: int = 10000
    decode: Decoder | None = None
    noise: Path | None = None
    latents: Path | None = None
    caveats: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.records = {m: by_id(r) for m, r in self.results.items()}

    @property
    def fig_dir(self) -> Path:
        """Where figures go (``figures/`` under the output folder)."""
        return self.out / "figures"

    @property
    def base(self) -> str | None:
        """The reference run (``base``) when present."""
        return "base" if "base" in self.results else None

    @property
    def steered(self) -> list[str]:
        """The steering methods present, in report order."""
        return [m for m in self.results if m not in UNSTEERED]

    @property
    def primary(self) -> str | None:
        """The steered run that the rectification figures and the trace cards follow: LRS, else the first
        steered run that is not another run's matched control."""
        s = self.steered
        if "lrs" in s:
            return "lrs"
        controls = {c for m, c in MATCHED_CONTROLS.items() if m in s}
        return next((m for m in s if m not in controls), s[0] if s else None)

    @property
    def control(self) -> str | None:
        """The primary run's matched random control (:data:`MATCHED_CONTROLS`) when both are present."""
        c = MATCHED_CONTROLS.get(self.primary or "")
        return c if c in self.results else None

    def fig(self, name: str) -> Path:
        """The path of figure ``name`` under ``figures/`` (recorded for ``summary.json`` if it gets drawn)."""
        self.figures.append(f"figures/{name}")
        return self.fig_dir / name

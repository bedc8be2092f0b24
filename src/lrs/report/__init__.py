"""``lrs report``: one report of a run's evaluation results, as Markdown and as one self-contained HTML file.

Outputs in the report folder (ANALYSES.md §5):

- ``report.md`` and ``report.html`` (inline CSS, figures embedded as base64 PNG, ``<details>`` for long lists,
  no JavaScript), with the sections 0 configuration, 1 headline, 2 error rectification (with trace-diff
  cards), 3 behaviours, 4 latents, 5 caveats;
- ``figures/*.png`` (150 dpi, one colour per method; ``figures/rectify/`` from the rectification analysis);
- ``tables/*.csv`` (every table with a name) and ``summary.json`` (every number, the card draw, the caveats
  and what is missing);
- ``accuracy.png`` beside the report, as earlier versions wrote it.

Each section degrades on its own: a run without per-token logs, without a control run or without
``latents.md`` still gives a complete report that says what is missing and which command adds it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from lrs.artifacts import atomic_write_json, atomic_write_text
from lrs.errors import LRSError
from lrs.report import analyses as A
from lrs.report import overview as O
from lrs.report.blocks import Heading, Included, page, render_html, render_md, write_csvs
from lrs.report.cards import Decoder
from lrs.report.context import Context
from lrs.report.data import load_results, parse_methods

__all__ = ["SECTIONS", "load_results", "load_tokenizer", "write_report"]

FORMAT = "lrs.report/1"
SECTIONS = O.SECTIONS


def load_tokenizer(path: str) -> Decoder:
    """A local tokenizer's ``decode`` (special tokens skipped, as ``lrs eval`` decodes), for flip tokens as text
    and steering events placed in the trace-diff cards; a one-line error when it cannot be loaded."""
    from lrs.models import load_tokenizer as _load

    tok = _load(path)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _remove_previous(out: Path) -> None:
    """Delete the figures and tables an earlier report in ``out`` listed (so none is left stale), nothing else."""
    try:
        prev = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(prev, dict) or prev.get("format") != FORMAT:
        return
    for folder, key in ((".", "figures"), ("tables", "tables")):
        for name in prev.get(key) or []:
            path = (out / folder / name).resolve()
            if out.resolve() in path.parents and path.suffix in (".png", ".csv"):
                path.unlink(missing_ok=True)


def write_report(
    eval_dir: Path,
    out: Path | None = None,
    extra: list[str] | None = None,
    *,
    methods: str | Sequence[str] | None = None,
    latents: Path | None = None,
    noise: Path | None = None,
    decode: Decoder | None = None,
    seed: int = 0,
    n_boot: int = 10000,
) -> Path:
    """Write the report of the results in ``eval_dir`` to ``out`` (default ``eval_dir``); returns ``report.md``.

    ``methods`` picks and orders the methods (default: every method with a result, registry order);
    ``latents`` is a ``latents.md`` (or its folder) to include, default ``<run>/latents/latents.md`` if present;
    ``noise`` a base rerun JSONL for the noise floor, default ``<eval_dir>/noise/base.jsonl`` if present;
    ``decode`` a tokenizer's decode (token text in the flip table and events placed in the cards); ``seed``
    draws the trace-diff cards and seeds the bootstraps; ``extra`` are Markdown lines appended as an appendix.
    """
    eval_dir = Path(eval_dir)
    wanted = parse_methods(methods)
    results = load_results(eval_dir, wanted)
    out = Path(out) if out is not None else eval_dir
    if out.exists() and not out.is_dir():
        raise LRSError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    ctx = Context(
        results, eval_dir, out, seed=seed, n_boot=n_boot, decode=decode, noise=noise, latents=latents
    )
    if wanted:
        absent = [m for m in wanted if m not in results]
        if absent:
            ctx.missing.append(f"no result for {', '.join(absent)} in {eval_dir}: `lrs eval --method NAME`")
    blocks = [
        *O.config_section(ctx),
        *O.headline_section(ctx),
        *A.rectification_section(ctx),
        *A.behaviours_section(ctx),
        *A.latents_section(ctx),
        *O.caveats_section(ctx),
    ]
    if extra:
        blocks += [Heading(2, "Appendix", "appendix"), Included("\n".join(extra), out, demote=1)]
    shutil.copyfile(out / "figures" / "accuracy.png", out / "accuracy.png")
    cfg = ctx.summary["config"]
    title = f"Latent Reward Steering: {cfg.get('task') or '?'} / {cfg['split']}"
    subtitle = f"model `{cfg['model']}` · {', '.join(results)} · n = {cfg['n']} · {cfg['dtype']} · git `{cfg['git']}`"
    toc = [*SECTIONS[:3], *([("cards", "trace cards")] if ctx.summary.get("cards") else []), *SECTIONS[3:]]
    toc += [("appendix", "Appendix")] if extra else []
    tables = write_csvs(blocks, out / "tables")
    md = f"# {title}\n\n{subtitle}\n\n" + render_md(blocks, out)
    atomic_write_text(out / "report.html", page(title, subtitle, toc, render_html(blocks, out)))
    summary = dict(
        format=FORMAT,
        eval_dir=str(eval_dir),
        methods=list(results),
        seed=seed,
        **ctx.summary,
        figures=sorted({f for f in [*ctx.figures, "accuracy.png"] if (out / f).is_file()}),
        tables=tables,
    )
    atomic_write_json(out / "summary.json", summary)  # NaN/inf become null
    return atomic_write_text(out / "report.md", md)

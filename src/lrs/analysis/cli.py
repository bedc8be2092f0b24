"""``lrs analyze …``: each analysis module adds its own sub-command through ``add_cli``."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs analyze`` and its sub-commands (each sets ``func`` to the function that runs it)."""
    from lrs.analysis import behaviour_stats, behaviours, latents, rectify, vectors

    a = sub.add_parser(
        "analyze",
        help="post-hoc analyses of eval results (rectification, behaviours) and artefacts (latents, vectors)",
    )
    asub = a.add_subparsers(dest="analysis", required=True)
    behaviours.add_cli(asub)
    rectify.add_cli(asub)
    behaviour_stats.add_cli(asub)
    latents.add_cli(asub)
    vectors.add_cli(asub)

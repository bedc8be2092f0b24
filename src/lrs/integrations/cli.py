"""Top-level ``lrs`` sub-commands of the integrations; each sets ``func`` on its parser."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs import-encoder`` (SAELens / sparsify SAEs as lrs encoder artefacts)."""
    from lrs.integrations.saes import cmd_import_encoder

    p = sub.add_parser(
        "import-encoder",
        help="import a pretrained SAE (SAELens, sparsify) as an lrs encoder artefact, checking its layer",
        description=(
            "Wrap a pretrained sparse autoencoder as an lrs encoder artefact. The block it reads comes from "
            "the SAE's own hook name (TransformerLens blocks.L.hook_resid_post = output of block L = "
            "--layer L; blocks.L.hook_resid_pre = --layer L-1; HF model.layers.L = --layer L) and must "
            "agree with --layer when both are known."
        ),
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="saelens:RELEASE/ID, saelens-dir:PATH (SAE.save_model folder), sparsify:PATH or sparsify:HUB_NAME",
    )
    p.add_argument(
        "--layer", type=int, default=None, help="decoder block whose output the SAE reads (checked)"
    )
    p.add_argument("--out", required=True, help="encoder artefact to write (e.g. runs/x/encoder.safetensors)")
    p.add_argument(
        "--model",
        default=None,
        help="model to check the SAE's width and layer against (its config only; no weights are loaded)",
    )
    p.add_argument("--hookpoint", default=None, help="sparsify: hookpoint folder, e.g. layers.12")
    p.add_argument(
        "--sae-id", dest="sae_id", default=None, help="saelens: the SAE id when it is not in --from"
    )
    p.set_defaults(func=cmd_import_encoder)

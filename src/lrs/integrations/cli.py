"""Top-level ``lrs`` sub-commands of the integrations; each sets ``func`` on its parser."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs import-encoder`` (SAELens / sparsify SAEs as lrs encoder artefacts) and ``lrs export-task``
    (an lrs task as an lm-eval task)."""
    _add_export_task(sub)
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


def _add_export_task(sub: argparse._SubParsersAction) -> None:
    from lrs import config as C
    from lrs.cli_args import add_config

    p = sub.add_parser(
        "export-task",
        help="write an lrs task split as an lm-eval task (same problems, prompt and answer checker)",
        description=(
            "Write <out>/<name>.jsonl, <name>.yaml and lrs_grading.py: a generate_until lm-eval task whose "
            "documents, prompt (with lm-eval's --apply_chat_template) and acc metric are those of lrs eval. "
            "Pass <out> to lm-eval's --include_path."
        ),
    )
    add_config(p, C.TaskConfig)
    p.add_argument("--max-gen-toks", type=int, default=384, help="generation budget (default 384)")
    p.add_argument("--name", default=None, help="task name (default lrs_<task>_<split>)")
    p.add_argument("--out", required=True, help="directory for the task files")
    p.set_defaults(func=_cmd_export_task)


def _cmd_export_task(args) -> None:
    import re

    from lrs import config as C
    from lrs import stages
    from lrs.cli_args import build
    from lrs.integrations.lm_eval_task import export_task

    tc = build(C.TaskConfig, args)
    name = args.name or re.sub(r"\W+", "_", f"lrs_{tc.task}_{tc.split}").strip("_")
    yaml = export_task(stages.problems(tc), args.out, name, args.max_gen_toks)
    print(
        f"lm-eval task {name}: {yaml} (use --include_path {yaml.parent} --tasks {name} --apply_chat_template)"
    )

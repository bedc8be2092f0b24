"""Top-level ``lrs`` sub-commands of the integrations; each sets ``func`` on its parser."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``lrs import-encoder`` (SAELens / sparsify SAEs as lrs encoder artefacts), ``lrs export-task``
    (an lrs task as an lm-eval task) and ``lrs export-vectors`` / ``import-vectors`` (GGUF control vectors
    for llama.cpp and repeng)."""
    _add_export_task(sub)
    _add_vector_io(sub)
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


def _add_vector_io(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-vectors",
        help="write steering vectors as a GGUF control vector (llama.cpp --control-vector, repeng)",
        description=(
            "Write alpha * vectors as a GGUF control vector: direction.L is added to the output of decoder "
            "block L at every position, in llama.cpp and in repeng. llama.cpp refuses direction.0, so block "
            "0 is left out unless --keep-block0 (for repeng). Prints what differs from lrs."
        ),
    )
    p.add_argument("--vectors", required=True, help="lrs steering-vector artefact (.safetensors)")
    p.add_argument("--out", required=True, help="GGUF file to write (.gguf)")
    p.add_argument(
        "--model-hint", default=None, help="model type stored in the file (default: the vectors' model)"
    )
    p.add_argument(
        "--keep-block0",
        action="store_true",
        help="keep block 0's vector (repeng reads it; llama.cpp refuses)",
    )
    p.set_defaults(func=_cmd_export_vectors)

    q = sub.add_parser(
        "import-vectors",
        help="read a GGUF control vector (llama.cpp / repeng) as an lrs steering-vector artefact",
    )
    q.add_argument("--from", dest="source", required=True, help="GGUF control vector file")
    q.add_argument("--out", required=True, help="lrs artefact to write (.safetensors), for --method vectors")
    q.set_defaults(func=_cmd_import_vectors)


def _cmd_export_vectors(args) -> None:
    from lrs.integrations.control_vectors import export_gguf, gguf_layers
    from lrs.steering.vectors import SteeringVectors

    vecs = SteeringVectors.load(args.vectors)
    notes = export_gguf(vecs, args.out, args.model_hint, for_llama_cpp=not args.keep_block0)
    kept = gguf_layers(vecs, for_llama_cpp=not args.keep_block0)
    print(f"wrote {args.out}: {len(kept)} layer(s) {kept[0]}..{kept[-1]}, alpha {vecs.alpha:g} multiplied in")
    for n in notes:
        print(f"note: {n}")


def _cmd_import_vectors(args) -> None:
    from pathlib import Path

    from lrs.integrations.control_vectors import import_gguf
    from lrs.runs import check_file_target

    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")  # the artefact pair is NAME.safetensors + NAME.json
    check_file_target(out, "--out")
    vecs = import_gguf(args.source)
    path = vecs.save(out)
    print(f"wrote {path}: layers {sorted(vecs.vectors)}, width {vecs.vector.numel()}, every position")

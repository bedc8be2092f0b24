"""Import pretrained SAEs (SAELens, EleutherAI sparsify) as lrs encoder artefacts: ``lrs import-encoder``.

Sources (``--from``):

- ``saelens:RELEASE/ID``: ``SAE.from_pretrained(RELEASE, ID)`` (the release name is matched against SAELens's
  own directory, so ids holding ``/`` work; ``--sae-id`` gives the id explicitly);
- ``saelens-dir:PATH``: a folder written by SAELens's ``SAE.save_model`` (``cfg.json`` + weights);
- ``sparsify:PATH`` (a checkpoint folder, or one hookpoint's folder) or ``sparsify:HUB_NAME``, with
  ``--hookpoint layers.L`` where the path does not name it.

The block the SAE reads is taken from its own metadata (SAELens ``cfg.metadata.hook_name``, sparsify's
hookpoint) and checked against ``--layer``; residual-stream hooks only (see
:func:`lrs.encoders.adapters.resid_layer` for the TransformerLens ↔ Hugging Face convention). With
``--model`` the SAE's input width and the layer are checked against the model's config (its weights are not
loaded).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lrs.errors import LRSError

SCHEMES = ("saelens", "saelens-dir", "sparsify")


def parse_source(spec: str, sae_id: str | None = None) -> tuple[str, str, str | None]:
    """``(scheme, location, sae_id)`` from ``--from`` (``saelens:RELEASE/ID`` is split on a known release)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise LRSError(
            f"--from {spec!r}: use saelens:RELEASE/ID, saelens-dir:PATH or sparsify:PATH (or a hub name)"
        )
    if scheme != "saelens":
        return scheme, rest, sae_id
    if sae_id is not None:
        return scheme, rest, sae_id
    return (scheme, *_split_release(rest))


def _split_release(text: str) -> tuple[str, str]:
    """Split ``RELEASE/ID`` where RELEASE is the longest prefix SAELens knows (else at the first ``/``)."""
    known: set[str] = set()
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        known = set(get_pretrained_saes_directory())
    except Exception:  # no sae_lens or another layout: fall back to the first '/'
        pass
    parts = text.split("/")
    for i in range(len(parts) - 1, 0, -1):
        if "/".join(parts[:i]) in known:
            return "/".join(parts[:i]), "/".join(parts[i:])
    if len(parts) < 2 or not parts[1]:
        raise LRSError(f"saelens:{text}: give RELEASE/ID (or the id with --sae-id)")
    return parts[0], "/".join(parts[1:])


def model_shape(spec: str) -> tuple[int, int]:
    """(hidden size, decoder layers) of a model spec from its config alone (no weights are loaded)."""
    from transformers import AutoConfig

    from lrs import packaged

    if spec in packaged.PACKAGED:
        path = packaged.cached_dir(spec)
        if path is None:
            raise LRSError(f"packaged model '{spec}' is not fetched yet: run `lrs models fetch {spec}` first")
        spec = str(path)
    if spec.endswith(".gguf"):
        raise LRSError("--model: give the model's Hugging Face folder or hub id (a .gguf file has no config)")
    try:
        cfg = AutoConfig.from_pretrained(spec)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(f"--model {spec}: cannot read its config ({first})") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size), int(text.num_hidden_layers)


def _hook_of(enc) -> str | None:
    c = enc.config()
    return c.get("hook_name") or c.get("hookpoint")


def check_layer(hook: str | None, layer: int | None, what: str) -> tuple[int, str]:
    """The layer to record and how it was decided; refuses a hook that is not a block output or disagrees."""
    from lrs.encoders.adapters import resid_layer

    found = resid_layer(hook)
    if hook and found is None:
        raise LRSError(
            f"the {what} reads {hook!r}, which is not the output of a decoder block (lrs steers block "
            "outputs: blocks.L.hook_resid_post, blocks.L+1.hook_resid_pre or model.layers.L)"
        )
    if found is None:
        if layer is None:
            raise LRSError(f"the {what} does not say which hook it reads: pass --layer L (output of block L)")
        return layer, f"layer {layer} as given (the {what} names no hook to check it against)"
    if layer is not None and layer != found:
        raise LRSError(
            f"--layer {layer} but the {what} reads {hook!r}, the output of block {found}: use --layer {found}"
        )
    return found, f"layer {found} from hook {hook!r}"


def import_encoder(
    spec: str,
    *,
    layer: int | None = None,
    model: str | None = None,
    hookpoint: str | None = None,
    sae_id: str | None = None,
    device: str = "cpu",
):
    """Load the SAE ``spec`` names and wrap it as an lrs encoder; returns (encoder, provenance, notes).

    Refuses with one line: an unknown scheme, a hook that is not a block output, a ``layer`` that disagrees
    with the SAE's hook, an input width or layer the ``model`` does not have.
    """
    from lrs.encoders.adapters import from_saelens, from_sparsify

    scheme, where, sae_id = parse_source(spec, sae_id)
    notes: list[str] = []
    if scheme == "sparsify":
        enc = from_sparsify(where, hookpoint, layer=-1, device=device)  # layer decided below
        what = "sparsify coder"
    else:
        if scheme == "saelens-dir" and not (Path(where) / "cfg.json").is_file():
            raise LRSError(
                f"saelens-dir:{where}: no SAELens folder there (expected cfg.json from SAE.save_model)"
            )
        enc = from_saelens(where, sae_id if scheme == "saelens" else None, layer=-1, device=device)
        what = "SAELens SAE"
        norm = getattr(enc.sae.cfg, "normalize_activations", "none")
        if norm == "expected_average_only_in":
            raise LRSError(
                "this SAELens SAE expects inputs scaled to a fixed average norm and the scale is not folded "
                "into its weights: load it by release (saelens:RELEASE/ID folds it) or fold it with "
                "sae.fold_activation_norm_scaling_factor(f) and save again"
            )
        meta = getattr(enc.sae.cfg, "metadata", None)
        kwargs = (getattr(meta, "model_from_pretrained_kwargs", None) if meta is not None else None) or {}
        if str(_hook_of(enc) or "").startswith("blocks.") and kwargs.get("center_writing_weights", True):
            notes.append(
                "note: trained on TransformerLens hooks, which centre the residual stream of LayerNorm models "
                "unless loaded with center_writing_weights=False; lrs feeds raw Hugging Face states (the same "
                f"for RMSNorm models such as Llama and Qwen). model_from_pretrained_kwargs: {kwargs}"
            )
    hook = _hook_of(enc)
    enc.layer, how = check_layer(hook, layer, what)
    notes.insert(0, how)
    prov: dict = dict(source=spec, hook_name=hook, layer=enc.layer, d_in=enc.d_model, n_latents=enc.n_latents)
    if scheme != "sparsify":
        meta = getattr(enc.sae.cfg, "metadata", None)
        prov["sae_model_name"] = getattr(meta, "model_name", None) if meta is not None else None
    if model is not None:
        d, n = model_shape(model)
        if enc.d_model != d:
            raise LRSError(f"the {what} reads width {enc.d_model} but {model} has hidden size {d}")
        if not 0 <= enc.layer < n:
            raise LRSError(f"the {what} reads block {enc.layer} but {model} has {n} decoder layers")
        prov["model"] = model
        notes.append(f"checked against {model}: hidden size {d}, {n} decoder layers")
    return enc, prov, notes


def cmd_import_encoder(args) -> None:
    """``lrs import-encoder``: write the imported SAE as an encoder artefact and say what was checked."""
    from lrs.encoders import save_encoder
    from lrs.runs import check_file_target, exclusive

    out = check_file_target(Path(args.out), "--out")
    enc, prov, notes = import_encoder(
        args.source, layer=args.layer, model=args.model, hookpoint=args.hookpoint, sae_id=args.sae_id
    )
    with exclusive(out.with_name(f".{out.name}.lock"), str(out)):
        out = save_encoder(enc, out, provenance=prov, metrics={})
    for line in notes[1:]:
        print(line, file=sys.stderr if line.startswith("note:") else sys.stdout)
    print(f"{enc.kind} encoder, {enc.n_latents} latents of width {enc.d_model}, {notes[0]}")
    print(f"encoder: {out}")

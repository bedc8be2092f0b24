"""GGUF control vectors (llama.cpp / repeng) and steering-vectors objects from and to lrs steering vectors."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch
from conftest import make_model, make_tokenizer

from lrs.cli import main
from lrs.errors import LRSError
from lrs.integrations.control_vectors import (
    export_gguf,
    from_steering_vector,
    import_gguf,
    to_steering_vector,
)
from lrs.steering.vectors import SteeringVectors

pytestmark = pytest.mark.usefixtures("one_thread")


def _vectors(positions="all", layers=(0, 1), alpha=2.0):
    g = torch.Generator().manual_seed(0)
    vecs = {L: torch.randn(32, generator=g) for L in layers}
    return SteeringVectors(vecs, alpha, source="rl", positions=positions, provenance=dict(model="tiny"))


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {
        k: (bytes(f.parts[f.data[0]]).decode() if f.types[0].name == "STRING" else int(f.parts[f.data[0]][0]))
        for k, f in r.fields.items()
        if not k.startswith("GGUF.")
    }
    return fields, {t.name: np.array(t.data) for t in r.tensors}


def test_export_writes_the_llama_cpp_layout_with_alpha_multiplied_in(tmp_path):
    v = _vectors(layers=(0, 1, 3))
    notes = export_gguf(v, tmp_path / "cv.gguf")
    fields, tensors = _read(tmp_path / "cv.gguf")
    assert fields == {
        "general.architecture": "controlvector",
        "controlvector.model_hint": "tiny",
        "controlvector.layer_count": 2,
    }
    assert sorted(tensors) == ["direction.1", "direction.3"]  # llama.cpp rejects a file with direction.0
    for L in (1, 3):
        assert tensors[f"direction.{L}"].dtype == np.float32 and tensors[f"direction.{L}"].shape == (32,)
        assert np.array_equal(tensors[f"direction.{L}"], (2.0 * v.vectors[L]).numpy())
    assert len(notes) == 1 and "block 0" in notes[0] and "left out" in notes[0]
    assert not list(tmp_path.glob("*.tmp*"))

    notes = export_gguf(v, tmp_path / "repeng.gguf", "qwen2", for_llama_cpp=False)
    fields, tensors = _read(tmp_path / "repeng.gguf")
    assert sorted(tensors) == ["direction.0", "direction.1", "direction.3"]
    assert fields["controlvector.model_hint"] == "qwen2" and fields["controlvector.layer_count"] == 3
    assert "llama.cpp refuses the file" in notes[0]
    assert export_gguf(_vectors(layers=(2,)), tmp_path / "clean.gguf") == []  # behaves as in lrs


def test_generated_only_vectors_say_they_will_also_act_on_the_prompt(tmp_path):
    notes = export_gguf(_vectors(positions="generated", layers=(1,)), tmp_path / "cv.gguf")
    assert notes == [
        "these vectors act on generated tokens only in lrs; llama.cpp and repeng add them at every "
        "position, the prompt included"
    ]


def test_import_round_trips_and_steers_like_a_block_output_addition_at_every_position(tmp_path):
    """The imported vectors, applied by lrs, give the logits of the llama.cpp / repeng semantics: direction.L
    added to block L's output at every position (a reference hook written here, not lrs's)."""
    v = _vectors(layers=(0, 1), alpha=3.0)
    export_gguf(v, tmp_path / "cv.gguf", for_llama_cpp=False)
    w = import_gguf(tmp_path / "cv.gguf")
    assert w.positions == "all" and w.alpha == 1.0 and w.source == "gguf"
    assert w.provenance["model"] == "tiny" and sorted(w.vectors) == [0, 1]
    for L in (0, 1):
        assert torch.equal(w.vectors[L], 3.0 * v.vectors[L])

    model, tok = make_model("qwen2"), make_tokenizer()
    enc = tok(["What is 2+3?", "Hi"], return_tensors="pt", padding=True)

    def reference(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + w.vectors[module.layer_idx]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    for L, block in enumerate(model.model.layers):
        block.layer_idx = L
    handles = [b.register_forward_hook(reference) for b in model.model.layers]
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=256)
    for h in handles:
        h.remove()
    with torch.no_grad():
        base = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=256)
        with w.apply(model, tok):
            got = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert torch.equal(got, want) and not torch.equal(got, base)
    assert w.stats()["steered_tokens"] > 0


def test_hostile_files_get_one_line_errors(tmp_path):
    (tmp_path / "text.gguf").write_text("not a gguf file\n")
    with pytest.raises(LRSError, match="not a readable GGUF file") as e:
        import_gguf(tmp_path / "text.gguf")
    assert "\n" not in str(e.value)
    with pytest.raises(LRSError, match="no GGUF control vector at"):
        import_gguf(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LRSError, match="architecture 'llama', not a control vector"):
        import_gguf(tmp_path / "model.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "controlvector")
    w.add_tensor("direction.x", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LRSError, match=r"unexpected tensor 'direction.x'"):
        import_gguf(tmp_path / "odd.gguf")
    with pytest.raises(LRSError, match="must end in .gguf"):
        export_gguf(_vectors(), tmp_path / "cv.bin")
    with pytest.raises(LRSError, match="llama.cpp cannot steer block 0"):
        export_gguf(_vectors(layers=(0,)), tmp_path / "zero.gguf")
    assert not (tmp_path / "zero.gguf").exists() and not (tmp_path / "cv.bin").exists()


def test_cli_export_then_import_gives_back_the_scaled_vectors(tmp_path, capsys):
    src = _vectors(layers=(0, 1, 2), alpha=0.5).save(tmp_path / "v.safetensors")
    assert main(["export-vectors", "--vectors", str(src), "--out", str(tmp_path / "v.gguf")]) == 0
    out = capsys.readouterr().out
    assert "2 layer(s) 1..2, alpha 0.5 multiplied in" in out and "note: block 0's vector" in out
    assert main(["import-vectors", "--from", str(tmp_path / "v.gguf"), "--out", str(tmp_path / "w")]) == 0
    back = SteeringVectors.load(tmp_path / "w.safetensors")
    orig = SteeringVectors.load(src)
    assert sorted(back.vectors) == [1, 2] and back.positions == "all"
    for L in (1, 2):
        assert torch.equal(back.vectors[L], 0.5 * orig.vectors[L])
    assert (
        main(["import-vectors", "--from", str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "x")]) == 2
    )
    assert "not a readable GGUF file" in capsys.readouterr().err


def test_steering_vectors_objects_carry_the_block_outputs(monkeypatch):
    @dataclass
    class SteeringVector:  # the fields of steering_vectors.SteeringVector that the bridge uses
        layer_activations: dict
        layer_type: str = "decoder_block"

    monkeypatch.setitem(sys.modules, "steering_vectors", types.SimpleNamespace(SteeringVector=SteeringVector))
    v = _vectors(layers=(0, 2), alpha=2.0)
    sv = to_steering_vector(v)
    assert sv.layer_type == "decoder_block" and sorted(sv.layer_activations) == [0, 2]
    assert torch.equal(sv.layer_activations[2], 2.0 * v.vectors[2])
    back = from_steering_vector(sv)
    assert back.positions == "all" and torch.equal(back.vectors[0], 2.0 * v.vectors[0])
    with pytest.raises(LRSError, match="generated tokens only.*prompt_too=True"):
        to_steering_vector(_vectors(positions="generated"))
    assert to_steering_vector(_vectors(positions="generated"), prompt_too=True).layer_type == "decoder_block"
    with pytest.raises(LRSError, match="only decoder_block"):
        from_steering_vector(SteeringVector({0: torch.ones(4)}, "attention"))
    monkeypatch.setitem(sys.modules, "steering_vectors", None)
    with pytest.raises(LRSError, match="pip install steering-vectors"):
        to_steering_vector(v)

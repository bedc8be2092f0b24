"""Encoders: TopK SAE fitting quality and determinism, decode_delta algebra, save/load, adapters on fakes."""

from __future__ import annotations

import sys
import types
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrs.encoders import (
    Encoder,
    IdentityEncoder,
    TopKSAE,
    check_compatible,
    encoder_hash,
    fit_identity,
    fit_pca,
    fit_topk_sae,
    from_saelens,
    from_sparsify,
    load_encoder,
    load_lrs_pt,
    save_encoder,
)
from lrs.errors import LRSError

D = 32
FIT = dict(epochs=15, batch_size=256, lr=1e-2, progress=False)


def low_rank_states(n=3000, rank=3, noise=0.01, seed=0) -> torch.Tensor:
    """States on a `rank`-dim subspace around an offset, plus small isotropic noise, stored in bf16."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g))[0].T  # [rank, D] orthonormal
    coef = torch.randn(n, rank, generator=g) * 4
    return (coef @ basis + 2.0 + noise * torch.randn(n, D, generator=g)).to(torch.bfloat16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(one_thread):
    return fit_topk_sae(low_rank_states(), n_latents=10, k=3, **FIT)


def test_topk_sae_fits_low_rank_but_not_noise(fitted):
    sae, m = fitted
    assert isinstance(sae, Encoder) and sae.kind == "topk_sae"
    assert (m["n_train"], m["n_val"]) == (2700, 300)
    assert m["fvu_val"] < 0.1 and m["fvu_train"] < 0.1
    assert 0.0 <= m["dead_frac"] < 0.5
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(10), atol=1e-5)  # unit decoder columns
    noise = torch.randn(3000, D, generator=torch.Generator().manual_seed(1))
    _, m_noise = fit_topk_sae(noise, n_latents=10, k=3, **FIT)
    assert m_noise["fvu_val"] > 0.7  # 3 of 10 directions cannot explain isotropic noise in 32 dims


def test_fit_is_deterministic_for_a_seed(fitted):
    sae, _ = fitted
    again, _ = fit_topk_sae(low_rank_states(), n_latents=10, k=3, **FIT)
    other, _ = fit_topk_sae(low_rank_states(), n_latents=10, k=3, seed=1, **FIT)
    for name, t in sae.tensors().items():
        assert torch.equal(t, again.tensors()[name]), name
    assert not torch.equal(sae.W_enc, other.W_enc)


def test_fit_rejects_too_few_states():
    with pytest.raises(LRSError, match="got 100 states"):
        fit_topk_sae(torch.randn(100, D), progress=False)
    with pytest.raises(LRSError, match="got 0 states"):
        fit_topk_sae(torch.empty(0, D), progress=False)
    bad = torch.randn(3000, D)
    bad[5, 3] = float("nan")
    with pytest.raises(LRSError, match="NaN"):
        fit_topk_sae(bad, progress=False)


def test_encode_is_dense_linear_code_and_sparse_on_request(fitted):
    sae, _ = fitted
    h = low_rank_states(8, seed=3)
    x = h.float() - sae.mu
    x = x / x.norm(dim=-1, keepdim=True)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    z = sae.encode(h)
    assert z.dtype == torch.float32 and z.shape == (8, 10)
    assert torch.allclose(z, pre, atol=1e-5)
    zs = sae.encode(h, sparse=True)
    assert ((zs != 0).sum(-1) <= 3).all() and (zs >= 0).all()
    assert sae.encode(h.reshape(2, 4, D)).shape == (2, 4, 10)  # any leading dims


def test_decode_delta_moves_the_latent_as_the_linear_algebra_says():
    torch.manual_seed(0)
    sae = TopKSAE(D, 10, 3, normalize=False)
    for p in (sae.W_enc, sae.b_enc, sae.b_dec, sae.mu):
        p.copy_(torch.randn_like(p))
    sae.W_dec.copy_(F.normalize(torch.randn(D, 10), dim=0))
    h = torch.randn(5, D, dtype=torch.float64)
    z_old = sae.encode(h)
    z_new = z_old + torch.randn(5, 10)
    dh = sae.decode_delta(z_new, z_old, h)
    assert dh.dtype == torch.float64  # returned in h's dtype
    got = sae.encode(h + dh) - z_old
    want = (z_new - z_old) @ (sae.W_enc @ sae.W_dec).T
    assert torch.allclose(got, want, atol=1e-4)


def test_rescale_makes_delta_scale_with_the_state_norm(fitted):
    sae, _ = fitted
    h = low_rank_states(4, seed=5).float()
    h2 = sae.mu + 2 * (h - sae.mu)  # same direction, twice the distance from μ: same normalised code
    z = sae.encode(h)
    assert torch.allclose(sae.encode(h2), z, atol=1e-4)
    z_new = z + 0.1
    d1, d2 = sae.decode_delta(z_new, z, h), sae.decode_delta(z_new, z, h2)
    assert torch.allclose(d2, 2 * d1, rtol=1e-4, atol=1e-5)
    sae.rescale = False  # reference behaviour: delta in normalised units, independent of ‖h − μ‖
    try:
        r1, r2 = sae.decode_delta(z_new, z, h), sae.decode_delta(z_new, z, h2)
        assert torch.allclose(r1, r2) and torch.allclose(
            r1.norm(dim=-1), d1.norm(dim=-1) / (h - sae.mu).norm(dim=-1)
        )
    finally:
        sae.rescale = True
    assert sae.decode_delta(z_new, z, h.bfloat16()).dtype == torch.bfloat16


def test_identity_and_pca_baselines():
    states = low_rank_states()
    ident = fit_identity(states)
    h = states[:6].float()
    z = ident.encode(h)
    assert ident.n_latents == D and torch.allclose(z.norm(dim=-1), torch.ones(6), atol=1e-5)
    dz = torch.randn(6, D) * 0.01
    assert torch.allclose(
        ident.decode_delta(z + dz, z, h), dz * (h - ident.mu).norm(dim=-1, keepdim=True), atol=1e-5
    )

    pca = fit_pca(states, 3, normalize=False)
    assert pca.metrics["fvu"] < 0.01  # the data is rank 3 plus tiny noise
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(3), atol=1e-5)
    z = pca.encode(h)
    dz = torch.randn(6, 3)
    assert torch.allclose(pca.encode(h + pca.decode_delta(z + dz, z, h)) - z, dz, atol=1e-3)
    assert fit_pca(states, 10).metrics["fvu"] < 0.05


def test_save_load_round_trip(tmp_path, fitted):
    sae, m = fitted
    path = save_encoder(sae, tmp_path / "enc.safetensors", provenance={"model": "tiny", "layer": 1})
    side = (tmp_path / "enc.json").read_text()
    assert '"hash"' in side and '"fvu_val"' in side and '"tiny"' in side
    back = load_encoder(path)
    h = low_rank_states(16, seed=9)
    assert isinstance(back, TopKSAE) and back.config() == sae.config()
    assert torch.equal(back.encode(h), sae.encode(h))
    assert encoder_hash(back) == encoder_hash(sae) and back.metrics["fvu_val"] == m["fvu_val"]
    assert back.provenance == {"model": "tiny", "layer": 1}
    assert encoder_hash(load_encoder(tmp_path / "enc.json")) == encoder_hash(sae)  # sidecar path works too

    ident = fit_identity(low_rank_states(), normalize=False, layer=4)
    back = load_encoder(save_encoder(ident, tmp_path / "id.safetensors"))
    assert isinstance(back, IdentityEncoder) and back.layer == 4 and not back.normalize


def test_load_rejects_foreign_or_damaged_files(tmp_path, fitted):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(LRSError, match="not an lrs encoder"):
        load_encoder(junk)
    junk.with_suffix(".json").write_text('{"format": "lrs.encoder/1", "config": {"kind": "topk_sae"}}')
    with pytest.raises(LRSError, match="not a readable safetensors"):
        load_encoder(junk)
    (tmp_path / "x.pt").write_bytes(b"zz")
    with pytest.raises(LRSError, match="load_lrs_pt"):
        load_encoder(tmp_path / "x.pt")
    path = save_encoder(fitted[0], tmp_path / "enc.safetensors")
    side = path.with_suffix(".json")
    side.write_text(side.read_text().replace('"hash": "', '"hash": "0'))
    with pytest.raises(LRSError, match="hash"):
        load_encoder(path)
    with pytest.raises(LRSError, match="no encoder file"):
        load_encoder(tmp_path / "missing.safetensors")


def test_check_compatible():
    sae = TopKSAE(896, 10, 3, layer=12)
    check_compatible(sae, 896, 12)
    check_compatible(sae, 896, None)
    with pytest.raises(LRSError, match="encoder width 896 does not match the model's hidden size 64"):
        check_compatible(sae, 64, 12)
    with pytest.raises(LRSError, match="encoder was fitted at layer 12 but steering asks for layer 6"):
        check_compatible(sae, 896, 6)


# ---------------------------------------------------------------------------------------------- SAELens fake


class FakeSAE(nn.Module):
    """A JumpReLU SAE with SAELens's attribute names and shapes (W_enc [d, n], W_dec [n, d])."""

    def __init__(self, d=D, n=48, hook="blocks.3.hook_resid_post", v6=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W_enc = nn.Parameter(torch.randn(d, n, generator=g) / d**0.5)
        self.b_enc = nn.Parameter(torch.randn(n, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(n, d, generator=g))
        self.b_dec = nn.Parameter(torch.randn(d, generator=g))
        self.threshold = 0.2
        meta = SimpleNamespace(hook_name=hook)
        self.cfg = (
            SimpleNamespace(d_in=d, d_sae=n, metadata=meta)
            if v6
            else SimpleNamespace(d_in=d, d_sae=n, hook_name=hook)
        )

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold)

    def decode(self, z):
        return z @ self.W_dec + self.b_dec


def test_saelens_adapter_is_faithful_to_the_sae():
    fake = FakeSAE()
    enc = from_saelens(fake)
    assert (enc.layer, enc.d_model, enc.n_latents, enc.kind) == (3, D, 48, "saelens")
    h = torch.randn(2, 5, D)
    z = enc.encode(h.bfloat16())
    with torch.no_grad():
        assert torch.allclose(z, fake.encode(h.bfloat16().float()))
        z_new = z + torch.randn_like(z)
        want = fake.decode(z_new) - fake.decode(z)
        got = enc.decode_delta(z_new, z, h)
    assert got.dtype == h.dtype and torch.allclose(got, want, atol=1e-4)
    assert from_saelens(FakeSAE(hook="blocks.3.hook_resid_pre", v6=False)).layer == 2
    assert from_saelens(FakeSAE(hook="blocks.3.hook_mlp_out"), layer=7).layer == 7
    with pytest.raises(LRSError, match="layer="):
        from_saelens(FakeSAE(hook="blocks.3.hook_mlp_out"))
    with pytest.raises(LRSError, match="layer="):
        from_saelens(FakeSAE(hook="blocks.0.hook_resid_pre"))  # embeddings: no block output


def test_saelens_by_name_old_and_new_returns(monkeypatch, tmp_path):
    for tuple_return in (True, False):
        calls = []

        def from_pretrained(release, sae_id, device="cpu", tuple_return=tuple_return, calls=calls):
            calls.append((release, sae_id))
            sae = FakeSAE(hook=sae_id)
            return (sae, {}, None) if tuple_return else sae

        mod = types.ModuleType("sae_lens")
        mod.SAE = SimpleNamespace(from_pretrained=from_pretrained)
        monkeypatch.setitem(sys.modules, "sae_lens", mod)
        enc = from_saelens("rel", "blocks.5.hook_resid_post")
        assert calls == [("rel", "blocks.5.hook_resid_post")] and enc.layer == 5
    back = load_encoder(
        save_encoder(enc, tmp_path / "sl.safetensors")
    )  # re-fetched by release + id, hash checked
    assert back.layer == 5 and encoder_hash(back) == encoder_hash(enc)
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # not installed
    with pytest.raises(LRSError, match=r"pip install lrs\[saelens\]"):
        from_saelens("rel", "blocks.5.hook_resid_post")


# ---------------------------------------------------------------------------------------------- sparsify fake

EncoderOutput = namedtuple("EncoderOutput", "top_acts top_indices pre_acts")


class FakeCoder(nn.Module):
    """A sparsify SparseCoder look-alike: `encoder` Linear d->n, W_dec [n, d], b_dec, cfg.k, top-k encode."""

    def __init__(self, d=D, n=40, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(d, n)
        self.W_dec = nn.Parameter(torch.randn(n, d))
        self.b_dec = nn.Parameter(torch.randn(d))
        self.cfg = SimpleNamespace(k=k, activation="topk", transcode=False)

    def encode(self, x):
        pre = F.relu(self.encoder(x - self.b_dec))
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return EncoderOutput(vals, idx, pre)

    def decode(self, top_acts, top_indices):
        return (self.W_dec[top_indices] * top_acts[..., None]).sum(-2) + self.b_dec


def test_sparsify_adapter_is_faithful_to_the_coder(tmp_path):
    fake = FakeCoder()
    enc = from_sparsify(fake, "layers.6")
    assert (enc.layer, enc.d_model, enc.n_latents, enc.kind) == (6, D, 40, "sparsify")
    h = torch.randn(7, D)
    with torch.no_grad():
        out = fake.encode(h)
        dense = enc.encode(h)
        assert torch.allclose(F.relu(dense), out.pre_acts, atol=1e-5)
        sparse = enc.encode(h, sparse=True)
        want = torch.zeros(7, 40).scatter(-1, out.top_indices, out.top_acts)
        assert torch.allclose(sparse, want, atol=1e-5)
        new_acts = out.top_acts + torch.randn_like(out.top_acts)
        z_new = torch.zeros(7, 40).scatter(-1, out.top_indices, new_acts)
        want_dh = fake.decode(new_acts, out.top_indices) - fake.decode(out.top_acts, out.top_indices)
        assert torch.allclose(enc.decode_delta(z_new, sparse, h), want_dh, atol=1e-4)
    back = load_encoder(save_encoder(enc, tmp_path / "sp.safetensors"))  # stored by value, no library needed
    assert torch.equal(back.encode(h), dense) and back.layer == 6
    assert from_sparsify(fake, "model.layers.2").layer == 2
    assert from_sparsify(fake, "layers.2.mlp", layer=2).layer == 2
    with pytest.raises(LRSError, match="layer="):
        from_sparsify(fake, "layers.2.mlp")


def test_sparsify_by_name(monkeypatch):
    seen = {}

    class SparseCoder:
        @staticmethod
        def load_from_hub(name, hookpoint=None, device="cpu"):
            seen["hub"] = (name, hookpoint)
            return FakeCoder()

    mod = types.ModuleType("sparsify")
    mod.SparseCoder = SparseCoder
    monkeypatch.setitem(sys.modules, "sparsify", mod)
    enc = from_sparsify("EleutherAI/sae-fake", "layers.9")
    assert seen["hub"] == ("EleutherAI/sae-fake", "layers.9") and enc.layer == 9
    assert enc.config()["name"] == "EleutherAI/sae-fake"
    monkeypatch.setitem(sys.modules, "sparsify", None)
    with pytest.raises(LRSError, match=r"pip install lrs\[sparsify\]"):
        from_sparsify("EleutherAI/sae-fake", "layers.9")


# ---------------------------------------------------------------------------------------------- LRS .pt


class Opaque:
    """A custom class: weights_only loading must refuse to unpickle it."""

    def __init__(self):
        self.w = torch.zeros(3)


def lrs_dict(n=10, d=D):
    g = torch.Generator().manual_seed(0)
    return {
        "encoder_weight": torch.randn(n, d, generator=g),
        "encoder_bias": torch.randn(n, generator=g),
        "decoder_weight": F.normalize(torch.randn(d, n, generator=g), dim=0),
        "b_dec": torch.randn(d, generator=g),
        "topk": torch.tensor(3),
        "activation_mean": torch.randn(d, generator=g),
    }


def test_load_lrs_pt(tmp_path):
    obj = lrs_dict()
    torch.save(obj, tmp_path / "sae.pt")
    sae = load_lrs_pt(tmp_path / "sae.pt", layer=12)
    assert (sae.k, sae.n_latents, sae.layer, sae.normalize) == (3, 10, 12, True)
    h = torch.randn(4, D)
    x = F.normalize(h - obj["activation_mean"], dim=-1)
    want = (x - obj["b_dec"]) @ obj["encoder_weight"].T + obj["encoder_bias"]
    assert torch.allclose(sae.encode(h), want, atol=1e-5)
    assert not load_lrs_pt(tmp_path / "sae.pt", rescale=False).rescale

    torch.save(Opaque(), tmp_path / "pickled.pt")
    (tmp_path / "random.pt").write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    torch.save({k: v for k, v in obj.items() if k != "b_dec"}, tmp_path / "partial.pt")
    cases = {
        "pickled.pt": "pickled Python objects",
        "random.pt": "not a readable",
        "partial.pt": "missing key.*b_dec",
    }
    for name, msg in cases.items():
        with pytest.raises(LRSError, match=msg) as err:
            load_lrs_pt(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)

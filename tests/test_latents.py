"""Latent interpretability on planted synthetic traces and a tiny model: contexts from both tails, the logit
lens, latent x behaviour AUROC, the geometry of steering deltas, event loading and the CLI."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import make_model, make_tokenizer
from safetensors.torch import save_file

from lrs.analysis.latents import (
    Units,
    choose_units,
    context,
    delta_geometry,
    direct_lens,
    event_geometry,
    in_context_lens,
    load_events,
    make_segmenter,
    onset_strings,
    overlap_score,
    percentile,
    principal_directions,
    reconstruct_dh,
    reward_gradients,
    scan_traces,
    show_ids,
    tag_auroc,
    unit_event_stats,
)
from lrs.artifacts import atomic_save_tensors
from lrs.cli import main
from lrs.encoders import IdentityEncoder, TopKSAE, save_encoder
from lrs.errors import LRSError
from lrs.models import model_fingerprint
from lrs.reward.model import RewardConfig, RewardModel, save_reward_model
from lrs.traces import TraceSet

LAYER, D, N = 1, 32, 4
SENTENCES = [
    "We add the numbers.",
    "The sum is 12.",
    "Let's verify the sum again.",
    "So Q is done now.",
    "Then we subtract Z from it.",
    "Next we multiply the values.",
    "Let's verify each step now.",
    "The result is 7.",
]


def planted(tok, n: int = 12, seed: int = 0) -> list[dict]:
    """Traces whose states carry three planted latents: z0 = +5 at the state computed at token "Q", z1 = -5 at
    the state computed at "Z", z2 = +3 at the state that predicts the first token of a "verify" sentence."""
    rng = np.random.default_rng(seed)
    q, zed = tok.encode("Q")[0], tok.encode("Z")[0]
    out = []
    for i in range(n):
        order = rng.permutation(len(SENTENCES))[:5]
        text = " ".join(SENTENCES[j] for j in order)
        ids = tok.encode(text)
        h = rng.normal(0, 0.1, (len(ids), D)).astype(np.float32)
        for s in range(1, len(ids)):
            h[s, 0] += 5.0 * (ids[s - 1] == q)
            h[s, 1] -= 5.0 * (ids[s - 1] == zed)
        starts = []
        for j in order:
            if "verify" in SENTENCES[j]:
                t0 = len(tok.encode(text[: text.index(SENTENCES[j])]))
                h[t0, 2] += 3.0
                starts.append(t0)
        out.append(dict(h=h, ids=ids, text=text, label=i % 2, starts=starts))
    return out


def write_traces(path, traces: list[dict], fingerprint: str | None = None) -> TraceSet:
    """A one-shard trace collection in the format ``lrs collect`` writes."""
    path.mkdir(parents=True, exist_ok=True)
    tensors, recs = {}, []
    for i, t in enumerate(traces):
        tensors[f"h.{LAYER}.{i}"] = torch.as_tensor(t["h"])
        tensors[f"p.{LAYER}.{i}"] = torch.zeros(D)
        tensors[f"tok.{i}"] = torch.tensor(t["ids"], dtype=torch.int32)
        tensors[f"conf.{i}"] = torch.ones(len(t["ids"]))
        recs.append(
            dict(index=i, id=f"p{i}#0", problem_id=f"p{i}", sample=0, label=t["label"], length=len(t["ids"]),
                 truncated=False, answer="1", gold="1", text=t["text"])
        )  # fmt: skip
    shard = path / "shard-00000.safetensors"
    save_file(tensors, str(shard))
    batch = dict(
        batch=0, shard=shard.name, sha256=hashlib.sha256(shard.read_bytes()).hexdigest(), traces=recs
    )
    manifest = dict(config=dict(layers=[LAYER], model_fingerprint=fingerprint), n_batches=1, batches=[batch])
    (path / "manifest.json").write_text(json.dumps(manifest))
    return TraceSet(path)


def coordinate_sae() -> TopKSAE:
    """An SAE whose latent i is state coordinate i (no centring or normalisation): planted values show as is."""
    sae = TopKSAE(D, N, 1, normalize=False, rescale=False, layer=LAYER)
    sae.W_enc.copy_(torch.eye(N, D))
    sae.W_dec.copy_(torch.eye(N, D).T)
    return sae


def all_latents() -> Units:
    return choose_units(N, D, "topk_sae")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    traces = planted(tok)
    return traces, write_traces(tmp_path_factory.mktemp("traces"), traces)


def test_a_planted_latent_tops_its_tail_with_the_right_context(tok, data):
    traces, ts = data
    scan = scan_traces(ts, coordinate_sae(), all_latents(), LAYER, top_k=6)
    show = lambda ids: tok.decode(list(ids))  # noqa: E731
    high = scan.tail(0, "high")
    n_q = sum(t["text"].count("Q") for t in traces)
    assert len(high) == 6 and n_q >= 6
    for value, trace, t in high:  # every top context is the state computed at "Q"
        assert value > 4.5 and tok.decode([int(scan.tokens[trace][t - 1])]) == "Q"
    value, trace, t = high[0]
    ids = traces[trace]["ids"]
    c = context(scan, trace, t, value, show)
    assert c["token"] == "Q" and c["trace"] == f"p{trace}#0"
    assert c["before"] == tok.decode(ids[max(0, t - 25) : t - 1]) and c["after"] == tok.decode(ids[t : t + 8])
    assert c["before"].endswith("So ") and c["after"].startswith(" is done")
    assert value == pytest.approx(float(traces[trace]["h"][t, 0]), abs=1e-5)
    low = scan.tail(1, "low")  # the signed code: the other tail of another latent
    assert all(v < -4.5 and tok.decode([int(scan.tokens[tr][t - 1])]) == "Z" for v, tr, t in low)
    assert max(np.bincount([tr for _, tr, _ in scan.tail(3, "high")])) <= 2  # at most 2 per trace


def test_contexts_without_a_tokenizer_show_ids_and_the_prompt_end(data):
    traces, ts = data
    scan = scan_traces(ts, coordinate_sae(), all_latents(), LAYER, top_k=3)
    c = context(scan, 0, 0, 1.0)
    assert c["token"] == "<prompt end>" and c["before"] == "[]"
    assert c["after"] == show_ids(traces[0]["ids"][:8])
    assert context(scan, 0, 30, 1.0)["token"] == f"[{traces[0]['ids'][29]}]"


def test_activation_moments_cover_every_generated_token(data):
    from lrs.analysis.latents import activation_stats

    traces, ts = data
    stats = activation_stats(scan_traces(ts, coordinate_sae(), all_latents(), LAYER))
    h = np.concatenate([t["h"] for t in traces])
    assert stats["n_tokens"] == len(h)
    np.testing.assert_allclose(stats["mean"], h[:, :N].mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["std"], h[:, :N].std(0), atol=1e-4)
    np.testing.assert_allclose(stats["frac_positive"], (h[:, :N] > 0).mean(0))
    assert sum(stats["histogram"][0]["counts"]) == len(h)  # every position sampled at this size


def test_latent_planted_before_verify_sentences_has_auroc_one(tok, data):
    traces, ts = data
    scan = scan_traces(ts, coordinate_sae(), all_latents(), LAYER, segmenter=make_segmenter(tok))
    verify = [s for s in scan.sentences if "verification" in s.tags]
    assert {(s.trace, s.t0) for s in verify} == {(i, t0) for i, t in enumerate(traces) for t0 in t["starts"]}
    result = tag_auroc(scan, ["z0", "z1", "z2", "z3"], n_boot=200)
    cell = result["tags"]["verification"]
    assert cell["positives"] == len(verify) and cell["auroc"][2] == 1.0
    assert cell["ci95"][2][0] > 0.9 and cell["r"][2] > 0.8
    assert result["tags"]["backtracking"]["positives"] == 0 and np.isnan(
        result["tags"]["backtracking"]["auroc"][2]
    )


def test_direct_logit_lens_of_an_unembedding_row_ranks_its_token_first(tok):
    model = make_model("qwen2", hidden=D)
    assert torch.equal(model.model.norm.weight, torch.ones(D))  # γ = 1
    W = model.lm_head.weight
    j = 70
    with torch.no_grad():
        W[j] *= 3
    row = W[j].detach().numpy()
    lens = direct_lens(model, tok, {"row": row, "minus": -row}, top=5)
    token, value = lens["row"]["promoted"][0]
    assert token == tok.decode([j]) and lens["minus"]["suppressed"][0][0] == tok.decode([j])
    u = torch.as_tensor(row) / torch.as_tensor(row).pow(2).mean().add(model.config.rms_norm_eps).sqrt()
    logits = W.detach() @ u
    assert value == pytest.approx(float(logits[j] - logits.mean()), rel=1e-4)  # centred logit
    states = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32)
    ctx = in_context_lens(model, tok, {"row": row}, states, alpha=1.0, top=3)
    assert ctx["row"]["promoted"][0][0] == tok.decode([j])


class WordTok:
    """A word-level tokenizer stand-in: known words are one token, anything else several."""

    vocab = [" Wait", "Wait", " check", " verify", "First", " the", " x"]

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.index(text)] if text in self.vocab else [0, 1]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_lexicon_overlap_counts_onset_tokens_and_ranks_against_a_null():
    onset = onset_strings(WordTok())
    assert onset == {" Wait", "Wait", " check", " verify", "First"}
    assert overlap_score([" Wait", " the", " check", " x"], onset, k=4) == 0.5
    assert overlap_score([" Wait", " the", " check", " x"], onset, k=2) == 0.5
    assert percentile(0.5, [0.0, 0.1, 0.5, 0.9]) == 62.5  # 2 below, 1 tie counted half, of 4


def test_one_direction_deltas_give_pc1_share_one_and_cosine_one():
    rng = np.random.default_rng(0)
    v = rng.normal(size=D)
    dh = rng.uniform(0.5, 2.0, size=(50, 1)) * v
    g = delta_geometry(dh, diffmean=3 * v)
    assert g["pc1_share"] == pytest.approx(1.0, abs=1e-9)
    assert g["cos_mean_with_diffmean"] == pytest.approx(1.0) and g["cos_pc1_with_diffmean"] == pytest.approx(
        1.0
    )
    assert g["mean_pairwise_cosine"] == pytest.approx(1.0)
    assert g["verdict"].startswith("LRS behaves like a gated fixed vector")
    iso = delta_geometry(rng.normal(size=(400, D)), diffmean=v)
    assert iso["pc1_share"] < 0.2 and abs(iso["mean_pairwise_cosine"]) < 0.05
    assert iso["verdict"].startswith("The steering deltas are state-specific")
    assert iso["random_abs_cosine"] == pytest.approx(np.sqrt(2 / (np.pi * D)))


def test_principal_directions_are_uncentred_for_deltas_and_signed_along_the_mean():
    v = np.array([3.0, 4.0, 0.0]) / 5
    x = np.outer([1.0, 2.0, 3.0], v)
    w, shares = principal_directions(x, 2, centre=False)
    np.testing.assert_allclose(w[0], v, atol=1e-12)
    assert shares[0] == pytest.approx(1.0)
    w, _ = principal_directions(-x, 1, centre=False)
    np.testing.assert_allclose(w[0], -v, atol=1e-12)  # sign follows the deltas' mean


def test_event_stats_per_latent_and_per_principal_direction():
    rng = np.random.default_rng(1)
    z_pre = rng.normal(size=(40, N))
    dz = np.zeros((40, N))
    dz[:, 1] = rng.uniform(1, 2, 40)
    dz[:, 3] = -0.5 * dz[:, 1]  # Δz = c (0, 1, 0, -0.5): one direction
    st = unit_event_stats(dz, all_latents())
    total = (dz**2).sum(1).mean()
    np.testing.assert_allclose(st["energy_share"], [0, (dz[:, 1] ** 2).mean() / total, 0, 0.2], atol=1e-12)
    assert st["energy_share"][1] == pytest.approx(0.8)
    assert st["sign_consistency"] == [0.0, 1.0, 0.0, 0.0]
    np.testing.assert_allclose(st["mean"], dz.mean(0))
    dense = choose_units(N, N, "identity", dz=dz)  # identity: principal directions of Δz
    assert dense.kind == "direction" and dense.names[0] == "PC1"
    np.testing.assert_allclose(dense.weights[0], np.array([0, 1, 0, -0.5]) / np.sqrt(1.25), atol=1e-6)
    geo = event_geometry(z_pre, z_pre + dz, dz @ np.eye(N, D), dense, diffmean=np.eye(N, D)[1])
    assert geo["units"]["energy_share"][0] == pytest.approx(1.0, abs=1e-6)
    assert geo["units"]["sign_consistency"][0] == 1.0
    assert geo["dh"]["cos_mean_with_diffmean"] == pytest.approx(1 / np.sqrt(1.25))
    with pytest.raises(LRSError, match="one row per event"):
        event_geometry(z_pre, z_pre[:3], dz, dense)


def test_wide_encoders_keep_the_latents_the_events_move_most():
    dz = np.zeros((5, 300))
    dz[:, [7, 250]] = 1.0
    dz[:, 9] = 0.1
    units = choose_units(300, 512, "topk_sae", dz=dz, max_latents=3)
    assert units.names == ["z7", "z9", "z250"] and units.kind == "latent"


def events_records(rng, v, n_problems: int = 5, inline: bool = True) -> list[dict]:
    """Eval records with logged steering events whose latent change is c·v (c in [0.5, 1.5])."""
    recs = []
    for p in range(n_problems):
        ev = []
        for t in range(40):
            e = dict(t=t, r=0.5, c=0.9, steered=t % 8 == 3, dh=0.0)
            if e["steered"]:
                zp, c = rng.normal(size=N), rng.uniform(0.5, 1.5)
                e.update(dh=float(2 * c * np.linalg.norm(v)), dh_rel=0.1, gate="reward", r_post=0.6)
                if inline:
                    e.update(z_pre=zp.tolist(), z_post=(zp + c * v).tolist())
            ev.append(e)
        recs.append(dict(id=f"p{p}", output="x", correct=True, tokens=40, events=ev))
    return recs


def test_events_load_inline_and_from_the_sidecar_and_decode_to_dh(tmp_path):
    rng = np.random.default_rng(0)
    v = np.array([0.0, 1.0, 0.5, 0.0])
    path = tmp_path / "lrs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in events_records(rng, v)))
    ev = load_events(path)
    assert len(ev) == 25 and set(ev.gate) == {"reward"} and ev.t[0] == 3
    np.testing.assert_allclose((ev.z_post - ev.z_pre) / np.linalg.norm(ev.z_post - ev.z_pre, axis=1)[:, None],
                               np.tile(v / np.linalg.norm(v), (25, 1)), atol=1e-5)  # fmt: skip
    dh = reconstruct_dh(coordinate_sae(), ev)  # Δz W_decᵀ, rescaled to the logged |Δh|
    np.testing.assert_allclose(np.linalg.norm(dh, axis=1), ev.dh_norm, rtol=1e-5)
    assert np.allclose(dh[:, N:], 0) and np.allclose(dh[:, 2] / dh[:, 1], 0.5)
    # a wide encoder's latents live in <name>.latents.safetensors, in event order
    recs = events_records(rng, v, n_problems=2, inline=False)
    for r in recs:
        r["latents"] = "wide.latents.safetensors"
    (tmp_path / "wide.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    z = {
        f"p{p}/{k}": torch.full((5, N), float(p + (k == "z_post")))
        for p in range(2)
        for k in ("z_pre", "z_post")
    }
    atomic_save_tensors(tmp_path / "wide.latents.safetensors", z)
    wide = load_events(tmp_path / "wide.jsonl")
    assert (
        len(wide) == 10 and wide.problem[5] == "p1" and wide.z_pre[5, 0] == 1.0 and wide.z_post[5, 0] == 2.0
    )
    (tmp_path / "none.jsonl").write_text(json.dumps(dict(id="a", output="x")) + "\n")
    with pytest.raises(LRSError, match="no steering events"):
        load_events(tmp_path / "none.jsonl")


def test_reward_gradient_is_the_last_positions_own_gradient():
    torch.manual_seed(0)
    rm = RewardModel(N, RewardConfig(d_model=16, n_layers=1, n_heads=2, window=64)).eval()
    z = np.random.default_rng(0).normal(size=(20, N)).astype(np.float32)
    g = reward_gradients(rm, z, [5, 19])
    for row, t in zip(g, [5, 19], strict=True):
        x = torch.as_tensor(z[: t + 1])[None].clone().requires_grad_(True)
        (want,) = torch.autograd.grad(rm(x)[0, t], x)
        np.testing.assert_allclose(row, want[0, t].numpy(), rtol=1e-4, atol=1e-6)


def test_cli_writes_json_markdown_and_figures(tok, tmp_path, capsys):
    model = make_model("qwen2", hidden=D)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    traces = planted(tok)
    write_traces(tmp_path / "traces", traces, fingerprint=model_fingerprint(model))
    save_encoder(coordinate_sae(), tmp_path / "enc.safetensors")
    torch.manual_seed(0)
    save_reward_model(
        RewardModel(N, RewardConfig(d_model=16, n_layers=1, n_heads=2, window=16)),
        tmp_path / "rm.safetensors",
    )
    v = np.array([0.0, 1.0, 0.5, 0.0])
    (tmp_path / "lrs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in events_records(np.random.default_rng(0), v))
    )
    out = tmp_path / "out"
    argv = [
        "analyze",
        "latents",
        "--traces",
        str(tmp_path / "traces"),
        "--encoder",
        str(tmp_path / "enc.safetensors"),
    ]
    full = ["--reward", str(tmp_path / "rm.safetensors"), "--events", str(tmp_path / "lrs.jsonl"),
            "--model", str(tmp_path / "m"), "--out", str(out), "--n-random", "20", "--n-boot", "100"]  # fmt: skip
    assert main(argv + full) == 0
    assert "gated fixed vector" in capsys.readouterr().out
    r = json.loads((out / "latents.json").read_text())
    assert r["units"]["names"] == ["z0", "z1", "z2", "z3"]
    assert r["contexts"][0]["high"][0]["token"] == "Q" and r["contexts"][1]["low"][0]["token"] == "Z"
    assert r["tags"]["tags"]["verification"]["auroc"][2] == 1.0
    assert r["events"]["dh"]["pc1_share"] == pytest.approx(1.0, abs=1e-6)
    assert r["events"]["units"]["energy_share"] == pytest.approx([0, 0.8, 0.2, 0], abs=1e-6)
    assert r["events"]["summary"]["gate_share"] == {"reward": 1.0}
    assert r["reward_gradient"]["n_states"] > 0
    assert sum(r["reward_gradient"]["energy_share"]) == pytest.approx(1.0)  # one-hot units span z
    assert {"mean Δh", "Δh PC1", "diffmean", "z0"} <= set(r["lens"]["directions"])
    assert len(r["lens"]["directions"]["z0"]["direct"]["promoted"]) == 20
    assert sorted(r["figures"]) == ["activations.png", "auroc.png", "events.png"]
    assert all((out / "figures" / f).stat().st_size > 0 for f in r["figures"])
    md = (out / "latents.md").read_text()
    assert md.startswith("## Latents") and "LRS behaves like a gated fixed vector" in md and "⟦Q⟧" in md

    # no model and no events: ids instead of text, no lens, no tags; the default out is next to the encoder
    assert main(argv + ["--no-figures"]) == 0
    r = json.loads((tmp_path / "latents" / "latents.json").read_text())
    assert r["contexts"][0]["high"][0]["token"] == f"[{tok.encode('Q')[0]}]"
    assert "lens" not in r and "events" not in r and r["tags"]["n_sentences"] == 0 and r["figures"] == []


def test_cli_refuses_mismatched_inputs(tok, tmp_path, capsys):
    write_traces(tmp_path / "traces", planted(tok, n=2))
    enc = IdentityEncoder(D, layer=5)
    save_encoder(enc, tmp_path / "enc.safetensors")
    argv = [
        "analyze",
        "latents",
        "--traces",
        str(tmp_path / "traces"),
        "--encoder",
        str(tmp_path / "enc.safetensors"),
    ]
    assert main(argv) == 2
    assert "layer 5" in capsys.readouterr().err
    save_encoder(coordinate_sae(), tmp_path / "sae.safetensors")
    (tmp_path / "ev.jsonl").write_text(
        json.dumps(dict(id="a", events=[dict(t=3, steered=True, z_pre=[0.0] * 3, z_post=[1.0] * 3)])) + "\n"
    )
    argv[-1] = str(tmp_path / "sae.safetensors")
    assert main(argv + ["--events", str(tmp_path / "ev.jsonl")]) == 2
    assert "3 latents but the encoder has 4" in capsys.readouterr().err


def test_identity_encoder_is_read_through_principal_directions_of_the_states(data):
    from lrs.analysis.latents import analyse

    _, ts = data
    r = analyse(ts, IdentityEncoder(D, normalize=False, layer=LAYER), n_boot=10)
    assert r["units"]["kind"] == "direction" and r["units"]["names"] == [f"PC{i}" for i in range(1, 17)]
    w = np.abs(np.array(r["units"]["weights"]))
    assert set(w[:2].argmax(1)) == {0, 1}  # the planted spikes carry the most variance
    assert r["contexts"][0]["high"][0]["value"] > 4 or r["contexts"][0]["low"][0]["value"] < -4

"""Integrations against the real libraries, offline: lm-eval's ``lrs`` model on a tiny saved model and a local
JSONL task, and SAELens / sparsify SAEs built from configs with random weights, saved in their own formats and
imported with ``lrs import-encoder``. Each part is skipped (with the install command) when its library is
missing: they are optional extras (``lmeval``, ``saelens``, ``sparsify``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_trained_run

from lrs.cli import main
from lrs.errors import LRSError


def _missing(module: str, extra: str):
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install or a module blocked in sys.modules
        found = False
    return pytest.mark.skipif(
        not found, reason=f"{module} is not installed: pip install -c constraints.txt -e '.[{extra}]'"
    )


needs_lm_eval = _missing("lm_eval", "lmeval")
needs_saelens = _missing("sae_lens", "saelens")
needs_sparsify = _missing("sparsify", "sparsify")

TASK = "lrs_tiny_arith"
PROBLEMS = [(f"What is {a}+{b}?", str(a + b)) for a, b in [(2, 3), (7, 4), (6, 2), (9, 1), (8, 5), (1, 1)]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny qwen2 saved to a folder with a run trained on it (traces, identity encoder at layer 1, reward)."""
    return build_trained_run(tmp_path_factory.mktemp("integrations"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A generative lm-eval task defined by a YAML over a local JSONL file (no hub access)."""
    d = tmp_path_factory.mktemp("tasks")
    data = d / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS))
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


def _evaluate(model, model_args: dict | None, task_dir: Path, limit: int | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lrs.integrations.lm_eval  # noqa: F401 - registers the model name "lrs"

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[TASK], task_manager=tm, batch_size=4, limit=limit,
        log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


def _responses(res: dict) -> list[str]:
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


# ---------------------------------------------------------------------------------------------- lm-eval


@needs_lm_eval
def test_lm_eval_finds_the_lrs_model_by_name():
    from lm_eval.api.registry import get_model

    from lrs.integrations.lm_eval import LRSLM

    assert get_model("lrs") is LRSLM


@needs_lm_eval
def test_lm_eval_lrs_model_steers_generation_and_base_is_plain_hflm(trained, task_dir):
    """Same task, four runs: plain HFLM; lrs method=base (must equal it); lrs with the gate forced open
    (tau_c=1.0: every live decode step is steered); lrs with alpha=0 (steered, but by zero: equal again)."""
    common = dict(pretrained=trained["model"], device="cpu", dtype="float32")
    forced = dict(common, run=str(trained["run"]), tau_c=1.0, warmup=0, every=1)
    hf = _evaluate("hf", common, task_dir)
    base = _evaluate("lrs", dict(common, method="base"), task_dir)
    lrs = _evaluate("lrs", dict(forced, alpha=5.0), task_dir)
    zero = _evaluate("lrs", dict(forced, alpha=0.0), task_dir)
    n = len(PROBLEMS)
    for res in (hf, base, lrs, zero):
        assert len(res["samples"][TASK]) == n and res["results"][TASK]["sample_len"] == n
    assert _responses(base) == _responses(hf)
    assert base["config"]["lrs"] == {"method": "base"}
    st = lrs["config"]["lrs"]
    assert st["method"] == "lrs" and st["rows"] == n
    assert st["steered_tokens"] == st["generated_steps"] > 0 and st["steer_rate"] == 1.0
    assert st["config"]["tau_c"] == 1.0 and st["config"]["alpha"] == 5.0 and st["nan_skipped"] == 0
    assert _responses(lrs) != _responses(hf)  # a step of 5 on every token changes the text
    z = zero["config"]["lrs"]
    assert z["steered_tokens"] == z["generated_steps"] > 0 and z["mean_dh_norm"] == 0.0
    assert _responses(zero) == _responses(hf)  # the hooks alone change nothing


@needs_lm_eval
def test_a_row_finished_by_a_stop_string_is_never_steered_again(trained):
    """lm-eval's stop-string criterion stops the batch only when every row is done, so a row that has hit its
    stop string keeps generating. Under ``steering`` it is steered up to and including the token that
    completes the stop string and never after; without the watcher it would be steered to the end."""
    from lm_eval.models.utils import postprocess_generated_text
    from lm_eval.models.utils_hf import stop_sequences_criteria
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrs.integrations.lm_eval import make_steerer, steering

    model = AutoModelForCausalLM.from_pretrained(trained["model"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["model"])
    steerer = make_steerer(model, "lrs-basic", run=str(trained["run"]), warmup=0, every=1, alpha=0.05)
    enc = tok(
        ["Question: what is 2+2?", "Q: 7*3 ="], return_tensors="pt", padding=True, add_special_tokens=False
    )
    P, T = enc["input_ids"].shape[1], 24

    def run(stops: list[str]):
        steerer.reset()
        crit = stop_sequences_criteria(tok, stops, P, 2) if stops else None
        with torch.no_grad(), steering(steerer, model, tok, stops) as watcher:
            out = model.generate(
                **enc,
                max_new_tokens=T,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                stopping_criteria=crit,
            )
        steers = [steerer.row_stats()[i]["steers"] for i in range(2)]
        return out[:, P:].tolist(), steers, dict(watcher.stopped_at)

    def live_steps(ids: list[int], stops: list[str]) -> int:
        """Reference: decode steps s >= 1 before which the row's text holds no stop string and no EOS."""
        n = 0
        for s in range(1, len(ids)):
            if tok.eos_token_id in ids[:s] or any(x in tok.decode(ids[:s]) for x in stops):
                break
            n += 1
        return n

    free, free_steers, _ = run([])
    assert free_steers == [live_steps(r, []) for r in free] and free_steers[0] == T - 1
    # a stop string that row 0 completes at token p and row 1 never writes
    text1 = tok.decode(free[1])
    p, stop = next(
        (p, c)
        for p in range(3, T - 4)
        if len(c := tok.decode(free[0][p : p + 1])) == 1
        and c.isprintable()
        and c not in tok.decode(free[0][:p])
        and c not in text1
    )
    ids, steers, stopped = run([stop])
    assert ids[0][: p + 1] == free[0][: p + 1]  # identical up to the stop string
    assert len(ids[0]) == T  # the batch went on: row 0 kept generating after its stop string
    assert stopped == {0: p + 1}
    assert steers[0] == p == live_steps(ids[0], [stop])  # steps 1..p, the last one writes the stop string
    assert steers[1] == free_steers[1] == live_steps(ids[1], [stop])
    assert free_steers[0] > p  # without the watcher the finished row is steered to the end
    cut = postprocess_generated_text(tok.decode(ids[0]), [stop], None)
    assert cut == tok.decode(free[0][:p])  # what lm-eval returns for the row is what was steered


@needs_lm_eval
def test_lm_eval_method_vectors_steers_every_live_token(trained, task_dir, tmp_path):
    from lrs.steering import SteeringVectors

    g = torch.Generator().manual_seed(0)
    path = SteeringVectors({1: torch.randn(32, generator=g)}, 8.0, source="test").save(
        tmp_path / "v.safetensors"
    )
    common = dict(pretrained=trained["model"], device="cpu", dtype="float32")
    res = _evaluate("lrs", dict(common, method="vectors", vectors=str(path), layer=1), task_dir, limit=3)
    st = res["config"]["lrs"]
    assert len(res["samples"][TASK]) == 3 and st["rows"] == 3
    assert st["steered_tokens"] == st["generated_steps"] > 0 and st["layers"] == [1] and st["alpha"] == 8.0
    assert _responses(res) != _responses(_evaluate("hf", common, task_dir, limit=3))


@needs_lm_eval
def test_lm_eval_model_arguments_are_checked_with_one_line(trained):
    from lrs.integrations.lm_eval import LRSLM, make_steerer

    common = dict(pretrained=trained["model"], device="cpu", dtype="float32")
    with pytest.raises(LRSError, match="changes the prompt, which the lm-eval task defines"):
        LRSLM(**common, method="cot")
    with pytest.raises(
        LRSError, match="lm-eval asks for one completion per request: use `lrs eval --method bon`"
    ):
        LRSLM(**common, method="bon")
    with pytest.raises(LRSError, match="needs encoder=FILE and reward=FILE"):
        LRSLM(**common, method="lrs")
    with pytest.raises(LRSError, match=r"layer=0 but the lrs artefacts steer layer\(s\) \[1\]"):
        LRSLM(**common, run=str(trained["run"]), layer=0)
    with pytest.raises(LRSError, match="tuned=true .* give run=DIR"):
        LRSLM(**common, encoder="e", reward="r", tuned=True)
    lm = LRSLM(**common, run=str(trained["run"]), k=3.0, tau_c="0.5", layer=1)  # lm-eval's parsed types
    assert (lm.steerer.cfg.k, lm.steerer.cfg.tau_c, lm.steerer.layer) == (3, 0.5, 1)
    with pytest.raises(LRSError, match="k=2.5 is not a number of the right kind"):
        make_steerer(lm.model, "lrs", run=str(trained["run"]), k=2.5)


@needs_lm_eval
def test_lm_eval_lrs_model_takes_a_packaged_model_name(trained, monkeypatch):
    from lrs import packaged
    from lrs.integrations.lm_eval import LRSLM

    name = "tiny-test-model"
    monkeypatch.setitem(packaged.PACKAGED, name, packaged.PACKAGED[packaged.DEFAULT_MODEL])
    monkeypatch.setattr(packaged, "cached_dir", lambda n: Path(trained["model"]) if n == name else None)
    lm = LRSLM(pretrained=name, device="cpu", dtype="float32", method="base")
    assert lm.model.config.hidden_size == 32 and lm.steerer is None


@needs_lm_eval
def test_python_m_runs_the_lm_eval_cli_with_the_lrs_model(trained, task_dir, tmp_path):
    args = (
        f"pretrained={trained['model']},dtype=float32,"
        f"encoder={trained['run'] / 'encoder.safetensors'},reward={trained['run'] / 'reward.safetensors'},"
        "method=lrs,k=2,alpha=0.5,tau_r=0.9,tau_c=1.0,warmup=0,layer=1"
    )
    argv = [
        sys.executable, "-m", "lrs.integrations.lm_eval", "run", "--model", "lrs", "--model_args", args,
        "--tasks", TASK, "--include_path", str(task_dir), "--limit", "2", "--batch_size", "2", "--device", "cpu",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "lrs: method=lrs: steered" in p.stderr
    (results,) = (tmp_path / "out").rglob("results_*.json")
    st = json.loads(results.read_text())["config"]["lrs"]
    assert st["rows"] == 2 and st["steered_tokens"] > 0 and st["config"]["k"] == 2


# ---------------------------------------------------------------------------------------------- SAELens


def _random_saelens(arch: str, d_in: int, hook: str, d_sae: int = 64, seed: int = 0):
    """A real SAELens SAE of ``arch`` built from its config, with every parameter random (b_dec too)."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }
    cls, cfg_cls, extra = classes[arch]
    meta = SAEMetadata(hook_name=hook, model_name="tiny-qwen2")
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.2 if name == "threshold" else 0.0))
    return sae.eval()


def _check_same_as_saelens(enc, sae, d_in: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, d_in, generator=g)
    with torch.no_grad():
        z = enc.encode(x)
        want = sae.encode(x)
        assert torch.allclose(z, want, atol=1e-5) and (z != 0).any() and (z == 0).any()
        z_new = z + torch.randn(z.shape, generator=g)
        got = enc.decode_delta(z_new, z, x)
        assert torch.allclose(got, sae.decode(z_new) - sae.decode(z), atol=1e-4)
        assert torch.allclose(
            enc.decode_delta(z, torch.zeros_like(z), x) + sae.b_dec, sae.decode(z), atol=1e-4
        )


@needs_saelens
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_folder_imports_with_its_own_encode_and_decode(arch, trained, tmp_path, capsys):
    from lrs.artifacts import load_artifact
    from lrs.encoders import FORMAT, encoder_hash, load_encoder
    from lrs.encoders.adapters import SAELensEncoder

    sae = _random_saelens(arch, 32, "blocks.1.hook_resid_post")
    sae.save_model(tmp_path / "sae")  # SAELens's own format: cfg.json + sae_weights.safetensors
    out = tmp_path / "enc.safetensors"
    argv = ["import-encoder", "--from", f"saelens-dir:{tmp_path / 'sae'}", "--layer", "1", "--out", str(out)]
    assert main([*argv, "--model", trained["model"]]) == 0
    printed = capsys.readouterr().out
    assert (
        "layer 1 from hook 'blocks.1.hook_resid_post'" in printed
        and "hidden size 32, 2 decoder layers" in printed
    )
    import shutil

    shutil.rmtree(tmp_path / "sae")  # the artefact holds the SAE by value: its source folder is not needed
    enc = load_encoder(out)
    assert (enc.kind, enc.layer, enc.d_model, enc.n_latents) == ("saelens", 1, 32, 64)
    assert (
        enc.provenance["hook_name"] == "blocks.1.hook_resid_post"
        and enc.provenance["model"] == trained["model"]
    )
    _check_same_as_saelens(enc, sae, 32)
    tensors, meta = load_artifact(out, format=FORMAT, what="encoder")
    assert meta["hash"] == encoder_hash(enc)
    if arch == "jumprelu":
        assert torch.equal(tensors["threshold"], sae.threshold.detach())  # thresholds are part of the hash
    config = {
        **meta["config"]["options"],
        **{k: meta["config"][k] for k in ("kind", "layer", "d_model", "n_latents")},
    }
    by_value = SAELensEncoder.from_saved(config, tensors)  # rebuilt from the artefact alone
    _check_same_as_saelens(by_value, sae, 32)


@needs_saelens
def test_saelens_import_refuses_a_wrong_layer_hook_or_width(trained, tmp_path, capsys):
    cases = [
        ("blocks.2.hook_resid_pre", 32, ["--layer", "0"], "reads 'blocks.2.hook_resid_pre', the output of block 1: use --layer 1"),
        ("blocks.1.hook_mlp_out", 32, ["--layer", "1"], "not the output of a decoder block"),
        ("blocks.0.hook_resid_pre", 32, [], "not the output of a decoder block"),  # the embeddings
        ("blocks.1.hook_resid_post", 48, [], "reads width 48 but .* has hidden size 32"),
        ("blocks.5.hook_resid_post", 32, [], "reads block 5 but .* has 2 decoder layers"),
    ]  # fmt: skip
    for i, (hook, d_in, extra, message) in enumerate(cases):
        _random_saelens("standard", d_in, hook).save_model(tmp_path / f"s{i}")
        argv = [
            "import-encoder",
            "--from",
            f"saelens-dir:{tmp_path / f's{i}'}",
            "--out",
            str(tmp_path / f"e{i}.safetensors"),
        ]
        assert main([*argv, *extra, "--model", trained["model"]]) == 2, hook
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lrs: error:"), err
        assert __import__("re").search(message, err), err
        assert not (tmp_path / f"e{i}.safetensors").exists()
    # resid_pre of block 2 is block 1's output: accepted, recorded as layer 1
    assert (
        main(
            [
                "import-encoder",
                "--from",
                f"saelens-dir:{tmp_path / 's0'}",
                "--out",
                str(tmp_path / "ok.safetensors"),
            ]
        )
        == 0
    )
    assert "layer 1 from hook 'blocks.2.hook_resid_pre'" in capsys.readouterr().out


@needs_saelens
def test_saelens_release_import_through_a_monkeypatched_hub_download(tmp_path, monkeypatch, capsys):
    """``saelens:RELEASE/ID`` goes through SAELens's real from_pretrained (release directory, loader, config
    handling); only huggingface_hub's download is replaced by files SAELens itself saved."""
    from huggingface_hub.errors import EntryNotFoundError
    from sae_lens.loading import pretrained_sae_loaders

    from lrs.encoders import load_encoder

    release, sae_id, repo = (
        "gpt2-small-res-jb",
        "blocks.8.hook_resid_pre",
        "jbloom/GPT2-Small-SAEs-Reformatted",
    )
    sae = _random_saelens("standard", 768, sae_id, d_sae=16)
    sae.save_model(tmp_path / "hub" / repo / sae_id)
    fetched = []

    def download(repo_id, filename, force_download=False, **kwargs):
        path = tmp_path / "hub" / repo_id / filename
        fetched.append(f"{repo_id}/{filename}")
        if not path.exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", download)
    out = tmp_path / "gpt2.safetensors"
    assert main(["import-encoder", "--from", f"saelens:{release}/{sae_id}", "--out", str(out)]) == 0
    assert "layer 7 from hook 'blocks.8.hook_resid_pre'" in capsys.readouterr().out
    assert f"{repo}/{sae_id}/sae_weights.safetensors" in fetched
    enc = load_encoder(out)  # fetched again by release and id
    assert enc.layer == 7 and enc.config()["release"] == release and enc.config()["sae_id"] == sae_id
    _check_same_as_saelens(enc, sae, 768)
    assert (
        main(["import-encoder", "--from", f"saelens:{release}/{sae_id}", "--layer", "8", "--out", str(out)])
        == 2
    )
    assert "use --layer 7" in capsys.readouterr().err


def test_import_encoder_source_parsing_is_one_line(tmp_path, capsys):
    from lrs.integrations.saes import parse_source

    assert parse_source("saelens-dir:/x/y") == ("saelens-dir", "/x/y", None)
    assert parse_source("sparsify:EleutherAI/sae-x") == ("sparsify", "EleutherAI/sae-x", None)
    assert parse_source("saelens:org/repo", "layer_3/width_16k") == (
        "saelens",
        "org/repo",
        "layer_3/width_16k",
    )
    assert main(["import-encoder", "--from", "foo:bar", "--out", str(tmp_path / "e.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("lrs: error: --from 'foo:bar': use saelens:RELEASE/ID")


@needs_saelens
def test_saelens_release_names_holding_slashes_split_on_the_known_release():
    from lrs.integrations.saes import parse_source

    assert parse_source("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre") == (
        "saelens", "gpt2-small-res-jb", "blocks.8.hook_resid_pre",
    )  # fmt: skip
    assert parse_source("saelens:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82") == (
        "saelens", "gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- sparsify


def _random_coder(d_in: int, n: int = 64, k: int = 4, seed: int = 0):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return coder.eval()


@needs_sparsify
def test_sparsify_checkpoint_imports_with_its_own_encode_and_decode(trained, tmp_path, capsys):
    from lrs.encoders import load_encoder

    coder = _random_coder(32)
    coder.save_to_disk(tmp_path / "ckpt" / "layers.1")  # sparsify's own format: one folder per hookpoint
    out = tmp_path / "sp.safetensors"
    argv = ["import-encoder", "--from", f"sparsify:{tmp_path / 'ckpt' / 'layers.1'}", "--out", str(out)]
    assert main([*argv, "--model", trained["model"]]) == 0
    assert "layer 1 from hook 'layers.1'" in capsys.readouterr().out
    enc = load_encoder(out)  # stored by value: no sparsify needed to load
    assert (enc.kind, enc.layer, enc.d_model, enc.n_latents, enc.k) == ("sparsify", 1, 32, 64, 4)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        top_acts, top_idx, pre_acts = coder.encode(x)
        assert torch.allclose(F.relu(enc.encode(x)), pre_acts, atol=1e-5)
        sparse = enc.encode(x, sparse=True)
        assert torch.allclose(sparse, torch.zeros(9, 64).scatter(-1, top_idx, top_acts), atol=1e-5)
        recon = enc.decode_delta(sparse, torch.zeros_like(sparse), x) + enc.b_dec
        assert torch.allclose(recon, coder.decode(top_acts, top_idx), atol=1e-4)
    # the checkpoint folder plus --hookpoint names the same coder; a disagreeing --layer is refused
    out2 = tmp_path / "sp2.safetensors"
    argv2 = [
        "import-encoder",
        "--from",
        f"sparsify:{tmp_path / 'ckpt'}",
        "--hookpoint",
        "layers.1",
        "--out",
        str(out2),
    ]
    assert main(argv2) == 0 and torch.equal(load_encoder(out2).W_enc, enc.W_enc)
    assert main([*argv2, "--layer", "0"]) == 2
    assert "use --layer 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- into steering


@pytest.mark.parametrize(
    "source", [pytest.param("saelens", marks=needs_saelens), pytest.param("sparsify", marks=needs_sparsify)]
)
def test_an_imported_sae_trains_a_reward_model_and_steers(source, trained, tmp_path, capsys):
    """Round trip: real library object -> its own saved format -> lrs import-encoder -> lrs train-reward on the
    run's traces -> LatentRewardSteerer on the tiny model, every live token steered."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrs.encoders import load_encoder
    from lrs.reward import load_reward_model
    from lrs.steering import LatentRewardSteerer, SteerConfig

    if source == "saelens":
        _random_saelens("topk", 32, "blocks.1.hook_resid_post").save_model(tmp_path / "sae")
        spec = f"saelens-dir:{tmp_path / 'sae'}"
    else:
        _random_coder(32).save_to_disk(tmp_path / "layers.1")
        spec = f"sparsify:{tmp_path / 'layers.1'}"
    enc_path, rm_path = tmp_path / "enc.safetensors", tmp_path / "rm.safetensors"
    assert main(["import-encoder", "--from", spec, "--out", str(enc_path), "--model", trained["model"]]) == 0
    argv = [
        "train-reward",
        *trained["common"],
        "--encoder",
        str(enc_path),
        "--out",
        str(rm_path),
        "--epochs",
        "1",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    enc, rm = load_encoder(enc_path), load_reward_model(rm_path)
    assert rm.n_latents == 64
    model = AutoModelForCausalLM.from_pretrained(trained["model"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["model"])
    steerer = LatentRewardSteerer(enc, rm, SteerConfig(gate="always", warmup=0, every=1, alpha=1.0))
    ids = tok(["Question: 2+2?"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(), steerer.apply(model, tok):
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    n_new = out.shape[1] - ids["input_ids"].shape[1]
    st = steerer.stats()
    assert st["steered_tokens"] == st["generated_steps"] == n_new - 1 > 0 and st["mean_dh_norm"] > 0


@needs_lm_eval
def test_exported_task_gives_lm_eval_the_prompts_outputs_and_grades_of_lrs_eval(trained, tmp_path):
    """`lrs export-task` + lm-eval's `--apply_chat_template`: the context lm-eval builds is the exact prompt
    string of `lrs eval`, greedy outputs are the same (batch 1: no padding on either side), and `acc` is the
    answer checker of `lrs eval`."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrs.evaluate import evaluate
    from lrs.grading import grade_one
    from lrs.tasks import build_prompts, load_task

    out = tmp_path / "tasks"
    assert main(["export-task", "--task", "arith", "--split", "test", "--limit", "4", "--max-gen-toks", "10",
                 "--out", str(out)]) == 0  # fmt: skip
    name = "lrs_arith_test"
    assert {p.name for p in out.iterdir()} == {f"{name}.yaml", f"{name}.jsonl", "lrs_grading.py"}
    res = lm_eval.simple_evaluate(
        model="hf", model_args=dict(pretrained=trained["model"], device="cpu", dtype="float32"),
        tasks=[name], task_manager=TaskManager(include_path=str(out), include_defaults=False), batch_size=1,
        apply_chat_template=True, log_samples=True, bootstrap_iters=0,
    )  # fmt: skip
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    problems = load_task("arith", "test", limit=4)
    model = AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(trained["model"])
    assert [s["arguments"][0][0] for s in samples] == build_prompts(tok, problems)
    ours = evaluate(model, tok, problems, max_new_tokens=10, batch_size=1, progress=False)
    assert [s["resps"][0][0] for s in samples] == [r["output"] for r in ours["records"]]
    assert res["results"][name]["acc,none"] == ours["summary"]["accuracy"]
    # the metric is lrs's checker: a right boxed answer, a wrong one, and a bare number (numeric fallback)
    sys.path.insert(0, str(out))
    try:
        from lrs_grading import process_results
    finally:
        sys.path.remove(str(out))
    doc = {"answer": problems[0].answer}
    for text in (f"so \\boxed{{{problems[0].answer}}}", "\\boxed{-1}", f"it is {problems[0].answer}"):
        assert process_results(doc, [text])["acc"] == float(grade_one(text, problems[0].answer).correct)
    assert process_results(doc, [f"\\boxed{{{problems[0].answer}}}"]) == {"acc": 1.0, "boxed": 1.0}
    assert process_results(doc, ["no answer"]) == {"acc": 0.0, "boxed": 0.0}


def test_export_task_refuses_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export-task", "--limit", "2", "--out", str(tmp_path / "file")]) == 2
    assert main(["export-task", "--limit", "2", "--name", "bad name", "--out", str(tmp_path / "t")]) == 2
    assert main(["export-task", "--limit", "2", "--max-gen-toks", "0", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("lrs: error: ") for e in err)
    assert not (tmp_path / "t").exists()

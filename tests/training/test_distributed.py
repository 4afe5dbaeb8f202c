"""The same ``attnfree train`` command under ``torchrun --nproc_per_node 2`` (gloo on CPU) sees the same global
batches as one process with twice the per-device batch: the logged losses agree."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from attnfree.training import TrainSettings, train

TINY = dict(hidden_size=32, n_heads=2, num_layers=2, block_size=32, max_steps=6, log_every=1, progress=False)


def test_two_processes_match_one(data_dir, tmp_path, monkeypatch):
    text = tmp_path / "small.txt"
    text.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    env = {**os.environ, "ATTNFREE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attnfree.cli", "train", "--data", str(text), *flags, "--batch-size", "2", "--no-progress",
           "--output-dir", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout ends the workers too
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == 6

    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(TrainSettings(data=str(text), batch_size=4, output_dir=str(tmp_path / "one"), **TINY))
    finally:
        torch.set_num_threads(threads)
    assert one.world_size == 1 and one.tokens_trained == two["tokens_trained"]
    assert [h["loss"] for h in two["train_history"]] == pytest.approx([h["loss"] for h in one.train_history],
                                                                       abs=1e-4)
    assert two["bpc"] == pytest.approx(one.bpc, abs=1e-4)

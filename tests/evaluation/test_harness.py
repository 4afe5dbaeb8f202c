"""The real lm-evaluation-harness on a trained checkpoint: its bits_per_byte equals ``attnfree eval``'s BPC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnfree.data import load_corpus
from attnfree.evaluation.bpc import evaluate_checkpoint
from attnfree.evaluation.harness import write_text_task
from attnfree.training import TrainSettings, train

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir: Path) -> tuple[Path, Path]:
    """A fastformer trained briefly on 30,000 characters of Tiny Shakespeare (ASCII: one byte per character)."""
    root = tmp_path_factory.mktemp("harness")
    text = root / "text.txt"
    text.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:30_000])
    settings = TrainSettings(model="fastformer", data=str(text), hidden_size=32, n_heads=4, num_layers=2,
                             block_size=32, batch_size=8, max_steps=30, lr=3e-3, output_dir=str(root / "run"),
                             progress=False, log_every=10)
    train(settings)
    return root / "run", text


def test_lm_eval_bits_per_byte_equals_attnfree_bpc(run_dir: tuple[Path, Path], tmp_path: Path) -> None:
    run, text = run_dir
    ours = evaluate_checkpoint(run, data=str(text))  # the validation split: the last 10% of the file
    valid = load_corpus(str(text)).valid_text
    assert valid.isascii()
    write_text_task(valid, tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={run},trust_remote_code=True", "--tasks", "attnfree_text", "--include_path",
               str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    theirs = results["results"]["attnfree_text"]["bits_per_byte,none"]
    assert abs(theirs - ours.bpc) < 1e-4, (theirs, ours.bpc)


def test_a_task_needs_text_and_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        write_text_task("", tmp_path)
    with pytest.raises(ValueError, match="identifier"):
        write_text_task("text", tmp_path, name="bad name")

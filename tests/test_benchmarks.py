"""Each benchmark script as the lead runs it (``python -m benchmarks.<name> --quick``): exit code, JSON, plot."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (keys every measured row has, positive numbers among them)
EXPECTED = {
    "train_throughput": ({"model", "T", "batch", "tokens_per_s", "step_s", "peak_rss_mib", "delta_rss_mib"},
                         ("tokens_per_s", "step_s", "peak_rss_mib")),
    "decode": ({"model", "path", "context", "batch", "per_token_ms", "tokens_per_s", "floor_ms", "vs_floor",
                "cache_kib", "peak_rss_mib", "delta_rss_mib", "prefill_s"},
               ("per_token_ms", "tokens_per_s", "floor_ms", "vs_floor", "cache_kib", "peak_rss_mib")),
    "ops": ({"shape", "mode", "additive_ms", "correlation_ms", "cumsum_ms", "sdpa_ms", "additive/cumsum",
             "additive/sdpa", "correlation/cumsum", "correlation/sdpa"},
            ("additive_ms", "correlation_ms", "cumsum_ms", "sdpa_ms", "additive/cumsum", "correlation/sdpa")),
    "local_attention": ({"op", "T", "batch", "ms", "tokens_per_s", "vs_sdpa"}, ("ms", "tokens_per_s", "vs_sdpa")),
    "utilization": ({"model", "T", "batch", "n_matmul", "gflop_per_token", "tokens_per_s", "gflop_per_s", "mfu",
                     "meets_target"}, ("n_matmul", "gflop_per_token", "tokens_per_s", "gflop_per_s", "mfu")),
    "precision": ({"model", "precision", "seed", "bpc", "final_loss", "tokens_per_s", "train_seconds", "steps",
                   "finite"}, ("bpc", "tokens_per_s", "train_seconds")),
}


PROVENANCE = {"python", "torch", "transformers", "attnfree", "git_commit", "git_dirty"}


def run_quick(name: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|---|" in done.stdout  # the markdown table
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick_run_writes_sane_json_and_plot(name, tmp_path):
    out = tmp_path / f"{name}.json"
    payload = run_quick(name, out)
    assert out.with_suffix(".png").stat().st_size > 0
    assert {"machine", "rows", "provenance"} <= payload.keys()
    assert PROVENANCE <= payload["provenance"].keys()
    keys, positive = EXPECTED[name]
    rows = [r for r in payload["rows"] if "note" not in r]  # skipped points carry a note instead of numbers
    assert rows, payload["rows"]
    for row in rows:
        assert keys <= row.keys(), f"{name}: missing {keys - row.keys()} in {row}"
        for key in positive:
            assert math.isfinite(row[key]) and row[key] > 0, f"{name}: {key} = {row[key]} in {row}"
    if name == "ops":  # the windowed pooling's table beside the global one
        windowed = payload["windowed_rows"]
        assert [r["window"] for r in windowed][0] == "global" and len(windowed) > 1
        assert all(r["tokens_per_s"] > 0 and r["vs_global"] > 0 for r in windowed)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is here: make gpu-check runs for real")
def test_gpu_check_without_a_gpu_says_so_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1 and "no CUDA GPU" in done.stdout


def test_gpu_check_steps_run_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    """The GPU window is short: every step of the check (ops, training, decoding) is exercised here first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GPU_CHECK_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert PROVENANCE <= set(result["provenance"])
    for step, key in (("ops", "sdpa_flash_ms"), ("train", "tokens_per_s"), ("decode", "per_token_ms")):
        assert result[step] and all(math.isfinite(r[key]) and r[key] > 0 for r in result[step]), result[step]
    assert {r["model"] for r in result["train"]} == {"fastformer", "gpt2"}
    assert sum(line.startswith("|---|") for line in (tmp_path / "gpu_check.md").read_text().splitlines()) == 3


def test_training_step_breakdown_adds_up(tmp_path: Path) -> None:
    """--breakdown-at splits a step into parts (mixer, FFN, norms, embedding, head, optimizer, other) per model."""
    out = tmp_path / "tt.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--quick", "--threads", "1", "--models",
           "fastformer,gpt2", "--breakdown-at", "64", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Full backward hook" not in done.stderr
    parts = json.loads(out.read_text())["breakdown"]
    assert [r["model"] for r in parts] == ["fastformer", "gpt2"]
    for row in parts:
        shares = [row[f"{p}_pct"] for p in ("mixer", "ffn", "norms", "embedding", "head", "optimizer", "other")]
        assert math.isclose(sum(shares), 100.0, abs_tol=1e-6), row
        assert all(row[f"{p}_pct"] > 0 for p in ("mixer", "ffn", "head", "optimizer")), row


def test_option_costs_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "options.json"
    cmd = [sys.executable, "-m", "benchmarks.options", "--specs", "fastformer,fastformer:bonus=true,gpt2", "--width",
           "32", "--heads", "2", "--layers", "1", "--repeats", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["spec"] for r in rows] == ["fastformer", "fastformer:bonus=true", "gpt2"]
    assert rows[0]["vs_first"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[2]["state_bytes"] == 2 * 1 * 64 * 32 * 4  # GPT-2's KV cache after 64 tokens: K and V, 1 layer, fp32
    assert rows[0]["state_bytes"] == rows[1]["state_bytes"] < rows[2]["state_bytes"]


@pytest.mark.slow
def test_decode_step_side_by_side_with_onnx(tmp_path: Path) -> None:
    """(slow: exports a seed-size model)"""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ds.json"
    cmd = [sys.executable, "-m", "benchmarks.decode_step", "--models", "fastformer", "--batches", "1", "--context",
           "16", "--repeats", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert all(row[k] > 0 for k in ("torch_ms", "torch_plain_head_ms", "onnx_ms", "torch_vs_onnx"))


def test_step_ab_times_the_tree_on_the_path():
    """benchmarks.step_ab as an A/B between worktrees runs it: one JSON line per model, from this tree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "benchmarks.step_ab", "--models", "leviathan,fastformer", "--seq-len", "32",
           "--steps", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["model"] for line in lines] == ["leviathan", "fastformer"]
    assert all(line["tree"] == str(ROOT) and len(line["times"]) == 2 and line["tokens_per_s"] > 0 for line in lines)

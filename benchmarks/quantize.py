"""int8 dynamic quantization: file size, decode speed and BPC of fp32/int8 PyTorch and fp32/int8 ONNX.

    python -m benchmarks.quantize --checkpoints runs/a,runs/b [--out runs/bench/quantize.json]
        [--batches 1,16] [--new-tokens 64] [--eval-chars 0] [--threads 1] [--export-dir DIR] [--quick]

For each trained checkpoint (a run folder of ``attnfree train``), four variants:

- torch-fp32: the checkpoint as trained; size = its model.safetensors.
- torch-int8: ``attnfree.export.quantize_dynamic_int8`` (every nn.Linear int8, activations quantized per call);
  size = the quantized state_dict saved with torch.save.
- onnx-fp32 / onnx-int8: ``attnfree export --quantize int8`` (onnxruntime's ``quantize_dynamic`` on MatMul/Gemm
  weights) run by ``attnfree.inference.runtime.OnnxLM``; size = the step and prefill graphs with the weights they
  use (``deployed_bytes``: shared weights count once); the step graph alone with its weights in ``step_mb``.

Decode speed: greedy, a prompt of 8 tokens per row, then ``--new-tokens`` tokens; tokens/s counts the steps after
the first token (prefill excluded), B tokens per step; the median of ``--repeats`` runs. BPC: the validation split
(the whole split, or its first ``--eval-chars`` characters), non-overlapping windows of the run's block size with
BOS first (``evaluate_bpc``'s protocol; the ONNX variants score through the scoring graph's ``all_logits``).
Threads: torch and onnxruntime both get ``--threads``. ``--quick`` builds a tiny random fastformer-conv instead of
reading checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnfree.checkpoints import load_checkpoint
from attnfree.data import ByteTokenizer, TextTokenizer, load_corpus
from attnfree.evaluation.bpc import evaluate_bpc
from attnfree.inference.decoding import stream_generate
from attnfree.inference.export import deployed_bytes, export_onnx, quantize_dynamic_int8
from attnfree.inference.runtime import OnnxLM
from attnfree.inference.runtime import Sampling as NpSampling
from attnfree.inference.sampling import Sampling
from attnfree.models.registry import ModelSize, build_model
from benchmarks.common import Row, ints, print_table, write_json

MB = 1024 * 1024


def _tokens_per_s(times: list[float], batch: int) -> float:
    """times: wall clock at each yielded token; the steps after the first token, B tokens each."""
    return batch * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def torch_speed(model: nn.Module, vocab: int, batch: int, new_tokens: int) -> float:
    prompt = torch.randint(0, min(vocab, 256), (batch, 8), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in stream_generate(model, prompt, new_tokens, Sampling(greedy=True)):
        times.append(time.perf_counter())
    return _tokens_per_s(times, batch)


def onnx_speed(lm: OnnxLM, batch: int, new_tokens: int) -> float:
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, min(lm.vocab_size, 256), (batch, 8)).tolist()
    times = []
    for _ in lm.generate_ids(prompts, new_tokens, NpSampling(greedy=True)):
        times.append(time.perf_counter())
    return _tokens_per_s(times, batch)


def torch_size(model: nn.Module, folder: Path) -> float:
    path = folder / "state_dict.pt"
    torch.save(model.state_dict(), path)
    return path.stat().st_size / MB


def measure(name: str, model: nn.Module, tokenizer: TextTokenizer, size_mb: float, export_dir: Path, text: str,
            block: int, args: argparse.Namespace) -> list[Row]:
    """The four variants of one model: size, tokens/s per batch, BPC."""
    tokens = tokenizer.encode(text)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="quantize-bench-"))
    int8 = quantize_dynamic_int8(model)
    for variant, m, size in (("torch-fp32", model, size_mb), ("torch-int8", int8, torch_size(int8, work))):
        row: Row = {"model": name, "variant": variant, "size_mb": size}
        for b in args.batch_list:
            row[f"tok_s_b{b}"] = statistics.median(
                [torch_speed(m, tokenizer.vocab_size, b, args.new_tokens) for _ in range(args.repeats)])
        row["bpc"] = evaluate_bpc(m, torch.tensor(tokens), len(text), block, batch_size=16,
                                  bos_token_id=tokenizer.bos_token_id).bpc
        rows.append(row)
    for variant, quantized in (("onnx-fp32", False), ("onnx-int8", True)):
        lm = OnnxLM.load(export_dir, quantized=quantized, threads=args.threads)
        files = [lm.manifest["graphs"][g + (".int8" if quantized else "")] for g in ("step", "prefill")]
        row = {"model": name, "variant": variant, "size_mb": deployed_bytes(export_dir, files) / MB,
               "step_mb": deployed_bytes(export_dir, files[:1]) / MB}
        for b in args.batch_list:
            row[f"tok_s_b{b}"] = statistics.median(
                [onnx_speed(lm, b, args.new_tokens) for _ in range(args.repeats)])
        row["bpc"] = lm.score(tokens, block, batch_size=16)[0] / len(text) / math.log(2)
        rows.append(row)
    base = rows[0]["bpc"]
    for row in rows:
        row["bpc_change"] = row["bpc"] - base
    return rows


def _block_size(folder: Path, model: nn.Module) -> int:
    run = folder / "run.json"
    if run.is_file():
        return int(json.loads(run.read_text())["settings"]["block_size"])
    return int(getattr(model.config, "n_positions", 64))


def plot(path: Path, rows: list[Row], batches: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["size_mb", *(f"tok_s_b{b}" for b in batches), "bpc"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    width = 0.8 / len(variants)
    for ax, key in zip(axes[0], panels):
        for j, variant in enumerate(variants):
            values = [next((r[key] for r in rows if r["model"] == m and r["variant"] == variant), 0) for m in models]
            ax.bar(np.arange(len(models)) + j * width, values, width, label=variant)
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, fontsize=8)
        ax.set_title(key)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("int8 dynamic quantization: PyTorch and onnxruntime")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="", help="comma-separated run folders")
    parser.add_argument("--out", default="runs/bench/quantize.json")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per point (median)")
    parser.add_argument("--eval-chars", type=int, default=0, help="score the first N validation characters (0: all)")
    parser.add_argument("--export-dir", default=None, help="where the ONNX exports go (default: beside --out)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="tinyshakespeare")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, 2000 characters, 8 tokens")
    args = parser.parse_args(argv)
    args.batch_list = ints(args.batches)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    text = load_corpus(args.data).valid_text
    if args.quick:
        args.new_tokens, args.eval_chars, args.batch_list, args.repeats = 8, 2000, [1, 4], 1
    text = text[: args.eval_chars] if args.eval_chars else text
    # 1. the models: trained checkpoints, or one tiny random model
    entries: list[tuple[str, nn.Module, TextTokenizer, float, int]] = []
    if args.quick:
        torch.manual_seed(0)
        tok: TextTokenizer = ByteTokenizer()
        m: nn.Module = build_model("fastformer-conv", ModelSize(32, 2, 2, 64), tok).eval()
        entries.append(("fastformer-conv(tiny)", m, tok, float("nan"), 64))
    for folder in (Path(p) for p in args.checkpoints.split(",") if p.strip()):
        model: nn.Module
        model, tok = load_checkpoint(folder)  # type: ignore[assignment]
        size = (folder / "model.safetensors").stat().st_size / MB
        entries.append((folder.name, model, tok, size, _block_size(folder, model)))
    if not entries:
        raise SystemExit("give --checkpoints or --quick")
    # 2. export each, then measure the four variants
    rows: list[Row] = []
    for name, model, tok, size, block in entries:
        root = Path(args.export_dir) if args.export_dir else out.parent / (out.stem + "-onnx")
        export_dir = root / name.replace("(", "-").replace(")", "")
        export_onnx(model, tok, export_dir, quantize="int8")
        if math.isnan(size):
            size = torch_size(model, Path(tempfile.mkdtemp(prefix="quantize-bench-")))
        rows += measure(name, model, tok, size, export_dir, text, block, args)
        print(f"{name}: done", flush=True)
    columns = ["model", "variant", "size_mb", "step_mb", *(f"tok_s_b{b}" for b in args.batch_list), "bpc",
               "bpc_change"]
    table = print_table(rows, columns)
    payload: dict[str, Any] = {"threads": args.threads, "new_tokens": args.new_tokens, "eval_chars": len(text),
                               "batches": args.batch_list, "rows": rows, "table": table}
    path = write_json(out, payload)
    plot(path.with_suffix(".png"), rows, args.batch_list)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


if __name__ == "__main__":
    main()

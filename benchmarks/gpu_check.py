"""One command for a short GPU window: the CUDA tests of both kernels, then a compact benchmark, in minutes.

    make gpu-check                                  # = python -m benchmarks.gpu_check
    GPU_CHECK_DIR=runs/gpu-check python -m benchmarks.gpu_check [--skip-tests] [--device cuda]

Without a CUDA GPU it says so in one line and exits 0. With one, it

1. runs the kernels' test files (``tests/ops/test_additive_triton.py``, ``tests/ops/test_correlation_triton.py``:
   the compiled kernels against the PyTorch forms, values and gradients, float32 and bfloat16);
2. times forward + backward of the two token-mixing ops (the dispatcher's choice: the Triton kernels on CUDA)
   against causal SDPA restricted to flash attention, bfloat16, [B, T, 8, 64] at T = 1k, 4k, 16k, 64k with
   B = max(1, 16384 / T);
3. times training tokens/s (forward, backward, AdamW; bfloat16 autocast) of fastformer against GPT-2 (SDPA) at the
   seed size (vocabulary 32,100) and at byte level (vocabulary 256), T = 2048 and 16384, 16,384 tokens per batch;
4. times greedy decoding at batch 1 after a 4,096-token prompt: ms per token of fastformer (``stream_generate``)
   and GPT-2 (``generate`` with its KV cache);

and writes ``gpu_check.json`` and ``gpu_check.md`` (every table) under ``$GPU_CHECK_DIR`` (default
``runs/gpu-check``). A failing step is recorded with its error and the next one still runs; the exit code is 1 if
the tests failed or any step broke. ``--device cpu --quick`` runs steps 2-4 at toy sizes on the CPU: how the tests
keep this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from attnfree.inference.decoding import stream_generate
from attnfree.inference.sampling import Sampling
from attnfree.ops.additive import additive_pool
from attnfree.ops.correlation import LagSet, correlation, make_lags
from benchmarks.common import Row, Sizes, build, print_table, training_setup, write_json
from benchmarks.ops import _causal_sdpa, forward_backward

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ("tests/ops/test_additive_triton.py", "tests/ops/test_correlation_triton.py")
BYTE = Sizes(hidden_size=256, n_heads=4, num_layers=4, vocab_size=256, tokens=16384)


@dataclass(frozen=True)
class Plan:
    """The sizes of one check (``FULL`` on a GPU, ``QUICK`` to exercise the code on a CPU)."""

    op_seq_lens: tuple[int, ...] = (1024, 4096, 16384, 65536)
    op_tokens: int = 16384  # B = max(1, op_tokens / T)
    op_heads: int = 8
    op_head_dim: int = 64
    train_seq_lens: tuple[int, ...] = (2048, 16384)
    train_sizes: tuple[tuple[str, Sizes], ...] = (("seed", Sizes()), ("byte", BYTE))
    decode_context: int = 4096
    decode_tokens: int = 32
    repeats: int = 10


FULL = Plan()
QUICK = Plan(op_seq_lens=(64, 256), op_tokens=256, op_heads=2, op_head_dim=16, train_seq_lens=(64,),
             train_sizes=(("seed", Sizes(64, 2, 2, 1024, 256)), ("byte", Sizes(64, 2, 2, 256, 256))),
             decode_context=64, decode_tokens=4, repeats=2)


# ----------------------------------------------------------------------------------------------
# Timing on any device
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, the device synchronised around every call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ----------------------------------------------------------------------------------------------
# 1. the kernels' tests
# ----------------------------------------------------------------------------------------------

def kernel_tests() -> Row:
    """pytest on the kernel test files in a subprocess: its summary line, exit code and duration."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                          cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {"step": "kernel tests", "passed": done.returncode == 0, "summary": lines[-1] if lines else "",
            "seconds": time.perf_counter() - start, **({} if done.returncode == 0 else {"log": done.stdout[-4000:]})}


# ----------------------------------------------------------------------------------------------
# 2. the ops against flash attention
# ----------------------------------------------------------------------------------------------

def op_times(shape: tuple[int, int, int, int], device: torch.device, repeats: int) -> dict[str, float]:
    """fwd+bwd ms of additive pooling, correlation (J = 4, the default lag set) and causal SDPA at one shape."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def randn(*size: int) -> Tensor:
        return torch.randn(size, device=device, dtype=dtype, requires_grad=True)

    spec = LagSet(tuple(make_lags(32, shape[1]).tolist()), 4)
    ops: dict[str, tuple[Callable[..., Tensor], list[Tensor]]] = {
        "additive": (lambda x, s: additive_pool(x, s)[0], [randn(*shape), randn(*shape[:3])]),
        "correlation": (lambda q, k, v: correlation(q, k, v, spec)[0], [randn(*shape) for _ in range(3)]),
        "sdpa_flash": (_causal_sdpa, [randn(*shape) for _ in range(3)])}
    flash = nullcontext()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        flash = cast(Any, sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    with flash:
        return {f"{name}_ms": median_ms(forward_backward(inputs, op), device, repeats)
                for name, (op, inputs) in ops.items()}


def op_rows(plan: Plan, device: torch.device) -> list[Row]:
    """The ops against flash attention on [B, T, H, D] (bfloat16 on CUDA) at every T of the plan."""
    rows = []
    for T in plan.op_seq_lens:
        shape = (max(1, plan.op_tokens // T), T, plan.op_heads, plan.op_head_dim)
        ms = op_times(shape, device, plan.repeats)
        rows.append({"B": shape[0], "T": T, "H": shape[2], "D": shape[3],
                     "dtype": "bfloat16" if device.type == "cuda" else "float32", **ms,
                     "additive/sdpa": ms["additive_ms"] / ms["sdpa_flash_ms"],
                     "correlation/sdpa": ms["correlation_ms"] / ms["sdpa_flash_ms"]})
    return rows


# ----------------------------------------------------------------------------------------------
# 3. training throughput, 4. decoding
# ----------------------------------------------------------------------------------------------

def train_step_ms(name: str, sizes: Sizes, T: int, device: torch.device, repeats: int) -> tuple[int, float]:
    """(batch, median ms) of one training step (forward, backward, AdamW) at [tokens / T, T]."""
    model, opt, ids = training_setup(name, sizes, T, device)

    def step() -> None:
        with autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return ids.shape[0], median_ms(step, device, repeats)


def train_rows(plan: Plan, device: torch.device) -> list[Row]:
    """Training tokens/s of fastformer and GPT-2 at each size and T (batch = tokens / T)."""
    rows = []
    for preset, sizes in plan.train_sizes:
        for T in plan.train_seq_lens:
            speed = {}
            for name in ("fastformer", "gpt2"):
                batch, ms = train_step_ms(name, sizes, T, device, max(3, plan.repeats // 2))
                speed[name] = batch * T / ms * 1e3
                rows.append({"preset": preset, "vocab": sizes.vocab_size, "model": name, "T": T, "batch": batch,
                             "step_ms": ms, "tokens_per_s": speed[name]})
            rows[-2]["vs_gpt2"] = speed["fastformer"] / speed["gpt2"]
    return rows


def decode_rows(plan: Plan, device: torch.device) -> list[Row]:
    """ms per new token at batch 1 after a ``decode_context``-token prompt, greedy, at the seed size."""
    sizes = plan.train_sizes[0][1]
    rows = []
    for name in ("fastformer", "gpt2"):
        torch.manual_seed(0)
        positions = plan.decode_context + plan.decode_tokens
        overrides = None if name == "gpt2" else {"position_embedding_type": "none"}
        model = cast(Any, build(name, sizes, positions, overrides)).to(device).eval()
        prompt = torch.randint(2, sizes.vocab_size, (1, plan.decode_context), device=device)
        stamps = [time.perf_counter()]
        with torch.inference_mode(), autocast(device):
            if name == "gpt2":
                out = cast(Any, model).generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                max_new_tokens=plan.decode_tokens, min_new_tokens=plan.decode_tokens,
                                                pad_token_id=0, streamer=_Stamps(stamps, device))
                del out
            else:
                for token in stream_generate(model, prompt, plan.decode_tokens, Sampling(greedy=True)):
                    token.tolist()  # waits for the step, as a client would
                    stamps.append(time.perf_counter())
        per_token = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))
        rows.append({"model": name, "context": plan.decode_context, "batch": 1, "per_token_ms": per_token * 1e3,
                     "prefill_s": stamps[1] - stamps[0]})
    return rows


class _Stamps:
    """A ``generate`` streamer that stamps the prompt and every new token (after the device finishes it)."""

    def __init__(self, stamps: list[float], device: torch.device):
        self.stamps, self.device = stamps, device
        self.seen_prompt = False

    def put(self, value: Tensor) -> None:
        if not self.seen_prompt:  # the first put is the prompt itself
            self.seen_prompt = True
            return
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------

TABLES = {"ops": ["B", "T", "H", "D", "dtype", "additive_ms", "correlation_ms", "sdpa_flash_ms", "additive/sdpa",
                  "correlation/sdpa"],
          "train": ["preset", "vocab", "model", "T", "batch", "step_ms", "tokens_per_s", "vs_gpt2"],
          "decode": ["model", "context", "batch", "per_token_ms", "prefill_s"]}


def run_check(plan: Plan, device: torch.device, out_dir: Path, skip_tests: bool) -> int:
    """Every step in turn (a broken step is recorded and the next runs); the JSON and tables; the exit code."""
    started = time.perf_counter()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "plan": {k: v for k, v in plan.__dict__.items() if k != "train_sizes"}}
    failed = False
    if not skip_tests:
        results["tests"] = kernel_tests()
        failed = not results["tests"]["passed"]
        print(f"kernel tests: {results['tests']['summary']}", flush=True)
    markdown = [f"# gpu-check on {results['device']}", ""]
    steps: dict[str, Callable[[Plan, torch.device], list[Row]]] = {"ops": op_rows, "train": train_rows,
                                                                     "decode": decode_rows}
    for name, step in steps.items():
        try:
            results[name] = step(plan, device)
            markdown += [f"## {name}", "", print_table(results[name], TABLES[name]), ""]
        except Exception as error:  # keep going: one broken step must not cost the window's other figures
            failed = True
            results[name] = [{"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]}]
            print(f"{name}: failed: {type(error).__name__}: {error}", flush=True)
            markdown += [f"## {name}", "", f"failed: {type(error).__name__}: {error}", ""]
    results["seconds"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "gpu_check.json", results)
    (out_dir / "gpu_check.md").write_text("\n".join(markdown))
    print(f"gpu-check: {'FAILED' if failed else 'ok'} in {results['seconds']:.0f} s; wrote {out_dir}/gpu_check.json"
          f" and gpu_check.md")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --quick to try the script")
    parser.add_argument("--quick", action="store_true", help="toy sizes (with --device cpu: under a minute)")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--out-dir", default=os.environ.get("GPU_CHECK_DIR", "runs/gpu-check"),
                        help="where gpu_check.json and gpu_check.md go (default: $GPU_CHECK_DIR or runs/gpu-check)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU visible to torch {torch.__version__}: nothing to check here.")
        return
    plan = replace(QUICK) if args.quick else FULL
    sys.exit(run_check(plan, torch.device(args.device), Path(args.out_dir), args.skip_tests or args.device == "cpu"))


if __name__ == "__main__":
    main()

"""Forward+backward time of correlation_parallel against causal SDPA on the same [B, T, H, D].

    python benchmarks/bench_correlation.py [--out runs/bench_correlation.json] [--repeats 7] [--device cuda]

With ``--device cuda`` the Triton kernels (``correlation_triton``, J = 4) run beside them; on the CPU that
variant is skipped (the kernels need a GPU).

Prints a table of medians (ms) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnfree.ops.backend import use_kernel_backend
from attnfree.ops.correlation import LagSet, correlation, correlation_parallel, make_lags
from benchmarks.common import write_json

SHAPES = [(4, 1024, 4, 64), (1, 4096, 4, 64)]  # [B, T, H, D]


def _time_ms(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and min wall time (ms) of each fn, run round-robin so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(ts), "min_ms": min(ts)} for name, ts in times.items()}


Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fwd_bwd(op: Op, shape: tuple[int, ...], device: str = "cpu") -> Callable[[], None]:
    """A closure running op forward and backward on fresh leaves of the given shape (waits for the GPU)."""
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device=device)

    def run() -> None:
        op(q, k, v).backward(do)
        for x in (q, k, v):
            x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention on [B, T, H, D] (SDPA wants [B, H, T, D])."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _correlation(segment: int) -> Op:
    """correlation_parallel with the default lag set make_lags(32, 1024) and segment length J."""
    spec = LagSet(tuple(make_lags(32, 1024).tolist()), segment)
    return lambda q, k, v: correlation_parallel(q, k, v, spec)[0]


def _correlation_triton(segment: int) -> Op:
    """The Triton kernels through the dispatcher, forced (an error, not a silent fallback, if they cannot run)."""
    spec = LagSet(tuple(make_lags(32, 1024).tolist()), segment)

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with use_kernel_backend("triton"):
            return correlation(q, k, v, spec)[0]

    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_correlation.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = {"sdpa_causal": _sdpa, "correlation_J4": _correlation(4), "correlation_J1": _correlation(1)}
    if args.device == "cuda":
        ops["triton_J4"] = _correlation_triton(4)
    else:
        print("triton_J4: skipped (the Triton kernels need --device cuda)")
    rows = []
    print(f"fwd+bwd wall time, median (min) of {args.repeats} runs in ms, {args.threads} threads")
    print(f"{'[B, T, H, D]':>18} " + " ".join(f"{name:>18}" for name in ops))
    for shape in SHAPES:
        timings = _time_ms({name: _fwd_bwd(op, shape, args.device) for name, op in ops.items()}, args.repeats)
        rows.append({"shape": list(shape), "device": args.device, "threads": args.threads, **timings})
        cells = (f"{t['median_ms']:8.1f} ({t['min_ms']:6.1f})" for t in timings.values())
        print(f"{str(list(shape)):>18} " + " ".join(f"{c:>18}" for c in cells))
    print(f"wrote {write_json(args.out, {'rows': rows})}")


if __name__ == "__main__":
    main()

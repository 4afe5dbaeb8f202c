"""Token-mixing ops alone: causal additive attention and the correlation op against two floors on the same
[B, T, H, D], forward and forward + backward.

    python -m benchmarks.ops [--quick] [--out runs/bench/ops.json] [--repeats 9] [--threads 2]

Floors: ``torch.cumsum`` along T (the memory-bound least a causal running sum costs) and causal
``F.scaled_dot_product_attention`` (softmax attention, O(T^2)). Shapes: [4, 1024, 4, 64], then a T sweep
256 .. 8192 with B = clamp(4096 / T, 1, 4). The four ops run round-robin, medians reported.

A third table (under "windowed_rows") times windowed additive pooling (``ops.windowed``) against the global pooling
side by side, forward + backward at [1, 4096, 4, 64], for windows k = 4 .. 1024: training tokens/s and the
ratio windowed / global (issue 20's target: within 1.2x for every k). "windowed_stability" gives, for scores of
std 3, 30 and 1e4 in float32, how far LEAP's difference of prefix sums (without a max, and with one max) and our
form land from the float64 reference (docs/fastformer.md, "Windowed pooling").

On a machine with CUDA (skipped otherwise) a second table times the additive op's Triton kernels against its
PyTorch form and SDPA's flash attention (bfloat16, [B, T, 8, 64], T = 1024 .. 16384, B = 16384 / T), written
under "cuda_rows" in the same JSON.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.additive import additive_pool_parallel
from attnfree.ops.correlation import LagSet, correlation_parallel, make_lags
from attnfree.ops.windowed import WindowOptions, windowed_pool_naive, windowed_pool_parallel
from benchmarks.common import Row, plot_lines, print_table, round_robin, write_json

Shape = tuple[int, int, int, int]  # [B, T, H, D]
SHAPE: Shape = (4, 1024, 4, 64)
SWEEP: list[Shape] = [(min(4, max(1, 4096 // t)), t, 4, 64) for t in (256 * 2**i for i in range(6))]
QUICK_SHAPES: list[Shape] = [(2, 64, 2, 16), (1, 256, 2, 16)]
OURS, FLOORS = ("additive", "correlation"), ("cumsum", "sdpa")


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention on [B, T, H, D] (SDPA wants [B, H, T, D])."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


Op = tuple[list[Tensor], Callable[..., Tensor]]  # fresh leaf inputs, and the op as a function of them


def _additive(shape: Shape) -> Op:  # x [B, T, H, D], scores [B, T, H]
    return [torch.randn(shape), torch.randn(shape[:3])], lambda x, s: additive_pool_parallel(x, s)[0]


def _correlation(shape: Shape) -> Op:  # q, k, v [B, T, H, D], the default lag set make_lags(32, T), J = 4
    spec = LagSet(tuple(make_lags(32, shape[1]).tolist()), 4)
    return [torch.randn(shape) for _ in range(3)], lambda q, k, v: correlation_parallel(q, k, v, spec)[0]


def _cumsum(shape: Shape) -> Op:
    return [torch.randn(shape)], lambda x: x.cumsum(1)


def _sdpa(shape: Shape) -> Op:
    return [torch.randn(shape) for _ in range(3)], _causal_sdpa


def _cuda_randn(*shapes: tuple[int, ...]) -> list[Tensor]:
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in shapes]


def _cuda_ops(shape: Shape) -> dict[str, Op]:
    """Triton kernel, PyTorch form and flash attention on the same bfloat16 CUDA shape."""
    from attnfree.ops.additive.triton import additive_pool_triton

    return {"additive_triton": (_cuda_randn(shape, shape[:3]), lambda x, s: additive_pool_triton(x, s)[0]),
            "additive_torch": (_cuda_randn(shape, shape[:3]), lambda x, s: additive_pool_parallel(x, s)[0]),
            "sdpa_flash": (_cuda_randn(shape, shape, shape), _causal_sdpa)}


def _synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def measure_cuda(shape: Shape, mode: str, repeats: int) -> Row:
    """Median ms on the GPU of the Triton kernel, the PyTorch form and flash attention (SDPA)."""
    fns = {name: _synced(MODES[mode](*op)) for name, op in _cuda_ops(shape).items()}
    ms = {f"{name}_ms": s * 1e3 for name, s in round_robin(fns, repeats).items()}
    ratios = {"triton/sdpa_flash": ms["additive_triton_ms"] / ms["sdpa_flash_ms"],
              "triton/torch": ms["additive_triton_ms"] / ms["additive_torch_ms"]}
    return {"shape": list(shape), "T": shape[1], "mode": mode, **ms, **ratios}


CUDA_SWEEP: list[Shape] = [(max(1, 16384 // t), t, 8, 64) for t in (1024, 2048, 4096, 8192, 16384)]


def cuda_table(repeats: int) -> list[Row]:
    """The GPU comparison, SDPA restricted to its flash-attention kernel; [] without CUDA."""
    if not torch.cuda.is_available():
        print("no CUDA: the Triton kernel comparison is skipped")
        return []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        rows = [measure_cuda(shape, mode, repeats) for shape in CUDA_SWEEP for mode in MODES]
    print_table(rows, ["shape", "mode", "additive_triton_ms", "additive_torch_ms", "sdpa_flash_ms",
                       "triton/sdpa_flash", "triton/torch"])
    return rows


OPS: dict[str, Callable[[Shape], Op]] = {"additive": _additive, "correlation": _correlation, "cumsum": _cumsum,
                                         "sdpa": _sdpa}


def forward(inputs: list[Tensor], op: Callable[..., Tensor]) -> Callable[[], Any]:
    def run() -> None:
        with torch.no_grad():
            op(*inputs)

    return run


def forward_backward(inputs: list[Tensor], op: Callable[..., Tensor]) -> Callable[[], Any]:
    """op forward, then backward of a fixed random upstream gradient into every input."""
    for x in inputs:
        x.requires_grad_(True)
    grad = torch.randn_like(op(*inputs))

    def run() -> None:
        op(*inputs).backward(grad)
        for x in inputs:
            x.grad = None

    return run


MODES = {"fwd": forward, "fwd+bwd": forward_backward}


def measure(shape: Shape, mode: str, repeats: int) -> Row:
    """Median ms of all four ops at shape, round-robin, plus ours / floor ratios."""
    fns = {name: MODES[mode](*OPS[name](shape)) for name in OURS + FLOORS}
    ms = {f"{name}_ms": s * 1e3 for name, s in round_robin(fns, repeats).items()}
    ratios = {f"{ours}/{floor}": ms[f"{ours}_ms"] / ms[f"{floor}_ms"] for ours in OURS for floor in FLOORS}
    return {"shape": list(shape), "B": shape[0], "T": shape[1], "mode": mode, **ms, **ratios}


WINDOW_SHAPE: Shape = (1, 4096, 4, 64)
WINDOWS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_WINDOWS: tuple[Shape, tuple[int, ...]] = ((1, 128, 2, 16), (4, 64))


def _windowed(shape: Shape, k: int) -> Op:  # x [B, T, H, D], scores [B, T, H]: the last k positions pooled
    return [torch.randn(shape), torch.randn(shape[:3])], \
        lambda x, s: windowed_pool_parallel(x, s, None, None, WindowOptions(k))[0]


def windowed_table(shape: Shape, windows: tuple[int, ...], repeats: int) -> list[Row]:
    """Training (fwd+bwd) tokens/s of windowed pooling per k beside the global pooling, all in one round robin."""
    fns = {"global": forward_backward(*_additive(shape))}
    fns.update({f"k{k}": forward_backward(*_windowed(shape, k)) for k in windows})
    seconds = round_robin(fns, repeats)
    tokens = shape[0] * shape[1]
    rows = [{"shape": list(shape), "window": name, "ms": s * 1e3, "tokens_per_s": tokens / s,
             "vs_global": s / seconds["global"]} for name, s in seconds.items()]
    print_table(rows, ["shape", "window", "ms", "tokens_per_s", "vs_global"])
    return rows


def _prefix_difference(x: Tensor, e: Tensor, k: int) -> Tensor:
    """LEAP's windowed pooling: (s_i - s_{i-k}) / (z_i - z_{i-k}) of the prefix sums of e x and e, e [B, T, H]."""
    s, z = torch.cumsum(e.unsqueeze(-1) * x, 1), torch.cumsum(e.unsqueeze(-1), 1)
    before = (0, 0, 0, 0, k, 0)  # the sums k positions earlier (0 before the start)
    T = x.shape[1]
    return (s - F.pad(s, before)[:, :T]) / (z - F.pad(z, before)[:, :T])


def stability_table(shape: Shape, k: int) -> list[Row]:
    """Share of non-finite outputs and max error (over the finite ones) against the float64 reference, float32."""
    rows = []
    for std in (3.0, 30.0, 1e4):
        torch.manual_seed(0)
        x, a = torch.randn(shape), torch.randn(shape[:3]) * std
        ref, _ = windowed_pool_naive(x.double(), a.double(), None, None, WindowOptions(k))
        forms = {"exp, no max": _prefix_difference(x, a.exp(), k),
                 "difference, one max": _prefix_difference(x, (a - a.amax(1, keepdim=True)).exp(), k),
                 "ours": windowed_pool_parallel(x, a, None, None, WindowOptions(k))[0]}
        for name, g in forms.items():
            err = (g.double() - ref).abs()
            finite = torch.isfinite(err)
            rows.append({"score_std": std, "form": name, "nonfinite": 1 - finite.double().mean().item(),
                         "max_err": err[finite].max().item() if finite.any() else float("nan")})
    print_table(rows, ["score_std", "form", "nonfinite", "max_err"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, 3 repeats (< 60 s)")
    parser.add_argument("--out", default="runs/bench/ops.json")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes, repeats = (QUICK_SHAPES, 3) if args.quick else ([SHAPE, *(s for s in SWEEP if s != SHAPE)], args.repeats)
    rows = [measure(shape, mode, repeats) for shape in shapes for mode in MODES]
    columns = ["shape", "mode", *(f"{n}_ms" for n in OURS + FLOORS), *(f"{o}/{f}" for o in OURS for f in FLOORS)]
    table = print_table(rows, columns)
    windowed_rows = windowed_table(*QUICK_WINDOWS, repeats) if args.quick else windowed_table(WINDOW_SHAPE, WINDOWS,
                                                                                              repeats)
    stability = stability_table((1, 64, 2, 8) if args.quick else (2, 1024, 4, 64), 8)
    cuda_rows = [] if args.quick else cuda_table(repeats)
    out = write_json(args.out, {"threads": args.threads, "repeats": repeats, "rows": rows, "table": table,
                                "windowed_rows": windowed_rows, "windowed_stability": stability,
                                "cuda_rows": cuda_rows})
    sweep = [r for r in rows if r["shape"] != list(SHAPE)]
    long_rows = [{"T": r["T"], "op": f"{name} {r['mode']}", "ms": r[f"{name}_ms"]} for r in sweep
                 for name in OURS + FLOORS]
    plot_lines(out.with_suffix(".png"), long_rows, "T", ["ms"], lambda r: r["op"], f"ops, {args.threads} threads")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

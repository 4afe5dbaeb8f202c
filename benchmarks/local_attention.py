"""Sliding-window attention's op alone against causal softmax attention (SDPA), forward + backward, at byte level.

    python -m benchmarks.local_attention [--quick] [--out runs/bench/local_attention.json] [--windows 16,64,256]
        [--seq-lens 1024,4096,16384] [--repeats 5] [--threads 2]

The byte-level shapes of ``train_throughput --preset byte``: [B, T, 4, 64] (width 256, 4 heads) with 16,384 tokens
per batch (B = 16384 / T). At each T the chunked op (``local_attention_chunked``) runs at every window beside causal
``F.scaled_dot_product_attention``, round-robin, medians reported: ``tokens_per_s`` (B T / time), and
``vs_sdpa`` (SDPA's time over the op's: > 1 is faster). The op's cost grows with T w, SDPA's with T^2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.local_attention import WindowOptions, local_attention_chunked
from benchmarks.common import Row, ints, plot_lines, print_table, round_robin, write_json

HEADS, HEAD_DIM, TOKENS = 4, 64, 16384  # train_throughput's byte preset: width 256, 16,384 tokens per batch
QUICK_SEQ_LENS, QUICK_WINDOWS, QUICK_TOKENS, QUICK_REPEATS = [64, 256], [4, 16], 512, 3


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention on [B, T, H, D] (SDPA wants [B, H, T, D])."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def windowed(window: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda q, k, v: local_attention_chunked(q, k, v, None, None, WindowOptions(window))[0]


def forward_backward(shape: tuple[int, ...], op: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[], Any]:
    """op on fresh q, k, v [B, T, H, D], then backward of a fixed random upstream gradient into all three."""
    inputs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    grad = torch.randn(shape)

    def run() -> None:
        op(*inputs).backward(grad)
        for x in inputs:
            x.grad = None

    return run


def measure(T: int, windows: list[int], tokens: int, repeats: int) -> list[Row]:
    """One row per op at T: median fwd+bwd ms, tokens/s, and SDPA's time over the op's."""
    shape = (max(1, tokens // T), T, HEADS, HEAD_DIM)
    fns = {"sdpa": forward_backward(shape, causal_sdpa),
           **{f"local w={w}": forward_backward(shape, windowed(w)) for w in windows}}
    seconds = round_robin(fns, repeats)
    return [{"op": name, "T": T, "batch": shape[0], "ms": s * 1e3, "tokens_per_s": shape[0] * T / s,
             "vs_sdpa": seconds["sdpa"] / s} for name, s in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (seconds)")
    parser.add_argument("--out", default="runs/bench/local_attention.json")
    parser.add_argument("--windows", type=ints, default=[16, 64, 256])
    parser.add_argument("--seq-lens", type=ints, default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    seq_lens, windows, tokens, repeats = ((QUICK_SEQ_LENS, QUICK_WINDOWS, QUICK_TOKENS, QUICK_REPEATS)
                                          if args.quick else (args.seq_lens, args.windows, TOKENS, args.repeats))
    rows = [row for T in seq_lens for row in measure(T, windows, tokens, repeats)]
    table = print_table(rows, ["op", "T", "batch", "ms", "tokens_per_s", "vs_sdpa"])
    out = write_json(args.out, {"threads": args.threads, "repeats": repeats, "heads": HEADS, "head_dim": HEAD_DIM,
                                "tokens": tokens, "rows": rows, "table": table})
    plot_lines(out.with_suffix(".png"), rows, "T", ["tokens_per_s"], lambda r: r["op"],
               f"sliding-window attention vs causal SDPA, fwd+bwd, {args.threads} threads")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

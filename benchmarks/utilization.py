"""Model FLOPs utilisation (MFU) of training: model FLOPs/s over this machine's peak float32 matmul FLOP/s,
both measured in the same run (round-robin: one large square matmul, then one training step of each model).

    python -m benchmarks.utilization [--quick] [--out runs/bench/utilization.json] [--seq-len 1024]
        [--models fastformer,gpt2] [--matmul 2048] [--repeats 3] [--threads 2]

Model FLOPs per training token = 6 N_matmul + mixer, where N_matmul counts the weights that take part in a
matmul per token (nn.Linear and GPT-2's Conv1D layers, the LM head even when tied, convolution kernels;
embedding lookups excluded) and 6 = 2 (multiply-add) x 3 (forward + backward). The token mixer's own
FLOPs, per training token, with L layers, width C, context T, Λ lags, segment J, H heads:

- gpt2:        6 L T C      (QK^T and AV, 2 T C each forward, halved by the causal mask, x 3 for training)
- fastformer:  36 L C       (per layer forward: two score dots 4C, two poolings 6C (weight, add, divide),
                             two elementwise gates 2C; O(C) per token, independent of T)
- fastformer-conv: as fastformer (its convolution is a matmul: its kernels are in N_matmul)
- leviathan:   3 L Λ (4C + J H)   (lag scores 2ΛC and the mix 2ΛC forward, plus the box filter ΛJH)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from attnfree.layers.conv import CausalConvolution
from benchmarks.common import QUICK, Row, Sizes, available, build, print_table, round_robin, write_json
from benchmarks.decode import matmul_layers

TARGET_MFU = 0.30  # fastformer at T = 1024


def matmul_params(model: nn.Module) -> int:
    """Weights that take part in a matmul per token: nn.Linear / Conv1D weights (a tied LM head counted once
    more, as the output matmul) and the causal convolutions' kernels ([C, C / groups, K])."""
    n = sum(layer.n_weights for layer in matmul_layers(model))
    for module in model.modules():
        if isinstance(module, CausalConvolution):
            n += module.weight.numel()
    return n


def _gpt2(model: PreTrainedModel, T: int) -> float:
    return 6.0 * model.config.num_hidden_layers * T * model.config.hidden_size


def _fastformer(model: PreTrainedModel, T: int) -> float:
    return 36.0 * model.config.num_hidden_layers * model.config.hidden_size


def _leviathan(model: PreTrainedModel, T: int) -> float:
    c = model.config
    return 3.0 * c.num_hidden_layers * len(c.lags) * (4 * c.hidden_size + c.segment * c.n_heads)


MIXER_FLOPS: dict[str, Callable[[PreTrainedModel, int], float]] = {
    "gpt2": _gpt2, "fastformer": _fastformer, "fastformer-conv": _fastformer, "leviathan": _leviathan,
}


def training_step(model: PreTrainedModel, batch: int, seq_len: int, vocab: int) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, vocab, (batch, seq_len))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def square_matmul(n: int) -> tuple[Callable[[], None], float]:
    """A closure running enough n x n x n float32 matmuls for ~2 GFLOP (one at n = 2048), and its FLOPs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    reps = max(1, round(2e9 / (2 * n**3)))

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    return run, 2.0 * n**3 * reps


def plot_mfu(path: Path, rows: list[Row], title: str) -> None:
    """Bars of MFU per model, with the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["model"] for r in rows], [100 * r["mfu"] for r in rows])
    ax.axhline(100 * TARGET_MFU, color="k", linestyle="--", label=f"target {TARGET_MFU:.0%}")
    ax.set(ylabel="MFU (%)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, T=128, 512^3 matmul (< 60 s)")
    parser.add_argument("--out", default="runs/bench/utilization.json")
    parser.add_argument("--models", default="fastformer,gpt2")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=Sizes.tokens, help="tokens per batch")
    parser.add_argument("--matmul", type=int, default=2048, help="n of the n x n x n peak matmul")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each: matmul, then a step of each model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = QUICK if args.quick else Sizes(tokens=args.tokens)
    seq_len, n, repeats = (128, 512, 3) if args.quick else (args.seq_len, args.matmul, args.repeats)
    batch = max(1, sizes.tokens // seq_len)
    names = available(args.models.split(","))
    if unknown := sorted(set(names) - set(MIXER_FLOPS)):
        parser.error(f"no mixer FLOPs formula for {', '.join(unknown)} (add one to MIXER_FLOPS)")
    models = {name: build(name, sizes, n_positions=seq_len).train() for name in names}
    steps = {name: training_step(m, batch, seq_len, sizes.vocab_size) for name, m in models.items()}
    matmul, matmul_flops = square_matmul(n)
    seconds = round_robin({"matmul": matmul, **steps}, repeats)
    peak = matmul_flops / seconds["matmul"]
    print(f"peak float32 matmul ({n}^3): {peak / 1e9:.1f} GFLOP/s")
    rows: list[Row] = []
    for name, model in models.items():
        n_matmul = matmul_params(model)
        per_token = 6.0 * n_matmul + MIXER_FLOPS[name](model, seq_len)
        tokens_per_s = batch * seq_len / seconds[name]
        rows.append({"model": name, "T": seq_len, "batch": batch, "n_matmul": n_matmul,
                     "gflop_per_token": per_token / 1e9, "tokens_per_s": tokens_per_s,
                     "gflop_per_s": per_token * tokens_per_s / 1e9, "mfu": per_token * tokens_per_s / peak})
        rows[-1]["meets_target"] = rows[-1]["mfu"] >= TARGET_MFU
    table = print_table(rows, ["model", "T", "batch", "n_matmul", "gflop_per_token", "tokens_per_s", "gflop_per_s",
                               "mfu", "meets_target"])
    out = write_json(args.out, {"sizes": asdict(sizes), "threads": args.threads, "matmul_n": n, "repeats": repeats,
                                "peak_flop_per_s": peak, "target_mfu": TARGET_MFU, "rows": rows, "table": table})
    plot_mfu(out.with_suffix(".png"), rows, f"training at T={seq_len}, {args.threads} threads")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

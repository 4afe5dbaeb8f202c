"""Training throughput: tokens/s of forward + backward + AdamW step against sequence length T, at a fixed
number of tokens per batch (batch = tokens / T), for each model at the same size.

    python -m benchmarks.train_throughput [--quick] [--out runs/bench/train_throughput.json]
        [--seq-lens 256,1024,4096] [--models fastformer,gpt2] [--threads 2] [--max-seconds-per-point 900]

Each (model, T) point runs in its own forked process, so its peak memory is that process's ru_maxrss; the
table gives it raw and minus a baseline taken right after the model is built. Points run T by T with the
models in turn, so a change of machine load hits every model at about the same T. A point whose first
step says the whole point would take longer than --max-seconds-per-point is skipped with a note, and so
are that model's longer T.

The second half of this file holds the helpers the other benchmarks share (special ids, forked points,
plots); they would sit in ``common.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from attnfree.models.registry import MODELS as REGISTERED
from attnfree.models.registry import ModelSize, build_model
from benchmarks.common import median_time, print_table, write_json

MODELS = ("fastformer", "fastformer-conv", "leviathan", "gpt2")
SEQ_LENS = tuple(256 * 2**i for i in range(7))  # 256 .. 16384
Row = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes of one run (--quick swaps in tiny ones)."""

    hidden_size: int = 256  # C
    n_heads: int = 4  # H
    num_layers: int = 4
    vocab_size: int = 32100  # V, the T5 tokenizer's
    tokens: int = 16384  # per batch: B = tokens / T


QUICK = Sizes(hidden_size=64, n_heads=2, num_layers=2, vocab_size=1024, tokens=512)


def train_point(name: str, seq_len: int, sizes: Sizes, warmup: int, steps: int, max_seconds: float) -> Row:
    """Median step time of forward + backward + AdamW at [B, T] = [tokens / T, T] (runs in a forked child)."""
    torch.manual_seed(0)
    model = build(name, sizes, n_positions=seq_len).train()
    baseline = peak_rss_mib()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = max(1, sizes.tokens // seq_len)
    ids = torch.randint(2, sizes.vocab_size, (batch, seq_len))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = median_time(step, repeats=1, warmup=0)  # also the first warm-up step
    if first * (warmup + steps) > max_seconds:
        return {"batch": batch, "first_step_s": first, "note": f"skipped: first step {first:.0f} s, "
                f"{warmup + steps} steps > --max-seconds-per-point {max_seconds:.0f}"}
    step_s = median_time(step, repeats=steps, warmup=max(0, warmup - 1))
    peak = peak_rss_mib()
    return {"batch": batch, "step_s": step_s, "tokens_per_s": batch * seq_len / step_s, "peak_rss_mib": peak,
            "delta_rss_mib": peak - baseline}


def add_ratios(rows: list[Row]) -> None:
    """vs_gpt2: tokens/s over gpt2's at the same T (where both were measured)."""
    gpt2 = {r["T"]: r["tokens_per_s"] for r in rows if r["model"] == "gpt2" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" in r and r["T"] in gpt2:
            r["vs_gpt2"] = r["tokens_per_s"] / gpt2[r["T"]]


def flatness(rows: list[Row]) -> dict[str, float]:
    """Per model, max / min tokens/s across the measured T (1.0 = throughput independent of T)."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        speeds = [r["tokens_per_s"] for r in rows if r["model"] == name and "tokens_per_s" in r]
        if speeds:
            out[name] = max(speeds) / min(speeds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and T in {64, 128} (< 60 s)")
    parser.add_argument("--out", default="runs/bench/train_throughput.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)))
    parser.add_argument("--tokens", type=int, default=Sizes.tokens, help="tokens per batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--max-seconds-per-point", type=float, default=900.0)
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes(tokens=args.tokens)
    seq_lens = [64, 128] if args.quick else ints(args.seq_lens)
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    rows: list[Row] = []
    given_up: set[str] = set()
    names = available(args.models.split(","))
    for seq_len in seq_lens:
        for name in names:
            if name in given_up:
                rows.append({"model": name, "T": seq_len, "note": "skipped: a shorter T already ran out of time"})
                continue
            kwargs = dict(name=name, seq_len=seq_len, sizes=sizes, warmup=warmup, steps=steps,
                          max_seconds=args.max_seconds_per_point)
            row = {"model": name, "T": seq_len,
                   **run_isolated(train_point, kwargs, args.threads, 2 * args.max_seconds_per_point + 60)}
            if "tokens_per_s" not in row:
                given_up.add(name)
            rows.append(row)
            print(f"{name} T={seq_len}: {row.get('tokens_per_s', 0):.0f} tokens/s {row.get('note', '')}", flush=True)
    add_ratios(rows)
    columns = ["model", "T", "batch", "tokens_per_s", "vs_gpt2", "step_s", "peak_rss_mib", "delta_rss_mib", "note"]
    table = print_table(rows, columns)
    flat = flatness(rows)
    print("max/min tokens/s across T: " + ", ".join(f"{k} {v:.2f}" for k, v in flat.items()))
    out = write_json(args.out, {"sizes": asdict(sizes), "threads": args.threads, "steps": steps, "warmup": warmup,
                                "rows": rows, "max_over_min_tokens_per_s": flat, "table": table})
    plot_lines(out.with_suffix(".png"), rows, "T", ["tokens_per_s", "delta_rss_mib"], lambda r: r["model"],
               f"training, {sizes.tokens} tokens/batch, {args.threads} threads")
    print(f"wrote {out} and {out.with_suffix('.png')}")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the benchmarks
# ----------------------------------------------------------------------------------------------


@dataclass
class Ids:
    """The special ids a builder needs (``registry.SpecialIds``)."""

    vocab_size: int = 32100
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 1


def build(name: str, sizes: Sizes, n_positions: int, overrides: dict[str, Any] | None = None) -> PreTrainedModel:
    """A freshly initialised, dropout-free ``name`` at ``sizes``."""
    size = ModelSize(sizes.hidden_size, sizes.n_heads, sizes.num_layers, n_positions, dropout=0.0)
    return build_model(name, size, Ids(sizes.vocab_size), overrides)


def available(names: Iterable[str]) -> list[str]:
    """The names the registry knows; a note for each it does not (so a benchmark runs before a model exists)."""
    known = [n for n in names if n in REGISTERED]
    for name in sorted(set(names) - set(known)):
        print(f"note: unknown model {name!r} skipped (registered: {', '.join(sorted(REGISTERED))})")
    return known


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(conn: Connection, fn: Callable[..., Row], kwargs: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        conn.send(fn(**kwargs))
    except Exception as error:  # reported as the point's note, so one failure does not end the sweep
        conn.send({"note": f"failed: {type(error).__name__}: {error}"})


def run_isolated(fn: Callable[..., Row], kwargs: dict[str, Any], threads: int, timeout: float) -> Row:
    """fn(**kwargs) in a forked process (its own peak memory, nothing left behind), or a note after timeout s.

    Forking is cheap (torch is imported once) and safe here because the parent never runs a torch op.
    """
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, kwargs, threads))
    process.start()
    send.close()
    start = time.perf_counter()
    try:
        row = receive.recv() if receive.poll(timeout) else {"note": f"skipped: no result within {timeout:.0f} s"}
    except EOFError:  # the child died without a word (e.g. killed for memory)
        process.join()
        row = {"note": f"failed: process ended with code {process.exitcode}"}
    if process.is_alive():
        process.kill()
    process.join()
    return {**row, "wall_s": time.perf_counter() - start}


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each fn, run in turn so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plot_lines(path: Path, rows: list[Row], x: str, ys: list[str], group: Callable[[Row], str], title: str) -> None:
    """One log-log panel per y against x, one line per group of rows (rows lacking y are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(5.5 * len(ys), 4), squeeze=False)
    for ax, y in zip(axes[0], ys, strict=True):
        for label in dict.fromkeys(group(r) for r in rows):
            points = sorted((r[x], r[y]) for r in rows if group(r) == label and r.get(y, 0) > 0)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel=x, ylabel=y)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

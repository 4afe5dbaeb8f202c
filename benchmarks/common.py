"""Timing and reporting helpers shared by the benchmarks: medians of repeated runs, tables, JSON."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from attnfree.models.registry import MODELS as REGISTERED
from attnfree.models.registry import ModelSize, build_model
from attnfree.provenance import provenance


def median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds (after warm-up runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Markdown table of rows (dicts) restricted to columns; printed and returned."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": provenance(), "machine": machine(), **payload}, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# Sizes, models, forked points, round-robin timing and plots
# ----------------------------------------------------------------------------------------------

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


def training_setup(name: str, sizes: Sizes, seq_len: int, device: str | torch.device = "cpu"
                   ) -> tuple[Any, torch.optim.Optimizer, torch.Tensor]:
    """A fresh ``name`` (seed 0) on ``device`` in training mode, its AdamW (lr 1e-4) and random ids
    [max(1, tokens / T), T]: what every training-speed benchmark times."""
    torch.manual_seed(0)
    model: Any = build(name, sizes, n_positions=seq_len)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, sizes.vocab_size, (max(1, sizes.tokens // seq_len), seq_len), device=device)
    return model, opt, ids


def available(names: Iterable[str]) -> list[str]:
    """The names (or specs with overrides, ``fastformer:sequence_chunk=2048``) the registry knows; a note for each
    it does not (so a benchmark runs before a model exists)."""
    known = [n for n in names if n.split(":", 1)[0] in REGISTERED]
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

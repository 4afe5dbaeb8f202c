"""One training step (forward + backward + AdamW) of registered models at byte level, timed in whatever attnfree is
first on the path: for A/B runs between commits, each from its own worktree.

    for t in ../old ../new; do PYTHONPATH=$t/src python -m benchmarks.step_ab --models leviathan; done

Vocabulary 256, width 256, 4 heads, 4 layers, batch 1, T = --seq-len (16,384), one thread; one untimed step, then
the median of --steps. Prints one JSON line per model (the tree it ran from, median seconds, tokens/s, every time).
Run the trees alternately, twice or more: on a shared machine one run alone says little. It imports from attnfree
only what old commits have too (the registry's ``ModelSize`` and ``build_model``), not ``benchmarks.common``, whose
provenance and other imports an older tree on the path may lack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

import attnfree
from attnfree.models.registry import ModelSize, build_model


@dataclass
class ByteIds:
    vocab_size: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2


def time_steps(name: str, seq_len: int, steps: int) -> list[float]:
    """Seconds of each timed step (after one untimed)."""
    torch.manual_seed(0)
    model = build_model(name, ModelSize(256, 4, 4, seq_len, dropout=0.0), ByteIds(), {}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, 256, (1, seq_len))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="leviathan")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        times = time_steps(name, args.seq_len, args.steps)
        median = statistics.median(times)
        print(json.dumps({"tree": attnfree.__file__.split("/src/")[0], "model": name, "median_s": round(median, 3),
                          "tokens_per_s": round(args.seq_len / median), "times": [round(t, 3) for t in times]}),
              flush=True)


if __name__ == "__main__":
    main()

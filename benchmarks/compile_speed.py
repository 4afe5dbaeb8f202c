"""Does torch.compile speed up training? Eager and compiled training steps of each model timed round-robin in one
process (so a change of machine load hits all alike), at one T and a fixed number of tokens per batch.

    python -m benchmarks.compile_speed [--quick] [--out runs/bench/compile_speed.json] [--seq-len 1024]
        [--models fastformer,gpt2] [--tokens 4096] [--repeats 3] [--threads 1]

Every model is compiled with torch.compile (inductor) before timing; the first call of each compiled step is
its compilation, reported as ``compile_s`` and not timed otherwise. Rows: model, compiled, tokens_per_s,
step_s, vs_eager (compiled over eager, same model), vs_gpt2 (over GPT-2 in the same mode).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from benchmarks.common import QUICK, Row, Sizes, available, build, print_table, round_robin, write_json


def make_step(name: str, sizes: Sizes, seq_len: int, compiled: bool) -> tuple[Callable[[], None], float]:
    """A forward + backward + AdamW step of a fresh ``name`` on [tokens / T, T] random ids; compilation seconds."""
    torch.manual_seed(0)
    model = build(name, sizes, n_positions=seq_len).train()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, sizes.vocab_size, (max(1, sizes.tokens // seq_len), seq_len))

    def step() -> None:
        forward(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # compiles (a warm-up step for the eager model)
    return step, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, T = 64")
    parser.add_argument("--out", default="runs/bench/compile_speed.json")
    parser.add_argument("--models", default="fastformer,gpt2")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes(tokens=args.tokens)
    seq_len = 64 if args.quick else args.seq_len
    steps: dict[tuple[str, bool], Callable[[], None]] = {}
    compile_s: dict[tuple[str, bool], float] = {}
    for name in available(args.models.split(",")):
        for compiled in (False, True):
            steps[name, compiled], compile_s[name, compiled] = make_step(name, sizes, seq_len, compiled)
            print(f"{name} compiled={compiled}: first step {compile_s[name, compiled]:.1f} s", flush=True)
    times = round_robin({f"{n}|{c}": fn for (n, c), fn in steps.items()}, repeats=args.repeats, warmup=1)
    tokens = max(1, sizes.tokens // seq_len) * seq_len
    rows: list[Row] = []
    for (name, compiled), _ in steps.items():
        step_s = times[f"{name}|{compiled}"]
        row: Row = {"model": name, "compiled": compiled, "T": seq_len, "tokens_per_s": tokens / step_s,
                    "step_s": step_s}
        if compiled:
            row["compile_s"] = compile_s[name, compiled]
            row["vs_eager"] = times[f"{name}|False"] / step_s
        if f"gpt2|{compiled}" in times:
            row["vs_gpt2"] = times[f"gpt2|{compiled}"] / step_s
        rows.append(row)
    table = print_table(rows, ["model", "compiled", "T", "tokens_per_s", "vs_gpt2", "vs_eager", "step_s", "compile_s"])
    out = write_json(args.out, {"sizes": asdict(sizes), "threads": args.threads, "repeats": args.repeats,
                                "rows": rows, "table": table})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

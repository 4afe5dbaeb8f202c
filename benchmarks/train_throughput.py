"""Training throughput: tokens/s of forward + backward + AdamW step against sequence length T, at a fixed
number of tokens per batch (batch = tokens / T), for each model at the same size.

    python -m benchmarks.train_throughput [--quick] [--out runs/bench/train_throughput.json]
        [--seq-lens 256,1024,4096] [--models fastformer,gpt2] [--threads 2] [--max-seconds-per-point 900] [--compile]
        [--preset byte|nanogpt] [--breakdown-at 16384]

``--preset nanogpt`` times the nanoGPT recipe's step (width 128, 4 heads, 4 layers, byte vocabulary, batch 12 at
T = 64). ``--preset byte`` is the long-context byte-level configuration (vocabulary 256, width 256, 4 heads, 4 layers,
16,384 tokens per batch, T = 1024, 4096, 16384, 65536): where attention's cost shows, since no large output
layer hides it. ``--breakdown-at T`` adds, per model, where one training step's time goes at T (the token mixer,
the FFN, the norms outside them, the embeddings, the output layer, the optimizer, the rest: the loss and glue),
timed with module hooks on forward and backward (``component_times``).

Each (model, T) point runs in its own forked process, so its peak memory is that process's ru_maxrss; the
table gives it raw and minus a baseline taken right after the model is built. Points run T by T with the
models in turn, so a change of machine load hits every model at about the same T. A point whose first
step says the whole point would take longer than --max-seconds-per-point is skipped with a note, and so
are that model's longer T. With --compile every model also runs compiled (torch.compile, inductor): rows
carry ``compiled``, the compilation time (``compile_s``: the first step, not timed otherwise) and ``vs_eager``;
``vs_gpt2`` compares like with like (compiled with compiled GPT-2).

"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from attnfree.models.registry import split_model_list
from benchmarks.common import (
    QUICK,
    Row,
    Sizes,
    available,
    ints,
    median_time,
    peak_rss_mib,
    plot_lines,
    print_table,
    run_isolated,
    training_setup,
    write_json,
)

MODELS = ("fastformer", "fastformer-conv", "leviathan", "gpt2")
SEQ_LENS = tuple(256 * 2**i for i in range(7))  # 256 .. 16384
BYTE = Sizes(hidden_size=256, n_heads=4, num_layers=4, vocab_size=256, tokens=16384)
BYTE_SEQ_LENS = (1024, 4096, 16384, 65536)
NANOGPT = Sizes(hidden_size=128, n_heads=4, num_layers=4, vocab_size=259, tokens=12 * 64)  # batch 12 of block 64

# Where a step's time goes: a module's role from its attribute name (the first match on its path, so a norm
# inside a mixer counts as mixer); norms found outside every role are "norms".
ROLES = {"mixer": ("attention", "attn", "correlation", "mixer", "conv"),
         "ffn": ("ffn", "mlp", "feed_forward"),
         "embedding": ("embed_tokens", "embed_positions", "wte", "wpe", "embeddings"),
         "head": ("lm_head",)}
PARTS = ("mixer", "ffn", "norms", "embedding", "head", "optimizer", "other")


def role_modules(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The outermost modules of each role (see ROLES), and the norms outside them."""
    found: dict[str, list[torch.nn.Module]] = {part: [] for part in PARTS}
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(t + ".") for t in taken):
            continue
        name = path.rsplit(".", 1)[-1]
        role = next((r for r, names in ROLES.items() if name in names), None)
        if role is None and "norm" in type(module).__name__.lower():
            role = "norms"
        if role is not None:
            found[role].append(module)
            taken.append(path)
    return found


def component_times(model: torch.nn.Module, step: Callable[[], None], optimizer_step: Callable[[], None]
                    ) -> dict[str, float]:
    """Seconds of one training step per part: forward and backward of each role's modules (module hooks; on CPU
    autograd runs in this thread, so wall times add up), the optimizer step, and the rest of the step."""
    # the embeddings' inputs are token ids: torch warns that their backward hook fires on the outputs' gradients,
    # which is exactly the span to time
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    spent = dict.fromkeys(PARTS, 0.0)
    started: dict[tuple[int, str], float] = {}
    handles = []
    for role, modules in role_modules(model).items():
        for module in modules:
            def begin(key: tuple[int, str]) -> Callable[..., None]:
                return lambda *_: started.__setitem__(key, time.perf_counter())

            def end(key: tuple[int, str], role: str = role) -> Callable[..., None]:
                def hook(*_: Any) -> None:
                    if key in started:
                        spent[role] += time.perf_counter() - started.pop(key)
                return hook

            handles += [module.register_forward_pre_hook(begin((id(module), "f"))),
                        module.register_forward_hook(end((id(module), "f"))),
                        module.register_full_backward_pre_hook(begin((id(module), "b"))),
                        module.register_full_backward_hook(end((id(module), "b")))]
    try:
        start = time.perf_counter()
        step()
        middle = time.perf_counter()
        optimizer_step()
        end_time = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
    spent["optimizer"] = end_time - middle
    spent["other"] = (middle - start) - sum(spent[p] for p in PARTS if p not in ("optimizer", "other"))
    return spent


def breakdown_point(name: str, seq_len: int, sizes: Sizes, steps: int) -> Row:
    """Median seconds per part of a training step at [tokens / T, T] (runs in a forked child)."""
    model, opt, ids = training_setup(name, sizes, seq_len)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def optimizer_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    optimizer_step()
    samples = [component_times(model, step, optimizer_step) for _ in range(steps)]
    parts = {p: statistics.median(s[p] for s in samples) for p in PARTS}
    total = sum(parts.values())
    return {"batch": ids.shape[0], "step_s": total, **{f"{p}_pct": 100 * v / total for p, v in parts.items()},
            **{f"{p}_s": v for p, v in parts.items()}}


def train_point(name: str, seq_len: int, sizes: Sizes, warmup: int, steps: int, max_seconds: float,
                compiled: bool = False) -> Row:
    """Median step time of forward + backward + AdamW at [B, T] = [tokens / T, T] (runs in a forked child)."""
    model, opt, ids = training_setup(name, sizes, seq_len)
    forward = torch.compile(model) if compiled else model
    baseline = peak_rss_mib()
    batch = ids.shape[0]

    def step() -> None:
        forward(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    compile_s = median_time(step, repeats=1, warmup=0) if compiled else 0.0  # the first call compiles
    first = median_time(step, repeats=1, warmup=0)  # also the first warm-up step
    if first * (warmup + steps) > max_seconds:
        return {"batch": batch, "first_step_s": first, "note": f"skipped: first step {first:.0f} s, "
                f"{warmup + steps} steps > --max-seconds-per-point {max_seconds:.0f}"}
    step_s = median_time(step, repeats=steps, warmup=max(0, warmup - 1))
    peak = peak_rss_mib()
    return {"batch": batch, "step_s": step_s, "tokens_per_s": batch * seq_len / step_s, "peak_rss_mib": peak,
            "delta_rss_mib": peak - baseline, **({"compile_s": compile_s} if compiled else {})}


def add_ratios(rows: list[Row]) -> None:
    """vs_gpt2: tokens/s over gpt2's at the same T and compilation (where both were measured); vs_eager:
    a compiled row's tokens/s over the same model's eager row."""
    speed = {(r["model"], r["T"], r.get("compiled", False)): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    for r in rows:
        compiled = r.get("compiled", False)
        if "tokens_per_s" in r and ("gpt2", r["T"], compiled) in speed:
            r["vs_gpt2"] = r["tokens_per_s"] / speed["gpt2", r["T"], compiled]
        if "tokens_per_s" in r and compiled and (r["model"], r["T"], False) in speed:
            r["vs_eager"] = r["tokens_per_s"] / speed[r["model"], r["T"], False]


def flatness(rows: list[Row]) -> dict[str, float]:
    """Per model, max / min tokens/s across the measured T (1.0 = throughput independent of T)."""
    out = {}
    for name in dict.fromkeys(label(r) for r in rows):
        speeds = [r["tokens_per_s"] for r in rows if label(r) == name and "tokens_per_s" in r]
        if speeds:
            out[name] = max(speeds) / min(speeds)
    return out


def label(row: Row) -> str:
    return row["model"] + ("+compile" if row.get("compiled") else "")


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
    parser.add_argument("--compile", action="store_true", help="also time every model under torch.compile")
    parser.add_argument("--preset", choices=("seed", "byte", "nanogpt"), default="seed",
                        help="seed: vocabulary 32100 (default); byte: vocabulary 256, T = 1024 .. 65536; nanogpt: "
                        "the nanoGPT recipe's step (width 128, byte vocabulary, batch 12 at T = 64)")
    parser.add_argument("--breakdown-at", type=int, default=0, help="also split a step's time into parts at this T")
    parser.add_argument("--gpt2-max-t", type=int, default=0,
                        help="GPT-2 only up to this T, its attention growing with T^2 (default: every T; 16384 with "
                        "--preset byte)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else {"byte": BYTE, "nanogpt": NANOGPT}.get(args.preset, Sizes(tokens=args.tokens))
    seq_lens = [64, 128] if args.quick else ints(args.seq_lens)
    if args.preset == "nanogpt" and args.seq_lens == ",".join(map(str, SEQ_LENS)):
        seq_lens = [64]
    if args.preset == "byte" and args.seq_lens == ",".join(map(str, SEQ_LENS)):
        seq_lens = list(BYTE_SEQ_LENS)
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    gpt2_max_t = args.gpt2_max_t or (16384 if args.preset == "byte" else 0)
    rows: list[Row] = []
    given_up: set[str] = set()
    names = available(split_model_list(args.models))  # (a spec may carry several overrides: "m:a=1,b=2,gpt2")
    modes = (False, True) if args.compile else (False,)
    for seq_len in seq_lens:
        for name, compiled in ((n, c) for n in names for c in modes):
            key = name + ("+compile" if compiled else "")
            if key in given_up or (name == "gpt2" and 0 < gpt2_max_t < seq_len):
                note = "skipped: a shorter T already ran out of time" if key in given_up else \
                    f"skipped: GPT-2 runs up to T = {gpt2_max_t} (--gpt2-max-t)"
                rows.append({"model": name, "T": seq_len, "compiled": compiled, "note": note})
                continue
            kwargs = dict(name=name, seq_len=seq_len, sizes=sizes, warmup=warmup, steps=steps,
                          max_seconds=args.max_seconds_per_point, compiled=compiled)
            row = {"model": name, "T": seq_len, "compiled": compiled,
                   **run_isolated(train_point, kwargs, args.threads, 2 * args.max_seconds_per_point + 60)}
            if "tokens_per_s" not in row:
                given_up.add(key)
            rows.append(row)
            print(f"{key} T={seq_len}: {row.get('tokens_per_s', 0):.0f} tokens/s {row.get('note', '')}", flush=True)
    add_ratios(rows)
    columns = ["model", "T", "batch", "tokens_per_s", "vs_gpt2", "step_s", "peak_rss_mib", "delta_rss_mib", "note"]
    if args.compile:
        columns[1:1] = ["compiled"]
        columns[-1:-1] = ["vs_eager", "compile_s"]
    table = print_table(rows, columns)
    flat = flatness(rows)
    print("max/min tokens/s across T: " + ", ".join(f"{k} {v:.2f}" for k, v in flat.items()))
    parts: list[Row] = []
    if args.breakdown_at:
        for name in names:
            kwargs = dict(name=name, seq_len=args.breakdown_at, sizes=sizes, steps=steps)
            parts.append({"model": name, "T": args.breakdown_at,
                          **run_isolated(breakdown_point, kwargs, args.threads, 2 * args.max_seconds_per_point + 60)})
            print(f"{name} T={args.breakdown_at}: mixer {parts[-1].get('mixer_pct', 0):.0f}% of the step", flush=True)
    parts_table = print_table(parts, ["model", "T", "step_s", *[f"{p}_pct" for p in PARTS], "note"]) if parts else ""
    out = write_json(args.out, {"sizes": asdict(sizes), "threads": args.threads, "steps": steps, "warmup": warmup,
                                "compile": args.compile, "preset": args.preset,
                                "rows": rows, "max_over_min_tokens_per_s": flat, "table": table,
                                "breakdown": parts, "breakdown_table": parts_table})
    plot_lines(out.with_suffix(".png"), rows, "T", ["tokens_per_s", "delta_rss_mib"], label,
               f"training, {sizes.tokens} tokens/batch, {args.threads} threads")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""Mixed-precision training stability: the same short run (seed, data, steps) in float32, bfloat16 autocast and
float16 autocast (with dynamic loss scaling), for each model; loss curves and final validation BPC.

    python -m benchmarks.precision [--quick] [--out runs/bench/precision.json] [--models fastformer,leviathan,gpt2]
        [--steps 300] [--seeds 3] [--threads 1]

Every run is ``attnfree.training.train`` on Tiny Shakespeare bytes at the demo recipe's size (width 128, 4 heads,
4 layers, T = 64, batch 12, lr 2e-3, linear decay), each in its own forked process (accelerate keeps its
mixed-precision mode in a process-wide singleton). The final BPC scores the whole validation split.

"Within noise": float32 run with --seeds seeds (0, 1, ...) gives a seed spread, max - min of the final BPC.
A mixed-precision run (seed 0) is within noise when its BPC differs from float32's at seed 0 by at most
max(seed spread, MARGIN_BPC): the change of precision moves the result no more than a change of seed does.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from attnfree.training import TrainSettings, recipe, train
from benchmarks.common import Row, available, print_table, run_isolated, write_json

MODELS = ("fastformer", "leviathan", "gpt2")
PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}
MARGIN_BPC = 0.01  # the smallest difference called a change, whatever the seed spread


def run_one(settings: TrainSettings) -> Row:
    """One training run (in a forked child): final BPC, throughput and the logged loss curve."""
    result = train(settings)
    losses = [h["loss"] for h in result.train_history]
    return {"bpc": result.bpc, "final_loss": losses[-1], "tokens_per_s": result.tokens_per_second,
            "train_seconds": result.train_seconds, "steps": result.steps,
            "finite": all(math.isfinite(x) for x in losses) and math.isfinite(result.bpc),
            "curve": [(h["step"], h["loss"]) for h in result.train_history]}


def settings_for(name: str, precision: str, seed: int, args: argparse.Namespace, out: Path) -> TrainSettings:
    """The demo recipe (tiny under --quick) for one (model, precision, seed)."""
    size: dict[str, Any] = (dict(hidden_size=32, n_heads=2, num_layers=2, block_size=32, batch_size=4,
                                 eval_batch_size=64) if args.quick else {})
    return recipe("demo", model=name, max_steps=args.steps, seed=seed, threads=args.threads, eval_every=0,
                  log_every=max(1, args.steps // 30), progress=False,
                  output_dir=str(out / f"{name}-{precision}-{seed}"), **size, **PRECISIONS[precision])


def judge(rows: list[Row]) -> None:
    """Adds to each mixed-precision row: delta_bpc (vs fp32 at the same seed), fp32_spread, within_noise."""
    for name in dict.fromkeys(r["model"] for r in rows):
        fp32 = {r["seed"]: r["bpc"] for r in rows if r["model"] == name and r["precision"] == "fp32" and "bpc" in r}
        if 0 not in fp32:
            continue
        spread = max(fp32.values()) - min(fp32.values())
        for r in rows:
            if r["model"] == name and r["precision"] != "fp32" and "bpc" in r:
                r["delta_bpc"] = r["bpc"] - fp32[r["seed"]] if r["seed"] in fp32 else float("nan")
                r["fp32_spread"] = spread
                r["within_noise"] = abs(r["delta_bpc"]) <= max(spread, MARGIN_BPC) and r["finite"]


def plot_curves(path: Path, rows: list[Row]) -> None:
    """One panel per model: training loss against step, one line per (precision, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    for ax, name in zip(axes[0], names, strict=True):
        for r in rows:
            if r["model"] == name and r.get("curve"):
                steps, losses = zip(*r["curve"], strict=True)
                ax.plot(steps, losses, styles[r["precision"]], label=f"{r['precision']} seed {r['seed']}",
                        alpha=1.0 if r["seed"] == 0 else 0.5)
        ax.set(title=name, xlabel="step", ylabel="training loss (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 12 steps, fastformer only, 2 seeds")
    parser.add_argument("--out", default="runs/bench/precision.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="float32 seeds (the spread that defines noise)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.models = 12, 2, "fastformer"
    out = Path(args.out)
    runs_dir = out.with_suffix("")  # run folders (model, run.json) beside the JSON
    rows: list[Row] = []
    for name in available(args.models.split(",")):
        jobs = [("fp32", seed) for seed in range(args.seeds)] + [(p, 0) for p in PRECISIONS if p != "fp32"]
        for precision, seed in jobs:
            settings = settings_for(name, precision, seed, args, runs_dir)
            row = {"model": name, "precision": precision, "seed": seed,
                   **run_isolated(run_one, {"settings": settings}, args.threads, 3600)}
            rows.append(row)
            print(f"{name} {precision} seed {seed}: bpc {row.get('bpc', float('nan')):.4f} "
                  f"{row.get('tokens_per_s', 0):.0f} tokens/s {row.get('note', '')}", flush=True)
    judge(rows)
    columns = ["model", "precision", "seed", "bpc", "delta_bpc", "fp32_spread", "within_noise", "final_loss",
               "tokens_per_s", "train_seconds", "note"]
    table = print_table(rows, columns)
    payload = {"steps": args.steps, "seeds": args.seeds, "threads": args.threads, "margin_bpc": MARGIN_BPC,
               "recipe": "demo" + (" (tiny: --quick)" if args.quick else ""), "rows": rows, "table": table}
    write_json(out, payload)
    plot_curves(out.with_suffix(".png"), rows)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

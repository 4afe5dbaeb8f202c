"""What a model option costs: training tokens/s side by side (round-robin, so a change of machine load hits every
spec alike) and the decode-state bytes, for model specs at one size.

    python -m benchmarks.options --specs "fastformer,fastformer:bonus=true,rwkv" [--seq-len 64] [--batch 12]
        [--width 128] [--heads 4] [--layers 4] [--vocab 259] [--repeats 20] [--threads 1] [--out PATH.json]

Defaults are the nanoGPT recipe's sizes (width 128, 4 heads, 4 layers, block 64, batch 12, byte vocabulary), where
the ablations (docs/results/ablations-2) were trained. ``vs_first``: tokens/s over the first spec's. The state is
what one sequence carries to decode its next token after ``seq_len`` tokens (float32; GPT-2's KV cache grows with
it, the others' do not).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from attnfree.evaluation.recall import state_bytes
from attnfree.models.registry import split_model_list
from benchmarks.common import Sizes, print_table, round_robin, training_setup, write_json


def training_step(spec: str, sizes: Sizes, seq_len: int) -> tuple[Callable[[], None], int, int]:
    """(one AdamW training step at [tokens / T, T], parameters, decode-state bytes) of a fresh ``spec``."""
    model, opt, ids = training_setup(spec, sizes, seq_len)
    state = state_bytes(model.eval(), seq_len)
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters()), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", required=True, help="comma-separated model specs (as for compare)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=259, help="vocabulary (259: the byte tokenizer's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per spec (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/options.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = Sizes(args.width, args.heads, args.layers, args.vocab, args.batch * args.seq_len)
    specs = split_model_list(args.specs)
    steps, rows = {}, []
    for spec in specs:
        steps[spec], params, state = training_step(spec, sizes, args.seq_len)
        rows.append({"spec": spec, "parameters": params, "state_bytes": state})
    seconds = round_robin(steps, args.repeats, warmup=2)
    speed = {spec: args.batch * args.seq_len / seconds[spec] for spec in specs}
    for spec, row in zip(specs, rows, strict=True):
        row |= {"tokens_per_s": speed[spec], "vs_first": speed[spec] / speed[specs[0]]}
    table = print_table(rows, ["spec", "parameters", "tokens_per_s", "vs_first", "state_bytes"])
    out = write_json(args.out, {"settings": vars(args), "rows": rows, "table": table})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""One decoding step, side by side in one process: the eager PyTorch step (with and without the decoding head's
[C, V] weight copy) against the exported ONNX fp32 step in onnxruntime, round-robin so that load hits all alike.

    python -m benchmarks.decode_step [--models fastformer,fastformer-conv,leviathan] [--batches 1,16]
        [--context 1024] [--repeats 50] [--threads 1] [--out runs/bench/decode_step.json]

Each model is built at the seed size (width 256, 4 heads, 4 layers, vocabulary 32,100, no positions), prefilled with
``context`` random tokens; then each variant runs the same one-token step from that state (the state is not
advanced, so every call does the same work). ``vs_onnx``: a variant's median over the ONNX step's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import attnfree.models.base as base
from attnfree.inference.decoding import chunked_prefill
from attnfree.models.compat import output_cache
from benchmarks.common import Row, Sizes, build, ints, print_table, round_robin, write_json
from benchmarks.decode import onnx_step_session


def variants(name: str, batch: int, context: int) -> dict[str, Callable[[], Any]]:
    """The three ways to run one step of ``name`` from the state after ``context`` tokens."""
    torch.manual_seed(0)
    model = build(name, Sizes(), 1024, {"position_embedding_type": "none"}).eval()
    with torch.no_grad():
        out = chunked_prefill(model, torch.randint(2, Sizes.vocab_size, (batch, context)))
    cache = output_cache(out)
    token = out.logits[:, -1].argmax(-1)[:, None]
    session, names = onnx_step_session(model)
    feed = {"input_ids": token.numpy(), **{n: t.numpy() for n, (_, t) in zip(names, cache.flatten(), strict=True)}}

    def torch_step() -> None:
        step_cache = cache.with_tensors([t.clone() for _, t in cache.flatten()])
        with torch.no_grad():
            model(token, cache=step_cache, use_cache=True).logits.argmax(-1)

    def plain_head_step() -> None:
        saved = base.decode_head
        base.decode_head = lambda head, h: head(h)  # the head's own F.linear, as before the copy
        try:
            torch_step()
        finally:
            base.decode_head = saved

    return {"torch": torch_step, "torch_plain_head": plain_head_step,
            "onnx": lambda: session.run(None, feed)[0].argmax(-1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fastformer,fastformer-conv,leviathan")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for name in args.models.split(","):
        for batch in ints(args.batches):
            ms = {k: v * 1e3 for k, v in round_robin(variants(name, batch, args.context), args.repeats, 3).items()}
            rows.append({"model": name, "batch": batch, **{f"{k}_ms": v for k, v in ms.items()},
                         "torch_vs_onnx": ms["torch"] / ms["onnx"],
                         "plain_head_vs_onnx": ms["torch_plain_head"] / ms["onnx"]})
            print(f"{name} B={batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    table = print_table(rows, ["model", "batch", "torch_ms", "torch_plain_head_ms", "onnx_ms", "torch_vs_onnx",
                               "plain_head_vs_onnx"])
    out = write_json(args.out, {"settings": vars(args), "rows": rows, "table": table})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

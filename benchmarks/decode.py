"""Decoding: time per new token and memory against context length, batch 1 and 16.

    python -m benchmarks.decode [--quick] [--out runs/bench/decode.json] [--contexts 128,1024,16384]
        [--batches 1,16] [--new-tokens 32] [--models fastformer,gpt2] [--max-seconds-per-point 600] [--compile]

Our recurrent models decode through ``attnfree.decoding.stream_generate`` (path "stream"), through
``model.generate`` (path "generate"), through the exported ONNX fp32 step graph run by onnxruntime with the same
threads (path "onnx": the runtime's floor on this machine; the prompt is prefilled in torch), and with
``--compile`` through stream_generate on the compiled model (path "stream+compile", compile time excluded);
GPT-2 through ``model.generate`` with its KV cache. Each point (model, path, context, batch) runs in its own
forked process: prefill a random prompt of the context length, then time each of --new-tokens greedy tokens;
per_token_ms is their median. ``vs_onnx``: a row's per-token time over the onnx row's at the same point.

The floor: the model's nn.Linear (and GPT-2's Conv1D) layers alone, each applied once to a [B, 1, in]
input in sequence, which is the matmul work any recurrent step must do (fastformer-conv's convolution
weights are left out of it). vs_floor = per-token time / floor.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.pytorch_utils import Conv1D

from attnfree.inference.decoding import chunked_prefill, stream_generate
from attnfree.inference.export import export_step
from attnfree.inference.sampling import Sampling
from attnfree.models.cache import RecurrentCache
from attnfree.models.compat import output_cache
from benchmarks.common import (
    QUICK,
    Row,
    Sizes,
    available,
    build,
    ints,
    median_time,
    peak_rss_mib,
    plot_lines,
    print_table,
    run_isolated,
    write_json,
)

MODELS = ("fastformer", "fastformer-conv", "leviathan", "gpt2")
CONTEXTS = tuple(128 * 2**i for i in range(8))  # 128 .. 16384
RECURRENT_N_POSITIONS = 1024  # our models decode without positions; leviathan's largest lag still follows it


class _Stamps(BaseStreamer):
    """Wall time of every ``put``: the prompt (before prefill), then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _cache_bytes(cache: Any) -> int:
    """Bytes of a RecurrentCache or of a transformers KV cache (keys and values of every layer)."""
    if isinstance(cache, RecurrentCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _via_generate(model: PreTrainedModel, prompt: Tensor, new_tokens: int) -> tuple[list[float], int]:
    """Times of prompt + each token through ``model.generate`` (greedy, no early stop), and the cache bytes."""
    stamps = _Stamps()
    out = cast(Any, model).generate(  # PreTrainedModel is typed without GenerationMixin in transformers 5
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, streamer=stamps, return_dict_in_generate=True, pad_token_id=model.config.pad_token_id)
    return stamps.times, _cache_bytes(output_cache(out))


def _via_stream(model: PreTrainedModel, prompt: Tensor, new_tokens: int) -> tuple[list[float], int | None]:
    """Times of prompt + each token through ``stream_generate`` (its cache is not exposed: bytes None)."""
    times = [time.perf_counter()]
    for _ in stream_generate(model, prompt, new_tokens, Sampling(greedy=True)):
        times.append(time.perf_counter())
    return times, None


def _via_stream_compiled(model: PreTrainedModel, prompt: Tensor, new_tokens: int) -> tuple[list[float], int | None]:
    """``stream_generate`` on ``torch.compile(model, dynamic=True)``; a short warm-up run compiles first
    (its time, tens of seconds to minutes on this CPU, is not counted)."""
    compiled = cast(PreTrainedModel, torch.compile(model, dynamic=True))
    for _ in stream_generate(compiled, prompt[:, :64], 4, Sampling(greedy=True)):
        pass
    return _via_stream(compiled, prompt, new_tokens)


def onnx_step_session(model: torch.nn.Module) -> tuple[Any, list[str]]:
    """The exported float32 step of ``model`` in an onnxruntime session with torch's thread count, and the names of
    its state inputs (after ``input_ids``)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        export_step(model, Path(folder) / "step.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        session = ort.InferenceSession(str(Path(folder) / "step.onnx"), options, providers=["CPUExecutionProvider"])
    return session, [i.name for i in session.get_inputs()][1:]


def _via_onnx(model: PreTrainedModel, prompt: Tensor, new_tokens: int) -> tuple[list[float], int | None]:
    """The exported step graph (float32) in onnxruntime, greedy on numpy: what ``attnfree.inference.runtime`` does
    per token. The prompt is prefilled in torch (chunked) and its state handed over; export time is not counted."""
    session, names = onnx_step_session(model)
    times = [time.perf_counter()]
    with torch.no_grad():
        out = chunked_prefill(model, prompt)
    state = [t.numpy() for _, t in output_cache(out).flatten()]
    token = out.logits[:, -1].argmax(-1).numpy()[:, None]
    times.append(time.perf_counter())
    for _ in range(new_tokens - 1):
        logits, *state = session.run(None, {"input_ids": token, **dict(zip(names, state, strict=True))})
        token = logits.argmax(-1)[:, None]
        times.append(time.perf_counter())
    return times, None


PATHS: dict[str, Callable[[PreTrainedModel, Tensor, int], tuple[list[float], int | None]]] = {
    "generate": _via_generate,
    "stream": _via_stream,
    "onnx": _via_onnx,
    "stream+compile": _via_stream_compiled,  # only with --compile
}


class MatmulLayer(NamedTuple):
    module: nn.Module
    in_features: int
    n_weights: int


def matmul_layers(model: nn.Module) -> list[MatmulLayer]:
    """Every nn.Linear and transformers Conv1D (weight [in, out]) in the model."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            found.append(MatmulLayer(module, module.in_features, module.weight.numel()))
        elif isinstance(module, Conv1D):
            found.append(MatmulLayer(module, module.weight.shape[0], module.weight.numel()))
    return found


@torch.inference_mode()
def floor_s(model: nn.Module, batch: int, repeats: int = 20) -> float:
    """Median time of every matmul layer applied once, in sequence, to a [B, 1, in] input."""
    pairs = [(layer.module, torch.randn(batch, 1, layer.in_features)) for layer in matmul_layers(model)]
    return median_time(lambda: [layer(x) for layer, x in pairs], repeats=repeats, warmup=3)


def decode_point(name: str, path: str, context: int, batch: int, new_tokens: int, sizes: Sizes) -> Row:
    """Prefill [B, context] random ids, then time new_tokens greedy steps (runs in a forked child)."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = build(name, sizes, n_positions=context + new_tokens)
    else:
        model = build(name, sizes, RECURRENT_N_POSITIONS, {"position_embedding_type": "none"})
    model.eval()
    baseline = peak_rss_mib()
    floor = floor_s(model, batch)
    prompt = torch.randint(2, sizes.vocab_size, (batch, context))
    times, cache_bytes = PATHS[path](model, prompt, new_tokens)
    per_token = statistics.median(b - a for a, b in zip(times[1:], times[2:], strict=False))
    peak = peak_rss_mib()
    return {"per_token_ms": per_token * 1e3, "tokens_per_s": batch / per_token, "floor_ms": floor * 1e3,
            "vs_floor": per_token / floor, "prefill_s": times[1] - times[0], "peak_rss_mib": peak,
            "delta_rss_mib": peak - baseline, **({"cache_kib": cache_bytes / 1024} if cache_bytes else {})}


def add_vs_onnx(rows: list[Row]) -> None:
    """vs_onnx: per-token time over the onnx path's at the same (model, context, batch)."""
    onnx = {(r["model"], r["context"], r["batch"]): r["per_token_ms"] for r in rows
            if r["path"] == "onnx" and "per_token_ms" in r}
    for r in rows:
        key = (r["model"], r["context"], r["batch"])
        if key in onnx and "per_token_ms" in r:
            r["vs_onnx"] = r["per_token_ms"] / onnx[key]


def share_cache_sizes(rows: list[Row]) -> None:
    """Give "stream" rows the cache size measured through generate at the same point (the same state)."""
    sizes = {(r["model"], r["context"], r["batch"]): r["cache_kib"] for r in rows if "cache_kib" in r}
    for r in rows:
        key = (r["model"], r["context"], r["batch"])
        if key in sizes:
            r.setdefault("cache_kib", sizes[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, contexts 32 and 128, batch 1 (< 60 s)")
    parser.add_argument("--out", default="runs/bench/decode.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32, help="timed tokens per point (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds-per-point", type=float, default=600.0)
    parser.add_argument("--compile", action="store_true", help="also time our models' lean loop under torch.compile")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    contexts, batches = ([32, 128], [1]) if args.quick else (ints(args.contexts), ints(args.batches))
    new_tokens = 8 if args.quick else args.new_tokens
    ours = [p for p in PATHS if args.compile or p != "stream+compile"]
    combos = [(n, p) for n in available(args.models.split(",")) for p in (["generate"] if n == "gpt2" else ours)]
    rows: list[Row] = []
    given_up: set[tuple[str, str, int]] = set()
    for context in contexts:
        for batch in batches:
            for name, path in combos:
                point = {"model": name, "path": path, "context": context, "batch": batch}
                if (name, path, batch) in given_up:
                    rows.append({**point, "note": "skipped: a shorter context already ran out of time"})
                    continue
                kwargs = dict(name=name, path=path, context=context, batch=batch, new_tokens=new_tokens, sizes=sizes)
                rows.append({**point, **run_isolated(decode_point, kwargs, args.threads, args.max_seconds_per_point)})
                if "per_token_ms" not in rows[-1]:
                    given_up.add((name, path, batch))
                print(f"{name}/{path} context={context} B={batch}: {rows[-1].get('per_token_ms', 0):.2f} ms/token "
                      f"{rows[-1].get('note', '')}", flush=True)
    share_cache_sizes(rows)
    add_vs_onnx(rows)
    columns = ["model", "path", "context", "batch", "per_token_ms", "tokens_per_s", "floor_ms", "vs_floor", "vs_onnx",
               "cache_kib", "peak_rss_mib", "delta_rss_mib", "prefill_s", "note"]
    table = print_table(rows, columns)
    out = write_json(args.out, {"sizes": asdict(sizes), "threads": args.threads, "new_tokens": new_tokens,
                                "rows": rows, "table": table})
    plot_lines(out.with_suffix(".png"), rows, "context", ["per_token_ms", "cache_kib", "delta_rss_mib"],
               lambda r: f"{r['model']}/{r['path']} B={r['batch']}", f"greedy decoding, {args.threads} threads")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

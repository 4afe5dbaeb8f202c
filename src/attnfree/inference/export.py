"""ONNX export of the one-token recurrent step, the parallel prefill and the scoring forward, plus int8 dynamic
quantization.

Three graphs per model, written with a ``manifest.json`` that a torch-free runner (``inference/runtime.py``) reads:

- ``prefill.onnx``: input_ids [B, T], attention_mask [B, T] (left padding allowed) -> ``logits`` [B, V] (the last
  position's only: the head runs on one position) and the state after the prompt.
- ``step.onnx``: input_ids [B, 1] and the state -> ``logits`` [B, V] and the new state.
- ``score.onnx``: input_ids [B, T], attention_mask [B, T] -> ``all_logits`` [B, T, V] (every position, for scoring).

All are the model itself, traced: the prefill and the scoring forward are its parallel forward, the step its own
one-token forward over a cache rebuilt from the graph's inputs. Nothing here knows a family. The state is the
model's ``RecurrentCache`` flattened into named tensors (``RecurrentCache.flatten``:
``layers.<i>.<sublayer>.<key>.<field>`` for each block's state, then ``positions``, the real tokens seen per row),
every one with the batch first; the empty state and its layout come from the blocks' ``init_state``
(``empty_cache``). Inputs are named ``state.<name>``, outputs ``new_state.<name>``. So a new family exports as soon
as its step is made of traceable tensor operations (the contract tests check it with a toy family).

The graphs hold no weights: every initializer of 1 KiB or more lives once in ``weights.bin`` (ONNX external data,
one entry per distinct tensor, shared by every graph that uses it, page-aligned), so the folder carries the
weights once and onnxruntime maps them from the file instead of keeping a copy of each graph's bytes.

Export goes through ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) with a dynamic batch and, for
the prefill, a dynamic T (the TorchScript exporter, ``dynamo=False``, fails on ``aten::cummax``). ONNX has no
cumulative max, which the additive pooling's parallel scan uses; ``_onnx_cummax`` gives it as a max over a
lower-triangular mask (the scan's chunks are short).

Glossary: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnfree.models.cache import RecurrentCache
from attnfree.models.compat import output_cache
from attnfree.models.registry import max_positions
from attnfree.provenance import provenance

FORMAT = "attnfree-onnx"
FORMAT_VERSION = 2  # 1: two graphs with embedded weights, the prefill also returning all_logits
DEFAULT_OPSET = 18
MANIFEST = "manifest.json"
STEP_FILE, PREFILL_FILE, SCORE_FILE = "step.onnx", "prefill.onnx", "score.onnx"
WEIGHTS_FILE = "weights.bin"
POOLED_MIN_BYTES = 1024  # initializers this large go to WEIGHTS_FILE; smaller ones stay in their graph
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its name, shape (``"B"`` for the batch axis) and dtype, and its empty value."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy name: float32, int64, bool
    fill: float  # the value of a state that has seen nothing (0, -inf, False)


# ----------------------------------------------------------------------------------------------
# The state layout and the two graphs, from the model's own cache and forward
# ----------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> Any:
    """The model's backbone, which makes its caches (``empty_cache``); ValueError for a model without one."""
    backbone = getattr(model, "model", None)
    if not callable(getattr(backbone, "empty_cache", None)):
        raise ValueError(f"ONNX export covers attnfree's recurrent models (a RecurrentCache), "
                         f"got {type(model).__name__}")
    return backbone


def _template(model: nn.Module) -> RecurrentCache:
    """A cache of one sequence that has seen nothing: the layout of the state (names, shapes, dtypes, fills)."""
    return _backbone(model).empty_cache(1)


def _fill(t: Tensor, name: str) -> float:
    values = torch.unique(t)
    if values.numel() != 1:
        raise ValueError(f"the empty state {name} is not one constant value: the runtime cannot make it")
    return float(values[0])


def state_specs(model: nn.Module) -> list[StateSpec]:
    """The flat state layout of ``model`` (ValueError for a model the export does not cover)."""
    dtypes = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64", torch.bool: "bool"}
    return [StateSpec(name, ("B", *t.shape[1:]), dtypes[t.dtype], _fill(t, name))
            for name, t in _template(model).flatten()]


class Step(nn.Module):
    """(input_ids [B, 1], *state) -> (logits [B, V], *new state): the model's own one-token forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.template = model, _template(model)

    def forward(self, input_ids: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        cache = self.template.with_tensors([t.clone() for t in flat])  # copies: the step updates its cache in place
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        return (out.logits[:, -1], *(t for _, t in cache.flatten()))


class Prefill(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> (logits [B, V] of the last position, *state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _backbone(model)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1], *(t for _, t in output_cache(out).flatten()))


class Score(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> all_logits [B, T, V]: every position, no state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _backbone(model)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return cast(Tensor, self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)


class PrefillAndScore(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> (all_logits [B, T, V], logits [B, V], *state): ``Score`` and
    ``Prefill`` from one backbone forward, so that one trace gives both graphs (each pruned to its outputs; the
    last position's logits come from a head on that position alone, so the pruned prefill has no [B, T, V])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _backbone(model)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        lm = cast(Any, self.model)
        out = lm.model(input_ids, attention_mask, None, None, None, True, None)
        h = out.last_hidden_state  # [B, T, C]
        last = lm.compute_logits(h[:, -1:])[:, -1]  # [B, V]
        return (lm.compute_logits(h), last, *(t for _, t in output_cache(out).flatten()))


def step_module(model: nn.Module) -> nn.Module:
    """The functional one-token step of ``model`` (see ``Step``)."""
    return Step(model)


def empty_state(specs: list[StateSpec], batch: int) -> list[Tensor]:
    """Torch tensors of a state that has seen nothing (for tests and for decoding without a prompt)."""
    dtypes = {"float32": torch.float32, "float64": torch.float64, "int64": torch.long, "bool": torch.bool}
    return [torch.full((batch, *cast(tuple[int, ...], s.shape[1:])), s.fill, dtype=dtypes[s.dtype]) for s in specs]


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


def _opset() -> Any:
    """onnxscript's opset 18 (imported lazily: onnxscript is an optional dependency), untyped for our use."""
    from onnxscript import opset18

    return opset18


def _config(model: nn.Module) -> Any:
    return cast(Any, model).config


def _onnx_cummax(x: Any, dim: int) -> tuple[Any, Any]:
    """aten.cummax over the last axis as ONNX: m_i = max_j (x_j if j <= i else -inf), a [..., N, N] masked max.

    Used only inside the additive scan's chunks (N <= chunk size), so the N^2 intermediate stays small.
    """
    op = _opset()
    if dim not in (-1,):
        raise ValueError(f"the ONNX cummax translation covers dim=-1 only, got dim={dim}")
    n = op.Shape(x, start=-1)
    ones = op.Expand(op.Constant(value_float=1.0), op.Concat(n, n, axis=0))  # [N, N]
    lower = op.Cast(op.Trilu(ones, upper=0), to=9)  # bool, j <= i
    rows = op.Unsqueeze(x, op.Constant(value_ints=[-2]))  # [..., 1, N]
    masked = op.Where(lower, rows, op.CastLike(op.Constant(value_float=float("-inf")), x))  # [..., N, N]
    return op.ReduceMax(masked, op.Constant(value_ints=[-1]), keepdims=0), op.ArgMax(masked, axis=-1, keepdims=0)


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic: tuple[Any, ...], opset: int) -> None:
    """torch.onnx.export (dynamo) of module(*args) into one self-contained file."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=inputs, output_names=outputs, opset_version=opset,
            dynamic_shapes=dynamic, custom_translation_table={torch.ops.aten.cummax.default: _onnx_cummax},
            optimize=True, verbose=False, report=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    _strip_metadata(path)


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node metadata (Python stack traces, FX node text): a third of a prefill file."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


def _example_state(model: nn.Module, batch: int) -> list[Tensor]:
    """A state after a short left-padded prompt (realistic values: finite maxima, some valid slots)."""
    ids = torch.randint(0, _config(model).vocab_size, (batch, 3))
    mask = torch.ones(batch, 3, dtype=torch.long)
    mask[0, 0] = 0
    with torch.no_grad():
        return list(Prefill(model)(ids, mask)[1:])  # type: ignore[arg-type]


def export_step(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET) -> list[StateSpec]:
    """Write the one-token step of ``model`` to ``path``; returns its state layout."""
    specs = state_specs(model)
    batch = 2
    state = _example_state(model, batch)
    ids = torch.randint(0, _config(model).vocab_size, (batch, 1))
    names = [s.name for s in specs]
    _export(step_module(model).eval(), (ids, *state), Path(path), ["input_ids", *(f"state.{n}" for n in names)],
            ["logits", *(f"new_state.{n}" for n in names)], ({0: "B"}, tuple({0: "B"} for _ in specs)), opset)
    return specs


def _prompt_example(model: nn.Module) -> tuple[Tensor, Tensor]:
    """A left-padded [2, T] batch longer than a scan chunk, so the traced graph is the general one."""
    T = min(40, max(2, max_positions(cast(Any, model)) or 40))
    ids = torch.randint(0, _config(model).vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, : T // 4] = 0
    return ids, mask


def export_prefill_and_score(model: nn.Module, prefill: str | Path, score: str | Path,
                             opset: int = DEFAULT_OPSET) -> list[StateSpec]:
    """Write the parallel prefill (last logits and state) and the scoring forward (every position's logits) of
    ``model``, both with dynamic B and T, from one trace of ``PrefillAndScore``; returns the state layout."""
    import onnx

    specs = state_specs(model)
    dyn = {0: "B", 1: "T"}
    states = [f"new_state.{s.name}" for s in specs]
    both = Path(prefill).with_suffix(".both.onnx")
    _export(PrefillAndScore(model).eval(), _prompt_example(model), both, ["input_ids", "attention_mask"],
            ["all_logits", "logits", *states], (dyn, dyn), opset)
    traced = onnx.load(str(both))
    onnx.save(_keep_outputs(traced, ["logits", *states]), str(prefill))
    onnx.save(_keep_outputs(traced, ["all_logits"]), str(score))
    both.unlink()
    return specs


def _keep_outputs(model: Any, outputs: list[str]) -> Any:
    """A copy of the ONNX ``model`` with only the graph outputs ``outputs``, less every node and initializer no
    output needs."""
    import onnx

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    kept = [o for o in graph.output if o.name in outputs]
    if [o.name for o in kept] != outputs:
        raise ValueError(f"the graph has outputs {[o.name for o in graph.output]}, not all of {outputs}")
    # 1. walk back from the outputs: a node is live if it makes a needed value (a subgraph's outer names count)
    needed, live = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            live.append(node)
            needed.update(_consumed(node))
    # 2. rewrite the graph with the live nodes, the used initializers and the kept outputs
    live.reverse()
    used_inits = [t for t in graph.initializer if t.name in needed]
    infos = [v for v in graph.value_info if v.name in needed]
    for field, items in (("node", live), ("initializer", used_inits), ("value_info", infos), ("output", kept)):
        container = getattr(graph, field)
        copies = [type(item)() for item in items]
        for copy, item in zip(copies, items, strict=True):
            copy.CopyFrom(item)
        del container[:]
        container.extend(copies)
    return pruned


def _consumed(node: Any) -> set[str]:
    """The value names a node reads: its inputs and every name read inside its subgraphs."""
    names = {name for name in node.input if name}
    for sub in _subgraphs(node):
        for graph in _graphs_of(sub):
            for inner in graph.node:
                names.update(name for name in inner.input if name)
    return names


def _subgraphs(node: Any) -> list[Any]:
    """The graphs in a node's attributes (If branches, Loop/Scan bodies)."""
    return [sub for a in node.attribute if a.type in (5, 10) for sub in (a.g, *a.graphs)]  # GRAPH, GRAPHS


def _graphs_of(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph inside its nodes' attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs_of(sub)


def pool_weights(folder: Path, files: list[str], pool: str = WEIGHTS_FILE) -> None:
    """Move every initializer of ``POOLED_MIN_BYTES`` or more of the graphs ``files`` (in ``folder``) into one
    external-data file ``pool``: one page-aligned entry per distinct tensor (same dtype, shape and bytes), which
    every graph using it points at. The graphs are rewritten in place."""
    import onnx
    from onnx import numpy_helper

    entries: dict[bytes, tuple[int, int]] = {}  # content key -> (offset, length)
    with open(folder / pool, "wb") as out:
        for file in files:
            model = onnx.load(str(folder / file))
            for graph in _graphs_of(model.graph):
                for init in graph.initializer:
                    if init.data_type == onnx.TensorProto.STRING:
                        continue
                    data = numpy_helper.to_array(init).tobytes()  # little-endian, as external data is stored
                    if len(data) < POOLED_MIN_BYTES:
                        continue
                    key = hashlib.sha256(bytes([init.data_type]) + repr(list(init.dims)).encode() + data).digest()
                    if key not in entries:
                        out.write(b"\0" * (-out.tell() % 4096))  # page-aligned: onnxruntime can map it
                        entries[key] = (out.tell(), len(data))
                        out.write(data)
                    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                                  "uint64_data"):
                        init.ClearField(field)
                    offset, length = entries[key]
                    del init.external_data[:]
                    for k, v in (("location", pool), ("offset", str(offset)), ("length", str(length))):
                        entry = init.external_data.add()
                        entry.key, entry.value = k, v
                    init.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(folder / file))


def deployed_bytes(folder: str | Path, files: list[str]) -> int:
    """What running the graphs ``files`` of an export needs on disk: their own bytes plus the distinct entries of
    the weights file they use (an entry shared by two of them counts once)."""
    import onnx

    root, used = Path(folder), set()
    for file in files:
        for graph in _graphs_of(onnx.load(str(root / file), load_external_data=False).graph):
            for init in graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in init.external_data}
                    used.add((info["location"], int(info.get("offset", 0)), int(info["length"])))
    return sum((root / f).stat().st_size for f in files) + sum(length for _, _, length in used)


def quantize_onnx_int8(source: str | Path, target: str | Path) -> Path:
    """int8 dynamic quantization of an ONNX graph's weights (onnxruntime's quantizer; activations stay float,
    quantized per call). Returns ``target``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return Path(target)


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _tokenizer_record(tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Save the tokenizer into ``folder`` and describe it for the runtime (kind: byte or tokenizers)."""
    tokenizer.save(folder)
    kind = "byte" if tokenizer.name == "byte" else "tokenizers"  # bytes need no tokenizers library at run time
    if kind == "tokenizers" and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer {tokenizer.name!r} has no tokenizer.json: the runtime cannot load it")
    return {"kind": kind, "name": tokenizer.name, "folder": TOKENIZER_DIR, "vocab_size": tokenizer.vocab_size,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    manifest: dict[str, Any]


def export_onnx(model: nn.Module, tokenizer: Any, output: str | Path, quantize: str | None = None,
                opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export ``model`` (step + prefill), its tokenizer and a manifest into ``output``.

    quantize: None or "int8" (also writes ``step.int8.onnx`` and ``prefill.int8.onnx``).
    """
    # 1. check what we are asked before any slow work
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if not 18 <= opset <= 23:
        raise ValueError(f"opset must be in [18, 23] for the dynamo exporter, got {opset}")
    specs = state_specs(model)
    model = model.eval()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    # 2. graphs, quantized copies, their weights pooled; tokenizer and runner
    export_step(model, folder / STEP_FILE, opset)
    export_prefill_and_score(model, folder / PREFILL_FILE, folder / SCORE_FILE, opset)
    graphs = {"step": STEP_FILE, "prefill": PREFILL_FILE, "score": SCORE_FILE}
    if quantize == "int8":
        for name, file in list(graphs.items()):
            q = quantize_onnx_int8(folder / file, folder / file.replace(".onnx", ".int8.onnx"))
            graphs[f"{name}.int8"] = q.name
    pool_weights(folder, list(graphs.values()))
    if (folder / TOKENIZER_DIR).exists():
        shutil.rmtree(folder / TOKENIZER_DIR)
    tok = _tokenizer_record(tokenizer, folder / TOKENIZER_DIR)
    shutil.copyfile(Path(__file__).with_name("runtime.py"), folder / "runtime.py")  # the torch-free runner
    # 3. the manifest
    manifest = _manifest(model, specs, tok, graphs, folder, opset)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(folder, manifest)


def _manifest(model: nn.Module, specs: list[StateSpec], tok: dict[str, Any], graphs: dict[str, str], folder: Path,
              opset: int) -> dict[str, Any]:
    c = _config(model)
    names = [s.name for s in specs]
    files = {p.relative_to(folder).as_posix(): _file_record(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": opset, "torch_version": torch.__version__,
        "provenance": provenance(),
        "model_type": c.model_type, "architecture": type(model).__name__, "config": c.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": c.vocab_size, "max_positions": max_positions(cast(Any, model)),
        "bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"], "pad_token_id": tok["pad_token_id"],
        "tokenizer": tok,
        "graphs": graphs, "weights": WEIGHTS_FILE,
        "step": {"inputs": ["input_ids", *(f"state.{n}" for n in names)],
                 "outputs": ["logits", *(f"new_state.{n}" for n in names)]},
        "prefill": {"inputs": ["input_ids", "attention_mask"],
                    "outputs": ["logits", *(f"new_state.{n}" for n in names)]},
        "score": {"inputs": ["input_ids", "attention_mask"], "outputs": ["all_logits"]},
        "state": [{**asdict(s), "shape": list(s.shape)} for s in specs],
        "files": files,
    }


FORMATS = ("onnx",)


def export_checkpoint(checkpoint: str | Path, output: str | Path, format: str = "onnx", quantize: str | None = None,
                      opset: int = DEFAULT_OPSET) -> ExportResult:
    """``attnfree export``: load a run folder (or checkpoint-N) and export it in ``format`` into ``output``."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    from attnfree.checkpoints import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    return export_onnx(model, tokenizer, output, quantize=quantize, opset=opset)


# ----------------------------------------------------------------------------------------------
# PyTorch int8
# ----------------------------------------------------------------------------------------------


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every nn.Linear replaced by an int8 dynamically quantized one (CPU only).

    Weights are int8 with one symmetric scale per tensor (``torch.ao.quantization.quantize_dynamic``'s
    default); activations are quantized on the fly at each call, so the model still runs
    our ``generate``/decoding paths unchanged. Embeddings (and so the tied head's input side) stay float.
    """
    import copy

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)

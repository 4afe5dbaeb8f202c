"""ONNX export of the one-token recurrent step and of the parallel prefill, plus int8 dynamic quantization.

Two graphs per model, written with a ``manifest.json`` that a torch-free runner (``inference/runtime.py``) reads:

- ``prefill.onnx``: input_ids [B, T], attention_mask [B, T] (left padding allowed) -> ``logits`` [B, V] (last
  position), ``all_logits`` [B, T, V] (every position, for scoring) and the state after the prompt.
- ``step.onnx``: input_ids [B, 1] and the state -> ``logits`` [B, V] and the new state.

Both are the model itself, traced: the prefill is its parallel forward, the step its own one-token forward over a
cache rebuilt from the graph's inputs. Nothing here knows a family. The state is the model's ``RecurrentCache``
flattened into named tensors (``RecurrentCache.flatten``: ``layers.<i>.<sublayer>.<key>.<field>`` for each block's
state, then ``positions``, the real tokens seen per row), every one with the batch first; the empty state and its
layout come from the blocks' ``init_state`` (``empty_cache``). Inputs are named ``state.<name>``, outputs
``new_state.<name>``. So a new family exports as soon as its step is made of traceable tensor operations (the
contract tests check it with a toy family).

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
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MANIFEST = "manifest.json"
STEP_FILE, PREFILL_FILE = "step.onnx", "prefill.onnx"
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
    """(input_ids [B, T], attention_mask [B, T]) -> (logits [B, V] last position, all_logits [B, T, V], *state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _backbone(model)
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        logits = out.logits  # [B, T, V]
        return (logits[:, -1], logits, *(t for _, t in output_cache(out).flatten()))


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
        return list(Prefill(model)(ids, mask)[2:])  # type: ignore[arg-type]


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


def export_prefill(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET) -> list[StateSpec]:
    """Write the parallel prefill of ``model`` (dynamic B and T) to ``path``; returns its state layout."""
    specs = state_specs(model)
    # beyond a scan chunk, so the traced graph is the general one
    T = min(40, max(2, max_positions(cast(Any, model)) or 40))
    ids = torch.randint(0, _config(model).vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, : T // 4] = 0  # left padding: the masked path is the general one
    dyn = {0: "B", 1: "T"}
    _export(Prefill(model).eval(), (ids, mask), Path(path), ["input_ids", "attention_mask"],  # type: ignore[arg-type]
            ["logits", "all_logits", *(f"new_state.{s.name}" for s in specs)], (dyn, dyn), opset)
    return specs


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
    # 2. graphs, tokenizer, quantized copies
    export_step(model, folder / STEP_FILE, opset)
    export_prefill(model, folder / PREFILL_FILE, opset)
    if (folder / TOKENIZER_DIR).exists():
        shutil.rmtree(folder / TOKENIZER_DIR)
    tok = _tokenizer_record(tokenizer, folder / TOKENIZER_DIR)
    shutil.copyfile(Path(__file__).with_name("runtime.py"), folder / "runtime.py")  # the torch-free runner
    graphs = {"step": STEP_FILE, "prefill": PREFILL_FILE}
    if quantize == "int8":
        for name, file in list(graphs.items()):
            q = quantize_onnx_int8(folder / file, folder / file.replace(".onnx", ".int8.onnx"))
            graphs[f"{name}.int8"] = q.name
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
        "graphs": graphs,
        "step": {"inputs": ["input_ids", *(f"state.{n}" for n in names)],
                 "outputs": ["logits", *(f"new_state.{n}" for n in names)]},
        "prefill": {"inputs": ["input_ids", "attention_mask"],
                    "outputs": ["logits", "all_logits", *(f"new_state.{n}" for n in names)]},
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

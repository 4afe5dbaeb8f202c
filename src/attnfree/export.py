"""ONNX export of the one-token recurrent step and of the parallel prefill, plus int8 dynamic quantization.

Two graphs per model, written with a ``manifest.json`` that a torch-free runner (``attnfree.runtime``) reads:

- ``prefill.onnx``: input_ids [B, T], attention_mask [B, T] (left padding allowed) -> ``logits`` [B, V] (last
  position), ``all_logits`` [B, T, V] (every position, for scoring) and the state after the prompt.
- ``step.onnx``: input_ids [B, 1] and the state -> ``logits`` [B, V] and the new state.

The state is a flat, named list of tensors (``state_specs``), every one with the batch as its first axis. Inputs
are named ``state.<name>``, outputs ``new_state.<name>``. Per model:

- Fastformer, per layer i: ``layers.i.query.{s,z,m}`` and ``layers.i.key.{s,z,m}`` (the additive-pooling sums
  s [B, H, D], z [B, H] relative to the running max score m [B, H]), with convolution ``layers.i.conv``
  [B, C, K-1] (the last K-1 normalised inputs); ``positions`` [B] int64 counts the real tokens seen.
- Leviathan, per block i: time-ordered windows ``layers.i.{q,k,v,valid}`` ending at the last token: q [B, J, H, D],
  k [B, max(L)+J, H, D], v [B, max(L)+1, H, D], valid [B, max(L)+J] bool; plus ``positions``.

The PyTorch decoding cache keeps Leviathan's past in ring buffers indexed by a Python int (``seen % capacity``),
which a graph cannot carry; the window form shifts by one slot per step instead, so every read is at a fixed
index (position t - x sits at index n-1-x of a window of n). ``correlation_window_step`` is that step; the test
suite checks it against ``ops.correlation.correlation_step``.

Export goes through ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) with a dynamic batch and, for
the prefill, a dynamic T (the TorchScript exporter, ``dynamo=False``, fails on ``aten::cummax``). ONNX has no
cumulative max, which the additive pooling's parallel scan uses; ``_onnx_cummax`` gives it as a max over a
lower-triangular mask (the scan's chunks are short), and ``_onnx_roll`` a roll by a symbolic shift (the ring
buffers after a prefill of symbolic length).

Glossary: B batch, T time, H heads, D head size, C width, L lags, J segment, V vocabulary, K conv taps.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnfree.cache import RecurrentCache
from attnfree.layers.correlation import STATE_KEY, MultiHeadedCorrelation
from attnfree.models.compat import output_cache
from attnfree.models.fastformer import FastformerForCausalLM
from attnfree.models.leviathan import LeviathanForCausalLM, LeviathanModel
from attnfree.models.registry import max_positions
from attnfree.ops.additive import AdditiveState
from attnfree.ops.correlation.recurrent import softmax_dtype
from attnfree.ops.correlation.state import capacities, state_history
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
# Leviathan's step on time-ordered windows (a pure function of tensors)
# ----------------------------------------------------------------------------------------------


def correlation_window_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, lags: list[int], segment: int,
    qw: Tensor, kw: Tensor, vw: Tensor, valid: Tensor,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """One real token: q_t, k_t, v_t [B, H, D] and the windows before it -> (o_t [B, H, D], new windows).

    Windows end at the previous token: qw [B, J, H, D], kw [B, max(L)+J, H, D], vw [B, max(L)+1, H, D],
    valid [B, max(L)+J] bool (for kw's positions). Same math as ``correlation_step``:
        R_t(tau) = sum_{j<J} <q_{t-j}, k_{t-tau-j}> / sqrt(J D)  (terms with both positions real)
        a_t = softmax over the valid lags of R_t,   o_t = sum_tau a_t(tau) v_{t-tau}
    """
    # 1. shift every window by one slot and put the new token last (position t at index n-1)
    qw = torch.cat([qw[:, 1:], q_t.unsqueeze(1)], 1)
    kw = torch.cat([kw[:, 1:], k_t.unsqueeze(1)], 1)
    vw = torch.cat([vw[:, 1:], v_t.unsqueeze(1)], 1)
    valid = torch.cat([valid[:, 1:], torch.ones_like(valid[:, :1])], 1)
    # 2. fixed indices: position t-x sits at index n-1-x of a window of n
    J, nk, nv = qw.shape[1], kw.shape[1], vw.shape[1]
    iq = [J - 1 - j for j in range(segment)]  # [J] queries t-j
    ik = [[nk - 1 - tau - j for tau in lags] for j in range(segment)]  # [J, L] keys t-tau-j
    iv, iv_valid = [nv - 1 - tau for tau in lags], [nk - 1 - tau for tau in lags]  # [L] values t-tau
    ik_flat = [i for row in ik for i in row]
    # 3. scores over the segment, valid terms only
    B, H, D = q_t.shape
    qs = qw[:, iq]  # [B, J, H, D]
    ks = kw[:, ik_flat].view(B, segment, len(lags), H, D)  # [B, J, L, H, D]
    keep = valid[:, [nk - 1 - j for j in range(segment)]][:, :, None] & valid[:, ik_flat].view(B, segment, -1)
    prods = torch.einsum("bjhd,bjlhd->bjlh", qs, ks)
    R = torch.where(keep[..., None], prods, torch.zeros_like(prods)).sum(1) / math.sqrt(segment * D)  # [B, L, H]
    # 4. softmax over the valid lags, then mix the values
    lag_ok = valid[:, iv_valid][..., None]  # [B, L, 1]
    sdt = softmax_dtype(q_t.dtype)
    R = R.to(sdt).masked_fill(~lag_ok, torch.finfo(sdt).min)
    a = (torch.softmax(R, dim=1) * lag_ok).to(v_t.dtype)
    o_t = torch.einsum("blh,blhd->bhd", a, vw[:, iv])
    return o_t, (qw, kw, vw, valid)


# ----------------------------------------------------------------------------------------------
# Per-family state layouts and functional step modules
# ----------------------------------------------------------------------------------------------


def _fastformer_specs(model: FastformerForCausalLM) -> list[StateSpec]:
    c = model.config
    H, D, C = c.n_heads, c.hidden_size // c.n_heads, c.hidden_size
    specs = []
    for i in range(c.num_hidden_layers):
        if c.convolve:
            specs.append(StateSpec(f"layers.{i}.conv", ("B", C, c.kernel_size - 1), "float32", 0.0))
        for pool in ("query", "key"):
            specs += [StateSpec(f"layers.{i}.{pool}.s", ("B", H, D), "float32", 0.0),
                      StateSpec(f"layers.{i}.{pool}.z", ("B", H), "float32", 0.0),
                      StateSpec(f"layers.{i}.{pool}.m", ("B", H), "float32", float("-inf"))]
    return specs + [StateSpec("positions", ("B",), "int64", 0.0)]


def _fastformer_flatten(model: FastformerForCausalLM, cache: RecurrentCache) -> list[Tensor]:
    """The cache's tensors in the order of ``_fastformer_specs``."""
    flat: list[Tensor] = []
    for layer in cache.layers:
        if model.config.convolve:
            flat.append(layer["conv"])
        for pool in ("query", "key"):
            flat += list(layer[pool])
    return flat + [cache.seen_tokens]


def _fastformer_cache(model: FastformerForCausalLM, flat: list[Tensor]) -> RecurrentCache:
    """A RecurrentCache holding copies of ``flat`` (copies: the model's step updates its cache in place)."""
    c = model.config
    it = iter(t.clone() for t in flat)
    cache = RecurrentCache(c.num_hidden_layers, flat[-1].shape[0])
    for layer in cache.layers:
        if c.convolve:
            layer["conv"] = next(it)
        for pool in ("query", "key"):
            layer[pool] = AdditiveState(next(it), next(it), next(it))
    cache.seen_tokens, cache.steps = next(it), 1
    return cache


def _leviathan_sizes(model: LeviathanForCausalLM) -> tuple[list[int], int, int, int, tuple[int, int, int]]:
    c = model.config
    lags = [int(x) for x in c.lags]
    return lags, c.segment, c.n_heads, c.hidden_size // c.n_heads, capacities(lags[-1], c.segment)


def _leviathan_specs(model: LeviathanForCausalLM) -> list[StateSpec]:
    _, _, H, D, (cq, ck, cv) = _leviathan_sizes(model)
    specs = []
    for i in range(model.config.num_hidden_layers):
        specs += [StateSpec(f"layers.{i}.q", ("B", cq, H, D), "float32", 0.0),
                  StateSpec(f"layers.{i}.k", ("B", ck, H, D), "float32", 0.0),
                  StateSpec(f"layers.{i}.v", ("B", cv, H, D), "float32", 0.0),
                  StateSpec(f"layers.{i}.valid", ("B", ck), "bool", 0.0)]
    return specs + [StateSpec("positions", ("B",), "int64", 0.0)]


def _leviathan_flatten(model: LeviathanForCausalLM, cache: RecurrentCache, windows: tuple[int, int]) -> list[Tensor]:
    """Ring buffers -> time-ordered windows (``state_history``), q and v trimmed to their lengths ``windows``."""
    cq, cv = windows
    flat: list[Tensor] = []
    for layer in cache.layers:
        q, k, v, valid = state_history(layer[STATE_KEY])  # each max(L)+J long
        flat += [q[:, q.shape[1] - cq:], k, v[:, v.shape[1] - cv:], valid]
    return flat + [cache.seen_tokens]


class FastformerStep(nn.Module):
    """(input_ids [B, 1], *state) -> (logits [B, V], *new state): the model's own step on a copied cache."""

    def __init__(self, model: FastformerForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        cache = _fastformer_cache(self.model, list(flat))
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        return (out.logits[:, -1], *_fastformer_flatten(self.model, cache))


class LeviathanStep(nn.Module):
    """(input_ids [B, 1], *windows, positions [B]) -> (logits [B, V], *new windows, positions + 1).

    The block is written out here (h += Correlation(LN(h)); h += FFN(LN(h))) around the window step, with the
    model's own modules and weights; the test suite checks it against the model's cached decoding.
    """

    def __init__(self, model: LeviathanForCausalLM):
        super().__init__()
        if type(model.model) is not LeviathanModel:
            raise ValueError(f"export supports LeviathanForCausalLM with a plain backbone, got "
                             f"{type(model).__name__}")
        self.model = model
        self.lags, self.segment, self.heads, self.head_dim, _ = _leviathan_sizes(model)

    def forward(self, input_ids: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        backbone = self.model.model
        assert isinstance(backbone, LeviathanModel)
        B, positions = input_ids.shape[0], flat[-1]
        # 1. embeddings at each row's own next position
        h = backbone.embed(input_ids, None, positions.unsqueeze(1))  # [B, 1, C]
        new: list[Tensor] = []
        for i, block in enumerate(backbone.layers):
            # 2. correlation branch on the windows, then the FFN branch
            corr = cast(MultiHeadedCorrelation, cast(Any, block).correlation)
            q, k, v = corr.qkv(corr.norm(h)).view(B, 3, self.heads, self.head_dim).unbind(1)  # [B, H, D]
            o, windows = correlation_window_step(q, k, v, self.lags, self.segment, *flat[4 * i: 4 * i + 4])
            h = h + corr.dropout(corr.out(o.reshape(B, 1, -1)))
            h = h + cast(Any, block).ffn(h)
            new += windows
        # 3. final norm and head
        logits = self.model.lm_head(backbone.final_norm(h))[:, 0]  # [B, V]
        return (logits, *new, positions + 1)


class Prefill(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> (logits [B, V] last position, all_logits [B, T, V], *state).

    For Leviathan, max(L)+J padding positions are put in front of every prompt (masked out, so they change no
    output): the model's ring-buffer code branches on whether T reaches the buffer size, and a graph traced
    with one T must take the same branch for every T.
    """

    def __init__(self, model: FastformerForCausalLM | LeviathanForCausalLM):
        super().__init__()
        self.model = model
        # sizes read here, outside the traced forward (the config's lags are built anew on each read)
        self.windows: tuple[int, int] | None = None
        self.front = 0
        if not isinstance(model, FastformerForCausalLM):
            cq, ck, cv = _leviathan_sizes(model)[-1]
            self.windows, self.front = (cq, cv), ck

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        if self.front:  # [B, front + T]
            B = input_ids.shape[0]
            input_ids = torch.cat([input_ids.new_zeros(B, self.front), input_ids], 1)
            attention_mask = torch.cat([attention_mask.new_zeros(B, self.front), attention_mask], 1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        logits, cache = out.logits[:, self.front:], output_cache(out)  # [B, T, V], RecurrentCache
        if self.windows is None:
            state = _fastformer_flatten(self.model, cache)  # type: ignore[arg-type]
        else:
            state = _leviathan_flatten(self.model, cache, self.windows)  # type: ignore[arg-type]
        return (logits[:, -1], logits, *state)


def state_specs(model: nn.Module) -> list[StateSpec]:
    """The flat state layout of ``model`` (ValueError for a model the export does not cover)."""
    if isinstance(model, FastformerForCausalLM):
        return _fastformer_specs(model)
    if isinstance(model, LeviathanForCausalLM) and type(model.model) is LeviathanModel:
        return _leviathan_specs(model)
    raise ValueError(f"ONNX export supports FastformerForCausalLM and LeviathanForCausalLM (plain backbone); "
                     f"got {type(model).__name__}")


def step_module(model: nn.Module) -> nn.Module:
    """The functional one-token step of ``model`` (see ``FastformerStep``, ``LeviathanStep``)."""
    state_specs(model)  # raises for unsupported models
    return FastformerStep(model) if isinstance(model, FastformerForCausalLM) else LeviathanStep(model)  # type: ignore[arg-type]


def empty_state(specs: list[StateSpec], batch: int) -> list[Tensor]:
    """Torch tensors of a state that has seen nothing (for tests and for decoding without a prompt)."""
    dtypes = {"float32": torch.float32, "int64": torch.long, "bool": torch.bool}
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


def _onnx_roll(x: Any, shifts: Any, dims: Any = ()) -> Any:
    """aten.roll along one axis with a shift that may be symbolic (the ring buffers' ``seen % capacity``):
    out = concat(x[n-s:], x[:n-s]) along that axis, s = shift mod n."""
    op = _opset()
    if len(shifts) != 1 or len(dims) != 1:
        raise ValueError(f"the ONNX roll translation covers one axis, got shifts={shifts}, dims={dims}")
    axis = int(dims[0])
    axes = op.Constant(value_ints=[axis])
    shift = shifts[0]
    shift = op.Constant(value_ints=[shift]) if isinstance(shift, int) else op.Reshape(shift, op.Constant(
        value_ints=[1]))
    n = op.Shape(x, start=axis, end=axis + 1) if axis != -1 else op.Shape(x, start=-1)
    cut = op.Sub(n, op.Mod(op.Add(op.Mod(shift, n), n), n))  # n - (shift mod n), in [1, n]
    zero = op.Constant(value_ints=[0])
    return op.Concat(op.Slice(x, cut, n, axes), op.Slice(x, zero, cut, axes), axis=axis)


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic: tuple[Any, ...], opset: int) -> None:
    """torch.onnx.export (dynamo) of module(*args) into one self-contained file."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=inputs, output_names=outputs, opset_version=opset,
            dynamic_shapes=dynamic, custom_translation_table={torch.ops.aten.cummax.default: _onnx_cummax,
                                      torch.ops.aten.roll.default: _onnx_roll},
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
    from attnfree.training import load_checkpoint

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

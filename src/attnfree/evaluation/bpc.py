"""Bits per character over a whole evaluation split, for any causal LM that returns ``.logits``.

BPC = (total cross-entropy in nats over every predicted token of the split) / (characters in the
split) / ln 2, whatever the tokenizer. No token is dropped: the last partial block counts.

Windows (both modes are one loop, after the Hugging Face perplexity guide's strided evaluation):
window ``w`` feeds ``stream[b:e]`` (at most ``block_size`` inputs, ``b = w * stride``) and predicts
``stream[b+1:e+1]``; it scores only the targets that no earlier window scored. With
``stride == block_size`` these are non-overlapping blocks (each target conditioned only on its own
block); with ``stride < block_size`` every target after the first window sees at least
``block_size - stride`` tokens of context. Glossary: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnfree.checkpoints import load_checkpoint, run_settings
from attnfree.data import load_corpus, tokenize_cached
from attnfree.models.registry import max_positions

IGNORE = -100  # marks context-only targets


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate_bpc`` measured; ``protocol`` says how, in one sentence for reports."""

    bpc: float
    nats_per_char: float
    loss_per_token: float  # mean nats per predicted token
    perplexity: float  # token-level: exp(loss_per_token)
    total_nats: float
    n_tokens: int  # predicted (scored) tokens
    n_chars: int
    block_size: int
    stride: int
    protocol: str


def bpc_from_loss(loss_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Bits per character from a mean token loss in nats: ``loss * n_tokens / n_chars / ln 2``."""
    if n_chars < 1:
        raise ValueError(f"n_chars must be >= 1, got {n_chars}")
    return loss_per_token * n_tokens / n_chars / math.log(2)


def eval_windows(n_inputs: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, n_scored)`` over ``n_inputs`` input positions.

    Inputs ``stream[begin:end]`` predict ``stream[begin+1:end+1]``; the last ``n_scored`` targets
    count. Every target is scored exactly once: ``sum(n_scored) == n_inputs``.
    """
    windows, prev_end = [], 0
    for begin in range(0, n_inputs, stride):
        end = min(begin + block_size, n_inputs)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_inputs:
            break
    return windows


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` each (only the last may be short),
    so no padding is ever needed."""
    batches: list[list[tuple[int, int, int]]] = []
    for window in windows:
        last = batches[-1] if batches else None
        same_len = last is not None and last[0][1] - last[0][0] == window[1] - window[0]
        if last is not None and same_len and len(last) < batch_size:
            last.append(window)
        else:
            batches.append([window])
    return batches


def _model_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the model accepts it: evaluation needs no KV cache / recurrent state."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _batch_nats(
    model: torch.nn.Module,
    stream: torch.Tensor,
    batch: list[tuple[int, int, int]],
    device: torch.device,
    extra: dict[str, Any],
) -> float:
    """Summed cross-entropy (nats) of the scored targets of one batch of equal-length windows."""
    x = torch.stack([stream[b:e] for b, e, _ in batch]).to(device)  # [B, T]
    y = torch.stack([stream[b + 1 : e + 1] for b, e, _ in batch]).to(device)  # [B, T]
    for row, (b, e, n_scored) in enumerate(batch):
        y[row, : e - b - n_scored] = IGNORE  # context only: scored by an earlier window
    logits = model(input_ids=x, attention_mask=torch.ones_like(x), **extra).logits  # [B, T, V]
    scored = y != IGNORE  # [B, T]
    picked = logits[scored]  # [N, V]: upcast only the scored rows (sliding windows score few)
    picked = picked if picked.dtype == torch.float64 else picked.float()
    return F.cross_entropy(picked, y[scored], reduction="sum").item()


def _protocol(n_tokens: int, n_chars: int, block_size: int, stride: int, bos: bool) -> str:
    mode = (
        f"non-overlapping blocks of {block_size} tokens (last partial block included)"
        if stride == block_size
        else f"sliding windows of {block_size} tokens, stride {stride} "
        f"(>= {block_size - stride} tokens of context per scored token)"
    )
    first = "BOS prepended, so every token is predicted" if bos else "no BOS: the first token is context only"
    return (
        f"BPC = total cross-entropy (nats) over all {n_tokens} predicted tokens / {n_chars} characters "
        f"/ ln 2; {mode}; {first}"
    )


def _check(stream: torch.Tensor, n_chars: int, block_size: int, stride: int, batch_size: int) -> None:
    if stream.dim() != 1 or stream.numel() < 2:
        raise ValueError(f"need a 1-D stream of >= 2 tokens (BOS included), got shape {tuple(stream.shape)}")
    if block_size < 1 or not 1 <= stride <= block_size:
        raise ValueError(f"need block_size >= 1 and 1 <= stride <= block_size, got {block_size}, {stride}")
    if n_chars < 1 or batch_size < 1:
        raise ValueError(f"n_chars and batch_size must be >= 1, got {n_chars}, {batch_size}")


@torch.no_grad()
def evaluate_bpc(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    n_chars: int,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 8,
    bos_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Score the whole token stream ``tokens`` [T] of a split of ``n_chars`` characters.

    ``stride=None`` means ``block_size`` (non-overlapping blocks). With ``bos_token_id`` the stream is
    prefixed by it so the first token is predicted too. Cross-entropy is computed here in float32 (or
    float64) with ``reduction='sum'`` from ``model(input_ids, attention_mask).logits`` [B, T, V]; the
    model's own loss is never used. The model runs in eval mode; its training flag is restored.
    """
    stride = block_size if stride is None else stride
    stream = torch.as_tensor(tokens, dtype=torch.long).flatten().cpu()
    if bos_token_id is not None:
        stream = torch.cat([torch.tensor([bos_token_id]), stream])
    _check(stream, n_chars, block_size, stride, batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = eval_windows(stream.numel() - 1, block_size, stride)
    was_training, extra = model.training, _model_kwargs(model)
    model.eval()
    try:
        batches = _batches(windows, batch_size)
        total = sum(_batch_nats(model, stream, batch, device, extra) for batch in batches)
    finally:
        model.train(was_training)
    n_tokens = stream.numel() - 1
    loss = total / n_tokens
    return EvalResult(
        bpc=bpc_from_loss(loss, n_tokens, n_chars),
        nats_per_char=total / n_chars,
        loss_per_token=loss,
        perplexity=math.exp(min(loss, 700.0)),
        total_nats=total,
        n_tokens=n_tokens,
        n_chars=n_chars,
        block_size=block_size,
        stride=stride,
        protocol=_protocol(n_tokens, n_chars, block_size, stride, bos_token_id is not None),
    )


def checkpoint_split(path: str | Path, data: str, data_dir: str | None = None
                     ) -> tuple[torch.nn.Module, Any, torch.Tensor, int]:
    """A checkpoint's model and tokenizer, and the validation split of ``data`` as tokens and characters."""
    model, tokenizer = load_checkpoint(path)
    corpus = load_corpus(data, data_dir=data_dir)
    return model, tokenizer, tokenize_cached(corpus.valid_text, tokenizer), len(corpus.valid_text)


def evaluate_checkpoint(
    path: str | Path,
    data: str,
    data_dir: str | None = None,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    bos: bool = True,
) -> EvalResult:
    """BPC of a checkpoint on the validation split of ``data``. ``block_size`` defaults to the run's
    training block size (from run.json, the run's for a checkpoint-N folder), else the model's position limit."""
    model, tokenizer = load_checkpoint(path)
    if block_size is None:
        settings = run_settings(path)
        block_size = settings["block_size"] if settings is not None else max_positions(model)
        if block_size is None:
            raise ValueError("the model has no position limit and no run.json records its training block size: "
                             "pass block_size (--block-size)")
    limit = max_positions(model)
    if limit is not None and block_size > limit:
        raise ValueError(f"block_size {block_size} exceeds the model's n_positions={limit}")
    if stride is not None and not 1 <= stride <= block_size:
        raise ValueError(f"stride {stride} must be in [1, block_size={block_size}]")
    corpus = load_corpus(data, data_dir=data_dir)
    tokens = tokenize_cached(corpus.valid_text, tokenizer)
    return evaluate_bpc(model, tokens, len(corpus.valid_text), block_size, stride=stride, batch_size=batch_size,
                        bos_token_id=tokenizer.bos_token_id if bos else None)


@dataclass(frozen=True)
class ContextResult:
    """BPC with ``context`` tokens of window (None: the model cannot take that many positions)."""

    context: int
    stride: int
    result: EvalResult | None
    note: str = ""


def evaluate_contexts(model: torch.nn.Module, tokens: torch.Tensor, n_chars: int, contexts: list[int],
                      stride_fraction: float = 0.5, bos_token_id: int | None = None,
                      tokens_per_batch: int = 16384) -> list[ContextResult]:
    """BPC at each context length L: sliding windows of L tokens, stride ``L * stride_fraction`` (so every scored
    token after the first window has at least L - stride tokens before it). Lengths beyond the model's learned
    positions are skipped with a note (a GPT-2 is reported up to its n_positions only)."""
    from attnfree.models.registry import max_positions

    if not 0 < stride_fraction <= 1:
        raise ValueError(f"stride_fraction must be in (0, 1], got {stride_fraction}")
    if not contexts or any(L < 1 for L in contexts):
        raise ValueError(f"contexts must be positive lengths, got {contexts}")
    limit = max_positions(model)  # type: ignore[arg-type]
    out = []
    for L in contexts:
        stride = max(1, int(L * stride_fraction))
        if limit is not None and L > limit:
            out.append(ContextResult(L, stride, None, f"beyond the model's n_positions={limit}"))
            continue
        result = evaluate_bpc(model, tokens, n_chars, L, stride=stride, batch_size=max(1, tokens_per_batch // L),
                              bos_token_id=bos_token_id)
        out.append(ContextResult(L, stride, result))
    return out

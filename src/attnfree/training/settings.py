"""Everything one training run needs (``TrainSettings``), validated before anything slow starts.

Each field's ``metadata["help"]`` is its documentation and its ``--help`` text in the CLI (``attnfree train`` makes
one flag per field). ``_OWNED_ARGS`` names the ``TrainingArguments`` fields that a setting owns, so
``extra_training_args`` cannot set them behind its back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from attnfree.models.registry import ModelSize, parse_model_spec


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainSettings:
    """Everything one training run needs. Each field's ``metadata["help"]`` is its documentation (and
    its ``--help`` text in the CLI). Invalid values raise ValueError naming the field."""

    # model
    model: str = field(default="fastformer", metadata=_doc(
        "model name from attnfree.models.registry.MODELS, optionally with overrides: 'fastformer:residual=normed'"))
    model_overrides: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "extra config fields for the model (e.g. {'kernel_size': 8}); applied after the spec's own"))
    hidden_size: int = field(default=128, metadata=_doc("model width C"))
    n_heads: int = field(default=4, metadata=_doc("heads H (hidden_size must be divisible by it)"))
    num_layers: int = field(default=4, metadata=_doc("layers (fastformer-conv uses one fewer)"))
    n_positions: int | None = field(default=None, metadata=_doc(
        "longest sequence the model accepts (learned positions); None: equal to block_size"))
    dropout: float = field(default=0.0, metadata=_doc("dropout probability in [0, 1)"))
    # data
    data: str = field(default="tinyshakespeare", metadata=_doc(
        "corpus: a preset (tinyshakespeare, wikitext2-offline, shakespeare), a text file, "
        "'train.txt,valid.txt', a folder of .txt, or a Hugging Face dataset name"))
    data_dir: str | None = field(default=None, metadata=_doc(
        "the data bundle folder for presets and the gpt2 tokenizer (None: $ATTNFREE_DATA or ../shared/data)"))
    tokenizer: str = field(default="byte", metadata=_doc(
        "byte, gpt2, bpe:N (trained on the training split), or a saved tokenizer folder"))
    block_size: int = field(default=64, metadata=_doc("training sequence length T in tokens"))
    # optimisation
    batch_size: int = field(default=12, metadata=_doc(
        "sequences per device per micro-batch (global batch = batch_size * grad_accum * processes)"))
    grad_accum: int = field(default=1, metadata=_doc("gradient accumulation steps per optimizer step"))
    max_steps: int = field(default=2000, metadata=_doc("optimizer steps (also the length of the LR schedule)"))
    max_seconds: float | None = field(default=None, metadata=_doc(
        "wall-clock budget in seconds of training (evaluation and checkpoint time excluded); stops cleanly"))
    lr: float = field(default=1e-3, metadata=_doc("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.01, metadata=_doc("AdamW weight decay (not on biases and norms)"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_doc("AdamW betas"))
    warmup_steps: int = field(default=0, metadata=_doc("linear warm-up steps"))
    lr_scheduler: str = field(default="linear", metadata=_doc(
        "transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."))
    max_grad_norm: float = field(default=1.0, metadata=_doc("gradient clipping norm (0 disables)"))
    # evaluation
    eval_every: int = field(default=0, metadata=_doc("validation BPC every this many steps (0: only at the end)"))
    eval_stride: int | None = field(default=None, metadata=_doc(
        "evaluation window stride in tokens (None: block_size, i.e. non-overlapping blocks)"))
    eval_batch_size: int = field(default=16, metadata=_doc("windows per evaluation batch"))
    eval_max_chars: int | None = field(default=None, metadata=_doc(
        "score only the first N characters of the validation split in periodic evals (the final eval "
        "always scores the whole split)"))
    eval_bos: bool = field(default=True, metadata=_doc("prepend BOS so the first validation token is scored"))
    # run
    seed: int = field(default=0, metadata=_doc("seed for weights, data windows and dropout"))
    output_dir: str = field(default="runs/train", metadata=_doc("run folder: checkpoints, model, run.json"))
    resume: bool | str = field(default=False, metadata=_doc(
        "True: continue from the last checkpoint in output_dir (fresh start if none); or a checkpoint path"))
    save_every: int = field(default=0, metadata=_doc("checkpoint every this many steps (0: no checkpoints)"))
    log_every: int = field(default=10, metadata=_doc("log the training loss every this many steps"))
    report_to: list[str] = field(default_factory=list, metadata=_doc(
        "experiment trackers: tensorboard, wandb, mlflow, ... (when installed); empty: none"))
    bf16: bool = field(default=False, metadata=_doc(
        "bfloat16 mixed precision: matmuls under torch.autocast in bfloat16, weights and optimizer in float32"))
    fp16: bool = field(default=False, metadata=_doc(
        "float16 mixed precision (autocast, with dynamic loss scaling); not together with bf16"))
    compile: bool = field(default=False, metadata=_doc(
        "torch.compile the model for training (inductor; the first step compiles, about a minute on a small CPU); "
        "evaluation and generation run the eager model"))
    threads: int | None = field(default=None, metadata=_doc(
        "torch CPU threads for this process (None: torch's default); sets torch.set_num_threads"))
    progress: bool = field(default=True, metadata=_doc("show progress bars"))
    extra_training_args: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "any other transformers.TrainingArguments field, passed through (e.g. {'save_total_limit': 2})"))

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1])) if len(self.betas) == 2 else self.betas
        self.report_to = list(self.report_to)
        _validate(self)

    @property
    def positions(self) -> int:
        """The model's n_positions: the explicit value, else block_size."""
        return self.n_positions if self.n_positions is not None else self.block_size

    @property
    def size(self) -> ModelSize:
        return ModelSize(self.hidden_size, self.n_heads, self.num_layers, self.positions, self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        """Inverse of ``to_dict`` (JSON lists become tuples where needed); unknown keys are a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainSettings field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)


def _fail(name: str, why: str, value: Any) -> None:
    raise ValueError(f"TrainSettings.{name} {why}, got {value!r}")


def _check_ints(s: TrainSettings, names: Sequence[str], minimum: int, optional: bool = False) -> None:
    for name in names:
        value = getattr(s, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            _fail(name, f"must be an integer >= {minimum}" + (" or None" if optional else ""), value)


def _check_training_args(extra: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in extra:
        if key in _OWNED_ARGS:
            _fail("extra_training_args", f"must not set {key!r}: set TrainSettings.{_OWNED_ARGS[key]} instead", key)
        if key not in known:
            _fail("extra_training_args", "holds a key that is not a TrainingArguments field", key)


def _validate(s: TrainSettings) -> None:
    """Every check that needs no file or model: one ValueError naming the first bad field."""
    parse_model_spec(s.model)  # unknown name or malformed overrides
    _check_ints(s, ("hidden_size", "n_heads", "num_layers", "block_size", "batch_size", "grad_accum",
                    "max_steps", "eval_batch_size", "log_every"), 1)
    _check_ints(s, ("warmup_steps", "eval_every", "save_every"), 0)
    _check_ints(s, ("n_positions", "eval_stride", "eval_max_chars", "threads"), 1, optional=True)
    if s.hidden_size % s.n_heads:  # (ModelSize checks it too; here the message names the setting)
        _fail("hidden_size", f"must be divisible by n_heads={s.n_heads}", s.hidden_size)
    if s.block_size > s.positions:
        _fail("block_size", f"exceeds the model's n_positions={s.positions}", s.block_size)
    if s.eval_stride is not None and s.eval_stride > s.block_size:
        _fail("eval_stride", f"must be <= block_size={s.block_size}", s.eval_stride)
    if not 0.0 <= s.dropout < 1.0:
        _fail("dropout", "must be in [0, 1)", s.dropout)
    if not s.lr > 0:
        _fail("lr", "must be > 0", s.lr)
    if not s.weight_decay >= 0 or not s.max_grad_norm >= 0:
        _fail("weight_decay" if not s.weight_decay >= 0 else "max_grad_norm", "must be >= 0",
              min(s.weight_decay, s.max_grad_norm))
    if len(s.betas) != 2 or not all(0.0 <= b < 1.0 for b in s.betas):
        _fail("betas", "must be two numbers in [0, 1)", s.betas)
    if s.max_seconds is not None and not s.max_seconds > 0:
        _fail("max_seconds", "must be > 0 or None", s.max_seconds)
    if not isinstance(s.resume, (bool, str)):
        _fail("resume", "must be a bool or a checkpoint path", s.resume)
    if not s.data or not s.tokenizer or not s.output_dir:
        _fail("data" if not s.data else "tokenizer" if not s.tokenizer else "output_dir", "must be non-empty", "")
    if s.bf16 and s.fp16:
        _fail("fp16", "must not be set together with bf16 (choose one mixed precision)", s.fp16)
    _check_training_args(s.extra_training_args)


# TrainingArguments fields that TrainSettings sets itself: the one source of truth for each.
_OWNED_ARGS = {
    "output_dir": "output_dir", "max_steps": "max_steps", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "learning_rate": "lr", "weight_decay": "weight_decay",
    "adam_beta1": "betas", "adam_beta2": "betas", "warmup_steps": "warmup_steps",
    "lr_scheduler_type": "lr_scheduler", "max_grad_norm": "max_grad_norm", "seed": "seed",
    "logging_steps": "log_every", "save_steps": "save_every", "report_to": "report_to", "bf16": "bf16",
    "fp16": "fp16", "torch_compile": "compile", "disable_tqdm": "progress",
}

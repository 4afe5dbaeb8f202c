"""Training through ``transformers.Trainer``: callbacks, checkpoints, resume, and the ``run.json`` every run
leaves behind.

One call, ``train(TrainSettings(...))``, does everything in order:

1. validate the settings (``TrainSettings.__post_init__``) and build ``TrainingArguments``;
2. load the corpus, build the tokenizer (saved into the run folder), tokenize (cached);
3. build the model (seeded) and check that ``block_size`` fits its positions;
4. make ``max_steps * batch * accum * world`` random windows whose item i depends only on (seed, i), and
   feed them in order (no reshuffling): resumed, 1-process and N-process runs see the same global batches;
5. train, with callbacks for a clock that excludes evaluation and checkpoint time, periodic validation
   BPC, a wall-clock budget and the tokenizer copied into every checkpoint;
6. score the whole validation split, save model (safetensors), tokenizer and ``run.json``.

Every bad input fails in steps 1-4, before the first training step, with a one-line ValueError or
FileNotFoundError. Only the main process (rank 0) writes files or evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import SequentialSampler
from transformers import (
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from attnfree.checkpoints import RUN_FILE
from attnfree.data import (
    Corpus,
    RandomWindowDataset,
    TextTokenizer,
    load_corpus,
    load_saved_tokenizer,
    load_tokenizer,
    tokenize_cached,
)
from attnfree.evaluation.bpc import EvalResult, evaluate_bpc
from attnfree.models.decode_state import decode_state_bytes
from attnfree.models.registry import build_model, count_parameters, max_positions
from attnfree.provenance import provenance
from attnfree.training.settings import TrainSettings

# ----------------------------------------------------------------------------------------------
# The result of a run (mirrors run.json)
# ----------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run measured; ``run.json`` holds exactly these fields."""

    model: str
    parameters: int
    bpc: float
    nats_per_char: float
    loss_per_token: float
    perplexity: float
    tokens_per_second: float  # training tokens / training seconds (evaluation and checkpointing excluded)
    peak_memory_mb: float  # CUDA max allocated on GPU; max resident set size of the process on CPU
    wall_seconds: float  # the whole train() call: data, training, evals, saving
    train_seconds: float  # training only
    steps: int
    tokens_trained: int
    stopped_by: str  # "max_steps" or "max_seconds"
    data_protocol: str
    eval_protocol: str
    eval_history: list[dict[str, Any]]  # {"step", "seconds", "bpc", "nats_per_char", "loss_per_token", "chars"}
    train_history: list[dict[str, Any]]  # {"step", "seconds", "loss", "learning_rate"}
    world_size: int
    device: str
    output_dir: str
    settings: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)  # versions and source revision (attnfree.provenance)
    budget: dict[str, Any] | None = None  # compare --budget-seconds: the budget, the probe and the planned steps
    decode_state_bytes: int | None = None  # what one sequence carries to its next token after block_size tokens

    def to_json(self, path: str | Path) -> Path:
        """Write the record atomically (a process stopped mid-write leaves no half file that reads as finished)."""
        out = Path(path)
        partial = out.with_name(f"{out.name}.partial")
        partial.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        partial.replace(out)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> RunResult:
        file = Path(path)
        if file.is_dir():
            file = file / RUN_FILE
        if not file.is_file():
            raise FileNotFoundError(f"run file {file} not found")
        record = json.loads(file.read_text())
        known = {f.name for f in dataclasses.fields(cls)}  # a newer attnfree's record may hold more fields
        return cls(**{k: v for k, v in record.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------


class TrainClock(TrainerCallback):
    """Seconds spent training, excluding evaluation (``pause``) and checkpoint saving.

    On resume it continues from the last ``train_seconds`` logged in the restored trainer state.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.start = time.perf_counter()
        self.paused = 0.0
        self.mark = self.start  # end of the last step's own work

    @property
    def seconds(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.paused

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.mark = time.perf_counter()
            self.paused += self.mark - begin

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        logged = [h["train_seconds"] for h in state.log_history if "train_seconds" in h]
        self.offset = logged[-1] if logged else 0.0
        self.start, self.paused = time.perf_counter(), 0.0
        self.mark = self.start

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.mark = time.perf_counter()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        now = time.perf_counter()
        self.paused += now - self.mark
        self.mark = now

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["train_seconds"] = round(self.seconds, 3)


@dataclass
class EvalSplit:
    """Tokens of (part of) the validation split and how many characters they cover."""

    tokens: torch.Tensor  # [N]
    n_chars: int


class PeriodicEval(TrainerCallback):
    """Validation BPC every ``every`` steps on the main process, appended to the trainer's log history
    (so it survives resume) with the step and the training seconds so far."""

    def __init__(self, clock: TrainClock, split: EvalSplit, settings: TrainSettings, bos_token_id: int | None):
        self.clock, self.split, self.settings, self.bos = clock, split, settings, bos_token_id
        self.log: Callable[[dict[str, float]], None] | None = None  # Trainer.log: forwards to report_to trackers

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        every = self.settings.eval_every
        if not every or state.global_step % every or state.global_step >= state.max_steps or model is None:
            return
        if not state.is_world_process_zero:
            return
        with self.clock.pause():
            result = run_eval(model, self.split, self.settings, self.bos)
        record = eval_record(state.global_step, self.clock.seconds, result)
        state.log_history.append(record)
        if self.log is not None:
            should_log = control.should_log  # Trainer.log clears it: keep this step's loss log
            self.log({"eval_bpc": result.bpc, "eval_nats_per_char": result.nats_per_char,
                      "eval_loss_per_token": result.loss_per_token})
            control.should_log = should_log
        print(f"[attnfree] step {record['step']}: validation bpc {record['bpc']:.4f} "
              f"({record['chars']} chars) after {record['seconds']:.1f}s of training", file=sys.stderr)


class TimeBudget(TrainerCallback):
    """Stops training once the clock passes ``max_seconds``; the main process decides for everyone."""

    def __init__(self, clock: TrainClock, max_seconds: float):
        self.clock, self.max_seconds = clock, max_seconds
        self.stopped = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        stop = torch.tensor([float(self.clock.seconds >= self.max_seconds)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(stop, src=0)  # every rank must stop at the same step
        if stop.item() and state.global_step < state.max_steps:
            self.stopped = True
            control.should_training_stop = True


class SaveTokenizer(TrainerCallback):
    """Copies the tokenizer into every checkpoint folder, so each checkpoint loads on its own."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.tokenizer.save(folder)


class _InOrderTrainer(Trainer):
    """Feeds the dataset in index order: the windows are already random, and a fixed order makes
    resumed and multi-process runs see exactly the batches of an uninterrupted single-process run."""

    def _get_train_sampler(self, train_dataset: Any = None) -> SequentialSampler:
        return SequentialSampler(cast(Sized, train_dataset if train_dataset is not None else self.train_dataset))


# ----------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------


def run_eval(model: torch.nn.Module, split: EvalSplit, settings: TrainSettings, bos: int | None) -> EvalResult:
    """``evaluate_bpc`` with the run's block size, stride and batch size."""
    return evaluate_bpc(model, split.tokens, split.n_chars, settings.block_size, stride=settings.eval_stride,
                        batch_size=settings.eval_batch_size, bos_token_id=bos if settings.eval_bos else None)


def eval_record(step: int, seconds: float, result: EvalResult) -> dict[str, Any]:
    return {"step": step, "seconds": round(seconds, 3), "bpc": result.bpc, "nats_per_char": result.nats_per_char,
            "loss_per_token": result.loss_per_token, "chars": result.n_chars}


def peak_memory_mb(device: torch.device | str) -> float:
    """CUDA max allocated on a GPU; else the process's max resident set size (Linux reports KiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------


@dataclass
class _Data:
    corpus: Corpus
    tokenizer: TextTokenizer
    train_tokens: torch.Tensor  # [N]
    valid: EvalSplit  # the whole validation split
    periodic: EvalSplit  # what periodic evals score (a prefix when eval_max_chars is set)


def training_arguments(s: TrainSettings) -> TrainingArguments:
    """``TrainingArguments`` from the settings (``extra_training_args`` last). CPU unless CUDA is present."""
    values: dict[str, Any] = {
        "output_dir": s.output_dir, "max_steps": s.max_steps, "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.grad_accum, "learning_rate": s.lr, "weight_decay": s.weight_decay,
        "adam_beta1": s.betas[0], "adam_beta2": s.betas[1], "warmup_steps": s.warmup_steps,
        "lr_scheduler_type": s.lr_scheduler, "max_grad_norm": s.max_grad_norm, "seed": s.seed,
        "logging_steps": s.log_every, "logging_first_step": True, "eval_strategy": "no",
        "save_strategy": "steps" if s.save_every else "no", "save_steps": s.save_every or 500,
        "report_to": s.report_to or "none", "bf16": s.bf16, "fp16": s.fp16,
        "torch_compile": s.compile, "disable_tqdm": not s.progress,
        "use_cpu": not torch.cuda.is_available(), "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
    }
    values.update(s.extra_training_args)
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid training arguments: {str(err).strip().splitlines()[0]}") from None


def _run_tokenizer(s: TrainSettings, corpus: Corpus, args: TrainingArguments) -> TextTokenizer:
    """Main process: build the tokenizer (reusing the run folder's one when resuming) and save it into the
    run folder. Other processes (which run after it) load that saved copy, so all share one tokenizer."""
    out = Path(s.output_dir)
    if (s.resume or not args.should_save) and (out / "attnfree_tokenizer.json").is_file():
        return load_saved_tokenizer(out)
    tokenizer = load_tokenizer(s.tokenizer, train_text=corpus.train_text, data_dir=s.data_dir)
    if args.should_save:
        tokenizer.save(out)
    return tokenizer


def _load_data(s: TrainSettings, args: TrainingArguments) -> _Data:
    """1-2: corpus, tokenizer and tokens, main process first (it writes the tokenizer and token cache)."""
    with args.main_process_first(local=False, desc="tokenizing"):
        corpus = load_corpus(s.data, data_dir=s.data_dir)
        tokenizer = _run_tokenizer(s, corpus, args)
        train_tokens = tokenize_cached(corpus.train_text, tokenizer)
        valid = EvalSplit(tokenize_cached(corpus.valid_text, tokenizer), len(corpus.valid_text))
        periodic = valid
        if s.eval_max_chars is not None and s.eval_max_chars < len(corpus.valid_text):
            head = corpus.valid_text[: s.eval_max_chars]
            periodic = EvalSplit(tokenize_cached(head, tokenizer), len(head))
    if valid.tokens.numel() < 1:
        raise ValueError(f"validation split of {s.data!r} has no tokens")
    return _Data(corpus, tokenizer, train_tokens, valid, periodic)


def _build_model(s: TrainSettings, tokenizer: TextTokenizer) -> PreTrainedModel:
    """3: the seeded model, checked against block_size."""
    set_seed(s.seed)
    model = build_model(s.model, s.size, tokenizer, s.model_overrides)
    limit = max_positions(model)
    if limit is not None and s.block_size > limit:
        raise ValueError(f"block_size {s.block_size} exceeds the model's n_positions={limit}")
    return model


def _resume_path(s: TrainSettings) -> str | None:
    if isinstance(s.resume, str):
        if not Path(s.resume).is_dir():
            raise FileNotFoundError(f"checkpoint {s.resume} to resume from not found")
        return s.resume
    if s.resume and Path(s.output_dir).is_dir():
        last = get_last_checkpoint(s.output_dir)
        if last is None:
            print(f"[attnfree] no checkpoint in {s.output_dir}; starting fresh", file=sys.stderr)
        return last
    return None


def _histories(state: TrainerState) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    evals = [h for h in state.log_history if "bpc" in h]
    losses = [{"step": h["step"], "seconds": h.get("train_seconds"), "loss": h["loss"],
               "learning_rate": h.get("learning_rate")} for h in state.log_history if "loss" in h]
    return evals, losses


def enable_cpu_fp16(trainer: Trainer) -> None:
    """Make ``fp16=True`` real on CPU: float16 autocast plus a dynamic loss scaler (``torch.amp.GradScaler``).

    accelerate (1.15) accepts mixed_precision="fp16" on CPU but then does nothing: no autocast, no scaler, a
    silent float32 run. Its own fp16 machinery works on CPU once switched on, and it is switched on here, before
    ``train()`` prepares the model: ``prepare`` wraps forward in ``torch.autocast("cpu", torch.float16)``,
    ``backward`` scales the loss, gradient clipping unscales first, and the optimizer step skips (and lowers the
    scale) when a gradient overflowed.
    """
    accelerator = trainer.accelerator
    if accelerator.mixed_precision != "fp16":
        raise ValueError(f"enable_cpu_fp16 needs TrainingArguments(fp16=True), got {accelerator.mixed_precision!r}")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")


def train(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> RunResult:
    """Train ``settings.model`` and return (and, on the main process, save) its ``RunResult``.

    ``callbacks`` are added after ours (tests use one to interrupt a run). Under ``torchrun`` or
    ``accelerate launch`` every process calls this; they all return the main process's result.
    """
    wall = time.perf_counter()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    # 1-4: everything that can fail does so here, before training
    args = training_arguments(settings)
    data = _load_data(settings, args)
    model = _build_model(settings, data.tokenizer)
    world = args.world_size
    samples = settings.max_steps * settings.batch_size * settings.grad_accum * world
    dataset = RandomWindowDataset(data.train_tokens, settings.block_size, samples, seed=settings.seed)
    resume_from = _resume_path(settings)
    # 5: train
    clock = TrainClock()
    budget = TimeBudget(clock, settings.max_seconds) if settings.max_seconds else None
    evaluator = PeriodicEval(clock, data.periodic, settings, data.tokenizer.bos_token_id)
    ours: list[TrainerCallback] = [clock, evaluator, SaveTokenizer(data.tokenizer)]
    trainer = _InOrderTrainer(model=model, args=args, train_dataset=dataset,
                              callbacks=[*ours, *([budget] if budget else []), *callbacks])
    evaluator.log = trainer.log
    if settings.fp16 and args.device.type == "cpu":
        enable_cpu_fp16(trainer)
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = clock.seconds
    # 6: final evaluation and files (main process), shared with every process
    trainer.save_model(settings.output_dir)  # main process only; safetensors
    result = _finish(settings, trainer, data, clock, budget, train_seconds, wall) if args.should_save else None
    return _share(result, world)


def _finish(s: TrainSettings, trainer: Trainer, data: _Data, clock: TrainClock, budget: TimeBudget | None,
            train_seconds: float, wall: float) -> RunResult:
    """6: score the whole validation split and write the run record (main process)."""
    state, model = trainer.state, trainer.model
    assert model is not None
    final = run_eval(model, data.valid, s, data.tokenizer.bos_token_id)
    # the final record (whole split) replaces a periodic one at the same step (a budget stop can land there)
    state.log_history = [h for h in state.log_history if not ("bpc" in h and h["step"] == state.global_step)]
    state.log_history.append(eval_record(state.global_step, train_seconds, final))
    evals, losses = _histories(state)
    tokens = state.global_step * s.batch_size * s.grad_accum * trainer.args.world_size * s.block_size
    result = RunResult(
        model=s.model, parameters=count_parameters(model), bpc=final.bpc, nats_per_char=final.nats_per_char,
        loss_per_token=final.loss_per_token, perplexity=final.perplexity,
        tokens_per_second=tokens / max(train_seconds, 1e-9), peak_memory_mb=peak_memory_mb(trainer.args.device),
        wall_seconds=0.0, train_seconds=train_seconds, steps=state.global_step, tokens_trained=tokens,
        stopped_by="max_seconds" if budget is not None and budget.stopped else "max_steps",
        data_protocol=data.corpus.protocol, eval_protocol=final.protocol, eval_history=evals, train_history=losses,
        world_size=trainer.args.world_size, device=str(trainer.args.device), output_dir=s.output_dir,
        settings=json.loads(json.dumps(s.to_dict())),  # as run.json holds it (tuples become lists)
        provenance=provenance(), decode_state_bytes=decode_state_bytes(model, s.block_size),
    )
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    data.tokenizer.save(s.output_dir)
    result.wall_seconds = time.perf_counter() - wall
    result.to_json(Path(s.output_dir) / RUN_FILE)
    print(f"[attnfree] {s.model}: validation bpc {final.bpc:.4f} after {state.global_step} steps; "
          f"{result.tokens_per_second:.0f} tokens/s; saved to {s.output_dir}", file=sys.stderr)
    return result


def _share(result: RunResult | None, world: int) -> RunResult:
    """Every process gets the main process's result."""
    if world > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result], from_process=0)[0]
    assert result is not None
    return result

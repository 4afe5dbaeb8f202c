"""Equal time: how many optimizer steps of each model fit a training budget of S seconds.

``probe_steps(settings_by_label, ids, budget_seconds)``:

1. builds every model (seeded as its run will be) with AdamW at the run's learning rate;
2. times one optimizer step at a time (``grad_accum`` micro-batches of ``[batch_size, block_size]`` random ids,
   forward, backward, clip, step), the models taking turns (round-robin), so a change in the machine's load hits
   every model alike; the first ``warmup`` turns are not timed;
3. takes each model's median step time and plans ``floor(S / median)`` steps (at least one), which a run then
   trains with its whole learning-rate schedule (``max_steps`` is the schedule's length).

A sweep that gains models after its first probe keeps one clock: the new models are probed together with the
planned ones (the anchors), and their step times are scaled by how much slower or faster the anchors ran then than
now (``clock_scale``), so a busier or quieter machine at the second probe plans no one more or fewer steps.

The probe measures the step alone; a run's actual training seconds (``RunResult.train_seconds``) also hold the
Trainer's per-step overhead and are recorded beside the plan.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import set_seed

from attnfree.models.registry import SpecialIds, build_model
from attnfree.training.settings import TrainSettings


@dataclass(frozen=True)
class Plan:
    """One model's probe and the steps planned from it."""

    budget_seconds: float
    seconds_per_step: float  # median of the timed probe steps (times clock_scale)
    probe_steps: int  # timed steps (warm-up excluded)
    planned_steps: int
    clock_scale: float = 1.0  # the factor the measured step time was scaled by onto an earlier probe's clock

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rescaled(self, scale: float) -> Plan:
        """This plan on another probe's clock: the step time times ``scale``, the steps planned again."""
        seconds = self.seconds_per_step * scale
        return Plan(self.budget_seconds, seconds, self.probe_steps, max(1, int(self.budget_seconds / seconds)),
                    self.clock_scale * scale)


def clock_scale(earlier: Mapping[str, Plan], now: Mapping[str, Plan]) -> float:
    """How much slower the earlier probe's clock ran than this one: the median, over the models both probes timed,
    of the earlier step time over this one's."""
    common = [label for label in earlier if label in now]
    if not common:
        raise ValueError("no model was timed by both probes, so their clocks cannot be matched")
    return statistics.median(earlier[label].seconds_per_step / now[label].seconds_per_step for label in common)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: unchanged), restoring the count after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stepper:
    """One model's optimizer step on random ids, as its training run takes it (no data loading)."""

    def __init__(self, s: TrainSettings, ids: SpecialIds):
        set_seed(s.seed)
        self.model = build_model(s.model, s.size, ids, s.model_overrides).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=s.lr, betas=s.betas,
                                           weight_decay=s.weight_decay)
        self.settings, self.vocab = s, ids.vocab_size
        self.generator = torch.Generator().manual_seed(s.seed)

    def step(self) -> float:
        """Seconds of one optimizer step."""
        s = self.settings
        start = time.perf_counter()
        for _ in range(s.grad_accum):
            batch = torch.randint(0, self.vocab, (s.batch_size, s.block_size), generator=self.generator)  # [B, T]
            loss = self.model(input_ids=batch, labels=batch).loss / s.grad_accum
            loss.backward()
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def probe_steps(settings: Mapping[str, TrainSettings], ids: SpecialIds, budget_seconds: float, rounds: int = 5,
                warmup: int = 2, threads: int | None = None) -> dict[str, Plan]:
    """Each model's ``Plan`` (by label) for ``budget_seconds`` of training, from ``rounds`` timed round-robin turns
    after ``warmup`` untimed ones, with ``threads`` torch threads (None: the process's count)."""
    if not budget_seconds > 0:
        raise ValueError(f"budget_seconds must be > 0, got {budget_seconds!r}")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    with torch_threads(threads):
        # 1. every model and optimizer, built before any is timed
        steppers = {label: _Stepper(s, ids) for label, s in settings.items()}
        # 2. the models take turns
        times: dict[str, list[float]] = {label: [] for label in steppers}
        for turn in range(warmup + rounds):
            for label, stepper in steppers.items():
                seconds = stepper.step()
                if turn >= warmup:
                    times[label].append(seconds)
    # 3. the median step, and the steps that fit the budget
    plans = {}
    for label, measured in times.items():
        median = statistics.median(measured)
        plans[label] = Plan(budget_seconds, median, rounds, max(1, int(budget_seconds / median)))
    return plans

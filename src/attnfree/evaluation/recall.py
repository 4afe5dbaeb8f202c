"""Associative recall: multi-query associative recall (MQAR) as the Zoology study defines it (Arora, Eyuboglu et al.
2023, "Zoology: Measuring and improving recall in efficient language models"), trained and scored for any model.

A sequence of T tokens opens with N key-value pairs ``k1 v1 k2 v2 ... kN vN``; then each key appears once more,
alone, at a later even offset (gaps drawn from a power law, so most queries come soon after the pairs and a few
late), and the model must output that key's value at the query's position. Keys come from the first half of the
vocabulary, values from the second; every other position holds a random token. Loss and accuracy count the N
answer positions only. Attention solves it by looking the key up; a model with a fixed-size state must have kept
the pair, which is why recall is what separates attention from its attention-free replacements; the table puts
each model's decode-state bytes beside its accuracy.

``recall(models, settings)`` trains each model (a registry spec, sized by ``width`` and ``layers``) on fresh
examples and reports answer accuracy on held-out sequences. Shapes: N examples (or pairs, by context), T time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class MQARTask:
    """One MQAR setting: sequence length, key-value pairs, vocabulary, and the power-law parameter of the gaps."""

    seq_len: int = 64
    n_pairs: int = 4
    vocab_size: int = 256
    power_a: float = 0.01

    def __post_init__(self) -> None:
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if 4 * self.n_pairs > self.seq_len:
            raise ValueError(f"{self.n_pairs} pairs and their queries need seq_len >= {4 * self.n_pairs}, "
                             f"got {self.seq_len}")
        if self.vocab_size // 2 - 1 < self.n_pairs or self.vocab_size <= self.seq_len // 8:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for {self.n_pairs} distinct keys")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


def make_mqar(task: MQARTask, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples: inputs [n, T] and targets [n, T] (the value due at each query position, IGNORE elsewhere).

    1. N distinct keys from [1, V/2) and N distinct values from [V/2, V), interleaved at the start;
    2. N distinct query slots among the (T - 2N) / 2 even offsets after them, drawn with p(gap) ∝ gap^(a-1);
    3. each key again at its slot, its value the target there; every other position a random token.
    """
    rng = np.random.default_rng(seed)
    T, N, V = task.seq_len, task.n_pairs, task.vocab_size
    half, context = V // 2, 2 * N
    space = (T - context) // 2
    p = np.arange(1, space + 1, dtype=np.float64) ** (task.power_a - 1)
    p /= p.sum()
    inputs = rng.integers(0, V, size=(n, T))
    targets = np.full((n, T), IGNORE, dtype=np.int64)
    for i in range(n):
        keys = rng.choice(np.arange(1, half), size=N, replace=False)
        values = rng.choice(np.arange(half, V), size=N, replace=False)
        inputs[i, 0:context:2], inputs[i, 1:context:2] = keys, values
        slots = context + 2 * rng.choice(space, size=N, replace=False, p=p)
        inputs[i, slots], targets[i, slots] = keys, values
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass(frozen=True)
class RecallSettings:
    """How each model is trained and scored on a task."""

    task: MQARTask = field(default_factory=MQARTask)
    width: int = 64
    layers: int = 2
    heads: int = 2
    train_examples: int = 20_000  # fresh examples, cycled through
    test_examples: int = 1_000
    steps: int = 1_500
    batch_size: int = 64
    lr: float = 1e-3  # (3e-3 and 1e-2 stalled GPT-2 at "one of the values" on the tiny setting; 1e-3 solved it)
    weight_decay: float = 0.0
    warmup: int = 100
    seed: int = 0


RECALL_PRESETS: dict[str, list[RecallSettings]] = {
    # Small enough for minutes per model on 2 CPU cores; GPT-2 reaches >= 0.99 on it (docs/results/recall).
    # GPT-2 at width 64 must solve it (else the task or the training is broken): at T = 32, 4 pairs, V = 64 it
    # reached 0.494 after 1,500 steps and 1.000 after 4,000; at T = 64, 4 pairs, V = 256, 0.967 after 3,000.
    "cpu": [RecallSettings(MQARTask(32, 4, 64), width=w, steps=4_000) for w in (64, 128)],
    # Zoology's sequence lengths and pair counts (Figure 2), its 8,192-token vocabulary and widths 64-256.
    "zoology": [RecallSettings(MQARTask(T, N, 8192), width=w, steps=10_000, train_examples=100_000, test_examples=3_000)
                for T, N in ((64, 4), (128, 8), (256, 16), (512, 64)) for w in (64, 128, 256)],
}


# ----------------------------------------------------------------------------------------------
# Training and scoring one model
# ----------------------------------------------------------------------------------------------


@dataclass
class _Ids:
    vocab_size: int
    pad_token_id: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 0


def _loss_and_hits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    logits = model(input_ids=x).logits  # [B, T, V]: at a query position, the value is due
    answers = y != IGNORE
    loss = F.cross_entropy(logits[answers].float(), y[answers])
    hits = int((logits[answers].argmax(-1) == y[answers]).sum())
    return loss, hits, int(answers.sum())


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 128
                    ) -> float:
    """Fraction of answer positions whose argmax is the key's value."""
    model.eval()
    hits = total = 0
    for i in range(0, len(inputs), batch_size):
        _, h, n = _loss_and_hits(model, inputs[i:i + batch_size], targets[i:i + batch_size])
        hits, total = hits + h, total + n
    return hits / max(total, 1)


def state_bytes(model: torch.nn.Module, seq_len: int) -> int:
    """Bytes of what the model carries to decode the next token after ``seq_len`` tokens (one sequence): a recurrent
    state of constant size for the attention-free models, the KV cache (growing with T) for GPT-2
    (``models.decode_state``)."""
    from attnfree.models.decode_state import decode_state_bytes

    return decode_state_bytes(model, seq_len)


@dataclass
class RecallResult:
    model: str
    task: dict[str, Any]
    width: int
    layers: int
    parameters: int
    accuracy: float
    state_bytes: int
    final_loss: float
    train_seconds: float
    steps: int


def train_recall(spec: str, settings: RecallSettings) -> RecallResult:
    """Build ``spec`` at the settings' size, train it on fresh MQAR examples, score it on held-out ones."""
    from attnfree.models.registry import ModelSize, build_model, count_parameters

    s, task = settings, settings.task
    torch.manual_seed(s.seed)
    size = ModelSize(hidden_size=s.width, n_heads=s.heads, num_layers=s.layers, n_positions=task.seq_len)
    model = build_model(spec, size, _Ids(task.vocab_size))
    train_x, train_y = make_mqar(task, s.train_examples, seed=s.seed)
    test_x, test_y = make_mqar(task, s.test_examples, seed=s.seed + 10_000)  # held out: other draws
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=s.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / s.warmup, 0.5 * (1 + math.cos(
        math.pi * min(i / s.steps, 1.0)))))
    order = torch.randperm(s.train_examples, generator=torch.Generator().manual_seed(s.seed))
    model.train()
    start, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(s.steps):
        rows = order[(step * s.batch_size + torch.arange(s.batch_size)) % s.train_examples]
        loss, _, _ = _loss_and_hits(model, train_x[rows], train_y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    seconds = time.perf_counter() - start
    return RecallResult(spec, asdict(task), s.width, s.layers, count_parameters(model),
                        answer_accuracy(model, test_x, test_y), state_bytes(model.eval(), task.seq_len),
                        float(loss.detach()), seconds, s.steps)


# ----------------------------------------------------------------------------------------------
# Many models and settings: table, plot, files
# ----------------------------------------------------------------------------------------------


def results_table(results: Sequence[RecallResult]) -> str:
    columns = ["model", "T", "pairs", "vocab", "width", "layers", "parameters", "accuracy", "state bytes",
               "train s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in results:
        t = r.task
        lines.append(f"| {r.model} | {t['seq_len']} | {t['n_pairs']} | {t['vocab_size']} | {r.width} | {r.layers} | "
                     f"{r.parameters:,} | {r.accuracy:.3f} | {r.state_bytes:,} | {r.train_seconds:.0f} |")
    return "\n".join(lines)


def plot_accuracy_vs_state(results: Sequence[RecallResult], path: Path) -> Path:
    """Accuracy against decode-state bytes (log scale), one point per model and width, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys((r.task["seq_len"], r.task["n_pairs"]) for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks) + 3.5, 4.5), squeeze=False)
    models = list(dict.fromkeys(r.model for r in results))
    several_widths = len({r.width for r in results}) > 1  # label the points with their width only then
    markers = "os^Dvp*XP<>h"
    for ax, (T, N) in zip(axes[0], tasks, strict=True):
        for i, m in enumerate(models):
            pts = sorted((r.state_bytes, r.accuracy, r.width) for r in results
                         if r.model == m and (r.task["seq_len"], r.task["n_pairs"]) == (T, N))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i // 10 % len(markers)],
                    color=f"C{i % 10}", label=m)
            for b, a, w in pts if several_widths else ():
                ax.annotate(str(w), (b, a), textcoords="offset points", xytext=(3, 3), fontsize=7)
        frontier = pareto_frontier([(r.state_bytes, r.accuracy) for r in results
                                    if (r.task["seq_len"], r.task["n_pairs"]) == (T, N)])
        ax.step([b for b, _ in frontier], [a for _, a in frontier], where="post", color="grey", linestyle="--",
                linewidth=1, label="frontier")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR T={T}, {N} pairs")
        ax.set_xlabel("decode-state bytes per sequence (log)")
        ax.set_ylabel("answer accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_frontier(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (state bytes, accuracy) points that no other point beats with fewer or equal bytes, by bytes: the best
    recall each budget of state buys."""
    frontier: list[tuple[int, float]] = []
    for b, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or a > frontier[-1][1]:
            frontier.append((b, a))
    return frontier


def collect(sources: Sequence[str | Path], output_dir: str | Path) -> list[RecallResult]:
    """One table and plot from several sweeps' ``results.json`` (each run keeps its sweep's provenance and folder):
    rows measured under different commits or at different times, side by side without training again."""
    from attnfree.provenance import provenance

    entries: list[dict[str, Any]] = []
    for source in sources:
        file = Path(source) / "results.json"
        if not file.is_file():
            raise FileNotFoundError(f"no recall results at {file}: give folders that `attnfree recall "
                                    "--output-dir` wrote")
        payload = json.loads(file.read_text())
        for entry in payload.get("runs", []):
            entries.append({**entry, "provenance": entry.get("provenance", payload.get("provenance")),
                            "source": entry.get("source", str(source))})
    if not entries:
        raise ValueError(f"the folders {', '.join(map(str, sources))} hold no recall runs")
    _write(Path(output_dir), entries, provenance())
    return [RecallResult(**e["result"]) for e in entries]


def recall(models: Sequence[str], settings: Sequence[RecallSettings], output_dir: str | Path | None = None,
           log: Any = print) -> list[RecallResult]:
    """Train and score every model on every setting; write results.json, results.md and a plot to ``output_dir``.

    A (model, setting) already in ``output_dir/results.json`` is reused, so an interrupted sweep resumes."""
    from attnfree.models.registry import parse_model_spec
    from attnfree.provenance import provenance

    for spec in models:
        parse_model_spec(spec)  # unknown names fail before any training
    out = Path(output_dir) if output_dir is not None else None
    done = _previous(out)
    entries: list[dict[str, Any]] = []
    for s in settings:
        for spec in models:
            key = _key(spec, s)
            r = done.get(key)
            if r is None:
                r = train_recall(spec, s)
                log(f"[attnfree] recall {spec} T={s.task.seq_len} pairs={s.task.n_pairs} width={s.width}: "
                    f"accuracy {r.accuracy:.3f}, state {r.state_bytes:,} B, {r.train_seconds:.0f} s")
            entries.append({"key": key, "settings": asdict(s), "result": asdict(r)})
            if out is not None:
                _write(out, entries, provenance())
    return [RecallResult(**e["result"]) for e in entries]


def _key(spec: str, s: RecallSettings) -> str:
    return json.dumps({"model": spec, **asdict(s)}, sort_keys=True)


def _previous(out: Path | None) -> dict[str, RecallResult]:
    if out is None or not (out / "results.json").is_file():
        return {}
    payload = json.loads((out / "results.json").read_text())
    return {e["key"]: RecallResult(**e["result"]) for e in payload.get("runs", [])}


def _write(out: Path, entries: list[dict[str, Any]], prov: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = [RecallResult(**e["result"]) for e in entries]
    (out / "results.json").write_text(json.dumps({"provenance": prov, "runs": entries}, indent=2) + "\n")
    (out / "results.md").write_text("# Multi-query associative recall\n\n" + results_table(results) + "\n\n"
                                    "![accuracy vs state](accuracy_vs_state.png)\n")
    plot_accuracy_vs_state(results, out / "accuracy_vs_state.png")


def settings_for(preset: str, **overrides: Any) -> list[RecallSettings]:
    """A preset's settings with any RecallSettings field (or ``seq_len``/``n_pairs``/``vocab_size``) overridden."""
    if preset not in RECALL_PRESETS:
        raise ValueError(f"unknown recall preset {preset!r}; valid: {', '.join(RECALL_PRESETS)}")
    task_fields = {k: overrides.pop(k) for k in ("seq_len", "n_pairs", "vocab_size", "power_a") if k in overrides}
    return [replace(s, task=replace(s.task, **task_fields), **overrides) for s in RECALL_PRESETS[preset]]

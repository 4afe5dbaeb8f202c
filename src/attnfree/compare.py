"""The side-by-side experiment: several models trained alike, then one table, two plots and samples.

``compare(settings, ["fastformer", "fastformer-conv", "gpt2"], output_dir)``:

1. checks every model spec and builds each model once (so a bad override fails before any training);
2. builds the tokenizer once (a trained ``bpe:N`` is saved and shared, so all models read the same ids);
3. trains each model in its own process (``python -m attnfree.cli train --config ...``), so each one's
   peak memory and throughput are its own, into ``output_dir/<model>``;
4. samples a short text from each trained model;
5. writes ``results.md`` (table, protocol, samples), ``results.json`` and PNG plots of validation BPC
   against steps and against training seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attnfree.checkpoints import load_checkpoint
from attnfree.data import load_corpus, load_tokenizer
from attnfree.inference.decoding import generate_text
from attnfree.models.registry import build_model
from attnfree.provenance import provenance
from attnfree.training import RECIPES, RunResult, TrainSettings, recipe

__all__ = ["RECIPES", "ComparisonResult", "compare", "plot_histories", "recipe", "results_table"]


@dataclass
class ComparisonResult:
    """The runs (by label), their samples, the markdown table and where everything was written."""

    runs: dict[str, RunResult]
    samples: dict[str, str]
    table: str
    output_dir: Path
    wall_seconds: float
    files: list[Path] = field(default_factory=list)


def label_of(spec: str) -> str:
    """A folder-safe label for a model spec: ``fastformer:kernel_size=8`` -> ``fastformer_kernel_size=8``."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", spec)


# ----------------------------------------------------------------------------------------------
# 1-3: check, share the tokenizer, train each model in its own process
# ----------------------------------------------------------------------------------------------


def _check_models(settings: TrainSettings, models: Sequence[str]) -> dict[str, TrainSettings]:
    """Per-model settings by label; builds each model once so bad specs and overrides fail here."""
    if not models:
        raise ValueError("compare needs at least one model")
    per_model: dict[str, TrainSettings] = {}
    for spec in models:
        label = label_of(spec)
        if label in per_model:
            raise ValueError(f"model {spec!r} is listed twice")
        per_model[label] = settings.replace(model=spec)
    return per_model


def _shared_tokenizer(settings: TrainSettings, output_dir: Path, per_model: dict[str, TrainSettings]
                      ) -> dict[str, TrainSettings]:
    """Load the corpus (fails early on bad data), build the tokenizer, and check every model builds with it.
    A trained ``bpe:N`` is saved under ``output_dir/tokenizer`` and every run reads that copy."""
    corpus = load_corpus(settings.data, data_dir=settings.data_dir)
    tokenizer = load_tokenizer(settings.tokenizer, train_text=corpus.train_text, data_dir=settings.data_dir)
    for s in per_model.values():
        build_model(s.model, s.size, tokenizer, s.model_overrides)
    if not settings.tokenizer.startswith("bpe:"):
        return per_model
    folder = tokenizer.save(output_dir / "tokenizer").resolve()
    return {label: s.replace(tokenizer=str(folder)) for label, s in per_model.items()}


def _train_in_subprocess(settings: TrainSettings, label: str, output_dir: Path, quiet: bool) -> RunResult:
    """``python -m attnfree.cli train --config <settings>``; its output goes to the terminal or, quietly,
    to ``output_dir/logs/<label>.log``."""
    configs = output_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config = configs / f"{label}.json"
    config.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    command = [sys.executable, "-m", "attnfree.cli", "train", "--config", str(config)]
    print(f"[attnfree] training {settings.model} -> {settings.output_dir}", file=sys.stderr, flush=True)
    if quiet:
        logs = output_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{label}.log", "w") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    else:
        code = subprocess.call(command, env=os.environ.copy())
    if code != 0:
        where = f"; see {output_dir / 'logs' / (label + '.log')}" if quiet else ""
        raise RuntimeError(f"training {settings.model} failed with exit status {code}{where}")
    return RunResult.from_json(Path(settings.output_dir))


# ----------------------------------------------------------------------------------------------
# 4-5: samples, table, plots, files
# ----------------------------------------------------------------------------------------------


def _sample(run_dir: str, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A sampled continuation (temperature 0.8, top-k 50), cut to fit the model's positions."""
    model, tokenizer = load_checkpoint(run_dir)
    limit = getattr(model.config, "n_positions", None) or 10**9
    room = limit - max(1, len(tokenizer.encode(prompt)))
    return prompt + generate_text(model, tokenizer, prompt, max_new_tokens=max(1, min(max_new_tokens, room)),
                                  temperature=0.8, top_k=50, seed=seed)


COLUMNS = ("model", "parameters", "validation BPC", "nats/char", "loss/token", "perplexity", "tokens/s",
           "peak memory MB", "wall time s", "steps")


def _row(label: str, r: RunResult) -> list[str]:
    return [label, f"{r.parameters:,}", f"{r.bpc:.4f}", f"{r.nats_per_char:.4f}", f"{r.loss_per_token:.4f}",
            f"{r.perplexity:.3f}", f"{r.tokens_per_second:,.0f}", f"{r.peak_memory_mb:,.0f}",
            f"{r.wall_seconds:.1f}", str(r.steps)]


def results_table(runs: dict[str, RunResult]) -> str:
    """A markdown table, one row per run."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row(label, r)) + " |" for label, r in runs.items()]
    return "\n".join(lines)


def plot_histories(runs: dict[str, RunResult], x: str, path: Path) -> Path:
    """Validation BPC against ``x`` ("step" or "seconds"), one line per model; PNG via the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in runs.items():
        points = sorted((h[x], h["bpc"]) for h in run.eval_history)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer steps" if x == "step" else "training seconds (evaluation excluded)")
    ax.set_ylabel("validation bits per character")
    ax.set_title(f"Validation BPC vs {'steps' if x == 'step' else 'wall-clock training time'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _settings_line(s: TrainSettings) -> str:
    return (f"data `{s.data}`, tokenizer `{s.tokenizer}`, width {s.hidden_size}, {s.n_heads} heads, "
            f"{s.num_layers} layers, block {s.block_size}, batch {s.batch_size} x accum {s.grad_accum}, "
            f"max_steps {s.max_steps}, max_seconds {s.max_seconds}, lr {s.lr} ({s.lr_scheduler}), "
            f"dropout {s.dropout}, seed {s.seed}")


def _markdown(settings: TrainSettings, runs: dict[str, RunResult], samples: dict[str, str], table: str,
              wall: float) -> str:
    first = next(iter(runs.values()))
    capped = settings.eval_max_chars is not None
    parts = [
        "# attnfree comparison", "",
        f"Settings: {_settings_line(settings)}.", "",
        f"Data protocol: {first.data_protocol}.", "",
        f"Evaluation protocol (final, whole validation split): {first.eval_protocol}.",
        *([f"Periodic points in the plots score the first {settings.eval_max_chars:,} characters only."]
          if capped else []), "",
        "Each model trained in its own process (peak memory is per process: max resident set size on CPU, "
        "CUDA max allocated on GPU); tokens/s counts training tokens over training time, evaluation excluded.",
        "", table, "", f"Total wall time of the comparison: {wall:.1f} s.", "",
        "![validation BPC vs steps](bpc_vs_steps.png)", "", "![validation BPC vs seconds](bpc_vs_seconds.png)",
        "", "## Samples", "",
    ]
    for label, text in samples.items():
        parts += [f"### {label}", "", "```text", text.replace("```", "'''"), "```", ""]
    return "\n".join(parts)


def _write(output_dir: Path, settings: TrainSettings, result: ComparisonResult) -> list[Path]:
    """results.json, results.md and the two plots."""
    files = [plot_histories(result.runs, "step", output_dir / "bpc_vs_steps.png"),
             plot_histories(result.runs, "seconds", output_dir / "bpc_vs_seconds.png")]
    payload: dict[str, Any] = {"provenance": provenance(), "settings": settings.to_dict(),
                               "wall_seconds": result.wall_seconds,
                               "runs": {k: asdict(v) for k, v in result.runs.items()}, "samples": result.samples}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = _markdown(settings, result.runs, result.samples, result.table, result.wall_seconds)
    (output_dir / "results.md").write_text(text)
    return [*files, output_dir / "results.json", output_dir / "results.md"]


def compare(
    settings: TrainSettings,
    models: Sequence[str],
    output_dir: str | Path,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    prompt: str = "ROMEO:",
    sample_tokens: int = 200,
    quiet: bool = False,
) -> ComparisonResult:
    """Train each of ``models`` with ``settings`` (same data, tokenizer, seed and budget) and tabulate them.

    ``max_steps`` / ``max_seconds``, when given, override the settings' budget. Each run lands in
    ``output_dir/<label>``; ``quiet`` sends each run's output to ``output_dir/logs`` instead of the terminal.
    """
    start, out = time.perf_counter(), Path(output_dir)
    budget: dict[str, Any] = {"max_steps": max_steps} if max_steps is not None else {}
    budget |= {"max_seconds": max_seconds} if max_seconds is not None else {}
    settings = settings.replace(**budget)
    # 1-2
    per_model = _check_models(settings, models)
    out.mkdir(parents=True, exist_ok=True)
    per_model = {label: s.replace(output_dir=str(out / label)) for label, s in per_model.items()}
    per_model = _shared_tokenizer(settings, out, per_model)
    # 3-4
    runs = {label: _train_in_subprocess(s, label, out, quiet) for label, s in per_model.items()}
    samples = {label: _sample(r.output_dir, prompt, sample_tokens, settings.seed) for label, r in runs.items()}
    # 5
    result = ComparisonResult(runs, samples, results_table(runs), out, time.perf_counter() - start)
    result.files = _write(out, settings, result)
    return result


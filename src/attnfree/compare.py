"""The side-by-side experiment: several models trained alike under several seeds, then tables, plots and samples.

``compare(settings, ["fastformer", "fastformer-conv", "gpt2"], output_dir, seeds=[1337, 1, 2])``:

1. checks every model spec and builds each model once (so a bad override fails before any training);
2. builds the tokenizer once (a trained ``bpe:N`` is saved and shared, so all models read the same ids);
3. trains each model under each seed in its own process (``python -m attnfree.cli train --config ...``), so each
   run's peak memory and throughput are its own, into ``output_dir/<model>/seed-<seed>``; seed by seed, so an
   interrupted sweep holds whole seeds, and a run already finished with the same settings is reused (an
   interrupted sweep resumes by running the same command again);
4. samples a short text from each model's first run;
5. writes ``results.md`` (per-seed BPC, mean ± std, the paired difference to the baseline with its 95% interval,
   every run's details, protocol, samples), ``results.json`` and PNG plots of validation BPC against steps and
   against training seconds (the mean over seeds, the band from the lowest to the highest).
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

from attnfree.checkpoints import RUN_FILE, load_checkpoint
from attnfree.data import load_corpus, load_tokenizer
from attnfree.evaluation.stats import PairedDifference, Summary, paired_difference, summarize
from attnfree.inference.decoding import generate_text
from attnfree.models.registry import build_model
from attnfree.provenance import provenance
from attnfree.training import RECIPES, RunResult, TrainSettings, recipe

__all__ = ["RECIPES", "ComparisonResult", "compare", "plot_histories", "recipe", "results_table"]


@dataclass
class ModelRuns:
    """One model's runs by seed, their summary and (but for the baseline itself) the paired difference to it."""

    label: str
    spec: str
    runs: dict[int, RunResult]
    summary: Summary
    difference: PairedDifference | None = None

    def bpcs(self, seeds: Sequence[int]) -> list[float]:
        return [self.runs[s].bpc for s in seeds]


@dataclass
class ComparisonResult:
    """The models' runs (by label), their samples, the markdown table and where everything was written."""

    models: dict[str, ModelRuns]
    seeds: list[int]
    baseline: str | None
    samples: dict[str, str]
    table: str
    output_dir: Path
    wall_seconds: float
    files: list[Path] = field(default_factory=list)

    @property
    def runs(self) -> dict[str, RunResult]:
        """Each model's run under the first seed."""
        return {label: m.runs[self.seeds[0]] for label, m in self.models.items()}


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


def _finished(settings: TrainSettings) -> RunResult | None:
    """The run already in ``settings.output_dir`` if it finished with exactly these settings."""
    run = Path(settings.output_dir) / RUN_FILE
    if not run.is_file():
        return None
    result = RunResult.from_json(run)
    return result if result.settings == json.loads(json.dumps(settings.to_dict())) else None


def _train_in_subprocess(settings: TrainSettings, label: str, output_dir: Path, quiet: bool) -> RunResult:
    """``python -m attnfree.cli train --config <settings>``; its output goes to the terminal or, quietly,
    to ``output_dir/logs/<label>.log``. A run already finished with these settings is reused."""
    done = _finished(settings)
    if done is not None:
        print(f"[attnfree] reusing {settings.output_dir} (finished with the same settings)", file=sys.stderr)
        return done
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
# 4-5: samples, tables, plots, files
# ----------------------------------------------------------------------------------------------


def _sample(run_dir: str, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A sampled continuation (temperature 0.8, top-k 50), cut to fit the model's positions."""
    model, tokenizer = load_checkpoint(run_dir)
    limit = getattr(model.config, "n_positions", None) or 10**9
    room = limit - max(1, len(tokenizer.encode(prompt)))
    return prompt + generate_text(model, tokenizer, prompt, max_new_tokens=max(1, min(max_new_tokens, room)),
                                  temperature=0.8, top_k=50, seed=seed)


def summary_table(result: ComparisonResult) -> str:
    """One row per model: parameters, BPC per seed, mean ± std, the paired difference to the baseline."""
    seeds = result.seeds
    columns = ["model", "parameters", *(f"BPC seed {s}" for s in seeds), "BPC mean ± std",
               f"vs {result.baseline} (paired, 95% interval)" if result.baseline else "vs baseline",
               "tokens/s", "steps"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for label, m in result.models.items():
        runs = [m.runs[s] for s in seeds]
        versus = "baseline" if label == result.baseline else str(m.difference) if m.difference else ""
        cells = [label, f"{runs[0].parameters:,}", *(f"{r.bpc:.4f}" for r in runs), str(m.summary), versus,
                 f"{sum(r.tokens_per_second for r in runs) / len(runs):,.0f}", str(runs[0].steps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RUN_COLUMNS = ("model", "seed", "parameters", "validation BPC", "nats/char", "loss/token", "perplexity", "tokens/s",
               "peak memory MB", "wall time s", "steps")


def results_table(runs: dict[str, RunResult]) -> str:
    """A markdown table, one row per run (label -> run)."""
    lines = ["| " + " | ".join(RUN_COLUMNS) + " |", "|" + "|".join("---" for _ in RUN_COLUMNS) + "|"]
    for label, r in runs.items():
        cells = [label.split("@")[0], str(r.settings.get("seed", "")), f"{r.parameters:,}", f"{r.bpc:.4f}",
                 f"{r.nats_per_char:.4f}", f"{r.loss_per_token:.4f}", f"{r.perplexity:.3f}",
                 f"{r.tokens_per_second:,.0f}", f"{r.peak_memory_mb:,.0f}", f"{r.wall_seconds:.1f}", str(r.steps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_histories(models: dict[str, list[RunResult]], x: str, path: Path) -> Path:
    """Validation BPC against ``x`` ("step" or "seconds"): per model the mean over its runs, and the band from the
    lowest to the highest run (points the runs share); PNG via the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in models.items():
        steps = sorted(set.intersection(*({h["step"] for h in r.eval_history} for r in runs)))
        at = [{h["step"]: h for h in r.eval_history} for r in runs]
        xs = [sum(a[s][x] for a in at) / len(at) for s in steps]
        bpcs = [[a[s]["bpc"] for a in at] for s in steps]
        line = ax.plot(xs, [sum(b) / len(b) for b in bpcs], marker="o", markersize=3, label=label)[0]
        if len(runs) > 1:
            ax.fill_between(xs, [min(b) for b in bpcs], [max(b) for b in bpcs], color=line.get_color(), alpha=0.2)
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
            f"dropout {s.dropout}")


def _markdown(settings: TrainSettings, result: ComparisonResult) -> str:
    first = next(iter(result.runs.values()))
    capped = settings.eval_max_chars is not None
    every = {f"{label}@{seed}": r for label, m in result.models.items() for seed, r in m.runs.items()}
    parts = [
        "# attnfree comparison", "",
        f"Settings: {_settings_line(settings)}; seeds {', '.join(map(str, result.seeds))}.", "",
        f"Data protocol: {first.data_protocol}.", "",
        f"Evaluation protocol (final, whole validation split): {first.eval_protocol}.",
        *([f"Periodic points in the plots score the first {settings.eval_max_chars:,} characters only."]
          if capped else []), "",
        "The difference to the baseline is paired by seed (the same data order): mean(model - baseline) relative to "
        "the baseline's mean, with Student's 95% interval over the seeds; an interval that includes 0 is marked "
        "not significant.", "", summary_table(result), "",
        "![validation BPC vs steps](bpc_vs_steps.png)", "", "![validation BPC vs seconds](bpc_vs_seconds.png)", "",
        "## Every run", "",
        "Each run trained in its own process (peak memory is per process: max resident set size on CPU, CUDA max "
        "allocated on GPU); tokens/s counts training tokens over training time, evaluation excluded.", "",
        results_table(every), "", f"Total wall time of the comparison: {result.wall_seconds:.1f} s.", "",
        "## Samples", "",
    ]
    for label, text in result.samples.items():
        parts += [f"### {label}", "", "```text", text.replace("```", "'''"), "```", ""]
    return "\n".join(parts)


def _write(output_dir: Path, settings: TrainSettings, result: ComparisonResult) -> list[Path]:
    """results.json, results.md and the two plots."""
    by_model = {label: list(m.runs.values()) for label, m in result.models.items()}
    files = [plot_histories(by_model, "step", output_dir / "bpc_vs_steps.png"),
             plot_histories(by_model, "seconds", output_dir / "bpc_vs_seconds.png")]
    models = {label: {"spec": m.spec, "summary": asdict(m.summary),
                      "difference": m.difference.to_dict() if m.difference else None,
                      "runs": {str(seed): asdict(r) for seed, r in m.runs.items()}}
              for label, m in result.models.items()}
    payload: dict[str, Any] = {"provenance": provenance(), "settings": settings.to_dict(), "seeds": result.seeds,
                               "baseline": result.baseline, "wall_seconds": result.wall_seconds,
                               "models": models, "samples": result.samples}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output_dir / "results.md").write_text(_markdown(settings, result))
    return [*files, output_dir / "results.json", output_dir / "results.md"]


def _summarize(per_model: dict[str, TrainSettings], runs: dict[str, dict[int, RunResult]], seeds: list[int],
               baseline: str | None) -> dict[str, ModelRuns]:
    models = {label: ModelRuns(label, per_model[label].model, runs[label],
                               summarize([runs[label][s].bpc for s in seeds])) for label in per_model}
    if baseline is not None:
        reference = models[baseline].bpcs(seeds)
        for label, m in models.items():
            if label != baseline:
                m.difference = paired_difference(m.bpcs(seeds), reference)
    return models


def compare(
    settings: TrainSettings,
    models: Sequence[str],
    output_dir: str | Path,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    prompt: str = "ROMEO:",
    sample_tokens: int = 200,
    quiet: bool = False,
    seeds: Sequence[int] | None = None,
    baseline: str | None = "gpt2",
) -> ComparisonResult:
    """Train each of ``models`` with ``settings`` (same data, tokenizer and budget) under each of ``seeds`` (default:
    the settings' seed), and tabulate them against ``baseline`` (a model spec of the list; None or absent: no
    differences). ``max_steps`` / ``max_seconds``, when given, override the settings' budget. Each run lands in
    ``output_dir/<label>/seed-<seed>``; ``quiet`` sends each run's output to ``output_dir/logs`` instead."""
    start, out = time.perf_counter(), Path(output_dir)
    budget: dict[str, Any] = {"max_steps": max_steps} if max_steps is not None else {}
    budget |= {"max_seconds": max_seconds} if max_seconds is not None else {}
    settings = settings.replace(**budget)
    seed_list = list(dict.fromkeys(seeds)) if seeds else [settings.seed]
    # 1-2
    per_model = _check_models(settings, models)
    base_label = label_of(baseline) if baseline is not None and label_of(baseline) in per_model else None
    out.mkdir(parents=True, exist_ok=True)
    per_model = _shared_tokenizer(settings, out, per_model)
    # 3: seed by seed, every model
    runs: dict[str, dict[int, RunResult]] = {label: {} for label in per_model}
    for seed in seed_list:
        for label, s in per_model.items():
            planned = s.replace(seed=seed, output_dir=str(out / label / f"seed-{seed}"))
            runs[label][seed] = _train_in_subprocess(planned, f"{label}-seed-{seed}", out, quiet)
    # 4-5
    samples = {label: _sample(r[seed_list[0]].output_dir, prompt, sample_tokens, seed_list[0])
               for label, r in runs.items()}
    result = ComparisonResult(_summarize(per_model, runs, seed_list, base_label), seed_list, base_label, samples, "",
                              out, time.perf_counter() - start)
    result.table = summary_table(result)
    result.files = _write(out, settings, result)
    return result

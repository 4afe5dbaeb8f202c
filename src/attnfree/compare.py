"""The side-by-side experiment: several models trained alike under several seeds, then tables, plots and samples.

``compare(settings, ["fastformer", "fastformer-conv", "gpt2"], output_dir, seeds=[1337, 1, 2])``:

1. checks every model spec and builds each model once (so a bad override fails before any training);
2. builds the tokenizer once (a trained ``bpe:N`` is saved and shared, so all models read the same ids);
3. trains each model under each seed in its own process (``python -m attnfree.cli train --config ...``), so each
   run's peak memory and throughput are its own, into ``output_dir/<model>/seed-<seed>``; seed by seed, ``jobs``
   at a time; a run already finished with the same settings is reused (a stopped sweep continues by running the
   same command again); with ``budget_seconds`` (equal time) a round-robin probe first plans each model's steps;
4. samples a short text from each model's first run;
5. writes ``results.md`` (per-seed BPC, mean ± std, the paired difference to the baseline with its 95% interval,
   every run's details, protocol, samples), ``results.json`` and PNG plots of validation BPC against steps and
   against training seconds (the mean over seeds, the band from the lowest to the highest).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attnfree.checkpoints import RUN_FILE, load_checkpoint
from attnfree.data import TextTokenizer, load_corpus, load_tokenizer
from attnfree.evaluation.stats import PairedDifference, Summary, paired_difference, summarize
from attnfree.inference.decoding import generate_text
from attnfree.models.registry import IMPORT_ENV, SpecialIds, build_model, plugin_modules
from attnfree.provenance import provenance
from attnfree.training import RECIPES, RunResult, TrainSettings, recipe
from attnfree.training.budget import Plan, clock_scale, probe_steps

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
    budget_seconds: float | None = None  # equal time: the training seconds each run was planned for

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
                      ) -> tuple[dict[str, TrainSettings], TextTokenizer]:
    """Load the corpus (fails early on bad data), build the tokenizer, and check every model builds with it.
    A trained ``bpe:N`` is saved under ``output_dir/tokenizer`` and every run reads that copy."""
    corpus = load_corpus(settings.data, data_dir=settings.data_dir)
    tokenizer = load_tokenizer(settings.tokenizer, train_text=corpus.train_text, data_dir=settings.data_dir)
    for s in per_model.values():
        build_model(s.model, s.size, tokenizer, s.model_overrides)
    if not settings.tokenizer.startswith("bpe:"):
        return per_model, tokenizer
    folder = tokenizer.save(output_dir / "tokenizer").resolve()
    return {label: s.replace(tokenizer=str(folder)) for label, s in per_model.items()}, tokenizer


# settings that change no number a run reports: a run finished under other values of these is still reused
_NOT_MEASURED = ("progress", "output_dir")  # (a run folder moved, or restored from docs/results, is the same run)


def _comparable(values: dict[str, Any]) -> dict[str, Any] | None:
    """Settings as today's ``TrainSettings`` reads them (fields added since take their defaults), JSON-normalised,
    without ``_NOT_MEASURED``; None when they no longer read (a removed field, a model no longer registered)."""
    try:
        normal = json.loads(json.dumps(TrainSettings.from_dict(values).to_dict()))
    except (ValueError, TypeError):
        return None
    return {k: v for k, v in normal.items() if k not in _NOT_MEASURED}


def _finished(settings: TrainSettings) -> RunResult | None:
    """The run already in ``settings.output_dir`` if it finished with these settings (same spec, seed, budget and
    every other measured setting; a record from before a field was added counts with that field's default)."""
    run = Path(settings.output_dir) / RUN_FILE
    if not run.is_file():
        return None
    try:
        result = RunResult.from_json(run)
    except (ValueError, TypeError):  # unreadable, or written by an incompatible version: train again
        return None
    same = _comparable(result.settings) == _comparable(settings.to_dict())
    return result if same else None


@dataclass(frozen=True)
class Job:
    """One run of the sweep: a model under a seed, its settings and (equal time) its budget plan."""

    label: str
    seed: int
    settings: TrainSettings
    plan: Plan | None = None

    @property
    def name(self) -> str:
        return f"{self.label}-seed-{self.seed}"


def _run_env(jobs: int, todo: list[Job]) -> dict[str, str]:
    """The environment of each run's process: this one's, with one CPU thread per run when several run at once
    (unless the settings set ``threads``), and the modules that registered the models passed on in
    ``ATTNFREE_IMPORT`` (so a run's process finds a model registered outside attnfree)."""
    env = os.environ.copy()
    if jobs > 1 and all(job.settings.threads is None for job in todo):
        env["OMP_NUM_THREADS"] = "1"
    modules = [*env.get(IMPORT_ENV, "").split(","), *plugin_modules([job.settings.model for job in todo])]
    if any(modules):
        env[IMPORT_ENV] = ",".join(m for m in dict.fromkeys(modules) if m)
    return env


class _Runs:
    """The training processes running now. When the comparison is stopped (Ctrl-C, SIGTERM, an error in this
    process), they are stopped with it and no new one starts: a run left behind would go on to overwrite a
    finished record with one made under another plan."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen[bytes]] = set()
        self.stopping = False
        self.lock = threading.Lock()

    def call(self, command: list[str], **kwargs: Any) -> int:
        """``subprocess.call``, tracked; -15 at once when the comparison is stopping."""
        with self.lock:
            if self.stopping:
                return -signal.SIGTERM
            process = subprocess.Popen(command, **kwargs)
            self.live.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.live.discard(process)

    def stop(self) -> None:
        """Terminate every live run (kill what has not exited 30 s later)."""
        with self.lock:
            self.stopping = True
            live = list(self.live)
        for process in live:
            process.terminate()
        for process in live:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _train_in_subprocess(job: Job, output_dir: Path, quiet: bool, env: dict[str, str], runs: _Runs) -> RunResult:
    """``python -m attnfree.cli train --config <settings>``; its output goes to the terminal or, quietly,
    to ``output_dir/logs/<name>.log``. A run already finished with these settings is reused."""
    settings = job.settings
    done = _finished(settings)
    if done is not None:
        print(f"[attnfree] reusing {settings.output_dir} (finished with the same settings)", file=sys.stderr)
        return done
    configs = output_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config = configs / f"{job.name}.json"
    config.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    command = [sys.executable, "-m", "attnfree.cli", "train", "--config", str(config)]
    print(f"[attnfree] training {settings.model} (seed {job.seed}) -> {settings.output_dir}", file=sys.stderr,
          flush=True)
    if quiet:
        logs = output_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{job.name}.log", "w") as log:
            code = runs.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    else:
        code = runs.call(command, env=env)
    if code != 0:
        where = f"; see {output_dir / 'logs' / (job.name + '.log')}" if quiet else ""
        raise RuntimeError(f"training {settings.model} failed with exit status {code}{where}")
    result = RunResult.from_json(Path(settings.output_dir))
    if job.plan is not None:  # the plan beside what the run measured (its record is rewritten atomically)
        result.budget = job.plan.to_dict()
        result.to_json(Path(settings.output_dir) / RUN_FILE)
    return result


@contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread (so cleanup runs) while inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_all(todo: list[Job], output_dir: Path, quiet: bool, jobs: int) -> dict[tuple[str, int], RunResult]:
    """Every job, ``jobs`` at a time in the order given (seed by seed); with several at once each run's output goes
    to its log file. Runs already started finish before a failure of another run is raised; stopping the
    comparison stops its runs."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    env = _run_env(jobs, todo)
    pool, runs = ThreadPoolExecutor(max_workers=jobs), _Runs()
    try:
        with _terminate_raises():
            futures = {(job.label, job.seed): pool.submit(_train_in_subprocess, job, output_dir,
                                                          quiet or jobs > 1, env, runs) for job in todo}
            wait(futures.values())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        runs.stop()
        raise
    pool.shutdown()
    return {key: future.result() for key, future in futures.items()}


# ----------------------------------------------------------------------------------------------
# 3': equal time: a plan of steps per model from one round-robin probe, kept in the output folder
# ----------------------------------------------------------------------------------------------

PLAN_FILE = "budget-plan.json"


def _plan_key(settings: TrainSettings, budget_seconds: float, jobs: int) -> dict[str, Any]:
    """What a stored plan must match to be reused: the budget, the thread setup and every measured setting but the
    model, seed, steps and folder."""
    values = _comparable(settings.to_dict()) or {}
    for name in ("model", "seed", "max_steps", "output_dir"):
        values.pop(name, None)
    return {"budget_seconds": budget_seconds, "single_thread": _run_threads(settings, jobs) == 1, "settings": values}


def _run_threads(settings: TrainSettings, jobs: int) -> int | None:
    """The CPU threads each run gets (None: torch's default): the settings' own, else one when runs share the
    machine."""
    return settings.threads or (1 if jobs > 1 else None)


def _budget_plans(per_model: dict[str, TrainSettings], tokenizer: SpecialIds, budget_seconds: float, jobs: int,
                  output_dir: Path) -> dict[str, Plan]:
    """Each model's plan: reused from ``output_dir/budget-plan.json`` when it was made for the same budget and
    settings (so a stopped sweep plans the same steps), else probed (the missing models together) and stored. Models
    added to a planned sweep are probed beside the planned ones and put on the stored plan's clock."""
    file = output_dir / PLAN_FILE
    key = _plan_key(next(iter(per_model.values())), budget_seconds, jobs)
    stored = json.loads(file.read_text()) if file.is_file() else {}
    if stored.get("key") != key:  # a plan for another budget or settings is replaced, not merged
        stored = {}
    plans = {label: Plan(**p) for label, p in stored.get("plans", {}).items() if label in per_model}
    missing = {label: s for label, s in per_model.items() if label not in plans}
    if missing:
        # 1. the missing models, and the planned ones as anchors, in one round-robin probe
        anchors = {label: per_model[label] for label in plans}
        print(f"[attnfree] probing the step time of {', '.join(missing)} (round-robin"
              + (f", anchored on {', '.join(anchors)})" if anchors else ")"), file=sys.stderr, flush=True)
        threads = _run_threads(next(iter(per_model.values())), jobs)
        probed = probe_steps(missing | anchors, tokenizer, budget_seconds, threads=threads)
        # 2. the new models on the stored plan's clock
        scale = 1.0
        if anchors:
            scale = clock_scale(plans, probed)
            print(f"[attnfree] the planned models ran {1 / scale:.2f}x their planned step time; the new models' "
                  "times are scaled to the plan's clock", file=sys.stderr)
        plans |= {label: probed[label].rescaled(scale) for label in missing}
        everything = {**stored.get("plans", {}), **{k: p.to_dict() for k, p in plans.items()}}
        file.write_text(json.dumps({"key": key, "plans": everything}, indent=2) + "\n")
    for label, plan in plans.items():
        print(f"[attnfree] {label}: {plan.seconds_per_step * 1000:.1f} ms per step -> {plan.planned_steps} steps "
              f"in {budget_seconds:g} s", file=sys.stderr)
    return plans


# ----------------------------------------------------------------------------------------------
# 4-5: samples, tables, plots, files
# ----------------------------------------------------------------------------------------------


def _has_weights(run_dir: str) -> bool:
    """Whether a run folder still holds its model (a run restored from its record alone has no sample)."""
    return any(Path(run_dir).glob("*.safetensors"))


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
               "tokens/s", "steps", "train s", "decode state (B)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for label, m in result.models.items():
        runs = [m.runs[s] for s in seeds]
        versus = "baseline" if label == result.baseline else str(m.difference) if m.difference else ""
        state = runs[0].decode_state_bytes  # None in records written before runs measured it
        cells = [label, f"{runs[0].parameters:,}", *(f"{r.bpc:.4f}" for r in runs), str(m.summary), versus,
                 f"{sum(r.tokens_per_second for r in runs) / len(runs):,.0f}", _spread(r.steps for r in runs),
                 f"{sum(r.train_seconds for r in runs) / len(runs):,.1f}", "–" if state is None else f"{state:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(values: Any) -> str:
    """One value, or the range ``low-high`` when the runs differ (equal time plans the same steps for every seed)."""
    ordered = sorted(set(values))
    return str(ordered[0]) if len(ordered) == 1 else f"{ordered[0]}-{ordered[-1]}"


RUN_COLUMNS = ("model", "seed", "parameters", "validation BPC", "nats/char", "loss/token", "perplexity", "tokens/s",
               "peak memory MB", "wall time s", "train s", "steps")


def results_table(runs: dict[str, RunResult]) -> str:
    """A markdown table, one row per run (label -> run)."""
    lines = ["| " + " | ".join(RUN_COLUMNS) + " |", "|" + "|".join("---" for _ in RUN_COLUMNS) + "|"]
    for label, r in runs.items():
        cells = [label.split("@")[0], str(r.settings.get("seed", "")), f"{r.parameters:,}", f"{r.bpc:.4f}",
                 f"{r.nats_per_char:.4f}", f"{r.loss_per_token:.4f}", f"{r.perplexity:.3f}",
                 f"{r.tokens_per_second:,.0f}", f"{r.peak_memory_mb:,.0f}", f"{r.wall_seconds:.1f}",
                 f"{r.train_seconds:.1f}", str(r.steps)]
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
        *([f"Equal time: every model planned for {result.budget_seconds:g} s of training (max_steps from a "
           "round-robin probe of its step time, the learning-rate schedule run whole; each run's probe and plan "
           "are in its run.json under `budget`); the steps and training seconds columns say what each got.", ""]
          if result.budget_seconds is not None else []),
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
                               "budget_seconds": result.budget_seconds,
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
    jobs: int = 1,
    budget_seconds: float | None = None,
) -> ComparisonResult:
    """Train each of ``models`` with ``settings`` (same data, tokenizer and budget) under each of ``seeds`` (default:
    the settings' seed), and tabulate them against ``baseline`` (a model spec of the list; None or absent: no
    differences). ``max_steps`` / ``max_seconds``, when given, override the settings' budget. Each run lands in
    ``output_dir/<label>/seed-<seed>``; ``quiet`` sends each run's output to ``output_dir/logs`` instead.

    A run already in its folder with the same settings is reused, so the same call continues a stopped sweep.
    ``jobs`` runs that many at once (one CPU thread each unless the settings set ``threads``; their output goes to
    the logs). ``budget_seconds`` gives every model about that many seconds of training instead of equal steps:
    a round-robin probe plans each model's ``max_steps`` (``attnfree.training.budget``), and the schedule runs whole.
    """
    if jobs < 1 or (budget_seconds is not None and not budget_seconds > 0):
        raise ValueError(f"need jobs >= 1 and budget_seconds > 0 (or None), got jobs={jobs}, "
                         f"budget_seconds={budget_seconds}")
    start, out = time.perf_counter(), Path(output_dir)
    budget: dict[str, Any] = {"max_steps": max_steps} if max_steps is not None else {}
    budget |= {"max_seconds": max_seconds} if max_seconds is not None else {}
    settings = settings.replace(**budget)
    seed_list = list(dict.fromkeys(seeds)) if seeds else [settings.seed]
    # 1-2
    per_model = _check_models(settings, models)
    base_label = label_of(baseline) if baseline is not None and label_of(baseline) in per_model else None
    out.mkdir(parents=True, exist_ok=True)
    per_model, tokenizer = _shared_tokenizer(settings, out, per_model)
    # 3': equal time: each model's steps from one probe
    plans: dict[str, Plan] = {}
    if budget_seconds is not None:
        plans = _budget_plans(per_model, tokenizer, budget_seconds, jobs, out)
        per_model = {label: s.replace(max_steps=plans[label].planned_steps) for label, s in per_model.items()}
    # 3: seed by seed, every model, `jobs` at a time
    todo = [Job(label, seed, s.replace(seed=seed, output_dir=str(out / label / f"seed-{seed}")), plans.get(label))
            for seed in seed_list for label, s in per_model.items()]
    done = _train_all(todo, out, quiet, jobs)
    runs = {label: {seed: done[(label, seed)] for seed in seed_list} for label in per_model}
    # 4-5
    samples = {label: _sample(r[seed_list[0]].output_dir, prompt, sample_tokens, seed_list[0])
               for label, r in runs.items() if _has_weights(r[seed_list[0]].output_dir)}
    result = ComparisonResult(_summarize(per_model, runs, seed_list, base_label), seed_list, base_label, samples, "",
                              out, time.perf_counter() - start, budget_seconds=budget_seconds)
    result.table = summary_table(result)
    result.files = _write(out, settings, result)
    return result

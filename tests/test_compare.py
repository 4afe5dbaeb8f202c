"""The side-by-side comparison: tiny models under two seeds, each run in its own process; tables, plots, samples."""

import json
import os

import pytest

from attnfree.cli import main
from attnfree.compare import label_of, results_table
from attnfree.training import RunResult


@pytest.fixture
def small_text(data_dir, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    return str(path)


ARGS = ["--models", "fastformer:preset=seed,gpt2", "--tokenizer", "bpe:300", "--hidden-size", "32",
        "--n-heads", "2", "--num-layers", "2", "--block-size", "32", "--batch-size", "4", "--max-steps", "6",
        "--eval-every", "3", "--no-progress", "--sample-tokens", "8", "--prompt", "KING:", "--seeds", "3,4"]


def test_compare_over_seeds_writes_tables_plots_and_samples(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    assert main(["compare", "--data", small_text, "--output-dir", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "| fastformer_preset=seed |" in printed and "| gpt2 |" in printed
    # every model under every seed, the same trained tokenizer and budget; each run in its own folder
    results = json.loads((out / "results.json").read_text())
    assert {"python", "torch", "transformers", "attnfree", "git_commit", "git_dirty"} <= results["provenance"].keys()
    assert results["seeds"] == [3, 4] and results["baseline"] == "gpt2"
    models = results["models"]
    runs = {(k, int(s)): RunResult(**v) for k, m in models.items() for s, v in m["runs"].items()}
    assert sorted(runs) == [("fastformer_preset=seed", 3), ("fastformer_preset=seed", 4), ("gpt2", 3),
                            ("gpt2", 4)]
    assert {r.settings["tokenizer"] for r in runs.values()} == {str((out / "tokenizer").resolve())}
    assert all(r.steps == 6 and r.settings["seed"] == seed for (_, seed), r in runs.items())
    assert runs[("gpt2", 3)].bpc != runs[("gpt2", 4)].bpc  # the seeds differ
    # each row's decode state after block_size (32) tokens: GPT-2's KV cache, 2 layers x keys and values x 32 x C
    assert runs[("gpt2", 3)].decode_state_bytes == 2 * 2 * 32 * 32 * 4
    assert 0 < runs[("fastformer_preset=seed", 3)].decode_state_bytes < runs[("gpt2", 3)].decode_state_bytes
    assert f"| {2 * 2 * 32 * 32 * 4:,} |" in printed and "decode state (B)" in printed
    for label, seed in runs:
        assert (out / label / f"seed-{seed}" / "run.json").is_file()
    # the summary: mean and std over seeds, the paired difference to the baseline with its interval
    ff = models["fastformer_preset=seed"]
    bpcs = [runs[("fastformer_preset=seed", s)].bpc for s in (3, 4)]
    base = [runs[("gpt2", s)].bpc for s in (3, 4)]
    assert ff["summary"]["n"] == 2 and ff["summary"]["mean"] == pytest.approx(sum(bpcs) / 2)
    diff = ff["difference"]
    assert diff["mean"] == pytest.approx(sum(bpcs) / 2 - sum(base) / 2)
    assert diff["low"] < diff["mean"] < diff["high"] and models["gpt2"]["difference"] is None
    text = (out / "results.md").read_text()
    assert "BPC mean ± std" in text and "vs gpt2 (paired, 95% interval)" in text and "## Every run" in text
    assert text.count("KING:") >= 2 and "### gpt2" in text
    for plot in ("bpc_vs_steps.png", "bpc_vs_seconds.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an interrupted sweep resumes: the same command reuses every finished run
    assert main(["compare", "--data", small_text, "--output-dir", str(out), *ARGS]) == 0
    assert capsys.readouterr().err.count("reusing") == 4
    # runs kept as their records alone (docs/results keeps run.json, not weights): reused, the table alike, no sample
    for weights in out.glob("*/seed-*/*.safetensors"):
        weights.unlink()
    assert main(["compare", "--data", small_text, "--output-dir", str(out), *ARGS]) == 0
    assert capsys.readouterr().err.count("reusing") == 4
    again = json.loads((out / "results.json").read_text())
    assert again["samples"] == {} and again["models"]["gpt2"]["runs"] == models["gpt2"]["runs"]


def test_labels_and_table_rows():
    assert label_of("fastformer:kernel_size=8,preset=seed") == "fastformer_kernel_size=8_preset=seed"
    run = RunResult(model="gpt2", parameters=1234, bpc=2.5, nats_per_char=1.73, loss_per_token=1.73,
                    perplexity=5.64, tokens_per_second=1000.0, peak_memory_mb=512.0, wall_seconds=12.3,
                    train_seconds=10.0, steps=6, tokens_trained=768, stopped_by="max_steps", data_protocol="d",
                    eval_protocol="e", eval_history=[], train_history=[], world_size=1, device="cpu",
                    output_dir="x", settings={"seed": 7})
    lines = results_table({"gpt2@7": run}).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| gpt2 | 7 | 1,234 | 2.5000 | 1.7300 | 1.7300 | 5.640 | 1,000 | 512 | 12.3 | 10.0 | 6 |"


def test_a_record_from_a_newer_attnfree_still_reads(tmp_path):
    """A sweep's process reads records its runs wrote; a run made by a newer attnfree (one more field) must not
    stop it at the end of hours of training."""
    import dataclasses

    run = RunResult(model="gpt2", parameters=1, bpc=2.5, nats_per_char=1.7, loss_per_token=1.7, perplexity=5.6,
                    tokens_per_second=1.0, peak_memory_mb=1.0, wall_seconds=1.0, train_seconds=1.0, steps=1,
                    tokens_trained=1, stopped_by="max_steps", data_protocol="d", eval_protocol="e", eval_history=[],
                    train_history=[], world_size=1, device="cpu", output_dir="x", settings={})
    record = {**dataclasses.asdict(run), "a_field_from_the_future": 1}
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert RunResult.from_json(tmp_path) == run


TINY = ["--tokenizer", "byte", "--hidden-size", "16", "--n-heads", "2", "--num-layers", "1", "--block-size", "16",
        "--batch-size", "2", "--eval-every", "0", "--no-progress", "--sample-tokens", "4", "--log-every", "2"]


def bpc_rows(folder) -> list[list[str]]:
    """The summary table's model, parameters and per-seed BPC cells."""
    lines = (folder / "results.md").read_text().splitlines()
    return [line.split("|")[1:5] for line in lines if line.startswith(("| fastformer |", "| gpt2 |"))]


def bpcs(folder) -> dict[tuple[str, str], float]:
    models = json.loads((folder / "results.json").read_text())["models"]
    return {(label, seed): run["bpc"] for label, m in models.items() for seed, run in m["runs"].items()}


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_same_table_and_jobs_change_no_bpc(small_text, tmp_path, capsys):
    """The real command in its own process, stopped once its first run has finished; the same command again
    reuses every finished run and ends with the BPC of an uninterrupted sweep made with --jobs 2."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "ATTNFREE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["compare", "--data", small_text, *TINY, "--models", "fastformer,gpt2", "--seeds", "1,2",
            "--max-steps", "30", "--threads", "1"]
    # an uninterrupted sweep, two runs at once
    os.environ["ATTNFREE_CACHE"] = env["ATTNFREE_CACHE"]
    assert main([*args, "--output-dir", str(tmp_path / "together"), "--jobs", "2"]) == 0
    capsys.readouterr()
    # the same sweep one run at a time, killed once a run has finished
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "attnfree.cli", *args, "--output-dir", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("*/seed-*/run.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, 9)  # the sweep and the run it had started
    proc.wait()
    finished = {p.parent for p in out.glob("*/seed-*/run.json")}
    assert 1 <= len(finished) < 4 and not (out / "results.json").exists()
    assert main([*args, "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing") == len(finished) and err.count("[attnfree] training") == 4 - len(finished)
    assert bpcs(out) == bpcs(tmp_path / "together")
    assert bpc_rows(out) == bpc_rows(tmp_path / "together")


def test_a_finished_run_is_reused_under_settings_that_only_gained_defaults(tmp_path):
    """A run recorded before a settings field existed still counts (the field takes its default); another seed,
    a changed setting or a field that no longer exists does not."""
    from attnfree.compare import _finished
    from attnfree.training import TrainSettings

    settings = TrainSettings(output_dir=str(tmp_path), seed=3, max_steps=5)
    recorded = json.loads(json.dumps(settings.to_dict()))
    del recorded["compile"]  # as written by a version before the field
    recorded["progress"] = False  # changes no number

    def record(values):
        RunResult(model="fastformer", parameters=1, bpc=2.0, nats_per_char=1.0, loss_per_token=1.0, perplexity=2.0,
                  tokens_per_second=1.0, peak_memory_mb=1.0, wall_seconds=1.0, train_seconds=1.0, steps=5,
                  tokens_trained=1, stopped_by="max_steps", data_protocol="", eval_protocol="", eval_history=[],
                  train_history=[], world_size=1, device="cpu", output_dir=str(tmp_path),
                  settings=values).to_json(tmp_path / "run.json")

    record(recorded)
    assert _finished(settings) is not None
    record({**recorded, "output_dir": "/elsewhere/run"})  # the folder moved (or was restored from docs/results)
    assert _finished(settings) is not None
    record(recorded)
    assert _finished(settings.replace(seed=4)) is None and _finished(settings.replace(lr=2e-3)) is None
    record({**recorded, "retired_field": 1})
    assert _finished(settings) is None
    (tmp_path / "run.json").write_text('{"model": "fastf')  # a record cut short
    assert _finished(settings) is None


def test_equal_time_plans_steps_by_a_probe_and_keeps_the_plan(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    args = ["compare", "--data", small_text, *TINY, "--models", "fastformer,gpt2", "--budget-seconds", "1.5",
            "--output-dir", str(out), "--threads", "1"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.err.count("probing") == 1
    plan = json.loads((out / "budget-plan.json").read_text())["plans"]
    for label in ("fastformer", "gpt2"):
        run = RunResult.from_json(out / label / "seed-0")
        assert run.budget == plan[label] and run.budget["budget_seconds"] == 1.5
        assert run.steps == run.settings["max_steps"] == plan[label]["planned_steps"] >= 1
        assert plan[label]["planned_steps"] == max(1, int(1.5 / plan[label]["seconds_per_step"]))
        assert run.stopped_by == "max_steps" and run.train_seconds > 0
    assert "Equal time" in (out / "results.md").read_text() and "| train s |" in first.out
    # the same command again: the stored plan, so the same steps, and every run reused
    assert main(args) == 0
    again = capsys.readouterr().err
    assert "probing" not in again and again.count("reusing") == 2
    # finishing a sweep with more jobs, the thread count unchanged: still the stored plan
    assert main([*args, "--jobs", "2"]) == 0
    again = capsys.readouterr().err
    assert "probing" not in again and again.count("reusing") == 2
    # a model added to the sweep: probed beside the planned ones and put on the plan's clock; theirs unchanged
    added = [*args[:args.index("--models") + 1], "fastformer,gpt2,leviathan", *args[args.index("--models") + 2:]]
    assert main(added) == 0
    again = capsys.readouterr().err
    assert "probing the step time of leviathan (round-robin, anchored on fastformer, gpt2)" in again
    assert again.count("reusing") == 2
    extended = json.loads((out / "budget-plan.json").read_text())["plans"]
    assert {k: extended[k] for k in plan} == plan
    new = extended["leviathan"]
    assert new["clock_scale"] > 0 and new["planned_steps"] == max(1, int(1.5 / new["seconds_per_step"]))
    assert RunResult.from_json(out / "leviathan" / "seed-0").budget == new


def test_probe_steps_times_every_model_round_robin():
    from attnfree.data import ByteTokenizer
    from attnfree.training import TrainSettings
    from attnfree.training.budget import probe_steps

    settings = {m: TrainSettings(model=m, hidden_size=16, n_heads=2, num_layers=1, block_size=8, batch_size=2)
                for m in ("fastformer", "gpt2")}
    plans = probe_steps(settings, ByteTokenizer(), 10.0, rounds=3, warmup=1, threads=1)
    for plan in plans.values():
        assert plan.probe_steps == 3 and plan.seconds_per_step > 0
        assert plan.planned_steps == max(1, int(10.0 / plan.seconds_per_step))
    with pytest.raises(ValueError, match="budget_seconds"):
        probe_steps(settings, ByteTokenizer(), 0.0)


def test_a_later_probe_is_put_on_the_first_probes_clock():
    """Models probed on a machine twice as busy as at the first probe get the steps they would have got then."""
    from attnfree.training.budget import Plan, clock_scale

    first = {"a": Plan(300.0, 0.2, 5, 1500), "b": Plan(300.0, 0.5, 5, 600)}
    now = {"a": Plan(300.0, 0.4, 5, 750), "b": Plan(300.0, 1.0, 5, 300), "new": Plan(300.0, 0.6, 5, 500)}
    scale = clock_scale(first, now)
    assert scale == pytest.approx(0.5)
    moved = now["new"].rescaled(scale)
    assert moved.seconds_per_step == pytest.approx(0.3) and moved.planned_steps == 1000
    assert moved.clock_scale == pytest.approx(0.5) and moved.probe_steps == 5
    assert now["a"].rescaled(scale).planned_steps == 1500  # an anchor lands back on its own plan
    with pytest.raises(ValueError, match="no model was timed by both"):
        clock_scale(first, {"new": now["new"]})


def _processes_naming(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (Linux /proc)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_stopping_a_comparison_stops_its_runs(small_text, tmp_path):
    """SIGTERM to ``attnfree compare`` (as ``kill`` or a job scheduler sends it) stops the training processes too:
    left behind, a run would finish later and overwrite its folder's record."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cmp"
    env = {**os.environ, "ATTNFREE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [*ARGS[:ARGS.index("--max-steps")], "--max-steps", "100000", "--eval-every", "100000", "--no-progress",
            "--seeds", "3,4", "--jobs", "2"]
    parent = subprocess.Popen([sys.executable, "-m", "attnfree.cli", "compare", "--data", small_text,
                               "--output-dir", str(out), *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_processes_naming(str(out / "configs"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        runs = _processes_naming(str(out / "configs"))
        assert len(runs) == 2, "the two runs never started"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) != 0
    finally:
        parent.kill()
    deadline = time.monotonic() + 30
    while _processes_naming(str(out / "configs")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_naming(str(out / "configs")), "a training run outlived its comparison"
    assert not list(out.glob("*/seed-*/run.json"))

"""The side-by-side comparison: tiny models under two seeds, each run in its own process; tables, plots, samples."""

import json

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

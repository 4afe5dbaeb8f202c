"""The side-by-side comparison: two tiny models, each trained in its own process, then table, plots, samples."""

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


def test_compare_writes_table_plots_and_samples(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    code = main(["compare", "--models", "fastformer:residual=normed,gpt2", "--data", small_text,
                 "--tokenizer", "bpe:300", "--hidden-size", "32", "--n-heads", "2", "--num-layers", "2",
                 "--block-size", "32", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3",
                 "--no-progress", "--sample-tokens", "8", "--prompt", "KING:", "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| fastformer_residual=normed |" in printed and "| gpt2 |" in printed
    # the same trained tokenizer, budget and seed for both; each run's files in its own folder
    results = json.loads((out / "results.json").read_text())
    assert {"python", "torch", "transformers", "attnfree", "git_commit", "git_dirty"} <= results["provenance"].keys()
    runs = {k: RunResult(**v) for k, v in results["runs"].items()}
    assert list(runs) == ["fastformer_residual=normed", "gpt2"]
    assert {r.settings["tokenizer"] for r in runs.values()} == {str((out / "tokenizer").resolve())}
    assert all(r.steps == 6 and [h["step"] for h in r.eval_history] == [3, 6] for r in runs.values())
    assert runs["fastformer_residual=normed"].settings["model"] == "fastformer:residual=normed"
    for label in runs:
        assert (out / label / "run.json").is_file() and (out / label / "model.safetensors").is_file()
    # results.md: protocol, table, plots, samples
    text = (out / "results.md").read_text()
    assert "Data protocol:" in text and "Evaluation protocol" in text
    assert "| model | parameters | validation BPC | nats/char | loss/token | perplexity | tokens/s |" in text
    assert text.count("KING:") >= 2 and "### gpt2" in text
    for plot in ("bpc_vs_steps.png", "bpc_vs_seconds.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_and_table_rows():
    assert label_of("fastformer:kernel_size=8,residual=normed") == "fastformer_kernel_size=8_residual=normed"
    run = RunResult(model="gpt2", parameters=1234, bpc=2.5, nats_per_char=1.73, loss_per_token=1.73,
                    perplexity=5.64, tokens_per_second=1000.0, peak_memory_mb=512.0, wall_seconds=12.3,
                    train_seconds=10.0, steps=6, tokens_trained=768, stopped_by="max_steps", data_protocol="d",
                    eval_protocol="e", eval_history=[], train_history=[], world_size=1, device="cpu",
                    output_dir="x", settings={})
    lines = results_table({"gpt2": run}).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| gpt2 | 1,234 | 2.5000 | 1.7300 | 1.7300 | 5.640 | 1,000 | 512 | 12.3 | 6 |"

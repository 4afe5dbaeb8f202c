"""Multi-query associative recall: the task as Zoology defines it, and a model that solves it."""

from __future__ import annotations

import json

import pytest
import torch

from attnfree.cli import main
from attnfree.evaluation.recall import IGNORE, MQARTask, RecallSettings, make_mqar, train_recall


def test_the_sequences_hold_pairs_then_each_key_once_more_with_its_value_due():
    task = MQARTask(seq_len=32, n_pairs=4, vocab_size=64)
    inputs, targets = make_mqar(task, 200, seed=0)
    assert inputs.shape == targets.shape == (200, 32) and int(inputs.max()) < 64
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:8:2], x[1:8:2]
        assert len(set(keys)) == 4 and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        answers = [(t, v) for t, v in enumerate(y) if v != IGNORE]
        assert len(answers) == 4 and all(t >= 8 and t % 2 == 0 for t, _ in answers)  # even slots after the pairs
        assert sorted((x[t], v) for t, v in answers) == sorted(zip(keys, values))  # each key asks for its value
    again, _ = make_mqar(task, 200, seed=0)
    other, _ = make_mqar(task, 200, seed=1)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    gaps = [t for y in targets.tolist() for t, v in enumerate(y) if v != IGNORE]
    assert sum(g < 16 for g in gaps) > sum(g >= 24 for g in gaps)  # power law: most queries come early


@pytest.mark.parametrize("change", [dict(seq_len=15), dict(seq_len=16, n_pairs=5), dict(vocab_size=8, n_pairs=4)])
def test_impossible_tasks_are_refused(change):
    with pytest.raises(ValueError):
        MQARTask(**{**dict(seq_len=16, n_pairs=2, vocab_size=32), **change})


def test_an_attention_model_solves_a_tiny_setting_and_state_bytes_are_counted(tmp_path):
    """Two layers: the fewest with which attention can look a key up and read the token after it (an induction
    head needs a previous-token head below it)."""
    settings = RecallSettings(MQARTask(seq_len=16, n_pairs=2, vocab_size=32), width=64, layers=2, heads=2,
                              train_examples=4000, test_examples=500, steps=800, batch_size=32)
    result = train_recall("gpt2", settings)
    assert result.accuracy >= 0.95, result
    assert result.state_bytes == 2 * 2 * 16 * 64 * 4  # the KV cache: keys and values, 2 layers, T=16, width 64, fp32
    fast = train_recall("fastformer", RecallSettings(settings.task, width=64, layers=2, heads=2, steps=2))
    assert fast.state_bytes < result.state_bytes and 0 <= fast.accuracy <= 1


def test_the_cli_writes_a_table_and_resumes(tmp_path, capsys):
    args = ["recall", "--models", "fastformer,gpt2", "--seq-len", "16", "--n-pairs", "2", "--vocab-size", "32",
            "--widths", "16", "--layers", "1", "--steps", "3", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["result"]["model"] for r in runs] == ["fastformer", "gpt2"] and (tmp_path / "results.md").is_file()
    assert (tmp_path / "accuracy_vs_state.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(args) == 0  # everything reused: nothing trained again
    assert "recall fastformer" not in capsys.readouterr().err


def test_sweeps_are_collected_into_one_table_with_their_own_provenance(tmp_path, capsys):
    """Two sweeps (as if run at different commits) in one table and plot, nothing trained; each run keeps the
    provenance of the sweep that made it."""
    common = ["--seq-len", "16", "--n-pairs", "2", "--vocab-size", "32", "--widths", "16", "--layers", "1",
              "--steps", "2"]
    for name, model in (("a", "fastformer"), ("b", "gpt2")):
        assert main(["recall", "--models", model, *common, "--output-dir", str(tmp_path / name)]) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    first["provenance"]["git_commit"] = "an-older-commit"
    (tmp_path / "a" / "results.json").write_text(json.dumps(first))
    capsys.readouterr()
    out = tmp_path / "both"
    assert main(["recall", "--collect", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--output-dir", str(out)]) == 0
    assert "recall fastformer" not in capsys.readouterr().err  # nothing trained
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["result"]["model"] for r in runs] == ["fastformer", "gpt2"]
    assert runs[0]["provenance"]["git_commit"] == "an-older-commit" != runs[1]["provenance"]["git_commit"]
    assert runs[0]["source"] == str(tmp_path / "a")
    assert "| gpt2 |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_state.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["recall", "--collect", str(tmp_path / "nothing"), "--output-dir", str(out)]) == 2
    assert "no recall results at" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --output-dir"):
        main(["recall", "--collect", str(tmp_path / "a")])


def test_the_frontier_keeps_the_best_accuracy_each_budget_of_state_buys():
    from attnfree.evaluation.recall import pareto_frontier

    points = [(4000, 0.8), (1000, 0.3), (2000, 0.25), (32000, 1.0), (1000, 0.28), (50000, 0.9)]
    assert pareto_frontier(points) == [(1000, 0.3), (4000, 0.8), (32000, 1.0)]
    assert pareto_frontier([]) == []

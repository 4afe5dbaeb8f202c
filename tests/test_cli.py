"""The ``attnfree`` command as a user runs it: subprocesses, exit codes, files on disk."""

import json
import os
import re
import subprocess
import sys

import pytest

from attnfree.checkpoints import load_checkpoint
from attnfree.cli import main
from attnfree.inference.decoding import generate_text

TINY = ["--hidden-size", "32", "--n-heads", "2", "--num-layers", "2", "--block-size", "32", "--batch-size", "4",
        "--log-every", "2", "--no-progress"]


def attnfree(*args: str) -> list[str]:
    return [sys.executable, "-m", "attnfree.cli", *args]


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "ATTNFREE_CACHE": str(cache), "ATTNFREE_DATA": str(data_dir), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def small_text(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    return str(path)


def run_all(commands: list[list[str]], env: dict) -> list[subprocess.CompletedProcess]:
    """Run commands concurrently (each pays the import of torch once) and wait for all."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outs = [p.communicate(timeout=120) for p in procs]
    return [subprocess.CompletedProcess(c, p.returncode, o, e) for c, p, (o, e) in zip(commands, procs, outs)]


@pytest.fixture(scope="module")
def trained(small_text, env, tmp_path_factory):
    """One tiny run: 8 steps, a checkpoint at step 4."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cmd = attnfree("train", "--data", small_text, *TINY, "--max-steps", "8", "--save-every", "4",
                   "--eval-every", "4", "--output-dir", str(out))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


SUBCOMMANDS = ["train", "eval", "generate", "compare"]


def test_help_from_the_console(env):
    top, train = run_all([attnfree("--help"), attnfree("train", "--help")], env)
    assert top.returncode == 0 and all(s in top.stdout for s in SUBCOMMANDS), top.stderr
    assert train.returncode == 0 and "usage: attnfree train" in train.stdout, train.stderr
    for flag in ("--recipe", "--training-arg", "--model-override", "--max-seconds", "--resume", "--eval-max-chars"):
        assert flag in train.stdout


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_has_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([subcommand, "--help"])
    assert exit_.value.code == 0 and f"usage: attnfree {subcommand}" in capsys.readouterr().out


def test_train_writes_model_tokenizer_checkpoint_and_run_json(trained):
    run = json.loads((trained / "run.json").read_text())
    assert run["steps"] == 8 and run["model"] == "fastformer" and run["settings"]["block_size"] == 32
    assert [h["step"] for h in run["eval_history"]] == [4, 8]
    for key in ("bpc", "nats_per_char", "loss_per_token", "perplexity", "tokens_per_second", "peak_memory_mb",
                "wall_seconds", "data_protocol", "eval_protocol", "parameters"):
        assert key in run
    for folder in (trained, trained / "checkpoint-4"):
        assert (folder / "model.safetensors").is_file() and (folder / "attnfree_tokenizer.json").is_file()
    assert (trained / "checkpoint-4" / "optimizer.pt").is_file()


def test_eval_reproduces_the_final_bpc_and_generate_streams(trained, small_text, env):
    evaluated, plain, generated = run_all([
        attnfree("eval", str(trained), "--data", small_text, "--json"),
        attnfree("eval", str(trained / "checkpoint-4"), "--data", small_text, "--stride", "16"),
        attnfree("generate", str(trained), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--greedy"),
    ], env)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["bpc"] == pytest.approx(json.loads((trained / "run.json").read_text())["bpc"], abs=1e-6)
    assert plain.returncode == 0, plain.stderr
    assert {line.split(":")[0] for line in plain.stdout.splitlines()} == {
        "bpc", "nats/char", "loss/token", "perplexity", "protocol"}
    assert "stride 16" in plain.stdout
    assert generated.returncode == 0, generated.stderr
    model, tokenizer = load_checkpoint(trained)
    expected = generate_text(model, tokenizer, "ROMEO:", max_new_tokens=12, greedy=True)
    assert generated.stdout == "ROMEO:" + expected + "\n"


def bad_inputs(small_text: str, tmp_path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    return {
        "missing file": (["--data", str(tmp_path / "missing.txt")], "text file .*missing.txt not found"),
        "empty file": (["--data", str(empty)], "is empty"),
        "block > positions": (["--data", small_text, "--block-size", "64", "--n-positions", "32"],
                              "block_size exceeds the model's n_positions=32"),
        "unknown model": (["--data", small_text, "--model", "lstm"], "unknown model 'lstm'; valid: "),
        "unknown recipe": (["--recipe", "imagenet"], "unknown recipe 'imagenet'; valid: demo"),
        "bad override": (["--data", small_text, "--model-override", "kernal=3"], "unknown FastformerConfig field"),
        "bad training arg": (["--data", small_text, "--training-arg", "lerning_rate=3"], "not a TrainingArguments"),
    }


def check_error(name: str, code: int, stderr: str, message: str, out) -> None:
    assert code == 2, (name, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnfree: error: "), (name, stderr)
    assert re.search(message, lines[0]), (name, lines[0])
    assert not (out / "run.json").exists() and not list(out.glob("checkpoint-*"))  # failed before training


def test_bad_input_fails_in_one_line_from_the_console(small_text, env, tmp_path):
    cases = {k: v for k, v in bad_inputs(small_text, tmp_path).items() if k in ("missing file", "block > positions")}
    commands = [attnfree("train", *args, "--output-dir", str(tmp_path / "out")) for args, _ in cases.values()]
    for (name, (_, message)), done in zip(cases.items(), run_all(commands, env)):
        check_error(name, done.returncode, done.stderr, message, tmp_path / "out")


@pytest.mark.parametrize("case", ["missing file", "empty file", "block > positions", "unknown model",
                                  "unknown recipe", "bad override", "bad training arg"])
def test_bad_input_fails_in_one_line_before_training(case, small_text, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "cache"))
    args, message = bad_inputs(small_text, tmp_path)[case]
    code = main(["train", *TINY, "--max-steps", "2", *args, "--output-dir", str(tmp_path / "out")])
    check_error(case, code, capsys.readouterr().err, message, tmp_path / "out")

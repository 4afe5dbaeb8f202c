"""Training settings, the model registry, callbacks, resume and streaming, in-process on tiny models."""

import io

import pytest
import torch
from transformers import TrainerCallback

import attnfree
from attnfree.data import ByteTokenizer
from attnfree.inference.decoding import TokenStreamer
from attnfree.training import RECIPES, RunResult, TrainSettings, recipe, train

TINY = dict(hidden_size=32, n_heads=2, num_layers=2, block_size=32, batch_size=4, max_steps=8, log_every=2,
            progress=False, eval_batch_size=32)


@pytest.fixture(scope="module")
def small_text(data_dir, tmp_path_factory):
    """The first 20,000 characters of Tiny Shakespeare (last 10% held out by the file loader)."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    return str(path)


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    """Tiny models run fastest on one thread (and are not disturbed by other processes' threads)."""
    monkeypatch.setenv("ATTNFREE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Settings and recipes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"block_size": 128, "n_positions": 64}, "block_size"),
        ({"hidden_size": 30, "n_heads": 4}, "hidden_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"lr": 0.0}, "lr"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"eval_stride": 65}, "eval_stride"),
        ({"max_seconds": -1.0}, "max_seconds"),
        ({"extra_training_args": {"learning_rate": 1.0}}, "extra_training_args"),
        ({"extra_training_args": {"not_an_argument": 1}}, "extra_training_args"),
    ],
    ids=["block>positions", "heads", "batch", "dropout", "lr", "betas", "stride", "seconds", "owned-arg",
         "unknown-arg"],
)
def test_settings_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=f"TrainSettings.{field}"):
        TrainSettings(**change)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'transformer'; valid: .*fastformer.*gpt2"):
        TrainSettings(model="transformer")


def test_recipes_and_overrides():
    assert set(RECIPES) >= {"demo", "nanogpt-char", "earlier-work"}
    nano = recipe("nanogpt-char", max_steps=10)
    assert (nano.hidden_size, nano.n_heads, nano.num_layers, nano.block_size, nano.batch_size) == (128, 4, 4, 64, 12)
    assert nano.max_steps == 10 and RECIPES["nanogpt-char"].max_steps == 2000
    assert recipe("earlier-work").tokenizer == "gpt2"
    long, tokens = recipe("shakespeare-512"), lambda s: s.batch_size * s.block_size * s.max_steps
    assert long.block_size == 512 and long.size == nano.replace(block_size=512).size
    assert tokens(long) == 2 * tokens(RECIPES["nanogpt-char"])  # windows shorter than the context, twice the cost
    with pytest.raises(ValueError, match="unknown recipe 'nope'; valid: demo"):
        recipe("nope")


def test_settings_round_trip_through_a_dict():
    settings = TrainSettings(model="fastformer:preset=seed", betas=(0.8, 0.95), report_to=["tensorboard"])
    assert TrainSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown TrainSettings field"):
        TrainSettings.from_dict({"widht": 3})


# ----------------------------------------------------------------------------------------------
# train(): results, budget, resume
# ----------------------------------------------------------------------------------------------


def test_train_records_everything(small_text, tmp_path):
    result = train(TrainSettings(data=small_text, output_dir=str(tmp_path / "run"), eval_every=4,
                                 eval_max_chars=500, **TINY))
    assert result == RunResult.from_json(tmp_path / "run")
    assert result.steps == 8 and result.stopped_by == "max_steps" and result.tokens_trained == 8 * 4 * 32
    assert [h["step"] for h in result.eval_history] == [4, 8]
    assert result.eval_history[0]["chars"] == 500 and result.eval_history[-1]["chars"] == 2000  # final: whole
    assert result.eval_history[-1]["bpc"] == result.bpc and 0 < result.bpc < 9
    assert result.tokens_per_second > 0 and result.peak_memory_mb > 10 and result.parameters > 0
    assert [h["step"] for h in result.train_history] == [1, 2, 4, 6, 8]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    recorded = result.provenance  # the versions and the source that produced the run
    assert recorded["torch"] == torch.__version__ and recorded["attnfree"] == attnfree.__version__
    assert len(recorded["git_commit"]) == 40 and isinstance(recorded["git_dirty"], bool)
    assert {"python", "transformers"} <= recorded.keys()


def test_max_seconds_stops_cleanly(small_text, tmp_path):
    settings = TrainSettings(data=small_text, output_dir=str(tmp_path / "run"), **{**TINY, "max_steps": 100_000},
                             max_seconds=0.5)
    result = train(settings)
    assert result.stopped_by == "max_seconds" and 0 < result.steps < 100_000
    assert 0.5 <= result.train_seconds < 60  # generous: shared CPUs can stall a step


class Crash(TrainerCallback):
    """Simulates a killed run: raises at the end of step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed at step {self.at}")


def test_resumed_run_ends_like_an_uninterrupted_one(small_text, tmp_path):
    common = dict(data=small_text, save_every=4, eval_every=4, **{**TINY, "max_steps": 10})
    clean = train(TrainSettings(output_dir=str(tmp_path / "clean"), **common))
    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(output_dir=str(tmp_path / "cut"), **common), callbacks=[Crash(at=6)])
    assert not (tmp_path / "cut" / "run.json").exists()
    resumed = train(TrainSettings(output_dir=str(tmp_path / "cut"), resume=True, **common))
    assert resumed.steps == clean.steps == 10
    assert resumed.bpc == pytest.approx(clean.bpc, abs=1e-6)
    assert [h["loss"] for h in resumed.train_history] == pytest.approx([h["loss"] for h in clean.train_history],
                                                                        abs=1e-6)
    assert [h["bpc"] for h in resumed.eval_history] == pytest.approx([h["bpc"] for h in clean.eval_history],
                                                                      abs=1e-6)


def test_resume_from_a_missing_checkpoint_is_an_error(small_text, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        train(TrainSettings(data=small_text, output_dir=str(tmp_path), resume=str(tmp_path / "checkpoint-9"),
                            **TINY))


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------


def test_streamer_holds_back_partial_utf8_characters():
    tokenizer, out = ByteTokenizer(), io.StringIO()
    streamer = TokenStreamer(tokenizer, out=out)
    streamer.put(torch.tensor([tokenizer.encode("Hi ")]))  # the prompt
    seen = []
    for byte in tokenizer.encode("café ☕"):
        streamer.put(torch.tensor([byte]))
        seen.append(out.getvalue())
    streamer.end()
    assert out.getvalue() == "Hi café ☕\n"
    assert all("\ufffd" not in s for s in seen)

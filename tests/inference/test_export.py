"""ONNX export, the torch-free runtime and int8 quantization, checked against the PyTorch models.

The exported graphs are compared with the PyTorch model itself (prefill of a left-padded batch, then 50 steps fed
with PyTorch's greedy tokens), to FLOAT32_ATOL in absolute value on every logit. An export takes 10-20 s on a
small CPU, so the default run exports two models (fastformer-conv: convolution + additive state; leviathan: the
window state); plain fastformer (the same additive state) runs under ``-m slow``. The functional step modules
behind the export are checked for every model without exporting (fast).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from attnfree.checkpoints import load_checkpoint  # noqa: E402
from attnfree.cli import main  # noqa: E402
from attnfree.data import ByteTokenizer  # noqa: E402
from attnfree.evaluation.bpc import evaluate_bpc  # noqa: E402
from attnfree.inference.decoding import stream_generate  # noqa: E402
from attnfree.inference.export import (  # noqa: E402
    Prefill,
    PrefillAndScore,
    Score,
    _keep_outputs,
    deployed_bytes,
    empty_state,
    quantize_dynamic_int8,
    state_specs,
    step_module,
)
from attnfree.inference.runtime import OnnxLM  # noqa: E402
from attnfree.inference.runtime import Sampling as NpSampling  # noqa: E402
from attnfree.inference.sampling import Sampling  # noqa: E402
from attnfree.models.compat import output_cache  # noqa: E402
from attnfree.models.registry import ModelSize, build_model, max_positions  # noqa: E402
from attnfree.testing import perturb  # noqa: E402

FLOAT32_ATOL = 1e-4  # exported vs PyTorch logits, float32 both sides (observed: ~1e-6)
BPC_TOLERANCE = 0.05  # int8 (torch or onnxruntime) vs float32 BPC of the briefly trained tiny model
TOK = ByteTokenizer()
TINY = ModelSize(hidden_size=32, n_heads=2, num_layers=2, n_positions=96)
# lags 0..3, 4, 8, 16, 32, 64: dense and dilated both; fastformer-conv with learned positions (the position limit
# in the manifest and the runtime), fastformer without (its default)
OVERRIDES = {"leviathan": {"dense_lags": 4}, "fastformer-conv": {"position_embedding_type": "learned"}}
MODELS = ["fastformer", "fastformer-conv", "fastformer-local", "leviathan"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread (two threads on busy shared cores made the export fixture 3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb(build_model(name, TINY, TOK, OVERRIDES.get(name)), seed, std=0.2).eval()


def padded_batch(seed: int = 0, T: int = 11, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, T] byte ids, the second row left-padded by ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = TOK.pad_token_id
    return ids, mask


# ----------------------------------------------------------------------------------------------
# The functional pieces, in torch (every model, no export)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_step_module_matches_model_decoding(name):
    """Prefill module + 20 functional steps == the model's own cached decoding (left-padded batch of 2)."""
    model = tiny(name)
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        last, *state = Prefill(model)(ids, mask)
        torch.testing.assert_close(last, out.logits[:, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(Score(model)(ids, mask), out.logits, rtol=1e-5, atol=1e-5)
        step = step_module(model)
        token = out.logits[:, -1].argmax(-1)
        for t in range(20):
            ref = model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1]
            got, *state = step(token[:, None], *state)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{name} step {t}")
            token = ref.argmax(-1)


@pytest.mark.parametrize("name", MODELS)
def test_state_specs_describe_the_state(name):
    model = tiny(name)
    ids, mask = padded_batch()
    with torch.no_grad():
        state = Prefill(model)(ids, mask)[1:]
    specs = state_specs(model)
    assert [tuple(t.shape[1:]) for t in state] == [s.shape[1:] for s in specs]
    assert [str(t.dtype).removeprefix("torch.") for t in state] == [s.dtype for s in specs]
    assert [tuple(t.shape) for t in empty_state(specs, 3)] == [(3, *s.shape[1:]) for s in specs]


def test_a_model_without_a_recurrent_cache_is_refused():
    gpt2 = build_model("gpt2", TINY, TOK)
    with pytest.raises(ValueError, match="ONNX export covers attnfree's recurrent models"):
        state_specs(gpt2)


# ----------------------------------------------------------------------------------------------
# One export through the CLI: a briefly trained tiny model, int8 graphs included
# ----------------------------------------------------------------------------------------------


def train_briefly(model: torch.nn.Module, text: str, steps: int = 150, T: int = 64, B: int = 16) -> None:
    """A few seconds of AdamW on byte windows: enough structure for a BPC tolerance to mean something."""
    data = torch.tensor(TOK.encode(text))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        batch = torch.stack([data[s:s + T] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def shakespeare(data_dir) -> tuple[str, str]:
    """(training slice, validation slice) of Tiny Shakespeare: 60k and 3k characters."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    split = int(len(text) * 0.9)
    return text[:60_000], text[split:split + 3_000]


EXPORTED = ["fastformer-conv", "leviathan", pytest.param("fastformer", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=EXPORTED)
def exported(request, tmp_path_factory, shakespeare) -> tuple[torch.nn.Module, Path, Path]:
    """(PyTorch model, checkpoint folder, export folder) after ``attnfree export --quantize int8``."""
    name = request.param
    torch.manual_seed(0)
    model = build_model(name, TINY, TOK, OVERRIDES.get(name))
    train_briefly(model, shakespeare[0])
    ckpt = tmp_path_factory.mktemp("ckpt") / name
    model.save_pretrained(ckpt)
    TOK.save(ckpt)
    out = tmp_path_factory.mktemp("onnx") / name
    assert main(["export", str(ckpt), "--format", "onnx", "--output", str(out), "--quantize", "int8"]) == 0
    return load_checkpoint(ckpt)[0], ckpt, out


def test_exported_prefill_and_50_steps_match_pytorch(exported):
    model, _, folder = exported
    lm = OnnxLM.load(folder)
    ids, mask = padded_batch(seed=1)
    # 1. prefill of a left-padded batch: every real position's logits, the last ones, the state
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    last, state = lm.run_prefill(ids.numpy(), mask.numpy())
    all_logits = lm.all_logits(ids.numpy(), mask.numpy())
    real = mask.bool().numpy()
    np.testing.assert_allclose(all_logits[real], out.logits.numpy()[real], rtol=0, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(last, out.logits[:, -1].numpy(), rtol=0, atol=FLOAT32_ATOL)
    # 2. 50 steps, both fed PyTorch's greedy tokens
    cache, token = output_cache(out), out.logits[:, -1].argmax(-1)
    worst = 0.0
    for t in range(50):
        with torch.no_grad():
            ref = model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1]
        got, state = lm.step(token.numpy(), state)
        worst = max(worst, float(np.abs(got - ref.numpy()).max()))
        assert worst <= FLOAT32_ATOL, f"step {t}: max abs logit error {worst:.2e}"
        token = ref.argmax(-1)


def test_exported_prefill_any_length(exported):
    """One graph for every T: the lengths around the scan's chunk (32) and the position limit (96)."""
    model, _, folder = exported
    lm = OnnxLM.load(folder)
    g = torch.Generator().manual_seed(3)
    for T in (1, 2, 31, 32, 33, 65, 96):
        ids = torch.randint(0, 256, (1, T), generator=g)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        got = lm.all_logits(ids.numpy(), np.ones((1, T), dtype=np.int64))
        last, _ = lm.run_prefill(ids.numpy(), np.ones((1, T), dtype=np.int64))
        np.testing.assert_allclose(last, want[:, -1].numpy(), rtol=0, atol=FLOAT32_ATOL, err_msg=f"T={T}")
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=FLOAT32_ATOL, err_msg=f"T={T}")


def test_runtime_generate_greedy_matches_pytorch(exported):
    model, _, folder = exported
    lm = OnnxLM.load(folder)
    prompts = [TOK.encode("ROMEO:"), TOK.encode("First Citizen:\nWe")]
    T = max(map(len, prompts))
    ids = torch.tensor([[TOK.pad_token_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    want = torch.stack(list(stream_generate(model, ids, 40, Sampling(greedy=True), attention_mask=mask)), 1)
    got = np.stack(list(lm.generate_ids(prompts, 40, NpSampling(greedy=True))), 1)
    np.testing.assert_array_equal(got, want.numpy())
    text = "".join(lm.generate("ROMEO:", max_new_tokens=40, greedy=True))
    assert text == TOK.decode(want[0].tolist())


def test_runtime_runs_without_torch(exported):
    """The copied runtime.py, run from the export folder alone: no torch (nor transformers) is imported."""
    _, _, folder = exported
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import runtime; "
            "lm = runtime.OnnxLM.load(sys.argv[1]); print(''.join(lm.generate('ROMEO:', 20, greedy=True)), end=''); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                          cwd=folder)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) > 0
    cli = subprocess.run([sys.executable, str(folder / "runtime.py"), str(folder), "--prompt", "ROMEO:", "--greedy",
                          "--max-new-tokens", "20", "--quantized"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("ROMEO:")


def test_packaged_runtime_works_where_torch_is_not_installed(exported):
    """``attnfree.inference.runtime`` from the installed package, with torch and transformers made unimportable (as on a
    device that has only numpy + onnxruntime): the package imports without its models and the runner works."""
    _, _, folder = exported
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; import attnfree; "
            "assert not attnfree.HAS_TORCH; from attnfree.inference.runtime import OnnxLM; "
            "lm = OnnxLM.load(sys.argv[1]); print(''.join(lm.generate('ROMEO:', 20, greedy=True)), end='')")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) > 0


def test_manifest(exported):
    model, _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "attnfree-onnx" and manifest["format_version"] == 2
    assert manifest["vocab_size"] == TOK.vocab_size and manifest["max_positions"] == max_positions(model)
    assert max_positions(model) in (TINY.n_positions, None)
    assert (manifest["bos_token_id"], manifest["eos_token_id"]) == (TOK.bos_token_id, TOK.eos_token_id)
    assert manifest["tokenizer"]["kind"] == "byte" and manifest["architecture"] == type(model).__name__
    graphs = {"step", "prefill", "score", "step.int8", "prefill.int8", "score.int8"}
    assert set(manifest["graphs"]) == graphs
    assert {f"{g}.onnx" for g in graphs} | {"weights.bin", "runtime.py"} <= set(manifest["files"])
    specs = state_specs(model)
    assert [s["name"] for s in manifest["state"]] == [s.name for s in specs]
    # the graphs' own signatures agree with the manifest
    step = ort.InferenceSession(str(folder / "step.onnx"))
    assert [i.name for i in step.get_inputs()] == manifest["step"]["inputs"]
    assert [o.name for o in step.get_outputs()] == manifest["step"]["outputs"]
    shapes = [i.shape for i in step.get_inputs()[1:]]
    assert [[d if isinstance(d, int) else "B" for d in s] for s in shapes] == [s["shape"] for s in manifest["state"]]
    assert [o.shape[1:] for o in ort.InferenceSession(str(folder / "prefill.onnx")).get_outputs()[:1]] == [
        [TOK.vocab_size]]
    assert [o.shape[1:] for o in ort.InferenceSession(str(folder / "score.onnx")).get_outputs()] == [
        ["T", TOK.vocab_size]]


def test_one_forward_gives_the_prefill_and_the_scores(exported):
    """``PrefillAndScore`` (traced once for both graphs) computes what ``Prefill`` and ``Score`` compute; pruned to
    its outputs, the prefill graph runs the head once, on the last position only."""
    import onnx

    model, _, folder = exported
    ids, mask = padded_batch(seed=2)
    with torch.no_grad():
        all_logits, last, *state = PrefillAndScore(model)(ids, mask)
        torch.testing.assert_close(all_logits, Score(model)(ids, mask), rtol=1e-5, atol=1e-5)
        for got, want in zip([last, *state], Prefill(model)(ids, mask), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    V = TOK.vocab_size
    for graph in ("prefill", "score"):
        proto = onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False).graph
        heads = {t.name for t in proto.initializer if V in t.dims and len(t.dims) == 2}
        assert len([n for n in proto.node if heads.intersection(n.input) and n.op_type != "Gather"]) == 1, graph
    outputs = [o.name for o in onnx.load(str(folder / "score.onnx"), load_external_data=False).graph.output]
    assert outputs == ["all_logits"]


def test_keep_outputs_prunes_what_no_output_needs(tmp_path):
    """A graph with two outputs, a subgraph reading an outer name and an initializer each: pruned to one output,
    the other's nodes and initializer go, the subgraph's outer name stays; the pruned graph still runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")]
    then = helper.make_graph([helper.make_node("Identity", ["w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["picked"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["picked", "x"], ["a"]),
             helper.make_node("Mul", ["x", "u"], ["b"])]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("w", [1.0, 2.0]), ("u", [3.0, 4.0]), ("zero", 0.0))]
    source = tmp_path / "both.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                                opset_imports=[helper.make_opsetid("", 18)]), str(source))
    onnx.save(_keep_outputs(onnx.load(str(source)), ["a"]), str(tmp_path / "a.onnx"))
    pruned = onnx.load(str(tmp_path / "a.onnx")).graph
    assert [n.op_type for n in pruned.node] == ["ReduceSum", "Greater", "If", "Add"]
    assert sorted(t.name for t in pruned.initializer) == ["w", "zero"] and [o.name for o in pruned.output] == ["a"]
    a = ort.InferenceSession(str(tmp_path / "a.onnx")).run(None, {"x": np.array([1.0, 1.0], np.float32)})[0]
    np.testing.assert_allclose(a, [2.0, 3.0])
    with pytest.raises(ValueError, match="not all of"):
        _keep_outputs(onnx.load(str(source)), ["c"])


def test_the_graphs_share_one_copy_of_the_weights(exported):
    """Every weight of 1 KiB or more is in weights.bin, once: the three float graphs use the same entries, so
    they need no more bytes together than the step alone (plus its scan constants), and about the model's size."""
    import onnx

    model, _, folder = exported
    for file in json.loads((folder / "manifest.json").read_text())["graphs"].values():
        for init in onnx.load(str(folder / file), load_external_data=False).graph.initializer:
            inline = init.data_location != onnx.TensorProto.EXTERNAL
            assert not (inline and len(init.raw_data) >= 1024), f"{file}: {init.name} is not in weights.bin"
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    step = deployed_bytes(folder, ["step.onnx"])
    everything = deployed_bytes(folder, ["step.onnx", "prefill.onnx", "score.onnx"])
    assert parameter_bytes * 0.9 < step < parameter_bytes * 1.5 + 300_000
    assert everything < step + 600_000  # the prefill's and the scoring graph's own structure only


def test_runtime_refuses_bad_input(exported, tmp_path):
    model, _, folder = exported
    lm = OnnxLM.load(folder)
    if max_positions(model) is not None:  # learned positions: a limit to refuse past
        with pytest.raises(ValueError, match="n_positions=96"):
            lm.prefill([[65] * 97])
        with pytest.raises(ValueError, match="exceeds the model's n_positions=96"):
            list(lm.generate_ids([[65] * 90], 10))
        _, state = lm.prefill([[65] * 96])
        with pytest.raises(ValueError, match="position 96 is beyond"):
            lm.step(np.array([65]), state)
    else:  # no limit: a prompt past TINY.n_positions is served
        assert lm.prefill([[65] * 97])[0].shape == (1, TOK.vocab_size)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.prefill([[TOK.vocab_size]])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        OnnxLM.load(tmp_path)
    tampered = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, tampered)
    (tampered / "step.onnx").write_bytes((tampered / "step.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match its manifest"):
        OnnxLM.load(tampered)


def test_cli_export_errors(tmp_path, capsys, exported):
    _, ckpt, _ = exported
    assert main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "no model checkpoint (config.json)" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "tflite", "--output", str(tmp_path / "o")]) == 2
    assert "unknown export format 'tflite'; valid: onnx" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--quantize", "int4", "--output", str(tmp_path / "o")]) == 2
    assert "quantize must be None or 'int8'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# int8: ONNX (onnxruntime's quantizer) and PyTorch (torch.ao dynamic quantization)
# ----------------------------------------------------------------------------------------------


def test_int8_bpc_within_tolerance(exported, shakespeare):
    """BPC on 3,000 held-out characters: int8 torch and int8 onnx within BPC_TOLERANCE of float32; the float32
    ONNX scoring path equals PyTorch's evaluate_bpc."""
    model, _, folder = exported
    text = shakespeare[1]
    tokens = TOK.encode(text)
    bpc = {}
    for label, m in (("torch", model), ("torch-int8", quantize_dynamic_int8(model))):
        bpc[label] = evaluate_bpc(m, torch.tensor(tokens), len(text), 64, batch_size=16,
                                  bos_token_id=TOK.bos_token_id).bpc
    for label, quantized in (("onnx", False), ("onnx-int8", True)):
        nats, _ = OnnxLM.load(folder, quantized=quantized).score(tokens, 64, batch_size=16)
        bpc[label] = nats / len(text) / math.log(2)
    assert bpc["torch"] < 5.0, f"the brief training did not learn (uniform: 8.0 BPC): {bpc}"
    assert abs(bpc["onnx"] - bpc["torch"]) < 1e-4, bpc
    assert abs(bpc["torch-int8"] - bpc["torch"]) < BPC_TOLERANCE, bpc
    assert abs(bpc["onnx-int8"] - bpc["torch"]) < BPC_TOLERANCE, bpc


def test_int8_logits_close_and_graph_smaller(exported):
    model, _, folder = exported
    ids, mask = padded_batch(seed=2)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        q = quantize_dynamic_int8(model)(input_ids=ids, attention_mask=mask).logits[:, -1]
    lm8 = OnnxLM.load(folder, quantized=True)
    got, _ = lm8.prefill([ids[0].tolist(), ids[1, 4:].tolist()])
    spread = float(ref.std())
    assert float((q - ref).abs().max()) < 0.25 * spread + 0.05
    assert float(np.abs(got - ref.numpy()).max()) < 0.25 * spread + 0.05
    assert deployed_bytes(folder, ["step.int8.onnx"]) < deployed_bytes(folder, ["step.onnx"])
    # the quantized torch model still decodes through our loop
    tokens = list(stream_generate(quantize_dynamic_int8(model), ids, 5, Sampling(greedy=True), attention_mask=mask))
    assert len(tokens) == 5


@pytest.mark.slow
def test_quantize_benchmark_quick(tmp_path):
    """``python -m benchmarks.quantize --quick`` as the lead runs it: four variants, JSON and plot."""
    import os

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "quantize.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.quantize", "--quick", "--out", str(out)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8"]
    assert all(r["size_mb"] > 0 and r["tok_s_b1"] > 0 and math.isfinite(r["bpc"]) for r in rows)
    assert out.with_suffix(".png").is_file()


def test_bpe_tokenizer_travels_to_the_runtime(tmp_path, shakespeare):
    """A BPE vocabulary is saved as tokenizer.json and read back by the runtime with ``tokenizers`` alone."""
    from attnfree.data import train_bpe_tokenizer
    from attnfree.inference.export import _tokenizer_record
    from attnfree.inference.runtime import load_codec

    tok = train_bpe_tokenizer(shakespeare[0][:20_000], 300)
    record = _tokenizer_record(tok, tmp_path / "tokenizer")
    assert record["kind"] == "tokenizers" and record["eos_token_id"] == tok.eos_token_id
    codec = load_codec(tmp_path, record)
    text = shakespeare[1][:500]
    assert codec.encode(text) == tok.encode(text)
    assert codec.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text


def test_numpy_sampling_rules():
    from attnfree.inference.runtime import pick_next

    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    greedy = pick_next(logits[:1], NpSampling(greedy=True), rng)
    assert greedy.tolist() == [0]
    assert set(pick_next(logits, NpSampling(top_k=2), rng).tolist()) == {0, 1}
    assert set(pick_next(logits, NpSampling(top_p=0.7), rng).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    draws = pick_next(logits, NpSampling(), rng)
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [0.5, 0.3, 0.15, 0.05], atol=0.04)
    for temperature in (5e-324, 1e300):  # no NaN at either end: greedy among the ties, or uniform
        picks = pick_next(np.array([[0.5, 2.0, -1.0, 2.0]] * 400), NpSampling(temperature), rng)
        assert set(picks.tolist()) == ({1, 3} if temperature < 1 else {0, 1, 2, 3})
    with pytest.raises(ValueError, match="top_p"):
        NpSampling(top_p=0.0)


def test_a_version_1_export_still_loads(exported, tmp_path):
    """The earlier layout (format_version 1: no scoring graph, the prefill also returning all_logits, weights
    inside the graphs) is read by this runtime: the same last logits, state and scores as the version-2 export."""
    import shutil

    from attnfree.inference.export import _export

    model, _, folder = exported
    old = tmp_path / "v1"
    shutil.copytree(folder, old)

    class PrefillV1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
            return (out.logits[:, -1], out.logits, *(t for _, t in output_cache(out).flatten()))

    manifest = json.loads((old / "manifest.json").read_text())
    ids, mask = padded_batch(seed=4, T=40)
    names = ["logits", "all_logits", *manifest["prefill"]["outputs"][1:]]
    _export(PrefillV1().eval(), (ids, mask), old / "prefill.onnx", ["input_ids", "attention_mask"], names,
            ({0: "B", 1: "T"}, {0: "B", 1: "T"}), 18)
    manifest.update(format_version=1, prefill={**manifest["prefill"], "outputs": names},
                    graphs={"step": "step.onnx", "prefill": "prefill.onnx"})
    (old / "manifest.json").write_text(json.dumps(manifest))
    v1, v2 = OnnxLM.load(old, verify=False), OnnxLM.load(folder)
    ids, mask = padded_batch(seed=5)
    for (a, b) in zip(v1.run_prefill(ids.numpy(), mask.numpy())[1], v2.run_prefill(ids.numpy(), mask.numpy())[1],
                      strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=FLOAT32_ATOL)
    tokens = TOK.encode("ROMEO: What say you?")
    assert v1.score(tokens, 8)[0] == pytest.approx(v2.score(tokens, 8)[0], rel=1e-5)

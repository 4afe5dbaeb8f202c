"""The family contract, once for every registered recurrent family and for a toy family written here.

The toy family is the proof that the contract holds: a causal running mean with its own state, in well under 100
lines, one registration line, and nothing in ``models/cache.py``, ``inference/export.py`` or ``inference/serve``
knows it; yet it decodes, batches, beam-searches, saves and loads, exports to ONNX and serves like the others.
With ``running_max=True`` it also takes the toy sublayer of ``tests/toy_sublayer.py``: a new sublayer is one file
and one config field.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from toy_sublayer import RunningMax
from transformers import AutoModelForCausalLM

from attnfree.data import ByteTokenizer
from attnfree.inference.decoding import chunked_prefill, stream_generate
from attnfree.inference.sampling import Sampling
from attnfree.layers.ffn import FeedForward
from attnfree.layers.sublayer import BlockContext, Sublayer
from attnfree.models.base import RecurrentConfig, RecurrentForCausalLM, RecurrentModel, SublayerBlock
from attnfree.models.compat import output_cache
from attnfree.models.registry import MODELS, ModelSize, build_model, register_model
from attnfree.testing import assert_close, perturb

# ----------------------------------------------------------------------------------------------
# The toy family: one folder's worth of code
# ----------------------------------------------------------------------------------------------


@strict
class ToyConfig(RecurrentConfig):
    """A causal running-mean mixer: the shared fields, and one to plug in the toy sublayer."""

    model_type = "attnfree_toy"

    running_max: bool = False  # add tests/toy_sublayer.py's RunningMax after the mean: one field, one file


class RunningMean(Sublayer):
    """y_i = W_o mean_{j <= i, j real} W_v LN(x_j). State: the running sum [B, C] and count [B]."""

    def __init__(self, C: int):
        super().__init__()
        self.norm, self.value, self.out = nn.LayerNorm(C), nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)

    def forward(self, x: Tensor, ctx: BlockContext, state: dict | None = None) -> Tensor:
        v = self.value(self.norm(x))  # [B, T, C]
        real = torch.ones_like(v[..., :1]) if ctx.mask is None else ctx.mask[..., None].to(v.dtype)  # [B, T, 1]
        start = state if state else self.init_state(x.shape[0], x.device, x.dtype)
        sums = start["sum"][:, None] + torch.cumsum(v * real, 1)  # [B, T, C]
        counts = start["count"][:, None, None] + torch.cumsum(real, 1)  # [B, T, 1]
        if state is not None:
            state["sum"], state["count"] = sums[:, -1], counts[:, -1, 0]
        return self.out(sums / counts.clamp_min(1))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> dict:
        C = self.value.in_features
        return {"sum": torch.zeros(batch, C, device=device, dtype=dtype),
                "count": torch.zeros(batch, device=device, dtype=dtype)}


class ToyBlock(SublayerBlock):
    def __init__(self, config: ToyConfig):
        C = config.hidden_size
        extra = [("max", RunningMax(C))] if config.running_max else []
        super().__init__([("mean", RunningMean(C)), *extra, ("ffn", FeedForward(C, 2, "gelu", 0.0, 1e-5))])


class ToyModel(RecurrentModel):
    config_class = ToyConfig
    block_class = ToyBlock


class ToyForCausalLM(RecurrentForCausalLM):
    config_class = ToyConfig
    backbone_class = ToyModel


register_model("toy", ToyConfig, ToyForCausalLM)

# ----------------------------------------------------------------------------------------------
# The contract, over every family
# ----------------------------------------------------------------------------------------------

TOK = ByteTokenizer()
SIZE = ModelSize(hidden_size=24, n_heads=3, num_layers=2, n_positions=64)
OVERRIDES = {"leviathan": {"dense_lags": 4, "segment": 3}, "leviathan-moe": {"dense_lags": 4, "n_experts": 3},
             "leviathan-ensemble": {"dense_lags": 4, "n_modules": 1, "members_per_module": 2,
                                    "interaction_heads": 3}}
# every attnfree recurrent family (the toy included), and each family with every option toward RWKV switched on
CASES = {name: (name, OVERRIDES.get(name)) for name, entry in MODELS.items()
         if isinstance(entry.build, type) and issubclass(entry.build, RecurrentForCausalLM)}
CASES["fastformer+options"] = ("fastformer", {"bonus": True, "token_shift": True, "ffn_type": "channel_mix",
                                              "decay": "fixed", "preset": "seed"})
CASES["fastformer+windows"] = ("fastformer", {"pool_windows": "3/0", "token_shift": True})  # a ring, then sums
CASES["leap+normed"] = ("leap", {"focus": "normed_dot", "alignment": False, "pool_windows": 2})
CASES["fastformer-local+short-window"] = ("fastformer-local", {"local_window": 3})  # the window rolls over
CASES["toy+running_max"] = ("toy", {"running_max": True})  # a new sublayer: one file, one config field
CASES["leviathan+options"] = ("leviathan", {**OVERRIDES["leviathan"],
                                            "block_flavour": "channel_mix4"})
FAMILIES = sorted(CASES)


@pytest.fixture(params=FAMILIES)
def name(request) -> str:
    return request.param


def tiny(name: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    family, overrides = CASES[name]
    return perturb(build_model(family, SIZE, TOK, overrides), std=0.2).to(dtype).eval()


def padded_batch(T: int = 13) -> tuple[Tensor, Tensor]:
    """[3, T] byte ids: row 1 left-padded by 4, row 2 holds three real tokens."""
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :4], mask[2, : T - 3] = 0, 0
    return ids.masked_fill(mask == 0, TOK.pad_token_id), mask


def test_the_toy_family_is_one_registration_away() -> None:
    assert {"fastformer", "fastformer-conv", "leviathan", "leviathan-ensemble", "leviathan-moe", "toy"} <= set(CASES)
    assert MODELS["toy"].config_class is ToyConfig and isinstance(build_model("toy", SIZE, TOK), ToyForCausalLM)


@pytest.mark.parametrize("chunk", [1, 5])
def test_full_forward_equals_chunked_prefill_then_token_by_token_decoding(name: str, chunk: int) -> None:
    model = tiny(name)
    ids, mask = padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # [B, T, V]
        out = chunked_prefill(model, ids[:, :7], mask[:, :7], chunk_size=chunk)
        logits, cache = [out.logits[:, -1]], output_cache(out)
        for t in range(7, ids.shape[1]):
            step = model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(step.logits[:, -1])
    real = mask[:, 6:].bool()
    assert_close(f"{name} decode", torch.stack(logits, 1)[real], full[:, 6:][real])


@pytest.mark.parametrize("chunk", [1, 5])
def test_sequence_chunk_gives_the_same_loss_and_gradients(name: str, chunk: int) -> None:
    """Training in pieces (``config.sequence_chunk``: each block carrying its state across pieces) is the same
    computation as the whole sequence: loss, every parameter's gradient and the hidden states, on a left-padded
    batch with pieces of 1 and 5 positions over T = 13."""
    model = tiny(name)
    ids, mask = padded_batch()

    def run(chunk: int) -> tuple[Tensor, list[Tensor], tuple[Tensor, ...]]:
        model.config.sequence_chunk = chunk
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
        out.loss.backward()
        return out.loss.detach(), [p.grad for p in model.parameters() if p.grad is not None], out.hidden_states

    whole_loss, whole_grads, whole_hidden = run(0)
    loss, grads, hidden = run(chunk)
    assert_close(f"{name} loss", loss, whole_loss)
    assert len(grads) == len(whole_grads) > 0
    for i, (g, w) in enumerate(zip(grads, whole_grads, strict=True)):
        assert_close(f"{name} grad {i}", g, w)
    real = mask.bool()[..., None]  # [B, T, 1]: broadcasts over an ensemble's leading member axis too
    for g, w in zip(hidden, whole_hidden, strict=True):
        assert_close(f"{name} hidden", g[real.expand_as(g)], w[real.expand_as(w)])


def test_a_padded_batch_equals_each_row_alone(name: str) -> None:
    model = tiny(name)
    ids, mask = padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for b in range(3):
            real = mask[b].bool()
            assert_close(f"{name} row {b}", full[b, real], model(ids[b:b + 1, real]).logits[0])


def test_save_load_through_the_auto_classes(name: str, tmp_path) -> None:
    model = tiny(name, torch.float32)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    assert type(loaded) is type(model)
    with torch.no_grad():  # (the same weights; a loaded tensor's layout may pick another float32 kernel)
        assert_close(f"{name} loaded", loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_generate_feeds_the_prompt_once_then_one_token_per_step(name: str) -> None:
    model = tiny(name)
    calls: list[int] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    model.generate(torch.randint(0, 256, (2, 7)), max_new_tokens=5, do_sample=False, pad_token_id=TOK.pad_token_id,
                   eos_token_id=None)
    assert calls == [7, 1, 1, 1, 1] or calls == [7, 1, 1, 1, 1] * (len(calls) // 5)  # (ensemble: once per member)


def test_beam_search_reorders_the_state(name: str) -> None:
    model = tiny(name)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=TOK.pad_token_id, eos_token_id=None)
    beams = model.generate(ids, **kw)
    for i in range(2):
        assert torch.equal(beams[i], model.generate(ids[i:i + 1], **kw)[0])


def test_the_onnx_graphs_match_pytorch(name: str, tmp_path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from attnfree.inference.export import export_onnx

    model = tiny(name, torch.float32)
    export_onnx(model, TOK, tmp_path)
    prefill, step, score = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
                            for f in ("prefill.onnx", "step.onnx", "score.onnx"))
    ids, mask = padded_batch()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        (all_logits,) = score.run(None, feed)
        assert abs(all_logits - out.logits.numpy())[mask.bool().numpy()].max() < 1e-4
        last, *state = prefill.run(None, feed)
        assert abs(last - out.logits[:, -1].numpy()).max() < 1e-4
        token = out.logits[:, -1].argmax(-1)
        names = [i.name for i in step.get_inputs()][1:]
        for t in range(5):
            ref = model(token[:, None], cache=cache, use_cache=True).logits[:, -1]
            got, *state = step.run(None, {"input_ids": token[:, None].numpy(), **dict(zip(names, state))})
            assert abs(got - ref.numpy()).max() < 1e-4, f"{name} step {t}"
            token = ref.argmax(-1)


def test_one_served_completion(name: str) -> None:
    pytest.importorskip("fastapi")
    from attnfree.inference.serve.app import create_app, serve_in_thread

    model = tiny(name, torch.float32)
    prompt = "ROMEO:"
    expected = torch.stack(list(stream_generate(model, torch.tensor([TOK.encode(prompt)]), 6,
                                                Sampling(greedy=True))), 1)[0].tolist()
    with serve_in_thread(create_app(model, TOK, name)) as base:
        body = {"prompt": prompt, "max_tokens": 6, "greedy": True, "ignore_eos": True, "stream": False}
        answer = httpx.post(f"{base}/generate", json=body, timeout=60).json()
    assert answer["tokens"] == expected


def test_decoding_steps_read_a_transposed_head_copy_that_follows_the_weight(name: str) -> None:
    """A one-token step without autograd multiplies by a [C, V] copy of the head's weight (``decode_head``): the
    same logits as the head itself, refreshed when the weight changes, never part of the state dict."""
    model = tiny(name, torch.float32)
    ids = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(ids).logits
    assert "_decode_weight" in model.lm_head.__dict__
    assert torch.allclose(fast, model(ids).logits, atol=1e-5)  # with autograd on: the plain head
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place (the version counter moves), as an optimizer step or a load does
        again = model(ids).logits
    assert torch.allclose(again, model(ids).logits, atol=1e-5) and not torch.allclose(again, fast, atol=1e-3)
    assert not any("decode" in key for key in model.state_dict())


def test_the_decoding_head_copy_stays_out_of_exported_graphs(tmp_path, monkeypatch) -> None:
    """Tracing for ONNX runs the plain head: the copy would enter the graph as a second constant weight. (Export
    also runs the model eagerly, for an example state; the copy may serve those calls. How the head itself is
    exported: docs/deployment.md, "The graphs".)"""
    pytest.importorskip("onnxscript")
    import attnfree.models.base as base
    from attnfree.inference.export import export_onnx

    plain = base.decode_head
    traced: list[bool] = []

    def watch(head: nn.Linear, h: Tensor) -> Tensor:
        traced.append(torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())
        return plain(head, h)

    monkeypatch.setattr(base, "decode_head", watch)
    export_onnx(tiny("fastformer", torch.float32), TOK, tmp_path)
    assert traced and not any(traced), "decode_head ran while tracing (or never: the watch saw nothing)"

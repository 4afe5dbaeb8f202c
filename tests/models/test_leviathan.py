"""Leviathan LMs (base, ensemble, MoE): recurrent state, padding, routing, HF shell (save/load, Auto, generate)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig

import attnfree  # noqa: F401  (registers the Auto classes)
from attnfree.models.base import RecurrentBlock
from attnfree.models.cache import RecurrentCache
from attnfree.models.compat import enable_activation_checkpointing, output_cache
from attnfree.models.leviathan import (
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanEnsembleForCausalLM,
    LeviathanEnsembleModel,
    LeviathanForCausalLM,
    LeviathanModel,
    LeviathanMoEConfig,
    LeviathanMoEForCausalLM,
    LeviathanMoEModel,
)
from attnfree.models.registry import ModelSize, build_model
from attnfree.ops.correlation import CorrelationState
from attnfree.testing import assert_close, perturb

# n_positions=32 and dense_lags=4: lags 0..3, 4, 8, 16, so T=24 wraps the decoding ring buffers
TINY = dict(hidden_size=24, n_heads=3, vocab_size=40, num_hidden_layers=2, n_positions=32, dense_lags=4, segment=2,
            hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
KINDS: dict[str, tuple[type[LeviathanForCausalLM], type[LeviathanConfig], dict[str, Any]]] = {
    "base": (LeviathanForCausalLM, LeviathanConfig, {}),
    "ensemble": (LeviathanEnsembleForCausalLM, LeviathanEnsembleConfig,
                 dict(n_modules=2, members_per_module=2, interaction_heads=2, num_hidden_layers=1)),
    "moe": (LeviathanMoEForCausalLM, LeviathanMoEConfig, dict(n_experts=4, router_top_k=2)),
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Many small ops: a second thread only adds synchronisation on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(kind="base", **kw) -> LeviathanConfig:
    _, config_class, extra = KINDS[kind]
    return config_class(**{**TINY, **extra, **kw})


def tiny(kind="base", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model_class = KINDS[kind][0]
    return perturb(model_class(config(kind, **kw))).to(dtype).eval()


def batch(B=3, T=24, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, : T - 2] = 0  # only two real tokens
    return ids.masked_fill(mask == 0, 0), mask


def decode(model, ids, mask, split):
    """Prefill ids[..., :split], then one token at a time: logits [..., T, V]."""
    out = model(ids[..., :split], attention_mask=mask[..., :split], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(split, ids.shape[-1]):
        step = model(ids[..., t : t + 1], attention_mask=mask[..., t : t + 1], cache=cache, use_cache=True)
        logits.append(step.logits)
    return torch.cat(logits, -2)


ALL = pytest.mark.parametrize("kind", list(KINDS))


# ----------------------------------------------------------------------------------------------
# The recurrent state and padding
# ----------------------------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("split", [1, 9])
def test_full_forward_equals_prefill_then_decode(kind, split):
    model = tiny(kind)
    ids, mask = batch()
    full = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert_close("decode", decode(model, ids, mask, split)[real], full[real])


def test_module_streams_decode_and_list_inputs():
    """Each module reads its own stream [S, B, T]; decoding matches the full forward; a list is the same."""
    model = tiny("ensemble", module_streams=True)
    streams = [batch(seed=s) for s in range(2)]
    ids, mask = torch.stack([i for i, _ in streams]), torch.stack([m for _, m in streams])
    full = model(ids, attention_mask=mask).logits  # [S, B, T, V]
    assert full.shape == (2, 3, 24, 40)
    real = mask.bool()
    assert_close("streams decode", decode(model, ids, mask, 7)[real], full[real])
    as_list = model(list(ids), attention_mask=list(mask)).logits
    assert torch.equal(as_list, full)
    other = ids.clone()
    other[1, :, 3:] = 5  # stream 1 changes: stream 0's read-out sees it only through the member mixing
    assert not torch.allclose(model(other, attention_mask=mask).logits[0][real[0]], full[0][real[0]])
    loss = model(ids, attention_mask=mask, labels=ids).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="n_modules=2, B, T"):
        model(ids[0])


@ALL
def test_padded_batch_equals_each_row_alone(kind):
    """No batch mixing: each row of a left-padded batch gives what it gives alone."""
    model = tiny(kind)
    ids, mask = batch()
    full = model(ids, attention_mask=mask).logits
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        assert_close(f"row {b}", full[b, real], model(ids[b : b + 1, real]).logits[0])


@ALL
def test_causality(kind):
    model = tiny(kind)
    ids = torch.randint(3, 40, (2, 30))
    a = model(ids).logits
    ids2 = ids.clone()
    ids2[:, 17] = (ids2[:, 17] + 1) % 40
    b = model(ids2).logits
    assert torch.equal(a[:, :17], b[:, :17]) and not torch.allclose(a[:, 17:], b[:, 17:])


def test_moe_training_is_causal_under_capacity():
    """Capacity queues are time-major: a later token never pushes out an earlier one."""
    model = tiny("moe", noise=0.0, capacity_factor=0.5).train()
    ids = torch.randint(3, 40, (3, 30))
    a = model(ids)
    ids2 = ids.clone()
    ids2[:, 17:] = (ids2[:, 17:] + 1) % 40
    b = model(ids2)
    assert int(a.dropped_tokens.sum()) > 0
    assert torch.equal(a.logits[:, :17], b.logits[:, :17])


@ALL
def test_generate_left_padded_batch_equals_alone(kind):
    model = tiny(kind)
    ids, mask = batch(T=10)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for b in range(ids.shape[0]):
        alone = model.generate(ids[b : b + 1, mask[b].bool()], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[b, -6:], alone[0, -6:])


def test_generate_uses_constant_size_state_and_beam_search_reorders_it():
    model = tiny(position_embedding_type="none")  # decode past n_positions
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    model.generate(torch.randint(3, 40, (2, 7)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert calls == [7, 1, 1, 1]
    out = model(torch.randint(3, 40, (2, 5)), use_cache=True)
    cache, size = output_cache(out), output_cache(out).nbytes()
    assert isinstance(cache.layers[0]["correlation"]["ring"], CorrelationState)
    for _ in range(30):
        model(torch.randint(3, 40, (2, 1)), cache=cache, use_cache=True)
    assert cache.nbytes() == size and cache.get_seq_length() == 35
    ids = torch.randint(3, 40, (2, 6))
    beams = model.generate(ids, num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i in range(2):  # beam search reorders the CorrelationStates (dataclasses) inside the cache
        alone = model.generate(ids[i : i + 1], num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(beams[i], alone[0])


def test_cache_maps_over_dataclass_states():
    state = CorrelationState(torch.arange(3.0)[:, None], torch.zeros(3, 2), torch.zeros(3, 1),
                             torch.ones(3, 2, dtype=torch.bool), seen=torch.tensor([5, 6, 7]))
    cache = RecurrentCache(1, 3)
    cache.layers[0]["correlation"] = state
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    moved = cache.layers[0]["correlation"]
    assert isinstance(moved, CorrelationState) and moved.seen.tolist() == [7, 5, 5]
    assert moved.q[:, 0].tolist() == [2.0, 0.0, 0.0]
    cache.batch_repeat_interleave(2)
    assert cache.layers[0]["correlation"].k.shape == (6, 2)


# ----------------------------------------------------------------------------------------------
# Gradients, the ensemble and the experts
# ----------------------------------------------------------------------------------------------


@ALL
def test_every_parameter_gets_gradient(kind):
    """Every projection, every ensemble member and every expert is trained."""
    model = tiny(kind, torch.float32).train()
    ids = torch.randint(3, 40, (4, 24))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    if kind == "ensemble":
        assert len(model.model.members) == 4


def test_moe_routing_is_deterministic_in_eval_and_noisy_in_training():
    model = tiny("moe", torch.float32)
    ids = torch.randint(3, 40, (2, 16))
    a, b = model(ids), model(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    model.train()
    torch.manual_seed(1)
    c = model(ids)
    torch.manual_seed(2)
    d = model(ids)
    assert not torch.equal(c.logits, d.logits)


def test_moe_aux_loss_reaches_the_gate_and_the_training_loss():
    model = tiny("moe", torch.float32, noise=0.0, aux_loss_coef=0.5, capacity_factor=4.0).train()  # no drops
    ids = torch.randint(3, 40, (2, 16))
    out = model(ids, labels=ids)
    out.aux_loss.backward(retain_graph=True)
    gate = model.model.layers[0].ffn.router.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    model.eval()
    plain = model(ids, labels=ids)  # evaluation: no aux term
    assert_close("loss = lm + coef * aux", out.loss, plain.loss + 0.5 * out.aux_loss, rtol=1e-5)


def test_moe_capacity_overflow_is_counted_and_padding_not_routed():
    model = tiny("moe", torch.float32, capacity_factor=0.5).train()
    ids, mask = batch(B=4, T=20)
    out = model(ids, attention_mask=mask)
    n, k, E = int(mask.sum()), 2, 4
    capacity = math.ceil(0.5 * n * k / E)
    per_layer = out.tokens_per_expert.sum(-1) + out.dropped_tokens  # [layers]
    assert per_layer.tolist() == [n * k] * 2
    assert int(out.tokens_per_expert.max()) <= capacity and int(out.dropped_tokens.min()) > 0
    model.eval()
    out = model(ids, attention_mask=mask)
    assert out.dropped_tokens.tolist() == [0, 0] and out.tokens_per_expert.sum(-1).tolist() == [n * k] * 2


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters in total and active per token (tied weights once; an MoE token uses top_k of its experts)."""
    from attnfree.layers.moe import SparseMoE

    total = sum(p.numel() for p in model.parameters())
    idle = sum((m.n_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in model.modules() if isinstance(m, SparseMoE))
    return {"total": total, "active": total - idle}


def test_parameter_counts():
    counts = {kind: parameter_counts(tiny(kind)) for kind in KINDS}
    print("tiny parameter counts:", counts)
    assert counts["base"]["total"] == counts["base"]["active"]
    moe = counts["moe"]
    expert = 2 * 24 * 4 * 24  # up + down of one gelu4 expert
    assert moe["total"] - moe["active"] == 2 * (4 - 2) * expert  # two layers, two idle experts each


def test_the_prototype_size_has_its_true_parameter_count():
    """The prototype's size (20 heads, 20 blocks, width 800, the T5 vocabulary) is ~154M in its blocks, not the 77M
    it claimed: 180,164,800 in all (12 C^2 + 4 C per block, token and position embeddings, the final LayerNorm)."""
    with torch.device("meta"):
        model = LeviathanForCausalLM(LeviathanConfig(vocab_size=32100, hidden_size=800, n_heads=20,
                                                     num_hidden_layers=20, n_positions=1024))
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    total = parameter_counts(model)["total"]
    assert blocks == 20 * (12 * 800 * 800 + 4 * 800) == 153_664_000
    assert total == blocks + (32100 + 1024) * 800 + 2 * 800 == 180_164_800


# ----------------------------------------------------------------------------------------------
# HF shell: save/load, Auto classes, builders, inputs, checkpointing
# ----------------------------------------------------------------------------------------------


AUTO = {"base": (LeviathanModel, LeviathanConfig), "ensemble": (LeviathanEnsembleModel, LeviathanEnsembleConfig),
        "moe": (LeviathanMoEModel, LeviathanMoEConfig)}


@ALL
def test_save_load_round_trip_and_auto_classes(kind, tmp_path):
    model = tiny(kind, torch.float32)
    model.save_pretrained(tmp_path)
    ids, mask = batch()
    for cls in (type(model), AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(model)
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # still tied
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    backbone, config_class = AUTO[kind]
    assert type(AutoConfig.from_pretrained(tmp_path)) is config_class
    assert type(AutoModel.from_config(config(kind))) is backbone


def test_the_registry_builds_every_leviathan_model():
    size = ModelSize(hidden_size=16, n_heads=2, num_layers=1, n_positions=32, dropout=0.0)
    ids = SimpleNamespace(vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert isinstance(build_model("leviathan", size, ids, {"segment": 3}), LeviathanForCausalLM)
    ens = build_model("leviathan-ensemble", size, ids, {"n_modules": 1})
    assert isinstance(ens, LeviathanEnsembleForCausalLM) and ens.config.n_members == 2
    moe = build_model("leviathan-moe", size, ids)
    assert isinstance(moe, LeviathanMoEForCausalLM) and moe.config.vocab_size == 50
    with pytest.raises(ValueError, match="n_experts"):
        build_model("leviathan", size, ids, {"n_experts": 4})
    none = build_model("leviathan:position_embedding_type=none", size, ids)  # "none" names the choice
    assert none.config.position_embedding_type == "none"


def test_gradient_checkpointing_gives_same_gradients():
    """Noisy routing included: the recomputed forward replays the same noise."""
    model = tiny("moe").train()
    ids = torch.randint(3, 40, (2, 16))
    torch.manual_seed(3)
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    enable_activation_checkpointing(model)
    torch.manual_seed(3)
    model(ids, labels=ids).loss.backward()
    for r, p in zip(ref, model.parameters()):
        assert_close("checkpointed grad", p.grad, r)


def test_loss_ignores_padding_and_honours_num_items_in_batch():
    model = tiny(dtype=torch.float32)
    ids, mask = batch()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    n_items = int(mask[:, 1:].sum())
    summed = model(ids, attention_mask=mask, labels=ids, num_items_in_batch=2 * n_items).loss
    assert_close("sum / num_items", summed * 2, loss)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[3, 40]]), "token id 40"),
    (torch.tensor([[3, -1]]), "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(1, 33, dtype=torch.long) + 3, "n_positions=32"),
])
@ALL
def test_bad_input_ids(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(kind)(bad)


# ----------------------------------------------------------------------------------------------
# Configuration: validation and every field used
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,field,value", [
    ("base", "hidden_size", 25), ("base", "n_heads", 0), ("base", "num_hidden_layers", 0), ("base", "vocab_size", 0),
    ("base", "n_positions", 0), ("base", "position_embedding_type", "rotary"), ("base", "dense_lags", 0),
    ("base", "segment", 0), ("base", "block_flavour", "swiglu"), ("base", "hidden_dropout_prob", 1.0),
    ("base", "initializer_range", 0.0), ("base", "layer_norm_eps", -1.0), ("base", "label_smoothing", 1.5),
    ("base", "pad_token_id", 40), ("base", "eos_token_id", -1),
    ("ensemble", "n_modules", 0), ("ensemble", "members_per_module", 0), ("ensemble", "interaction_heads", 5),
    ("moe", "n_experts", 0), ("moe", "router_top_k", 5), ("moe", "capacity_factor", 0.0), ("moe", "noise", -1.0),
    ("moe", "aux_loss_coef", -0.1),
])
def test_invalid_config_names_the_field(kind, field, value):
    with pytest.raises(ValueError, match=field):
        config(kind, **{field: value})


NON_DEFAULT = {  # every field, a non-default value
    "base": {
        "vocab_size": 41, "hidden_size": 30, "n_heads": 2, "num_hidden_layers": 3, "n_positions": 16,
        "position_embedding_type": "none", "dense_lags": 2, "segment": 3, "block_flavour": "leaky6",
        "hidden_dropout_prob": 0.3, "initializer_range": 0.5, "layer_norm_eps": 1e-1, "label_smoothing": 0.1,
        "pad_token_id": 3, "bos_token_id": 4, "eos_token_id": 5, "use_cache": False, "tie_word_embeddings": False,
        "sequence_chunk": 4,
    },
    "ensemble": {"n_modules": 1, "members_per_module": 3, "interaction_heads": 3, "module_streams": True},
    "moe": {"n_experts": 3, "router_top_k": 1, "capacity_factor": 0.3, "noise": 0.0, "aux_loss_coef": 1.0},
}
NON_DEFAULT["ensemble"].update(NON_DEFAULT["base"])
NON_DEFAULT["moe"].update(NON_DEFAULT["base"])


def count_block_calls(model):
    """A list that grows by one at every forward call of the model's first block (sequence_chunk's effect)."""
    calls = []
    first = next(m for m in model.modules() if isinstance(m, RecurrentBlock))
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def signature(kind, **kw):
    """What a config change can affect: parameter shapes, initial weights, train/eval outputs, cache, tying."""
    torch.manual_seed(0)
    model_class = KINDS[kind][0]
    cfg = config(kind, **kw)
    model = model_class(cfg)
    init_std = float(model.lm_head.weight.detach().std())
    perturb(model)
    ids = torch.tensor([[4, 5, 9, 3, 7, 8, 6, 12, 11, 10, 4, 4, 9, 13, 6, 7]])
    if cfg.module_streams if isinstance(cfg, LeviathanEnsembleConfig) else False:
        ids = ids.expand(cfg.n_modules, 1, -1).contiguous()
    torch.manual_seed(1)
    train_loss = model.train()(ids, labels=ids).loss.item()
    model.eval()
    block_calls = count_block_calls(model)
    out = model(ids, labels=ids)
    gen = [] if ids.dim() == 3 else model.generate(ids[:, :2], max_new_tokens=3, do_sample=False,
                                                   min_new_tokens=0).tolist()
    return (tuple((n, tuple(p.shape)) for n, p in model.named_parameters()), round(init_std, 3), train_loss,
            out.logits.sum().item(), output_cache(out) is None, gen,
            model.lm_head.weight is model.get_input_embeddings().weight, model.get_input_embeddings().padding_idx,
            model.generation_config.bos_token_id, model.generation_config.eos_token_id, len(block_calls))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_config_field_is_declared_here(kind):
    fields = {f.name for f in dataclasses.fields(KINDS[kind][1])} - {
        f.name for f in dataclasses.fields(PreTrainedConfig)}  # ours: the family's and the shared recurrent ones
    assert fields == set(NON_DEFAULT[kind]), fields ^ set(NON_DEFAULT[kind])


FIELD_CASES = [("base", f) for f in NON_DEFAULT["base"]] + [
    (kind, f) for kind in ("ensemble", "moe") for f in NON_DEFAULT[kind] if f not in NON_DEFAULT["base"]]


@pytest.mark.parametrize("kind,field", FIELD_CASES, ids=[f"{k}-{f}" for k, f in FIELD_CASES])
def test_every_config_field_has_an_effect(kind, field):
    assert signature(kind) != signature(kind, **{field: NON_DEFAULT[kind][field]})

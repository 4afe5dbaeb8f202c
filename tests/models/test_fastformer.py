"""The causal Fastformer LM: recurrent state, padding, HF shell (save/load, Auto, Trainer, generate)."""

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig

import attnfree  # noqa: F401  (registers the Auto classes)
from attnfree import FastformerConfig, FastformerForCausalLM, FastformerLMConfig, FastformerModel
from attnfree.models.base import RecurrentBlock
from attnfree.models.compat import enable_activation_checkpointing, output_cache
from attnfree.testing import assert_close, perturb

TINY = dict(hidden_size=24, n_heads=3, vocab_size=40, num_hidden_layers=2, n_positions=64,
            hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return perturb(FastformerForCausalLM(FastformerConfig(**{**TINY, **kw})).to(dtype).eval())


def batch(B=3, T=20, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, : T - 2] = 0  # only two real tokens
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


CONV = [pytest.param({}, id="plain"), pytest.param(dict(convolve=True, groups=3), id="conv"),
        pytest.param(dict(convolve=True, kernel_size=1), id="conv-k1"),
        pytest.param(dict(position_embedding_type="none", preset="seed"), id="nopos-seed"),
        pytest.param(dict(decay="none", preset="seed", convolve=True), id="seed-conv")]


@pytest.mark.parametrize("kw", CONV)
@pytest.mark.parametrize("split", [1, 9])
def test_full_forward_equals_prefill_then_decode(kw, split):
    model = tiny(**kw)
    ids, mask = batch()
    full = model(ids, attention_mask=mask, use_cache=False).logits
    out = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(split, ids.shape[1]):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(step.logits)
    real = mask.bool()
    assert_close("decode", torch.cat(logits, 1)[real], full[real])


@pytest.mark.parametrize("kw", CONV)
def test_padded_batch_equals_each_alone(kw):
    model = tiny(**kw)
    ids, mask = batch()
    full = model(ids, attention_mask=mask).logits
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        assert_close(f"row {b}", full[b, real], model(ids[b : b + 1, real]).logits[0])


@pytest.mark.parametrize("kw", CONV[:2])
def test_generate_left_padded_batch_equals_alone(kw):
    model = tiny(**kw)
    ids, mask = batch()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)  # no early stop: same lengths
    out = model.generate(ids, attention_mask=mask, **kw)
    for b in range(ids.shape[0]):
        alone = model.generate(ids[b : b + 1, mask[b].bool()], **kw)
        assert torch.equal(out[b, -8:], alone[0, -8:])


def test_generate_uses_the_recurrent_cache():
    """generate() = prefill + one token per step, and the state does not grow with the context."""
    model = tiny()
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    model.generate(torch.randint(3, 40, (2, 7)), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert calls == [7, 1, 1, 1, 1]
    out = model(torch.randint(3, 40, (2, 5)), use_cache=True)
    cache, size = output_cache(out), output_cache(out).nbytes()
    for _ in range(30):
        model(torch.randint(3, 40, (2, 1)), cache=cache, use_cache=True)
    assert cache.nbytes() == size and cache.get_seq_length() == 35


def test_sampling_top_k_top_p_and_beam_search():
    model = tiny()
    ids = torch.randint(3, 40, (2, 6))
    torch.manual_seed(1)
    a = model.generate(ids, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, max_new_tokens=10, pad_token_id=0)
    torch.manual_seed(1)
    b = model.generate(ids, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(a, b) and a.shape == (2, 16) and int(a.max()) < 40
    beams = model.generate(ids, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i in range(2):  # beam search on a batch == beam search on each row alone
        alone = model.generate(ids[i : i + 1], num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(beams[i], alone[0])
    sampled = model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=4, pad_token_id=0)
    assert sampled.shape == (6, 10)


def test_learned_positions_limit_and_unbounded_streaming():
    model = tiny(n_positions=16, position_embedding_type="learned")
    with pytest.raises(ValueError, match="n_positions=16"):
        model.generate(torch.randint(3, 40, (1, 10)), max_new_tokens=10, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="n_positions=16"):
        model(torch.randint(3, 40, (1, 17)))
    free = tiny(n_positions=16, position_embedding_type="none")
    out = free.generate(torch.randint(3, 40, (1, 10)), max_new_tokens=40, do_sample=False, pad_token_id=0,
                        eos_token_id=None)
    assert out.shape == (1, 50)


def test_causality():
    model = tiny(convolve=True)
    ids = torch.randint(3, 40, (2, 30))
    a = model(ids).logits
    ids2 = ids.clone()
    ids2[:, 17] = (ids2[:, 17] + 1) % 40
    b = model(ids2).logits
    assert torch.equal(a[:, :17], b[:, :17]) and not torch.allclose(a[:, 17:], b[:, 17:])


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = tiny(torch.float32, convolve=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for cls in (FastformerForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, FastformerForCausalLM)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
        ids, mask = batch()
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FastformerConfig)
    assert isinstance(AutoModel.from_config(FastformerConfig(**TINY)), FastformerModel)
    assert FastformerLMConfig is FastformerConfig


def test_seed_size_parameter_count():
    model = FastformerForCausalLM(FastformerConfig())
    n = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert 11_000_000 <= n <= 12_000_000, n
    assert model.get_input_embeddings() is model.model.embed_tokens


def test_loss_ignores_padding_and_honours_num_items_in_batch():
    model = tiny(torch.float32)
    ids, mask = batch()
    labels = ids.clone()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(labels, ids)  # caller's tensor untouched
    n_items = int(mask[:, 1:].sum())
    summed = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * n_items).loss
    assert_close("sum / num_items", summed * 2, loss)


def test_label_smoothing_only_in_training():
    model = tiny(torch.float32, label_smoothing=0.2)
    plain = tiny(torch.float32)
    ids = torch.randint(3, 40, (2, 12))
    assert torch.equal(model(ids, labels=ids).loss, plain(ids, labels=ids).loss)  # eval: plain CE
    model.train()
    plain.train()
    assert not torch.allclose(model(ids, labels=ids).loss, plain(ids, labels=ids).loss)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny(torch.float64, convolve=True).train()
    ids = torch.randint(3, 40, (2, 16))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    enable_activation_checkpointing(model)
    model(ids, labels=ids).loss.backward()
    for r, p in zip(ref, model.parameters()):
        assert_close("checkpointed grad", p.grad, r)


def test_bfloat16_forward_is_finite():
    model = tiny(torch.bfloat16, convolve=True)
    ids, mask = batch()
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[3, 40]]), "token id 40"),
    (torch.tensor([[3, -1]]), "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
def test_bad_input_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny()(bad)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 25), ("n_heads", 0), ("groups", 5), ("kernel_size", 0), ("num_hidden_layers", 0),
    ("hidden_dropout_prob", 1.0), ("hidden_dropout_prob", -0.1), ("label_smoothing", 1.5),
    ("position_embedding_type", "rotary"), ("preset", "none"), ("decay", "alibi"), ("pad_token_id", 40),
    ("initializer_range", 0.0), ("vocab_size", 0), ("ffn_multiplier", 0), ("pool_chunk_size", 0),
    ("pool_windows", "lea"), ("pool_windows", [0]), ("pool_windows", -1), ("pool_windows", "4/x"),
    ("focus", "dots"), ("focus", "dot"), ("alignment", True),
    ("local_window", -1),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FastformerConfig(**{**TINY, field: value})


NON_DEFAULT = {  # every field, a non-default value
    "hidden_size": 30, "vocab_size": 41, "n_positions": 32, "n_heads": 2, "convolve": True, "groups": 3,
    "kernel_size": 2, "num_hidden_layers": 3, "label_smoothing": 0.1, "initializer_range": 0.5,
    "hidden_dropout_prob": 0.3, "position_embedding_type": "learned", "preset": "seed", "decay": "fixed",
    "ffn_multiplier": 2,
    "layer_norm_eps": 1e-2, "pool_chunk_size": 4, "pad_token_id": 3, "bos_token_id": 4, "eos_token_id": 5,
    "use_cache": False, "tie_word_embeddings": False, "bonus": True,
    "token_shift": True, "ffn_type": "channel_mix", "sequence_chunk": 4, "pool_windows": 3, "focus": "dot",
    "alignment": True, "local_window": 3, "local_rotary": False,
}


def count_block_calls(model):
    """A list that grows by one at every forward call of the model's first block (sequence_chunk's effect)."""
    calls = []
    first = next(m for m in model.modules() if isinstance(m, RecurrentBlock))
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def signature(**kw):
    """What a config change can affect: parameter shapes, initial weights, train/eval outputs, cache, tying."""
    torch.manual_seed(0)
    cfg = FastformerConfig(**{**TINY, **kw})
    model = FastformerForCausalLM(cfg)
    init_std = float(model.model.layers[0].ffn.up.weight.detach().std())
    perturb(model)
    ids = torch.tensor([[4, 5, 9, 3, 7, 8, 6, 12, 11, 10]])
    torch.manual_seed(1)
    train_loss = model.train()(ids, labels=ids).loss.item()
    model.eval()
    block_calls = count_block_calls(model)
    out = model(ids, labels=ids)
    gen = model.generate(ids[:, :2], max_new_tokens=3, do_sample=False, min_new_tokens=0)
    return (tuple((n, tuple(p.shape)) for n, p in model.named_parameters()), round(init_std, 3), train_loss,
            out.logits.sum().item(), output_cache(out) is None, gen.tolist(),
            model.lm_head.weight is model.model.embed_tokens.weight, model.model.embed_tokens.padding_idx,
            model.model.layers[0].attention.chunk, model.generation_config.bos_token_id,
            model.generation_config.eos_token_id, len(block_calls))


def test_every_config_field_is_declared_here():
    fields = {f.name for f in dataclasses.fields(FastformerConfig)} - {
        f.name for f in dataclasses.fields(PreTrainedConfig)}  # ours: the family's and the shared recurrent ones
    assert fields == set(NON_DEFAULT), fields ^ set(NON_DEFAULT)


@pytest.mark.parametrize("field", sorted(NON_DEFAULT))
def test_every_config_field_has_an_effect(field):
    extra = {"groups": {"convolve": True}, "kernel_size": {"convolve": True}, "local_rotary": {"local_window": 4},
             "n_positions": {"position_embedding_type": "learned"},  # (no positions: no limit)
             "focus": {"preset": "leap"}, "alignment": {"preset": "leap"}}.get(field, {})
    assert signature(**extra) != signature(**extra, **{field: NON_DEFAULT[field]})


def test_generate_prefill_computes_only_the_last_logits():
    """At prefill, generate asks for logits_to_keep=1: a [B, T, V] logits tensor would cost T times more memory."""
    model = tiny()
    shapes = []
    head = model.compute_logits
    model.compute_logits = lambda h: (shapes.append(tuple(h.shape)), head(h))[1]  # what the output layer is given
    model.generate(torch.randint(3, 40, (2, 11)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert shapes[0] == (2, 1, model.config.hidden_size), shapes


@pytest.mark.parametrize("layers, n_positions, windows", [
    (1, 64, (None,)), (6, 64, (None, 4, 8, 16, None, 4)), (10, 2048, (None, 4, 8, 16, None, 4, 8, 16, None, 4)),
    (5, 8, (None, 4, None, None, None)),  # windows as long as the training length are global
], ids=["one-layer", "six", "ten", "short-training"])
def test_the_leap_schedule_is_global_first_then_4_8_16_global(layers, n_positions, windows):
    config = FastformerConfig(**{**TINY, "num_hidden_layers": layers, "n_positions": n_positions,
                                 "pool_windows": "leap"})
    assert config.layer_windows == windows


@pytest.mark.parametrize("value", [[0, 3], "0/3", 3])
def test_pool_windows_reach_the_layers(value):
    model = FastformerForCausalLM(FastformerConfig(**{**TINY, "num_hidden_layers": 2, "pool_windows": value}))
    got = [layer.attention.window for layer in model.model.layers]
    assert got == ([3, 3] if value == 3 else [None, 3])


def test_the_leap_preset_takes_no_fastformer_only_options():
    for option in ("bonus", "token_shift"):
        with pytest.raises(ValueError, match=option):
            FastformerConfig(**{**TINY, "preset": "leap", option: True})

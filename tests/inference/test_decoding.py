"""The lean decode loop agrees with model.generate and keeps its state fixed-size and in place."""

import pytest
import torch

from attnfree import FastformerConfig, FastformerForCausalLM
from attnfree.inference.decoding import stream_generate
from attnfree.inference.sampling import Sampling
from attnfree.models.compat import output_cache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = FastformerConfig(hidden_size=32, n_heads=4, vocab_size=50, num_hidden_layers=2, n_positions=128,
                           convolve=True, decay="learned", hidden_dropout_prob=0.0, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    m = FastformerForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def test_greedy_matches_generate_on_left_padded_batch(model):
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    got = torch.stack(list(stream_generate(model, ids, 12, Sampling(greedy=True), mask)), 1)
    assert torch.equal(got, ref[:, -12:])


def test_sampling_is_reproducible_and_respects_top_k(model):
    ids = torch.randint(3, 50, (2, 5))
    runs = [torch.stack(list(stream_generate(model, ids, 20, Sampling(top_k=1, temperature=0.7), None, None,
                                             torch.Generator().manual_seed(3))), 1) for _ in range(2)]
    greedy = torch.stack(list(stream_generate(model, ids, 20, Sampling(greedy=True))), 1)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], greedy)  # top_k=1 is greedy


def test_eos_stops_and_bad_sampling_raises(model):
    ids = torch.randint(3, 50, (1, 4))
    first = next(iter(stream_generate(model, ids, 5, Sampling(greedy=True))))
    assert len(list(stream_generate(model, ids, 50, Sampling(greedy=True), eos_token_id=int(first)))) == 1
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            Sampling(**bad)


@pytest.mark.parametrize("name", ["fastformer", "fastformer-conv", "leviathan"])
def test_chunked_prefill_equals_one_prefill_on_a_left_padded_batch(name):
    from types import SimpleNamespace

    from attnfree.inference.decoding import chunked_prefill
    from attnfree.models.registry import ModelSize, build_model

    torch.manual_seed(0)
    ids = SimpleNamespace(vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = build_model(name, ModelSize(hidden_size=24, n_heads=3, num_layers=2, n_positions=64), ids)
    model = model.double().eval()
    ids = torch.randint(3, 40, (3, 23))
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[0, :9], mask[1, :2] = 0, 0  # row 0's first chunk of 7 is all padding
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        parts = chunked_prefill(model, ids, mask, chunk_size=7)
        assert torch.allclose(parts.logits, whole.logits, atol=1e-10)
        # and the states carry on alike: one more step from each
        nxt = torch.randint(3, 40, (3, 1))
        a = model(input_ids=nxt, cache=output_cache(whole), use_cache=True).logits
        b = model(input_ids=nxt, cache=output_cache(parts), use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(model, ids, mask, chunk_size=0)


@pytest.mark.parametrize("family", ["fastformer", "gpt2", "rwkv"])
def test_generate_text_is_stream_generate_and_agrees_with_hf_generate(family):
    """One decoding path: ``generate_text`` (the CLI's and compare's samples) decodes ``stream_generate``'s tokens
    (our cache, or recomputation for the transformers peers); HF ``generate`` stays a compatible surface: greedy,
    the same tokens."""
    from attnfree.data import ByteTokenizer
    from attnfree.inference.decoding import generate_text
    from attnfree.models.registry import ModelSize, build_model

    tok = ByteTokenizer()
    torch.manual_seed(0)
    lm = build_model(family, ModelSize(hidden_size=32, n_heads=2, num_layers=2, n_positions=64), tok).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    prompt = torch.tensor([tok.encode("ROMEO:")])
    hf = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, prompt.shape[1]:]
    ours = torch.stack(list(stream_generate(lm, prompt, 10, Sampling(greedy=True), eos_token_id=tok.eos_token_id)),
                       1)[0]
    assert ours.tolist() == hf[: len(ours)].tolist()  # (generate pads after EOS; the pad decodes to nothing)
    assert generate_text(lm, tok, "ROMEO:", max_new_tokens=10, greedy=True) == tok.decode(hf.tolist())
    # sampled: the seed alone fixes the text, and it is stream_generate's tokens with a generator of that seed
    sampled = generate_text(lm, tok, "ROMEO:", max_new_tokens=10, temperature=0.8, top_k=50, seed=3)
    assert sampled == generate_text(lm, tok, "ROMEO:", max_new_tokens=10, temperature=0.8, top_k=50, seed=3)
    tokens = stream_generate(lm, prompt, 10, Sampling(0.8, 50), eos_token_id=tok.eos_token_id,
                             generator=torch.Generator().manual_seed(3))
    assert sampled == tok.decode([int(t) for t in tokens])

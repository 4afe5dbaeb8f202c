"""The recurrent cache under both of transformers' names: ``cache`` (5.24 on) and ``past_key_values`` (before).

transformers 5.24 renamed the cache; a model that read only the old name silently re-ran the whole prefix in
``generate`` and returned wrong logits when stepped with ``cache=``. Each name must give the right logits, and
anything else must raise, on every transformers release the project supports.
"""

import pytest
import torch

import attnfree  # noqa: F401  (registers the Auto classes)
from attnfree import FastformerConfig, FastformerForCausalLM, LeviathanConfig, LeviathanForCausalLM
from attnfree.models.compat import CACHE_FIELD, output_cache
from attnfree.testing import assert_close, perturb

SIZES = dict(hidden_size=24, n_heads=3, vocab_size=40, num_hidden_layers=2, n_positions=300,
             hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "fastformer": lambda: FastformerForCausalLM(FastformerConfig(**SIZES, convolve=True)),
    "leviathan": lambda: LeviathanForCausalLM(LeviathanConfig(**SIZES, dense_lags=4, segment=2)),
}


@pytest.fixture(params=sorted(FAMILIES))
def model(request):
    torch.manual_seed(0)
    return perturb(FAMILIES[request.param]()).double().eval()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_step_with_either_name_gives_the_full_forward_logits(model, name):
    ids = torch.randint(3, 40, (2, 9))
    full = model(ids).logits[:, -1]
    out = model(ids[:, :-1], use_cache=True)
    assert CACHE_FIELD in out and output_cache(out) is not None
    step = model(ids[:, -1:], use_cache=True, **{name: output_cache(out)}).logits[:, -1]
    assert_close(f"step with {name}=", step, full)


def test_a_cache_given_twice_or_of_the_wrong_kind_or_a_misspelt_keyword_raises(model):
    ids = torch.randint(3, 40, (2, 5))
    a, b = (output_cache(model(ids, use_cache=True)) for _ in range(2))
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :1], cache=a, past_key_values=b, use_cache=True)
    with pytest.raises(TypeError, match="RecurrentCache"):
        model(ids[:, :1], cache=((torch.zeros(1),),), use_cache=True)
    with pytest.raises(TypeError, match="cahce"):
        model(ids[:, :1], cahce=a, use_cache=True)
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)


def test_generate_feeds_one_token_per_step(model):
    """A 200-token generate embeds the prompt once and then one token per step: 7 + 199 positions in all."""
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    model.generate(torch.randint(3, 40, (1, 7)), max_new_tokens=200, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    assert calls == [7] + [1] * 199

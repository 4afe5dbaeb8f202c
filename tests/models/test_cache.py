"""RecurrentCache: joining, dropping, reordering and flattening streams' states, the same for every family."""

from __future__ import annotations

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.models.cache import RecurrentCache, tree_concat
from attnfree.models.compat import output_cache
from attnfree.models.registry import ModelSize, build_model
from attnfree.ops.additive import AdditiveState
from attnfree.testing import assert_close, perturb

TOK = ByteTokenizer()


def tiny(name: str, n_positions: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    size = ModelSize(hidden_size=32, n_heads=2, num_layers=2, n_positions=n_positions)
    return perturb(build_model(name, size, TOK, {"dense_lags": 4} if name == "leviathan" else None), std=0.2).eval()




@pytest.mark.parametrize("name", ["fastformer-conv", "fastformer-local", "leviathan"])
def test_cache_concat_and_select_match_separate_decoding(name: str) -> None:
    model = tiny(name, n_positions=64)
    prompts = [torch.randint(0, 256, (1, n)) for n in (3, 11, 6)]  # different lengths: different `seen`
    with torch.inference_mode():
        caches = [output_cache(model(input_ids=p, use_cache=True, logits_to_keep=1)) for p in prompts]
        alone = [model(input_ids=torch.tensor([[7]]), cache=c.select([0]), use_cache=True).logits
                 for c in caches]
        batch = RecurrentCache.concat(caches)
        assert batch.batch_size == 3 and batch.nbytes() == sum(c.nbytes() for c in caches)
        together = model(input_ids=torch.full((3, 1), 7), cache=batch, use_cache=True).logits
        assert_close("joined step", together, torch.cat(alone))
        # a second step after dropping the middle row still matches
        kept = batch.select([2, 0])
        again = model(input_ids=torch.tensor([[5], [9]]), cache=kept, use_cache=True).logits
    with torch.inference_mode():
        full = [model(input_ids=torch.cat([prompts[i], torch.tensor([[7, u]])], 1)).logits[:, -1:]
                for i, u in ((2, 5), (0, 9))]
    assert_close("after select", again, torch.cat(full))


def test_cache_concat_rejects_mismatched_caches() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RecurrentCache.concat([])
    with pytest.raises(ValueError, match="never prefilled"):
        RecurrentCache.concat([RecurrentCache(2, 1)])




@pytest.mark.parametrize("name", ["fastformer-conv", "fastformer-local", "leviathan"])
def test_flatten_names_every_tensor_and_with_tensors_rebuilds_the_cache(name: str) -> None:
    model = tiny(name)
    with torch.inference_mode():
        cache = output_cache(model(input_ids=torch.randint(0, 256, (2, 5)), use_cache=True))
        flat = cache.flatten()
        names = [n for n, _ in flat]
        assert names[-1] == "positions" and len(set(names)) == len(names)
        assert all(n.startswith("layers.") for n in names[:-1]) and all(t.shape[0] == 2 for _, t in flat)
        rebuilt = cache.with_tensors([t.clone() for _, t in flat])
        a = model(input_ids=torch.tensor([[3], [4]]), cache=cache, use_cache=True).logits
        b = model(input_ids=torch.tensor([[3], [4]]), cache=rebuilt, use_cache=True).logits
    assert torch.equal(a, b) and [n for n, _ in rebuilt.flatten()] == names
    with pytest.raises(ValueError, match="holds"):
        cache.with_tensors([t for _, t in flat][:-1])


def test_states_concatenate_along_the_batch_and_other_values_must_agree() -> None:
    s = [AdditiveState(torch.zeros(b, 2, 3), torch.zeros(b, 2), torch.zeros(b, 2)) for b in (1, 2)]
    joined = tree_concat([{"query": s[0], "tag": "x"}, {"query": s[1], "tag": "x"}])
    assert isinstance(joined["query"], AdditiveState) and joined["query"].s.shape == (3, 2, 3)
    with pytest.raises(ValueError, match="non-tensor values differ"):
        tree_concat([{"tag": "x"}, {"tag": "y"}])
    with pytest.raises(ValueError, match="different keys"):
        tree_concat([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])

"""torch.compile: our models trace as one graph (no breaks) and the compiled training step matches eager.

Compiled (inductor, CPU) forward logits, loss and every parameter gradient are compared with the eager model
on a left-padded batch. Inductor reorders float32 sums, so the tolerance is float32's, loosened a little.
"""

import pytest
import torch

import attnfree  # noqa: F401  (registers the Auto classes)
from attnfree import FastformerConfig, FastformerForCausalLM
from attnfree.models.leviathan import LeviathanConfig, LeviathanForCausalLM
from attnfree.ops.correlation.state import check_lags
from attnfree.testing import assert_close, perturb

COMMON = dict(hidden_size=24, n_heads=3, vocab_size=40, num_hidden_layers=2, hidden_dropout_prob=0.0,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "fastformer": lambda: FastformerForCausalLM(FastformerConfig(**COMMON, n_positions=64)),
    "fastformer-conv": lambda: FastformerForCausalLM(FastformerConfig(**COMMON, n_positions=64, convolve=True,
                                                                      groups=3)),
    "fastformer-local": lambda: FastformerForCausalLM(FastformerConfig(**COMMON, n_positions=64, local_window=5)),
    "fastformer-decay": lambda: FastformerForCausalLM(FastformerConfig(**COMMON, n_positions=64, decay="learned")),
    "leviathan": lambda: LeviathanForCausalLM(LeviathanConfig(**COMMON, n_positions=32, dense_lags=4, segment=2)),
}
RTOL = 1e-4  # float32 with inductor's reordered reductions (eager vs eager is exact)


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb(MODELS[name]()).train()


def padded_batch(B: int = 3, T: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attention_mask [B, T]: row 1 left-padded by 5, row 2 with only 3 real tokens (T odd on purpose)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, : T - 3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def loss_logits_grads(model: torch.nn.Module, fn, ids: torch.Tensor, mask: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = fn(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("name", ["fastformer", "leviathan"])
def test_training_forward_is_one_graph(name):
    """No graph break anywhere in forward + loss (validation that reads tensor data is skipped while tracing)."""
    model = tiny(name)
    ids, mask = padded_batch()
    explain = torch._dynamo.explain(lambda i, m: model(input_ids=i, attention_mask=m, labels=i).loss)(ids, mask)
    reasons = [b.reason.splitlines()[0] for b in explain.break_reasons]
    assert explain.graph_break_count == 0 and explain.graph_count == 1, reasons


# aot_eager: dynamo + AOT autograd (the traced forward and backward graphs), run by eager kernels: seconds.
# inductor: the same graphs compiled to C++ by gcc: 50-90 s per model on a cold cache on this CPU, so slow.
BACKENDS = [pytest.param("aot_eager", id="aot_eager"), pytest.param("inductor", id="inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_loss_logits_and_gradients_equal_eager(name, backend):
    model = tiny(name)
    ids, mask = padded_batch()
    loss, logits, grads = loss_logits_grads(model, model, ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: any graph break is an error
    c_loss, c_logits, c_grads = loss_logits_grads(model, compiled, ids, mask)
    assert_close("loss", c_loss, loss, rtol=RTOL)
    keep = mask.bool()  # padded positions' logits are free to differ (they are never scored)
    assert_close("logits", c_logits[keep], logits[keep], rtol=RTOL)
    assert grads.keys() == c_grads.keys()
    for key in grads:
        assert_close(f"grad {key}", c_grads[key], grads[key], rtol=1e-3)


def test_compiled_model_still_validates_in_eager_calls():
    """Compilation skips the data checks only while tracing: the eager model keeps raising clear errors."""
    model = tiny("fastformer")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[1, 99]]))


def test_lags_as_a_tuple_of_ints():
    """Layers hand the parallel correlation a tuple (no tensor read while tracing); it is checked alike."""
    assert check_lags((0, 1, 2, 4)) == check_lags(torch.tensor([0, 1, 2, 4])) == [0, 1, 2, 4]
    for bad, match in [((), "non-empty"), ((0, 1.5), "sequence of ints"), ((0, True), "sequence of ints"),
                       ((1, 2), "start at 0"), ((0, 2, 2), "sorted and distinct")]:
        with pytest.raises(ValueError, match=match):
            check_lags(bad)

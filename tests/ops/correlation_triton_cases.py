"""The correlation Triton kernels against the references, run under Triton's CPU interpreter.

Not collected by the normal run (no ``test_`` prefix): ``test_correlation_triton.py`` runs this file in a
subprocess with ``TRITON_INTERPRET=1`` set before anything imports the kernels, and checks that every case
passed (none skipped). By hand:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/ops/correlation_triton_cases.py [-m slow]

On a machine with CUDA it also runs without the interpreter (the tensors are then moved to the GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from attnfree.ops.backend import use_kernel_backend
from attnfree.ops.correlation import LagSet, correlation, correlation_naive, correlation_parallel, make_lags
from attnfree.testing import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 or CUDA (run through test_correlation_triton.py)", allow_module_level=True)

from attnfree.layers.correlation import MultiHeadedCorrelation  # noqa: E402
from attnfree.layers.sublayer import BlockContext  # noqa: E402
from attnfree.ops.correlation import triton as kernels  # noqa: E402  (after the environment check)

DEVICE = "cpu" if INTERPRET else "cuda"
B = 3
LAG_SETS = {
    "dense": torch.arange(8),  # 0..7 only
    "dilated": make_lags(8, 128),  # 0..7, 8, 16, 32, 64
    "gaps": torch.tensor([0, 1, 2, 3, 5, 8, 13, 50, 120]),  # holes, and lags past T = 37 / 63
}


def make_inputs(T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    """float64 q, k, v, do [B, T, H, D] on the CPU (the reference's inputs) and the same cast to dtype on DEVICE
    (leaves); mask [B, T]: row 1 left-padded by a third, row 2 with a hole of 3."""
    g = torch.Generator().manual_seed(seed)
    ref = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = [x.to(DEVICE, dtype) for x in ref]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T // 3] = False
    mask[2, T // 2 : T // 2 + 3] = False
    return ref, ours, mask


def run(op, q, k, v, do, lags, segment, mask, **kw):
    """o and the gradients of <o, do> with respect to q, k, v (fresh leaves)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, _ = op(*leaves, LagSet(lags, segment), mask, **kw)
    grads = torch.autograd.grad((o.float() * do.float()).sum(), leaves)
    return [o.detach(), *grads]


def compare(label: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """o, dq, dk, dv within the tolerance of got's dtype (``assert_close``'s table)."""
    for name, a, e in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_close(f"{label} {name}", a.cpu(), e.cpu())


def test_kernels_are_the_interpreted_or_compiled_ones():
    """The kernels defined in the module are what runs: interpreted functions under TRITON_INTERPRET=1."""
    kind = type(kernels._scores_kernel).__name__
    assert kind == ("InterpretedFunction" if INTERPRET else "JITFunction"), kind


CASES = {  # id: (T, H, D, segment, lag set, masked, (block_t, block_d))
    "T1": (1, 1, 10, 4, "dilated", False, (None, None)),
    "T37-mask-J4": (37, 3, 10, 4, "dilated", True, (None, None)),
    "T37-dense-J1-tiles": (37, 1, 16, 1, "dense", True, (16, 8)),  # 3 T blocks, 2 D tiles, D loop
    "T63-gaps-J4": (63, 1, 16, 4, "gaps", True, (None, None)),
    "T130-J4": (130, 1, 10, 4, "dilated", False, (None, None)),  # 3 blocks of 64
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_float32_matches_naive_and_parallel(case):
    """Values and gradients (q, k, v) of the kernels against the float64 loop and the parallel form."""
    T, H, D, segment, lag_name, masked, (bt, bd) = case
    lags = LAG_SETS[lag_name]
    ref, ours, mask = make_inputs(T, H, D, torch.float32)
    mask = mask if masked else None
    on_device = None if mask is None else mask.to(DEVICE)
    got = run(kernels.correlation_triton, *ours, lags, segment, on_device, block_t=bt, block_d=bd)
    compare("vs naive", got, run(correlation_naive, *ref, lags, segment, mask))
    compare("vs parallel", got, run(correlation_parallel, *ours, lags, segment, on_device))


def test_bfloat16_matches_naive():
    """bfloat16 in and out, float32 inside: within bfloat16 rounding of the float64 reference."""
    lags = LAG_SETS["dilated"]
    ref, ours, mask = make_inputs(37, 3, 10, torch.bfloat16, seed=1)
    got = run(kernels.correlation_triton, *ours, lags, 4, mask.to(DEVICE))
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got[1:])
    ref = [x.to(torch.bfloat16).double() for x in ref]  # the same rounded inputs
    compare("bf16 vs naive", got, run(correlation_naive, *ref, lags, 4, mask))


def test_state_in_and_out_match_parallel():
    """Prefill 20 tokens with a final state, continue 17 from it: outputs and states equal the parallel form's."""
    lags = LAG_SETS["dilated"]
    _, (q, k, v, _), mask = make_inputs(37, 3, 10, torch.float32, seed=2)
    mask = mask.to(DEVICE)
    first, rest = slice(0, 20), slice(20, 37)
    states = {}
    for name, op in (("triton", kernels.correlation_triton), ("parallel", correlation_parallel)):
        o1, s1 = op(q[:, first], k[:, first], v[:, first], LagSet(lags, 4), mask[:, first], output_final_state=True)
        o2, s2 = op(q[:, rest], k[:, rest], v[:, rest], LagSet(lags, 4), mask[:, rest], s1, True)
        states[name] = (torch.cat([o1, o2], 1), s2)
    (o, s), (ro, rs) = states["triton"], states["parallel"]
    assert_close("o", o, ro)
    for field in ("q", "k", "v"):
        assert_close(f"state.{field}", getattr(s, field), getattr(rs, field))
    assert torch.equal(s.valid, rs.valid) and torch.equal(s.seen, rs.seen) and set(s.seen.tolist()) == {37}


def test_layer_dispatches_to_the_kernels():
    """The Leviathan token mixer, forced onto 'triton', gives the outputs and gradients of 'torch'."""
    torch.manual_seed(0)
    layer = MultiHeadedCorrelation(48, 3, LagSet(make_lags(8, 64), 4), 0.0, 1e-5).to(DEVICE)
    x = torch.randn(2, 21, 48, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        with use_kernel_backend(backend):
            xi = x.clone().requires_grad_()
            y = layer(xi, BlockContext(None, torch.arange(21, device=DEVICE).expand(2, 21)))
            y.square().sum().backward()
            results[backend] = (y.detach(), xi.grad, layer.qkv.weight.grad.clone())
            layer.zero_grad()
    for name, a, e in zip(("y", "dx", "dW_qkv"), results["triton"], results["torch"]):
        assert_close(name, a, e)


def test_dispatcher_picks_the_kernels_when_forced():
    """correlation() under 'triton' returns exactly what correlation_triton does (same kernels, same order)."""
    lags = LAG_SETS["gaps"]
    _, (q, k, v, _), mask = make_inputs(20, 2, 10, torch.float32)
    with use_kernel_backend("triton"):
        o, _ = correlation(q, k, v, LagSet(lags, 4), mask.to(DEVICE))
    expected, _ = kernels.correlation_triton(q, k, v, LagSet(lags, 4), mask.to(DEVICE))
    assert torch.equal(o, expected)


SLOW_CASES = {
    "T256-H3-D64-J4": (256, 3, 64, 4, "dilated", True, (None, None)),  # MAX_BLOCK_D = 64: D in one tile
    "T200-H2-D100-J4-gaps": (200, 2, 100, 4, "gaps", True, (None, None)),  # D = 100: two tiles, D loop
}


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES.values(), ids=SLOW_CASES.keys())
def test_float32_matches_naive_larger(case):
    test_float32_matches_naive_and_parallel(case)

"""The additive-attention Triton kernels against the references, run under Triton's CPU interpreter.

Not collected by the normal run (no ``test_`` prefix): ``test_additive_triton.py`` runs this file in a
subprocess with ``TRITON_INTERPRET=1`` set before anything imports the kernels, and checks that every case
passed (none skipped). By hand:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/ops/additive_triton_cases.py [-m slow]

On a machine with CUDA it also runs without the interpreter (the tensors are then moved to the GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from attnfree.ops.additive import (
    AdditiveState,
    PoolOptions,
    additive_pool,
    additive_pool_naive,
    additive_pool_parallel,
)
from attnfree.ops.backend import use_kernel_backend
from attnfree.testing import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 or CUDA (run through test_additive_triton.py)", allow_module_level=True)

from attnfree.ops.additive import triton as kernels  # noqa: E402  (after the environment check)

DEVICE = "cpu" if INTERPRET else "cuda"
RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    """Seeded upstream gradients on DEVICE (each case its own generator: results do not depend on order)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def make_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, scale: float = 3.0, seed: int = 0):
    """x [B, T, H, D], scores [B, T, H] (leaves), mask [B, T]: row 1 left-padded, row 2 with a hole."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    a = torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, : T // 3] = False  # left padding
    if B > 2:
        mask[2, T // 2: T // 2 + 5] = False  # a hole in the middle
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, a)]
    return leaves[0], leaves[1], mask.to(DEVICE)


def run(fn, x, a, mask, do, state=None, dsT=None, dzT=None, chunk_size=16, **kw):
    """Forward, then backward of <g, do> (+ <s_T, dsT> + <z_T, dzT>). Returns (g, final state, grads)."""
    out, final = fn(x, a, mask, state, PoolOptions(True, chunk_size=chunk_size), **kw)
    loss = (out.float() * do).sum()
    if dsT is not None:
        loss = loss + (final.s * dsT).sum() + (final.z * dzT).sum()
    leaves = [x, a] + ([state.s, state.z] if state is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), final, grads


def compare(name, got, ref, rtol, grad_names=("dx", "da")):
    (out, state, grads), (r_out, r_state, r_grads) = got, ref
    assert_close(f"{name} g", out.float(), r_out.float(), rtol)
    for field, s, r in zip("szm", state, r_state):
        finite = torch.isfinite(r)  # m = -inf for an all-padding row, in both
        assert torch.equal(finite, torch.isfinite(s)), f"{name} state.{field}: -inf at different places"
        assert_close(f"{name} state.{field}", s[finite].float(), r[finite].float(), rtol)
    for field, gg, rg in zip(grad_names, grads, r_grads):
        assert_close(f"{name} {field}", gg.float(), rg.float(), rtol)


SIZES = [  # (B, T, H, D, block_d)
    pytest.param(3, 1, 2, 16, None, id="T1"),
    pytest.param(3, 37, 3, 10, None, id="T37-D10"),
    pytest.param(3, 63, 1, 60, 16, id="T63-D60-4blocks"),
    pytest.param(2, 130, 2, 16, None, id="T130"),
    pytest.param(1, 20, 1, 64, None, id="T20-D64"),
]


@pytest.mark.parametrize("B,T,H,D,block_d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_matches_naive(B, T, H, D, block_d, dtype):
    """Values, final state, dx and da against the float64 loop (the equation as written)."""
    x, a, mask = make_inputs(B, T, H, D, dtype)
    do = randn(B, T, H, D)
    got = run(kernels.additive_pool_triton, x, a, mask, do, chunk_size=16, block_d=block_d)
    ref = run(additive_pool_naive, x.double(), a.double(), mask, do.double())
    compare("triton vs naive", got, ref, RTOL[dtype])


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_extreme_scores_are_finite_and_exact(scale, dtype):
    """|score| up to 1e4: no overflow, no 0/0 in values or gradients; equal to the float64 reference."""
    x, a, mask = make_inputs(3, 45, 2, 16, dtype, scale=scale)
    do = randn(3, 45, 2, 16)
    got = run(kernels.additive_pool_triton, x, a, mask, do, chunk_size=16)
    ref = run(additive_pool_naive, x.double(), a.double(), mask, do.double())
    compare(f"|a|~{scale:g}", got, ref, RTOL[dtype])


def test_state_in_and_out_and_their_gradients_match_parallel():
    """A previous state in (gradients into its s and z), gradients into the final s and z: as the PyTorch form
    computes them (the maxima m are reference points without gradient in both)."""
    B, T, H, D = 3, 50, 2, 12
    x, a, mask = make_inputs(B, T, H, D, torch.float32, seed=2)
    x0, a0, m0 = make_inputs(B, 20, H, D, torch.float32, seed=3)
    m0[0] = False  # row 0 arrives with an empty state (z = 0, m = -inf)
    _, prev = additive_pool_parallel(x0.detach(), a0.detach(), m0, None, PoolOptions(True))
    g = torch.Generator().manual_seed(4)
    do, dsT, dzT = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((B, T, H, D), (B, H, D), (B, H)))
    results = []
    for fn in (kernels.additive_pool_triton, additive_pool_parallel):
        state = AdditiveState(prev.s.clone().requires_grad_(), prev.z.clone().requires_grad_(), prev.m.clone())
        results.append(run(fn, x, a, mask, do, state, dsT, dzT, chunk_size=16))
    compare("state in/out", *results, RTOL[torch.float32], grad_names=("dx", "da", "ds0", "dz0"))


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_sizes_agree_with_parallel(chunk):
    x, a, mask = make_inputs(3, 100, 2, 20, torch.float32, scale=5.0, seed=5)
    do = randn(3, 100, 2, 20)
    got = run(kernels.additive_pool_triton, x, a, mask, do, chunk_size=chunk)
    compare(f"chunk={chunk}", got, run(additive_pool_parallel, x, a, mask, do), RTOL[torch.float32])


def test_non_contiguous_inputs():
    """x as a strided view (the layer's heads come from a fused qkv projection), mask=None."""
    qkv = randn(2, 40, 3 * 24, seed=7).requires_grad_()
    x = qkv[..., 24:48].unflatten(-1, (2, 12))  # [B, T, H, D] with stride 72 along T
    a = randn(2, 40, 2, seed=8).requires_grad_()
    do = randn(2, 40, 2, 12)
    got = run(kernels.additive_pool_triton, x, a, None, do, chunk_size=16)
    compare("strided x", got, run(additive_pool_parallel, x, a, None, do), RTOL[torch.float32])


def test_leading_padding_gives_zero_not_nan():
    x, a, _ = make_inputs(2, 20, 1, 16, torch.float32)
    mask = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = True
    out, _ = kernels.additive_pool_triton(x, a, mask, options=PoolOptions(chunk_size=16))
    out.sum().backward()
    assert (out[0, :5] == 0).all() and (out[1] == 0).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad).all()
    assert (x.grad[1] == 0).all() and (a.grad[1] == 0).all()  # padding gets no gradient


def test_dispatcher_and_layer_run_the_kernels():
    """Forced 'triton': the dispatcher calls the kernels (interpreted ones on CPU), and a Fastformer layer
    gives the same outputs and parameter gradients as with 'torch'."""
    from attnfree.layers.additive_attention import FastformerAttention
    from attnfree.layers.sublayer import BlockContext
    from attnfree.testing import perturb

    if INTERPRET:  # proof that these are the interpreter's kernels, not compiled ones
        assert type(kernels._additive_fwd_kernel).__name__ == "InterpretedFunction"
        assert type(kernels._additive_bwd_kernel).__name__ == "InterpretedFunction"
    layer = perturb(FastformerAttention(32, 2, 0.0, 1e-5, 16, decay="fixed")).to(DEVICE)
    h = randn(3, 33, 32, seed=9)
    positions = torch.arange(33, device=DEVICE).expand(3, 33)
    mask = torch.ones(3, 33, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False
    results = []
    for backend in ("triton", "torch"):
        with use_kernel_backend(backend):
            out = layer(h, BlockContext(mask, positions))
            grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        results.append((out.detach(), grads))
    assert_close("layer out", results[0][0], results[1][0], RTOL[torch.float32])
    for (name, _), g_tri, g_ref in zip(layer.named_parameters(), results[0][1], results[1][1]):
        assert_close(f"layer d{name}", g_tri, g_ref, 1e-4)
    with use_kernel_backend("triton"), pytest.raises(ValueError, match="float64"):
        additive_pool(h.double().view(3, 33, 2, 16), h.double()[..., :2], None)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_larger_against_parallel(dtype):
    """[4, 256, 4, 64] with chunks of 64: the size the fast cases stay below."""
    x, a, mask = make_inputs(4, 256, 4, 64, dtype, scale=10.0, seed=6)
    do = randn(4, 256, 4, 64)
    got = run(kernels.additive_pool_triton, x, a, mask, do, chunk_size=64)
    ref = run(additive_pool_naive, x.double(), a.double(), mask, do.double())
    compare("T=256", got, ref, RTOL[dtype])

"""Triton kernels of causal additive attention: run for real (interpreter on CPU, CUDA when present).

The kernel cases live in ``additive_triton_cases.py``. ``TRITON_INTERPRET=1`` has to be set before the kernels
are defined and changes what ``ops.backend`` decides for every other test, so the cases run in a subprocess
of their own here; this file asserts that they all ran and passed (none skipped: a missing numpy makes
triton's interpreter fail to import, which would otherwise pass as a skip).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnfree.ops.additive import PoolOptions, additive_pool, additive_pool_parallel
from attnfree.ops.backend import use_kernel_backend
from attnfree.testing import assert_close

CASES = Path(__file__).with_name("additive_triton_cases.py")


def test_kernels_match_references_under_interpreter(kernel_cases):
    """Values, final state and gradients (x, scores, initial state) against the float64 loop and the PyTorch
    form, on T = 1, 20, 37, 63, 100, 130, D = 10, 16, 20, 60, 64, float32 and bfloat16, |scores| up to 1e4."""
    pytest.importorskip("numpy")
    pytest.importorskip("triton")
    passed = kernel_cases(CASES, "not slow", True)
    assert passed >= 20, f"expected the ~21 kernel cases to run, got {passed}"


@pytest.mark.slow
def test_kernels_larger_sizes_under_interpreter(kernel_cases):
    pytest.importorskip("triton")
    assert kernel_cases(CASES, "slow", True) >= 2


def test_forced_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, a = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1)
    with use_kernel_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET|not installed"):
        additive_pool(x, a)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_dispatch_runs_the_pytorch_form(backend, monkeypatch):
    """On CPU tensors 'auto' and 'torch' both give the parallel form's result, without importing the kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, a = torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2)
    options = PoolOptions(output_final_state=True, chunk_size=4)
    with use_kernel_backend(backend):
        out, state = additive_pool(x, a, None, None, options)
    ref, ref_state = additive_pool_parallel(x, a, None, None, options)
    assert torch.equal(out, ref) and all(torch.equal(s, r) for s, r in zip(state, ref_state))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_kernels_on_gpu_at_larger_sizes(dtype):
    """Compiled kernels on the GPU against the PyTorch form (float32 accumulation) at [2, 4096, 4, 128]."""
    from attnfree.ops.additive.triton import additive_pool_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = 2, 4096, 4, 128
    x = torch.randn(B, T, H, D, device="cuda", generator=g).to(dtype).requires_grad_()
    a = (torch.randn(B, T, H, device="cuda", generator=g) * 20).to(dtype).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[1, :1000] = False
    do = torch.randn(B, T, H, D, device="cuda", generator=g)
    results = []
    for fn in (additive_pool_triton, additive_pool_parallel):
        out, state = fn(x, a, mask, None, True)
        grads = torch.autograd.grad((out.float() * do).sum(), (x, a))
        results.append((out, state, grads))
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    (out, state, grads), (r_out, r_state, r_grads) = results
    assert_close("gpu g", out.float(), r_out.float(), rtol)
    for name, s, r in zip(("s", "z", "m", "dx", "da"), (*state, *grads), (*r_state, *r_grads)):
        assert_close(f"gpu {name}", s.float(), r.float(), rtol)

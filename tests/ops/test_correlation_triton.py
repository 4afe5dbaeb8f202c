"""The correlation Triton kernels: checked against the references under Triton's CPU interpreter (in a
subprocess, since TRITON_INTERPRET=1 must be set before the kernels are imported), on a GPU when there is
one, and the dispatch rules (auto -> PyTorch on CPU, forced 'triton' without a way to run -> error)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnfree.ops.backend import use_kernel_backend
from attnfree.ops.correlation import LagSet, correlation, correlation_parallel, make_lags

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("correlation_triton_cases.py")


def test_kernels_match_references_under_interpreter(kernel_cases):
    """About 30 s: float32 and bfloat16 values and gradients, state in/out, layer and dispatcher."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")  # the interpreter needs it
    assert kernel_cases(CASES, "not slow", True) >= 10


@pytest.mark.slow
def test_kernels_match_references_under_interpreter_larger(kernel_cases):
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    kernel_cases(CASES, "slow", True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_references_on_gpu(kernel_cases):
    pytest.importorskip("triton")
    kernel_cases(CASES, "not slow or slow", False)


def inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 9, 2, 4, generator=g, dtype=dtype) for _ in range(3)]


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_kernel_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        correlation(*inputs(), LagSet(make_lags(4, 8), 2))


def test_auto_and_torch_on_cpu_give_the_parallel_form():
    lags = make_lags(4, 8)
    expected, _ = correlation_parallel(*inputs(), LagSet(lags, 2))
    for backend in ("auto", "torch"):
        with use_kernel_backend(backend):
            assert torch.equal(correlation(*inputs(), LagSet(lags, 2))[0], expected), backend


def test_float64_under_forced_triton_is_an_error_naming_the_dtype(monkeypatch):
    """The kernels accumulate in float32: a forced 'triton' refuses float64 (as the additive op does)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the backend itself would run on CPU tensors
    with use_kernel_backend("triton"), pytest.raises(ValueError, match="float64"):
        correlation(*inputs(torch.float64), LagSet(make_lags(4, 8), 2))


def test_block_sizes_must_be_powers_of_two():
    pytest.importorskip("triton")
    from attnfree.ops.correlation.triton import correlation_triton

    with pytest.raises(ValueError, match="block_t must be a power of two, got 24"):
        correlation_triton(*inputs(), LagSet(make_lags(4, 8), 2), block_t=24)


def test_imports_and_explains_without_triton():
    """With triton unimportable: attnfree imports, the dispatcher runs PyTorch, correlation_triton says why."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, attnfree\n"
        "from attnfree.ops.correlation import LagSet, correlation, make_lags\n"
        "from attnfree.ops.correlation.triton import correlation_triton\n"
        "x = torch.randn(1, 5, 1, 4)\n"
        "assert correlation(x, x, x, LagSet(make_lags(2, 4)))[0].shape == x.shape\n"
        "try:\n"
        "    correlation_triton(x, x, x, LagSet(make_lags(2, 4)))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ATTNFREE_KERNELS"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs the triton package" in done.stdout

"""Test helpers shared by the test suite and by users checking their own kernels."""

from __future__ import annotations

import torch

# Relative-RMS tolerance by the dtype of the tensor under test (the reference is float64).
RTOL_BY_DTYPE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}
# Absolute floor: a tensor whose every entry is this close passes even when the reference is ~0
# (e.g. the score gradient of a softmax over a single position is exactly 0).
ATOL_BY_DTYPE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None) -> None:
    """Assert that ``actual`` matches ``expected`` in relative RMS error.

    The error is ``rms(actual - expected) / (rms(expected) + tiny)``, a measure that does not blow up
    on single near-zero entries (fla's habit). ``rtol`` defaults to ``RTOL_BY_DTYPE[actual.dtype]``;
    a tensor within ``ATOL_BY_DTYPE`` everywhere passes too (for references that are ~0).
    The message reports the relative RMS error, the max absolute error and where it occurs.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = RTOL_BY_DTYPE.get(actual.dtype, 1e-5) if rtol is None else rtol
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values")
    diff = a - e
    rel_rms = (diff.pow(2).mean().sqrt() / (e.pow(2).mean().sqrt() + 1e-30)).item() if diff.numel() else 0.0
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    if rel_rms > tol and max_abs > ATOL_BY_DTYPE.get(actual.dtype, 1e-6):
        idx = int(diff.abs().argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape))
        raise AssertionError(
            f"{name}: relative RMS error {rel_rms:.3e} > {tol:.1e}; "
            f"max abs error {diff.abs().max().item():.3e} at {where}"
        )


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std) noise from a seeded generator, in name order.

    Test models use it so that every path visibly matters (a default init can hide structure, e.g.
    Fastformer's zero score vectors make every head pool uniformly). Returns the model.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model

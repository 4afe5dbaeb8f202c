"""Which implementation runs the fast ops: Triton kernels on CUDA tensors, the PyTorch forms elsewhere.

The switch is global (one process, one choice), set by the environment variable ``ATTNFREE_KERNELS`` or in
code with ``set_kernel_backend`` / ``use_kernel_backend``:

- ``auto`` (default): Triton when the tensors are on CUDA and ``triton`` imports; PyTorch otherwise.
- ``triton``: always Triton; an error (naming the reason) when it cannot run: triton missing, or CPU
  tensors without ``TRITON_INTERPRET=1`` (Triton's interpreter runs kernels on CPU tensors, slowly: the
  test suite uses it to check the kernels against the references on machines without a GPU).
- ``torch``: always the PyTorch forms (``ops/*/parallel.py``), e.g. to compare or to debug.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

KERNEL_BACKENDS = ("auto", "triton", "torch")
_ENV = "ATTNFREE_KERNELS"


def _checked(name: str, where: str) -> str:
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(KERNEL_BACKENDS)}, got {name!r}")
    return name


_backend = _checked(os.environ.get(_ENV, "auto"), _ENV)


def get_kernel_backend() -> str:
    return _backend


def set_kernel_backend(name: str) -> None:
    """Choose 'auto', 'triton' or 'torch' for every later call of the fast ops."""
    global _backend
    _backend = _checked(name, "kernel backend")


@contextmanager
def use_kernel_backend(name: str) -> Iterator[None]:
    """``with use_kernel_backend("torch"): ...`` runs the block with that backend, then restores the old one."""
    old = get_kernel_backend()
    set_kernel_backend(name)
    try:
        yield
    finally:
        set_kernel_backend(old)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (it must be set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: Tensor) -> bool:
    """Should an op run its Triton kernel on these tensors? Raises when 'triton' is forced but cannot run."""
    on_cuda = all(t.is_cuda for t in tensors)
    if _backend == "torch":
        return False
    if _backend == "auto":
        return on_cuda and triton_installed()
    if not triton_installed():
        raise RuntimeError("kernel backend 'triton' was forced but the triton package is not installed")
    if not (on_cuda or interpreting()):
        raise RuntimeError("kernel backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return True

"""The kernel switch: auto picks Triton only for CUDA tensors, 'torch' never, 'triton' errors where it cannot run."""

import pytest
import torch

from attnfree.ops import backend


@pytest.fixture(autouse=True)
def restore_backend():
    old = backend.get_kernel_backend()
    yield
    backend.set_kernel_backend(old)


def test_auto_uses_pytorch_for_cpu_tensors():
    with backend.use_kernel_backend("auto"):
        assert backend.use_triton(torch.zeros(2)) is False


def test_torch_forces_pytorch():
    with backend.use_kernel_backend("torch"):
        assert backend.use_triton(torch.zeros(2)) is False


def test_context_manager_restores_the_previous_choice():
    backend.set_kernel_backend("torch")
    with backend.use_kernel_backend("auto"):
        assert backend.get_kernel_backend() == "auto"
    assert backend.get_kernel_backend() == "torch"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'cuda'"):
        backend.set_kernel_backend("cuda")


def test_forced_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use_kernel_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET|not installed"):
        backend.use_triton(torch.zeros(2))


def test_forced_triton_on_cpu_with_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.use_kernel_backend("triton"):
        assert backend.use_triton(torch.zeros(2)) is True


def test_environment_variable_is_validated_at_import():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import attnfree.ops.backend"], capture_output=True, text=True,
                         env={"ATTNFREE_KERNELS": "fast", "PATH": ""})
    assert run.returncode != 0 and "ATTNFREE_KERNELS" in run.stderr

"""A tiny model and its ONNX export, made once per session for the server tests of both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.models.registry import ModelSize, build_model
from attnfree.testing import perturb

TOK = ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    """Position-free fastformer (no learned positions), float32 (as exported), perturbed so greedy text varies."""
    torch.manual_seed(0)
    return perturb(build_model("fastformer", ModelSize(32, 2, 2, n_positions=2048), TOK), 0, std=0.2).eval()


@pytest.fixture(scope="session")
def tiny_export(tiny_model: torch.nn.Module, tmp_path_factory: Any) -> tuple[torch.nn.Module, Path]:
    """(the model, the folder of its ONNX export): an export takes seconds to a minute, so one per session."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from attnfree.inference.export import export_onnx

    folder = tmp_path_factory.mktemp("tiny-export")
    export_onnx(tiny_model, TOK, folder)
    return tiny_model, folder

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the cores shared among pytest-xdist's workers (one process without it), at most two threads a process
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

DATA_DIR = Path(os.environ.get("ATTNFREE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seeded_random_state() -> None:
    """Every test starts from the same random state whatever ran before it in its process: pytest-xdist hands the
    tests to its workers in no fixed order, and a test that draws from torch's global generator must not pass or
    fail by that order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"data bundle not found at {DATA_DIR} (set ATTNFREE_DATA)")
    return DATA_DIR


# Cases that run only with -m slow, by name: a second copy of a slow check whose first copy runs by default (the
# schema fuzz on the ONNX backend, after the torch backend's; the ONNX export of each option variant of a family,
# after the family's own and the toy's). Their parametrisation is shared with cases that stay fast, so they are
# marked here rather than at the parameter.
SLOW_CASES = (
    "test_api.py::test_schemathesis_finds_nothing[onnx]",
    "test_api.py::test_schemathesis_with_an_api_key[onnx]",
    "test_contract.py::test_the_onnx_graphs_match_pytorch[fastformer+options]",
    "test_contract.py::test_the_onnx_graphs_match_pytorch[leviathan+options]",
    "test_contract.py::test_the_onnx_graphs_match_pytorch[leviathan-ensemble]",
    "test_contract.py::test_the_onnx_graphs_match_pytorch[leap+normed]",
    "test_contract.py::test_the_onnx_graphs_match_pytorch[fastformer-seed]",
    "test_contract.py::test_the_onnx_graphs_match_pytorch[fastformer+windows]",  # leap's rings and sums run by default
    "test_contract.py::test_the_onnx_graphs_match_pytorch[toy+running_max]",  # the toy's own case runs by default
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):  # runs before the -m selection
    for item in items:
        if item.nodeid.endswith(SLOW_CASES):
            item.add_marker(pytest.mark.slow)

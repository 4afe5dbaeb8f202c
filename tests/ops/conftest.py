"""Shared by the Triton kernel tests: run a kernel-cases file (``*_triton_cases.py``) in a pytest process of its own.

``TRITON_INTERPRET=1`` has to be set before the kernels are defined, and it changes what ``ops.backend`` decides
for every other test, so the cases never run in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_kernel_cases(cases: Path, marker: str, interpret: bool) -> int:
    """pytest on ``cases`` selected by ``marker``, with the interpreter on (CPU) or off (CUDA). Asserts every
    selected case ran and passed (a missing numpy or triton shows as skipped, not failed); returns how many."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTNFREE_KERNELS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if interpret:  # the interpreter's CPU path, even on a GPU machine
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(cases)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"kernel cases failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and "skipped" not in summary and "error" not in summary, f"kernel cases did not all run: {summary}"
    return int(passed.group(1))


@pytest.fixture
def kernel_cases() -> Callable[[Path, str, bool], int]:
    return run_kernel_cases

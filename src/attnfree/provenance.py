"""What produced a result: library versions and the exact source, recorded in every results, run and benchmark file.

A figure whose libraries moved since cannot be traced otherwise. ``provenance()`` gives the versions of Python,
torch, transformers and attnfree, the git commit of the attnfree source that ran (with a dirty flag: uncommitted
changes to tracked files), and the machine. It needs no torch (the torch-free runtime imports nothing from here).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "numpy")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def source_revision() -> dict[str, Any]:
    """The git commit of the checkout holding this package, and whether tracked files differ from it.

    Both None when attnfree is installed from a wheel (no checkout around it) or git is missing.
    """
    root = Path(__file__).resolve().parents[2]  # src/attnfree/provenance.py -> the checkout
    if not (root / ".git").exists():
        return {"git_commit": None, "git_dirty": None}
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def provenance() -> dict[str, Any]:
    """Versions, source revision and machine, for a results file."""
    import attnfree

    return {
        "attnfree": attnfree.__version__,
        **source_revision(),
        "python": platform.python_version(),
        **{name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }

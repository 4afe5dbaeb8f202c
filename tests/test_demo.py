"""The main job runs anywhere: the demo recipe from a copy of the repository with no data bundle above it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_checkout(target: Path) -> Path:
    """The files of this checkout that a clone would have (tracked, or new and not ignored), copied to ``target``."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, target / name)
    return target


def test_the_demo_runs_from_a_clone_with_no_data_bundle_beside_it(tmp_path: Path) -> None:
    repo = _copy_checkout(tmp_path / "clone" / "attnfree")
    assert not any((p / "shared").exists() for p in repo.parents)
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNFREE_DATA", "ATTNFREE_MIRROR")}
    env |= {"PYTHONPATH": str(repo / "src"), "ATTNFREE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import attnfree; print(attnfree.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(repo / "src" / "attnfree" / "__init__.py")  # the copy, not this checkout
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "attnfree.demo", "--models", "fastformer,gpt2", "--max-steps", "3",
                           "--output-dir", str(out)], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fastformer |" in done.stdout and "| gpt2 |" in done.stdout
    assert "Tiny Shakespeare" in (out / "results.md").read_text()
    assert not (tmp_path / "cache" / "data").exists()  # nothing was fetched: the text ships with the package

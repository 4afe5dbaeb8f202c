"""The declared ranges, the floor that `make test-floor` installs, the lock that `make test` installs: in step."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("export", "serve", "edge", "triton", "eval", "mamba")  # the runtime extras; "dev" adds the test tools


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return reqs + [Requirement(r) for extra in EXTRAS for r in project["optional-dependencies"][extra]]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _lower_bound(req: Requirement) -> str:
    bounds = [s.version for s in req.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{req} needs exactly one lower bound (>=)"
    return bounds[0]


def test_the_floor_pins_every_lower_bound() -> None:
    floor = _pins(ROOT / "requirements" / "floor.txt")
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":  # installed first by the Makefile, from $(TORCH)
            makefile = (ROOT / "Makefile").read_text()
            pinned = re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M)
            assert pinned and Version(pinned[1]).release[:2] == Version(_lower_bound(req)).release[:2]
            continue
        assert name in floor and Version(floor[name]) == Version(_lower_bound(req)), f"{name}: floor vs {req}"


def test_the_lock_satisfies_the_ranges_and_leaves_torch_to_the_makefile() -> None:
    lock = _pins(ROOT / "requirements" / "lock.txt")
    assert "torch" not in lock
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name != "torch":
            assert name in lock and req.specifier.contains(lock[name], prereleases=True), f"{name} {lock.get(name)}"
    torch_pin = (ROOT / "requirements" / "torch.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", torch_pin, re.M)

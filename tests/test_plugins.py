"""A family that lives in another installed package reaches every command, the processes compare starts included:
through an ``attnfree.models`` entry point, or through ``attnfree --import MODULE`` (``$ATTNFREE_IMPORT``).

The package is built here: a pyproject and a module registering a toy family (a causal running mean on attnfree's
shell), installed with pip into a folder of its own (no network, no build isolation) and put on PYTHONPATH."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

FAMILY = '''
"""A causal running-mean family on attnfree's shell, registered as 'plugin-toy' when imported."""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn

from attnfree.layers.ffn import FeedForward
from attnfree.layers.sublayer import Sublayer
from attnfree.models.base import RecurrentConfig, RecurrentForCausalLM, RecurrentModel, SublayerBlock
from attnfree.models.registry import register_model


@strict
class PluginConfig(RecurrentConfig):
    model_type = "attnfree_plugin_toy"


class RunningMean(Sublayer):
    def __init__(self, C):
        super().__init__()
        self.norm, self.value, self.out = nn.LayerNorm(C), nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)

    def forward(self, x, ctx, state=None):
        v = self.value(self.norm(x))
        real = torch.ones_like(v[..., :1]) if ctx.mask is None else ctx.mask[..., None].to(v.dtype)
        start = state if state else self.init_state(x.shape[0], x.device, x.dtype)
        sums = start["sum"][:, None] + torch.cumsum(v * real, 1)
        counts = start["count"][:, None, None] + torch.cumsum(real, 1)
        if state is not None:
            state["sum"], state["count"] = sums[:, -1], counts[:, -1, 0]
        return self.out(sums / counts.clamp_min(1))

    def init_state(self, batch, device=None, dtype=torch.float32):
        C = self.value.in_features
        return {"sum": torch.zeros(batch, C, device=device, dtype=dtype),
                "count": torch.zeros(batch, device=device, dtype=dtype)}


class PluginBlock(SublayerBlock):
    def __init__(self, config):
        C = config.hidden_size
        super().__init__([("mean", RunningMean(C)), ("ffn", FeedForward(C, 2, "gelu", 0.0, 1e-5))])


class PluginModel(RecurrentModel):
    config_class = PluginConfig
    block_class = PluginBlock


class PluginForCausalLM(RecurrentForCausalLM):
    config_class = PluginConfig
    backbone_class = PluginModel


register_model("plugin-toy", PluginConfig, PluginForCausalLM)
'''

# a second module, not an entry point: found only through --import / $ATTNFREE_IMPORT
EXTRA = '''
from attnfree.models.registry import register_model
from attnfree_plugin_toy import PluginConfig, PluginForCausalLM

register_model("plugin-extra", PluginConfig, PluginForCausalLM)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "attnfree-plugin-toy"
version = "0.1.0"

[project.entry-points."attnfree.models"]
plugin-toy = "attnfree_plugin_toy"

[tool.setuptools]
py-modules = ["attnfree_plugin_toy", "attnfree_plugin_extra"]
'''

TINY = ["--hidden-size", "16", "--n-heads", "2", "--num-layers", "1", "--block-size", "16", "--batch-size", "2",
        "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The package, pip-installed into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "package"
    package.mkdir()
    (package / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (package / "attnfree_plugin_toy.py").write_text(FAMILY)
    (package / "attnfree_plugin_extra.py").write_text(EXTRA)
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
                           "--no-index", "--target", str(target), str(package)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(target.glob("attnfree_plugin_toy-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture(scope="module")
def env(site, data_dir, tmp_path_factory) -> dict[str, str]:
    src = Path(__file__).resolve().parents[1] / "src"
    path = [str(site), str(src), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "ATTNFREE_DATA": str(data_dir),
            "ATTNFREE_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def small_text(data_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    return str(path)


def attnfree(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "attnfree.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"attnfree {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_an_installed_family_trains_compares_recalls_and_serves(env, small_text, tmp_path):
    # the package is not importable from here: only the commands' processes see it
    assert "plugin-toy" not in __import__("attnfree.models.registry").models.registry.MODELS
    run = tmp_path / "run"
    attnfree(env, "train", "--model", "plugin-toy", "--data", small_text, *TINY, "--max-steps", "4",
             "--output-dir", str(run))
    assert json.loads((run / "run.json").read_text())["model"] == "plugin-toy"
    # compare: the entry point's family and an --import family, two seeds, every run in its own process
    cmp = tmp_path / "cmp"
    done = attnfree(env, "--import", "attnfree_plugin_extra", "compare", "--models", "plugin-toy,plugin-extra",
                    "--seeds", "1,2", "--baseline", "plugin-toy", "--data", small_text, *TINY, "--max-steps", "4",
                    "--sample-tokens", "4", "--output-dir", str(cmp))
    assert "| plugin-toy |" in done.stdout and "| plugin-extra |" in done.stdout
    assert len(list(cmp.glob("plugin-*/seed-*/run.json"))) == 4
    # recall, eval, generate, export on the family; serve it and ask for one completion
    recall = attnfree(env, "recall", "--models", "plugin-toy", "--seq-len", "16", "--n-pairs", "2", "--vocab-size",
                      "32", "--widths", "16", "--layers", "1", "--steps", "3")
    assert "plugin-toy" in recall.stdout
    assert "bpc" in attnfree(env, "eval", str(run), "--data", small_text, "--json").stdout
    attnfree(env, "generate", str(run), "--prompt", "KING:", "--max-new-tokens", "4", "--seed", "1")
    if all(__import__("importlib").util.find_spec(m) for m in ("onnxscript", "onnxruntime")):
        attnfree(env, "export", str(run), "--output", str(tmp_path / "onnx"))
        assert (tmp_path / "onnx" / "step.onnx").is_file()
    assert_serves(env, run)


def assert_serves(env: dict[str, str], run: Path) -> None:
    pytest.importorskip("fastapi")
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "attnfree.cli", "serve", str(run), "--port", str(port),
                               "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        body = {"model": "run", "prompt": "KING:", "max_tokens": 4}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_import_option_and_environment_reach_the_registry(tmp_path, monkeypatch, capsys):
    """In-process: --import registers a module's family and names it in $ATTNFREE_IMPORT for the processes compare
    starts; a family registered in a script cannot reach them and says so."""
    from attnfree.cli import _import_families, main
    from attnfree.models import registry

    module = tmp_path / "attnfree_import_probe.py"
    module.write_text("from attnfree.models.registry import MODELS, register_model\n"
                      "entry = MODELS['fastformer']\n"
                      "register_model('import-probe', entry.config_class, entry.build)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.IMPORT_ENV, "")
    _import_families(["attnfree_import_probe"])  # what main does with --import, before the command
    assert os.environ[registry.IMPORT_ENV] == "attnfree_import_probe"
    assert registry.MODELS["import-probe"].module == "attnfree_import_probe"
    assert registry.plugin_modules(["import-probe", "gpt2", "fastformer:kernel_size=4"]) == ["attnfree_import_probe"]
    registry.MODELS["script-probe"] = registry.ModelEntry(registry.MODELS["gpt2"].config_class,
                                                          registry.MODELS["gpt2"].build, module="__main__")
    try:
        with pytest.raises(ValueError, match="registered in a script"):
            registry.plugin_modules(["script-probe"])
    finally:
        del registry.MODELS["script-probe"], registry.MODELS["import-probe"]
    assert main(["--import", "no_such_module_here", "eval", str(tmp_path), "--data", "x"]) == 2
    assert "cannot import model module 'no_such_module_here'" in capsys.readouterr().err

"""Checkpoints load by path in an interpreter that never imported attnfree, as lm-eval and pipeline load them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.models.base import REMOTE_CODE_FILE
from attnfree.models.registry import MODELS, ModelSize, build_model

SIZE = ModelSize(hidden_size=32, n_heads=4, num_layers=2, n_positions=64)
PROMPT = "ROMEO:"

# Runs in a fresh interpreter: load each checkpoint the way HF tools do, report logits and a greedy pipeline text.
LOADER = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
assert "attnfree" not in sys.modules
report, prompt = {}, sys.argv[2]
for path in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].tolist()
    generator = pipeline("text-generation", model=path, trust_remote_code=True)
    text = generator(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    report[path] = {"class": type(model).__module__ + "." + type(model).__name__, "ids": ids[0].tolist(),
                    "logits": logits, "text": text}
print(json.dumps(report))
"""


def test_every_family_loads_by_path_without_importing_attnfree(tmp_path: Path) -> None:
    """attnfree's families (a family defined elsewhere loads the same way where its module is importable)."""
    tokenizer = ByteTokenizer()
    expected = {}
    for name in sorted(n for n, entry in MODELS.items() if entry.build.__module__.startswith(("attnfree.",
                                                                                          "transformers."))):
        torch.manual_seed(0)
        model = build_model(name, SIZE, tokenizer).eval()
        folder = tmp_path / name
        model.save_pretrained(folder)
        tokenizer.save(folder)
        with torch.no_grad():
            expected[str(folder)] = (type(model), model(torch.tensor([tokenizer.encode(PROMPT)])).logits[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(list(expected)), PROMPT], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for path, (cls, logits) in expected.items():
        got = report[path]
        assert got["class"] == f"{cls.__module__}.{cls.__name__}", path
        assert got["ids"] == tokenizer.encode(PROMPT), path
        assert torch.allclose(torch.tensor(got["logits"]), logits, atol=1e-5), path
        assert got["text"].startswith(PROMPT) and len(got["text"]) > len(PROMPT), path


@pytest.mark.parametrize("name", ["fastformer", "leviathan"])
def test_the_checkpoint_names_its_classes_in_auto_map(name: str, tmp_path: Path) -> None:
    model = build_model(name, SIZE, ByteTokenizer())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    cls, backbone = type(model), type(model.model)
    assert config["auto_map"] == {"AutoConfig": f"attnfree_remote.{type(model.config).__name__}",
                                  "AutoModel": f"attnfree_remote.{backbone.__name__}",
                                  "AutoModelForCausalLM": f"attnfree_remote.{cls.__name__}"}
    assert f"from {cls.__module__} import {cls.__name__}" in (tmp_path / REMOTE_CODE_FILE).read_text()

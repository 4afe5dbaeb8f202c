"""Checkpoints saved before the middle-floor change (one sublayer interface, nested states, the seed design as a
preset, options that lost their ablations removed) load and give the logits they gave then.

tests/models/legacy/ holds tiny checkpoints of every family and their logits on one padded batch, written by
``make_legacy.py`` with the code of commit 46921a5 (``PYTHONPATH=<that commit>/src python make_legacy.py DIR``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import attnfree  # noqa: F401  (registers the families)
from attnfree.testing import assert_close

LEGACY = Path(__file__).parent / "legacy"
LOADABLE = ["fastformer", "fastformer-conv", "fastformer-options", "fastformer-earlier-design", "leviathan",
            "leviathan-moe", "leviathan-ensemble"]


@pytest.mark.parametrize("name", LOADABLE)
def test_an_old_checkpoint_loads_and_gives_its_old_logits(name: str) -> None:
    saved = load_file(str(LEGACY / "logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(LEGACY / name).eval()
    with torch.no_grad():
        logits = model(saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    assert_close(name, logits, saved[name], rtol=1e-5)


def test_the_earlier_design_loads_as_the_seed_preset() -> None:
    model = AutoModelForCausalLM.from_pretrained(LEGACY / "fastformer-earlier-design")
    assert model.config.preset == "seed" and model.config.residual == "normed"
    assert not hasattr(model.config, "scale_logits")  # read, converted, not carried on


@pytest.mark.parametrize("name, field", [("removed-pool-head-size", "pool_head_size"),
                                         ("removed-leviathan-gate", "output_gate")])
def test_a_checkpoint_of_a_removed_option_is_refused_naming_it(name: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} was removed"):
        AutoModelForCausalLM.from_pretrained(LEGACY / name)

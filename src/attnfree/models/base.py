"""The shell every recurrent family shares: what a checkpoint needs to load anywhere, and the config checks.

Loadable by path, everywhere: ``save_pretrained`` writes ``auto_map`` into config.json and, beside the weights, a
small module (``attnfree_remote.py``) that imports the family's classes from the installed attnfree. So
``AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)`` works in an interpreter that never imported
attnfree (lm-evaluation-harness's ``--model hf``, ``pipeline(model=ckpt)``): the code that runs is the installed
package's, not a copy frozen into the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

REMOTE_CODE_FILE = "attnfree_remote.py"


def remote_code_module(classes: dict[str, type]) -> str:
    """The text of ``attnfree_remote.py``: imports of the given classes from where they are defined."""
    lines = ['"""Written by attnfree: this checkpoint\'s classes, imported from the installed attnfree package',
             "(pip install attnfree). transformers loads them from here with trust_remote_code=True.", '"""', ""]
    for cls in dict.fromkeys(classes.values()):
        lines.append(f"from {cls.__module__} import {cls.__name__}  # noqa: F401")
    return "\n".join(lines) + "\n"


def auto_map(classes: dict[str, type]) -> dict[str, str]:
    """``{"AutoConfig": "attnfree_remote.XConfig", ...}`` for config.json."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {auto: f"{module}.{cls.__name__}" for auto, cls in classes.items()}


class RecurrentPreTrainedModel(PreTrainedModel):
    """Base of every attnfree model class: config checks at construction, checkpoints loadable by path."""

    config_class: type[PreTrainedConfig]

    def __init__(self, config: PreTrainedConfig, *args: Any, **kwargs: Any):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got a {type(config).__name__}")
        validate = getattr(config, "validate_fields", None)
        if validate is not None:  # again: a field may have been assigned after the config was built
            validate()
        super().__init__(config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The one place where initialisation lives: N(0, initializer_range) linear and embedding weights, zero
        biases and padding embedding, unit LayerNorms. A family extends it for its own modules (super() first).

        Through ``transformers.initialization``, which leaves alone the tensors a checkpoint has just filled.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
            # (the slice loses the loaded flag: check it here, as transformers' own models do)
            if (isinstance(module, nn.Embedding) and module.padding_idx is not None
                    and not getattr(module.weight, "_is_hf_initialized", False)):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def auto_classes(self) -> dict[str, type]:
        """The classes transformers' Auto classes should build for this checkpoint."""
        classes: dict[str, type] = {"AutoConfig": type(self.config)}
        backbone = getattr(self, self.base_model_prefix, None)
        if isinstance(self, GenerationMixin):  # a causal LM: its backbone loads as AutoModel
            classes["AutoModelForCausalLM"] = type(self)
            if isinstance(backbone, PreTrainedModel):
                classes["AutoModel"] = type(backbone)
        else:
            classes["AutoModel"] = type(self)
        return classes

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``PreTrainedModel.save_pretrained``, plus ``auto_map`` and ``attnfree_remote.py`` (module docstring)."""
        classes = self.auto_classes()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        config_file = folder / "config.json"
        if config_file.is_file():  # (not written on processes other than the main one)
            config = json.loads(config_file.read_text())
            config["auto_map"] = auto_map(classes)
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (folder / REMOTE_CODE_FILE).write_text(remote_code_module(classes))
        return result

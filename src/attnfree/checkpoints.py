"""A trained run on disk: the model (any registered family) and its tokenizer, and the run's settings.

Used by everything above the models that starts from a run folder (evaluation, generation, export, serving), so
none of them needs the training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from attnfree.data import TextTokenizer, load_saved_tokenizer

RUN_FILE = "run.json"  # what ``attnfree train`` leaves in a run folder (attnfree.training.RunResult)


def _tokenizer_folder(checkpoint: Path) -> Path:
    for folder in (checkpoint, checkpoint.parent):
        if (folder / "attnfree_tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    raise FileNotFoundError(f"no saved tokenizer in {checkpoint} or its parent")


def load_checkpoint(path: str | Path, device: str | torch.device | None = None
                    ) -> tuple[PreTrainedModel, TextTokenizer]:
    """A trained model (any registered family, through ``AutoModelForCausalLM``) and its tokenizer, from a
    run folder or one of its ``checkpoint-N`` folders. The model is in eval mode."""
    from transformers import AutoModelForCausalLM

    import attnfree  # noqa: F401  (registers our model classes with the Auto classes)
    from attnfree.models.registry import load_plugins

    load_plugins()  # families registered outside attnfree (entry points, $ATTNFREE_IMPORT)

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint (config.json) in {folder}")
    tokenizer = load_saved_tokenizer(_tokenizer_folder(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    if device is not None:
        cast(Any, model).to(device)
    return model.eval(), tokenizer


def run_settings(path: str | Path) -> dict[str, Any] | None:
    """The training settings recorded in the run folder's run.json; for a ``checkpoint-N`` folder, its run's (None
    without one: a run still training has written none yet)."""
    folder = Path(path)
    runs = [folder / RUN_FILE] + ([folder.parent / RUN_FILE] if folder.name.startswith("checkpoint-") else [])
    run = next((r for r in runs if r.is_file()), None)
    return dict(json.loads(run.read_text())["settings"]) if run is not None else None

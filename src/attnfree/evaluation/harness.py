"""lm-evaluation-harness on our checkpoints: a local task that scores a text file the way ``attnfree eval`` does.

Every checkpoint loads in the harness's ``--model hf`` (config.json carries ``auto_map``, see ``models.base``):

    lm_eval --model hf --model_args pretrained=RUN_DIR,trust_remote_code=True --device cpu \\
            --tasks attnfree_text --include_path TASK_DIR

``write_text_task(text, TASK_DIR)`` writes such a task: the whole text as one document, scored with
``loglikelihood_rolling``. The harness cuts a document into windows of the model's ``n_positions`` tokens, each
conditioned on one token before it, the first on the BOS token: exactly ``attnfree eval``'s non-overlapping blocks
with BOS prepended (block size = n_positions). So its ``bits_per_byte`` equals our bits per character on ASCII text
(one byte per character), which tests/evaluation/test_harness.py checks with the real ``lm_eval``.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
  - metric: word_perplexity
metadata:
  version: 1.0
"""


def write_text_task(text: str, folder: str | Path, name: str = "attnfree_text") -> Path:
    """Write an lm-eval task named ``name`` scoring ``text`` (one document) into ``folder``; returns the YAML."""
    if not text:
        raise ValueError("the task's text is empty")
    if not name.isidentifier():
        raise ValueError(f"task name {name!r} must be an identifier (letters, digits, underscores)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    yaml = out / f"{name}.yaml"
    yaml.write_text(TASK_TEMPLATE.format(name=name, data=data.resolve()), encoding="utf-8")
    return yaml

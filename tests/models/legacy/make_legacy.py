"""Save tiny checkpoints with the code of the commit before the middle-floor change, and their logits."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from attnfree.data import ByteTokenizer
from attnfree.models.registry import ModelSize, build_model
from attnfree.testing import perturb

out = Path(sys.argv[1])
TOK = ByteTokenizer()
SIZE = ModelSize(hidden_size=16, n_heads=2, num_layers=2, n_positions=32)
CASES = {
    "fastformer": ("fastformer", {}),
    "fastformer-conv": ("fastformer-conv", {}),
    "fastformer-options": ("fastformer", {"bonus": True, "token_shift": True, "ffn_type": "channel_mix",
                                          "decay": "fixed"}),
    "fastformer-earlier-design": ("fastformer", {"residual": "normed", "decay": "none", "scale_logits": True,
                                                 "position_embedding_type": "learned"}),
    "leviathan": ("leviathan", {"dense_lags": 4, "segment": 2}),
    "leviathan-moe": ("leviathan-moe", {"dense_lags": 4, "n_experts": 3}),
    "leviathan-ensemble": ("leviathan-ensemble", {"dense_lags": 4, "n_modules": 1, "members_per_module": 2,
                                                  "interaction_heads": 2}),
    # options removed by the change: must be refused with a clear error
    "removed-pool-head-size": ("fastformer", {"pool_head_size": 1}),
    "removed-leviathan-gate": ("leviathan", {"dense_lags": 4, "output_gate": True}),
}
ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
mask = torch.ones(2, 12, dtype=torch.long)
mask[1, :3] = 0
tensors = {"input_ids": ids, "attention_mask": mask}
for name, (family, overrides) in CASES.items():
    torch.manual_seed(0)
    model = perturb(build_model(family, SIZE, TOK, overrides), std=0.2).eval()
    model.save_pretrained(out / name)
    with torch.no_grad():
        tensors[name] = model(ids, attention_mask=mask).logits.contiguous()
save_file(tensors, str(out / "logits.safetensors"))
print("saved", sorted(CASES))

"""attnfree: attention-free causal language models (causal Fastformer, Leviathan), HuggingFace-native.

Importing the package registers every model family (``attnfree.models.registry``) and, through it, with
AutoConfig / AutoModel / AutoModelForCausalLM.
On a machine without torch (an edge device with only numpy + onnxruntime) the package still imports, with
none of the models, so that ``attnfree.inference.runtime`` and ``attnfree serve EXPORT_DIR`` run exported graphs
there (see ``attnfree export``); ``ATTNFREE_NO_TORCH=1`` does the same where torch is installed.
"""

import os

NO_TORCH_ENV = "ATTNFREE_NO_TORCH"  # "1": import without torch even where it is installed (an edge server)

try:
    if os.environ.get(NO_TORCH_ENV, "") not in ("", "0"):
        raise ImportError(f"${NO_TORCH_ENV} is set")
    import torch  # noqa: F401  (everything but the runtime and serving an export needs it)

    HAS_TORCH = True
except ImportError:
    HAS_TORCH = False

if HAS_TORCH:
    from attnfree.models import registry  # noqa: F401  (registers every family, and the Auto classes)
    from attnfree.models.cache import RecurrentCache
    from attnfree.models.fastformer import (
        FastformerConfig,
        FastformerForCausalLM,
        FastformerLMConfig,
        FastformerModel,
    )
    from attnfree.models.leviathan import (
        LeviathanConfig,
        LeviathanEnsembleConfig,
        LeviathanEnsembleForCausalLM,
        LeviathanForCausalLM,
        LeviathanModel,
        LeviathanMoEConfig,
        LeviathanMoEForCausalLM,
    )

__version__ = "0.1.0"

__all__ = [
    "FastformerConfig",
    "FastformerForCausalLM",
    "FastformerLMConfig",
    "FastformerModel",
    "LeviathanConfig",
    "LeviathanEnsembleConfig",
    "LeviathanEnsembleForCausalLM",
    "LeviathanForCausalLM",
    "LeviathanModel",
    "LeviathanMoEConfig",
    "LeviathanMoEForCausalLM",
    "RecurrentCache",
    "__version__",
]

"""attnfree: attention-free causal language models (causal Fastformer, Leviathan), HuggingFace-native.

Importing the package registers every model family (``attnfree.models.registry``) and, through it, with
AutoConfig / AutoModel / AutoModelForCausalLM.
On a machine without torch (an edge device with only numpy + onnxruntime) the package still imports, with
none of the models, so that ``attnfree.inference.runtime`` runs exported graphs there (see ``attnfree export``).
"""

try:
    import torch  # noqa: F401  (everything but attnfree.inference.runtime needs it)

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

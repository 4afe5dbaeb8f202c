"""attnfree: attention-free causal language models (causal Fastformer, Leviathan), HuggingFace-native.

Importing the package registers every model family with AutoConfig / AutoModel / AutoModelForCausalLM.
"""

from attnfree.cache import RecurrentCache
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

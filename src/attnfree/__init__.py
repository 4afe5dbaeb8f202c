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

__version__ = "0.1.0"

__all__ = [
    "FastformerConfig",
    "FastformerForCausalLM",
    "FastformerLMConfig",
    "FastformerModel",
    "RecurrentCache",
    "__version__",
]

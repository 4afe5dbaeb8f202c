"""Written by attnfree: this checkpoint's classes, imported from the installed attnfree package
(pip install attnfree). transformers loads them from here with trust_remote_code=True.
"""

from attnfree.models.fastformer.configuration_fastformer import FastformerConfig  # noqa: F401
from attnfree.models.fastformer.modeling_fastformer import (
    FastformerForCausalLM,  # noqa: F401
    FastformerModel,  # noqa: F401
)

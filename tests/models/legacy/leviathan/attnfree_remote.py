"""Written by attnfree: this checkpoint's classes, imported from the installed attnfree package
(pip install attnfree). transformers loads them from here with trust_remote_code=True.
"""

from attnfree.models.leviathan.configuration_leviathan import LeviathanConfig  # noqa: F401
from attnfree.models.leviathan.modeling_leviathan import (
    LeviathanForCausalLM,  # noqa: F401
    LeviathanModel,  # noqa: F401
)

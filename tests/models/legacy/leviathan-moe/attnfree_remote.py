"""Written by attnfree: this checkpoint's classes, imported from the installed attnfree package
(pip install attnfree). transformers loads them from here with trust_remote_code=True.
"""

from attnfree.models.leviathan.configuration_leviathan import LeviathanMoEConfig  # noqa: F401
from attnfree.models.leviathan.modeling_leviathan import (
    LeviathanMoEForCausalLM,  # noqa: F401
    LeviathanMoEModel,  # noqa: F401
)

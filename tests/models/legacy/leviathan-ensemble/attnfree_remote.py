"""Written by attnfree: this checkpoint's classes, imported from the installed attnfree package
(pip install attnfree). transformers loads them from here with trust_remote_code=True.
"""

from attnfree.models.leviathan.configuration_leviathan import LeviathanEnsembleConfig  # noqa: F401
from attnfree.models.leviathan.modeling_leviathan import (
    LeviathanEnsembleForCausalLM,  # noqa: F401
    LeviathanEnsembleModel,  # noqa: F401
)

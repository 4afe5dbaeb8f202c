"""Pure tensor functions (no nn.Module, no config): the token mixers and their references."""

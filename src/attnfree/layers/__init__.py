"""nn.Modules: one token mixer per file, plus the feed-forward block."""

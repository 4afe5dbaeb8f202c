"""Model families: HuggingFace configuration + modeling files, registered with the Auto classes."""

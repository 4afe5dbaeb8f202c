"""Inference: sampling (one torch sampler), decoding (the lean loop and ``generate_text``), ONNX export, the
torch-free runtime and the server. Nothing here imports the training code; this package's ``__init__`` imports
nothing at all, so that ``attnfree.inference.runtime`` runs on a machine without torch."""

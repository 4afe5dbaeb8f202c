"""Serving: a continuous-batching generation engine and a FastAPI app around it (``attnfree serve``).

``engine`` runs a model through a backend (``backend.py``: torch, or an ONNX export without torch); ``app``
(``create_app``) needs fastapi, and running it needs uvicorn: install the
``serve`` extra.
"""

from attnfree.inference.serve.engine import Engine, EngineFull, GenerationRequest, IncrementalDecoder, RequestError

__all__ = ["Engine", "EngineFull", "GenerationRequest", "IncrementalDecoder", "RequestError"]

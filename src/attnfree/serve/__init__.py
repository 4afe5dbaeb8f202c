"""Serving: a continuous-batching generation engine and a FastAPI app around it (``attnfree serve``).

``attnfree.serve.engine`` needs only torch; ``attnfree.serve.app`` (``create_app``) needs fastapi, and
running it needs uvicorn: install the ``serve`` extra.
"""

from attnfree.serve.engine import Engine, EngineFull, GenerationRequest, IncrementalDecoder, RequestError

__all__ = ["Engine", "EngineFull", "GenerationRequest", "IncrementalDecoder", "RequestError"]

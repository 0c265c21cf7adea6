"""The OpenAI-compatible server (`realm-jax serve`) and its continuous-batching engine.

`Engine` needs only JAX; `realm_jax.serve.server` needs the `serve` extra (FastAPI, uvicorn).
"""

from realm_jax.serve.engine import Engine, EngineStoppedError, Event, QueueFullError, Request, RequestParams

__all__ = ["Engine", "EngineStoppedError", "Event", "QueueFullError", "Request", "RequestParams"]

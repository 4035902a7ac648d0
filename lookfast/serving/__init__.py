"""Serving: `Engine` (stage-level continuous batching for multi-exit and ragged-k models, engine.py) and the HTTP
server (`python -m lookfast serve`, server.py; needs the `serve` extra: fastapi, uvicorn, python-multipart, pillow,
imported only when the server starts)."""
from .engine import Engine, Prediction

__all__ = ["Engine", "Prediction"]

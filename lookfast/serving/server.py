"""The HTTP server of `python -m lookfast serve`: FastAPI + uvicorn around an `Engine` (the `serve` extra:
`pip install 'lookfast[serve]'`; nothing here is imported by `import lookfast`).

    POST /v1/predict   multipart form, field "file": a PNG/JPEG image. It is decoded and transformed as the model's
                       official evaluation transform (lookfast.images), submitted to the engine, and answered with
                       JSON: {"top5": [{"class": int, "probability": float}, ...], "exit_index": int, "k": int|null,
                       "latency_ms": {"engine": float, "total": float}, "model": str} (a "seg" LookWhere answers
                       "mask": the (G, G) argmax class ids instead of "top5"). A malformed upload gets a 4xx with
                       {"error": "..."}; the server keeps serving.
    GET  /healthz      {"status": "ok" | "draining", "model": ..., "random_weights": bool, "dtype": "float32" |
                       "bfloat16" | "float16" (the model's precision), "in_flight": int, "engine": Engine.stats()}.
Whatever the model's dtype, probabilities are computed from the logits converted to float32 and answered as JSON
numbers, as in float32.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections and waits for the requests in flight; then the engine is
closed, which finishes everything it was given.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import torch

from ..images import EvalTransform, ImageDecodeError, decode_image
from .engine import Engine

try:
    from fastapi import FastAPI, File, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - exercised by the CLI's message
    raise ImportError("the lookfast server needs the 'serve' extra: pip install 'lookfast[serve]' "
                      "(fastapi, uvicorn, python-multipart, pillow)") from exc

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _answer(pred, name: str, t_start: float) -> dict:
    out = {"model": name, "exit_index": pred.exit_index, "k": pred.k}
    logits = pred.logits.float()  # bf16/fp16 models: softmax / argmax in float32, answers typed as in float32
    if logits.dim() == 1:
        probs = torch.softmax(logits, 0)
        top = torch.topk(probs, min(5, probs.shape[0]))
        out["top5"] = [{"class": int(c), "probability": float(p)} for p, c in zip(top.values, top.indices)]
    else:  # (C, G, G) segmentation logits
        out["mask"] = logits.argmax(0).tolist()
    out["latency_ms"] = {"engine": pred.latency_s * 1e3, "total": (time.perf_counter() - t_start) * 1e3}
    return out


def create_app(engine: Engine, transform: EvalTransform, model_name: str, random_weights: bool = False,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI application serving `engine`. Images are decoded with `transform` (lookfast.images); the engine
    is closed (drained) when the application shuts down."""
    state = {"in_flight": 0, "draining": False}
    dtype = str(engine.dtype).removeprefix("torch.")  # the model's precision (Engine: its parameters' dtype)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state["draining"] = True
        await run_in_threadpool(engine.close)  # finishes whatever was submitted

    app = FastAPI(title="lookfast", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # a missing or misnamed form field: JSON 422 in the same {"error"} shape
        return _error(422, f"invalid request: send the image as multipart form field 'file' ({exc.errors()[:1]})")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/healthz")
    async def healthz():
        return {"status": "draining" if state["draining"] or engine.closed else "ok", "model": model_name,
                "random_weights": random_weights, "dtype": dtype, "in_flight": state["in_flight"],
                "engine": engine.stats()}

    @app.post("/v1/predict")
    async def predict(file: UploadFile = File(...)):
        t_start = time.perf_counter()
        state["in_flight"] += 1
        try:
            data = await file.read(max_upload_bytes + 1)
            if not data:
                return _error(400, "the uploaded file is empty")
            if len(data) > max_upload_bytes:
                return _error(413, f"the uploaded file is larger than {max_upload_bytes} bytes")
            try:
                image = await run_in_threadpool(decode_image, data, transform)
            except ImageDecodeError as exc:
                return _error(400, f"cannot decode the uploaded image ({file.filename!r}): {exc}")
            try:
                future = engine.submit(image)
            except RuntimeError:
                return _error(503, "the server is shutting down")
            try:
                pred = await asyncio.wrap_future(future)
            except (ValueError, TypeError) as exc:
                return _error(400, f"the image was refused: {exc}")
            except Exception as exc:  # noqa: BLE001  (a model failure for this request only)
                return _error(500, f"the model failed on this image: {type(exc).__name__}: {exc}")
            body = _answer(pred, model_name, t_start)
            if random_weights:
                body["warning"] = "random weights: predictions are meaningless"
            return body
        finally:
            state["in_flight"] -= 1

    return app


def serve(app: FastAPI, engine: Engine, host: str, port: int, log_level: str = "info",
          graceful_timeout_s: float | None = None) -> None:
    """Run `app` with uvicorn until SIGINT/SIGTERM, then drain: the engine stops waiting for fuller batches, uvicorn
    stops accepting connections and waits for the requests in flight (at most `graceful_timeout_s` when given), and
    the app's shutdown closes the engine."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_waiting()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout_s)
    _Server(config).run()

"""Every error is JSON with a `detail` string that says what was wrong.

Client mistakes get 4xx (413 too large, 415 unsupported, 400/422 malformed); overload and
start-up get 503 with Retry-After; nothing a client sends produces a 5xx.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.classifier import NotReady
from app.inference.batcher import InferenceError, Overloaded
from app.preprocessing import ImageError

log = logging.getLogger(__name__)

UPLOAD_HINT = (
    "send multipart/form-data with the image in the field 'file' (or 'files' for /predict/batch)"
)


def _reject(request: Request, reason: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.record_rejection(reason)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    content_type = request.headers.get("content-type", "")
    if request.url.path.startswith("/predict") and not content_type.startswith(
        "multipart/form-data"
    ):
        _reject(request, "unsupported_content_type")
        return JSONResponse(
            {"detail": f"unsupported content type {content_type or '(none)'!r}: {UPLOAD_HINT}"},
            status_code=415,
        )
    _reject(request, "malformed_request")
    return JSONResponse(
        {
            "detail": f"{_describe(exc)} ({UPLOAD_HINT})",
            "errors": [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                for e in exc.errors()
            ],
        },
        status_code=422,
    )


async def image_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    _reject(request, exc.kind)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def overloaded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Overloaded)
    _reject(request, exc.reason)
    return JSONResponse(
        {"detail": f"overloaded: {exc.detail}; retry shortly"},
        status_code=503,
        headers={"Retry-After": str(exc.retry_after)},
    )


async def not_ready(request: Request, exc: Exception) -> JSONResponse:
    _reject(request, "not_ready")
    return JSONResponse(
        {"detail": f"not ready: {exc}"}, status_code=503, headers={"Retry-After": "1"}
    )


async def inference_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=500)


async def unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ImageError, image_error)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(NotReady, not_ready)
    app.add_exception_handler(InferenceError, inference_error)
    app.add_exception_handler(Exception, unhandled)

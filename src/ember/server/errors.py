"""Error bodies shaped like vLLM's (`{"error": {message, type, param, code}}`) and their handlers."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ember.server")

# vLLM's `type` strings, by status code.
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error the server reports to the client as is.

    Args:
        message: shown to the client; must not carry internals (paths, tracebacks).
        status_code: the HTTP status.
        param: the request field at fault, if any.
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.status_code, self.param)


def error_body(message: str, status_code: int, param: str | None = None) -> dict:
    err_type = _ERROR_TYPES.get(status_code) or HTTPStatus(status_code).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status_code}}


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the error a client may see: ValueError -> 400, else a bare 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError(str(exc), 400, getattr(exc, "param", None))
    if isinstance(exc, NotImplementedError):
        return APIError(str(exc) or "not supported", 501)
    logger.error("internal error", exc_info=exc)
    return APIError("Internal server error", 500)


def error_response(exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def sse_error(exc: BaseException) -> str:
    """The `data:` event sent when a stream fails after its first chunk."""
    return f"data: {json.dumps(to_api_error(exc).body())}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request", param


def install_exception_handlers(app: FastAPI) -> None:
    """FastAPI's 422 becomes vLLM's 400; HTTP errors and crashes get the same body shape."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(message, 400, param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(APIError(detail, exc.status_code, headers=dict(exc.headers or {})))

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ValueError)
    async def _on_value_error(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _on_crash(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

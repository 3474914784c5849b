"""Error bodies shaped like vLLM's (`{"error": {message, type, param, code}}`) and their handlers."""

from __future__ import annotations

import json
import logging
import re
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


# pydantic names the member of a union it tried ("str", "list[constrained-int]", ...) in an error's location;
# those are types, not fields, and are left out of the message.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\-]")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message for up to five validation errors, and the top-level field at fault (vLLM's `param`).

    Errors raised by model validators have no location; they carry their field in `ctx["param"]`."""
    parts: list[str] = []
    param = None
    for err in exc.errors()[:5]:
        loc = [str(p)[:64] for p in err.get("loc", ()) if p != "body"]
        loc = [p for p in loc if not _UNION_MEMBER.search(p)]
        ctx = err.get("ctx") or {}
        param = param or (loc[0] if loc else ctx.get("param") if isinstance(ctx, dict) else None)
        message = err.get("msg", "invalid value")
        part = f"{'.'.join(loc)}: {message}" if loc else message
        if part not in parts:
            parts.append(part)
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

"""OpenAI error objects, and the one place where an error becomes an HTTP status."""

from __future__ import annotations

import logging
from typing import Any

import falcon
import falcon.asgi

from actors import (
    ActorStopped,
    ContextOverflow,
    EngineFailed,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
    PeerUnavailable,
    RequestError,
    RequestTooLarge,
    Unauthorized,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error found by the gateway itself (bad JSON, bad parameter, size, auth)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type=type, param=param, code=code)
        self.headers: dict[str, str] = {}


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# RequestError subclass -> (HTTP status, OpenAI error type)
_STATUS: dict[type[RequestError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    RequestTooLarge: (413, "invalid_request_error"),
    ContextOverflow: (400, "invalid_request_error"),
    ModelNotFound: (404, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    EngineFailed: (503, "server_error"),
    NotReady: (503, "server_error"),
    PeerUnavailable: (503, "server_error"),
    Unauthorized: (401, "invalid_request_error"),
    InternalError: (500, "server_error"),
}


def to_api_error(err: Exception) -> ApiError:
    """Translate a node error into the HTTP error a client sees."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ActorStopped):
        return ApiError(503, f"the node is stopping: {err}", type="server_error", code="node_stopping")
    if isinstance(err, RequestError):
        status, kind = _STATUS.get(type(err), (500, "server_error"))
        param = err.details.get("param")
        api = ApiError(status, err.message, type=kind, param=param, code=err.code)
        extra = {k: v for k, v in err.details.items() if k not in ("param", "retry_after")}
        api.body["error"].update(extra)
        if "retry_after" in err.details:
            api.headers["Retry-After"] = str(err.details["retry_after"])
        return api
    log.error("internal error answering a request", exc_info=err)
    return ApiError(
        500, f"internal error: {type(err).__name__}: {err}", type="server_error", code="internal_error"
    )


async def handle_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, err: Exception, params: dict[str, Any]
) -> None:
    """Falcon error handler: every error leaves as an OpenAI error object."""
    if isinstance(err, falcon.HTTPError):
        status = err.status_code
        message = err.description or err.title or "error"
        if status == 404:
            message = f"Unknown request URL: {req.method} {req.path}"
        api = ApiError(status, message, code=str(err.title).lower().replace(" ", "_") if err.title else None)
        api.headers.update(err.headers or {})  # e.g. `Allow` on a 405
    else:
        api = to_api_error(err)
    resp.status = api.status
    if req.path.startswith("/v1/messages"):  # Anthropic's clients read Anthropic's error shape
        from gateway.http._dialects import anthropic_error

        resp.media = anthropic_error(api)
    else:
        resp.media = api.body
    for name, value in api.headers.items():
        resp.set_header(name, value)

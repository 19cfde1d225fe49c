"""The node's error tree: every failure that crosses an actor or process boundary has a name here.

MeshError
├── ProtocolError        bytes from the network (or a pipe) that do not decode
├── ActorStartError      an actor failed in setup (bind error, bad config)
├── ActorStopped         the actor holding a request stopped before answering
└── RequestError         a request failed; carried across actors as an `ErrorReply`
    ├── InvalidRequest       the request is malformed for the engine (400)
    │   └── RequestTooLarge  it does not fit one frame to the router (413)
    ├── ContextOverflow      prompt + completion do not fit the context (400)
    ├── ModelNotFound        no worker on this node serves the model (404)
    ├── Overloaded           the model's queue is full (429, with retry-after)
    ├── EngineFailed         the llama.cpp child died or errored (503)
    ├── NotReady             the model is still loading (503)
    ├── PeerUnavailable      the router could not be reached in time (503)
    ├── Unauthorized         a request from the network without a valid API key (401)
    └── InternalError        a bug met while handling the request: it ended it (500)
"""

from __future__ import annotations

from typing import Any, ClassVar


class MeshError(Exception):
    """Base of every mesh-llm error."""


class ProtocolError(MeshError):
    """A frame could not be decoded into a known message."""


class ActorStartError(MeshError):
    """An actor's setup failed; raised to whoever called `start()`."""


class ActorStopped(MeshError):
    """The actor stopped while a request was pending."""


class RequestError(MeshError):
    """A request failed. `code` names the kind on the wire; `details` carries extra fields."""

    code: ClassVar[str] = "request_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(RequestError):
    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    code = "request_too_large"


class ContextOverflow(RequestError):
    code = "context_length_exceeded"


class ModelNotFound(RequestError):
    code = "model_not_found"


class Overloaded(RequestError):
    code = "overloaded"


class EngineFailed(RequestError):
    code = "engine_failed"


class NotReady(RequestError):
    code = "not_ready"


class PeerUnavailable(RequestError):
    code = "peer_unavailable"


class Unauthorized(RequestError):
    code = "invalid_api_key"


class InternalError(RequestError):
    code = "internal_error"


_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        RequestTooLarge,
        ContextOverflow,
        ModelNotFound,
        Overloaded,
        EngineFailed,
        NotReady,
        PeerUnavailable,
        Unauthorized,
        InternalError,
    )
}


def request_error(code: str, message: str, details: dict[str, Any] | None = None) -> RequestError:
    """Rebuild the typed error named by `code` (an unknown code gives a plain RequestError)."""
    cls = _BY_CODE.get(code, RequestError)
    return cls(message, **(details or {}))

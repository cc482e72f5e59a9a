"""JSON error answers: every failure a client can cause gets one, never a bare 500."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiohttp import web, web_protocol

from node.kv import StorageFailed
from node.schema import FieldError
from node.writer import Overloaded, Rejected

logger = logging.getLogger(__name__)

BODY_BYTES_MAX = web.AppKey("body_bytes_max", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]  # what a route runs

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def fail(status: int, code: str, message: str, **extra: Any) -> NoReturn:
    raise ApiError(status, code, message, **extra)


def error_body(code: str, message: str, **extra: Any) -> str:
    """An error's JSON: ``{"error": code, "message": ...}`` (and any detail)."""
    return json.dumps({"error": code, "message": message, **extra})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.Response(
        status=status,
        text=error_body(code, message, **extra),
        content_type="application/json",
        headers=headers,
    )


# What a client whose write the storage refused is told to wait before it tries again.
STORAGE_RETRY_AFTER_S = 5


def storage_refusal(exc: StorageFailed) -> tuple[int, str, str]:
    """The status, code and message of a write the storage refused (``StorageFailed``):
    507 if the file could not grow, else 503. Nothing of it was written."""
    if exc.fatal:
        return (
            503,
            "storage_failed",
            f"this node's storage failed ({exc}): nothing of the request was written; the "
            "node stops, to be started again",
        )
    if exc.full:
        why = "its storage is full"
        status, code = 507, "storage_full"
    else:
        why = "its storage refused the commit"
        status, code = 503, "storage_failed"
    message = (
        f"this node cannot write now: {why} ({exc}); nothing of the request was written. "
        "Reads go on, and writes do again once the storage takes them"
    )
    return status, code, message


def as_json_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON answer to what a handler raised; an HTTP redirect is raised again."""
    if isinstance(exc, ApiError | Rejected):
        retry = {"Retry-After": "1"} if exc.status == 503 else None  # overloaded, stopping
        return error_response(exc.status, exc.code, exc.message, retry, **exc.extra)
    if isinstance(exc, FieldError):
        if exc.field is None:
            return error_response(exc.status, exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message, field=exc.field)
    if isinstance(exc, web.RequestPayloadError):  # e.g. a body that is not the gzip it claims
        reason = getattr(exc.__cause__, "message", None) or " ".join(str(exc).split())
        return error_response(400, "bad_payload", f"the body cannot be read: {reason}")
    if isinstance(exc, Overloaded):
        return error_response(
            503, "overloaded", "the write queue is full; retry shortly", {"Retry-After": "1"}
        )
    if isinstance(exc, StorageFailed):
        status, code, message = storage_refusal(exc)
        return error_response(status, code, message, {"Retry-After": str(STORAGE_RETRY_AFTER_S)})
    if isinstance(exc, ConnectionResetError):  # aiohttp's ClientConnectionResetError too
        # The client went away before its body was read (or its answer written): nothing
        # of it was written, and no one is left to answer; not an error of the node's.
        logger.info("%s %s: the client closed the connection first", request.method, request.path)
        return error_response(400, "connection_closed", "the connection closed mid-request")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code = _CODES.get(exc.status, "http_error")
        message = (
            exc.reason
            if exc.status != 413
            else f"the body exceeds {request.app[BODY_BYTES_MAX]} bytes"
        )
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, message, headers)
    logger.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "internal error")


UNPARSABLE_MESSAGE_CHARS_MAX = 200


def _unparsable_as_json(
    handler: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """``RequestHandler.handle_error`` for what aiohttp's parser refuses (a header with a
    NUL byte, a URL past its line limit, a malformed chunk or length), which no route
    or guard sees: the JSON error every other refusal gets, logged on one line. Errors
    of the server itself (5xx) are left to aiohttp."""
    if status >= 500:
        return _AIOHTTP_HANDLE_ERROR(handler, request, status, exc, message)
    reason = " ".join(str(message or exc or "").split())[:UNPARSABLE_MESSAGE_CHARS_MAX]
    logger.info("refused a request that cannot be parsed (%d): %s", status, reason)
    if request.writer.output_size > 0:  # as aiohttp's: nothing more can be sent
        raise ConnectionError("a response was sent already")
    code = _CODES.get(status, "bad_request")
    response = error_response(status, code, f"the request cannot be parsed: {reason}")
    if _token_text is not None:  # as every answer carries it
        response.headers["X-Consistency-Token"] = _token_text()
    response.force_close()
    return response


_AIOHTTP_HANDLE_ERROR = web_protocol.RequestHandler.handle_error
_token_text: Callable[[], str] | None = None  # the node's consistency token, now


def answer_unparsable_requests_as_json(token_text: Callable[[], str] | None = None) -> None:
    """Make aiohttp answer a request its parser refuses as ``_unparsable_as_json`` does,
    with the node's consistency token (``token_text``) as every other answer.

    aiohttp has no setting for it, and creates its request handlers itself: its method
    is replaced, once, in the serving process (``node.server.serve``)."""
    global _token_text
    _token_text = token_text
    web_protocol.RequestHandler.handle_error = _unparsable_as_json  # type: ignore[method-assign,assignment]

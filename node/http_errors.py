"""JSON error answers: every failure a client can cause gets one, never a bare 500."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiohttp import web

from node.schema import FieldError
from node.writer import Overloaded, Rejected

logger = logging.getLogger(__name__)

BODY_BYTES_MAX = web.AppKey("body_bytes_max", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

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


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"error": code, "message": message, **extra}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message, **e.extra)
    except Rejected as e:
        return error_response(e.status, e.code, e.message, **e.extra)
    except FieldError as e:
        if e.field is None:
            return error_response(e.status, e.code, e.message)
        return error_response(e.status, e.code, e.message, field=e.field)
    except web.RequestPayloadError as e:  # e.g. a body that is not the gzip it claims
        reason = getattr(e.__cause__, "message", None) or " ".join(str(e).split())
        return error_response(400, "bad_payload", f"the body cannot be read: {reason}")
    except Overloaded:
        return error_response(
            503, "overloaded", "the write queue is full; retry shortly", {"Retry-After": "1"}
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _CODES.get(e.status, "http_error")
        message = (
            e.reason if e.status != 413 else f"the body exceeds {request.app[BODY_BYTES_MAX]} bytes"
        )
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(e.status, code, message, headers)
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error")

"""Every error chatproxy answers, in each way in's shape, built from an :class:`ErrorCode`.

* :func:`native_error`: the native endpoints' JSON, ``{"error": {"code", "message"}}``;
* :func:`openai_error`: the OpenAI-compatible endpoint's JSON,
  ``{"error": {"message", "type", "param", "code"}}``, and :func:`openai_stream_error`, the same
  object as the in-band event that ends a ``stream: true`` answer after its 200;
* :func:`error_event_data`: the payload of the native ``error`` event (SSE ``data:``, and the
  fields of a WebSocket ``error`` frame relayed from a stream), ``{"code", "message"}``;
* :func:`websocket_error`: a WebSocket ``error`` frame that no stream sent (a refused frame);
* :func:`asgi_refusal`: either JSON shape, sent as a raw ASGI response by the request guard before
  Django has read the request.

The status defaults to the code's, the message to its friendly text in the active language; a
caller passes its own message when it can name the problem (which field, which limit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
from django.http import JsonResponse

from chatproxy.codes import ErrorCode
from chatproxy.messages import friendly_message

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _text(code: ErrorCode, message: str | None) -> str:
    return friendly_message(code) if message is None else message


def _native_body(code: ErrorCode, message: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": _text(code, message)}}


def _openai_body(code: ErrorCode, message: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": _text(code, message), "type": code.openai_type, "param": param, "code": code}}


def _json_response(body: dict[str, Any], status: int, headers: Mapping[str, str] | None) -> JsonResponse:
    response = JsonResponse(body, status=status)
    for name, value in (headers or {}).items():  # after Content-Type, as they always came
        response[name] = value
    return response


def native_error(
    code: ErrorCode, message: str | None = None, *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> JsonResponse:
    """``{"error": {"code", "message"}}`` with ``status`` (default: the code's) and extra ``headers``."""
    return _quiet(code, _json_response(_native_body(code, message), status or code.status, headers))


def _quiet(code: ErrorCode, response: JsonResponse) -> JsonResponse:
    """An ``unavailable`` answer (the shared cache is down) is not logged per request by Django, as a
    5xx would be: :mod:`chatproxy.outage` logs the outage once."""
    if code is ErrorCode.UNAVAILABLE:
        response._has_been_logged = True  # type: ignore[attr-defined]  # read by django.utils.log.log_response
    return response


def openai_error(
    code: ErrorCode,
    message: str | None = None,
    *,
    status: int | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JsonResponse:
    """``{"error": {"message", "type", "param", "code"}}`` with ``status`` (default: the code's)."""
    return _quiet(code, _json_response(_openai_body(code, message, param), status or code.status, headers))


def openai_stream_error(code: ErrorCode) -> bytes:
    """The in-band ``data: {"error": ...}`` event that ends an OpenAI-style stream."""
    return b"data: " + orjson.dumps(_openai_body(code, None, None)) + b"\n\n"


def error_event_data(code: ErrorCode) -> dict[str, str]:
    """The native ``error`` event's payload: the code and its friendly message."""
    return {"code": code, "message": friendly_message(code)}


def websocket_error(code: ErrorCode, **fields: Any) -> str:
    """A WebSocket ``error`` frame: ``type``, ``code``, then ``fields`` in the order given (a
    ``message`` among them; without one the code's friendly message comes last)."""
    frame: dict[str, Any] = {"type": "error", "code": code, **fields}
    if "message" not in frame:
        frame["message"] = friendly_message(code)
    return orjson.dumps(frame).decode()


async def asgi_refusal(
    send: Send, code: ErrorCode, message: str | None = None, *, status: int | None = None, openai_shape: bool,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer ``status`` with the endpoint's error JSON straight over ASGI (and ``headers``), closing
    the connection (the unread rest of the request body must not be taken for another request)."""
    body = orjson.dumps(_openai_body(code, message, None) if openai_shape else _native_body(code, message))
    await send({
        "type": "http.response.start",
        "status": status or code.status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(headers or ()),
        ],
    })
    await send({"type": "http.response.body", "body": body})

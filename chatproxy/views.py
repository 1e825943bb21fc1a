"""HTTP ways in. Thin: validate, open a stream, translate its events to the wire.

``POST /chat/stream/`` answers Server-Sent Events (SPEC 6.1). Retry and timeout logic lives in
:mod:`chatproxy.core`; this module only frames events and ties the stream's life to the client
connection (Django cancels a streaming response's generator when the client goes away, which
closes the stream and its upstream connection).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from chatproxy import sse
from chatproxy.auth import AuthFailure, authorize
from chatproxy.core import ChatStream
from chatproxy.service import open_stream
from chatproxy.validation import InvalidRequest, max_body_bytes, parse_native_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(status: int, code: str, message: str, **headers: str) -> JsonResponse:
    """The native error shape: ``{"error": {"code", "message"}}``."""
    response = JsonResponse({"error": {"code": code, "message": message}}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def read_json_body(request: HttpRequest) -> Any:
    """The request's JSON body; raises InvalidRequest (400/413/415) naming the problem."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > max_body_bytes():
        raise InvalidRequest(f"The request body is too large (limit {max_body_bytes()} bytes).", status=413)
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise InvalidRequest("Send the request as JSON with 'Content-Type: application/json'.", status=415)
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON ({exc.msg}).") from None


@csrf_exempt  # enforced by authorize() for session users, answered as JSON
async def stream_view(request: HttpRequest) -> HttpResponse:
    """``POST /chat/stream/``: validate, then stream SSE events of a resilient answer."""
    if request.method != "POST":
        response = error_response(405, "bad_request", "Use POST with a JSON body.")
        response["Allow"] = "POST"
        return response
    try:
        await authorize(request)
    except AuthFailure as exc:
        return error_response(exc.status, exc.code, exc.message)
    try:
        chat_request = parse_native_request(read_json_body(request))
    except InvalidRequest as exc:
        return error_response(exc.status, exc.code, exc.message)

    stream = open_stream(chat_request)
    response = StreamingHttpResponse(_sse_body(stream), content_type="text/event-stream", headers=SSE_HEADERS)
    return response


async def _sse_body(stream: ChatStream) -> AsyncIterator[bytes]:
    yield sse.OPEN
    try:
        encode = sse.encode
        async for event in stream:
            yield encode(event)
    finally:
        # Normal end, client gone (Django cancels us), or server shutdown: the upstream closes now.
        await stream.aclose()

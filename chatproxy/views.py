"""HTTP ways in. Thin: validate, open a stream, translate its events to the wire.

``POST /chat/stream/`` answers Server-Sent Events (events: docs/reference.md). Retry and timeout logic lives in
:mod:`chatproxy.core`; this module only frames events and ties the stream's life to the client
connection (Django cancels a streaming response's generator when the client goes away, which
closes the stream and its upstream connection).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from chatproxy import limits, resume, sse
from chatproxy.auth import AuthFailure, authorize
from chatproxy.codes import ErrorCode
from chatproxy.core import Event
from chatproxy.responses import native_error
from chatproxy.service import StreamNotStarted, open_stream
from chatproxy.validation import InvalidRequest, max_body_bytes, parse_native_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def endpoint(method: str, usage: str) -> Callable[[View], View]:
    """Wrap a native view: answer a wrong method with 405 (``usage`` says what to do), then load
    and check the user (session + CSRF, PERMISSION). CSRF is exempted from Django's middleware so
    that :func:`authorize` can answer its failure in the JSON error shape."""

    def wrap(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        async def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method != method:
                return native_error(ErrorCode.BAD_REQUEST, usage, status=405, headers={"Allow": method})
            try:
                await authorize(request)
            except AuthFailure as exc:
                return native_error(exc.code, exc.message)
            return await view(request, *args, **kwargs)

        return checked

    return wrap


def read_json_body(request: HttpRequest) -> Any:
    """The request's JSON body; raises InvalidRequest (400/413/415) naming the problem."""
    too_large = InvalidRequest(f"The request body is too large (limit {max_body_bytes()} bytes).", status=413)
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isascii() and length.isdigit() and int(length) > max_body_bytes():
        raise too_large
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise InvalidRequest("Send the request as JSON with 'Content-Type: application/json'.", status=415)
    try:
        return orjson.loads(request.body)
    except RequestDataTooBig:  # settings.DATA_UPLOAD_MAX_MEMORY_SIZE is below our own cap
        raise too_large from None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON ({exc.msg}).") from None


@endpoint("POST", "Use POST with a JSON body.")
async def stream_view(request: HttpRequest) -> HttpResponseBase:
    """``POST /chat/stream/``: validate, then stream SSE events of a resilient answer."""
    try:
        chat_request = parse_native_request(read_json_body(request))
    except InvalidRequest as exc:
        return native_error(exc.code, exc.message, status=exc.status)

    try:
        reader = await open_stream(chat_request, user=request.user, resumable=True, who=limits.identity_of(request))
    except limits.LimitExceeded as exc:
        return native_error(exc.code, exc.message, headers={"Retry-After": str(exc.retry_after)})
    except StreamNotStarted as exc:
        return native_error(exc.code)
    return StreamingHttpResponse(sse.live_body(reader, sse.encode, sse.OPEN), content_type="text/event-stream",
                                 headers=SSE_HEADERS)


def sse_response(events: AsyncIterator[Event]) -> StreamingHttpResponse:
    return StreamingHttpResponse(_sse_body(events), content_type="text/event-stream", headers=SSE_HEADERS)


async def _sse_body(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    yield sse.OPEN
    encode = sse.encode
    async for event in events:
        yield encode(event)


def _last_event_id(request: HttpRequest) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id") or "0"
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None  # "²".isdigit() too


@endpoint("GET", "Use GET, with a Last-Event-ID header.")
async def resume_view(request: HttpRequest, stream_id: str) -> HttpResponseBase:
    """``GET /chat/stream/<id>/``: the events after ``Last-Event-ID``, then live ones."""
    after = _last_event_id(request)
    if after is None:
        return native_error(ErrorCode.BAD_REQUEST, "Last-Event-ID must be a whole number (the last 'id' you received).")
    try:
        events = await resume.open_replay(stream_id, request.user, after)
    except resume.StreamNotFound:
        return native_error(ErrorCode.NOT_FOUND, "No such stream: it ended more than RESUME.TTL ago, or never existed.")
    except resume.JournalUnavailable as exc:
        return _journal_unavailable(exc)
    return sse_response(events)


def _journal_unavailable(exc: resume.JournalUnavailable) -> JsonResponse:
    return native_error(ErrorCode.UNAVAILABLE, exc.message, headers={"Retry-After": str(exc.retry_after)})


@endpoint("POST", "Use POST.")
async def cancel_view(request: HttpRequest, stream_id: str) -> HttpResponseBase:
    """``POST /chat/stream/<id>/cancel/``: stop generating (the stream ends with ``cancelled``)."""
    try:
        await resume.cancel(stream_id, request.user)
    except resume.StreamNotFound:
        return native_error(ErrorCode.NOT_FOUND, "No such stream.")
    except resume.JournalUnavailable as exc:
        return _journal_unavailable(exc)
    return JsonResponse({"stream_id": stream_id, "status": "cancelling"}, status=202)

"""Server-Sent Events framing for the native stream (``POST /chat/stream/``).

Events are written as ``id:``/``event:``/``data:`` blocks with compact JSON; ``keepalive`` is a
comment line, which EventSource and fetch-based parsers ignore but which resets every proxy's idle
timer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from chatproxy.codes import ErrorCode
from chatproxy.core import Event, Subscription
from chatproxy.responses import error_event_data

#: The first bytes of every stream: they leave at once, so the response headers leave too (Daphne
#: holds headers until the first body chunk), and tell EventSource-style clients to wait 3 s.
OPEN = b": open\nretry: 3000\n\n"
#: The same for OpenAI-style streams: no ``retry:`` field, which the openai SDK's SSE decoder would
#: turn into an event with empty data.
OPEN_COMMENT = b": open\n\n"
KEEPALIVE = b": keepalive\n\n"


def event_data(event: Event) -> dict[str, Any]:
    """The JSON payload of ``event`` as clients see it (errors get their friendly message)."""
    data = event.data or {}
    if event.name == "error":
        return error_event_data(ErrorCode.of(data.get("code")))
    return data


def encode(event: Event) -> bytes:
    """One event as SSE bytes."""
    if event.name == "keepalive":
        return KEEPALIVE
    if event.name == "delta":
        # The hot path: skip the generic payload function.
        payload = orjson.dumps(event.data)
    else:
        payload = orjson.dumps(event_data(event))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.name.encode(), payload)


async def live_body(reader: Subscription, encode: Callable[[Event], bytes], opening: bytes) -> AsyncIterator[bytes]:
    """The SSE body of a live stream read by ``reader``: ``opening``, then each event as ``encode``
    renders it (``b""``: nothing to show). Events that are ready together leave as one write: when
    the worker is busy, several wait by the time the reader runs, and each write costs the server
    (Daphne: two epoll changes) and the network (a packet) whatever its size."""
    try:
        yield opening
        async for event in reader:
            more = reader.pending()
            body = encode(event) if not more else b"".join([encode(event), *map(encode, more)])
            if body:
                yield body
    finally:
        # Normal end, client gone (Django cancels us), or server shutdown: what the stream does
        # without this reader (a resumable one waits RESUME.GRACE for a resume) is its own.
        reader.close()

"""Drive an ASGI application in-process, byte for byte, without a server.

Unlike Django's test clients this goes through the whole ASGI stack of ``project.asgi.application``
(the ``RequestSizeGuard`` included), sends any bytes and headers, streams a body in chunks, and can
leave a streaming response after its first bytes (an ``http.disconnect``, as when a browser goes
away), which is how the fuzz tests start real streams and stop them at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CSRF_TOKEN = "fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz"  # 32 characters: a valid CSRF secret
SESSION_HEADERS = ((b"cookie", f"csrftoken={CSRF_TOKEN}".encode()), (b"x-csrftoken", CSRF_TOKEN.encode()))


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the app sent its last body chunk (False: we left a stream early)
    receive_calls: int = 0  # how often the app asked for request body / disconnect messages

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    body: bytes | Sequence[bytes] = b"",
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    content_type: bytes | None = b"application/json",
    content_length: bool = True,
    session: bool = True,
    query: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 40000),
    host: bytes = b"localhost",
    leave_after: int | None = 1,
    patience: float = 10.0,
) -> Reply:
    """One HTTP request. ``body`` as a list is sent in that many ``http.request`` messages.

    ``leave_after``: once a streaming (``text/event-stream``) response has sent this many body
    chunks, the client goes away (None: read it to the end). ``session``: send a CSRF cookie and
    the matching ``X-CSRFToken`` header. ``patience``: seconds before the client leaves whatever happens.
    """
    chunks = [body] if isinstance(body, bytes) else list(body)
    raw_headers = [(b"host", host)]
    if content_type is not None:
        raw_headers.append((b"content-type", content_type))
    if content_length:
        raw_headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    if session:
        raw_headers += SESSION_HEADERS
    raw_headers += list(headers)
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogatepass"),
        "query_string": query, "root_path": "", "headers": raw_headers, "client": list(client),
        "server": ["localhost", 80],
    }
    reply = Reply()
    gone = asyncio.Event()
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    body_chunks = 0

    async def receive() -> dict[str, Any]:
        reply.receive_calls += 1
        if pending:
            return pending.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal body_chunks
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")
            body_chunks += 1
            if not message.get("more_body", False):
                reply.complete = True
                gone.set()
            elif (leave_after is not None and body_chunks >= leave_after
                  and reply.headers.get("content-type", "").startswith("text/event-stream")):
                gone.set()

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.wait_for(asyncio.shield(task), patience)
    except TimeoutError:
        gone.set()  # leave; Django then cancels the response
        await asyncio.wait_for(task, 5.0)
    return reply

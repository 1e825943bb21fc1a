"""ASGI middleware: refuse oversized request bodies before Django reads them.

Django's ``ASGIHandler`` reads a request's whole body (into memory, then a temporary file) before
any view runs, so a view's size check comes too late to protect the worker. Wrap the HTTP
application::

    application = ProtocolTypeRouter({
        "http": RequestSizeGuard(django_asgi_app),
        ...
    })

For ``POST`` requests to chatproxy's own URLs (whatever prefix they are mounted under), the guard:

* answers ``413`` at once, without reading the body, when ``Content-Length`` is above the cap;
* otherwise reads the body itself, and answers ``413`` as soon as it passes the cap (a chunked
  upload has no ``Content-Length``), or hands the body it read to Django;
* answers ``400`` for a malformed ``Content-Length``.

The cap is :func:`chatproxy.validation.max_body_bytes` (from ``LIMITS["MAX_INPUT_CHARS"]``). The
error body has the endpoint's own shape: ``{"error": {"code", "message"}}`` for the native
endpoints, OpenAI's ``{"error": {"message", "type", "param", "code"}}`` for ``/v1/``. Other
requests pass through untouched.

The ASGI server may buffer a body before the application sees it (Daphne does; uvicorn streams
it), so also cap request bodies in the front proxy (nginx ``client_max_body_size``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from django.urls import Resolver404, resolve

from chatproxy.validation import max_body_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The app_name of chatproxy's URLconf (``chatproxy/urls.py``).
APP_NAME = "chatproxy"


def _route(scope: Scope) -> str | None:
    """The url_name of the chatproxy view ``scope`` is for, or None when it is not chatproxy's."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    try:
        match = resolve(path)
    except Resolver404:
        return None
    except Exception:  # a path the resolver cannot even look at: Django answers it
        return None
    if APP_NAME not in match.app_names:
        return None
    return match.url_name or ""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class RequestSizeGuard:
    """Wrap an ASGI HTTP app; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        route = _route(scope)
        if route is None:
            return await self.app(scope, receive, send)

        limit = max_body_bytes()
        openai_shape = route.startswith("openai")
        length = _header(scope, b"content-length")
        if length is not None:
            if not (length.isdigit() and len(length) <= 19):
                return await _refuse(send, 400, "The Content-Length header is not a whole number.", openai_shape)
            if int(length) > limit:
                return await _refuse(send, 413, _too_large(limit), openai_shape)

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await _refuse(send, 413, _too_large(limit), openai_shape)
            chunks.append(body)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then http.disconnect, which Django waits for while streaming

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> str:
    return f"The request body is too large (limit {limit} bytes)."


async def _refuse(send: Send, status: int, message: str, openai_shape: bool) -> None:
    if openai_shape:
        error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "bad_request"}
    else:
        error = {"code": "bad_request", "message": message}
    body = orjson.dumps({"error": error})
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the unread rest of the body must not be taken for a request
        ],
    })
    await send({"type": "http.response.body", "body": body})

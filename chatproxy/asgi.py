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

import asyncio
import contextlib
import functools
import io
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.apps import apps as django_apps
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.asgi import ASGIRequest, get_script_prefix
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import Resolver404, ResolverMatch, resolve, set_script_prefix
from django.utils import translation
from django.utils.functional import SimpleLazyObject
from django.utils.log import log_response

from chatproxy.codes import ErrorCode
from chatproxy.responses import asgi_refusal
from chatproxy.validation import max_body_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The app_name of chatproxy's URLconf (``chatproxy/urls.py``).
APP_NAME = "chatproxy"


def _match(scope: Scope) -> ResolverMatch | None:
    """The URL match of the chatproxy view ``scope`` is for, or None when it is not chatproxy's."""
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
    return match


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
        match = _match(scope)
        if match is None:
            return await self.app(scope, receive, send)
        route = match.url_name or ""

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

        return await self.dispatch(match, scope, b"".join(chunks), receive, send)

    async def dispatch(self, match: ResolverMatch, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Hand a chatproxy POST whose ``body`` was read and accepted to the wrapped app."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, which Django waits for while streaming

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> str:
    return f"The request body is too large (limit {limit} bytes)."


async def _refuse(send: Send, status: int, message: str, openai_shape: bool, code: str = ErrorCode.BAD_REQUEST) -> None:
    await asgi_refusal(send, ErrorCode.of(code), message, status=status, openai_shape=openai_shape)


#: The url_names :class:`DirectStreams` serves itself: the two POST endpoints that open streams.
DIRECT_ROUTES = frozenset({"stream", "openai-chat-completions"})

logger = logging.getLogger("chatproxy.asgi")


class DirectStreams(RequestSizeGuard):
    """:class:`RequestSizeGuard`, and chatproxy's stream-opening endpoints served from ASGI directly.

    ``POST .../stream/`` and ``POST .../v1/chat/completions`` are the requests that come once per
    answer. Through Django's ``ASGIHandler`` each one costs what Django costs any request under
    ASGI: every ``MiddlewareMixin`` middleware runs ``process_request`` and ``process_response``
    in a thread (``sync_to_async``), and so do the ``request_started`` / ``request_finished``
    signals -- 15 thread hops with the default middleware, plus a new OS thread per request (the
    request's ``ThreadSensitiveContext``) that lives as long as the response streams. Measured on
    a 2-core machine: ~3 ms of CPU per request and ~one thread per open stream (``bench/``).

    Here those two endpoints skip Django's handler and middleware: the wrapper builds Django's
    ``ASGIRequest``, attaches the session and the lazily loaded user exactly as
    ``SessionMiddleware`` and ``AuthenticationMiddleware`` do, activates the request's language
    when ``LocaleMiddleware`` is installed, calls the same view function, and sends its response.
    The views check everything themselves (CSRF for session users, bearer keys, ``PERMISSION``,
    limits, validation), so the answers are the same. Other middleware of the project does not run
    for these two URLs, nor do Django's ``request_started`` / ``request_finished`` signals (the
    database connection a session or key lookup used is closed as they would close it): a project
    whose authentication comes from its own middleware, or that hooks those signals, should wrap
    its app in :class:`RequestSizeGuard` instead. Every other request goes to Django unchanged.
    """

    async def dispatch(self, match: ResolverMatch, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        if match.url_name not in DIRECT_ROUTES:
            return await super().dispatch(match, scope, body, receive, send)
        openai_shape = match.url_name.startswith("openai")
        request = _direct_request(scope, body)
        if request is None:
            return await _refuse(send, 400, "The request could not be read.", openai_shape)
        request.resolver_match = match
        try:
            response = await match.func(request, *match.args, **match.kwargs)
        except Exception:
            logger.exception("Internal Server Error: %s", request.path)
            return await _refuse(send, 500, "Something went wrong on our side. Please try again.", openai_shape,
                                 code="internal")
        if response.status_code >= 400:  # Django's "Bad Request: /chat/stream/" (django.request) and the like
            log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
        try:
            await _send_response(response, receive, send)
        finally:
            response.close()
            if _touches_database(request):
                # Django closes a request's database connections when it ends (request_finished);
                # the session or key lookup ran in asgiref's shared thread: tidy that thread's.
                await sync_to_async(close_old_connections)()


def _direct_request(scope: Scope, body: bytes) -> ASGIRequest | None:
    set_script_prefix(get_script_prefix(scope))
    try:
        request = ASGIRequest(scope, io.BytesIO(body))
    except (UnicodeDecodeError, RequestDataTooBig):
        return None
    if django_apps.is_installed("django.contrib.sessions"):
        session_store = import_module(settings.SESSION_ENGINE).SessionStore
        request.session = session_store(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
    if django_apps.is_installed("django.contrib.auth"):
        _attach_user(request)
    if "django.middleware.locale.LocaleMiddleware" in settings.MIDDLEWARE:
        translation.activate(translation.get_language_from_request(request))
        request.LANGUAGE_CODE = translation.get_language()
    return request


def _attach_user(request: HttpRequest) -> None:
    """``request.user`` / ``request.auser()`` as ``AuthenticationMiddleware`` sets them (its own helpers)."""
    from django.contrib.auth.middleware import auser, get_user

    request.user = SimpleLazyObject(lambda: get_user(request))  # type: ignore[assignment]
    request.auser = functools.partial(auser, request)  # type: ignore[attr-defined]


def _touches_database(request: HttpRequest) -> bool:
    return settings.SESSION_COOKIE_NAME in request.COOKIES or "HTTP_AUTHORIZATION" in request.META


async def _send_response(response: HttpResponse | StreamingHttpResponse, receive: Receive, send: Send) -> None:
    if not response.streaming and not response.has_header("Content-Length"):
        response["Content-Length"] = str(len(response.content))  # as CommonMiddleware does
    headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
    headers += [(b"Set-Cookie", c.output(header="").encode("ascii").strip()) for c in response.cookies.values()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    if not response.streaming:
        await send({"type": "http.response.body", "body": response.content})
        return
    # Stream until the end, or until the client leaves: then cancel this task where it waits (for
    # the next event, usually), which closes the stream's reader and so the upstream connection.
    sender = asyncio.current_task()
    assert sender is not None
    watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, sender))
    try:
        async with contextlib.aclosing(response.streaming_content) as parts:  # type: ignore[type-var]
            async for part in parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        client_left = watcher.done() and not watcher.cancelled() and watcher.exception() is None
        if not client_left:
            raise
        sender.uncancel()  # the client left: that is the end of this response, not an error
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(receive: Receive, sender: asyncio.Task[Any]) -> None:
    """Cancel ``sender`` when the client disconnects, and end (an error in ``receive`` ends it too)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    sender.cancel()

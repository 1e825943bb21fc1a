"""ASGI middleware: refuse oversized request bodies before Django reads them (:class:`RequestSizeGuard`),
and serve chatproxy's stream-opening requests without Django's thread hops (:class:`DirectStreams`).

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
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import Resolver404, ResolverMatch, resolve
from django.utils import translation
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string

from chatproxy import inflight
from chatproxy.codes import ErrorCode
from chatproxy.responses import asgi_refusal
from chatproxy.validation import max_body_bytes

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The app_name of chatproxy's URLconf (``chatproxy/urls.py``).
APP_NAME = "chatproxy"


def _match(scope: Scope) -> ResolverMatch | None:
    """The URL match of the chatproxy view ``scope`` is for, or None when it is not chatproxy's.

    Resolved with the default URLconf, in the language of the path's prefix when it has one (so
    that chatproxy's URLs under ``i18n_patterns`` are found for every language, not only the one
    active here)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    try:
        language = translation.get_language_from_path(path)
        with translation.override(language) if language else contextlib.nullcontext():
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
        return await self.serve(match, scope, receive, send)

    async def serve(self, match: ResolverMatch, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the body of a chatproxy POST (see the module), then :meth:`dispatch` it."""
        limit = max_body_bytes()
        openai_shape = _openai_shaped(match)
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

    def app_for(self, match: ResolverMatch) -> ASGIApp:
        """The app that serves a chatproxy POST whose body was accepted: the wrapped one."""
        return self.app

    async def dispatch(self, match: ResolverMatch, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Hand a chatproxy POST whose ``body`` was read and accepted to :meth:`app_for`."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, which Django waits for while streaming

        return await self.app_for(match)(scope, replay, send)


def _openai_shaped(match: ResolverMatch) -> bool:
    """Whether the endpoint answers errors in OpenAI's shape."""
    return (match.url_name or "").startswith("openai")


def _too_large(limit: int) -> str:
    return f"The request body is too large (limit {limit} bytes)."


async def _refuse(send: Send, status: int, message: str, openai_shape: bool, code: str = ErrorCode.BAD_REQUEST,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await asgi_refusal(send, ErrorCode.of(code), message, status=status, openai_shape=openai_shape, headers=headers)


#: The url_names :class:`DirectStreams` serves with :class:`DirectHandler`: the POST endpoints
#: that open streams.
DIRECT_ROUTES = frozenset({"stream", "openai-chat-completions", "openai-responses"})

#: When one hook of a middleware in :data:`LOOP_SAFE` must still run in a thread: never (False),
#: on every call (True), or when the predicate, given the hook's arguments, says the call will do
#: blocking I/O.
Policy = bool | Callable[..., bool]
#: Hook name -> its policy; a hook not named runs on the event loop.
Rules = Mapping[str, Policy]

DJANGO_SESSION_ENGINES = "django.contrib.sessions.backends."
DJANGO_MESSAGE_STORAGES = frozenset({
    "django.contrib.messages.storage.fallback.FallbackStorage",
    "django.contrib.messages.storage.session.SessionStorage",
    "django.contrib.messages.storage.cookie.CookieStorage",
})
ALL_HOOKS = {"process_request": True, "process_view": True, "process_response": True}


def _session_save_due(request: HttpRequest, response: HttpResponseBase) -> bool:
    """Whether ``SessionMiddleware.process_response`` will save the session (the store's I/O; the
    rest of it reads attributes and sets cookie headers)."""
    session = getattr(request, "session", None)
    if session is None:
        return False
    due = session.modified or settings.SESSION_SAVE_EVERY_REQUEST
    return bool(due and not session.is_empty() and response.status_code < 500)


def _session_rules() -> Rules:
    if not settings.SESSION_ENGINE.startswith(DJANGO_SESSION_ENGINES):
        return ALL_HOOKS  # a store of the project's own may do I/O anywhere
    return {"process_response": _session_save_due}


def _messages_to_store(request: HttpRequest, response: HttpResponseBase) -> bool:
    """Whether ``MessageMiddleware.process_response`` will store messages (it loads and changes the
    session for Django's session and fallback storages); it does nothing when none was read or added."""
    storage = getattr(request, "_messages", None)
    return storage is not None and bool(storage.used or storage.added_new)


def _messages_rules() -> Rules:
    return {"process_response": _messages_to_store} if settings.MESSAGE_STORAGE in DJANGO_MESSAGE_STORAGES \
        else ALL_HOOKS


def _csrf_checked(request: HttpRequest, callback: Any, args: Any, kwargs: Any) -> bool:
    """Whether ``CsrfViewMiddleware.process_view`` will check a token: a rejection renders the
    failure view (templates read from disk). chatproxy's endpoints are exempt: they check it themselves."""
    return not getattr(callback, "csrf_exempt", False)


def _csrf_rules() -> Rules:
    if settings.CSRF_USE_SESSIONS:
        return ALL_HOOKS  # the secret is read from, and written to, the session
    return {"process_view": _csrf_checked}


def _on_loop_rules() -> Rules:
    return {}


#: Django's own middleware that :class:`DirectHandler` runs on the event loop, by class (exactly:
#: a subclass may change a hook). Each was read for blocking I/O (Django 5.2); where a hook can do
#: some, its rules send that call to a thread. The rest is CPU work on the request and response.
#: ``LocaleMiddleware``: the first request in a language loads that language's catalogs, as any
#: code that activates it would, once per process.
LOOP_SAFE: dict[str, Callable[[], Rules]] = {
    "django.middleware.security.SecurityMiddleware": _on_loop_rules,
    "django.contrib.sessions.middleware.SessionMiddleware": _session_rules,
    "django.middleware.common.CommonMiddleware": _on_loop_rules,
    "django.middleware.csrf.CsrfViewMiddleware": _csrf_rules,
    "django.contrib.auth.middleware.AuthenticationMiddleware": _on_loop_rules,
    "django.contrib.messages.middleware.MessageMiddleware": _messages_rules,
    "django.middleware.clickjacking.XFrameOptionsMiddleware": _on_loop_rules,
    "django.middleware.locale.LocaleMiddleware": _on_loop_rules,
    "django.middleware.gzip.GZipMiddleware": _on_loop_rules,
    "django.middleware.http.ConditionalGetMiddleware": _on_loop_rules,
}


def loop_rules(factory: Any) -> Rules | None:
    """The rules of middleware ``factory`` if it is in :data:`LOOP_SAFE` and still calls its hooks
    the way ``MiddlewareMixin`` does, else None (it keeps Django's adaptation)."""
    name = f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', '')}"
    rules = LOOP_SAFE.get(name)
    return rules() if rules is not None and _called_as_mixin(factory) else None


def _called_as_mixin(factory: Any) -> bool:
    """Whether ``factory`` is a ``MiddlewareMixin`` that calls its hooks as the mixin does."""
    return (isinstance(factory, type) and issubclass(factory, MiddlewareMixin)
            and factory.__call__ is MiddlewareMixin.__call__)


def thread_hooks(factory: Any) -> list[str]:
    """What of middleware ``factory`` :class:`DirectHandler` runs in a thread on every request (as
    Django's handler does): [] when nothing. Hooks that go to a thread only for a call that will do
    I/O (a session to save), and ``process_exception`` (only on errors), are not counted."""
    rules = loop_rules(factory)
    if rules is not None:
        return [hook for hook, policy in rules.items() if policy is True and hasattr(factory, hook)]
    if not getattr(factory, "async_capable", False):
        return ["the whole middleware (it is synchronous only)"]
    hooks = ["process_view", "process_template_response"]
    if _called_as_mixin(factory):
        hooks[:0] = ["process_request", "process_response"]  # MiddlewareMixin.__acall__ runs them in a thread
    return [hook for hook in hooks if hasattr(factory, hook) and not iscoroutinefunction(getattr(factory, hook))]


def _on_loop(method: Callable[..., Any], policy: Policy) -> Callable[..., Awaitable[Any]]:
    """``method`` as a coroutine function: called on the loop, or in a thread (``thread_sensitive``,
    as Django calls it) where ``policy`` says."""
    in_thread = sync_to_async(method, thread_sensitive=True)
    if policy is True:
        return in_thread

    async def hook(*args: Any) -> Any:
        if callable(policy) and policy(*args):
            return await in_thread(*args)
        return method(*args)

    return hook


def _run_on_loop(middleware: Any, rules: Rules) -> Callable[[HttpRequest], Awaitable[HttpResponseBase]]:
    """What ``MiddlewareMixin.__acall__`` does with ``middleware``, each hook on the loop or in a
    thread as ``rules`` say (``__acall__`` puts every call in a thread)."""
    def hook(name: str) -> Callable[..., Awaitable[Any]] | None:
        method = getattr(middleware, name, None)
        return None if method is None else _on_loop(method, rules.get(name, False))

    process_request, process_response = hook("process_request"), hook("process_response")
    get_response = middleware.get_response

    async def call(request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase | None = await process_request(request) if process_request is not None else None
        response = response or await get_response(request)
        if process_response is not None:
            response = await process_response(request, response)
        return response

    return call


def _middleware_is_async(path: str, factory: Any, handler_is_async: bool) -> bool:
    """The mode Django's ``load_middleware`` picks for a middleware (its sync/async capabilities)."""
    can_sync, can_async = getattr(factory, "sync_capable", True), getattr(factory, "async_capable", False)
    if not (can_sync or can_async):
        raise RuntimeError(f"Middleware {path} must have at least one of sync_capable/async_capable set to True.")
    if can_sync and not handler_is_async:
        return False
    return bool(can_async)


request_logger = logging.getLogger("django.request")


class DirectHandler(ASGIHandler):
    """Django's ``ASGIHandler``, minus the thread hops that Django's own middleware does not need.

    Under ASGI, Django's handler runs each request in a ``ThreadSensitiveContext`` (a new OS thread
    for the request's synchronous code, alive as long as the response streams) and every
    ``MiddlewareMixin`` hook in a thread (``sync_to_async``). This handler is Django's
    (``handle``, ``create_request``, ``get_response_async``, ``send_response``, the
    ``request_started`` / ``request_finished`` signals, ``convert_exception_to_response``) with two
    changes:

    * no ``ThreadSensitiveContext``: thread-sensitive synchronous work of these requests (the hooks
      below that go to a thread, session and user loads, database queries of async ORM calls, the
      signals' receivers) runs in asgiref's one shared sync thread, one call at a time, instead of
      in a thread of the request's own;
    * the middleware chain is Django's, built from ``MIDDLEWARE`` in the same order, but the hooks
      of the middleware in :data:`LOOP_SAFE` run on the event loop, except the calls their rules
      send to a thread (a session that will be saved, messages to store, ...). Every other
      middleware keeps Django's adaptation (``sync_to_async`` where it is synchronous): it runs,
      in a thread as under Django. A hook run on the loop that touched the database anyway would
      raise Django's ``SynchronousOnlyOperation``, not block the loop.

    Nothing else differs: host validation (``CommonMiddleware`` calls ``get_host()``, as under
    Django), exceptions turned into responses by Django's handlers (``handler400/403/404/500``,
    logged on ``django.request`` / ``django.security.*``, ``got_request_exception`` sent),
    ``request.urlconf``, ``i18n_patterns``, ``ATOMIC_REQUESTS``.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Django wraps this in a ThreadSensitiveContext. When the server cancels the request (Daphne
        # does at shutdown), Django's handle() leaves its disconnect listener behind, whose
        # RequestAborted nobody retrieves ("Task exception was never retrieved" in the log): the
        # listener's pending receive() is cancelled with the request instead.
        pending: set[asyncio.Future[Message]] = set()

        async def guarded_receive() -> Message:
            waiter = asyncio.ensure_future(receive())
            pending.add(waiter)
            try:
                return await waiter
            finally:
                pending.discard(waiter)

        try:
            await self.handle(scope, guarded_receive, send)
        except asyncio.CancelledError:
            for waiter in pending:
                waiter.cancel()
            raise

    def load_middleware(self, is_async: bool = True) -> None:
        """Django's chain (its order, ``MiddlewareNotUsed``, hook lists, exception conversion around
        each middleware), with :func:`loop_rules` deciding where each known hook runs."""
        self._view_middleware: list[Callable[..., Any]] = []
        self._template_response_middleware: list[Callable[..., Any]] = []
        self._exception_middleware: list[Callable[..., Any]] = []
        # BaseHandler's own inner handler (view middleware, the view, template responses), which
        # its load_middleware wraps the same way; django-stubs does not declare it.
        handler = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]
        handler_is_async = True
        for path in reversed(settings.MIDDLEWARE):
            factory = import_string(path)
            rules = loop_rules(factory)
            middleware_is_async = True if rules is not None else _middleware_is_async(path, factory, handler_is_async)
            inner = self.adapt_method_mode(middleware_is_async, handler, handler_is_async,
                                           debug=settings.DEBUG, name=f"middleware {path}")
            try:
                middleware = factory(inner)
            except MiddlewareNotUsed as exc:
                if settings.DEBUG:
                    request_logger.debug("MiddlewareNotUsed(%r): %s", path, exc)
                continue
            if middleware is None:
                raise ImproperlyConfigured(f"Middleware factory {path} returned None.")
            self._add_hooks(middleware, rules)
            handler = convert_exception_to_response(middleware if rules is None else _run_on_loop(middleware, rules))
            handler_is_async = middleware_is_async
        self._middleware_chain = self.adapt_method_mode(True, handler, handler_is_async)

    def _add_hooks(self, middleware: Any, rules: Rules | None) -> None:
        def adapted(name: str) -> Callable[..., Any]:
            method = getattr(middleware, name)
            return self.adapt_method_mode(True, method) if rules is None else _on_loop(method, rules.get(name, False))

        if hasattr(middleware, "process_view"):
            self._view_middleware.insert(0, adapted("process_view"))
        if hasattr(middleware, "process_template_response"):
            self._template_response_middleware.append(adapted("process_template_response"))
        if hasattr(middleware, "process_exception"):  # Django calls these synchronously, in one thread
            self._exception_middleware.append(self.adapt_method_mode(False, middleware.process_exception))


class DirectStreams(RequestSizeGuard):
    """:class:`RequestSizeGuard`, and chatproxy's stream-opening endpoints served by :class:`DirectHandler`.

    ``POST .../stream/`` and ``POST .../v1/chat/completions`` come once per answer. Through
    Django's ``ASGIHandler`` each one costs what Django costs any request under ASGI: every
    ``MiddlewareMixin`` hook in a thread (``sync_to_async``) and a new OS thread per request that
    lives as long as the response streams (``bench/`` measures both paths). Those two go to
    :class:`DirectHandler`: Django's handler with Django's middleware hooks run on the event loop
    and no thread of the request's own. Their answers are Django's (host validation, security
    headers, session saving, exception handling, signals: all of the project's ``MIDDLEWARE`` runs);
    what still differs is said there. Every other request goes to Django's handler ``app``.

    The two are found with the default URLconf and, under ``i18n_patterns``, the language of the
    path's prefix (:func:`_match`); :class:`DirectHandler` then resolves again as Django does
    (``request.urlconf`` included). System check ``chatproxy.W005`` names the middleware whose
    hooks still run in a thread on every request.
    """

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.streams = DirectHandler()

    def app_for(self, match: ResolverMatch) -> ASGIApp:
        return self.streams if match.url_name in DIRECT_ROUTES else self.app

    async def serve(self, match: ResolverMatch, scope: Scope, receive: Receive, send: Send) -> None:
        """A stream-opening POST runs to its end when the server stops (:func:`chatproxy.inflight.serve`),
        and is refused with ``503`` (``Retry-After``) once it is stopping: no new answer starts there."""
        if match.url_name not in DIRECT_ROUTES:
            return await super().serve(match, scope, receive, send)
        from chatproxy.service import hook_reactor_shutdown

        hook_reactor_shutdown(asyncio.get_running_loop())  # before a shutdown can cancel this request
        if inflight.stopping():
            return await _refuse(send, 503, STOPPING_MESSAGE, _openai_shaped(match), ErrorCode.UNAVAILABLE,
                                 headers=[(b"retry-after", STOPPING_RETRY_AFTER)])
        return await inflight.serve(functools.partial(super().serve, match), scope, receive, send)


#: What a stream-opening request that reaches a stopping server is told, and when to try again
#: (seconds: behind a proxy the next try reaches another worker).
STOPPING_MESSAGE = "This server is restarting. Please try again in a moment."
STOPPING_RETRY_AFTER = b"1"


class Lifespan:
    """The ASGI ``lifespan`` protocol: at server shutdown, let running streams finish (``RESUME.DRAIN``)
    and close chatproxy's upstream sessions.

    Route it in the project's ASGI application, for servers that speak lifespan (uvicorn,
    Hypercorn)::

        ProtocolTypeRouter({"http": ..., "websocket": ..., "lifespan": Lifespan()})

    Daphne does not send lifespan events; there :mod:`chatproxy.service` closes them from a
    reactor shutdown trigger instead.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from chatproxy.service import shut_down

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await shut_down()
                await send({"type": "lifespan.shutdown.complete"})
                return

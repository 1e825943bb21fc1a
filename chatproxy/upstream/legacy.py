"""Adapter for the legacy openai SDK (0.27.x / 0.28.x, ``openai.ChatCompletion.acreate``).

Contract, beyond :mod:`chatproxy.upstream.base`:

* Each attempt is ``ChatCompletion.acreate(model=..., messages=..., stream=True,
  request_timeout=(connect_timeout, total_timeout), api_key=..., api_base=..., **params,
  **extra_body)``. The SDK turns ``request_timeout`` into ``aiohttp.ClientTimeout(connect=...,
  total=...)`` where ``total`` covers the whole streamed body, so ``total`` is the rest of the
  stream's deadline: it never cuts a healthy answer early, and chatproxy's own watchdog (not the
  SDK) notices stalls. ``params``/``extra_body`` keys that collide with the SDK's own arguments
  (``model``, ``messages``, ``stream``, ``api_key``, ...) are overridden by this adapter, except
  SDK options such as ``deployment_id`` / ``engine`` (Azure) which pass through on purpose.
  ``stream_options={"include_usage": True}`` is asked for unless ``EXTRA_BODY`` says otherwise.
  SDK retries are off: ``acreate(timeout=-1)`` stops its built-in retry of 409 ``TryAgain``
  (which would otherwise spin, without sleeping, forever).
* The key and base URL are passed per call; the SDK's globals (``openai.api_key``, ...) are never
  written.
* One ``aiohttp.ClientSession`` per event loop (connection pooling), handed to the SDK through the
  ``openai.aiosession`` ContextVar, which is set around the ``acreate`` call only. The session is
  wrapped so that the adapter holds the attempt's ``aiohttp.ClientResponse``:
  ``stream.aclose()`` closes that response, which closes its socket at once (the SDK itself only
  releases the connection when its generator is finalised, and breaking out of the iteration
  leaves the connection open). ``upstream.aclose()`` closes the session.
* Per chunk the ``choices`` become an item as for the other adapters
  (:meth:`~chatproxy.upstream.base.BodyStream._take_choices`), and ``usage`` is read. An end of
  body without a ``finish_reason`` is a truncated answer (the SDK hides
  ``data: [DONE]``).
* Errors, as :mod:`chatproxy.errors`:

  ============================================================  =================================
  ``error.Timeout`` / ``APIConnectionError`` at open              ``UpstreamConnectError``
  ``RateLimitError`` (429)                                        ``RateLimited`` + Retry-After
  ``ServiceUnavailableError``, ``TryAgain``,
  ``InvalidRequestError``, ``AuthenticationError``,
  ``PermissionError``, ``APIError`` with an error status          ``status_error(http_status)``
  a 200 answer that is not ``text/event-stream``                 ``UpstreamDisconnected``
  ``APIError`` mid-stream (an in-stream ``{"error": ...}``)       ``UpstreamStatusError(0)``
  ``APIError`` mid-stream caused by a line that is not JSON       ``UpstreamDisconnected``
  ``asyncio.TimeoutError`` mid-body (``total`` ran out)           ``StallTimeout``
  aiohttp ``ClientPayloadError`` / ``ServerDisconnectedError`` /
  ``ConnectionResetError`` / ``LineTooLong`` mid-body             ``UpstreamDisconnected``
  a line that is not UTF-8                                        ``UpstreamDisconnected``
  ============================================================  =================================

  SDK errors are raised ``from None``: their messages carry response bodies and headers.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import AsyncGenerator
from types import AsyncGeneratorType
from typing import TYPE_CHECKING, Any

from chatproxy.errors import (
    ConfigurationError,
    StallTimeout,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamStatusError,
    parse_retry_after,
    status_error,
)
from chatproxy.upstream.base import BodyStream, Item, PerLoop, UpstreamRequest
from chatproxy.upstream.common import (
    INSTALL_LEGACY,
    describe,
    describe_chain,
    error_code,
    request_body,
    resolve_api_key,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ["LegacyUpstream"]

# Like the current SDK's default pool (aiohttp's own default is 100 connections per session).
_POOL_SIZE = 1000

# acreate(timeout=...) is the SDK's budget for retrying 409 TryAgain; negative: no retry at all.
_NO_SDK_RETRY = -1.0

# Arguments of acreate() that this adapter owns; params/EXTRA_BODY cannot replace them.
_OWN_ARGS = ("model", "messages", "stream", "request_timeout", "api_key", "api_base", "timeout", "request_id")


class _RecordingSession:
    """Stands in for the ``aiohttp.ClientSession`` the SDK takes from ``openai.aiosession``.

    The SDK only calls ``await session.request(**kwargs)``; this forwards to the real session and
    keeps the response, so that the adapter can close it (and its socket) when it wants to.
    """

    __slots__ = ("_session", "response")

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self.response: aiohttp.ClientResponse | None = None

    async def request(self, *args: Any, **kwargs: Any) -> aiohttp.ClientResponse:
        response = await self._session.request(*args, **kwargs)
        self.response = response
        return response


class LegacyUpstream:
    """:class:`~chatproxy.upstream.base.Upstream` over openai 0.27's ``ChatCompletion.acreate``."""

    def __init__(self, *, base_url: str | None, api_key: str | None) -> None:
        try:
            import aiohttp

            # Typed as Any on purpose: type checkers usually see the current SDK's stubs.
            openai: Any = importlib.import_module("openai")
        except ImportError:
            raise ConfigurationError(f"the legacy openai SDK is not installed: {INSTALL_LEGACY}") from None
        if not hasattr(openai, "ChatCompletion") or not hasattr(openai, "aiosession"):
            raise ConfigurationError(f"openai {openai.__version__} is not the legacy SDK: {INSTALL_LEGACY}")
        importlib.import_module("openai.error")
        self.name = "openai-legacy/aiohttp"
        self._openai = openai
        self._aiohttp = aiohttp
        self._errors = openai.error
        self._api_key = resolve_api_key(api_key, base_url, openai.api_key)
        self._api_base = base_url  # None: the SDK's default (openai.api_base / OPENAI_API_BASE)
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop(self._new_session, lambda s: not s.closed)
        # Mid-body transport failures. TimeoutError is listed apart: it means "total ran out".
        self._body_errors: tuple[type[BaseException], ...] = (
            aiohttp.ClientError,
            ConnectionError,
            OSError,
            asyncio.IncompleteReadError,
            # aiohttp's LineTooLong: the SDK reads the body by lines, and aiohttp refuses a line
            # past its read buffer's limit (a broken or hostile server), so memory stays bounded.
            aiohttp.http_exceptions.HttpProcessingError,
        )

    def __repr__(self) -> str:
        return f"<LegacyUpstream {self.name} base_url={self._api_base!r}>"

    def _new_session(self) -> aiohttp.ClientSession:
        return self._aiohttp.ClientSession(connector=self._aiohttp.TCPConnector(limit=_POOL_SIZE))

    def _session(self) -> aiohttp.ClientSession:
        return self._sessions.get()

    async def open(self, request: UpstreamRequest) -> LegacyStream:
        openai = self._openai
        errors = self._errors
        body, want_usage = request_body(request.params, request.extra_body)
        if want_usage:
            body["stream_options"] = {"include_usage": True}
        for name in _OWN_ARGS:
            body.pop(name, None)
        recorder = _RecordingSession(self._session())
        token = openai.aiosession.set(recorder)  # duck-typed: the SDK only calls .request()
        try:
            gen = await openai.ChatCompletion.acreate(
                model=request.model,
                messages=list(request.messages),
                stream=True,
                request_timeout=(request.connect_timeout, request.total_timeout),
                api_key=self._api_key,
                api_base=self._api_base,
                # Not a request timeout: ChatCompletion.acreate retries HTTP 409 (TryAgain) in a
                # tight loop, without sleeping, until this many seconds have passed (forever when
                # None). A moment in the past makes it raise at once: chatproxy owns retries.
                timeout=_NO_SDK_RETRY,
                **body,
            )
        except BaseException as exc:
            # Whatever happened (cancellation included), the response is not ours to keep.
            if recorder.response is not None:
                recorder.response.close()
            if isinstance(exc, (errors.Timeout, errors.APIConnectionError)):
                raise UpstreamConnectError(describe_chain(exc)) from exc.__cause__
            if isinstance(exc, errors.OpenAIError):
                raise self._status_error(exc) from None
            if isinstance(exc, AssertionError) and recorder.response is not None:
                # acreate(stream=True) asserts that it got an event stream back.
                raise UpstreamDisconnected(
                    f"HTTP {recorder.response.status} answer is not text/event-stream"
                ) from None
            raise
        finally:
            openai.aiosession.reset(token)
        return LegacyStream(gen, recorder.response, self._errors, self._body_errors)

    def _status_error(self, exc: Any) -> UpstreamStatusError:
        status = exc.http_status
        code = error_code(exc.json_body)
        retry_after = parse_retry_after(exc.headers)
        if isinstance(exc, self._errors.RateLimitError):
            status = 429
        elif isinstance(exc, self._errors.ServiceUnavailableError):
            status = status or 503
        if not isinstance(status, int) or status < 400:
            # An error object inside a 200 body, or no status at all.
            return UpstreamStatusError(0, describe(exc, None, code), retry_after=retry_after)
        return status_error(status, describe(exc, status, code), retry_after=retry_after, code=code)

    async def aclose(self) -> None:
        """Close this loop's session. Sessions of other loops cannot be awaited from here."""
        session = self._sessions.pop()
        if session is not None:
            await session.close()


class LegacyStream(BodyStream):
    """The body of one streamed answer, read through the SDK's generator."""

    __slots__ = ("_body_errors", "_errors", "_response", "_sdk_gen")

    def __init__(
        self,
        sdk_gen: Any,  # the async generator acreate() returned
        response: aiohttp.ClientResponse | None,
        sdk_errors: Any,  # the openai.error module
        body_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._sdk_gen = sdk_gen
        self._response = response
        self._errors = sdk_errors
        self._body_errors = body_errors
        super().__init__()

    async def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()

    def _generators(self) -> tuple[AsyncGeneratorType[Any, None], ...]:
        return (self._gen, self._sdk_gen)

    async def _iterate(self) -> AsyncGenerator[Item, None]:
        usage: Any = None
        try:
            async for chunk in self._sdk_gen:
                # chunk is an OpenAIObject (a dict); the usage chunk has no choices.
                choices = chunk.get("choices")
                if choices:
                    item = self._take_choices(choices)
                    if item is not None:
                        yield item
                chunk_usage = chunk.get("usage")
                if chunk_usage:
                    usage = chunk_usage
        except self._errors.OpenAIError as exc:
            raise self._stream_error(exc) from None
        except TimeoutError as exc:  # before OSError: in 3.11 TimeoutError is one
            if self._closed:
                raise UpstreamDisconnected("stream closed by caller") from None
            raise StallTimeout(f"{describe(exc)} while reading the body (request_timeout total)") from exc
        except self._body_errors as exc:
            if self._closed:
                raise UpstreamDisconnected("stream closed by caller") from None
            raise UpstreamDisconnected(describe_chain(exc)) from exc
        except (AttributeError, TypeError, IndexError, KeyError, UnicodeDecodeError):
            # UnicodeDecodeError: the SDK decodes each line before parsing it (invalid UTF-8).
            raise UpstreamDisconnected("malformed chunk") from None
        if usage is not None:
            to_dict = getattr(usage, "to_dict_recursive", None)
            self.usage = to_dict() if to_dict is not None else dict(usage)
        if self.finish_reason is None:
            raise UpstreamDisconnected("body ended without finish_reason")

    def _stream_error(self, exc: Any) -> UpstreamError:
        if self._closed:
            return UpstreamDisconnected("stream closed by caller")
        if isinstance(exc.__cause__, (json.JSONDecodeError, UnicodeDecodeError)):
            # The SDK reports a data line that is not JSON as APIError("HTTP code 200 from API (...)").
            return UpstreamDisconnected("malformed chunk")
        return UpstreamStatusError(
            0, "in-stream error" + (f" ({code})" if (code := error_code(exc.json_body)) else "")
        )

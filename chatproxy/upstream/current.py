"""Adapter for the current openai SDK (``openai.AsyncOpenAI``, openai >= 1).

The SDK sends the request (auth, headers, base URL, HTTP status errors are all the SDK's), but the
streamed body is read as raw SSE lines and parsed with orjson: building the SDK's chunk objects
costs more CPU per chunk than everything else on the path together.

Contract, beyond :mod:`chatproxy.upstream.base`:

* One ``AsyncOpenAI`` client per event loop (connection pooling; pools cannot cross loops), built
  with ``max_retries=0``. ``http_client="aiohttp"`` uses ``openai.DefaultAioHttpClient()``.
* Per request: ``timeout=Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout,
  pool=connect_timeout)``; ``stream_options={"include_usage": True}`` unless ``EXTRA_BODY`` says
  otherwise; ``params`` and ``extra_body`` go into the body as-is.
* The body is read by :class:`chatproxy.upstream.sse.SSEStream` (text, ``finish_reason``, ``usage``,
  the end of the answer, malformed and in-stream errors).
* Errors, as :mod:`chatproxy.errors`:

  =====================================================  ============================================
  ``APIStatusError`` at open                              ``status_error(status, retry_after=...)``
  ``APITimeoutError`` / ``APIConnectionError`` at open    ``UpstreamConnectError``
  a 200 answer that is not ``text/event-stream``         ``UpstreamDisconnected``
  socket read timeout in the body                        ``StallTimeout``
  reset / protocol error / closed mid-body               ``UpstreamDisconnected``
  a line that is not JSON (or not a chunk object)        ``UpstreamDisconnected``
  an in-stream ``{"error": {...}}`` object                ``UpstreamStatusError(0)`` (retryable)
  =====================================================  ============================================

  Status and API errors are raised ``from None``: their SDK exceptions carry response bodies, which
  may echo (masked) keys; transport errors keep their cause for the logs.
* ``stream.aclose()`` closes the HTTP response, which closes the socket at once if the body was not
  read to the end. It may be called from another task while a read is pending: that read then
  fails with ``UpstreamDisconnected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import Any

import openai  # imported only when this adapter is chosen (build_upstream imports this module)

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
from chatproxy.upstream.base import PerLoop, UpstreamRequest
from chatproxy.upstream.common import (
    INSTALL_CURRENT_AIOHTTP,
    describe,
    describe_chain,
    error_code,
    request_body,
    resolve_api_key,
)
from chatproxy.upstream.sse import SSEStream

__all__ = ["CurrentUpstream"]



def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout classes, all transport error classes) that can escape a body read.

    Timeouts are also transport errors. httpx wraps httpcore's exceptions, and openai's aiohttp
    transport wraps aiohttp's, keeping the original as ``__cause__``: both generations are listed.
    """
    # TimeoutError: aiohttp's timeouts subclass it. The SDK's own classes only appear if a future
    # SDK wraps raw body reads the way it wraps its parsed streams.
    timeouts: list[type[BaseException]] = [TimeoutError, openai.APITimeoutError]
    errors: list[type[BaseException]] = [OSError, asyncio.IncompleteReadError, openai.APIConnectionError]
    # openai 3 uses httpx2/httpcore2; openai 1 and 2 use httpx/httpcore.
    for httpx_name, httpcore_name in (("httpx2", "httpcore2"), ("httpx", "httpcore")):
        try:
            httpx_module = importlib.import_module(httpx_name)
            httpcore_module = importlib.import_module(httpcore_name)
        except ImportError:
            continue
        timeouts += [httpx_module.TimeoutException, httpcore_module.TimeoutException]
        errors += [httpx_module.TransportError, httpx_module.StreamError, httpx_module.DecodingError]
        errors += [httpcore_module.NetworkError, httpcore_module.ProtocolError]
    try:
        import aiohttp
    except ImportError:
        pass
    else:
        errors.append(aiohttp.ClientError)
    return tuple(timeouts), tuple(errors + timeouts)


class CurrentUpstream:
    """:class:`~chatproxy.upstream.base.Upstream` over ``openai.AsyncOpenAI``."""

    def __init__(self, *, http_client: str = "httpx", base_url: str | None, api_key: str | None) -> None:
        if http_client == "aiohttp":
            fix = INSTALL_CURRENT_AIOHTTP
            try:
                import aiohttp  # noqa: F401  (only checking that the extra is installed)
            except ImportError:
                raise ConfigurationError(f'HTTP_CLIENT "aiohttp" needs aiohttp: {fix}') from None
            if not hasattr(openai, "DefaultAioHttpClient"):
                raise ConfigurationError(
                    f'HTTP_CLIENT "aiohttp" needs a newer openai ({openai.__version__}): {fix}'
                )
        self.name = f"openai-current/{http_client}"
        self._http_client = http_client
        self._base_url = base_url
        self._api_key = resolve_api_key(api_key, base_url, None)
        self._clients: PerLoop[openai.AsyncOpenAI] = PerLoop(self._adopt_client)
        self._timeouts, self._transport_errors = _transport_errors()
        # Built now so that a bad setting (say an invalid base URL) fails at startup; the first loop
        # that opens a stream adopts it (building it binds no loop: connections are made lazily).
        self._spare: openai.AsyncOpenAI | None = self._new_client()

    def __repr__(self) -> str:
        return f"<CurrentUpstream {self.name} base_url={self._base_url!r}>"

    def _new_client(self) -> openai.AsyncOpenAI:
        http_client = openai.DefaultAioHttpClient() if self._http_client == "aiohttp" else None
        try:
            return openai.AsyncOpenAI(
                api_key=self._api_key, base_url=self._base_url, max_retries=0, http_client=http_client
            )
        except openai.OpenAIError as exc:
            raise ConfigurationError(f"cannot build the openai client: {describe(exc)}") from None

    def _adopt_client(self) -> openai.AsyncOpenAI:
        """A client for a new loop: the one built at start if still spare, else a new one."""
        client, self._spare = (self._spare or self._new_client()), None
        return client

    async def open(self, request: UpstreamRequest) -> CurrentStream:
        client = self._clients.get()
        connect = request.connect_timeout
        # write/pool: sending a small body and waiting for a pooled connection are connect-like.
        timeout = openai.Timeout(
            None, connect=connect, read=request.read_timeout, write=connect, pool=connect
        )
        body, want_usage = request_body(request.params, request.extra_body)
        kwargs: dict[str, Any] = {"extra_body": body} if body else {}
        if want_usage:
            kwargs["stream_options"] = {"include_usage": True}
        call = client.chat.completions.with_streaming_response.create(
            model=request.model,
            messages=list(request.messages),  # type: ignore[arg-type]  # plain dicts, as the API takes
            stream=True,
            timeout=timeout,
            **kwargs,
        )
        try:
            api_response = await call.__aenter__()
        except openai.APIStatusError as exc:
            code = error_code(exc.body)
            raise status_error(
                exc.status_code,
                describe(exc, exc.status_code, code),
                retry_after=parse_retry_after(exc.response.headers),
                code=code,
            ) from None
        except openai.APIConnectionError as exc:  # APITimeoutError included: no headers yet
            raise UpstreamConnectError(describe_chain(exc)) from exc.__cause__
        except openai.APIError as exc:
            raise UpstreamStatusError(0, describe(exc, None, error_code(exc.body))) from None
        response = api_response.http_response
        if "text/event-stream" not in response.headers.get("content-type", ""):
            await response.aclose()
            raise UpstreamDisconnected(f"HTTP {response.status_code} answer is not text/event-stream")
        return CurrentStream(response, self._timeouts, self._transport_errors)

    async def aclose(self) -> None:
        """Close this loop's client. Clients of other loops cannot be awaited from here."""
        self._spare = None
        client = self._clients.pop()
        if client is not None:
            await client.close()


class CurrentStream(SSEStream):
    """The body of one streamed answer, read as SSE lines from the SDK's httpx response."""

    __slots__ = ("_response", "_timeouts")

    def __init__(
        self,
        response: Any,  # httpx2.Response (or httpx.Response on openai 1/2)
        timeouts: tuple[type[BaseException], ...],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self._response = response
        self._timeouts = timeouts
        super().__init__(errors)

    def _body_chunks(self) -> AsyncIterator[bytes]:
        chunks: AsyncIterator[bytes] = self._response.aiter_bytes()
        return chunks

    async def _close_response(self) -> None:
        with contextlib.suppress(Exception):  # the socket is gone either way; nothing to report
            await self._response.aclose()

    def _body_error(self, exc: BaseException) -> UpstreamError:
        """The chatproxy error for a transport error raised while reading the body."""
        if self._closed:
            return UpstreamDisconnected("stream closed by caller")
        cause = exc.__cause__
        if isinstance(exc, self._timeouts) and (cause is None or isinstance(cause, self._timeouts)):
            return StallTimeout(f"{describe_chain(exc)} while reading the body")
        # Not a timeout, whatever the class says: openai's aiohttp transport reports a server
        # disconnect (aiohttp ServerDisconnectedError) as httpx ConnectTimeout.
        return UpstreamDisconnected(describe_chain(exc))

"""Adapter without an SDK (``UPSTREAM.SDK = "none"``): the chat-completions API over plain aiohttp.

The request is the one the SDKs send: ``POST {BASE_URL}/chat/completions`` with ``Authorization:
Bearer <key>``, a JSON body (``model``, ``messages``, ``stream: true``, ``stream_options``, then
``params`` and ``EXTRA_BODY`` as-is) and, as the current SDK does, ``OpenAI-Organization`` /
``OpenAI-Project`` from ``OPENAI_ORG_ID`` / ``OPENAI_PROJECT_ID``. The body is read by
:class:`chatproxy.upstream.sse.SSEStream`, as for the current SDK.

Why: per stream the current SDK builds its request through typed-parameter transforms and httpx
models, and per chunk its httpx wrappers sit between aiohttp and the parser; here neither exists
(what that saves is measured by ``make bench``: bench/README.md, "Upstream paths"). Same contract
and error mapping as the other adapters, proven by the same fault suite (``tests/test_adapters.py``):

======================================================  ===========================================
HTTP status >= 400 at open                              ``status_error(status, retry_after=...)``
                                                        with the error body's code (never its text)
connect error, reset or timeout before the headers      ``UpstreamConnectError``
a 2xx answer that is not ``text/event-stream``          ``UpstreamDisconnected``
socket read timeout in the body                         ``StallTimeout``
reset / protocol error / closed mid-body                ``UpstreamDisconnected``
======================================================  ===========================================

One ``aiohttp.ClientSession`` per event loop (up to 1,000 connections, like the current SDK's
pool). A proxy from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` is honoured as httpx does, read
once at start (aiohttp's ``trust_env`` would re-read the environment and ``~/.netrc`` on every
request). ``stream.aclose()`` returns a fully read connection to the pool and closes any other at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

import chatproxy
from chatproxy.errors import (
    ConfigurationError,
    StallTimeout,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    parse_retry_after,
    status_error,
)
from chatproxy.upstream.base import PerLoop, UpstreamRequest
from chatproxy.upstream.common import describe_chain, error_code, request_body, resolve_api_key
from chatproxy.upstream.sse import SSEStream

__all__ = ["RawUpstream"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Connections per event loop (the current SDK's default pool size).
MAX_CONNECTIONS = 1000
#: An error answer's body is read up to this size, for its error code.
ERROR_BODY_BYTES = 64 * 1024

_BODY_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


class RawUpstream:
    """:class:`~chatproxy.upstream.base.Upstream` speaking the OpenAI API over aiohttp directly."""

    def __init__(self, *, base_url: str | None, api_key: str | None) -> None:
        base = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        url = base.rstrip("/") + "/chat/completions"
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"UPSTREAM.BASE_URL must be an http(s) URL, not {base!r}")
        self.name = "raw/aiohttp"
        self._url = url
        headers = {
            "Authorization": f"Bearer {resolve_api_key(api_key, base_url, None)}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": f"chatproxy/{chatproxy.__version__}",
        }
        for header, variable in (("OpenAI-Organization", "OPENAI_ORG_ID"), ("OpenAI-Project", "OPENAI_PROJECT_ID")):
            if os.environ.get(variable):
                headers[header] = os.environ[variable]
        self._headers = headers
        self._proxy = _proxy_for(url)
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop(_new_session, lambda s: not s.closed)

    def __repr__(self) -> str:
        return f"<RawUpstream {self.name} url={self._url!r}>"

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        """The JSON request body of one attempt."""
        body: dict[str, Any] = {"model": request.model, "messages": list(request.messages), "stream": True}
        extra, want_usage = request_body(request.params, request.extra_body)
        if want_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(extra)
        return body

    def _stream(self, response: aiohttp.ClientResponse) -> RawStream:
        """The reader of an accepted answer's body."""
        return RawStream(response)

    async def open(self, request: UpstreamRequest) -> RawStream:
        body = self._body(request)
        connect = request.connect_timeout
        # No total timeout: the caller's watchdog bounds the attempt; a read timeout only if asked.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=request.read_timeout
        )
        try:
            response = await self._sessions.get().post(
                self._url, data=orjson.dumps(body), headers=self._headers, timeout=timeout, allow_redirects=False,
                proxy=self._proxy,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # no headers yet
            raise UpstreamConnectError(describe_chain(exc)) from exc
        if response.status >= 400:
            raise await _status_error(response, connect)
        if "text/event-stream" not in response.headers.get("Content-Type", ""):
            response.close()
            raise UpstreamDisconnected(f"HTTP {response.status} answer is not text/event-stream")
        return self._stream(response)

    async def aclose(self) -> None:
        """Close this loop's session. Sessions of other loops close with their loop."""
        session = self._sessions.pop()
        if session is not None:
            await session.close()


def _new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout())


def _proxy_for(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (``HTTPS_PROXY`` & co., ``NO_PROXY``), if any."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def _status_error(response: aiohttp.ClientResponse, patience: float) -> UpstreamError:
    """The error for an HTTP error answer; its body is read (briefly, bounded) for the error code."""
    code = None
    try:
        async with asyncio.timeout(patience):
            raw = await response.content.read(ERROR_BODY_BYTES)
        code = error_code(orjson.loads(raw))
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError):
        pass  # no usable body: the status says enough
    finally:
        response.close()
    detail = f"HTTP {response.status}" + (f" ({code})" if code else "")
    return status_error(response.status, detail, retry_after=parse_retry_after(response.headers), code=code)


class RawStream(SSEStream):
    """The body of one streamed answer, read straight from the aiohttp response."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        super().__init__(_BODY_ERRORS)

    def _body_chunks(self) -> AsyncIterator[bytes]:
        return self._response.content.iter_any()

    def _body_error(self, exc: BaseException) -> UpstreamError:
        if self._closed:
            return UpstreamDisconnected("stream closed by caller")
        if isinstance(exc, TimeoutError):  # aiohttp's SocketTimeoutError included
            return StallTimeout(f"{describe_chain(exc)} while reading the body")
        return UpstreamDisconnected(describe_chain(exc))

    async def _close_response(self) -> None:
        response = self._response
        with contextlib.suppress(Exception):  # the socket is gone either way; nothing to report
            if response.content.at_eof():
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()  # closes the socket now, even under a pending read

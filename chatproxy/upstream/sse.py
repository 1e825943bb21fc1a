"""The OpenAI streaming body, read as raw SSE lines: the adapters that see the body's bytes share it.

Per chunk: one ``find`` and slice per line, one ``orjson.loads`` and a few dict lookups -- no SDK
chunk object, whose construction costs more per chunk than this whole path (bench/README.md,
"Upstream paths"). Subclasses give the bytes (:meth:`SSEStream._body_chunks`), the transport's error
classes, and map those errors to chatproxy's (:meth:`SSEStream._body_error`). What the stream yields and raises:

* per chunk the item :meth:`BodyStream._take_choices` makes of it (a text, or the ``choices`` list
  when the chunk carries tool calls, reasoning, a refusal, logprobs or other choices);
  ``finish_reason`` and ``usage`` are recorded;
* the end at ``data: [DONE]`` (the rest of the body is drained briefly so the connection can be
  reused), or at the end of the body if a ``finish_reason`` was seen; an end of body with neither is
  a truncated answer (``UpstreamDisconnected``);
* a line that is not JSON, or not a chunk object: ``UpstreamDisconnected``; an event or line past
  4 MiB: ``UpstreamDisconnected``;
* an in-stream ``{"error": {...}}`` object: ``UpstreamStatusError(0)`` (retryable).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from chatproxy.errors import UpstreamDisconnected, UpstreamError, UpstreamStatusError
from chatproxy.upstream.base import BodyStream, Item
from chatproxy.upstream.common import error_code

__all__ = ["EventSplitter", "SSEStream"]

# After ``data: [DONE]`` the body normally ends within the same read; waiting this long for the end
# lets the connection go back to the pool, and a server that keeps the body open costs no more.
_DRAIN_SECONDS = 0.25
# A chunk is a few hundred bytes; an event or line beyond this is a broken (or hostile) server.
_MAX_EVENT_BYTES = 4 * 1024 * 1024


class EventSplitter:
    """Cuts a Server-Sent Events byte stream into the data of its events, as the bytes arrive.

    :meth:`feed` takes the next bytes and returns the data of every event they complete (its
    ``data:`` lines joined by newlines; an event ends at a blank line); comments and other fields
    are skipped. An event or a line past 4 MiB raises ``UpstreamDisconnected``: the buffer stays
    bounded whatever the server sends.
    """

    __slots__ = ("_buf", "unfinished")

    def __init__(self) -> None:
        self._buf = b""
        #: The data of the event being read (no blank line after it yet), None between events.
        self.unfinished: bytes | None = None

    def feed(self, raw: bytes) -> list[bytes]:
        buf = self._buf
        search = len(buf)  # what is left of buf holds no newline
        buf = buf + raw if buf else raw
        data = self.unfinished
        events: list[bytes] = []
        start = 0
        while (end := buf.find(b"\n", search)) >= 0:
            line = buf[start:end]
            start = search = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                if data is None:
                    data = value
                else:  # several data lines make one event, joined by newlines
                    data += b"\n" + value
                    if len(data) > _MAX_EVENT_BYTES:
                        raise UpstreamDisconnected("event too large")
            elif not line and data is not None:  # a blank line ends the event
                events.append(data)
                data = None
        self.unfinished = data
        self._buf = buf = buf[start:] if start else buf
        if len(buf) > _MAX_EVENT_BYTES:
            raise UpstreamDisconnected("line too long")
        return events


class SSEStream(BodyStream):
    """:class:`BodyStream` of an OpenAI chat-completion SSE body."""

    __slots__ = ("_errors",)

    def __init__(self, errors: tuple[type[BaseException], ...]) -> None:
        self._errors = errors  # what a body read may raise (TimeoutError included); see _body_error
        super().__init__()

    def _body_chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes, as they arrive."""
        raise NotImplementedError(f"{type(self).__name__} must implement _body_chunks()")

    def _body_error(self, exc: BaseException) -> UpstreamError:
        """The chatproxy error for one of ``errors`` raised while reading the body."""
        raise NotImplementedError(f"{type(self).__name__} must implement _body_error()")

    async def _iterate(self) -> AsyncGenerator[Item, None]:
        # Hot path: per chunk one find/slice per line, one orjson.loads and a few dict lookups.
        loads = orjson.loads
        malformed = (orjson.JSONDecodeError, AttributeError, TypeError, IndexError, KeyError)
        chunks = self._body_chunks()
        events = EventSplitter()
        split = events.feed
        done = False
        try:
            async for raw in chunks:
                for payload in split(raw):
                    if payload == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = loads(payload)
                        if chunk.get("error"):
                            raise UpstreamStatusError(0, "in-stream error" + _code_suffix(chunk))
                        usage = chunk.get("usage")
                        if usage:
                            self.usage = usage
                        choices = chunk.get("choices")
                        if not choices:
                            continue  # e.g. the usage chunk
                        item = self._take_choices(choices)
                    except malformed:
                        raise UpstreamDisconnected("malformed chunk") from None
                    if item is not None:
                        yield item
                if done:
                    break
            if done or events.unfinished == b"[DONE]":
                await self._drain(chunks)
                return
            if self.finish_reason is None:
                raise UpstreamDisconnected("body ended without [DONE] or finish_reason")
        except UpstreamError:
            raise
        except self._errors as exc:
            raise self._body_error(exc) from exc

    async def _drain(self, chunks: AsyncIterator[bytes]) -> None:
        try:
            async with asyncio.timeout(_DRAIN_SECONDS):
                async for _ in chunks:
                    pass
        except self._errors:  # TimeoutError included
            pass  # the answer is complete; aclose() closes whatever is left


def _code_suffix(chunk: dict[str, Any]) -> str:
    code = error_code(chunk)
    return f" ({code})" if code else ""

"""The small interface every upstream adapter implements.

The stream core talks to an upstream only through :class:`Upstream` and :class:`UpstreamStream`;
which openai SDK generation (or raw HTTP client) sits behind them is the adapter's business.

Contract for adapters:

* ``await upstream.open(request)`` sends one chat-completion request with ``stream=True`` and
  returns once the response headers are in. HTTP errors raise here, as :mod:`chatproxy.errors`
  exceptions. SDK-level retries are always disabled: chatproxy owns retries.
* Iterating the returned stream yields, per chunk, one :data:`Item`: the text of a content delta
  of choice 0 as a plain ``str`` when that is all the chunk carries (the common case: no wrapper
  object on the per-chunk path), else the chunk's ``choices`` list exactly as parsed (tool-call,
  reasoning and refusal deltas, logprobs, choices other than 0). Chunks that carry nothing
  (the role chunk, the finish chunk, the usage chunk) are skipped. When the iteration ends
  normally, ``finish_reason`` (choice 0's) and ``usage`` hold what the upstream reported.
  A failure mid-stream raises a :mod:`chatproxy.errors` exception.
* ``await stream.aclose()`` closes the HTTP response and its connection at once, whether or not it
  was read to the end; it is idempotent and is always called by the core (also on cancellation).
* ``await upstream.aclose()`` releases shared clients/sessions at shutdown.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import AsyncGeneratorType
from typing import Any, Generic, Protocol, TypeVar, cast

T = TypeVar("T")

#: What an upstream stream yields per chunk: a text delta of choice 0, or the chunk's ``choices``
#: (a list of OpenAI choice objects: ``{"index", "delta", "logprobs", "finish_reason"}``).
Item = str | list[Any]

# Delta fields other than ``content`` that make a chunk more than text (``function_call``: the
# deprecated single-function form is not asked for, but a value is never dropped silently).
_PART_FIELDS = ("tool_calls", "reasoning_content", "reasoning", "refusal", "function_call")


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One attempt's request, already validated and resolved."""

    model: str
    messages: Sequence[Mapping[str, Any]]
    #: Optional OpenAI parameters (``temperature``, ``max_tokens``, ``seed``), only those given.
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Merged into the request body as-is (``CHATPROXY["UPSTREAM"]["EXTRA_BODY"]``).
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    #: TCP/TLS connect timeout, seconds.
    connect_timeout: float = 5.0
    #: Socket-read safety net in seconds; chatproxy's own watchdog is tighter. None: no limit.
    read_timeout: float | None = None
    #: Longest this attempt may take in all (the rest of the stream's deadline), seconds. Adapters
    #: whose SDK only knows a total timeout use it so a healthy answer is never cut early.
    total_timeout: float = 300.0


class UpstreamStream(Protocol):
    """The body of one streamed answer."""

    finish_reason: str | None
    usage: dict[str, Any] | None

    def __aiter__(self) -> AsyncIterator[Item]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """A source of streamed chat completions."""

    #: Short name for logs and records, e.g. ``"openai-current/httpx"``.
    name: str

    async def open(self, request: UpstreamRequest) -> UpstreamStream: ...

    async def aclose(self) -> None: ...


class BodyStream:
    """Base of the adapters' streams: the items come from :meth:`_iterate`, an async generator
    subclasses write; :meth:`aclose` closes the HTTP response first (that is what closes the
    socket at once, even while another task is blocked reading it: that read then fails), then
    whichever generators are idle (a running generator cannot be closed from outside)."""

    __slots__ = ("_closed", "_gen", "finish_reason", "usage")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._closed = False
        # AsyncGeneratorType (not the AsyncGenerator protocol) knows ag_running, used by aclose().
        self._gen = cast("AsyncGeneratorType[Item, None]", self._iterate())

    def _iterate(self) -> AsyncGenerator[Item, None]:
        raise NotImplementedError(f"{type(self).__name__} must implement _iterate()")

    async def _close_response(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _close_response()")

    def _generators(self) -> tuple[AsyncGeneratorType[Any, None], ...]:
        """The generators to close after the response (the adapter's own first)."""
        return (self._gen,)

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._gen

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close_response()
        for generator in self._generators():
            if not generator.ag_running:
                await generator.aclose()

    def _take_choices(self, choices: list[Any]) -> Item | None:
        """What a chunk's non-empty ``choices`` yield (see the module: the text, the list, or None);
        records choice 0's ``finish_reason``."""
        if len(choices) == 1:
            choice = choices[0]
            if not choice.get("index"):
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reason = reason
                delta = choice.get("delta")
                if not delta:
                    return None
                text = delta.get("content")
                # The hot path: a lone content delta ({"content": ...}, maybe with null fields).
                if not choice.get("logprobs") and (
                    (text is not None and len(delta) == 1) or not any(map(delta.get, _PART_FIELDS))
                ):
                    return text if text and type(text) is str else None
                return choices
        for choice in choices:
            if not choice.get("index") and choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return choices


class PerLoop(Generic[T]):
    """One client (session, SDK client) per running event loop: connection pools cannot cross loops.

    ``make()`` builds one; ``usable(client)`` says whether a kept one can still be used."""

    def __init__(self, make: Callable[[], T], usable: Callable[[T], bool] = lambda client: True) -> None:
        self._make = make
        self._usable = usable
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or not self._usable(client):
            client = self._clients[loop] = self._make()
        return client

    def pop(self) -> T | None:
        """Forget this loop's client and return it (to be closed), if there was one."""
        return self._clients.pop(asyncio.get_running_loop(), None)

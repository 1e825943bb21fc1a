"""What both APIs of the simulator share: accounting, the request log, and stream delivery.

* :class:`SimState` -- connection and request accounting, per-fingerprint attempt counts and the
  instance's fault rules (one per simulator instance, so two instances never share anything).
* :class:`Delivery` -- runs one streamed answer's timing faults (silences with keepalives, stalls,
  resets, in-band errors) around frames the API handler formats; the handler calls
  :meth:`Delivery.faults_after` before each counted unit, so the per-chunk cost is a comparison
  or two when no fault is due.
* :func:`abort` -- drop a connection with an RST or a FIN.

Only aiohttp, orjson (optional) and the stdlib.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import socket
import struct
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from .faults import FaultRules, Faults, fingerprint, parse_directives

try:  # orjson is optional: ~10x faster per chunk, but the simulator must not depend on it.
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - exercised only where orjson is missing
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def loads(data: bytes) -> Any:
        return json.loads(data)


LOG_SIZE = 500

# When the server aborts a connection (reset_after) it first lets the last written chunk reach the
# client: an RST can make the peer's kernel drop data it received but the application had not yet
# read, which would make "reset after N chunks" deliver fewer than N.
_RESET_FLUSH_DELAY = 0.02


# --------------------------------------------------------------------------------------------
# State and accounting
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """One completion request in the log (serialised as-is by ``/_sim/stats``)."""

    id: int
    started: float
    stream: bool = False
    model: str | None = None
    fingerprint: str | None = None
    attempt: int | None = None
    faults: dict[str, Any] = field(default_factory=dict)
    faults_applied: bool = False
    rule: str | None = None  # the model glob of the instance rule that applied, if any
    api: str = "chat.completions"  # or "messages" (the Anthropic Messages API)
    continuation: bool = False
    status: int | None = None
    headers_sent: float | None = None
    first_chunk: float | None = None
    chunks: int = 0
    keepalives: int = 0
    closed: float | None = None
    outcome: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class _Conn:
    opened: float
    api: bool = False  # carried at least one request outside /_sim/
    control: bool = False  # carried at least one /_sim/ request


class SimState:
    """Counters, the request log and per-fingerprint attempt counts of one simulator."""

    def __init__(self, rules: Mapping[str, str] | None = None) -> None:
        self.rules = FaultRules(rules)
        self._conns: dict[object, _Conn] = {}
        self._ids = itertools.count(1)
        self.active_requests = 0
        self.reset()

    def reset(self) -> None:
        """Forget the log, totals and attempt counts, and go back to the start-up fault rules.
        Live connections/requests stay counted."""
        self.rules.reset()
        self.total_requests = 0
        self.log: deque[RequestRecord] = deque(maxlen=LOG_SIZE)
        self.attempts: dict[str, int] = {}

    # -- connections (called from the aiohttp Server hooks) ----------------------------------
    def connection_made(self, handler: object) -> None:
        self._conns[handler] = _Conn(opened=time.monotonic())

    def connection_lost(self, handler: object) -> None:
        self._conns.pop(handler, None)

    def mark(self, request: web.BaseRequest, *, control: bool) -> None:
        conn = self._conns.get(request.protocol)
        if conn is not None:
            if control:
                conn.control = True
            else:
                conn.api = True

    # -- requests ----------------------------------------------------------------------------
    def new_record(self, stream: bool) -> RequestRecord:
        record = RequestRecord(id=next(self._ids), started=time.monotonic(), stream=stream)
        self.total_requests += 1
        self.log.append(record)
        return record

    def next_attempt(self, fp: str) -> int:
        self.attempts[fp] = self.attempts.get(fp, 0) + 1
        return self.attempts[fp]

    def snapshot(self) -> dict[str, Any]:
        """The ``/_sim/stats`` document. Times are this process's ``time.monotonic()``."""
        return {
            "now": time.monotonic(),
            "open_connections": sum(1 for c in self._conns.values() if c.api or not c.control),
            "tcp_connections": len(self._conns),
            "active_requests": self.active_requests,
            "total_requests": self.total_requests,
            "attempts": dict(self.attempts),
            "rules": self.rules.as_list(),
            "requests": [asdict(r) for r in self.log],
        }


STATE_KEY: web.AppKey[SimState] = web.AppKey("chatproxy_sim_state", SimState)


def install_connection_hooks(server: web.Server, state: SimState) -> None:
    """Count TCP connections from aiohttp's connection-level hooks.

    ``RequestHandler.connection_made/connection_lost`` call these two methods on the ``Server``
    instance for every socket; wrapping them on the instance (aiohttp builds the ``Server`` inside
    ``AppRunner``, so it cannot be subclassed) gives exact open/close events without touching
    aiohttp internals beyond this documented-by-use pair.
    """
    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        state.connection_made(handler)
        made(handler, transport)

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        state.connection_lost(handler)
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


def abort(request: web.BaseRequest, *, reset: bool) -> None:
    """Drop the TCP connection without finishing the HTTP body.

    ``reset=True`` sets SO_LINGER to 0 so ``abort()`` sends an RST (the client sees ECONNRESET);
    ``reset=False`` closes gracefully with a FIN (the client sees an incomplete chunked body).
    """
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()
    else:
        transport.close()


async def abort_and_wait(request: web.BaseRequest, record: RequestRecord, *, reset: bool) -> None:
    """Record the outcome, drop the connection, and wait for the cancellation that follows."""
    await asyncio.sleep(_RESET_FLUSH_DELAY)
    # Set before aborting: abort() cancels this very handler (handler_cancellation).
    record.outcome = "reset" if reset else "closed"
    abort(request, reset=reset)
    # abort() schedules connection_lost, which cancels this handler: wait for that here rather
    # than returning into aiohttp with a half-written response.
    await asyncio.sleep(1.0)


def select_faults(state: SimState, record: RequestRecord, model: str, last_user_raw: str, header: str | None) -> Faults:
    """The request's faults: the instance rule for ``model`` under the message's directives
    under the ``X-Sim`` header; ``times`` applied; the record filled in. Raises DirectiveError."""
    rule = state.rules.match(model)
    faults = parse_directives(last_user_raw, header, rule.tokens if rule is not None else None)
    if rule is not None:
        rule.hits += 1
        record.rule = rule.model
    record.model = model
    record.fingerprint = fingerprint(last_user_raw, model, faults)
    record.attempt = state.next_attempt(record.fingerprint)
    record.faults = faults.given()
    record.faults_applied = (faults.times is None or record.attempt <= faults.times) and (
        faults.only is None or fnmatch.fnmatchcase(model, faults.only))
    return faults if record.faults_applied else faults.clean()


#: What :meth:`Delivery.faults_after` tells the writer: go on, stop (the response is over), or
#: end the answer now with a content-filter finish.
GO_ON, OVER, FILTERED = 0, 1, 2


class Delivery:
    """Timing faults of one streamed answer; the API handler formats the frames.

    ``keepalive`` is the frame sent while silent (an SSE comment for OpenAI, ``event: ping`` for
    Messages); ``error_frame`` the in-band error of ``error_after``.
    """

    __slots__ = ("_checked", "error_frame", "faults", "keepalive", "record", "request", "resp")

    def __init__(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        record: RequestRecord,
        faults: Faults,
        *,
        keepalive: bytes,
        error_frame: bytes,
    ) -> None:
        self.request, self.resp, self.record, self.faults = request, resp, record, faults
        self.keepalive, self.error_frame = keepalive, error_frame
        self._checked = -1

    async def silence(self, seconds: float) -> None:
        """Stay quiet for ``seconds``, but send keepalive frames if the faults ask for them."""
        if seconds <= 0:
            return
        interval = self.faults.keepalive
        if not interval:
            await asyncio.sleep(seconds)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            if remaining < interval:
                await asyncio.sleep(remaining)
                return
            await asyncio.sleep(interval)
            await self.resp.write(self.keepalive)
            self.record.keepalives += 1

    async def faults_after(self, sent: int) -> int:
        """Run the faults due after ``sent`` counted units (once per value of ``sent``)."""
        if sent == self._checked:
            return GO_ON
        self._checked = sent
        faults = self.faults
        if faults.stall_after == sent:
            await self.silence(faults.stall)
        if faults.malformed_after == sent:
            await self.resp.write(b"data: {not json\n\n")
        if faults.error_after == sent:
            await self.resp.write(self.error_frame)
            await self.resp.write_eof()
            self.record.outcome = "error_event"
            return OVER
        if faults.close_after == sent or faults.reset_after == sent:
            await abort_and_wait(self.request, self.record, reset=faults.reset_after == sent)
            return OVER
        if faults.content_filter_after == sent:
            return FILTERED
        return GO_ON


async def non_stream_faults(
    request: web.BaseRequest, record: RequestRecord, faults: Faults, counted: int, malformed: bytes
) -> tuple[str | None, web.Response | None]:
    """Wait the generation time, then run the stream fault a non-streamed answer of ``counted``
    units runs into: a reset or close drops the connection, ``malformed`` is the 200 response
    whose body is ``malformed``; ``error`` and ``content_filter`` are the caller's to answer."""
    delay = non_stream_delay(faults, counted)
    if delay:
        await asyncio.sleep(delay)
    fault = non_stream_fault(faults, counted)
    if fault in ("reset", "closed"):
        await abort_and_wait(request, record, reset=fault == "reset")
        raise ConnectionResetError("simulated reset")  # pragma: no cover - cancelled first
    if fault == "malformed":
        record.outcome, record.status = "malformed", 200
        return fault, web.Response(body=malformed, content_type="application/json", headers=response_headers(record))
    return fault, None


def response_headers(record: RequestRecord) -> dict[str, str]:
    """Debugging headers of every answer (request id, attempt, fingerprint, model)."""
    return {
        "x-request-id": f"req_sim{record.id:08d}",
        "request-id": f"req_sim{record.id:08d}",
        "x-sim-request-id": str(record.id),
        "x-sim-attempt": str(record.attempt),
        "x-sim-fingerprint": record.fingerprint or "",
        "openai-model": record.model or "",
    }


def non_stream_fault(faults: Faults, counted: int) -> str | None:
    """The stream fault a non-streamed answer of ``counted`` units runs into first, if any:
    ``reset``, ``closed``, ``error``, ``malformed`` or ``content_filter``."""

    def due(after: int | None) -> bool:
        return after is not None and after <= counted

    if due(faults.reset_after):
        return "reset"
    if due(faults.close_after):
        return "closed"
    if due(faults.error_after):
        return "error"
    if due(faults.malformed_after):
        return "malformed"
    if due(faults.content_filter_after):
        return "content_filter"
    return None


def non_stream_delay(faults: Faults, counted: int) -> float:
    """The generation time a non-streamed answer waits before its headers, as the real APIs do."""
    stalled = faults.stall_after is not None and faults.stall_after <= counted
    return faults.first_delay + faults.gap * counted + (faults.stall if stalled else 0.0)

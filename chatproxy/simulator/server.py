"""The simulator: an OpenAI-compatible chat-completions server with a fault menu.

Contract
--------
Endpoints (``base_url = http://HOST:PORT/v1``):

* ``POST /v1/chat/completions`` -- ``stream: true`` answers the real OpenAI wire format
  (``data: {chat.completion.chunk}`` events, a role chunk, one word per content chunk, a final
  chunk with ``finish_reason``, an optional usage chunk, ``data: [DONE]``); ``stream: false``
  answers a ``chat.completion`` object. Any ``Authorization: Bearer <anything>`` is accepted; no
  key gives 401. Any model name is accepted.
* ``GET /v1/models`` -- a short model list (also needs a key, like the real API).
* ``GET /_sim/stats`` -- connection and request accounting (see :meth:`SimState.snapshot`).
* ``POST /_sim/reset`` -- clears the request log, counters and per-fingerprint attempt counts.

Faults are chosen per request with ``[[sim ...]]`` blocks in the last user message or the
``X-Sim`` header (:mod:`.faults`, ``docs/simulator.md``). The answer text is deterministic
(:mod:`.text`).

Accounting guarantees, which the test-suite relies on to prove that nothing leaks:

* ``open_connections`` counts TCP connections currently open from clients of the API (idle
  keep-alive ones included), via hooks on aiohttp's connection-level ``Server`` object, so the
  count drops the moment the client's socket closes. Connections that only ever carried
  ``/_sim/*`` requests (e.g. the stats poll itself) are not counted; ``tcp_connections`` counts
  everything.
* ``active_requests`` counts completion handlers still running. The app runs with
  ``handler_cancellation=True`` (aiohttp >= 3.9 defaults to False), so a client disconnect cancels
  the handler at once even while it sleeps in a stall, and the ``finally`` block records outcome
  ``client_disconnected``.

Only aiohttp, orjson (optional) and the stdlib are imported: the simulator must run where
neither Django nor openai is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import socket
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from .faults import DirectiveError, Faults, describe, fingerprint, parse_directives
from .text import answer_tokens, content_text, continuation_tokens

try:  # orjson is optional: much faster per chunk, but the simulator must not depend on it.
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - exercised only where orjson is missing
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def _loads(data: bytes) -> Any:
        return json.loads(data)

else:

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)


__all__ = [
    "MODELS",
    "SimState",
    "SimulatorServer",
    "build_app",
    "main",
    "serve",
]

log = logging.getLogger("chatproxy.simulator")

#: Names listed by ``GET /v1/models``; completions accept any model name.
MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "sim-fast", "sim-slow", "o1-sim")
SYSTEM_FINGERPRINT = "fp_sim0001"
LOG_SIZE = 500
READY_PREFIX = "chatproxy simulator listening on "

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

    def __init__(self) -> None:
        self._conns: dict[object, _Conn] = {}
        self._ids = itertools.count(1)
        self.active_requests = 0
        self.reset()

    def reset(self) -> None:
        """Forget the log, totals and attempt counts. Live connections/requests stay counted."""
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
            "requests": [asdict(r) for r in self.log],
        }


STATE_KEY: web.AppKey[SimState] = web.AppKey("chatproxy_sim_state", SimState)


def _install_connection_hooks(server: web.Server, state: SimState) -> None:
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


# --------------------------------------------------------------------------------------------
# OpenAI-shaped errors
# --------------------------------------------------------------------------------------------

# status -> (type, code, message). Shapes follow what api.openai.com sends; messages say
# "(simulated)" so that nobody mistakes them for a real outage while debugging.
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated)."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden (simulated)."),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it (simulated).",
    ),
    408: ("timeout", None, "Request timed out (simulated)."),
    409: ("invalid_request_error", None, "Conflict (simulated)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (simulated)."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that! (simulated)",
    ),
    502: ("server_error", None, "Bad gateway (simulated)."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later (simulated)."),
    504: ("server_error", None, "Gateway timeout (simulated)."),
    529: ("overloaded_error", None, "Overloaded (simulated)."),
}


_UNSET: Any = object()


def error_body(
    status: int, message: str | None = None, *, code: str | None = _UNSET, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    default_type = "invalid_request_error" if status < 500 else "server_error"
    etype, ecode, emessage = _STATUS_ERRORS.get(status, (default_type, None, f"Error {status} (simulated)."))
    return {
        "error": {
            "message": message or emessage,
            "type": etype,
            "param": param,
            "code": ecode if code is _UNSET else code,
        }
    }


def error_response(
    status: int, message: str | None = None, *, headers: Mapping[str, str] | None = None, **kw: Any
) -> web.Response:
    return web.Response(
        status=status,
        body=_dumps(error_body(status, message, **kw)),
        content_type="application/json",
        headers=headers,
    )


# --------------------------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass(slots=True)
class _Parsed:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    seed: Any
    max_tokens: int | None
    last_user_raw: str
    faults: Faults


def _parse_request(body: Any, x_sim: str | None) -> _Parsed:
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m for m in messages)
    ):
        raise _BadRequest(
            "'messages' must be a non-empty array of message objects with a 'role'.", "messages"
        )
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _BadRequest(f"Invalid '{name}': expected an integer >= 1.", name)
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    options = body.get("stream_options") or {}
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    last_user_raw = content_text(last_user.get("content")) if last_user else ""
    try:
        faults = parse_directives(last_user_raw, x_sim)
    except DirectiveError as exc:
        raise _BadRequest(f"Simulator directive error: {exc}", "messages") from None
    return _Parsed(
        model=model,
        messages=messages,
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        seed=body.get("seed"),
        max_tokens=max_tokens,
        last_user_raw=last_user_raw,
        faults=faults,
    )


def _plan_tokens(req: _Parsed, salt: int, record: RequestRecord) -> tuple[list[str], str]:
    """The tokens this response carries and its finish_reason.

    A trailing assistant message asks for a continuation: the full answer is generated for the
    conversation without it, and only the remainder is sent (starting with one overlapping word)
    when the partial is a prefix of that answer.
    """
    messages = req.messages
    partial: str | None = None
    if messages[-1].get("role") == "assistant":
        partial = content_text(messages[-1].get("content"))
        messages = messages[:-1]
    tokens = answer_tokens(messages, req.seed, salt, req.faults.chunks)
    if partial is not None:
        rest = continuation_tokens(tokens, partial)
        record.continuation = rest is not None
        if rest is not None:
            tokens = rest
    if req.max_tokens is not None and req.max_tokens < len(tokens):
        return tokens[: req.max_tokens], "length"
    return tokens, "stop"


def _usage(messages: Sequence[Mapping[str, Any]], completion_tokens: int) -> dict[str, int]:
    # A word count is a fine stand-in for a tokenizer: tests only need plausible, stable numbers.
    prompt = sum(len(content_text(m.get("content")).split()) + 4 for m in messages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


def _bearer_ok(request: web.BaseRequest) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(key.strip())


_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


async def models_handler(request: web.Request) -> web.Response:
    request.app[STATE_KEY].mark(request, control=False)
    if not _bearer_ok(request):
        return error_response(401, _NO_KEY, code=None)
    created = 1_700_000_000
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "chatproxy-simulator"}
        for name in MODELS
    ]
    return web.Response(body=_dumps({"object": "list", "data": data}), content_type="application/json")


async def stats_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.mark(request, control=True)
    return web.Response(body=_dumps(state.snapshot()), content_type="application/json")


async def reset_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.mark(request, control=True)
    state.reset()
    return web.Response(body=b'{"ok":true}', content_type="application/json")


async def completions_handler(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: validation, fault selection, then stream or not."""
    state = request.app[STATE_KEY]
    state.mark(request, control=False)
    record = state.new_record(stream=False)
    state.active_requests += 1
    try:
        if not _bearer_ok(request):
            record.outcome, record.status = "status", 401
            return error_response(401, _NO_KEY, code=None)
        try:
            raw = await request.read()
            try:
                body = _loads(raw)
            except ValueError:
                raise _BadRequest("We could not parse the JSON body of your request.") from None
            req = _parse_request(body, request.headers.get("X-Sim"))
        except _BadRequest as exc:
            record.outcome, record.status, record.detail = "status", exc.status, exc.message
            return error_response(exc.status, exc.message, param=exc.param)

        record.stream, record.model = req.stream, req.model
        record.fingerprint = fingerprint(req.last_user_raw, req.model, req.faults)
        record.attempt = state.next_attempt(record.fingerprint)
        record.faults = req.faults.given()
        record.faults_applied = req.faults.times is None or record.attempt <= req.faults.times
        if not record.faults_applied:
            req.faults = req.faults.clean()
        faults = req.faults

        if faults.headers_delay:
            await asyncio.sleep(faults.headers_delay)
        if faults.status is not None:
            headers = {}
            if faults.retry_after_header is not None:
                headers["Retry-After"] = faults.retry_after_header
            if faults.retry_after_ms is not None:
                headers["retry-after-ms"] = str(faults.retry_after_ms)
            record.outcome, record.status = "status", faults.status
            return error_response(faults.status, headers=headers)

        salt = record.attempt if faults.diverge else 0
        tokens, finish = _plan_tokens(req, salt, record)
        if req.stream:
            return await _stream(request, req, record, tokens, finish)
        return await _complete(request, req, record, tokens, finish)
    except asyncio.CancelledError:
        # handler_cancellation: the client went away (or the server is shutting down).
        if record.outcome is None:
            record.outcome = "client_disconnected"
        raise
    except ConnectionError:
        # A write raced with the disconnect before the cancellation arrived.
        if record.outcome is None:
            record.outcome = "client_disconnected"
        raise
    except Exception as exc:
        if record.outcome is None:
            record.outcome, record.detail = "server_error", repr(exc)
        log.exception("simulator request #%s failed", record.id)
        raise
    finally:
        state.active_requests -= 1
        record.closed = time.monotonic()
        _log_record(record)


def _response_headers(record: RequestRecord) -> dict[str, str]:
    return {
        "x-request-id": f"req_sim{record.id:08d}",
        "x-sim-request-id": str(record.id),
        "x-sim-attempt": str(record.attempt),
        "x-sim-fingerprint": record.fingerprint or "",
        "openai-model": record.model or "",
    }


def _abort(request: web.BaseRequest, *, reset: bool) -> None:
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


async def _stream(
    request: web.Request, req: _Parsed, record: RequestRecord, tokens: list[str], finish: str
) -> web.StreamResponse:
    faults = req.faults
    loop = asyncio.get_running_loop()
    chunk_id = f"chatcmpl-sim{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    usage_field: dict[str, Any] = {"usage": None} if req.include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        payload = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **usage_field,
        }
        return b"data: " + _dumps(payload) + b"\n\n"

    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **_response_headers(record),
        },
    )
    await resp.prepare(request)
    record.status, record.headers_sent = 200, time.monotonic()

    async def silence(seconds: float) -> None:
        """Stay quiet for ``seconds``, but send ``: keepalive`` comments if asked to."""
        if seconds <= 0:
            return
        if not faults.keepalive:
            await asyncio.sleep(seconds)
            return
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            if remaining < faults.keepalive:
                await asyncio.sleep(remaining)
                return
            await asyncio.sleep(faults.keepalive)
            await resp.write(b": keepalive\n\n")
            record.keepalives += 1

    async def faults_after(sent: int) -> bool:
        """Run the faults due after ``sent`` content chunks; True if the response is over."""
        if faults.stall_after == sent:
            await silence(faults.stall)
        if faults.malformed_after == sent:
            await resp.write(b"data: {not json\n\n")
        if faults.error_after == sent:
            body = error_body(
                500, "The server had an error while processing your request (simulated in-stream error)."
            )
            await resp.write(b"data: " + _dumps(body) + b"\n\n")
            await resp.write_eof()
            record.outcome = "error_event"
            return True
        if faults.close_after == sent or faults.reset_after == sent:
            reset = faults.reset_after == sent
            await asyncio.sleep(_RESET_FLUSH_DELAY)
            # Set before aborting: abort() cancels this very handler (handler_cancellation).
            record.outcome = "reset" if reset else "closed"
            _abort(request, reset=reset)
            # abort() schedules connection_lost, which cancels this handler: wait for that here
            # rather than returning into aiohttp with a half-written response.
            await asyncio.sleep(1.0)
            return True
        return False

    await silence(faults.first_delay)
    await resp.write(chunk({"role": "assistant", "content": "", "refusal": None}))
    record.first_chunk = time.monotonic()
    for sent, token in enumerate(tokens):
        if await faults_after(sent):
            return resp
        await silence(faults.gap)
        await resp.write(chunk({"content": token}))
        record.chunks = sent + 1
    if await faults_after(len(tokens)):
        return resp
    await resp.write(chunk({}, finish))
    if req.include_usage:
        usage_chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [],
            "usage": _usage(req.messages, len(tokens)),
        }
        await resp.write(b"data: " + _dumps(usage_chunk) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    record.outcome = "complete"
    return resp


async def _complete(
    request: web.Request, req: _Parsed, record: RequestRecord, tokens: list[str], finish: str
) -> web.StreamResponse:
    """Non-streaming answer. Stream faults are mapped to their nearest non-stream equivalent."""
    faults = req.faults
    n = len(tokens)

    def due(after: int | None) -> bool:
        return after is not None and after <= n

    # The whole generation time passes before the headers, as with the real API.
    delay = faults.first_delay + faults.gap * n + (faults.stall if due(faults.stall_after) else 0.0)
    if delay:
        await asyncio.sleep(delay)
    if due(faults.reset_after) or due(faults.close_after):
        reset = due(faults.reset_after)
        record.outcome = "reset" if reset else "closed"
        _abort(request, reset=reset)
        await asyncio.sleep(1.0)  # connection_lost cancels this handler meanwhile
        raise ConnectionResetError("simulated reset")  # pragma: no cover - cancelled first
    if due(faults.error_after):
        record.outcome, record.status = "status", 500
        return error_response(500)
    headers = _response_headers(record)
    if due(faults.malformed_after):
        record.outcome, record.status = "malformed", 200
        return web.Response(
            body=b'{"id": "chatcmpl-sim", not json', content_type="application/json", headers=headers
        )
    text = "".join(tokens)
    body = {
        "id": f"chatcmpl-sim{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": _usage(req.messages, n),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    record.outcome, record.status, record.chunks = "complete", 200, n
    record.first_chunk = record.headers_sent = time.monotonic()
    return web.Response(body=_dumps(body), content_type="application/json", headers=headers)


def _log_record(record: RequestRecord) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    took = (record.closed or 0.0) - record.started
    log.info(
        "#%d %s model=%s attempt=%s%s outcome=%s status=%s chunks=%d %.3fs",
        record.id,
        "stream" if record.stream else "plain",
        record.model,
        record.attempt,
        f" faults=[{describe(record.faults)}]{'' if record.faults_applied else ' (not applied: times)'}"
        if record.faults
        else "",
        record.outcome,
        record.status,
        record.chunks,
        took,
    )


@web.middleware
async def _openai_404(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes answer in OpenAI's error shape instead of aiohttp's HTML page."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    except web.HTTPMethodNotAllowed:
        return error_response(405, f"Method {request.method} not allowed for {request.path}")


def build_app(state: SimState | None = None) -> web.Application:
    """The aiohttp application (without connection accounting: that needs the runner)."""
    app = web.Application(middlewares=[_openai_404], client_max_size=16 * 1024 * 1024)
    app[STATE_KEY] = state or SimState()
    app.router.add_post("/v1/chat/completions", completions_handler)
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/_sim/stats", stats_handler)
    app.router.add_post("/_sim/reset", reset_handler)
    return app


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


class SimulatorServer:
    """The simulator in the current event loop (the subprocess runner uses this too).

    ``async with SimulatorServer(port=0) as sim: sim.base_url`` -- ``port=0`` picks a free port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 0.1) -> None:
        self.host, self.port = host, port
        self.state = SimState()
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return self.state.snapshot()

    async def start(self) -> SimulatorServer:
        app = build_app(self.state)
        # handler_cancellation: notice client disconnects at once, even mid-stall.
        # shutdown_timeout: stalled streams must not hold up a stop for aiohttp's default 60 s.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=self._shutdown_timeout
        )
        await runner.setup()
        assert runner.server is not None
        _install_connection_hooks(runner.server, self.state)
        site = web.TCPSite(runner, self.host, self.port, backlog=1024)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SimulatorServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(
    host: str = "127.0.0.1", port: int = 8001, *, ready: Callable[[SimulatorServer], None] | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or cancellation). ``ready`` is called once the port is bound."""
    server = await SimulatorServer(host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows / non-main thread
            pass
    try:
        if ready is not None:
            ready(server)
        await stop.wait()
    finally:
        await server.stop()


def build_parser(prog: str = "python -m chatproxy.simulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="OpenAI-compatible streaming simulator with a fault menu."
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI options (shared with the ``chatproxy_simulator`` management command)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8001, help="port to bind; 0 picks a free one (default 8001)"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")


def run(host: str = "127.0.0.1", port: int = 8001, *, quiet: bool = False) -> None:
    """Blocking entry point: serve until SIGINT/SIGTERM.

    Prints exactly one line to stdout once listening, ``chatproxy simulator listening on
    http://HOST:PORT/v1`` (flushed), which :class:`~chatproxy.simulator.process.SimulatorProcess`
    reads to learn the port when started with ``--port 0``.
    """
    if not quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    elif quiet:
        log.setLevel(logging.WARNING)

    def ready(server: SimulatorServer) -> None:
        print(f"{READY_PREFIX}{server.base_url}", flush=True)

    try:
        asyncio.run(serve(host, port, ready=ready))
    except KeyboardInterrupt:  # pragma: no cover - signal arrived before the handler was set
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args.host, args.port, quiet=args.quiet)
    return 0

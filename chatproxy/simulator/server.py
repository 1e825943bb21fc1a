"""The simulator: an OpenAI-compatible (and Anthropic-compatible) server with a fault menu.

Contract
--------
Endpoints (``base_url = http://HOST:PORT/v1``):

* ``POST /v1/chat/completions`` -- OpenAI's Chat Completions (:mod:`.chat`): streamed in the real
  wire format or a whole ``chat.completion``; tools, usage, JSON output, ``n``, logprobs,
  reasoning and refusals. Any ``Authorization: Bearer <anything>`` is accepted; no key gives 401.
  Any model name is accepted.
* ``POST /v1/messages`` -- Anthropic's Messages API (:mod:`.messages`), same answers and faults.
* ``GET /v1/models`` -- a short model list (also needs a key, like the real API).
* ``GET /_sim/stats`` -- connection and request accounting (see :meth:`SimState.snapshot`).
* ``POST /_sim/reset`` -- clears the request log, counters and per-fingerprint attempt counts, and
  restores the start-up fault rules.
* ``GET|POST|DELETE /_sim/faults`` -- this instance's fault rules: ``POST {"model": GLOB,
  "fault": "status=503"}`` sets the rule for GLOB (replacing one for the same GLOB), ``DELETE``
  with ``{"model": GLOB}`` (or ``?model=GLOB``) removes it, without a model removes every rule.
  Each answers ``{"rules": [...]}``; a bad rule is a 400 naming the key.

Faults are chosen per request with ``[[sim ...]]`` blocks in the last user message or the
``X-Sim`` header, over the instance's rule for the model (:mod:`.faults`, ``docs/simulator.md``).
The answer is deterministic (:mod:`.answers`, :mod:`.text`).

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
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from . import chat, messages
from .faults import DirectiveError, describe
from .wire import STATE_KEY, RequestRecord, SimState, dumps, install_connection_hooks, loads, response_headers

__all__ = [
    "MODELS",
    "SimState",
    "SimulatorServer",
    "build_app",
    "error_body",
    "main",
    "serve",
]

error_body = chat.error_body
error_response = chat.error_response

log = logging.getLogger("chatproxy.simulator")

#: Names listed by ``GET /v1/models``; completions accept any model name.
MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "sim-fast", "sim-slow", "o1-sim", "sim-reasoner")
READY_PREFIX = "chatproxy simulator listening on "


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
    data = [{"id": name, "object": "model", "created": created, "owned_by": "chatproxy-simulator"} for name in MODELS]
    return web.Response(body=dumps({"object": "list", "data": data}), content_type="application/json")


async def stats_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.mark(request, control=True)
    return web.Response(body=dumps(state.snapshot()), content_type="application/json")


async def reset_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.mark(request, control=True)
    state.reset()
    return web.Response(body=b'{"ok":true}', content_type="application/json")


async def faults_handler(request: web.Request) -> web.Response:
    """``GET`` lists, ``POST`` sets, ``DELETE`` removes this instance's fault rules."""
    state = request.app[STATE_KEY]
    state.mark(request, control=True)
    body: Any = {}
    if request.can_read_body:
        try:
            body = loads(await request.read())
        except ValueError:
            return error_response(400, 'The body must be JSON: {"model": GLOB, "fault": DIRECTIVES}.')
        if not isinstance(body, dict):
            return error_response(400, 'The body must be a JSON object: {"model": GLOB, "fault": DIRECTIVES}.')
    model = body.get("model", request.query.get("model"))
    try:
        if request.method == "POST":
            state.rules.set(model if model is not None else "*", body.get("fault", ""))
        elif request.method == "DELETE":
            state.rules.delete(model)
    except DirectiveError as exc:
        return error_response(400, f"Simulator fault rule error: {exc}", param="fault")
    return web.Response(body=dumps({"rules": state.rules.as_list()}), content_type="application/json")


async def completions_handler(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: validation, fault selection, then stream or not."""
    return await _handle(request, "chat.completions")


async def messages_handler(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: the same, in the Anthropic Messages API."""
    return await _handle(request, "messages")


def _prefilled(body: Any) -> bool:
    """Whether a Chat Completions body ends with an assistant message (a partial answer to continue)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return False
    last = messages[-1]
    return isinstance(last, dict) and last.get("role") == "assistant"


async def _handle(request: web.Request, api: str) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.mark(request, control=False)
    record = state.new_record(stream=False)
    record.api = api
    state.active_requests += 1
    anthropic = api == "messages"
    try:
        early = _refuse_early(request, anthropic)
        if early is not None:
            record.outcome, record.status, record.detail = "status", early.status, early.text
            return early
        header = request.headers.get("X-Sim")
        try:
            try:
                body = loads(await request.read())
            except ValueError:
                raise chat.BadRequest("We could not parse the JSON body of your request.") from None
            if anthropic:
                answer, stream = messages.parse_messages(body, record, state, header)
            else:
                parsed, _ = chat.parse_chat(body, record, state, header)
                answer, stream = parsed.answer, parsed.stream
        except chat.BadRequest as exc:
            record.outcome, record.status, record.detail = "status", exc.status, exc.message
            if anthropic:
                return messages.error_response(exc.status, exc.message)
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
        except messages.MessagesError as exc:
            record.outcome, record.status, record.detail = "status", exc.status, exc.message
            return messages.error_response(exc.status, exc.message)
        record.stream = stream
        faults = answer.faults
        if faults.headers_delay:
            await asyncio.sleep(faults.headers_delay)
        if faults.status is not None or faults.error is not None:
            headers = chat.retry_headers(faults)
            record.outcome = "status"
            if faults.error is not None and anthropic:
                response = messages.preset_error(faults.error, answer.model, headers)
            elif faults.error is not None:
                response = chat.preset_error(faults.error, answer.model, headers)
            elif anthropic:
                response = messages.status_error(faults.status or 500, headers)
            else:
                response = error_response(faults.status or 500, headers=headers)
            record.status = response.status
            return response
        if faults.no_prefill and not anthropic and _prefilled(body):
            # What api.openai.com answers to the continuation flag it does not know.
            record.outcome, record.status, record.continuation = "status", 400, True
            index = len(body["messages"]) - 1
            return error_response(400, f"Additional properties are not allowed ('prefix' was unexpected) - "
                                       f"'messages.{index}'", param="messages", code=None)
        headers = response_headers(record)
        if anthropic:
            if stream:
                return await messages.stream_messages(request, answer, record, headers)
            return await messages.complete_messages(request, answer, record, headers)
        if stream:
            return await chat.stream_chat(request, parsed, record, headers)
        return await chat.complete_chat(request, parsed, record, headers)
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


def _refuse_early(request: web.BaseRequest, anthropic: bool) -> web.Response | None:
    """The answer to a request without credentials (or, for Messages, without a version)."""
    if anthropic:
        problem = messages.check_headers(request)
        return None if problem is None else messages.error_response(problem.status, problem.message)
    return None if _bearer_ok(request) else error_response(401, _NO_KEY, code=None)


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
    app.router.add_post("/v1/messages", messages_handler)
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/_sim/stats", stats_handler)
    app.router.add_post("/_sim/reset", reset_handler)
    for method in ("GET", "POST", "DELETE"):
        app.router.add_route(method, "/_sim/faults", faults_handler)
    return app


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


class SimulatorServer:
    """The simulator in the current event loop (the subprocess runner uses this too).

    ``async with SimulatorServer(port=0) as sim: sim.base_url`` -- ``port=0`` picks a free port.
    ``faults={"gpt-4o": "status=503"}`` are this instance's start-up rules (model glob ->
    directives); they come back on every reset. A bad rule raises ``DirectiveError`` here.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shutdown_timeout: float = 0.1,
        faults: Mapping[str, str] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.state = SimState(faults)
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
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        assert runner.server is not None
        install_connection_hooks(runner.server, self.state)
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
    host: str = "127.0.0.1",
    port: int = 8001,
    *,
    ready: Callable[[SimulatorServer], None] | None = None,
    faults: Mapping[str, str] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or cancellation). ``ready`` is called once the port is bound."""
    server = await SimulatorServer(host, port, faults=faults).start()
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
    parser = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible streaming simulator with a fault menu.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI options (shared with the ``chatproxy_simulator`` management command)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to bind; 0 picks a free one (default 8001)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")
    parser.add_argument(
        "--fault",
        nargs=2,
        action="append",
        default=[],
        metavar=("MODEL", "DIRECTIVES"),
        help="a start-up fault rule: every request for MODEL (a name or glob) gets DIRECTIVES, "
        "e.g. --fault gpt-4o 'status=503' (repeatable; see docs/simulator.md)",
    )


def rules_from_args(pairs: Sequence[Sequence[str]]) -> dict[str, str]:
    """``--fault MODEL DIRECTIVES`` pairs as the ``faults`` mapping, validated (SystemExit if bad)."""
    from .faults import FaultRules

    rules = {model: fault for model, fault in pairs}
    try:
        FaultRules(rules)
    except DirectiveError as exc:
        raise SystemExit(f"--fault: {exc}") from None
    return rules


def run(
    host: str = "127.0.0.1", port: int = 8001, *, quiet: bool = False, faults: Mapping[str, str] | None = None
) -> None:
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
        asyncio.run(serve(host, port, ready=ready, faults=faults))
    except KeyboardInterrupt:  # pragma: no cover - signal arrived before the handler was set
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args.host, args.port, quiet=args.quiet, faults=rules_from_args(args.fault))
    return 0

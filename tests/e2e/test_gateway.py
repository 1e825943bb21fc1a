"""The seed's failure, replayed behind a gateway: nginx with a 3 s ``proxy_read_timeout``.

Every fault below is far longer than nginx's deadline. For each one, the same conversation is sent
at once over the four ways in (native SSE, OpenAI-compatible stream, OpenAI-compatible JSON,
WebSocket) through nginx to two workers, under Daphne and under uvicorn. Each stream must end
with 200 (101 for WebSocket) and exactly the simulator's answer; nginx must log no 502/504 and no
"upstream timed out"; the client must never wait as long as nginx's deadline for a byte; and
afterwards the simulator must hold no open connection (abandoned attempts are closed at once).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from chatproxy.simulator.faults import fingerprint
from chatproxy.simulator.text import answer_tokens
from tests.e2e import clients, report
from tests.e2e.stack import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    NGINX_READ_TIMEOUT,
    SLOW_FIRST_TOKEN,
    SLOW_MODEL,
    WORKER_TIMEOUTS,
    Site,
)

pytestmark = pytest.mark.e2e

TRANSPORTS = ("sse", "openai-stream", "openai-json", "websocket")
CHUNKS = 12
GAP = 0.05  # seconds between words: a stream that takes a while, like a real model
# A client must get *something* well inside nginx's deadline: a keepalive leaves after KEEPALIVE
# (1 s) of silence; the margin absorbs scheduling noise on a busy 2-core machine.
SILENCE_LIMIT = NGINX_READ_TIMEOUT - 0.5


@dataclass(frozen=True)
class Scenario:
    name: str
    directive: str
    attempts: int  # upstream requests the simulator must see per stream
    reasons: tuple[str, ...] = ()  # retry reasons the native transports must show
    model: str = "gpt-4o-mini"
    min_total: float = 0.0  # a legitimately slow answer cannot be faster than this
    min_keepalives: int = 0  # a silent upstream must be bridged by keepalives


SCENARIOS = [
    # attempt 1 would answer after 8 s: FIRST_TOKEN (2 s) gives up on it, attempt 2 answers.
    Scenario("first token after 8 s", "first_delay=8 times=1", 2, ("first_token",)),
    # attempt 1 goes silent for 20 s after 4 words: STALL (1 s) gives up; the restart reproduces
    # the 4 words (held back, not repeated) and continues.
    Scenario("stall of 20 s mid-stream", "stall_after=4 stall=20 times=1", 2, ("stall",)),
    Scenario("connection reset mid-stream", "reset_after=4 times=1", 2, ("disconnected",)),
    Scenario("503 burst (3 in a row)", "status=503 times=3", 4, ("upstream_error",) * 3),
    # The same burst, each 503 after 0.9 s: retries come closer together than KEEPALIVE (1 s), so
    # only the retries themselves can keep the client's connection warm.
    Scenario("slow 503 burst (3 x 0.9 s)", "headers_delay=0.9 status=503 times=3", 4, ("upstream_error",) * 3),
    # Legitimately long: 40 words 0.1 s apart take 4 s, longer than nginx's 3 s. Nothing is ever
    # silent upstream, yet the JSON answer (stream: false) shows the client nothing until the end.
    Scenario("long answer (40 words over 4 s)", "chunks=40 gap=0.1", 1, min_total=4.0),
    # Legitimately slow: the first token after 4 s, longer than nginx's 3 s, under a profile that
    # waits 6 s. No retry: only the keepalives stop nginx from answering 504.
    Scenario("first token after 4 s (> nginx 3 s), no retry", "first_delay=4", 1, model=SLOW_MODEL,
             min_total=4.0, min_keepalives=3),
]


@dataclass
class Planned:
    transport: str
    tag: str
    content: str
    model: str
    expected: str
    outcome: clients.Outcome | None = None
    error: BaseException | None = None
    upstream: list[dict[str, Any]] = field(default_factory=list)


def plan(site: Site, scenario: Scenario, transport: str) -> Planned:
    tag = f"{site.kind}-{transport}-{uuid.uuid4().hex[:8]}"
    question = f"Tell me about lighthouses ({tag})"
    # A later key wins: a scenario may override the default length and pace.
    content = f"{question} [[sim chunks={CHUNKS} gap={GAP} {scenario.directive}]]".replace(" ]]", "]]")
    chunks = int(re.findall(r"chunks=(\d+)", content)[-1])
    expected = "".join(answer_tokens([{"role": "user", "content": content}], n=chunks))
    return Planned(transport, tag, content, scenario.model, expected)


async def run(site: Site, session: aiohttp.ClientSession, cookie: str, p: Planned) -> None:
    body = {"model": p.model, "messages": [{"role": "user", "content": p.content}]}
    try:
        if p.transport == "sse":
            p.outcome = await clients.sse_stream(session, body, p.tag)
        elif p.transport == "openai-stream":
            p.outcome = await clients.openai_stream(session, site.api_key, body, p.tag)
        elif p.transport == "openai-json":
            p.outcome = await clients.openai_json(session, site.api_key, body, p.tag)
        else:
            p.outcome = await clients.websocket_stream(site.ws_url, site.url, cookie, body, p.tag)
    except Exception as exc:  # reported per transport below
        p.error = exc


def check(scenario: Scenario, p: Planned, silence_limit: float = SILENCE_LIMIT) -> list[str]:
    """What is wrong with one stream (empty when it behaved)."""
    if p.error is not None:
        return [f"{p.transport}: {type(p.error).__name__}: {p.error}"]
    out = p.outcome
    assert out is not None
    problems = []
    expected_status = 101 if p.transport == "websocket" else 200
    if out.status != expected_status:
        problems.append(f"{p.transport}: status {out.status}, body {out.body[:300]!r}")
    if out.final is None or out.final.get("event") != "done":
        problems.append(f"{p.transport}: did not end with done: {out.final}")
    if out.text != p.expected:
        problems.append(f"{p.transport}: text {out.text!r} != expected {p.expected!r}")
    if out.worst_silence >= silence_limit:
        problems.append(f"{p.transport}: the client waited {out.worst_silence:.2f}s for a byte")
    if out.total < scenario.min_total:
        problems.append(f"{p.transport}: finished in {out.total:.2f}s, faster than the fault allows")
    if p.transport in ("sse", "websocket") and tuple(out.retry_reasons) != scenario.reasons:
        problems.append(f"{p.transport}: retry reasons {out.retry_reasons} != {list(scenario.reasons)}")
    if p.transport == "openai-stream" and out.events[-1:] != ["[DONE]"]:
        problems.append(f"{p.transport}: no [DONE] at the end: {out.events[-3:]}")
    if out.keepalives < scenario.min_keepalives:
        problems.append(f"{p.transport}: only {out.keepalives} keepalives during a {out.total:.1f}s wait")
    if len(p.upstream) != scenario.attempts:
        problems.append(f"{p.transport}: the simulator saw {len(p.upstream)} attempts, expected {scenario.attempts}")
    else:
        *abandoned, last = p.upstream
        if last["outcome"] != "complete":
            problems.append(f"{p.transport}: the last attempt ended {last['outcome']}")
        for record, following in zip(abandoned, p.upstream[1:], strict=False):
            # An abandoned attempt's connection is closed before the next attempt is sent.
            if record["closed"] is None or record["closed"] > following["started"] + 0.25:
                problems.append(f"{p.transport}: attempt {record['attempt']} was not closed before the retry: {record}")
    return problems


def record_rows(site: Site, scenario: Scenario, planned: list[Planned], access: list[str],
                silence_limit: float = SILENCE_LIMIT) -> None:
    for p in planned:
        out = p.outcome
        report.record(report.Row(
            server=site.kind, scenario=scenario.name, transport=p.transport,
            status=out.status if out else 0,
            result="done" if not check(scenario, p, silence_limit) else "FAILED",
            worst_silence=out.worst_silence if out else float("nan"),
            total=out.total if out else float("nan"),
            first_byte=out.first_byte if out else float("nan"),
            keepalives=out.keepalives if out else 0,
            attempts=len(p.upstream), worker=worker_of(site, access, p.tag),
        ))


async def stream_all(site: Site, planned: list[Planned]) -> None:
    """Run the planned streams at once, through nginx, as the logged-in admin user."""
    session = await clients.admin_session(site.url, ADMIN_USER, ADMIN_PASSWORD)
    try:
        cookie = clients.cookie_header(session, site.url)
        await asyncio.gather(*(run(site, session, cookie, p) for p in planned))
    finally:
        await session.close()


async def settle(sim, nginx_logs, planned: list[Planned]) -> list[str]:
    """Wait until nothing is open upstream and nginx logged every stream; returns the new access lines."""
    # No attempt still running, no socket held (idle pooled connections are closed by the
    # simulator after 0.5 s; a stalled or forgotten one would stay open).
    stats = await sim.await_until(lambda s: s["active_requests"] == 0 and s["open_connections"] == 0, timeout=5)
    for p in planned:
        fp = fingerprint(p.content, p.model)
        p.upstream = sorted((r for r in stats["requests"] if r["fingerprint"] == fp), key=lambda r: r["attempt"])
    # nginx writes a request's access line when it ends; WebSocket lines once the socket closed.
    deadline = time.monotonic() + 3
    access = nginx_logs.access()
    while time.monotonic() < deadline and not all(f"id={p.tag} " in "\n".join(access) for p in planned):
        await asyncio.sleep(0.05)  # polling a file nginx appends to: there is nothing to await
        access = nginx_logs.access()
    return access


def log_problems(nginx_logs, planned: list[Planned], access: list[str]) -> list[str]:
    problems = [f"nginx logged no request for {p.tag}" for p in planned if f"id={p.tag} " not in "\n".join(access)]
    problems += [f"nginx access log: {line}" for line in nginx_logs.bad_access()]
    problems += [f"nginx error log: {line}" for line in nginx_logs.bad_errors()]
    return problems


def worker_of(site: Site, access_lines: list[str], tag: str) -> str:
    """Which worker nginx sent the stream to (its name, from the access log's upstream address)."""
    names = {f"127.0.0.1:{w.port}": w.name for w in site.workers}
    for line in access_lines:
        if f"id={tag} " in line and "/admin/" not in line:
            address = line.split("upstream=", 1)[1].split(" ", 1)[0]
            return names.get(address, address)
    return "?"


COLD = Scenario("cold workers: first streams", "", 1)


async def test_cold_workers(site: Site, sim, nginx_logs) -> None:
    """The first streams fresh workers serve, one after another (round robin alternates workers).

    Runs first for each site, so the fault scenarios below are measured on warm workers. Regression:
    a worker used to import the openai SDK inside its first stream, on the event loop (1-3 s of
    silence); ``project/asgi.py`` now imports it at start (``chatproxy.upstream.preload()``).
    """
    planned = [plan(site, COLD, transport) for transport in TRANSPORTS]
    for p in planned:
        await stream_all(site, [p])
    access = await settle(sim, nginx_logs, planned)
    record_rows(site, COLD, planned, access)
    problems = [problem for p in planned for problem in check(COLD, p)]
    problems += log_problems(nginx_logs, planned, access)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name.split(" (")[0].replace(" ", "-"))
async def test_fault_through_nginx(request: pytest.FixtureRequest, site: Site, sim, nginx_logs,
                                   scenario: Scenario) -> None:
    if scenario.model == SLOW_MODEL:
        request.getfixturevalue("slow_start_profile")
    planned = [plan(site, scenario, transport) for transport in TRANSPORTS]
    await stream_all(site, planned)
    access = await settle(sim, nginx_logs, planned)
    record_rows(site, scenario, planned, access)
    problems = [problem for p in planned for problem in check(scenario, p)]
    problems += log_problems(nginx_logs, planned, access)
    assert not problems, "\n".join(problems)


async def test_round_robin_and_clean_logs(site: Site) -> None:
    """Across the whole run: both workers served streams; nginx never answered 502/504 or timed out."""
    access = site.access_log.read_text().splitlines()
    streams = [line for line in access if "/chat/" in line or "/ws/chat/" in line]
    workers = {line.split("upstream=", 1)[1].split(" ", 1)[0] for line in streams}
    assert workers >= {f"127.0.0.1:{w.port}" for w in site.workers}, workers
    bad = [line for line in access if " status=502 " in line or " status=504 " in line
           or "upstream_status=502" in line or "upstream_status=504" in line]
    assert not bad, bad
    errors = [line for line in site.error_log.read_text().splitlines() if "upstream timed out" in line]
    assert not errors, errors


def test_worker_timeouts_are_gateway_safe() -> None:
    # The premise of every scenario above.
    assert WORKER_TIMEOUTS["KEEPALIVE"] < NGINX_READ_TIMEOUT <= WORKER_TIMEOUTS["GATEWAY"]
    assert SLOW_FIRST_TOKEN > 4.0 > NGINX_READ_TIMEOUT


async def test_idle_websocket_outlives_the_redis_block(site: Site, sim) -> None:
    """A WebSocket idle for longer than channels_redis's 5 s BZPOPMIN block stays usable.

    Regression: with redis-py 8 (5 s default socket timeout) every consumer idle for 5 s died
    with close code 1011. The client pings every second, as a browser's idle socket would need
    some traffic to get past nginx's own 3 s idle deadline.
    """
    import websockets

    session = await clients.admin_session(site.url, ADMIN_USER, ADMIN_PASSWORD)
    cookie = clients.cookie_header(session, site.url)
    await session.close()
    tag = f"{site.kind}-idle-{uuid.uuid4().hex[:8]}"
    content = f"Tell me about canals ({tag}) [[sim chunks=3]]"
    async with websockets.connect(f"{site.ws_url}/ws/chat/", origin=site.url, additional_headers={"Cookie": cookie},
                                  ping_interval=1.0, ping_timeout=2.0) as socket:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(socket.recv(), 6.5)  # nothing arrives, and nothing breaks
        messages = [{"role": "user", "content": content}]
        await socket.send(json.dumps({"type": "chat", "request_id": tag, "messages": messages}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(socket.recv(), 10)))
    assert frames[-1]["type"] == "done"
    assert "".join(f["text"] for f in frames if f["type"] == "delta") == "".join(answer_tokens(messages, n=3))

"""Operations on a bad day, on a real worker: Redis stopped mid-load, the worker stopped mid-stream.

Each test runs the sample project under a real Daphne or uvicorn, streaming from the simulator.
The Redis tests give the worker a redis-server of their own (Django's cache and the Channels
layer), stop it while streams run and start it again on the same port with the same data
(append-only file), as a restarted Redis with persistence would come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatproxy.simulator.process import SimulatorProcess
from chatproxy.simulator.text import answer_tokens
from tests.e2e.stack import (
    HOST,
    Proc,
    find_program,
    free_port,
    redis_ping,
    simulator_port,
    start_simulator,
    wait_until,
)
from tests.servers import AppServer, simulator_env
from tests.sseclient import SSEResponse, parse_block, read_sse

pytestmark = pytest.mark.e2e

TIMEOUTS = {"CONNECT": 1.0, "FIRST_TOKEN": 1.0, "STALL": 0.5, "DEADLINE": 20.0, "BACKOFF_INITIAL": 0.05,
            "BACKOFF_MAX": 0.2, "KEEPALIVE": 0.3, "GATEWAY": 2.0}
SERVERS = ("daphne", "uvicorn")
_unique = itertools.count()


class Redis:
    """A redis-server of the test's own that can be stopped and started again on its port, data kept."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        cmd = [find_program("redis-server"), "--port", str(self.port), "--bind", HOST, "--save", "",
               "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--dir", str(self.tmp)]
        self.proc = Proc("redis", cmd, self.tmp / "redis.log").start()
        wait_until(lambda: redis_ping(self.port), "redis", [self.proc], timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture(scope="module")
def module_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """This module's own simulator, which closes idle keep-alive connections after 0.5 s as real
    servers do (``tests.e2e.simulator_main``); only its HTTP accounting is used from here."""
    tmp = tmp_path_factory.mktemp("operations-sim")
    port = free_port()
    proc = start_simulator(tmp, port)
    try:
        wait_until(lambda: simulator_port(proc) == port, "simulator", [proc], timeout=20)
        yield SimulatorProcess(HOST, port)
    finally:
        proc.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


def chat(chunks: int, gap: float = 0.05) -> tuple[dict[str, object], str]:
    """A request body and the exact answer the simulator gives it."""
    content = f"Tell me about harbours #{next(_unique)} [[sim chunks={chunks} gap={gap}]]"
    messages = [{"role": "user", "content": content}]
    return {"messages": messages}, "".join(answer_tokens(messages, n=chunks))


async def sse_post(session: aiohttp.ClientSession, body: dict[str, object]) -> SSEResponse:
    started = time.monotonic()
    async with session.post("/chat/stream/", json=body) as response:
        return await read_sse(response, started)


def assert_logged_once(log: str, *phrases: str) -> None:
    """Each of ``phrases`` is in the worker's log exactly once (one line per outage), and no traceback."""
    for phrase in phrases:
        assert log.count(phrase) == 1, f"{phrase!r} is logged {log.count(phrase)} times:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


def assert_complete(result: SSEResponse, expected: str) -> None:
    assert result.status == 200, result.body[:300]
    assert [e.event for e in result.events][-1] == "done", result.events[-3:]
    assert result.text == expected
    ids = [e.id for e in result.events]
    assert ids == list(range(1, len(ids) + 1)), ids


@pytest.mark.parametrize("server", SERVERS)
async def test_redis_outage_mid_load(server: str, redis: Redis, module_simulator) -> None:
    """Redis stops while streams run and new ones arrive, then comes back; no restart of the worker.

    In flight: complete and exact. New during the outage: served, complete and exact (limits fail
    open by default). Resume during the outage: 503 ``unavailable`` JSON with ``Retry-After`` (or,
    for a stream of this worker whose asked-for events memory still holds, the exact replay). One
    warning for the outage and one line for its end, whatever the number of calls that failed.
    After it: a resume from the start of a stream that ran through the outage replays it exactly
    from the store (the journal kept and wrote what it could not write meanwhile).
    """
    env = simulator_env(module_simulator.base_url, timeouts=TIMEOUTS, limits={"MAX_STREAMS_PER_USER": 50},
                        resume={"GRACE": 0.5, "TTL": 60})
    app = AppServer({**env, "REDIS_URL": redis.url}, server=server, capture_stderr=True).start()
    try:
        async with aiohttp.ClientSession(app.url) as session:
            # Ended before the outage, and written out: during it only the store has it.
            earlier_body, earlier_text = chat(3, gap=0.0)
            earlier = await sse_post(session, earlier_body)
            assert_complete(earlier, earlier_text)
            earlier_id = earlier.named("start")[0].data["stream_id"]
            await asyncio.sleep(0.3)  # the journal's last write of it (every 0.1 s)

            # In flight: 2.5 s answers; Redis stops once each has sent its first words.
            in_flight = [chat(50) for _ in range(3)]
            started: list[asyncio.Event] = [asyncio.Event() for _ in in_flight]
            ids: list[str] = ["" for _ in in_flight]

            async def run(index: int) -> SSEResponse:
                body = in_flight[index][0]
                begun = time.monotonic()
                async with session.post("/chat/stream/", json=body) as response:
                    result = SSEResponse(response.status, dict(response.headers), begun)
                    buffer = ""
                    async for chunk in response.content.iter_any():
                        result.body += chunk
                        buffer += chunk.decode()
                        while "\n\n" in buffer:
                            block, buffer = buffer.split("\n\n", 1)
                            item = parse_block(block, time.monotonic())
                            if item is None:
                                continue
                            result.items.append(item)
                            if item.event == "start":
                                ids[index] = item.data["stream_id"]
                            if item.event == "delta":
                                started[index].set()
                return result

            tasks = [asyncio.create_task(run(i)) for i in range(len(in_flight))]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
            redis.stop()
            outage_began = time.monotonic()

            new = [chat(8) for _ in range(4)]
            during = await asyncio.gather(*(sse_post(session, body) for body, _ in new))
            async with session.get(f"/chat/stream/{earlier_id}/", headers={"Last-Event-ID": "0"}) as response:
                resume_status, resume_body = response.status, await response.json()
                retry_after = response.headers.get("Retry-After")
            # A stream running in this worker: from memory when memory still holds what is asked
            # for, else (its start was written out and dropped) the same 503, never a cut stream.
            async with session.get(f"/chat/stream/{ids[0]}/", headers={"Last-Event-ID": "0"}) as response:
                local_resume = await read_sse(response, time.monotonic())
            finished = await asyncio.wait_for(asyncio.gather(*tasks), 15)
            assert time.monotonic() - outage_began < 4.0  # the outage covered the streams' ends

            for result, (_, expected) in zip(during, new, strict=True):
                assert_complete(result, expected)
            for result, (_, expected) in zip(finished, in_flight, strict=True):
                assert_complete(result, expected)
            if local_resume.status == 200:
                assert_complete(local_resume, in_flight[0][1])
            else:
                assert local_resume.status == 503 and b'"unavailable"' in local_resume.body, local_resume.body
            assert resume_status == 503, resume_body
            assert resume_body["error"]["code"] == "unavailable"
            assert "try again" in resume_body["error"]["message"].lower()
            assert retry_after is not None and retry_after.isdigit()

            redis.start()
            # The journal notices first (it retries every 0.5 s) and writes what it kept.
            await asyncio.to_thread(wait_until, lambda: "is reachable again" in app.log(), "the recovery", [], 5.0)
            # Back without a restart: a new stream is served, and the stream that ran through the
            # outage is replayed whole from the store.
            body, expected = chat(5)
            assert_complete(await sse_post(session, body), expected)

            async def replayed() -> SSEResponse | None:
                async with session.get(f"/chat/stream/{ids[1]}/", headers={"Last-Event-ID": "0"}) as response:
                    result = await read_sse(response, time.monotonic())
                return result if result.status == 200 and result.text == in_flight[1][1] else None

            deadline = time.monotonic() + 5
            replay = await replayed()
            while replay is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                replay = await replayed()
            assert replay is not None, "the stream that ran through the outage was never replayable"
            assert_complete(replay, in_flight[1][1])
    finally:
        log = app.log()
        app.stop()
    assert_logged_once(log, "is unreachable", "is reachable again")
    # Nor one line per refused resume (Django logs every 5xx it sees): the outage's line says it.
    assert "Internal Server Error" not in log and " 500 " not in log and "Service Unavailable" not in log, log[-3000:]


@pytest.mark.parametrize("server", SERVERS)
async def test_hung_redis_costs_one_timeout_not_one_per_request(server: str, redis: Redis, module_simulator) -> None:
    """Redis frozen (SIGSTOP: connections are accepted, nothing is answered) for a few seconds.
    The first new stream waits out the cache's socket timeout (2 s in the sample settings); the
    ones after it start at once (calls are skipped for a second after each real failure), all
    answer exactly, and all is well again once Redis thaws."""
    env = simulator_env(module_simulator.base_url, timeouts=TIMEOUTS, limits={"MAX_STREAMS_PER_USER": 50},
                        resume={"GRACE": 0.5, "TTL": 60})
    app = AppServer({**env, "REDIS_URL": redis.url}, server=server, capture_stderr=True).start()
    assert redis.proc is not None and redis.proc.popen is not None
    try:
        async with aiohttp.ClientSession(app.url) as session:
            body, expected = chat(3, gap=0.0)
            assert_complete(await sse_post(session, body), expected)  # the cache's connections are pooled now
            redis.proc.popen.send_signal(signal.SIGSTOP)
            try:
                waits = []
                for _ in range(4):
                    body, expected = chat(3, gap=0.0)
                    result = await sse_post(session, body)
                    assert_complete(result, expected)
                    assert result.first_byte is not None
                    waits.append(result.first_byte - result.started)
            finally:
                redis.proc.popen.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.2)  # past the skipping interval: the next calls reach Redis again
            body, expected = chat(3, gap=0.0)
            assert_complete(await sse_post(session, body), expected)
    finally:
        log = app.log()
        app.stop()
    print(f"{server}: first byte while Redis hangs: {', '.join(f'{w:.2f} s' for w in waits)}")
    assert waits[0] < 4.0, waits  # one socket timeout, not one per cache call
    assert max(waits[1:]) < 1.0, waits  # the others skip the frozen cache
    assert_logged_once(log, "is unreachable", "is reachable again")


SHUTDOWN_NOISE = ("Unclosed client session", "Unclosed connector", "AttributeError", "Traceback",
                  "Task was destroyed but it is pending", "Exception ignored")


async def websocket_chat(url: str, body: dict[str, object]) -> list[dict[str, object]]:
    """One chat over ``/ws/chat/``; the frames until its done/error."""
    import websockets

    ws_url = url.replace("http://", "ws://") + "/ws/chat/"
    frames: list[dict[str, object]] = []
    async with websockets.connect(ws_url, origin=url, open_timeout=5, ping_interval=None) as socket:  # type: ignore[arg-type]
        await socket.send(json.dumps({"type": "chat", "request_id": "r1", **body}))
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(socket.recv(), 5)))
    return frames


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "streaming"])
@pytest.mark.parametrize("server", SERVERS)
async def test_stopped_server_closes_its_upstream_sessions(server: str, in_flight: bool, redis: Redis,
                                                          module_simulator) -> None:
    """SIGTERM to a worker that streamed (SSE and WebSocket answers done; idle for a while, or one
    SSE answer still running): it exits without aiohttp's ``Unclosed client session`` (and its
    connector's ``AttributeError``) on stderr, and the simulator sees every upstream connection
    closed. Regression: an idle Daphne worker printed both when stopped."""
    env = simulator_env(module_simulator.base_url, timeouts=TIMEOUTS, log_level="WARNING")
    app = AppServer({**env, "REDIS_URL": redis.url}, server=server, capture_stderr=True).start()
    try:
        async with aiohttp.ClientSession(app.url) as session:
            body, expected = chat(3, gap=0.0)
            assert_complete(await sse_post(session, body), expected)  # leaves a pooled connection
            body, expected = chat(3, gap=0.0)
            frames = await websocket_chat(app.url, body)
            assert frames[-1]["type"] == "done"
            # A worker usually stops a while after its last answer: the idle pooled connections'
            # keep-alive ends meanwhile (the regression only showed after that).
            await asyncio.sleep(1.5)
            assert app.proc is not None
            if not in_flight:
                app.proc.send_signal(signal.SIGTERM)
            else:
                running, _ = chat(40, gap=0.05)
                async with session.post("/chat/stream/", json=running) as response:
                    await response.content.readuntil(b"event: delta")
                    app.proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(aiohttp.ClientError):
                        async with asyncio.timeout(10):
                            async for _ in response.content.iter_any():
                                pass
        assert app.proc is not None
        await asyncio.to_thread(app.proc.wait, 10)
    finally:
        log = app.log()
        app.stop()
    noise = [line for line in log.splitlines() if any(marker in line for marker in SHUTDOWN_NOISE)]
    assert not noise, log[-4000:]
    # Only this module's workers use this simulator; the stopped one must have left nothing open.
    stats = await module_simulator.await_until(lambda s: s["active_requests"] == 0 and s["open_connections"] == 0)
    assert stats["open_connections"] == 0


KEPT_PROFILE = "ops-kept"
KEPT_MODEL = "sim-ops-1"


def record_count(db_path: str, model: str) -> int:
    with contextlib.closing(sqlite3.connect(db_path, timeout=0.1)) as db:
        return int(db.execute("SELECT count(*) FROM chatproxy_streamrecord WHERE model = ?", (model,)).fetchone()[0])


DB_WAIT = 2.0  # seconds a query waits for SQLite's lock (DJANGO_DB_TIMEOUT)


async def test_locked_database_leaves_streams_alone(module_simulator) -> None:
    """SQLite locked by another process for 4 s (longer than a query waits for it, 2 s): streams
    opened meanwhile start at once under the admin profile loaded before (not the settings'
    timeouts), finish exactly, and their records, refused once, are retried and written once the
    lock is gone. The log says so once per component, not per stream."""
    env = simulator_env(module_simulator.base_url, timeouts=TIMEOUTS, profiles={"REFRESH": 0.5},
                        limits={"MAX_STREAMS_PER_USER": 50})
    app = AppServer({**env, "DJANGO_DB_TIMEOUT": str(DB_WAIT)}, server="daphne", capture_stderr=True).start()
    db_path = app.env["DJANGO_DB_PATH"]
    try:
        app.manage("shell", "-c", "from chatproxy.models import TimeoutProfile; "
                   f"TimeoutProfile.objects.create(name={KEPT_PROFILE!r}, model_pattern='sim-ops*')")
        async with aiohttp.ClientSession(app.url) as session:

            async def ask() -> tuple[SSEResponse, str]:
                body, expected = chat(8)
                return await sse_post(session, {**body, "model": KEPT_MODEL}), expected

            deadline = time.monotonic() + 5
            while True:  # the worker picks the new profile up within PROFILES.REFRESH
                result, _ = await ask()
                if result.named("start")[0].data["profile"] == KEPT_PROFILE or time.monotonic() > deadline:
                    break
            assert result.named("start")[0].data["profile"] == KEPT_PROFILE
            await asyncio.sleep(0.3)  # the records of those streams are written by now
            before = record_count(db_path, KEPT_MODEL)

            locker = sqlite3.connect(db_path, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")
                locked_at = time.monotonic()
                await asyncio.sleep(0.6)  # the snapshot is now due for a re-read, which will fail
                during = await asyncio.gather(*(ask() for _ in range(4)))
                await asyncio.sleep(max(0.0, locked_at + 2 * DB_WAIT - time.monotonic()))
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            for result, expected in during:
                assert_complete(result, expected)
                assert result.named("start")[0].data["profile"] == KEPT_PROFILE
                # A stream that waited for the database would start only after DB_WAIT.
                assert result.first_byte is not None and result.first_byte - result.started < DB_WAIT

            # Written by the worker's record thread once the lock is gone: polled (there is nothing to await).
            written = await asyncio.to_thread(wait_until, lambda: record_count(db_path, KEPT_MODEL) >= before + 4,
                                              "the stream records", [], 8.0, 0.2)
            assert written and record_count(db_path, KEPT_MODEL) == before + 4  # every stream's, none dropped
            await asyncio.sleep(0.6)  # due for a re-read again, which now works
            after, expected = await ask()
            assert_complete(after, expected)
    finally:
        log = app.log()
        app.stop()
    assert_logged_once(log, "timeout profiles could not be loaded", "timeout profiles loaded again",
                       "(stream records) is unreachable", "(stream records) is reachable again")
    assert "(0 stream records dropped meanwhile)" in log, log[-3000:]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


NEVER_READING = 8
LONG_ANSWER = 20_000  # chunks: a few MB of events per stream if memory kept them all


async def test_clients_that_never_read_are_cut_and_cost_bounded_memory(module_simulator) -> None:
    """Clients open long answers and never read a byte (uvicorn: the server waits for them). Each
    is cut once it falls ``MAX_CLIENT_LAG`` events behind (so memory holds at most that many events
    for it), its stream then stops after ``RESUME.GRACE`` (the upstream is closed long before the
    answer's end), and a normal client, their connections still open, gets its exact answer.
    Regression: the streams ran to the end for clients that never read, keeping every event."""
    env = simulator_env(module_simulator.base_url, timeouts={**TIMEOUTS, "DEADLINE": 60.0},
                        limits={"MAX_STREAMS_PER_USER": 1000}, resume={"GRACE": 0.5, "TTL": 60})
    # Small socket buffers on both ends, as on a slow path: what a client does not read backs up
    # into the server quickly, instead of into megabytes of loopback buffers.
    app = AppServer(env, server="uvicorn", capture_stderr=True, send_buffer=16384).start()
    assert app.proc is not None
    sockets: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession(app.url) as session:
            warm_body, warm_text = chat(5, gap=0.0)
            assert_complete(await sse_post(session, warm_body), warm_text)
            module_simulator.reset()
            before = rss_bytes(app.proc.pid)
            for _ in range(NEVER_READING):
                body, _ = chat(LONG_ANSWER, gap=0.0003)  # still streaming when its client is cut
                payload = json.dumps(body).encode()
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
                sock.connect((HOST, app.port))
                sock.sendall(b"POST /chat/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                sockets.append(sock)
            stats = await module_simulator.await_until(
                lambda s: len(s["requests"]) >= NEVER_READING and s["active_requests"] == 0, timeout=30)
            grown = rss_bytes(app.proc.pid) - before
            print(f"worker RSS grew by {grown / 2**20:.1f} MiB for {NEVER_READING} clients that never read")
            body, expected = chat(30, gap=0.02)
            assert_complete(await sse_post(session, body), expected)  # their sockets still open
    finally:
        for sock in sockets:
            sock.close()
        log = app.log()
        app.stop()
    long_ones = stats["requests"]
    assert len(long_ones) == NEVER_READING
    # Cut, then stopped after the grace period: no upstream answer was read to its end.
    assert all(r["outcome"] == "client_disconnected" and r["chunks"] < LONG_ANSWER for r in long_ones), [
        (r["outcome"], r["chunks"]) for r in long_ones]
    # Memory: what is left of processing the answers, not the answers kept (about 69 MiB here when
    # the events stayed in memory for the stuck clients; about 23 MiB once they are cut).
    assert grown < 40 * 2**20, f"the worker grew by {grown / 2**20:.1f} MiB for {NEVER_READING} stuck clients"
    assert "Traceback" not in log, log[-3000:]


DRAINED = 6


async def read_events_until(response: aiohttp.ClientResponse, seen: list[tuple[int, str, dict[str, Any]]],
                            deltas: int) -> None:
    """Read SSE events into ``seen`` until ``deltas`` deltas came (or the body ends)."""
    buffer = ""
    while sum(1 for _, name, _ in seen if name == "delta") < deltas:
        chunk = await response.content.readany()
        if not chunk:
            return
        buffer += chunk.decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            item = parse_block(block, time.monotonic())
            if item is not None and item.kind == "event" and item.id is not None:
                seen.append((item.id, item.event, item.data))


@pytest.mark.parametrize("server", SERVERS)
async def test_stopping_worker_lets_its_streams_finish_for_a_resume_elsewhere(
    server: str, redis: Redis, module_simulator, tmp_path: Path
) -> None:
    """Two workers sharing Redis and the database; SIGTERM to the one running six streams. Their
    clients lose the connection (Daphne) or not (uvicorn waits for them): either way each answer
    ends exactly, read from the stopping worker or resumed on the other one with ``Last-Event-ID``,
    because the stopping worker keeps generating them (``RESUME.DRAIN``) before it exits cleanly.
    Regression: Daphne stopped them at once, and a resume elsewhere ended in an error."""
    env = {**simulator_env(module_simulator.base_url, timeouts=TIMEOUTS, limits={"MAX_STREAMS_PER_USER": 50},
                           resume={"GRACE": 10.0, "DRAIN": 15.0, "TTL": 60}),
           "REDIS_URL": redis.url, "DJANGO_DB_PATH": str(tmp_path / "shared.sqlite3")}
    stopping = AppServer(env, server=server, capture_stderr=True).start()
    other = AppServer(env, server=server, capture_stderr=True).start()
    try:
        async with aiohttp.ClientSession() as session:
            plans = [chat(60, gap=0.05) for _ in range(DRAINED)]  # 3 s answers
            seen: list[list[tuple[int, str, dict[str, Any]]]] = [[] for _ in plans]
            responses = [await session.post(f"{stopping.url}/chat/stream/", json=body) for body, _ in plans]
            await asyncio.gather(*(read_events_until(r, s, 3) for r, s in zip(responses, seen, strict=True)))
            assert stopping.proc is not None
            stopping.proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()

            async def finish(index: int) -> None:
                with contextlib.suppress(aiohttp.ClientError):  # cut by the stop, or read to the end
                    await read_events_until(responses[index], seen[index], 10**6)
                responses[index].close()
                if seen[index][-1][1] in ("done", "error"):
                    return
                stream_id = seen[index][0][2]["stream_id"]
                last = seen[index][-1][0]
                async with session.get(f"{other.url}/chat/stream/{stream_id}/",
                                       headers={"Last-Event-ID": str(last)}) as response:
                    assert response.status == 200, await response.text()
                    await read_events_until(response, seen[index], 10**6)

            await asyncio.wait_for(asyncio.gather(*(finish(i) for i in range(DRAINED))), 20)
            await asyncio.to_thread(stopping.proc.wait, 20)
            drained_in = time.monotonic() - stopped_at
    finally:
        log = stopping.log()
        stopping.stop()
        other.stop()
    for events, (_, expected) in zip(seen, plans, strict=True):
        assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1))  # no gap, no repeat
        assert events[-1][1] == "done", events[-3:]
        assert "".join(data["text"] for _, name, data in events if name == "delta") == expected
    assert drained_in < 15.0
    noise = [line for line in log.splitlines() if any(marker in line for marker in SHUTDOWN_NOISE)]
    assert not noise, log[-3000:]

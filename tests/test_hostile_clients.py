"""Hostile clients at the door: slowloris, slow bodies and thousands of idle sockets.

Each scenario runs against a real Daphne and a real uvicorn worker (the sample project, streaming
from the simulator), reached directly and through nginx configured as ``docs/deploy.md`` tells
operators, with its client timeouts short so that they fire inside the test:

* **slowloris**: request headers one byte at a time, never finished; **slow body**: headers
  complete, then the body one byte at a time; **stalled body**: headers and a first body byte,
  then silence; **idle**: connected, nothing sent; **kept alive**: one request answered, then
  silence on the kept-alive connection;
* **5,000 idle sockets** at once: what they cost the process that holds them (RSS and file
  descriptors, measured from outside with psutil) and who closes them;
* a **header line that never ends** (what bounds the memory it takes), and idle sockets against
  uvicorn's ``--limit-concurrency`` (they count).

Meanwhile a normal client must get its stream at once and exactly. Which connections are closed,
by whom and when is asserted and printed (``pytest -s``): the ASGI servers have no deadline for a
request's headers or body (uvicorn closes a connection only once a response was sent and
``--timeout-keep-alive`` passed in silence; Daphne's Twisted closes one after 60 s without a byte,
each byte restarting the clock), so only nginx's ``client_header_timeout``,
``client_body_timeout`` and ``keepalive_timeout`` end them; behind nginx the workers never see
any of these connections.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import http.client
import importlib.util
import re
import resource
import select
import selectors
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest

from chatproxy.simulator.process import SimulatorProcess
from tests.e2e.stack import HOST, Proc, free_port, port_open, read_from, size, start_nginx, wait_until, write_nginx_conf
from tests.servers import AppServer, simulator_env
from tests.test_operations import TIMEOUTS, assert_complete, chat, sse_post

pytestmark = pytest.mark.e2e

#: uvicorn's ``--timeout-keep-alive`` in these tests (its default is 5 s).
UVICORN_KEEP_ALIVE = 1.0
#: nginx's client timeouts in these tests (the defaults are 60 s, 60 s and 75 s).
NGINX_HEADER_TIMEOUT = 3.0  # above the time 5,000 sockets take to open and a stream to run, loaded
NGINX_BODY_TIMEOUT = 1.0
NGINX_KEEPALIVE_TIMEOUT = 1.0
NGINX_CLIENT_TIMEOUTS = (
    f"    client_header_timeout {NGINX_HEADER_TIMEOUT:g}s;\n"
    f"    client_body_timeout {NGINX_BODY_TIMEOUT:g}s;\n"
    f"    keepalive_timeout {NGINX_KEEPALIVE_TIMEOUT:g}s;\n"
)
#: How long the slow clients are watched: past every timeout above, with a margin for a loaded machine.
WINDOW = NGINX_HEADER_TIMEOUT + 1.5
#: How often a slowloris or slow-body client sends its next byte: far below every timeout above.
TRICKLE = 0.25
#: A normal client's first byte while the hostile ones are connected (generous: a loaded machine).
FIRST_BYTE_BOUND = 2.0

IDLE_SOCKETS = 5000
#: What one idle socket may cost the process holding it. Measured here: see docs/deploy.md.
IDLE_SOCKET_RSS_BOUND = 16 * 1024

FRONTS = ("daphne", "uvicorn", "nginx-daphne", "nginx-uvicorn")
#: uvicorn's ``--limit-concurrency`` for the worker that has one.
CONCURRENCY_LIMIT = 20


@dataclass
class Front:
    """One way in: a worker directly, or nginx in front of it."""

    name: str
    port: int
    worker: AppServer
    nginx: Proc | None = None
    access_log: Path | None = None  # nginx's, for this front

    def logged(self, since: int) -> collections.Counter[str]:
        """The statuses nginx logged for this front after byte ``since`` of its access log."""
        if self.access_log is None:
            return collections.Counter()
        return collections.Counter(re.findall(r" status=(\d+) ", read_from(self.access_log, since)))

    def log_size(self) -> int:
        return size(self.access_log) if self.access_log is not None else 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def holder(self) -> psutil.Process:
        """The process that holds the clients' connections: the worker, or nginx's (only) worker process."""
        if self.nginx is None:
            assert self.worker.proc is not None
            return psutil.Process(self.worker.proc.pid)
        assert self.nginx.pid is not None
        children = psutil.Process(self.nginx.pid).children()
        assert len(children) == 1, children
        return children[0]

    def worker_fds(self) -> int:
        assert self.worker.proc is not None
        return int(psutil.Process(self.worker.proc.pid).num_fds())


@dataclass
class Closed:
    after: float  # seconds since the socket was opened
    got: bytes  # what came before the close (an error response, or nothing)
    how: str  # "FIN", "RST" or "EPIPE"


@dataclass
class Herd:
    """Client sockets to one port, each opened with a first message; records when and how the
    other end closes each of them."""

    name: str
    port: int
    socks: list[socket.socket] = field(default_factory=list)
    opened: list[float] = field(default_factory=list)
    closed: dict[int, Closed] = field(default_factory=dict)
    received: dict[int, bytes] = field(default_factory=dict)  # from sockets still open
    trickled: int = 0
    _selector: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)

    def open(self, count: int, first: bytes = b"") -> Herd:
        """``count`` connections, each sending ``first``: non-blocking, in batches below nginx's
        listen backlog (511). A socket's clock starts when its connect is issued, before the
        other end can have accepted it (a SYN the backlog dropped is retried a second later)."""
        for start in range(0, count, 250):
            issued = time.monotonic()
            batch = []
            for _ in range(min(250, count - start)):
                sock = socket.socket()
                sock.setblocking(False)
                code = sock.connect_ex((HOST, self.port))
                assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
                batch.append(sock)
            connecting = selectors.DefaultSelector()
            for sock in batch:
                connecting.register(sock, selectors.EVENT_WRITE)
            pending = len(batch)
            deadline = time.monotonic() + 10
            while pending:
                assert time.monotonic() < deadline, f"{pending} connections of {self.name} never completed"
                for key, _ in connecting.select(1):
                    connecting.unregister(key.fileobj)
                    pending -= 1
            connecting.close()
            for sock in batch:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                if first:
                    sock.send(first)
                self.adopt(sock, issued)
        return self

    def adopt(self, sock: socket.socket, opened: float | None = None) -> None:
        """Watch ``sock``, open since ``opened`` (now by default)."""
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, len(self.socks))
        self.socks.append(sock)
        self.opened.append(time.monotonic() if opened is None else opened)

    def _close_seen(self, index: int, how: str) -> None:
        self.closed[index] = Closed(time.monotonic() - self.opened[index], self.received.pop(index, b""), how)
        self._selector.unregister(self.socks[index])

    def poll(self) -> None:
        """Note what the other end sent, and the sockets it closed, since the last call."""
        for key, _ in self._selector.select(0):
            index = key.data
            try:
                while chunk := self.socks[index].recv(65536):
                    self.received[index] = self.received.get(index, b"") + chunk
            except BlockingIOError:
                continue  # an answer, not (yet) followed by a close
            except ConnectionResetError:
                self._close_seen(index, "RST")
                continue
            self._close_seen(index, "FIN")

    def trickle(self, data: bytes) -> None:
        """Send the next byte of ``data`` (cycling) on every socket still open."""
        at = self.trickled % len(data)
        for index, sock in enumerate(self.socks):
            if index in self.closed:
                continue
            try:
                sock.send(data[at:at + 1])  # one byte never fills a socket buffer
            except (BrokenPipeError, ConnectionResetError):
                self._close_seen(index, "EPIPE")
        self.trickled += 1

    def all_closed(self) -> bool:
        self.poll()
        return self.still_open == 0

    @property
    def still_open(self) -> int:
        return len(self.socks) - len(self.closed)

    def summary(self) -> str:
        if not self.closed:
            return f"{self.name}: {len(self.socks)} held open"
        times = [c.after for c in self.closed.values()]
        answers = sorted({(c.got.split(b"\r\n", 1)[0].decode(errors="replace") or "nothing", c.how)
                          for c in self.closed.values()})
        return (f"{self.name}: {len(self.closed)}/{len(self.socks)} closed after {min(times):.2f}-{max(times):.2f} s "
                f"(median {statistics.median(times):.2f}), answered {answers}")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self._selector.close()


def raise_nofile() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one (the servers started after inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * IDLE_SOCKETS
    assert hard == resource.RLIM_INFINITY or hard >= needed, f"RLIMIT_NOFILE hard limit {hard} < {needed}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


@pytest.fixture(scope="module")
def fronts(module_simulator: SimulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Front]]:
    """A Daphne and a uvicorn worker (``--timeout-keep-alive`` short), a uvicorn worker with
    ``--limit-concurrency``, and nginx in front of each: ``fronts["daphne"]`` is the Daphne worker
    reached directly, ``fronts["nginx-daphne"]`` the same worker through nginx, and so on."""
    limits = raise_nofile()
    env = simulator_env(module_simulator.base_url, timeouts=TIMEOUTS, limits={"MAX_STREAMS_PER_USER": 100})
    workers = {
        "daphne": AppServer(env, server="daphne", backlog=4096),
        "uvicorn": AppServer(env, server="uvicorn", backlog=4096,
                             args=["--timeout-keep-alive", f"{UVICORN_KEEP_ALIVE:g}"]),
        "uvicorn-limited": AppServer(env, server="uvicorn", args=["--limit-concurrency", str(CONCURRENCY_LIMIT)]),
    }
    nginx: Proc | None = None
    try:
        with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(AppServer.start, workers.values()))
        tmp: Path = tmp_path_factory.mktemp("hostile-nginx")
        ports = {name: free_port() for name in workers}
        conf = write_nginx_conf(tmp, {name: (ports[name], [worker.port]) for name, worker in workers.items()},
                                worker_connections=3 * IDLE_SOCKETS, http_extra=NGINX_CLIENT_TIMEOUTS)
        nginx = start_nginx(tmp, conf)
        for port in ports.values():
            wait_until(lambda p=port: port_open(p), "nginx", [nginx], timeout=15)
        found = {name: Front(name, worker.port, worker) for name, worker in workers.items()}
        for name, worker in workers.items():
            log = tmp / f"nginx-{name}-access.log"
            found[f"nginx-{name}"] = Front(f"nginx-{name}", ports[name], worker, nginx, log)
        yield found
    finally:
        if nginx is not None:
            nginx.stop()
        for worker in workers.values():
            worker.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


async def normal_stream(front: Front) -> float:
    """One chat answered exactly through ``front``; returns its time to first byte."""
    body, expected = chat(10, gap=0.02)
    async with aiohttp.ClientSession(front.url) as session:
        result = await sse_post(session, body)
    assert_complete(result, expected)
    assert result.first_byte is not None
    return result.first_byte - result.started


def kept_alive(front: Front, count: int, herd: Herd) -> None:
    """``count`` connections that each had one page answered and stay open (HTTP/1.1 keep-alive),
    each given to ``herd`` as soon as its answer is read."""
    for _ in range(count):
        conn = http.client.HTTPConnection(HOST, front.port, timeout=5)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        assert not response.will_close
        assert conn.sock is not None
        herd.adopt(conn.sock)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll ``check`` every 20 ms until it holds; returns how long that took."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout, f"{what}: not after {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - began


def holding(process: psutil.Process, fds: int) -> Callable[[], bool]:
    """Whether ``process`` has ``fds`` descriptors open (it accepted the connections counted in)."""
    return lambda: bool(process.num_fds() >= fds)


@pytest.mark.parametrize("name", FRONTS)
async def test_thousands_of_idle_sockets(name: str, fronts: dict[str, Front]) -> None:
    """5,000 connections that send nothing: the process holding them (the worker, or nginx)
    accepts them all at a bounded cost per socket (one file descriptor, a few KiB), a normal
    client meanwhile gets its stream promptly and exactly, and afterwards they are closed by
    nginx's ``client_header_timeout``, or, held by the worker (which has no deadline for a
    request that never comes), released once the clients close them, nothing left behind."""
    front = fronts[name]
    holder = front.holder
    fds, rss = holder.num_fds(), holder.memory_info().rss
    worker_fds = front.worker_fds()
    herd = Herd("idle", front.port)
    try:
        began = time.monotonic()
        await asyncio.to_thread(herd.open, IDLE_SOCKETS)
        opened_in = time.monotonic() - began
        accepted_in = await asyncio.to_thread(wait_for, holding(holder, fds + IDLE_SOCKETS), f"{name} accepting them")
        fds_each = (holder.num_fds() - fds) / IDLE_SOCKETS
        rss_total = holder.memory_info().rss
        rss_each = (rss_total - rss) / IDLE_SOCKETS
        first_byte = await normal_stream(front)
        held_by_worker = front.worker_fds() - worker_fds
        herd.poll()
        closed_during_stream = len(herd.closed)
        if front.nginx is not None:
            await asyncio.to_thread(wait_for, herd.all_closed, "nginx closing them", NGINX_HEADER_TIMEOUT + 5)
    finally:
        herd.close()
    released_in = await asyncio.to_thread(wait_for, lambda: holder.num_fds() <= fds + 5, f"{name} releasing them")
    print(f"\n{name}: {IDLE_SOCKETS} idle sockets opened in {opened_in:.2f} s, accepted {accepted_in:.2f} s later; "
          f"{fds_each:.2f} fds and {rss_each / 1024:.1f} KiB RSS each in {holder.name()} "
          f"(RSS {rss_total / 2**20:.1f} MiB in all); "
          f"normal stream's first byte after {first_byte:.3f} s; worker fds +{held_by_worker}; "
          f"{herd.summary()}; fds back {released_in:.2f} s after the herd closed")
    assert first_byte < FIRST_BYTE_BOUND
    assert fds_each < 1.05  # one descriptor per connection
    assert rss_each < IDLE_SOCKET_RSS_BOUND, f"{rss_each / 1024:.1f} KiB per idle socket"
    # the stream ran while all of them were connected
    assert closed_during_stream == 0, f"{closed_during_stream} closed before the stream's end ({herd.summary()})"
    if front.nginx is None:
        assert herd.still_open == IDLE_SOCKETS, herd.summary()  # the worker closes none of them itself
    else:
        assert held_by_worker < 10, held_by_worker  # nginx alone holds them
        times = [c.after for c in herd.closed.values()]
        assert min(times) >= NGINX_HEADER_TIMEOUT - 0.1 and max(times) < NGINX_HEADER_TIMEOUT + 3, herd.summary()


SLOWLORIS = 200
SLOW_BODY = 100
STALLED_BODY = 50
IDLE = 50
KEPT_ALIVE = 50

REQUEST_HEAD = b"POST /chat/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
BODY_HEAD = REQUEST_HEAD + b"Content-Length: 100000\r\n\r\n"

#: Who closes what within ``WINDOW``: the timeout that does it (seconds after the socket opened,
#: or after the answer for a kept-alive one), or None: held open.
EXPECTED: dict[str, dict[str, float | None]] = {
    "daphne": {"slowloris": None, "slow body": None, "stalled body": None, "idle": None, "kept alive": None},
    "uvicorn": {"slowloris": None, "slow body": None, "stalled body": None, "idle": None,
                "kept alive": UVICORN_KEEP_ALIVE},
    "nginx-daphne": {"slowloris": NGINX_HEADER_TIMEOUT, "slow body": None, "stalled body": NGINX_BODY_TIMEOUT,
                     "idle": NGINX_HEADER_TIMEOUT, "kept alive": NGINX_KEEPALIVE_TIMEOUT},
}
EXPECTED["nginx-uvicorn"] = EXPECTED["nginx-daphne"]


@pytest.mark.parametrize("name", FRONTS)
async def test_slow_clients_leave_a_normal_stream_alone(name: str, fronts: dict[str, Front]) -> None:
    """Hundreds of slow clients hold connections while a normal client streams: its answer is
    exact and its first byte prompt; each slow client is closed by the timeout expected of the
    front (nginx's), or held open for the whole window (the ASGI servers have none for them);
    behind nginx the worker holds none of their connections."""
    front = fronts[name]
    worker_fds = front.worker_fds()
    log_from = front.log_size()
    herds = {"kept alive": Herd("kept alive", front.port)}
    await asyncio.to_thread(kept_alive, front, KEPT_ALIVE, herds["kept alive"])
    herds |= {
        "slowloris": Herd("slowloris", front.port).open(SLOWLORIS, REQUEST_HEAD),
        "slow body": Herd("slow body", front.port).open(SLOW_BODY, BODY_HEAD + b"{"),
        "stalled body": Herd("stalled body", front.port).open(STALLED_BODY, BODY_HEAD + b"{"),
        "idle": Herd("idle", front.port).open(IDLE),
    }
    began = time.monotonic()
    try:
        async def hostile() -> None:
            while time.monotonic() - began < WINDOW:
                herds["slowloris"].trickle(b"X-Slow: a\r\n")  # headers that grow and never end
                herds["slow body"].trickle(b'"messages": ')
                for herd in herds.values():
                    herd.poll()
                await asyncio.sleep(TRICKLE)

        pestering = asyncio.create_task(hostile())
        try:
            first_byte = await normal_stream(front)
            held_by_worker = front.worker_fds() - worker_fds
        finally:
            await pestering
        for herd in herds.values():
            herd.poll()
    finally:
        for herd in herds.values():
            herd.close()
    await asyncio.sleep(0.2)  # nginx's access log lines for the last closes
    print(f"\n{name}: normal stream's first byte after {first_byte:.3f} s; worker fds +{held_by_worker}; "
          f"nginx logged {dict(front.logged(log_from))}")
    for herd in herds.values():
        print("   ", herd.summary())
    assert first_byte < FIRST_BYTE_BOUND
    for herd_name, timeout in EXPECTED[name].items():
        herd = herds[herd_name]
        if timeout is None:
            assert herd.still_open == len(herd.socks), herd.summary()
            continue
        assert herd.still_open == 0, herd.summary()
        times = [c.after for c in herd.closed.values()]
        assert min(times) >= timeout - 0.1 and max(times) < timeout + 1.5, herd.summary()
        assert all(c.got == b"" for c in herd.closed.values()), herd.summary()  # closed without an answer
    if front.nginx is not None:
        # nginx absorbs them: the worker held the normal stream's connections at most
        assert held_by_worker < 10, held_by_worker
        # 408 in nginx's access log for each request it timed out (an idle connection, no request, is not logged)
        assert front.logged(log_from)["408"] == SLOWLORIS + STALLED_BODY, front.logged(log_from)


HEADER_FLOOD = 16 * 1024 * 1024  # bytes of one header line
#: uvicorn parses HTTP with httptools when it is installed (uvicorn[standard]), else with h11.
UVICORN_PARSER = "httptools" if importlib.util.find_spec("httptools") else "h11"


def flood_header(sock: socket.socket) -> tuple[int, bytes]:
    """A request head whose one header line grows to :data:`HEADER_FLOOD` bytes and never ends:
    how many bytes went out before the other end closed (all of them if it never did), and what
    it answered (nothing if its answer was lost to the reset its close sent)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
    sent = 0
    try:
        while sent < HEADER_FLOOD:
            sent += sock.send(b"a" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        readable, _, _ = select.select([sock], [], [], 0.5)
        return sent, sock.recv(4096) if readable else b""
    except ConnectionResetError:
        return sent, b""


@pytest.mark.parametrize("name", FRONTS)
async def test_a_header_that_never_ends(name: str, fronts: dict[str, Front]) -> None:
    """A slowloris variant that grows instead of waiting: one header line of 16 MiB, unfinished.
    Daphne (Twisted: 16 KiB for the request line and headers) and nginx
    (``large_client_header_buffers``, 8 KiB a line, then it reads and drops the rest) refuse it
    with 400 at a bounded cost; so does uvicorn with h11 (``--h11-max-incomplete-event-size``,
    16 KiB); uvicorn with httptools has no limit and keeps all of it in memory while the
    connection lasts. The worker behind nginx never sees it."""
    front = fronts[name]
    holder = front.holder
    rss, worker_fds = holder.memory_info().rss, front.worker_fds()
    unlimited = name == "uvicorn" and UVICORN_PARSER == "httptools"
    with socket.create_connection((HOST, front.port), timeout=5) as sock:
        sent, answer = await asyncio.to_thread(flood_header, sock)
        if unlimited:  # what is still in the socket buffers is read a moment later
            await asyncio.to_thread(wait_for, lambda: holder.memory_info().rss - rss > HEADER_FLOOD / 2,
                                    "the worker reading the header", 5.0)
        grown = holder.memory_info().rss - rss
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "nothing"
    print(f"\n{name}: {sent / 2**20:.1f} MiB of one header line sent, answered {status!r}, "
          f"{holder.name()} RSS {grown / 2**20:+.1f} MiB (uvicorn's parser: {UVICORN_PARSER})")
    if unlimited:
        assert sent == HEADER_FLOOD and answer == b""  # taken whole, no answer, held in memory (above)
        return
    assert grown < 2**20, grown  # refused: a bounded cost
    if front.nginx is None:
        assert sent < HEADER_FLOOD  # closed long before its end (the 400 may be lost to the reset)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    else:
        # 400 at once; the rest is read and dropped (nginx's lingering close) before nginx closes
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert front.worker_fds() - worker_fds < 10


async def test_idle_sockets_count_against_uvicorns_concurrency_limit(fronts: dict[str, Front]) -> None:
    """uvicorn's ``--limit-concurrency N`` answers 503 once N connections are open, idle ones
    included: N idle sockets straight at the worker shut every normal client out. Behind nginx
    (which holds idle clients itself and opens a worker connection per request) the same idle
    sockets cost the worker nothing, and the limit bounds only real requests."""
    results = {}
    for name in ("uvicorn-limited", "nginx-uvicorn-limited"):
        front = fronts[name]
        holder = front.holder
        fds = holder.num_fds()
        herd = Herd("idle", front.port).open(CONCURRENCY_LIMIT + 5)
        try:
            await asyncio.to_thread(wait_for, holding(holder, fds + CONCURRENCY_LIMIT + 5), f"{name} accepting them")
            body, expected = chat(5, gap=0.0)
            async with aiohttp.ClientSession(front.url) as session:
                results[name] = await sse_post(session, body)
        finally:
            herd.close()
    print(f"\nwith {CONCURRENCY_LIMIT + 5} idle sockets: " + ", ".join(
        f"{name} answers {result.status} {result.body[:40]!r}" for name, result in results.items()))
    assert results["uvicorn-limited"].status == 503
    assert b"Service Unavailable" in results["uvicorn-limited"].body
    assert_complete(results["nginx-uvicorn-limited"], expected)

"""Processes of a benchmark run: the paced upstream, the servers under test, the load generator.

Every process is started here, measured from outside (``/proc`` via psutil: CPU seconds of the
whole process, threads included; RSS and its high-water mark) and stopped by its own PID.

CPU placement: with two or more cores the server under test is pinned to the last core and
everything else (upstream, load generator, this driver) to the others, so the server's CPU time
per chunk is not inflated by sharing its core with the load, and the load cannot steal the
server's core. ``--no-pin`` turns this off.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# --------------------------------------------------------------------------- CPU placement

_CPUS = sorted(os.sched_getaffinity(0))
PIN = False  # see set_pinning()
SERVER_CPUS = {_CPUS[-1]}
LOAD_CPUS = set(_CPUS[:-1]) or set(_CPUS)


def set_pinning(enabled: bool) -> None:
    global PIN
    PIN = enabled and len(_CPUS) >= 2


def pin(pid: int, cpus: set[int]) -> None:
    """Pin a process and all its threads (now and future ones inherit it)."""
    if not PIN:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        for thread in psutil.Process(pid).threads():
            os.sched_setaffinity(thread.id, cpus)
        os.sched_setaffinity(pid, cpus)


def pin_self() -> None:
    pin(os.getpid(), LOAD_CPUS)


# --------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def num_threads(pid: int) -> int:
    return psutil.Process(pid).num_threads()


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryWatch:
    """Peak RSS of ``pid`` from now on: the kernel's high-water mark (reset here through
    ``/proc/PID/clear_refs``), or, where that is not allowed, RSS sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss_bytes(pid)
        self._sampled = self.base
        self._hwm_ok = False
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self._hwm_ok = _status_kib(pid, "VmHWM") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self._sampled = max(self._sampled, rss_bytes(self.pid))

    def peak(self) -> int:
        self._stop.set()
        self._thread.join()
        if self._hwm_ok:
            hwm = _status_kib(self.pid, "VmHWM")
            if hwm is not None:
                return max(hwm * 1024, self._sampled)
        return self._sampled


def sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------- HTTP helpers


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def csrf_token(base_url: str) -> str:
    """GET / on the sample project and return the ``csrftoken`` cookie it sets."""
    request = urllib.request.Request(base_url + "/")
    with _OPENER.open(request, timeout=10) as response:
        for header, value in response.headers.items():
            if header.lower() == "set-cookie" and value.startswith("csrftoken="):
                return value.split(";", 1)[0].split("=", 1)[1]
    raise RuntimeError("the sample project set no csrftoken cookie on GET /")


# --------------------------------------------------------------------------- child processes


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return {**env, **(extra or {})}


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Pacer:
    """``bench.pacer`` in its own process (on the load cores)."""

    def __init__(self, python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "bench.pacer", "--port", "0"], cwd=ROOT, env=_child_env(),
            stdout=subprocess.PIPE, stderr=None, text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("pacer listening on "):
            stop_process(self.proc)
            raise RuntimeError(f"the pacer did not start: {line!r}")
        self.base_url = line.split()[-1]
        self.pid = self.proc.pid
        pin(self.pid, LOAD_CPUS)

    def stats(self) -> dict[str, Any]:
        return json.loads(http("GET", self.base_url.removesuffix("/v1") + "/stats")[2])

    def wait_active(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            active = self.stats()["active"]
            if active >= n or time.monotonic() > deadline:
                return active
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)


class Databases:
    """Migrated SQLite files: one template per ``CHATPROXY_TIMEOUTS`` value (the data migration
    seeds the ``default`` timeout profile from it), copied for each server."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="chatproxy-bench-")
        self._templates: dict[str, str] = {}
        self._copies = 0

    def fresh(self, python: str, timeouts_json: str, setup: str | None = None) -> str:
        """A migrated database (``setup``: Python run by ``manage.py shell -c`` after migrating)."""
        key = f"{timeouts_json}\n{setup}"
        template = self._templates.get(key)
        if template is None:
            template = os.path.join(self._dir.name, f"template-{len(self._templates)}.sqlite3")
            env = _child_env({"DJANGO_SETTINGS_MODULE": "bench.settings", "DJANGO_DB_PATH": template,
                              # As in production: DEBUG off (DEBUG keeps every SQL query in memory and formats it).
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": "chatproxy-bench-" + os.urandom(16).hex(), "CHATPROXY_TIMEOUTS": timeouts_json,
                              "DJANGO_LOG_LEVEL": "WARNING"})
            done = subprocess.run([python, "manage.py", "migrate", "--noinput", "--skip-checks"], cwd=ROOT,
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"migrate failed:\n{done.stderr[-3000:]}")
            if setup:
                done = subprocess.run([python, "manage.py", "shell", "-c", setup], cwd=ROOT, env=env,
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"database setup failed:\n{done.stderr[-3000:]}")
            self._templates[key] = template
        self._copies += 1
        copy = os.path.join(self._dir.name, f"db-{self._copies}.sqlite3")
        shutil.copyfile(template, copy)
        return copy

    def cleanup(self) -> None:
        self._dir.cleanup()


class Server:
    """A server under test on a loopback socket passed with ``--fd`` (backlog 4096).

    ``kind``: ``daphne`` or ``uvicorn`` (chatproxy: ``bench.asgi:application`` with
    ``bench.settings``), or ``floor`` (:mod:`bench.floor_relay`).
    """

    def __init__(self, kind: str, *, upstream: str, python: str = sys.executable, env: dict[str, str] | None = None,
                 databases: Databases | None = None, timeouts: dict[str, Any] | None = None,
                 setup: str | None = None) -> None:
        self.kind = kind
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4096)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = str(self._sock.fileno())
        child_env = _child_env(env)
        # The event loop (asyncio or uvloop) and, for uvicorn, the HTTP parser (h11 or httptools).
        loop, parser = child_env.get("BENCH_LOOP", "asyncio"), child_env.get("BENCH_HTTP", "h11")
        if kind == "floor":
            cmd = [python, "-m", "bench.floor_relay", "--fd", fd, "--upstream", upstream, "--loop", loop]
        else:
            assert databases is not None
            timeouts_json = json.dumps(timeouts or {})
            child_env.update({
                "DJANGO_SETTINGS_MODULE": "bench.settings",
                "DJANGO_DB_PATH": databases.fresh(python, timeouts_json, setup),
                # As in production: DEBUG off (DEBUG keeps every SQL query in memory and formats it).
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": "chatproxy-bench-" + os.urandom(16).hex(),
                "DJANGO_LOG_LEVEL": "WARNING",
                "CHATPROXY_SIMULATOR_URL": upstream,
                "CHATPROXY_TIMEOUTS": timeouts_json,
            })
            child_env.pop("OPENAI_API_KEY", None)
            if kind == "uvicorn":
                cmd = [python, "-m", "uvicorn", "--fd", fd, "--no-access-log", "--log-level", "warning",
                       "--loop", loop, "--http", parser, "--lifespan", "off", "bench.asgi:application"]
            elif kind == "daphne":
                cmd = [python, "-m", "daphne", "-v", "0", "--fd", fd, "bench.asgi:application"]
            else:
                raise ValueError(kind)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, pass_fds=[self._sock.fileno()],
                                     stdout=subprocess.DEVNULL, stderr=None)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                status = http("GET", self.url + "/", timeout=2)[0]
                if status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.1)
        self.csrf = csrf_token(self.url) if kind != "floor" else None
        self.upstream_path = "aiohttp (raw)" if kind == "floor" else self._upstream_path()
        pin(self.pid, SERVER_CPUS)

    def _upstream_path(self) -> str:
        """Which upstream adapter the server uses, from ``GET /_bench/info`` (bench/asgi.py)."""
        try:
            status, _, body = http("GET", self.url + "/_bench/info", timeout=5)
            info = json.loads(body) if status == 200 else {}
        except (OSError, ValueError):
            info = {}
        sdk, client = info.get("sdk"), info.get("http_client")
        if sdk == "legacy":
            return "openai 0.27 (aiohttp)"
        if sdk == "none":
            return "no SDK: aiohttp (raw)"
        return f"openai {info.get('openai', '?')} over {client}" if sdk else "?"

    def stream_headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.csrf:
            headers.update({"Cookie": f"csrftoken={self.csrf}", "X-CSRFToken": self.csrf})
        return headers

    @property
    def stream_url(self) -> str:
        return self.url + ("/relay" if self.kind == "floor" else "/chat/stream/")

    def warm_up(self, rounds: int = 3, directive: str = "[[pace chunks=5 gap=0.001]]") -> None:
        """A few short streams, so lazy imports, pools and caches are in place before measuring."""
        for i in range(rounds):
            body = json.dumps({"messages": [{"role": "user", "content": f"warm up {i} {directive}"}]})
            status, _, data = http("POST", self.stream_url, body.encode(), self.stream_headers(), timeout=20)
            ok = status == 200 and (b"event: done" in data if self.kind != "floor" else b"data: " in data)
            if not ok:
                raise RuntimeError(f"{self.kind}: warm-up stream failed: HTTP {status} {data[:300]!r}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._sock.close()


class ForeignLoad:
    """CPU used by processes that are not part of the benchmark, in cores, over a window.

    The machine may be shared (other test runs): that load competes with the processes measured
    here (and on SMT siblings inflates their CPU time per operation), so every result records it.
    """

    def __init__(self, ours: list[int]) -> None:
        self.ours = ours
        self._start: tuple[float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float]:
        times = psutil.cpu_times()
        # guest time is already inside user time on Linux; steal (another VM ran) counts as foreign.
        busy = sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        mine = 0.0
        for pid in {os.getpid(), *self.ours}:
            with contextlib.suppress(psutil.Error):
                mine += cpu_seconds(pid)
                for child in psutil.Process(pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        mine += cpu_seconds(child.pid)
        return time.monotonic(), busy, mine

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        assert self._start is not None
        t1, busy1, mine1 = self._sample()
        t0, busy0, mine0 = self._start
        return max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / max(1e-6, t1 - t0))


def wait_for_quiet(max_wait: float, threshold: float = 0.25, ours: list[int] | None = None) -> float:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` cores over 1 s.
    Returns the last measured foreign load."""
    deadline = time.monotonic() + max_wait
    while True:
        probe = ForeignLoad(ours or [])
        probe.start()
        time.sleep(1.0)
        load = probe.stop()
        if load < threshold or time.monotonic() >= deadline:
            return load

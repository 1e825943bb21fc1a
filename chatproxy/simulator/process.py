"""Run the simulator as a subprocess (tests, ``make run``, benchmarks).

Contract
--------
``SimulatorProcess().start()`` runs ``sys.executable -m chatproxy.simulator --host 127.0.0.1
--port 0`` in a child process, learns the port from the child's ready line on stdout, and returns
once ``GET /v1/models`` answers (``startup_timeout``, default 15 s; on failure the child's output
is in the exception). A separate process means the server's event loop is never blocked by the
code under test, and a test that blocks its own loop cannot make the upstream look stalled.

* ``.base_url`` -- ``"http://127.0.0.1:PORT/v1"`` (give it to ``AsyncOpenAI(base_url=...)``);
  ``.url`` is the root without ``/v1``; ``.port``.
* ``.stats()`` -- the ``GET /_sim/stats`` document as a dict; ``.requests()`` its request log;
  ``.reset()`` -- ``POST /_sim/reset``.
* ``.wait_until(predicate, timeout=5.0)`` -- polls ``stats()`` every 20 ms until
  ``predicate(stats)`` is true and returns those stats, or raises ``AssertionError`` showing the
  last stats. It blocks the calling thread; from async code use ``await .await_until(...)``,
  which polls from a worker thread and leaves the event loop free.
* ``faults={"gpt-4o": "status=503"}`` -- start-up fault rules (``--fault MODEL DIRECTIVES``);
  ``.set_fault(model, fault)``, ``.clear_faults(model=None)`` and ``.fault_rules()`` change and
  read them at runtime (``/_sim/faults``); ``.reset()`` restores the start-up set.
* ``.stop()`` -- SIGTERM, then SIGKILL after 5 s. Idempotent; also registered with ``atexit``.
* Context manager: ``with SimulatorProcess() as sim: ...``.

The child's stdout/stderr are drained by a daemon thread into a ring buffer (``.output()``), so a
chatty child can never block on a full pipe. stdlib only (urllib): usable before any of the
project's dependencies are imported.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SimulatorProcess"]

# Keep in sync with server.READY_PREFIX (not imported: that would import aiohttp here).
_READY_PREFIX = "chatproxy simulator listening on "
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding chatproxy/

Stats = dict[str, Any]

# Talk to the child directly even when HTTP(S)_PROXY is set in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SimulatorProcess:
    """A simulator in a child process. See the module docstring for the contract."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout: float = 15.0,
        quiet: bool = False,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        faults: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._quiet = quiet
        self._extra_args = list(extra_args)
        for model, fault in (faults or {}).items():
            self._extra_args += ["--fault", model, fault]
        self._env = env
        self._proc: subprocess.Popen[str] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=400)
        self._ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """The last lines the child printed (stdout and stderr interleaved)."""
        return "".join(self._output)

    def start(self) -> SimulatorProcess:
        if self._proc is not None:
            raise RuntimeError("SimulatorProcess already started")
        env = dict(os.environ if self._env is None else self._env)
        # The child must import this very checkout even when the cwd is elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "chatproxy.simulator", "--host", self.host, "--port", str(self.port)]
        if self._quiet:
            cmd.append("--quiet")
        cmd += self._extra_args
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )
        atexit.register(self.stop)
        threading.Thread(target=self._drain, name="simulator-output", daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line)
            if not self._ready.is_set() and line.startswith(_READY_PREFIX):
                # "... listening on http://127.0.0.1:PORT/v1"
                self.port = int(line.strip().rsplit(":", 1)[1].split("/", 1)[0])
                self._ready.set()
        self._ready.set()  # EOF: the child died; _wait_ready reports it

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        if not self._ready.wait(self.startup_timeout) or not self.running:
            raise RuntimeError(
                f"simulator did not start (exit code {self._proc and self._proc.poll()}):\n{self.output()}"
            )
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._request("GET", "/v1/models", headers={"Authorization": "Bearer probe"})
                return
            except (OSError, urllib.error.URLError) as exc:
                last = exc
                time.sleep(0.02)
        raise RuntimeError(
            f"simulator at {self.url} did not answer GET /v1/models: {last!r}\n{self.output()}"
        )

    def stop(self) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after 5 s). Safe to call twice."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> SimulatorProcess:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control endpoints -------------------------------------------------------------------
    def _request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
        headers = {**(headers or {}), **({"Content-Type": "application/json"} if body is not None else {})}
        req = urllib.request.Request(self.url + path, method=method, headers=headers, data=data)
        try:
            with _OPENER.open(req, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 400:  # a bad fault rule: the simulator's message names the key
                raise ValueError(json.loads(exc.read())["error"]["message"]) from None
            raise

    def stats(self) -> Stats:
        """``GET /_sim/stats``: open_connections, active_requests, total_requests, requests, now."""
        stats: Stats = self._request("GET", "/_sim/stats")
        return stats

    def requests(self) -> list[dict[str, Any]]:
        """The request log (last 500), oldest first."""
        requests: list[dict[str, Any]] = self.stats()["requests"]
        return requests

    def reset(self) -> None:
        """Clear the request log, counters and attempt counts; restore the start-up fault rules."""
        self._request("POST", "/_sim/reset")

    def set_fault(self, model: str, fault: str) -> list[dict[str, Any]]:
        """Every request for ``model`` (a name or glob) gets ``fault`` (directives, e.g.
        ``"status=503"``, ``"stall_first=30"``, ``"error=context_length_exceeded"``) until cleared
        or reset. ``times=N`` in a rule: only its next N uses. ValueError if the rule is bad."""
        rules: list[dict[str, Any]] = self._request("POST", "/_sim/faults", body={"model": model, "fault": fault})[
            "rules"
        ]
        return rules

    def clear_faults(self, model: str | None = None) -> list[dict[str, Any]]:
        """Remove the rule for ``model``, or every rule (start-up ones too) if ``None``."""
        body = {} if model is None else {"model": model}
        rules: list[dict[str, Any]] = self._request("DELETE", "/_sim/faults", body=body)["rules"]
        return rules

    def fault_rules(self) -> list[dict[str, Any]]:
        """The rules now in force: ``[{"model", "fault", "times", "hits"}]``."""
        rules: list[dict[str, Any]] = self._request("GET", "/_sim/faults")["rules"]
        return rules

    def wait_until(
        self, predicate: Callable[[Stats], bool], timeout: float = 5.0, interval: float = 0.02
    ) -> Stats:
        """Poll stats until ``predicate(stats)``; return them, or raise AssertionError with the last."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"simulator condition not met within {timeout}s; last stats:\n{_format(stats)}"
                )
            time.sleep(interval)

    # ``timeout`` mirrors wait_until's signature on purpose (ruff's ASYNC109 would prefer
    # asyncio.timeout(), which cannot report the last stats).
    async def await_until(
        self,
        predicate: Callable[[Stats], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
        interval: float = 0.02,
    ) -> Stats:
        """:meth:`wait_until` for async code: the HTTP polls run in a worker thread."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await asyncio.to_thread(self.stats)
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"simulator condition not met within {timeout}s; last stats:\n{_format(stats)}"
                )
            await asyncio.sleep(interval)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SimulatorProcess {self.base_url} {state}>"


def _format(stats: Stats, last: int = 10) -> str:
    """Stats for an assertion message: counters plus the last few requests only."""
    shown = dict(stats)
    requests = shown.pop("requests", [])
    shown[f"requests (last {min(last, len(requests))} of {len(requests)})"] = requests[-last:]
    return json.dumps(shown, indent=1, default=str)

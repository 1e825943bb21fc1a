"""Real ASGI servers for tests: Daphne (or uvicorn) serving the sample project in a child process.

The listening socket is bound here and handed to the server with ``--fd``: no port race, and a
listen backlog large enough for bursts of clients (Daphne's own default is 50).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def simulator_env(simulator_url: str, *, log_level: str = "WARNING", **chatproxy: object) -> dict[str, str]:
    """The sample project's environment as the demo runs it (DEBUG on) against the simulator at
    ``simulator_url``; ``timeouts=``, ``resume=``, ``limits=``, ``fallbacks=`` ... become ``CHATPROXY_TIMEOUTS``
    & co. (JSON)."""
    env = {"CHATPROXY_SIMULATOR_URL": simulator_url, "DJANGO_DEBUG": "1", "DJANGO_LOG_LEVEL": log_level,
           "CHATPROXY_FALLBACKS": "{}"}  # no demo fallback: tests that want fallbacks name them (fallbacks=...)
    env.update({f"CHATPROXY_{key.upper()}": json.dumps(value) for key, value in chatproxy.items()})
    return env


class AppServer:
    """``project.asgi:application`` under ``server`` ("daphne" or "uvicorn") on a loopback port."""

    def __init__(
        self, env: dict[str, str], *, server: str = "daphne", backlog: int = 1024, capture_stderr: bool = False,
        send_buffer: int | None = None, args: Sequence[str] = (),
    ) -> None:
        self.server = server
        self.args = list(args)  # the server's own options (e.g. uvicorn's --timeout-keep-alive)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer is not None:  # inherited by accepted connections: the kernel buffers little for a slow client
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(backlog)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="chatproxy-test-")
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DJANGO_DB_PATH": os.path.join(self._tmp.name, "db.sqlite3"),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        # capture_stderr: the server's log goes to a file (read it with log()) instead of the terminal.
        self.stderr_path = Path(self._tmp.name, "stderr.log") if capture_stderr else None

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run ``manage.py`` against this server's database; returns stdout."""
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env={**self.env, **(env or {})},
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def command(self) -> list[str]:
        fd = str(self._sock.fileno())
        if self.server == "uvicorn":
            return [sys.executable, "-m", "uvicorn", "--fd", fd, "--no-access-log", *self.args,
                    "project.asgi:application"]
        return [sys.executable, "-m", "daphne", "--fd", fd, *self.args, "project.asgi:application"]

    def start(self, timeout: float = 20.0) -> AppServer:
        self.manage("migrate", "--noinput", "--skip-checks")
        stderr = self.stderr_path.open("ab") if self.stderr_path else None
        self.proc = subprocess.Popen(
            self.command(), cwd=ROOT, env=self.env, pass_fds=[self._sock.fileno()],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
        if stderr is not None:
            stderr.close()  # the child has its own copy
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.server} did not start") from None
                time.sleep(0.1)

    def log(self) -> str:
        """What the server wrote to stderr so far (with ``capture_stderr=True``)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sock.close()
        self._tmp.cleanup()

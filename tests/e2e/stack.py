"""The shape users deploy, on loopback: Redis, the simulator, ASGI workers and nginx in front.

Every process is a foreground child of the test session, with its config, data and logs in one
temporary directory:

* ``redis-server --port P --bind 127.0.0.1 --save '' --appendonly no`` (channel layer + cache);
* the simulator (:mod:`tests.e2e.simulator_main`), the upstream;
* per server kind ("daphne", "uvicorn"), two workers sharing one SQLite file and one Redis
  database; each worker's listening socket is bound here and passed with ``--fd``;
* ``nginx -c <tmp>/nginx.conf -p <tmp> -g 'daemon off;'``: one ``server`` per kind, round robin
  over its two workers, ``proxy_http_version 1.1``, ``proxy_buffering off``, WebSocket upgrade,
  ``proxy_read_timeout 3s``.

:class:`Proc` stops its child by PID (SIGTERM, then SIGKILL of its process group after a grace
period); fixtures call it in finalizers, :mod:`atexit` is the fallback, and on Linux a child is
also killed when the test process dies without either (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

#: nginx's idle deadline between two reads from a worker: far shorter than every fault.
NGINX_READ_TIMEOUT = 3.0

#: chatproxy's timeouts in the workers (``CHATPROXY_TIMEOUTS``): faults are detected in a second
#: or two, and a keepalive leaves every second of client-side silence, well inside nginx's 3 s.
WORKER_TIMEOUTS = {
    "CONNECT": 2.0,
    "FIRST_TOKEN": 2.0,
    "STALL": 1.0,
    "DEADLINE": 30.0,
    "MAX_ATTEMPTS": 4,
    "BACKOFF_INITIAL": 0.1,
    "BACKOFF_MAX": 0.5,
    "KEEPALIVE": 1.0,
    "GATEWAY": NGINX_READ_TIMEOUT,
}

#: The slow-start scenario's model, served under an admin profile that waits this long for a first
#: token: longer than nginx's deadline, so only keepalives keep nginx from answering 504.
SLOW_MODEL = "sim-slow"
SLOW_FIRST_TOKEN = 6.0

ADMIN_USER = "e2e-admin"
API_USER = "e2e-api"
ADMIN_PASSWORD = "e2e-admin-pass-7319"

# Talk to local servers directly even when HTTP(S)_PROXY is set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for servers that must bind it themselves)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def find_program(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `make sysdeps` (scripts/ensure-debian-packages.sh)")
    return path


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Proc:
    """One foreground child process; its output goes to ``log_path``."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.env = env
        self.pass_fds = tuple(pass_fds)
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=self.pass_fds,
                # Its own process group: a Ctrl-C in the terminal reaches pytest only, so the
                # finalizers stop everything in order; and a last-resort kill takes nginx's workers too.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        atexit.register(self.stop)
        return self

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive:
            code = self.popen.poll() if self.popen is not None else None
            raise RuntimeError(f"{self.name} is not running (exit code {code}); its log:\n{self.log()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID, then SIGKILL to its process group. Idempotent."""
        popen = self.popen
        if popen is None:
            return
        atexit.unregister(self.stop)
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # children left behind (nginx workers after a killed master): same group, by its id
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if popen.poll() is None:
            popen.wait(5)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} {'alive' if self.alive else 'stopped'}>"


def wait_until(check, what: str, procs: Sequence[Proc], timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns a truthy value; fail early if one of ``procs`` died."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        for proc in procs:
            proc.check_alive()
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # any failure means "not yet"
            last = exc
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name} ---\n{p.log()}" for p in procs)
            raise RuntimeError(f"{what} not ready after {timeout}s (last error: {last!r})\n{logs}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- redis


def start_redis(tmp: Path) -> tuple[Proc, int]:
    port = free_port()
    cmd = [find_program("redis-server"), "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
           "--daemonize", "no", "--dir", str(tmp), "--databases", "4"]
    return Proc("redis", cmd, tmp / "redis.log").start(), port


def redis_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


# ------------------------------------------------------------------------------------------ simulator


def start_simulator(tmp: Path, port: int) -> Proc:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "E2E_SIM_IDLE": "0.5"}
    cmd = [sys.executable, "-m", "tests.e2e.simulator_main", "--host", HOST, "--port", str(port), "--quiet"]
    return Proc("simulator", cmd, tmp / "simulator.log", env=env).start()


def simulator_port(proc: Proc) -> int | None:
    match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", proc.log())
    return int(match.group(1)) if match else None


# -------------------------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """One ASGI server process on a socket bound here (``--fd``), like tests.servers.AppServer."""

    kind: str  # "daphne" | "uvicorn"
    name: str
    env: dict[str, str] = field(repr=False)
    log_path: Path
    port: int = 0
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Worker:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        fd = str(sock.fileno())
        if self.kind == "uvicorn":
            cmd = [sys.executable, "-m", "uvicorn", "--fd", fd, "--lifespan", "on",
                   "--timeout-graceful-shutdown", "2", "project.asgi:application"]
        else:
            cmd = [sys.executable, "-m", "daphne", "--fd", fd, "project.asgi:application"]
        self.proc = Proc(self.name, cmd, self.log_path, env=self.env, pass_fds=[sock.fileno()]).start()
        sock.close()  # the child has its own copy; the socket closes when the child exits
        return self

    def ready(self) -> bool:
        with _OPENER.open(self.url + "/admin/login/", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def worker_env(kind: str, tmp: Path, redis_port: int, redis_db: int, sim_url: str, nginx_port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CHATPROXY_MODEL", "DJANGO_SETTINGS_MODULE")}
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        DJANGO_DEBUG="0",  # production shape: session auth required, no debug pages
        DJANGO_SECRET_KEY=f"e2e-{kind}-secret-key-not-for-production-0123456789abcdef",
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        DJANGO_CSRF_TRUSTED_ORIGINS=f"http://{HOST}:{nginx_port}",
        DJANGO_DB_PATH=str(tmp / f"{kind}.sqlite3"),
        DJANGO_LOG_LEVEL="WARNING",
        REDIS_URL=f"redis://{HOST}:{redis_port}/{redis_db}",
        CHATPROXY_SIMULATOR_URL=sim_url,
        CHATPROXY_TIMEOUTS=json.dumps(WORKER_TIMEOUTS),
        CHATPROXY_FALLBACKS="{}",  # not the demo's fallback: each scenario counts the attempts on one model
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def manage(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**env, **(extra_env or {})},
                          capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def create_admin(env: dict[str, str]) -> str:
    """Create the users in a migrated database; returns a new API key for :data:`API_USER`.

    Two users, so that the streams a test runs at once stay well inside the per-user limit
    (``LIMITS["MAX_STREAMS_PER_USER"]``): the session streams are the admin's, the API ones not.
    """
    for username in (ADMIN_USER, API_USER):
        manage(env, "createsuperuser", "--noinput", "--username", username, "--email", f"{username}@example.com",
               extra_env={"DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD})
    return manage(env, "chatproxy_key", "create", API_USER, "--name", "e2e").strip()


# ---------------------------------------------------------------------------------------------- nginx

NGINX_CONF = """\
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;

events {{
    worker_connections {worker_connections};
}}

http {{
    client_body_temp_path {tmp}/nginx-tmp/client_body;
    proxy_temp_path {tmp}/nginx-tmp/proxy;
    fastcgi_temp_path {tmp}/nginx-tmp/fastcgi;
    uwsgi_temp_path {tmp}/nginx-tmp/uwsgi;
    scgi_temp_path {tmp}/nginx-tmp/scgi;

    log_format e2e '$time_iso8601 id=$http_x_e2e_id "$request" status=$status bytes=$body_bytes_sent '
                   'upstream=$upstream_addr upstream_status=$upstream_status '
                   'request_time=$request_time upstream_time=$upstream_response_time';

{http_extra}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

{servers}
}}
"""

NGINX_SERVER = """\
    upstream {kind}_workers {{
        # round robin (nginx's default)
{upstream_servers}
    }}

    server {{
        listen {host}:{port};
        access_log {tmp}/nginx-{kind}-access.log e2e;
        error_log {tmp}/nginx-{kind}-error.log info;

        location / {{
            proxy_pass http://{kind}_workers;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_connect_timeout 2s;
            proxy_send_timeout {read_timeout}s;
            proxy_read_timeout {read_timeout}s;
        }}
    }}
"""


def write_nginx_conf(tmp: Path, sites: dict[str, tuple[int, list[int]]], worker_connections: int = 512,
                     read_timeout: float = NGINX_READ_TIMEOUT, server_params: str = "", http_extra: str = "") -> Path:
    """``sites``: kind -> (nginx port, worker ports). Each proxied request holds two of nginx's
    ``worker_connections`` (client and worker side). ``server_params`` go on each upstream
    ``server`` line (e.g. ``max_fails=0``); ``http_extra`` are directives for the ``http`` block
    (e.g. ``client_header_timeout 1s;``)."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
    servers = "\n".join(
        NGINX_SERVER.format(
            kind=kind, host=HOST, port=port, tmp=tmp, read_timeout=int(read_timeout),
            upstream_servers="\n".join(f"        server {HOST}:{p} {server_params};" for p in worker_ports),
        )
        for kind, (port, worker_ports) in sites.items()
    )
    # As root, nginx's workers would switch to "nobody", who cannot write into our temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, servers=servers, worker_connections=worker_connections,
                                     http_extra=http_extra))
    return conf


def start_nginx(tmp: Path, conf: Path) -> Proc:
    nginx = find_program("nginx")
    base = [nginx, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "nginx-error.log")]
    test = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{test.stderr}\n{conf.read_text()}")
    return Proc("nginx", [*base, "-g", "daemon off;"], tmp / "nginx-stdout.log").start()


def port_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


# ------------------------------------------------------------------------------------------- the lot


@dataclass
class Site:
    """One server kind behind nginx: two workers, their shared database and Redis db."""

    kind: str
    nginx_port: int
    workers: list[Worker]
    api_key: str = field(repr=False)
    env: dict[str, str] = field(repr=False)
    tmp: Path = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.nginx_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.nginx_port}"

    @property
    def access_log(self) -> Path:
        return self.tmp / f"nginx-{self.kind}-access.log"

    @property
    def error_log(self) -> Path:
        return self.tmp / f"nginx-{self.kind}-error.log"


@dataclass
class Deployment:
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    sites: dict[str, Site] = field(default_factory=dict)
    simulator_url: str = ""
    redis_port: int = 0
    nginx: Proc | None = None

    def stop(self) -> None:
        """Stop every process, front to back (nginx, workers, simulator, Redis), by PID."""
        for proc in reversed(self.procs):
            proc.stop()


def deploy(tmp: Path, kinds: Sequence[str] = ("daphne", "uvicorn"), workers_per_site: int = 2) -> Deployment:
    """Start everything (in parallel where it can be) and return once all of it answers.

    On any failure whatever was started is stopped before the exception propagates.
    """
    dep = Deployment(tmp=tmp)
    try:
        redis, dep.redis_port = start_redis(tmp)
        dep.procs.append(redis)
        sim_port = free_port()
        sim = start_simulator(tmp, sim_port)
        dep.procs.append(sim)
        dep.simulator_url = f"http://{HOST}:{sim_port}/v1"

        nginx_ports = {kind: free_port() for kind in kinds}
        envs = {
            kind: worker_env(kind, tmp, dep.redis_port, index, dep.simulator_url, nginx_ports[kind])
            for index, kind in enumerate(kinds)
        }
        with concurrent.futures.ThreadPoolExecutor(2 * len(kinds)) as pool:
            # One database per kind, migrated side by side; then the workers boot while the admin
            # user and its API key are created.
            list(pool.map(lambda kind: manage(envs[kind], "migrate", "--noinput"), kinds))
            keys = {kind: pool.submit(create_admin, envs[kind]) for kind in kinds}
            all_workers: list[Worker] = []
            for kind in kinds:
                workers = [
                    Worker(kind, f"{kind}-{n + 1}", envs[kind], tmp / f"{kind}-{n + 1}.log").start()
                    for n in range(workers_per_site)
                ]
                dep.procs.extend(w.proc for w in workers if w.proc is not None)
                all_workers.extend(workers)
                dep.sites[kind] = Site(kind, nginx_ports[kind], workers, "", envs[kind], tmp)
            for kind, future in keys.items():
                dep.sites[kind].api_key = future.result()

        conf = write_nginx_conf(tmp, {k: (s.nginx_port, [w.port for w in s.workers]) for k, s in dep.sites.items()})
        dep.nginx = start_nginx(tmp, conf)
        dep.procs.append(dep.nginx)
        wait_until(lambda: redis_ping(dep.redis_port), "redis", [redis], timeout=15)
        wait_until(lambda: simulator_port(sim) == sim_port, "simulator", [sim], timeout=20)
        for site in dep.sites.values():
            wait_until(lambda s=site: port_open(s.nginx_port), "nginx", [dep.nginx], timeout=15)
        for worker in all_workers:
            assert worker.proc is not None
            wait_until(worker.ready, worker.name, [worker.proc], timeout=60)
    except BaseException:
        dep.stop()
        raise
    return dep


def read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()

"""End-to-end fixtures: the deployed shape (Redis, simulator, two workers per server kind, nginx).

* ``deployment`` (session): starts everything once (see :mod:`tests.e2e.stack`), stops every
  process by PID in its finalizer, also when a test failed, and copies all logs to
  ``test-artifacts/e2e-logs/``.
* ``site`` (session, parametrized "daphne" / "uvicorn"): one server kind behind nginx.
* ``slow_start_profile`` (session): the admin profile the slow-start scenario runs under.
* ``sim`` (function): the e2e simulator's accounting, reset for each test.
* ``nginx_logs`` (function): what nginx logged during the test.

At the end of the session the measured table is printed and written to
``test-artifacts/e2e-report.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from chatproxy.profiles import CHECK_INTERVAL
from chatproxy.simulator.process import SimulatorProcess
from tests.e2e import clients, report
from tests.e2e.stack import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    HOST,
    ROOT,
    SLOW_FIRST_TOKEN,
    SLOW_MODEL,
    WORKER_TIMEOUTS,
    Deployment,
    Site,
    deploy,
    read_from,
    size,
)

KINDS = ("daphne", "uvicorn")
LOG_DIR = ROOT / "test-artifacts" / "e2e-logs"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("e2e")
    # A CI timeout usually sends SIGTERM: turn it into KeyboardInterrupt so the finalizer runs.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    dep = deploy(tmp, KINDS)
    try:
        yield dep
    finally:
        dep.stop()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(LOG_DIR, ignore_errors=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for path in tmp.iterdir():
            if path.suffix in (".log", ".conf"):
                shutil.copy(path, LOG_DIR / path.name)


#: The admin profile of the slow-start scenario: the settings' timeouts, but a longer FIRST_TOKEN.
SLOW_START_PROFILE = {"name": "e2e-slow-start", "model_pattern": f"{SLOW_MODEL}*", "enabled": True,
                      **clients.profile_values({**WORKER_TIMEOUTS, "FIRST_TOKEN": SLOW_FIRST_TOKEN})}


@pytest.fixture(scope="session", params=KINDS)
def site(request: pytest.FixtureRequest, deployment: Deployment) -> Site:
    return deployment.sites[request.param]


@pytest.fixture(scope="session")
def slow_start_profile(site: Site) -> dict[str, object]:
    """The slow-start scenario's profile, added once per site through its admin (via nginx)."""

    async def add_profile() -> None:
        session = await clients.admin_session(site.url, ADMIN_USER, ADMIN_PASSWORD)
        try:
            await clients.save_profile(session, SLOW_START_PROFILE)
        finally:
            await session.close()

    # In a thread of its own: the fixture may be requested from inside a running test loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, add_profile()).result()
    # The worker that saved it uses it at once; the other re-checks within CHECK_INTERVAL.
    time.sleep(CHECK_INTERVAL + 0.2)
    return SLOW_START_PROFILE


@pytest.fixture
def sim(deployment: Deployment) -> SimulatorProcess:
    port = int(deployment.simulator_url.rsplit(":", 1)[1].split("/", 1)[0])
    accounting = SimulatorProcess(HOST, port)  # not started here: only its HTTP accounting API is used
    accounting.reset()
    return accounting


_BAD_ACCESS = re.compile(r"\b(?:status|upstream_status)=[^ ]*\b50[24]\b")
_BAD_ERROR = re.compile(r"upstream timed out|\[(?:error|crit|alert|emerg)\]")


@dataclass
class NginxLogs:
    """The access and error log lines nginx wrote for one site since the test started."""

    site: Site
    access_from: int
    error_from: int

    def access(self) -> list[str]:
        return read_from(self.site.access_log, self.access_from).splitlines()

    def errors(self) -> list[str]:
        return read_from(self.site.error_log, self.error_from).splitlines()

    def bad_access(self) -> list[str]:
        return [line for line in self.access() if _BAD_ACCESS.search(line)]

    def bad_errors(self) -> list[str]:
        return [line for line in self.errors() if _BAD_ERROR.search(line)]


@pytest.fixture
def nginx_logs(site: Site) -> NginxLogs:
    return NginxLogs(site, size(site.access_log), size(site.error_log))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not report.ROWS:
        return
    path = report.write()
    terminalreporter.write_sep("=", "chatproxy behind nginx: measured per stream")
    terminalreporter.write(report.render())
    terminalreporter.write_line(f"(written to {path.relative_to(ROOT)}; logs in {LOG_DIR.relative_to(ROOT)}/)")
